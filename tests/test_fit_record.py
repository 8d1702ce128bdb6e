"""Fits are frozen, picklable records; specifications rebuild their workspace on demand."""
import copy
import pickle

import numpy as np
import pytest

import mixedmodels as mm


def _fits():
    sleep = mm.dataset("sleepstudy")
    contra = mm.dataset("contra")
    cbpp = mm.dataset("cbpp")
    return {
        "lmm": mm.fit("reaction ~ 1 + days + (1 + days | subj)", sleep),
        "lmm_reml_offset": mm.fit("reaction ~ 1 + days + (1 | subj)", sleep, REML=True,
                                  offset=0.5 * sleep["days"].to_numpy()),
        "crossed": mm.fit("diameter ~ 1 + (1 | plate) + (1 | sample)", mm.dataset("penicillin")),
        "bernoulli_agq": mm.fit("use ~ 1 + age + urban + (1 | dist)", contra,
                                family=mm.Bernoulli(), nAGQ=5),
        "binomial": mm.fit("incid / hsz ~ 1 + period + (1 | herd)", cbpp,
                           family=mm.Binomial(), weights="hsz"),
        "gamma": mm.fit("reaction ~ 1 + days + (1 | subj)", sleep, family=mm.Gamma(link="log")),
    }


@pytest.fixture(scope="module")
def fits():
    return _fits()


NEWDATA = {
    "lmm": ("sleepstudy", None), "lmm_reml_offset": ("sleepstudy", "offset"),
    "crossed": ("penicillin", None), "bernoulli_agq": ("contra", None),
    "binomial": ("cbpp", None), "gamma": ("sleepstudy", None),
}


@pytest.mark.parametrize("name", list(NEWDATA))
def test_a_fit_pickles_prints_and_predicts_the_same(fits, name):
    fit = fits[name]
    back = pickle.loads(pickle.dumps(fit))
    assert str(back) == str(fit)
    for attr in ["theta", "coef", "stderror", "b", "vcov"]:
        np.testing.assert_array_equal(getattr(back, attr), getattr(fit, attr))
    assert back.objective == fit.objective and back.loglik == fit.loglik
    data_name, needs_offset = NEWDATA[name]
    new = mm.dataset(data_name).iloc[::7]
    kw = {"offset": 0.5 * new["days"].to_numpy()} if needs_offset else {}
    np.testing.assert_array_equal(back.predict(new, **kw), fit.predict(new, **kw))
    np.testing.assert_array_equal(back.fitted(), fit.fitted())
    # the unpickled specification rebuilds its workspace and evaluates the objective
    if fit.is_glmm:
        args = (fit.theta, fit.coef) + (() if fit.dispersion is None else (fit.dispersion,))
        assert back.model.objective(*args) == pytest.approx(fit.model.objective(*args),
                                                             rel=1e-12)
    else:
        assert back.model.objective(fit.theta) == pytest.approx(fit.objective, rel=1e-12)


@pytest.mark.parametrize("name", ["lmm", "gamma"])
def test_copies_are_independent_and_equal(fits, name):
    fit = fits[name]
    for dup in (copy.copy(fit), copy.deepcopy(fit)):
        assert str(dup) == str(fit)
        np.testing.assert_array_equal(dup.coef, fit.coef)
    spec = copy.deepcopy(fit.model)
    assert spec._workspace is None
    assert str(spec.fit()) == str(fit)


def test_a_fit_is_frozen(fits):
    fit = fits["lmm"]
    with pytest.raises(AttributeError, match="frozen"):
        fit.theta = np.zeros(3)
    with pytest.raises(ValueError):
        fit.coef[0] = 0.0


def test_a_specification_takes_a_new_response():
    sleep = mm.dataset("sleepstudy")
    model = mm.LinearMixedModel("reaction ~ 1 + days + (1 | subj)", sleep)
    fit = model.fit()
    # the same response refits to the same numbers; a shifted one moves only the intercept
    same = model.with_response(sleep["reaction"].to_numpy()).fit()
    assert same.objective == pytest.approx(fit.objective, rel=1e-12)
    moved = model.with_response(sleep["reaction"].to_numpy() + 100.0).fit()
    assert moved.coef[0] == pytest.approx(fit.coef[0] + 100.0, rel=1e-9)
    assert moved.coef[1] == pytest.approx(fit.coef[1], rel=1e-9)
    # the original specification is untouched
    assert model.fit().objective == pytest.approx(fit.objective, rel=1e-12)
    with pytest.raises(ValueError, match="180 rows"):
        model.with_response(np.ones(10))


def test_a_glmm_specification_takes_a_new_response():
    cbpp = mm.dataset("cbpp")
    model = mm.GeneralizedLinearMixedModel("incid / hsz ~ 1 + period + (1 | herd)", cbpp,
                                           mm.Binomial(), weights="hsz")
    fit = model.fit()
    y = model.design.y
    refit = model.with_response(y.copy()).fit()
    assert refit.objective == pytest.approx(fit.objective, rel=1e-9)
    with pytest.raises(ValueError, match="proportions|outside|\\[0, 1\\]"):
        model.with_response(y + 2.0)

"""Right answers on awkward inputs: conditioning of X, convergence checks, the singular
flag, LMM offsets, inputs lme4 refuses, zero weights."""
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

import mixedmodels as mm
from mixedmodels._optimize import ConvergenceWarning, OptSummary, check_optimum

from conftest import LOCAL_REFERENCE, OBJECTIVE_ABS, OPTIMUM

EXTRA = json.loads((LOCAL_REFERENCE / "extra_public.json").read_text())
FITS = {f["name"]: f for f in EXTRA["fits"]}
FORMULA = "reaction ~ 1 + days + (1 | subj)"


@pytest.fixture(scope="module")
def sleep():
    return mm.dataset("sleepstudy")


@pytest.fixture(scope="module")
def unshifted(sleep):
    return mm.fit(FORMULA, sleep)


# -- an uncentred or badly scaled predictor ----------------------------------------------
@pytest.mark.parametrize("shift", [1e6, 1e7, 1e8])
def test_shifting_a_predictor_leaves_the_fit_unchanged(sleep, unshifted, shift):
    data = sleep.assign(days=sleep["days"] + shift)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = mm.fit(FORMULA, data)
    assert fit.loglik == pytest.approx(unshifted.loglik, rel=1e-6)
    assert fit.coef[1] == pytest.approx(unshifted.coef[1], rel=1e-6)
    assert fit.stderror[1] == pytest.approx(unshifted.stderror[1], rel=1e-6)
    # the intercept moves by exactly -shift × slope (algebra)
    assert fit.coef[0] == pytest.approx(unshifted.coef[0] - shift * unshifted.coef[1], rel=1e-6)
    near = [str(w.message) for w in caught if "nearly collinear" in str(w.message)]
    if shift >= 1e7:
        assert near and "'days'" in near[0]
    else:
        assert not near


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_scaling_a_predictor_leaves_the_fit_unchanged(sleep, unshifted, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = mm.fit(FORMULA, sleep.assign(days=sleep["days"] * scale))
    assert fit.loglik == pytest.approx(unshifted.loglik, rel=1e-6)
    assert fit.coef[1] * scale == pytest.approx(unshifted.coef[1], rel=1e-6)


def test_reml_criterion_under_scaling_moves_by_the_log_determinant(sleep):
    # REML uses log det(X'X): scaling a column by s adds 2 log s to it (algebra)
    base = mm.fit(FORMULA, sleep, REML=True)
    scaled = mm.fit(FORMULA, sleep.assign(days=sleep["days"] * 1e6), REML=True)
    assert scaled.objective == pytest.approx(base.objective + 2 * math.log(1e6), rel=1e-9)


def test_shifted_predictor_in_a_glmm(sleep):
    fam = mm.Gamma(link="log")
    base = mm.fit(FORMULA, sleep, family=fam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shifted = mm.fit(FORMULA, sleep.assign(days=sleep["days"] + 1e8), family=fam)
    assert shifted.loglik == pytest.approx(base.loglik, rel=1e-6)
    assert shifted.coef[1] == pytest.approx(base.coef[1], rel=1e-5)


def test_no_linalg_error_escapes_the_optimizer(sleep):
    data = sleep.assign(days=sleep["days"] + 1e8, d2=(sleep["days"] + 1e8) ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = mm.fit("reaction ~ 1 + days + d2 + (1 | subj)", data)
    assert np.isfinite(fit.objective)


# -- convergence checks ---------------------------------------------------------------
def test_a_good_optimum_stores_derivatives_and_warns_nothing(sleep):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = mm.fit("reaction ~ 1 + days + (1 + days | subj)", sleep)
    derivs = fit.optsum.derivs
    assert derivs.gradient.shape == (3,) and derivs.hessian.shape == (3, 3)
    assert derivs.converged
    assert np.all(np.linalg.eigvalsh(derivs.hessian) > 0)


def test_a_point_short_of_the_optimum_warns_with_the_scaled_gradient(sleep):
    model = mm.LinearMixedModel("reaction ~ 1 + days + (1 + days | subj)", sleep)
    fit = model.fit()
    optsum = OptSummary(initial=fit.theta, lowerbd=model.layout.lower)
    optsum.final = fit.theta * np.array([1.0, 1.0, 1.3])
    optsum.fmin = model.objective(optsum.final)
    with pytest.warns(ConvergenceWarning, match="scaled gradient"):
        record = check_optimum(model.objective, optsum)
    assert not record.converged and optsum.derivs is record


def test_convergence_check_can_be_switched_off(sleep):
    fit = mm.LinearMixedModel(FORMULA, sleep).fit(check_convergence=False)
    assert fit.optsum.derivs is None


# -- the singular flag ------------------------------------------------------------------
@pytest.mark.parametrize("name,reml", [("singular_slope", False), ("singular_slope_reml", True)])
def test_degenerate_covariance_is_put_on_the_boundary(name, reml):
    ref = FITS[name]["lme4"]
    data = pd.read_csv(LOCAL_REFERENCE / "data" / "ergostool_t3.csv.gz")
    fit = mm.fit("effort ~ 1 + type + (1 + t3 | subject)", data, REML=reml)
    assert fit.objective <= ref["objective"] + OBJECTIVE_ABS
    assert fit.theta[2] == 0.0
    assert fit.singular == ref["isSingular"] is True
    np.testing.assert_allclose(fit.theta[:2], ref["theta"][:2], rtol=1e-3)
    lam = fit.lambda_[0]
    cov = lam @ lam.T
    assert abs(cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1])) == pytest.approx(1.0, abs=1e-12)


# -- LMM offsets -------------------------------------------------------------------------
def test_lmm_offset_argument_matches_lme4(sleep):
    ref = FITS["sleepstudy_lmm_offset_ml"]["lme4"]
    fit = mm.fit(FORMULA, sleep, offset=2.0 * sleep["days"].to_numpy())
    assert fit.objective == pytest.approx(ref["objective"], abs=OBJECTIVE_ABS)
    np.testing.assert_allclose(fit.coef, ref["coef"], rtol=OPTIMUM)
    np.testing.assert_allclose(fit.stderror, ref["stderror"], rtol=OPTIMUM)
    np.testing.assert_allclose(fit.theta, ref["theta"], rtol=OPTIMUM)
    assert fit.sigma == pytest.approx(ref["sigma"], rel=OPTIMUM)
    # fitted values include the offset: residuals are those of the unshifted model
    base = mm.fit(FORMULA, sleep)
    np.testing.assert_allclose(fit.residuals(), base.residuals(), rtol=1e-6, atol=1e-6)


# -- inputs lme4 refuses -------------------------------------------------------------------
def test_all_zero_poisson_counts_are_refused(sleep):
    assert EXTRA["messages"]["poisson_all_zero"]["error"] == "Response is constant"
    with pytest.raises(ValueError, match="'y' is all zeros.*Response is constant"):
        mm.fit("y ~ 1 + days + (1 | subj)", sleep.assign(y=0), family=mm.Poisson())


def test_all_ones_bernoulli_is_refused(sleep):
    with pytest.raises(ValueError, match="'y' is constant.*successes"):
        mm.fit("y ~ 1 + days + (1 | subj)", sleep.assign(y=1), family=mm.Bernoulli())


def test_more_random_effects_than_observations_is_refused_for_a_glmm():
    msg = EXTRA["messages"]["more_re_than_obs"]
    data = pd.DataFrame(msg["rows"])
    with pytest.raises(ValueError, match=r"has 30 random effects for 20 observations"):
        mm.fit(msg["formula"], data, family=mm.Bernoulli())


def test_zero_weight_rows_are_dropped_with_a_warning(sleep):
    msg = EXTRA["messages"]["lmm_zero_weights"]
    w = np.ones(len(sleep))
    w[np.array(msg["zero_weight_rows"]) - 1] = 0.0
    with pytest.warns(UserWarning, match="dropped 10 of 180 row"):
        fit = mm.fit(FORMULA, sleep, weights=w)
    assert fit.nobs == 170
    assert fit.objective == pytest.approx(msg["dropped"]["objective"], abs=OBJECTIVE_ABS)
    np.testing.assert_allclose(fit.coef, msg["dropped"]["coef"], rtol=OPTIMUM)


# -- lme4's formula syntax, end to end ----------------------------------------------------
def test_formula_offset_in_an_lmm_matches_lme4(sleep):
    ref = FITS["sleepstudy_lmm_offset_ml"]["lme4"]
    fit = mm.fit("reaction ~ 1 + days + offset(2 * days) + (1 | subj)", sleep)
    assert fit.objective == pytest.approx(ref["objective"], abs=OBJECTIVE_ABS)
    np.testing.assert_allclose(fit.coef, ref["coef"], rtol=OPTIMUM)
    np.testing.assert_allclose(fit.stderror, ref["stderror"], rtol=OPTIMUM)
    # predictions on new rows evaluate the offset term there (algebra: η = Xβ + Zb + 2·days)
    new = sleep.iloc[:5]
    expected = fit.predict(new.assign(days=0.0)) + new["days"].to_numpy() * (fit.coef[1] + 2.0)
    np.testing.assert_allclose(fit.predict(new), expected, rtol=1e-12)


def test_cbind_response_equals_proportion_with_trial_weights():
    cbpp = mm.dataset("cbpp")
    ref = mm.fit("incid / hsz ~ 1 + period + (1 | herd)", cbpp, family=mm.Binomial(),
                 weights="hsz")
    fit = mm.fit("cbind(incid, hsz - incid) ~ 1 + period + (1 | herd)", cbpp,
                 family=mm.Binomial())
    assert fit.objective == pytest.approx(ref.objective, rel=1e-10)
    np.testing.assert_allclose(fit.coef, ref.coef, rtol=1e-8)
    with pytest.raises(ValueError, match="cbind.*Binomial"):
        mm.fit("cbind(incid, hsz - incid) ~ 1 + period + (1 | herd)", cbpp, family=mm.Poisson())
    with pytest.raises(ValueError, match="cbind.*Binomial"):
        mm.fit("cbind(incid, hsz - incid) ~ 1 + period + (1 | herd)", cbpp)


def test_polars_and_pyarrow_frames_fit_like_pandas(sleep, unshifted):
    import polars as pl      # test dependencies (pyproject's "test" extra)
    import pyarrow as pa
    for frame in (pl.from_pandas(sleep), pa.Table.from_pandas(sleep)):
        fit = mm.fit(FORMULA, frame)
        assert fit.objective == pytest.approx(unshifted.objective, rel=1e-12)
        np.testing.assert_allclose(fit.predict(frame), unshifted.predict(sleep), rtol=1e-12)
    with pytest.raises(TypeError, match="ndarray"):
        mm.fit(FORMULA, sleep.to_numpy())


def test_a_patsy_path_fit_pickles_and_predicts(sleep):
    import pickle

    fit = mm.fit("reaction ~ 1 + center(days) + I(days^2) + (1 | `subj`)", sleep)
    back = pickle.loads(pickle.dumps(fit))
    new = sleep.iloc[::11]
    np.testing.assert_array_equal(back.predict(new), fit.predict(new))
    # I(days^2) is the square (R), not XOR: the column equals days² (algebra)
    np.testing.assert_array_equal(fit.X[:, 2], sleep["days"].to_numpy() ** 2)


def test_rectify_puts_a_component_on_its_bound_whenever_that_is_no_worse():
    """The issue's case: θ ended at 1.2e-4 with a printed correlation of 1.0; zero is
    better, so the fit must land there and count as singular."""
    from mixedmodels._optimize import rectify

    data = pd.read_csv(LOCAL_REFERENCE / "data" / "ergostool_t3.csv.gz")
    model = mm.LinearMixedModel("effort ~ 1 + type + (1 + t3 | subject)", data)
    theta = np.array(FITS["singular_slope"]["lme4"]["theta"])
    theta[2] = 1.2e-4
    optsum = OptSummary(initial=theta, lowerbd=model.layout.lower)
    optsum.final, optsum.fmin = theta.copy(), model.objective(theta)
    assert model.objective(np.r_[theta[:2], 0.0]) <= optsum.fmin
    rectify(model.objective, optsum, np.flatnonzero(np.isfinite(model.layout.lower)))
    assert optsum.final[2] == 0.0 and optsum.rectified == [2]
    # a component whose zero is worse stays where it was
    assert optsum.final[0] == theta[0]

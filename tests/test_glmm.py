"""GLMMs against lme4 (tight tolerances), MixedModels.jl's test values and the seed tutorial."""
import numpy as np
import pytest
from conftest import OBJECTIVE_ABS

import mixedmodels as mm

GLMM_RTOL = 1e-3          # θ and β of a GLMM optimum (issue: "about 1e-3 relative")
CODINGS = {"HelmertCoding": mm.HelmertCoding, "DummyCoding": mm.DummyCoding,
           "EffectsCoding": mm.EffectsCoding}
FAMILIES = {"bernoulli": mm.Bernoulli, "binomial": mm.Binomial, "poisson": mm.Poisson}
GLMM_CASES = ["contra_gm1_agq9", "contra_gm1_laplace", "contra_gm2_agq9", "contra_gm3_agq9",
              "contra_urbandist_laplace", "cbpp_binomial", "grouseticks_poisson",
              "verbagg_bernoulli"]


def prepared(name):
    """The data set with the derived columns the reference notes describe."""
    d = mm.dataset(name)
    if name == "contra":
        d["children"] = d.livch != "0"
    if name == "grouseticks":
        d["ch"] = d.height - d.height.mean()
    return d


_fits = {}


def fit_entry(e, **kw):
    key = (e["name"], tuple(sorted(kw.items())))
    if key not in _fits:
        contrasts = {k: CODINGS[v]() for k, v in (e.get("contrasts_py") or {}).items()}
        _fits[key] = mm.fit(e["formula"], prepared(e["data"]), family=FAMILIES[e["family"]](),
                            nAGQ=e.get("nAGQ", 1), weights=e.get("weights"), contrasts=contrasts, **kw)
    return _fits[key]


def assert_close(got, want, rtol, what):
    got, want = np.atleast_1d(np.asarray(got, float)), np.atleast_1d(np.asarray(want, float))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)), err_msg=what)


@pytest.mark.parametrize("name", GLMM_CASES)
def test_glmm_matches_lme4(name, lme4_ref):
    e = lme4_ref[name]
    ref = e["lme4"]
    m = fit_entry(e)
    # the same optimum or a better one
    assert m.objective <= ref["objective"] + OBJECTIVE_ABS
    assert m.objective == pytest.approx(ref["objective"], abs=OBJECTIVE_ABS)
    assert m.loglik == pytest.approx(ref["loglik"], abs=OBJECTIVE_ABS)
    assert_close(m.theta, ref["theta"], GLMM_RTOL, "theta")
    assert_close(m.coef, ref["coef"], GLMM_RTOL, "coef")
    assert_close(m.stderror, ref["stderror"], GLMM_RTOL, "stderror")
    assert m.nobs == ref["nobs"]
    assert m.singular == ref["singular"]


def assert_printed(values, printed, what):
    """The tutorial's 4-decimal cells. Its MixedModels.jl fit stopped a little short of
    the optimum in places (gm3's `children: true` prints 0.6065 where lme4's tight fit,
    and ours, give 0.606443), so a cell may differ by one unit in its last place; the
    tight agreement with lme4 is asserted in test_glmm_matches_lme4."""
    np.testing.assert_allclose(values, printed, rtol=0, atol=1e-4 + 1e-12, err_msg=what)


def test_tutorial_gm1_table_to_the_printed_digits(lme4_ref):
    m = fit_entry(lme4_ref["contra_gm1_agq9"])
    assert m.coef_names == ["(Intercept)", "age", "abs2(age)", "urban: Y", "livch: 1", "livch: 2", "livch: 3+"]
    assert m.X.shape == (1934, 7)
    assert_printed(m.coef, [-0.6871, 0.0035, -0.0046, 0.3484, 0.8151, 0.9165, 0.9154], "coef")
    assert_printed(m.stderror, [0.1686, 0.0092, 0.0007, 0.0600, 0.1622, 0.1851, 0.1858], "se")
    np.testing.assert_array_equal(np.round(m.coef / m.stderror, 2), [-4.08, 0.38, -6.29, 5.81, 5.02, 4.95, 4.93])
    table = m.compact_table()
    assert table.loc["(Intercept)", "σ_dist"] == pytest.approx(0.4786, abs=5e-5)
    text = str(m.varcorr)
    assert "0.22909" in text and "0.47863" in text and "Residual" not in text
    printed = m.format_compact_table()
    for cell in ["<1e-04", "0.70", "<1e-09", "<1e-08", "<1e-06"]:
        assert cell in printed


def test_tutorial_gm2_and_gm3_to_the_printed_digits(lme4_ref):
    gm2 = fit_entry(lme4_ref["contra_gm2_agq9"])
    assert gm2.coef_names == ["(Intercept)", "age", "children: true", "abs2(age)", "urban: Y",
                              "age & children: true"]
    assert_printed(gm2.coef, [-0.3614, -0.0131, 0.6054, -0.0058, 0.3567, 0.0342], "gm2 coef")
    assert_printed(gm2.stderror, [0.1275, 0.0110, 0.1035, 0.0008, 0.0602, 0.0127], "gm2 se")
    assert round(gm2.reterm_sds[0][0], 4) == 0.4757
    gm3 = fit_entry(lme4_ref["contra_gm3_agq9"])
    assert_printed(gm3.coef, [-0.3415, -0.0129, 0.6065, -0.0056, 0.3936, 0.0332], "gm3 coef")
    assert_printed(gm3.stderror, [0.1269, 0.0112, 0.1045, 0.0008, 0.0859, 0.0128], "gm3 se")
    assert round(gm3.reterm_sds[0][0], 4) == 0.5761
    assert gm3.reterm_names == ["urban & dist"]
    # the linear predictor is X β + Z b
    np.testing.assert_allclose(gm3.linpred(), gm3.X @ gm3.coef + gm3.Z @ gm3.b, rtol=1e-12, atol=1e-12)
    assert gm3.success_level == "Y"


def test_fast_fit_matches_mixedmodels_jl(jl_ref):
    ref = jl_ref["contra_urbandist_fast"]
    m = mm.fit(ref["formula"], mm.dataset("contra"), family=mm.Bernoulli(), fast=True)
    assert m.deviance == pytest.approx(ref["deviance"], abs=OBJECTIVE_ABS)
    assert m.theta[0] == pytest.approx(ref["theta"][0], rel=GLMM_RTOL)
    # MixedModels.jl orders the levels of `urban & dist` by first appearance in the data
    contra = mm.dataset("contra")
    first = contra[["urban", "dist"]].drop_duplicates().head(9)
    labels = [f"{u} & {d}" for u, d in zip(first.urban, first.dist)]
    np.testing.assert_allclose(m.ranef()["urban & dist"].loc[labels].iloc[:, 0], ref["ranef_first9"],
                               rtol=GLMM_RTOL, atol=1e-4)


def test_laplace_and_agq_deviances_match_mixedmodels_jl(jl_ref):
    lap = jl_ref["contra_urbandist_laplace"]
    m = mm.fit(lap["formula"], mm.dataset("contra"), family=mm.Bernoulli())
    assert m.deviance == pytest.approx(lap["deviance"], abs=OBJECTIVE_ABS)
    assert m.loglik == pytest.approx(lap["loglik"], abs=OBJECTIVE_ABS)
    agq = jl_ref["contra_urbandist_agq7"]
    m7 = mm.fit(agq["formula"], mm.dataset("contra"), family=mm.Bernoulli(), nAGQ=7)
    assert m7.deviance == pytest.approx(agq["deviance"], abs=OBJECTIVE_ABS)


def test_binomial_deviance_parts_match_mixedmodels_jl(jl_ref):
    ref = jl_ref["cbpp_binomial"]
    m = mm.fit(ref["formula"], mm.dataset("cbpp"), family=mm.Binomial(), weights="hsz")
    assert m.deviance == pytest.approx(ref["deviance"], abs=OBJECTIVE_ABS)
    assert np.sum(m.devresid) == pytest.approx(ref["sum_devresid"], abs=OBJECTIVE_ABS)
    assert m.logdet == pytest.approx(ref["logdet"], abs=OBJECTIVE_ABS)
    assert m.u @ m.u == pytest.approx(ref["sum_u2"], abs=OBJECTIVE_ABS)
    assert m.loglik == pytest.approx(ref["loglik"], abs=OBJECTIVE_ABS)


def test_crossed_bernoulli_matches_mixedmodels_jl(jl_ref):
    ref = jl_ref["verbagg_bernoulli"]
    m = mm.fit(ref["formula"], mm.dataset("verbagg"), family=mm.Bernoulli())
    # MixedModels.jl prints 8151.4; ours may be lower, never higher
    assert m.deviance <= ref["deviance"] + 0.05
    assert m.u @ m.u == pytest.approx(ref["sum_u2"], rel=GLMM_RTOL)
    assert np.sum(m.devresid) == pytest.approx(ref["sum_devresid"], rel=GLMM_RTOL)
    assert_close(m.coef, ref["coef_near_optimum"], 2e-3, "coef")
    assert_close(m.theta, [ref["theta_near_optimum"]["subj"][0], ref["theta_near_optimum"]["item"][0]], GLMM_RTOL, "theta")
    np.testing.assert_array_equal(np.round(m.stderror, 4), ref["stderror_printed"])
    fast = mm.fit(ref["formula"], mm.dataset("verbagg"), family=mm.Bernoulli(), fast=True)
    assert fast.deviance == pytest.approx(ref["fast_deviance"], abs=1e-3)


def test_poisson_fast_matches_mixedmodels_jl(jl_ref):
    ref = jl_ref["grouseticks_poisson_fast"]
    m = mm.fit(ref["formula"], prepared("grouseticks"), family=mm.Poisson(), fast=True)
    # the optimum is delicate (MixedModels.jl issue 877): ours must be no worse
    assert m.deviance <= ref["deviance"] + 1e-3


def test_agq_with_one_point_is_the_laplace_value():
    contra = mm.dataset("contra")
    model = mm.GeneralizedLinearMixedModel("use ~ 1 + age + urban + (1 | dist)", contra, mm.Bernoulli())
    theta, beta = np.array([0.5]), np.array([-0.2, 0.01, 0.7])
    laplace = model._deviance(theta, beta, nAGQ=1)[0]
    from mixedmodels._agq import agq_deviance
    model._deviance(theta, beta, nAGQ=1)
    assert agq_deviance(model, theta, beta, model._u, 1) == pytest.approx(laplace, rel=1e-12)


def test_agq_deviance_decreases_to_a_limit_as_points_grow_on_cbpp():
    cbpp = mm.dataset("cbpp")
    devs = np.array([mm.fit("incid / hsz ~ 1 + period + (1 | herd)", cbpp, mm.Binomial(),
                            weights="hsz", nAGQ=k).deviance for k in (1, 3, 5, 9, 15, 25)])
    assert np.all(np.diff(devs) <= 1e-8)         # never increases
    assert devs[0] - devs[-1] > 0.05             # quadrature matters here
    assert abs(devs[-1] - devs[-2]) < 1e-6       # and settles to a limit


def test_nagq_with_two_terms_is_a_value_error():
    with pytest.raises(ValueError, match="single random-effects term.*does not factor"):
        mm.fit("r2 ~ 1 + anger + (1 | subj) + (1 | item)", mm.dataset("verbagg"),
               family=mm.Bernoulli(), nAGQ=5)
    contra = mm.dataset("contra").assign(a2=lambda d: d.age ** 2, a3=lambda d: d.age ** 3)
    with pytest.raises(ValueError, match="at most 3 columns"):
        mm.fit("use ~ 1 + age + (1 + age + a2 + a3 | dist)", contra, family="bernoulli", nAGQ=3)
    with pytest.raises(ValueError, match="nAGQ\\^k"):
        mm.fit("use ~ 1 + age + (1 + age + a2 | dist)", contra, family="bernoulli", nAGQ=30)


def test_vector_agq_fits_converge_as_the_rule_grows():
    """A vector term under quadrature: nAGQ = 1 is the Laplace fit exactly, and the
    log-likelihood settles as the rule grows (its error falls geometrically)."""
    contra = mm.dataset("contra")
    formula = "use ~ 1 + age + urban + (1 + urban | dist)"
    laplace = mm.fit(formula, contra, family=mm.Bernoulli())
    one = mm.fit(formula, contra, family=mm.Bernoulli(), nAGQ=1)
    assert one.objective == laplace.objective
    objs = [mm.fit(formula, contra, family=mm.Bernoulli(), nAGQ=n).objective for n in (3, 5, 9)]
    assert abs(objs[2] - objs[1]) < abs(objs[1] - objs[0]) < abs(objs[0] - laplace.objective)
    assert abs(objs[2] - objs[1]) < 1e-2


@pytest.mark.parametrize("case", ["bernoulli", "binomial", "poisson"])
@pytest.mark.parametrize("nagq", [1, 2, 7, 12])
def test_agq_kernel_matches_numpy_twin(case, nagq):
    from conftest import KERNEL

    from mixedmodels._agq import agq_deviance, agq_deviance_numpy
    if case == "bernoulli":
        model = mm.GeneralizedLinearMixedModel("use ~ 1 + age + urban + (1 | dist)", mm.dataset("contra"),
                                               mm.Bernoulli())
        theta, beta = np.array([0.55]), np.array([-0.2, 0.01, 0.7])
    elif case == "binomial":
        model = mm.GeneralizedLinearMixedModel("incid / hsz ~ 1 + period + (1 | herd)", mm.dataset("cbpp"),
                                               mm.Binomial(), weights="hsz")
        theta, beta = np.array([0.7]), np.array([-1.4, -1.0, -1.1, -1.6])
    else:
        model = mm.GeneralizedLinearMixedModel("ticks ~ 1 + year + (1 | brood)", mm.dataset("grouseticks"),
                                               mm.Poisson())
        theta, beta = np.array([1.1]), np.array([0.3, 1.2, -1.0])
    model._deviance(theta, beta, nAGQ=1)
    u = model._u
    assert agq_deviance(model, theta, beta, u, nagq) == pytest.approx(
        agq_deviance_numpy(model, theta, beta, u, nagq), rel=KERNEL)

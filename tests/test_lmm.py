"""Linear mixed models against lme4 (tight tolerances) and MixedModels.jl's own test values."""
import re

import numpy as np
import pandas as pd
import pytest
from conftest import FIXED_THETA, OBJECTIVE_ABS, OPTIMUM

import mixedmodels as mm

LMM_CASES = ["sleepstudy_ml", "sleepstudy_reml", "sleepstudy_zerocorr", "sleepstudy_intercept",
             "dyestuff_ml", "dyestuff_reml", "dyestuff2_singular", "penicillin_crossed",
             "pastes_nested"]
SLOW_CASES = ["insteval_crossed", "insteval_interaction"]

_fits = {}


def fit_entry(entry):
    key = entry["name"]
    if key not in _fits:
        _fits[key] = mm.fit(entry["formula"], mm.dataset(entry["data"]), REML=entry["REML"])
    return _fits[key]


def assert_vector(got, want, what):
    """θ, β, SE: relative to each value, with the vector's own scale as the floor so
    that a component near zero (a small correlation) is not held to a tighter bound
    than the optimum fixes it."""
    got, want = np.atleast_1d(np.asarray(got, float)), np.atleast_1d(np.asarray(want, float))
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=OPTIMUM, atol=OPTIMUM * np.max(np.abs(want)), err_msg=what)


def check_against_lme4(entry):
    ref = entry["lme4"]
    m = fit_entry(entry)
    assert m.objective <= ref["objective"] + OBJECTIVE_ABS
    assert m.objective == pytest.approx(ref["objective"], abs=OBJECTIVE_ABS)
    assert m.loglik == pytest.approx(ref["loglik"], abs=OBJECTIVE_ABS)
    assert_vector(m.theta, ref["theta"], "theta")
    assert_vector(m.coef, ref["coef"], "coef")
    assert_vector(m.stderror, ref["stderror"], "stderror")
    assert m.sigma == pytest.approx(ref["sigma"], rel=OPTIMUM)
    assert m.nobs == ref["nobs"]
    assert m.singular == ref["singular"]
    names = ref["coef_names"]
    assert len(m.coef_names) == len([names] if isinstance(names, str) else names)
    # variance components: lme4's rows (group, var1, var2) → variances and covariances
    s2 = m.sigma ** 2
    for row in ref["varcorr"]:
        if row["group"] == "Residual":
            assert m.sigma ** 2 == pytest.approx(row["vcov"], rel=2 * OPTIMUM)
            continue
        group = re.sub(r"\.\d+$", "", row["group"])   # lme4 names a second term on subj "subj.1"
        hits = [(t, lam) for t, lam in zip(m.model.reterms, m.lambda_)
                if t.group_name.replace(" & ", ":") in (group, ":".join(reversed(group.split(":"))))
                and row["var1"] in t.cnames and (row["var2"] == "" or row["var2"] in t.cnames)]
        assert hits, row
        t, lam = hits[0]
        cov = s2 * lam @ lam.T
        i = t.cnames.index(row["var1"])
        j = i if row["var2"] == "" else t.cnames.index(row["var2"])
        assert cov[i, j] == pytest.approx(row["vcov"], rel=10 * OPTIMUM, abs=OPTIMUM * abs(cov[i, i]))


@pytest.mark.parametrize("name", LMM_CASES)
def test_lmm_matches_lme4(name, lme4_ref):
    check_against_lme4(lme4_ref[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_CASES)
def test_insteval_matches_lme4(name, lme4_ref):
    check_against_lme4(lme4_ref[name])


@pytest.mark.slow
def test_insteval_fitted_and_residual_match_mixedmodels_jl(lme4_ref, jl_ref):
    m = fit_entry(lme4_ref["insteval_crossed"])
    ref = jl_ref["insteval_crossed"]
    assert m.fitted()[0] == pytest.approx(ref["fitted_first"], rel=OPTIMUM)
    assert m.residuals()[0] == pytest.approx(ref["residual_first"], rel=10 * OPTIMUM)


def test_objective_at_fixed_theta_matches_mixedmodels_jl(jl_ref):
    ref = jl_ref["dyestuff_ml"]
    model = mm.LinearMixedModel(ref["formula"], mm.dataset("dyestuff"))
    theta = ref["objective_at_theta"]["theta"]
    assert model.objective(theta) == pytest.approx(ref["objective_at_theta"]["objective"], rel=FIXED_THETA)


def test_objective_at_lme4_theta_matches_lme4_objective(lme4_ref):
    """lme4's optimum θ, evaluated by our objective, gives lme4's objective (fixed-θ tier)."""
    for name in ["sleepstudy_ml", "sleepstudy_reml", "penicillin_crossed", "pastes_nested"]:
        e = lme4_ref[name]
        model = mm.LinearMixedModel(e["formula"], mm.dataset(e["data"]), REML=e["REML"])
        assert model.objective(e["lme4"]["theta"]) == pytest.approx(e["lme4"]["objective"], rel=FIXED_THETA), name


@pytest.mark.parametrize("name", ["dyestuff_ml", "penicillin_crossed", "pastes_nested", "sleepstudy_ml"])
def test_logdet_pwrss_and_criteria_match_mixedmodels_jl(name, jl_ref):
    ref = jl_ref[name]
    m = mm.fit(ref["formula"], mm.dataset(ref["data"]))
    assert m.objective == pytest.approx(ref["objective"], abs=OBJECTIVE_ABS)
    if "logdet" in ref:
        assert m.logdet == pytest.approx(ref["logdet"], rel=OPTIMUM)
    if "pwrss" in ref:
        assert m.pwrss == pytest.approx(ref["pwrss"], rel=OPTIMUM)
    if "aic" in ref:
        assert m.aic == pytest.approx(ref["aic"], abs=OBJECTIVE_ABS)
        assert m.bic == pytest.approx(ref["bic"], abs=OBJECTIVE_ABS)
        assert m.dof == ref["dof"]
    theta = ref["theta"] if isinstance(ref["theta"], list) else [v[0] for v in ref["theta"].values()]
    assert_vector(m.theta, theta, "theta")
    if "sd" in ref:
        sds = np.concatenate(m.reterm_sds)
        assert_vector(sds, np.concatenate([np.atleast_1d(v) for v in ref["sd"].values()]), "sd")


def test_sleepstudy_random_effects_match_mixedmodels_jl(jl_ref):
    ref = jl_ref["sleepstudy_ml"]
    m = mm.fit(ref["formula"], mm.dataset("sleepstudy"))
    assert m.u[0] == pytest.approx(ref["u_first"], rel=1e-3)
    assert m.b[0] == pytest.approx(ref["b_first"], rel=1e-3)
    re = m.ranef()["subj"]
    assert list(re.columns) == ["(Intercept)", "days"]
    assert re.iloc[0, 0] == pytest.approx(ref["b_first"], rel=1e-3)
    # fitted = X β + Z b, by algebra
    np.testing.assert_allclose(m.fitted(), m.X @ m.coef + m.Z @ m.b, rtol=1e-12)
    np.testing.assert_allclose(m.residuals(), m.y - m.fitted(), rtol=1e-12)


def test_zerocorr_double_bar_matches_mixedmodels_jl(jl_ref):
    ref = jl_ref["sleepstudy_zerocorr"]
    m = mm.fit(ref["formula"], mm.dataset("sleepstudy"))
    assert len(m.model.reterms) == 1 and m.model.reterms[0].zerocorr
    assert m.objective == pytest.approx(ref["objective"], abs=OBJECTIVE_ABS)
    assert_vector(m.theta, ref["theta"], "theta")
    assert_vector(m.stderror, ref["stderror"], "stderror")
    assert m.sigma == pytest.approx(ref["sigma"], rel=OPTIMUM)


def test_slope_only_and_likelihood_ratio_objectives(jl_ref):
    ref = jl_ref["sleepstudy_slope_only"]
    m = mm.fit(ref["formula"], mm.dataset("sleepstudy"))
    assert m.objective == pytest.approx(ref["objective"], abs=OBJECTIVE_ABS)
    assert_vector(m.theta, ref["theta"], "theta")
    lrt = jl_ref["sleepstudy_lrt"]["lrt"]
    fits = [mm.fit(f, mm.dataset("sleepstudy")) for f in lrt["formulas"]]
    for f, dev, dof in zip(fits, lrt["minus2loglik"], lrt["dof"]):
        assert f.objective == pytest.approx(dev, abs=1e-4)
        assert f.dof == dof
    assert fits[0].objective - fits[1].objective == pytest.approx(lrt["chisq"], abs=1e-4)


def test_precision_weights_match_mixedmodels_jl(jl_ref):
    ref = jl_ref["weighted_lmm"]
    data = pd.DataFrame(ref["data"])
    m = mm.fit(ref["formula"], data, weights=ref["weights"])
    assert_vector(m.theta, ref["theta"], "theta")
    assert_vector(m.stderror, ref["stderror"], "stderror")
    np.testing.assert_allclose(m.vcov, ref["vcov"], rtol=10 * OPTIMUM)


def test_singular_fit_is_flagged_and_on_the_boundary(jl_ref):
    ref = jl_ref["dyestuff2_singular"]
    m = mm.fit(ref["formula"], mm.dataset("dyestuff2"))
    assert m.singular
    assert m.theta[0] == 0.0
    assert m.coef[0] == pytest.approx(ref["coef"][0], rel=OPTIMUM)
    assert m.stderror[0] == pytest.approx(ref["stderror"][0], rel=OPTIMUM)
    assert m.sigma == pytest.approx(ref["sigma"], rel=OPTIMUM)


def test_optimization_record_is_kept():
    m = mm.fit("yield ~ 1 + (1 | batch)", mm.dataset("dyestuff"))
    opt = m.optsum
    # a model with a compiled gradient takes the trust-region search by default
    assert opt.optimizer == "TRUST_REGION_BFGS"
    # a small model starts where lme4 does (Λ = I); the moment start of a scalar term is
    # the one-way moment estimate (by algebra from the data)
    assert np.array_equal(opt.initial, [1.0])
    d = mm.dataset("dyestuff")
    means = d.groupby("batch")["yield"].mean()
    within = ((d["yield"] - d["batch"].map(means)) ** 2).sum() / (len(d) - len(means))
    between = np.var(means.to_numpy(), ddof=1) - within / 5   # 5 rows per batch
    assert m.model.starting_theta()[0][0] == pytest.approx(np.sqrt(between / within), rel=1e-12)
    assert opt.feval == len(opt.fitlog) > 5
    assert opt.fmin == pytest.approx(m.objective, abs=1e-12)
    assert opt.returnvalue in {"FTOL_REACHED", "XTOL_REACHED", "SUCCESS"}
    assert 0 < m.model.setup_seconds and 0 < opt.elapsed


def test_progress_prints_minimizing_line(capsys):
    mm.fit("yield ~ 1 + (1 | batch)", mm.dataset("dyestuff"), progress=True)
    err = capsys.readouterr().err
    assert "Minimizing" in err and "ms/it" in err


def test_structure_paths_are_reported():
    one = mm.LinearMixedModel("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
    crossed = mm.LinearMixedModel("diameter ~ 1 + (1 | plate) + (1 | sample)", mm.dataset("penicillin"))
    assert one.path == "block-diagonal" and "18 levels" in one.describe()
    assert crossed.path == "dense-tail" and "24 levels" in crossed.describe()


def test_sleepstudy_tables_to_the_digits_the_optimum_fixes():
    """The issue's digits for the MixedModels.jl tables of the sleepstudy ML fit."""
    m = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
    vc = m.varcorr
    var, sd = vc.variances["subj"], vc.stddevs["subj"]
    assert (round(var[0], 1), round(var[1], 2), round(m.sigma ** 2, 1)) == (565.5, 32.68, 654.9)
    assert (round(sd[0], 2), round(sd[1], 3), round(m.sigma, 2)) == (23.78, 5.717, 25.59)
    assert round(vc.correlations["subj"][0, 1], 2) == 0.08
    assert (round(m.coef[0], 3), round(m.coef[1], 4)) == (251.405, 10.4673)
    assert (round(m.stderror[0], 3), round(m.stderror[1], 3)) == (6.632, 1.502)
    z = m.coef / m.stderror
    assert (round(z[0], 2), round(z[1], 2)) == (37.91, 6.97)
    text = str(m)
    for cell in ["251.405", "10.4673", "37.91", "6.97", "<1e-99", "<1e-11", "+0.08",
                 "Number of obs: 180; levels of grouping factors: 18"]:
        assert cell in text

"""Profile-likelihood and Wald intervals (inference/profile.py, inference/confint.py)
against lme4's ``confint(fit, method = "profile" | "Wald", oldNames = FALSE)``.

Every ``profile_ci`` and ``wald_ci`` entry of lme4_inference.json is checked:

- profile bounds to 1e-3 relative (issue 8), a bound lme4 puts at 0 exactly 0;
- Wald bounds to 1e-4 relative to the larger of the bound and its standard error (a
  bound near zero, as chickweight's ``time:diet2``, has no relative digits of its own:
  coef ± 1.96·SE carries the error of SE). For the Bernoulli fits of ``contra`` our
  optimum is lower than lme4's (by 1.2e-4 in -2 log L) and β differs from lme4's by up
  to 2e-4, so their bounds are held to the GLMM optimum tier, 1e-3, as in test_glmm.py.

Where lme4's own number is wrong the test says why and checks algebra instead: its
profile of σ on the singular Dyestuff2 fit failed (every optimization returned NA) and
reports [0, Inf]; with the batch sd held at its bound the model is y ~ N(μ, σ²) iid,
whose σ profile has a closed form.
"""
import json
import math
import pickle
import sys
import types

import numpy as np
import pandas as pd
import pytest
from conftest import OPTIMUM, _reference_dir, fit_inference_model
from scipy.optimize import brentq, minimize
from scipy.stats import norm

import mixedmodels as mm
from mixedmodels.inference.confint import confint
from mixedmodels.inference.profile import Profile, parameter_names, profile

PROFILE_RTOL = 1e-3      # issue 8
WALD_RTOL = 1e-4         # issue 8
GLMM_RTOL = 1e-3         # the GLMM optimum tier of test_glmm.py
Z95 = norm.ppf(0.975)

INFERENCE = json.loads((_reference_dir() / "lme4_inference.json").read_text())
MODELS = {m["name"]: m for m in INFERENCE["models"]}
# lme4 names the grouping factor of (1 | batch/cask) "cask:batch"; this package "batch & cask"
GROUP_NAMES = {"cask:batch": "batch & cask"}

PROFILED = [n for n, m in MODELS.items() if "profile_ci" in m]
WALD = [n for n, m in MODELS.items() if "wald_ci" in m]




def fit_reference(name):
    return fit_inference_model(name)


_PROFILES = {}


def profile_reference(name):
    if name not in _PROFILES:
        _PROFILES[name] = profile(fit_reference(name))
    return _PROFILES[name]


def _as_list(x):
    return x if isinstance(x, list) else [x]


def _bound(x):
    return math.inf if x == "Inf" else -math.inf if x == "-Inf" else float(x)


def _our_name(lme4_name):
    for theirs, ours in GROUP_NAMES.items():
        if lme4_name.endswith("|" + theirs):
            return lme4_name[: -len(theirs)] + ours
    return lme4_name


def iid_sigma_interval(y, z):
    """The profile interval of σ for y ~ N(μ, σ²) iid (μ profiled out): with
    σ̂² = Σ(y - ȳ)²/n, ζ² = n log(σ²/σ̂²) + nσ̂²/σ² - n."""
    n = len(y)
    s2 = float(np.sum((y - y.mean()) ** 2)) / n

    def zeta2(s):
        return n * math.log(s * s / s2) + n * s2 / (s * s) - n - z * z

    s = math.sqrt(s2)
    return brentq(zeta2, 1e-3 * s, s, xtol=1e-14), brentq(zeta2, s, 1e3 * s, xtol=1e-14)


# -- profile intervals against lme4 ------------------------------------------------------
@pytest.mark.parametrize("name", PROFILED)
def test_profile_intervals_match_lme4(name):
    ref = MODELS[name]["profile_ci"]
    fit = fit_reference(name)
    ci = profile_reference(name).confint(ref["level"])
    var_names, coef_names = parameter_names(fit)
    names = _as_list(ref["names"])
    nvar = len(var_names)
    # the variance parameters by name, the fixed effects by position (lme4 spells
    # "period2" what this package spells "period: 2")
    assert [_our_name(n) for n in names[:nvar]] == var_names
    assert len(names) == nvar + len(coef_names)
    assert list(ci.index) == var_names + coef_names
    for i, label in enumerate(names):
        for side in ("lower", "upper"):
            want = _bound(_as_list(ref[side])[i])
            got = float(ci[side].iloc[i])
            if name == "dyestuff2_ml" and label == "sigma":
                continue        # lme4's profile failed here: see the next test
            if want == 0.0:
                assert got == 0.0, f"{name} {label} {side}: {got} (lme4: exactly 0)"
            else:
                assert got == pytest.approx(want, rel=PROFILE_RTOL), f"{name} {label} {side}"


def test_dyestuff2_sigma_is_the_iid_normal_profile():
    # lme4 stores [0, Inf]: its optimizations along σ's profile all failed (NA rows).
    ref = MODELS["dyestuff2_ml"]["profile_ci"]
    i = ref["names"].index("sigma")
    assert (ref["lower"][i], ref["upper"][i]) == (0, "Inf")
    # the batch sd stays at its bound 0 along σ's profile (the fit is singular and the
    # batches vary less than the residuals say they should), so the interval is that
    # of the iid normal model
    y = mm.dataset("dyestuff2")["yield"].to_numpy(dtype=float)
    lo, hi = iid_sigma_interval(y, Z95)
    ci = profile_reference("dyestuff2_ml").confint(0.95)
    assert ci.loc["sigma", "lower"] == pytest.approx(lo, rel=1e-6)
    assert ci.loc["sigma", "upper"] == pytest.approx(hi, rel=1e-6)
    table = profile_reference("dyestuff2_ml").table("sigma")
    assert np.all(table["sd_(Intercept)|batch"] == 0.0)


def test_profile_of_a_pickled_and_loaded_fit():
    fit = pickle.loads(pickle.dumps(fit_reference("dyestuff_ml")))
    ref = MODELS["dyestuff_ml"]["profile_ci"]
    ci = profile(fit).confint(0.95)
    np.testing.assert_allclose(ci["lower"], ref["lower"], rtol=PROFILE_RTOL)
    np.testing.assert_allclose(ci["upper"], ref["upper"], rtol=PROFILE_RTOL)
    # and a profile pickles too, tables and all
    pr = pickle.loads(pickle.dumps(profile_reference("dyestuff_ml")))
    pd.testing.assert_frame_equal(pr.confint(0.95), profile_reference("dyestuff_ml").confint(0.95))


def test_reml_fits_are_profiled_through_their_ml_refit():
    # lme4's profile() refits a REML fit by ML first; so does ours, on the same workspace
    pr = profile_reference("pastes_reml")
    assert pr.ml_refit
    ml = mm.fit(MODELS["pastes_reml"]["formula"], mm.dataset("pastes"))
    var_names, _ = parameter_names(ml)
    sds = np.concatenate([np.atleast_1d(s) for s in ml.reterm_sds])
    np.testing.assert_allclose(pr.estimates[var_names[:-1]], sds, rtol=OPTIMUM, atol=1e-8)
    assert pr.estimates["sigma"] == pytest.approx(ml.sigma, rel=OPTIMUM)
    assert pr.estimates["(Intercept)"] == pytest.approx(ml.coef[0], rel=OPTIMUM)
    assert pr.deviance == pytest.approx(ml.objective, abs=1e-6)


# -- the profile itself -------------------------------------------------------------------
def test_tables_hold_the_zeta_curve_and_every_parameter():
    fit = fit_reference("sleepstudy_ml")
    pr = profile_reference("sleepstudy_ml")
    var_names, coef_names = parameter_names(fit)
    assert pr.names == pr.parameters == var_names + coef_names
    ci = pr.confint(0.95)
    for name in pr.names:
        t = pr.table(name)
        assert list(t.columns) == ["zeta"] + pr.parameters
        # ζ is 0 at the estimate and increases with the parameter
        at = t[name] == pr.estimates[name]
        assert at.sum() == 1 and float(t.loc[at, "zeta"].iloc[0]) == 0.0
        assert np.all(np.diff(t["zeta"]) >= -1e-9)
        assert t[name].is_monotonic_increasing
        # the interval's ends are points of the curve where ζ = ∓1.96
        for side, z in (("lower", -Z95), ("upper", Z95)):
            row = t[t[name] == ci.loc[name, side]]
            assert len(row) == 1
            assert float(row["zeta"].iloc[0]) == pytest.approx(z, abs=1e-5)
    # at the estimate every other column is the optimum
    t = pr.table("days")
    row = t[t["days"] == pr.estimates["days"]].iloc[0]
    np.testing.assert_allclose(row[pr.parameters].to_numpy(float), pr.estimates.to_numpy(),
                               rtol=1e-10)
    frame = pr.to_frame()
    assert set(frame["parameter"]) == set(pr.names)
    assert len(frame) == sum(len(pr.table(n)) for n in pr.names)


def test_zeta_is_the_signed_root_of_the_deviance_change():
    # σ's curve, re-evaluated from its definition: the deviance at (θ, σ) with β
    # profiled is the specification's deviance_at; each row's θ comes from its sds and
    # correlation
    fit = fit_reference("sleepstudy_ml")
    pr = profile_reference("sleepstudy_ml")
    t = pr.table("sigma")
    for _, row in t.iloc[[0, len(t) // 2, -1]].iterrows():
        sigma = row["sigma"]
        sd0, sd1 = row["sd_(Intercept)|subj"], row["sd_days|subj"]
        rho = row["cor_days.(Intercept)|subj"]
        cov = np.array([[sd0 * sd0, rho * sd0 * sd1], [rho * sd0 * sd1, sd1 * sd1]]) / sigma ** 2
        lam = np.linalg.cholesky(cov)
        theta = np.array([lam[0, 0], lam[1, 0], lam[1, 1]])
        dev = fit.model.deviance_at(theta, sigma)
        assert dev - fit.objective >= -1e-6
        zeta = math.copysign(math.sqrt(max(dev - fit.objective, 0.0)), sigma - fit.sigma)
        assert row["zeta"] == pytest.approx(zeta, abs=1e-5)


def test_a_higher_level_extends_the_walk():
    pr = profile(fit_reference("sleepstudy_ml"))
    ci95 = pr.confint(0.95)
    ci99 = pr.confint(0.99)
    assert np.all(ci99["lower"] < ci95["lower"]) and np.all(ci99["upper"] > ci95["upper"])
    direct = profile(fit_reference("sleepstudy_ml"), level=0.99).confint(0.99)
    np.testing.assert_allclose(ci99.to_numpy(), direct.to_numpy(), rtol=1e-6)
    # a narrower level needs no new points
    ci50 = pr.confint(0.5)
    assert np.all(ci50["lower"] > ci95["lower"]) and np.all(ci50["upper"] < ci95["upper"])


def test_which_selects_parameters():
    fit = fit_reference("sleepstudy_ml")
    full = profile_reference("sleepstudy_ml").confint(0.95)
    beta = profile(fit, which="beta_")
    assert beta.names == ["(Intercept)", "days"]
    np.testing.assert_allclose(beta.confint().to_numpy(), full.loc[beta.names].to_numpy(),
                               rtol=1e-7)
    some = profile(fit, which=["sigma", 0])
    assert some.names == ["sd_(Intercept)|subj", "sigma"]
    theta = profile(fit, which="theta_")
    assert theta.names == ["sd_(Intercept)|subj", "cor_days.(Intercept)|subj", "sd_days|subj",
                           "sigma"]
    with pytest.raises(ValueError, match="no parameter"):
        profile(fit, which="slope")


def test_singular_components_get_a_lower_bound_of_zero():
    # pastes: the batch sd is 0 at the fit; dyestuff2: the only sd is
    for name, label in (("pastes_reml", "sd_(Intercept)|batch"),
                        ("dyestuff2_ml", "sd_(Intercept)|batch")):
        ci = profile_reference(name).confint(0.95)
        assert ci.loc[label, "lower"] == 0.0
        assert ci.loc[label, "upper"] > 0.0


# -- confint ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", WALD)
def test_wald_intervals_match_lme4(name):
    ref = MODELS[name]["wald_ci"]
    fit = fit_reference(name)
    ci = confint(fit, "wald", level=ref["level"])
    var_names, coef_names = parameter_names(fit)
    assert list(ci.index) == var_names + coef_names
    # lme4 gives no Wald interval for the variance parameters
    assert ci.loc[var_names].isna().all().all()
    fixed = ci.loc[coef_names]
    se = np.atleast_1d(MODELS[name]["lme4"]["stderror"])
    rtol = GLMM_RTOL if MODELS[name]["family"] == "bernoulli" else WALD_RTOL
    for side in ("lower", "upper"):
        want = np.atleast_1d(ref[side])
        scale = np.maximum(np.abs(want), se)
        err = np.abs(fixed[side].to_numpy() - want) / scale
        assert np.all(err <= rtol), f"{name} {side}: {err.max():.2e}"
    # and they are coef ± z·SE of this fit exactly
    np.testing.assert_allclose(fixed["lower"], fit.coef - Z95 * fit.stderror, rtol=1e-12)
    np.testing.assert_allclose(fixed["upper"], fit.coef + Z95 * fit.stderror, rtol=1e-12)


def test_confint_methods_share_one_table():
    fit = fit_reference("dyestuff_ml")
    prof = confint(fit, "profile")
    assert prof.equals(profile_reference("dyestuff_ml").confint(0.95))
    assert fit.confint(method="profile").equals(prof)
    assert fit.confint().equals(confint(fit, "Wald"))
    assert list(prof.columns) == ["lower", "upper"]
    assert list(prof.index) == list(fit.confint().index)
    narrow = confint(fit, "wald", level=0.5)
    assert np.all(narrow["lower"].iloc[-1:] > prof["lower"].iloc[-1:])


def test_glmm_wald_intervals_can_use_hessian_standard_errors():
    fit = fit_reference("cbpp_binomial")
    ci = confint(fit, "wald", se="hessian")
    np.testing.assert_allclose(ci["upper"].iloc[1:] - ci["lower"].iloc[1:],
                               2 * Z95 * fit.stderror_hessian, rtol=1e-12)
    with pytest.raises(ValueError, match="GLMM"):
        confint(fit_reference("dyestuff_ml"), "wald", se="hessian")


def test_bootstrap_intervals_come_from_the_bootstrap(monkeypatch):
    calls = {}

    class Result:
        def confint(self, level, method):
            calls["confint"] = (level, method)
            return pd.DataFrame({"lower": [1.0], "upper": [2.0]}, index=["x"])

    def bootstrap(fit, n, seed=None, n_jobs=1, progress=False):
        calls["bootstrap"] = (fit, n, seed, n_jobs, progress)
        return Result()

    fake = types.ModuleType("mixedmodels.inference.bootstrap")
    fake.bootstrap = bootstrap
    monkeypatch.setitem(sys.modules, "mixedmodels.inference.bootstrap", fake)
    fit = fit_reference("dyestuff_ml")
    out = confint(fit, "bootstrap", level=0.9, n=20, seed=3)
    assert calls["bootstrap"] == (fit, 20, 3, 1, False)
    assert calls["confint"] == (0.9, "percentile")
    assert list(out.columns) == ["lower", "upper"]
    confint(fit, "bootstrap", boot_type="shortest")
    assert calls["bootstrap"][1] == 1000 and calls["confint"] == (0.95, "shortest")


def test_bad_requests_are_refused():
    fit = fit_reference("dyestuff_ml")
    with pytest.raises(ValueError, match="method"):
        confint(fit, "jackknife")
    with pytest.raises(ValueError, match="level"):
        confint(fit, "wald", level=1.5)
    with pytest.raises(ValueError, match="level"):
        profile(fit, level=0.0)
    fast = mm.fit(MODELS["cbpp_binomial"]["formula"], mm.dataset("cbpp"), family="binomial",
                  weights="hsz", fast=True)
    with pytest.raises(ValueError, match="fast"):
        profile(fast)


# -- cases lme4 has no number for: the defining equation, solved independently -----------
def _zeta_at(dev_fixed, x0, base, c, estimate):
    """ζ at c from an independent minimization (Nelder-Mead, restarted) of the deviance
    over the other parameters."""
    best = None
    x = np.asarray(x0, dtype=float)
    for _ in range(2):
        # the deviance is resolved to about 1e-10 (PIRLS), far below what moves ζ
        res = minimize(dev_fixed, x, method="Nelder-Mead",
                       options={"xatol": 1e-6, "fatol": 1e-8, "maxfev": 5000})
        x = res.x
        best = res.fun if best is None else min(best, res.fun)
    return math.copysign(math.sqrt(max(best - base, 0.0)), c - estimate)


def test_gamma_glmm_sigma_bound_solves_the_profile_equation():
    # a dispersion GLMM: σ = √φ is profiled with θ and β re-optimized (lme4 cannot)
    fit = mm.fit("reaction ~ 1 + days + (1 | subj)", mm.dataset("sleepstudy"),
                 family=mm.Gamma(link="log"))
    pr = profile(fit, which=["sigma", "days"])
    ci = pr.confint(0.95)
    model = fit.model
    base = model._joint_value(np.concatenate([fit.beta_w, fit.theta, [math.log(fit.dispersion)]]))
    for side, z in (("lower", -Z95), ("upper", Z95)):
        s = ci.loc["sigma", side]
        def dev(x, s=s):
            # β̃, θ (kept positive) and log φ held at 2 log σ
            return model._joint_value(np.concatenate([x[:2], [abs(x[2])], [2 * math.log(s)]]))

        zeta = _zeta_at(dev, np.concatenate([fit.beta_w, fit.theta]), base, s, fit.sigma)
        assert zeta == pytest.approx(z, abs=1e-4)


def test_correlation_of_a_three_column_term_solves_the_profile_equation():
    # cor_d2.(Intercept) pairs the first and third columns: the profile permutes them to
    # the front. Checked against an independent sd-correlation parameterization (lme4's
    # own profile falls back to linear interpolation here and misses by 2e-3).
    data = mm.dataset("sleepstudy")
    data["d2"] = (data["days"] - 4.5) ** 2 / 10
    fit = mm.fit("reaction ~ 1 + days + (1 + days + d2 | subj)", data)
    name = "cor_d2.(Intercept)|subj"
    ci = profile(fit, which=name).confint(0.95)
    lam = fit.lambda_[0]
    cov = lam @ lam.T
    sd = np.sqrt(np.diag(cov))
    cor = cov / np.outer(sd, sd)

    def dev(x, rho):
        c = np.eye(3)
        c[1, 0] = c[0, 1] = x[3]
        c[2, 0] = c[0, 2] = rho
        c[2, 1] = c[1, 2] = x[4]
        if abs(x[3]) >= 1 or abs(x[4]) >= 1:
            return 1e10
        try:
            low = np.linalg.cholesky(np.outer(np.exp(x[:3]), np.exp(x[:3])) * c)
        except np.linalg.LinAlgError:
            return 1e10
        # θ is the lower triangle by columns: (0,0) (1,0) (2,0) (1,1) (2,1) (2,2)
        return fit.model.objective(low[[0, 1, 2, 1, 2, 2], [0, 0, 0, 1, 1, 2]])

    x0 = np.concatenate([np.log(sd), [cor[1, 0], cor[2, 1]]])
    for side, z in (("lower", -Z95), ("upper", Z95)):
        rho = ci.loc[name, side]
        zeta = _zeta_at(lambda x, rho=rho: dev(x, rho), x0, fit.objective, rho, cor[2, 0])
        assert zeta == pytest.approx(z, abs=1e-4)


def test_profile_repr_names_the_parameters():
    pr = profile_reference("pastes_reml")
    assert isinstance(pr, Profile)
    assert "sd_(Intercept)|batch & cask" in repr(pr) and "ML refit" in repr(pr)

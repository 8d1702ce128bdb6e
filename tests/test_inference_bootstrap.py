"""Simulation from fitted models and the parametric bootstrap (inference/simulate.py,
inference/bootstrap.py).

Every tolerance here is a Monte Carlo one, stated where it is used: k standard errors of
the quantity's Monte Carlo distribution, with k chosen so that the chance of a false
alarm over all the comparisons of a test (Bonferroni) is below about 1e-3. The
expected values come from algebra (moments of the fitted model), from
tests/reference/lme4_inference.json, or from lme4's own bootstrap (LME4_BOOT below, read
from tests/reference/lme4_bootstrap.json, which tests/reference/lme4_bootstrap.R makes).
"""
import json
import math
import pickle
import warnings

import numpy as np
import pytest
from conftest import LOCAL_REFERENCE
from scipy.stats import norm

import mixedmodels as mm
from mixedmodels.inference import bootstrap as boot_module
from mixedmodels.inference.bootstrap import BootstrapResult, BootstrapWarning, bootstrap
from mixedmodels.inference.simulate import simulate

SLEEP_FORMULA = "reaction ~ 1 + days + (1 + days | subj)"


@pytest.fixture(scope="module")
def sleep():
    return mm.dataset("sleepstudy")


@pytest.fixture(scope="module")
def sleep_fit(sleep):
    return mm.fit(SLEEP_FORMULA, sleep)


@pytest.fixture(scope="module")
def sleep_ref():
    models = json.loads((LOCAL_REFERENCE / "lme4_inference.json").read_text())["models"]
    return next(m for m in models if m["name"] == "sleepstudy_ml")


# -- simulate: moments against algebra -------------------------------------------------

def _sleep_covariance(data, fit, weights):
    """σ²(ZΛΛ'Z' + W⁻¹) built from the data, not from the library's Z: rows i and j
    share [1, days_i] T T' [1, days_j]' when they share a subject."""
    z = np.column_stack([np.ones(len(data)), data["days"].to_numpy(float)])
    tmpl = fit.lambda_[0]
    same = data["subj"].to_numpy()[:, None] == data["subj"].to_numpy()[None, :]
    rand = np.where(same, z @ tmpl @ tmpl.T @ z.T, 0.0)
    return fit.sigma ** 2 * (rand + np.diag(1.0 / weights))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weights+offset"])
def test_simulated_lmm_responses_have_the_model_moments(sleep, weighted):
    """Whitened by the Cholesky factor of σ²(ZΛΛ'Z' + W⁻¹), the draws less Xβ + offset
    must be independent standard normal vectors.

    With N draws, each coordinate's mean has s.e. 1/√N, each diagonal entry of the
    sample covariance √(2/N) and each off-diagonal one 1/√N: all within 5.5 s.e.
    (16,470 comparisons × P(|z| > 5.5) = 6e-4). The average of the 180 variances has
    s.e. √(2/(180 N)), so σ² itself is checked to about 0.5% (5 s.e.).
    """
    n_draws = 10_000
    days = sleep["days"].to_numpy(float)
    if weighted:
        w = 1.0 + (sleep["days"].to_numpy() % 3)
        offset = 3.0 * days
        fit = mm.fit(SLEEP_FORMULA, sleep, weights=w, offset=offset)
    else:
        w, offset = np.ones(len(sleep)), np.zeros(len(sleep))
        fit = mm.fit(SLEEP_FORMULA, sleep)
    x = np.column_stack([np.ones(len(sleep)), days])
    mean = x @ fit.coef + offset
    chol = np.linalg.cholesky(_sleep_covariance(sleep, fit, w))

    y = simulate(fit, n=n_draws, seed=20240601)
    assert y.shape == (n_draws, len(sleep))
    white = np.linalg.solve(chol, (y - mean).T).T
    nobs = white.shape[1]
    assert np.max(np.abs(white.mean(axis=0))) < 5.5 / math.sqrt(n_draws)
    cov = np.cov(white, rowvar=False)
    se = np.where(np.eye(nobs, dtype=bool), math.sqrt(2.0 / n_draws), math.sqrt(1.0 / n_draws))
    assert np.max(np.abs(cov - np.eye(nobs)) / se) < 5.5
    assert abs(np.mean(np.diag(cov)) - 1.0) < 5.0 * math.sqrt(2.0 / (nobs * n_draws))


def _glmm_fits():
    sleep = mm.dataset("sleepstudy")
    return {
        "poisson": mm.fit("ticks ~ 1 + year + (1 | brood) + (1 | location)",
                          mm.dataset("grouseticks"), family=mm.Poisson()),
        "binomial": mm.fit("incid / hsz ~ 1 + period + (1 | herd)", mm.dataset("cbpp"),
                           family=mm.Binomial(), weights="hsz"),
        "gamma": mm.fit("reaction ~ 1 + days + (1 | subj)", sleep, family=mm.Gamma(link="log")),
    }


@pytest.fixture(scope="module")
def glmm_fits():
    return _glmm_fits()


def _eta_quadrature(fit):
    """η = Xβ + b with b ~ N(0, v), v the sum of the scalar terms' variances: per row,
    nodes of η and their weights (Gauss-Hermite, 80 points)."""
    v = float(sum(sd[0] ** 2 for sd in fit.reterm_sds))
    xb = np.asarray(fit.X) @ fit.coef
    nodes, wts = np.polynomial.hermite_e.hermegauss(80)
    return xb[:, None] + math.sqrt(v) * nodes[None, :], wts / wts.sum(), xb, v


def _glmm_moments(fit):
    """E[y] and Var[y] of each row from algebra: Var y = E[φV(μ)/w] + Var μ."""
    eta, wts, xb, v = _eta_quadrature(fit)
    name = fit.family.name
    if name == "Gamma":
        m = np.exp(xb + v / 2)
        second = np.exp(2 * xb + 2 * v)           # E[μ²]
        return m, fit.dispersion * second + second - m ** 2
    if name == "Poisson":
        m = np.exp(xb + v / 2)
        return m, m + m ** 2 * np.expm1(v)
    # Binomial, logit link
    mu = 1.0 / (1.0 + np.exp(-eta))
    m, m2 = mu @ wts, (mu ** 2) @ wts
    trials = np.asarray(fit.model.prior_w)
    return m, (m - m2) / trials + m2 - m ** 2


@pytest.mark.parametrize("name", ["poisson", "binomial", "gamma"])
def test_simulated_glmm_responses_have_the_model_moments(glmm_fits, name):
    """Each row's sample mean within 5 s.e. of E[y] (s.e. √(Var y / N) from algebra).

    The spread: Binomial and Gamma, each row's sample variance within 5 s.e. of Var[y]
    (s.e. √((m₄ - s⁴)/N), the Monte Carlo s.e. of a variance, fine for their light
    tails). Poisson's log-normal mixing (v = 1.6 here) has tails too heavy for a
    sample variance, so the bounded P(y = 0) = E[exp(-μ)] and P(y = 1) = E[μ exp(-μ)]
    are checked instead, within 5 binomial s.e. At most 403 rows × 3 comparisons:
    1,209 × P(|z| > 5) = 7e-4.
    """
    fit = glmm_fits[name]
    n_draws = 4000
    y = simulate(fit, n=n_draws, seed=7)
    mean, var = _glmm_moments(fit)
    assert np.max(np.abs(y.mean(axis=0) - mean) / np.sqrt(var / n_draws)) < 5.0
    if name == "poisson":
        assert np.all(y == np.round(y)) and np.all(y >= 0)
        eta, wts, _, _ = _eta_quadrature(fit)
        mu = np.exp(eta)
        for k, prob in [(0, np.exp(-mu) @ wts), (1, (mu * np.exp(-mu)) @ wts)]:
            freq = np.mean(y == k, axis=0)
            se = np.sqrt(prob * (1 - prob) / n_draws)
            assert np.max(np.abs(freq - prob) / se) < 5.0, k
        return
    dev = y - y.mean(axis=0)
    s2 = np.mean(dev ** 2, axis=0)
    se_var = np.sqrt((np.mean(dev ** 4, axis=0) - s2 ** 2) / n_draws)
    assert np.max(np.abs(s2 - var) / se_var) < 5.0
    if name == "binomial":
        # whole numbers of successes out of the trials
        k = y * np.asarray(fit.model.prior_w)
        assert np.allclose(k, np.round(k))


def test_simulated_bernoulli_responses_are_binary():
    fit = mm.fit("use ~ 1 + age + urban + (1 | dist)", mm.dataset("contra"),
                 family=mm.Bernoulli())
    y = simulate(fit, n=50, seed=3)
    assert set(np.unique(y)) <= {0.0, 1.0}


# -- simulate: seeds -----------------------------------------------------------------

def test_simulate_is_reproducible(sleep_fit):
    a = simulate(sleep_fit, n=5, seed=11)
    assert np.array_equal(a, simulate(sleep_fit, n=5, seed=11))
    assert not np.allclose(a, simulate(sleep_fit, n=5, seed=12))
    # replicate i does not depend on how many are drawn: a prefix is the same
    assert np.array_equal(a[:2], simulate(sleep_fit, n=2, seed=11))
    # a Generator: the same state gives the same draws, and it advances
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    first = simulate(sleep_fit, n=3, seed=g1)
    assert np.array_equal(first, simulate(sleep_fit, n=3, seed=g2))
    assert not np.allclose(first, simulate(sleep_fit, n=3, seed=g1))
    # the fit's method delegates
    assert np.array_equal(sleep_fit.simulate(5, seed=11), a)


def test_simulate_rejects_bad_arguments(sleep_fit):
    with pytest.raises(ValueError):
        simulate(sleep_fit, n=-1)
    with pytest.raises(TypeError):
        simulate(sleep_fit, n=1, seed="abc")
    assert simulate(sleep_fit, n=0, seed=1).shape == (0, sleep_fit.nobs)


# -- bootstrap: the machinery --------------------------------------------------------

def test_bootstrap_is_the_same_for_any_n_jobs_and_from_a_pickle(sleep_fit):
    """One SeedSequence child per replicate: the table does not depend on n_jobs, and a
    fit that went through pickle (as it does to the workers) gives the same numbers."""
    serial = bootstrap(sleep_fit, 40, seed=99)
    loaded = pickle.loads(pickle.dumps(sleep_fit))
    parallel = bootstrap(loaded, 40, seed=99, n_jobs=2)
    assert np.array_equal(serial.values, parallel.values, equal_nan=True)
    assert serial.columns == parallel.columns
    again = bootstrap(sleep_fit, 40, seed=100)
    assert not np.allclose(serial.values[:, 0], again.values[:, 0])


def test_bootstrap_refits_the_simulated_responses(sleep_fit):
    """Replicate i is the fit of simulate(fit, n, seed)[i] (from the default start)."""
    result = bootstrap(sleep_fit, 3, seed=5)
    frame = result.to_frame()
    y = simulate(sleep_fit, n=3, seed=5)
    for i in range(3):
        refit = sleep_fit.model.with_response(y[i]).fit(check_convergence=False)
        assert frame.loc[i, "objective"] == pytest.approx(refit.objective, rel=1e-12)
        assert frame.loc[i, "days"] == pytest.approx(refit.coef[1], rel=1e-12)
        assert frame.loc[i, "sigma"] == pytest.approx(refit.sigma, rel=1e-12)
        sd = refit.reterm_sds[0]
        assert frame.loc[i, "sd_(Intercept)|subj"] == pytest.approx(sd[0], rel=1e-12)
        assert frame.loc[i, "sd_days|subj"] == pytest.approx(sd[1], rel=1e-12)


def test_bootstrap_progress_bar(sleep_fit, capsys):
    result = bootstrap(sleep_fit, 3, seed=1, progress=True)
    assert result.n == 3
    assert "3/3" in capsys.readouterr().err


def test_bootstrap_table_names(sleep_fit, sleep_ref):
    result = bootstrap(sleep_fit, 4, seed=1)
    frame = result.to_frame()
    assert list(frame.columns) == ["objective", "(Intercept)", "days", "theta1", "theta2",
                                   "theta3", "sd_(Intercept)|subj", "cor_days.(Intercept)|subj",
                                   "sd_days|subj", "sigma"]
    assert frame.index.name == "replicate" and len(frame) == 4
    ci = result.confint()
    # lme4's confint names and order
    assert list(ci.index) == sleep_ref["profile_ci"]["names"]
    assert list(ci.columns) == ["lower", "upper"]
    # the estimates row is the fit's own numbers
    assert result.estimate["sigma"] == pytest.approx(sleep_fit.sigma, rel=1e-14)
    assert result.estimate["sd_days|subj"] == pytest.approx(sleep_fit.reterm_sds[0][1], rel=1e-14)


def test_bootstrap_of_a_glmm_has_no_sigma(glmm_fits):
    fit = glmm_fits["binomial"]
    result = bootstrap(fit, 8, seed=2)
    assert "sigma" not in result.columns
    assert list(result.confint().index) == ["sd_(Intercept)|herd"] + fit.coef_names
    assert np.isfinite(result.values).all()


def test_failed_and_warning_refits_are_counted(sleep_fit, monkeypatch):
    """A refit that raises leaves a NaN row; one that warns is kept. Each kind is
    summarised in one warning."""
    real = boot_module._Worker.refit
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] in (2, 5):
            raise np.linalg.LinAlgError("not positive definite")
        if calls["n"] == 3:
            warnings.warn("the optimizer stopped early", UserWarning)
        return real(self)

    monkeypatch.setattr(boot_module._Worker, "refit", flaky)
    with pytest.warns(BootstrapWarning) as record:
        result = bootstrap(sleep_fit, 6, seed=3)
    messages = [str(w.message) for w in record]
    assert any("2 of 6 bootstrap refits failed" in m for m in messages)
    assert any("1 of 6 bootstrap refits raised warnings" in m for m in messages)
    assert result.n_failed == 2 and sorted(result.failures) == [1, 4]
    assert result.n_warned == 1 and list(result.warned) == [2]
    frame = result.to_frame()
    assert frame.loc[[1, 4]].isna().all().all()
    assert frame.drop(index=[1, 4]).drop(columns="cor_days.(Intercept)|subj").notna().all().all()
    # the intervals use the replicates that succeeded
    assert np.isfinite(result.confint().to_numpy()).all()


def test_every_refit_failing_raises(sleep_fit, monkeypatch):
    def broken(self):
        raise ValueError("no")

    monkeypatch.setattr(boot_module._Worker, "refit", broken)
    with pytest.raises(RuntimeError, match="every one of the 3"):
        bootstrap(sleep_fit, 3, seed=1)


def test_shortest_and_percentile_intervals_on_known_values():
    """m = 100 values 0..99: the percentile interval at 90% is numpy's 5% and 95%
    quantiles (4.95, 94.05); the shortest interval holds ⌈0.9·100⌉ = 90 values and every
    window of 90 has width 89 (the first is taken). On a right-skewed sample (exponential
    quantiles) the shortest interval starts at the smallest value."""
    vals = np.arange(100.0)
    skew = -np.log1p(-(np.arange(100) + 0.5) / 100)
    result = BootstrapResult(values=np.column_stack([vals, skew]), columns=["a", "b"],
                             estimate=[0.0, 0.0], variance_names=["a"], coef_names=["b"],
                             failures={}, warned={}, seed=0)
    pct = result.confint(level=0.9)
    assert pct.loc["a"].tolist() == pytest.approx([4.95, 94.05])
    short = result.confint(level=0.9, method="shortest")
    assert short.loc["a"].tolist() == [0.0, 89.0]
    assert short.loc["b", "lower"] == skew[0] and short.loc["b", "upper"] == skew[89]
    with pytest.raises(ValueError):
        result.confint(method="bca")
    with pytest.raises(ValueError):
        result.confint(level=95)


# -- bootstrap: 1,000 sleepstudy replicates against lme4 ------------------------------

# lme4 1.1-31's bootMer of sleepstudy_ml (10,000 replicates, seed 20240601; R 4.2.2, data
# from src/mixedmodels/datasets/data/sleepstudy.csv.gz), made by
# tests/reference/lme4_bootstrap.R (`Rscript tests/reference/lme4_bootstrap.R` from the
# repository root writes tests/reference/lme4_bootstrap.json): per column, the 2.5% and
# 97.5% quantiles (R's type 7, numpy's default), their Monte Carlo s.e.
# √(p(1-p)/N)·(Q(p+.01) - Q(p-.01))/.02, and the replicates' mean and s.d.
LME4_BOOT = json.loads((LOCAL_REFERENCE / "lme4_bootstrap.json").read_text())["columns"]


@pytest.fixture(scope="module")
def sleep_boot(sleep_fit):
    return bootstrap(sleep_fit, 1000, seed=20240601)


def _quantile_se(sd, n, p=0.025):
    """Monte Carlo s.e. of a p-quantile of n normal draws of s.d. sd:
    √(p(1-p)/n) / φ(z_p), times sd."""
    return sd * math.sqrt(p * (1 - p) / n) / norm.pdf(norm.ppf(p))


def test_bootstrap_fixed_effect_intervals_match_lme4_profile(sleep_boot, sleep_ref):
    """Percentile intervals of β from 1,000 replicates against lme4's profile intervals.

    Given θ, β̂ is normal with the Wald standard error, so the replicates' 2.5% and
    97.5% quantiles estimate β̂ ∓ 1.96·SE, with a Monte Carlo s.e. of
    √(.025·.975/1000)/φ(1.96)·SE = 0.085·SE (SE: lme4's, from the reference). The
    profile interval differs from those Wald points by its own gap (also from the
    reference), so the allowance is 3 Monte Carlo s.e. plus that gap (4 endpoints:
    false alarm < 4 × 0.0027 for the Monte Carlo part; the gap only widens it).

    The variance parameters are not held to their profile intervals: the percentile
    bootstrap of ML estimates carries their downward bias: lme4's own bootstrap
    (LME4_BOOT) gives [10.6, 33.2] for sd_(Intercept) where the profile gives
    [14.4, 37.7], [3.0, 7.8] for sd_days against [3.8, 8.8], and 1 for the correlation's
    upper end against 0.68: the standard deviations' endpoints differ by 7 to 9 times
    the Monte Carlo s.e. of 1,000 replicates, the correlation's by far more. They are
    checked against lme4's bootstrap instead (next test).
    """
    ci = sleep_boot.confint(level=0.95)
    prof = dict(zip(sleep_ref["profile_ci"]["names"],
                    zip(sleep_ref["profile_ci"]["lower"], sleep_ref["profile_ci"]["upper"])))
    wald = dict(zip(sleep_ref["wald_ci"]["names"],
                    zip(sleep_ref["wald_ci"]["lower"], sleep_ref["wald_ci"]["upper"])))
    se = dict(zip(sleep_ref["lme4"]["coef_names"], sleep_ref["lme4"]["stderror"]))
    for name in ["(Intercept)", "days"]:
        mc = _quantile_se(se[name], sleep_boot.n)
        for j, end in enumerate(["lower", "upper"]):
            gap = abs(prof[name][j] - wald[name][j])
            assert abs(ci.loc[name, end] - prof[name][j]) < 3 * mc + gap, (name, end)


def test_bootstrap_intervals_match_lme4_bootstrap(sleep_boot):
    """Every percentile endpoint against lme4's bootstrap of the same model.

    Both estimate the same quantile of the same distribution; the difference has s.e.
    √(se_1000² + se_lme4²) with se_1000 = se_lme4·√(10000/1000) (the Monte Carlo s.e.
    scales as 1/√N). 4 s.e. over 11 endpoints: false alarm < 11 × 6.3e-5 = 7e-4. The
    correlation's upper endpoint is exactly 1 in lme4's (more than 2.5% of the
    replicates are singular fits with a correlation of 1), and must be here.
    """
    ci = sleep_boot.confint(level=0.95)
    for name, ref in LME4_BOOT.items():
        for end in ["lower", "upper"]:
            if abs(ref[end]) == 1.0:
                assert ci.loc[name, end] == pytest.approx(ref[end], abs=1e-12), (name, end)
                continue
            se_ref = ref["se_" + end]
            se = se_ref * math.sqrt(1.0 + ref["n"] / sleep_boot.n)
            assert abs(ci.loc[name, end] - ref[end]) < 4 * se, (name, end)


def test_bootstrap_means_are_close_to_the_fit(sleep_boot, sleep_fit, sleep_ref):
    """β̂ of an LMM is unbiased (θ̂ is even in the noise, β̂ - β odd), so the replicates'
    mean β is β̂ within 4 s.e. of a mean of 1,000 (s.e. SE/√1000, SE lme4's). The
    variance parameters are biased under ML; their means are compared with lme4's
    bootstrap means, within 4 s.e. of the difference of two Monte Carlo means."""
    frame = sleep_boot.to_frame()
    n = sleep_boot.n
    for name, se in zip(sleep_ref["lme4"]["coef_names"], sleep_ref["lme4"]["stderror"]):
        assert abs(frame[name].mean() - sleep_fit.fixef[name]) < 4 * se / math.sqrt(n)
    for name, ref in LME4_BOOT.items():
        col = frame[name].dropna()
        se = ref["sd"] * math.sqrt(1.0 / len(col) + 1.0 / ref["n"])
        assert abs(col.mean() - ref["mean"]) < 4 * se, name
    assert sleep_boot.n_failed == 0

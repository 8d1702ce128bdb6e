"""Families with a dispersion φ, fitted by Laplace maximum likelihood with φ estimated,
and Hessian-based standard errors: against glmmTMB, lme4, and numerical integration."""
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, optimize

import mixedmodels as mm

from conftest import LOCAL_REFERENCE, OBJECTIVE_ABS

# The agreement bars: β, σ and the random-effect sds to 1e-3 relative, the
# Hessian-based standard errors to 1e-2.
ESTIMATE_REL = 1e-3
HESSIAN_SE_REL = 1e-2


def _tmb_entries():
    return {e["name"]: e for e in json.loads((LOCAL_REFERENCE / "glmmtmb_public.json").read_text())}


def _extra():
    return json.loads((LOCAL_REFERENCE / "extra_public.json").read_text())


EXTRA = {f["name"]: f for f in _extra()["fits"]}


def _family(name):
    return {"gamma": mm.Gamma(link=mm.LogLink()),
            "gaussian_log": mm.Normal(link=mm.LogLink())}[name]


def _check_against_tmb(fit, ref):
    assert fit.objective <= ref["objective"] + OBJECTIVE_ABS
    np.testing.assert_allclose(fit.coef, ref["coef"], rtol=ESTIMATE_REL)
    np.testing.assert_allclose(fit.sigma, ref["sigma"], rtol=ESTIMATE_REL)
    sds = np.concatenate(fit.reterm_sds)
    ref_sds = np.concatenate([np.atleast_1d(v) for v in ref["re_sd"].values()])
    np.testing.assert_allclose(sds, ref_sds, rtol=ESTIMATE_REL)
    np.testing.assert_allclose(fit.stderror_hessian, ref["stderror"], rtol=HESSIAN_SE_REL)


@pytest.mark.parametrize("name", ["sleepstudy_gamma_log", "sleepstudy_gamma_log_intercept",
                                  "sleepstudy_gaussian_log"])
def test_sleepstudy_dispersion_families_match_glmmtmb(name):
    entry = _tmb_entries()[name]
    fit = mm.fit(entry["formula"], mm.dataset(entry["data"]), family=_family(entry["family"]))
    _check_against_tmb(fit, entry["glmmTMB"])
    # φ is reported, and σ² = φ (glmmTMB's Gamma sigma is the coefficient of variation)
    assert fit.dispersion == pytest.approx(fit.sigma ** 2, rel=1e-12)
    # the correlation of the vector term too
    if entry["glmmTMB"]["re_cor"]["subj"]:
        cor = fit.varcorr.to_frame() if hasattr(fit.varcorr, "to_frame") else None
        lam = fit.lambda_[0]
        cov = lam @ lam.T
        r = cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1])
        assert r == pytest.approx(entry["glmmTMB"]["re_cor"]["subj"], rel=1e-2)
        assert cor is None or len(cor)


def test_simulated_gamma_recovers_glmmtmb():
    """The issue's third case: 40 groups of 25, true sd 0.3 (data simulated in R)."""
    data = pd.read_csv(LOCAL_REFERENCE / "data" / "gamma_sim.csv.gz")
    ref = EXTRA["gamma_sim"]["glmmTMB"]
    fit = mm.fit("y ~ 1 + x + (1 | g)", data, family=mm.Gamma(link="log"))
    _check_against_tmb(fit, ref)
    # the standard error the old objective shrank by √φ is now the likelihood's
    assert fit.stderror_hessian[0] > 0.05


def test_loglik_is_the_full_family_density():
    entry = _tmb_entries()["sleepstudy_gamma_log_intercept"]
    fit = mm.fit(entry["formula"], mm.dataset("sleepstudy"), family=mm.Gamma(link="log"))
    assert fit.loglik == pytest.approx(-0.5 * fit.objective, rel=1e-14)
    assert fit.dof == 4          # two coefficients, one θ, φ
    assert fit.aic == pytest.approx(fit.objective + 8, rel=1e-14)


def _ig_logpdf(y, mu, phi):
    # the inverse Gaussian density with mean μ and shape λ = 1/φ, written out
    lam = 1.0 / phi
    return 0.5 * np.log(lam / (2 * np.pi * y ** 3)) - lam * (y - mu) ** 2 / (2 * mu ** 2 * y)


def _ig_data():
    rng = np.random.default_rng(20261202)
    ngroup, per = 12, 10
    g = np.repeat([f"g{i:02d}" for i in range(ngroup)], per)
    x = rng.normal(size=ngroup * per)
    b = rng.normal(scale=0.4, size=ngroup)
    mu = np.exp(0.5 + 0.3 * x + np.repeat(b, per))
    phi = 0.2
    # an inverse Gaussian draw with mean μ and shape 1/φ (NumPy's Wald)
    y = rng.wald(mu, 1.0 / phi)
    return pd.DataFrame({"g": g, "x": x, "y": y})


def _ig_minus2loglik(params, data):
    """-2 log L by adaptive numerical integration over each group's random effect."""
    b0, b1, sd, phi = params
    total = 0.0
    for _, grp in data.groupby("g"):
        y, x = grp["y"].to_numpy(), grp["x"].to_numpy()

        def integrand(b):
            return math.exp(np.sum(_ig_logpdf(y, np.exp(b0 + b1 * x + b), phi)) - shift
                            - 0.5 * (b / sd) ** 2) / (sd * math.sqrt(2 * math.pi))

        grid = np.linspace(-6 * sd, 6 * sd, 241)
        vals = [np.sum(_ig_logpdf(y, np.exp(b0 + b1 * x + v), phi)) - 0.5 * (v / sd) ** 2
                for v in grid]
        shift = max(vals) + 0.5 * (grid[int(np.argmax(vals))] / sd) ** 2
        mode = grid[int(np.argmax(vals))]
        val, _ = integrate.quad(integrand, -8 * sd, 8 * sd, points=[mode], limit=200,
                                epsabs=0.0, epsrel=1e-11)
        total += -2.0 * (math.log(val) + shift)
    return total


def test_inverse_gaussian_agrees_with_numerical_integration():
    """glmmTMB has no inverse Gaussian family: hold the quadrature fit to scipy."""
    data = _ig_data()
    fit = mm.fit("y ~ 1 + x + (1 | g)", data, family=mm.InverseGaussian(link="log"), nAGQ=25)
    params = [fit.coef[0], fit.coef[1], fit.reterm_sds[0][0], fit.dispersion]
    # the same likelihood at the same parameters
    assert fit.objective == pytest.approx(_ig_minus2loglik(params, data), rel=1e-7)
    # and the same optimum: the integrated likelihood is stationary there (central
    # differences on β, log sd, log φ) and rises in every coordinate direction
    x0 = np.array([params[0], params[1], math.log(params[2]), math.log(params[3])])

    def f(v):
        return _ig_minus2loglik([v[0], v[1], math.exp(v[2]), math.exp(v[3])], data)

    f0, h = f(x0), 1e-3
    for i in range(4):
        up, down = f(x0 + h * np.eye(4)[i]), f(x0 - h * np.eye(4)[i])
        assert min(up, down) >= f0 - 1e-8
        # the curvatures here are 23 to 1042, so a gradient below 1e-3 puts the
        # integrated likelihood's optimum within 5e-5 of ours in each coordinate
        assert abs(up - down) / (2 * h) < 1e-3


def test_inverse_gaussian_laplace_is_the_exact_hessian_approximation():
    """nAGQ = 1 is the Laplace approximation with the observed information, which for
    one scalar term is the one-node case of the quadrature rule."""
    data = _ig_data()
    fit = mm.fit("y ~ 1 + x + (1 | g)", data, family=mm.InverseGaussian(link="log"))
    model = mm.GeneralizedLinearMixedModel("y ~ 1 + x + (1 | g)", data,
                                           mm.InverseGaussian(link="log"), nAGQ=1)
    # Laplace by hand, per group, from the mode of the integrand found by scipy
    b0, b1 = fit.coef
    sd, phi = fit.reterm_sds[0][0], fit.dispersion
    total = 0.0
    for _, grp in data.groupby("g"):
        y, x = grp["y"].to_numpy(), grp["x"].to_numpy()

        def h(b):
            return -(np.sum(_ig_logpdf(y, np.exp(b0 + b1 * x + b), phi)) - 0.5 * (b / sd) ** 2)

        mode = optimize.minimize_scalar(h, bracket=(-1, 1), tol=1e-12).x
        eps = 1e-4
        curv = (h(mode + eps) - 2 * h(mode) + h(mode - eps)) / eps ** 2
        total += 2 * h(mode) + math.log(curv * sd ** 2)
    assert fit.objective == pytest.approx(total, rel=1e-7)
    assert model.objective(fit.theta, fit.coef, phi=phi) == pytest.approx(total, rel=1e-7)


def test_hessian_standard_errors_on_a_bernoulli_model_with_correlated_slopes():
    """The issue's item 3: the two kinds differ; the Hessian kind is glmmTMB's."""
    entry = EXTRA["contra_slopes_bernoulli"]
    fit = mm.fit("use ~ 1 + age + abs2(age) + urban + livch + (1 + urban | dist)",
                 mm.dataset("contra"), family=mm.Bernoulli(),
                 contrasts={"livch": mm.DummyCoding()})
    assert fit.objective <= entry["lme4"]["objective"] + OBJECTIVE_ABS
    np.testing.assert_allclose(fit.coef, entry["glmmTMB"]["coef"], rtol=ESTIMATE_REL)
    np.testing.assert_allclose(fit.stderror_hessian, entry["glmmTMB"]["stderror"],
                               rtol=HESSIAN_SE_REL)
    # the default stays the conditional kind, lme4's vcov(use.hessian = FALSE)
    np.testing.assert_allclose(fit.stderror, entry["lme4"]["stderror_conditional"], rtol=1e-3)
    table = fit.coeftable(se="hessian")
    np.testing.assert_allclose(table["Std. Error"], fit.stderror_hessian, rtol=1e-14)
    assert "conditional on θ" in str(fit)
    with pytest.raises(ValueError, match="conditional.*hessian"):
        fit.coeftable(se="sandwich")


def test_hessian_standard_errors_of_a_fast_fit_are_computed_on_demand():
    entry = EXTRA["binomial_88k"]
    data = pd.read_csv(LOCAL_REFERENCE / "data" / "binomial_88k.csv.gz")
    data["p"] = data["successes"] / data["trials"]
    fit = mm.fit("p ~ 1 + x + (1 | g)", data, family=mm.Binomial(), weights="trials",
                 fast=True)
    np.testing.assert_allclose(fit.stderror_hessian, entry["glmmTMB"]["stderror"],
                               rtol=HESSIAN_SE_REL)


def test_binomial_with_88000_trials_per_row_fits_without_spurious_warnings():
    entry = EXTRA["binomial_88k"]["lme4"]
    data = pd.read_csv(LOCAL_REFERENCE / "data" / "binomial_88k.csv.gz")
    data["p"] = data["successes"] / data["trials"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = mm.fit("p ~ 1 + x + (1 | g)", data, family=mm.Binomial(), weights="trials")
    assert fit.objective <= entry["objective"] + OBJECTIVE_ABS
    np.testing.assert_allclose(fit.coef, entry["coef"], rtol=ESTIMATE_REL)
    np.testing.assert_allclose(fit.theta, entry["theta"], rtol=ESTIMATE_REL)
    assert fit.optsum.derivs is not None and fit.optsum.derivs.converged

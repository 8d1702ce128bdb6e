"""Families and links: the compiled kernels against their NumPy twins, and the algebra.

Tier: kernels vs NumPy twins at 1e-10 (relative); the log densities against
scipy.stats, and the derivative of each inverse link against a central difference.
"""
import itertools
import warnings
import zlib

import numpy as np
import pytest
from scipy import stats

from mixedmodels import families as F
from mixedmodels._kernels import _glm
from mixedmodels._kernels import _glm_numpy as twin

KERNEL_RTOL = 1e-10
# The absolute floor is for deviance residuals near y = mu, where (y - mu)^2-sized
# values amplify the last-bit differences between the C library's erfc and SciPy's ndtr
# (probit links) far beyond 1e-10 relative while staying below 1e-14 absolute.
KERNEL_ATOL = 1e-12

FAMILIES = [F.Bernoulli, F.Binomial, F.Poisson, F.Gamma, F.InverseGaussian, F.Normal]
LINKS = [F.LogitLink, F.ProbitLink, F.CloglogLink, F.LogLink, F.IdentityLink,
         F.InverseLink, F.SqrtLink, F.InverseSquareLink]
BINARY = (F.Bernoulli, F.Binomial)
POSITIVE = (F.Poisson, F.Gamma, F.InverseGaussian)


def _response(fam, rng, n):
    """A valid response with its boundary values, and prior weights."""
    w = rng.uniform(0.5, 3.0, n)
    w[3] = 0.0
    if fam is F.Bernoulli:
        y = (rng.uniform(size=n) < 0.5).astype(float)
        y[:2] = [0.0, 1.0]
    elif fam is F.Binomial:
        w = rng.integers(1, 20, n).astype(float)
        w[3] = 0.0
        y = rng.integers(0, 21, n) % (w + 1) / np.maximum(w, 1.0)
        y[:2] = [0.0, 1.0]
    elif fam is F.Poisson:
        y = rng.poisson(3.0, n).astype(float)
        y[:2] = [0.0, 1000.0]
    elif fam in (F.Gamma, F.InverseGaussian):
        y = rng.gamma(2.0, 1.5, n)
        y[:2] = [1e-8, 1e4]
    else:
        y = rng.normal(0.0, 3.0, n)
        y[:2] = [-1e4, 1e4]
    return y, w


def _eta(link, fam, rng, n):
    """Linear predictors inside the link's domain, with values of large magnitude."""
    if link in (F.LogitLink, F.ProbitLink, F.CloglogLink):
        core, extra = rng.normal(0.0, 3.0, n), [-30, 30, -40, 40, 0.0, -800, 800]
    elif link is F.LogLink:
        core, extra = rng.normal(0.0, 2.0, n), [-30, 30, -40, -800, 0.0]
    elif link is F.IdentityLink:
        if fam in BINARY:
            core, extra = rng.uniform(0.0, 1.0, n), [-0.2, 1.2, 0.0, 1.0]
        elif fam in POSITIVE:
            core, extra = rng.uniform(0.01, 8.0, n), [-1.0, 0.0, 30.0]
        else:
            core, extra = rng.normal(0.0, 5.0, n), [-30, 30]
    elif link is F.InverseLink:
        if fam in BINARY:
            core, extra = rng.uniform(1.0, 10.0, n), [0.5, 30.0]
        else:
            core, extra = rng.uniform(0.05, 5.0, n), [1e-8, 30.0, -1.0]
    elif link is F.SqrtLink:
        if fam in BINARY:
            core, extra = rng.uniform(0.0, 1.0, n), [0.0, 1.5]
        else:
            core, extra = rng.uniform(0.0, 3.0, n), [0.0, 30.0, -2.0]
    else:  # inverse square
        if fam in BINARY:
            core, extra = rng.uniform(1.0, 10.0, n), [0.5, 30.0]
        else:
            core, extra = rng.uniform(0.05, 5.0, n), [1e-8, 30.0]
    core[-len(extra):] = extra
    return core


def _outputs(n, k=5):
    return [np.full(n, np.nan) for _ in range(k)]


@pytest.mark.parametrize("fam,link", list(itertools.product(FAMILIES, LINKS)),
                         ids=lambda c: c.__name__)
def test_update_matches_twin(fam, link):
    rng = np.random.default_rng(zlib.crc32(f"{fam.__name__}-{link.__name__}".encode()))
    n = 400
    y, w = _response(fam, rng, n)
    eta = _eta(link, fam, rng, n)
    family = fam(link=link())
    got = _outputs(n)
    ref = _outputs(n)
    dev_c = family.update(eta, y, w, *got)
    dev_n = twin.update(family.code, family.link.code, eta, y, w, *ref)
    for name, a, b in zip(["mu", "mu_eta", "wrkwt", "wrkresid", "devresid"], got, ref):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, rtol=KERNEL_RTOL, atol=KERNEL_ATOL, err_msg=name)
    np.testing.assert_allclose(dev_c, dev_n, rtol=KERNEL_RTOL)
    np.testing.assert_allclose(dev_c, got[4].sum(), rtol=1e-14)
    # unit weights through an empty prior_w (Family.update: prior_w=None)
    got1, ref1 = _outputs(n), _outputs(n)
    family.update(eta, y, None, *got1)
    twin.update(family.code, family.link.code, eta, y, np.empty(0), *ref1)
    for a, b in zip(got1, ref1):
        np.testing.assert_allclose(a, b, rtol=KERNEL_RTOL, atol=KERNEL_ATOL)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda c: c.__name__)
def test_loglik_matches_twin(fam):
    rng = np.random.default_rng(7)
    n = 300
    y, w = _response(fam, rng, n)
    family = fam()
    mu = np.empty(n)
    family.update(_eta(family.link.__class__, fam, rng, n), y, w, mu, *_outputs(n, 4))
    for phi in (0.3, 1.0, 2.5):
        got = family.loglik(y, mu, w, phi)
        ref = np.empty(n)
        tot = twin.loglik(family.code, y, mu, w, phi, ref)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, ref, rtol=KERNEL_RTOL, atol=KERNEL_ATOL)
        np.testing.assert_allclose(got.sum(), tot, rtol=KERNEL_RTOL)
        assert got[3] == 0.0  # zero prior weight


def test_codes_agree_with_twin():
    for name in dir(twin):
        if name.startswith(("FAMILY_", "LINK_")) or name == "MU_EPS":
            assert getattr(_glm, name) == getattr(twin, name), name
    assert sorted(c.code for c in FAMILIES) == list(range(len(FAMILIES)))
    assert sorted(c.code for c in LINKS) == list(range(len(LINKS)))


# ------------------------------------------------------------------------ the algebra


def _update(family, eta, y, w):
    out = _outputs(len(y))
    family.update(eta, y, w, *out)
    return out


def test_bernoulli_devresid_is_minus_twice_loglik():
    rng = np.random.default_rng(1)
    n = 200
    y, w = _response(F.Bernoulli, rng, n)
    for link in (F.LogitLink, F.ProbitLink, F.CloglogLink):
        fam = F.Bernoulli(link=link())
        eta = _eta(link, F.Bernoulli, rng, n)
        mu, _, _, _, dev = _update(fam, eta, y, w)
        # both from η: the deviance's logs are taken there (accurate in the tails)
        np.testing.assert_allclose(dev, -2.0 * fam.loglik(y, mu, w, eta=eta), rtol=1e-14)


def test_binomial_loglik_against_scipy():
    rng = np.random.default_rng(2)
    n = 200
    y, w = _response(F.Binomial, rng, n)
    mu = rng.uniform(0.01, 0.99, n)
    k = np.round(w * y)
    ref = stats.binom.logpmf(k, w, mu)
    np.testing.assert_allclose(F.Binomial().loglik(y, mu, w), ref, rtol=1e-10, atol=1e-12)


def test_poisson_loglik_against_scipy():
    rng = np.random.default_rng(3)
    n = 200
    y, w = _response(F.Poisson, rng, n)
    mu = rng.uniform(0.1, 20.0, n)
    ref = stats.poisson.logpmf(y, mu)
    np.testing.assert_allclose(F.Poisson().loglik(y, mu), ref, rtol=1e-10)
    np.testing.assert_allclose(F.Poisson().loglik(y, mu, w), w * ref, rtol=1e-10)


@pytest.mark.parametrize("phi", [0.2, 1.0, 3.0])
def test_continuous_loglik_against_scipy(phi):
    rng = np.random.default_rng(4)
    n = 200
    w = rng.uniform(0.5, 3.0, n)
    y = rng.gamma(2.0, 1.5, n)
    mu = rng.uniform(0.5, 6.0, n)
    np.testing.assert_allclose(
        F.Gamma().loglik(y, mu, w, phi),
        w * stats.gamma.logpdf(y, a=1.0 / phi, scale=mu * phi), rtol=1e-10)
    np.testing.assert_allclose(
        F.InverseGaussian().loglik(y, mu, w, phi),
        w * stats.invgauss.logpdf(y, mu * phi, scale=1.0 / phi), rtol=1e-10)
    yn = rng.normal(0.0, 2.0, n)
    np.testing.assert_allclose(
        F.Normal().loglik(yn, mu, w, phi),
        stats.norm.logpdf(yn, mu, np.sqrt(phi / w)), rtol=1e-10)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda c: c.__name__)
def test_deviance_is_scaled_loglik_difference_from_saturated(fam):
    """devresid / phi == -2 (loglik(y, mu) - loglik(y, y)) for every family."""
    rng = np.random.default_rng(5)
    n = 200
    y, w = _response(fam, rng, n)
    family = fam()
    eta = _eta(family.link.__class__, fam, rng, n)[:-8]
    y, w = y[8:], w[8:]   # interior values only: the saturated model needs mu = y
    mu, _, _, _, dev = _update(family, eta, y, w)
    phi = 1.0 if not family.has_dispersion else 1.7
    sat = family.loglik(y, y, w, phi)
    np.testing.assert_allclose(dev / phi, -2.0 * (family.loglik(y, mu, w, phi) - sat),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fam,link", list(itertools.product(FAMILIES, LINKS)),
                         ids=lambda c: c.__name__)
def test_working_weights_and_residuals(fam, link):
    rng = np.random.default_rng(6)
    n = 100
    y, w = _response(fam, rng, n)
    family = fam(link=link())
    eta = _eta(link, fam, rng, n)[:-10]
    y, w = y[10:], w[10:]
    mu, mu_eta, wrkwt, wrkresid, _ = _update(family, eta, y, w)
    np.testing.assert_allclose(wrkwt, w * mu_eta**2 / family.variance(mu), rtol=1e-13)
    np.testing.assert_allclose(wrkresid * mu_eta, y - mu, rtol=1e-12, atol=1e-12)
    if family.canonical_link:
        # eta = -theta / c for the natural parameter theta, so mu_eta^2 / V(mu) =
        # c |mu_eta|: c = 1/2 for the inverse Gaussian (eta = 1/mu^2 = -2 theta)
        c = 0.5 if fam is F.InverseGaussian else 1.0
        np.testing.assert_allclose(wrkwt, c * w * np.abs(mu_eta), rtol=1e-12)


@pytest.mark.parametrize("link", LINKS, ids=lambda c: c.__name__)
def test_link_inverse_and_derivative(link):
    lk = link()
    rng = np.random.default_rng(8)
    if link in (F.InverseLink, F.InverseSquareLink, F.SqrtLink):
        eta = rng.uniform(0.2, 4.0, 100)
    elif link is F.IdentityLink:
        eta = rng.normal(0.0, 5.0, 100)
    elif link is F.CloglogLink:
        # above eta = 2, 1 - mu < 1e-3 and the round trip loses digits to 1 - mu
        eta = rng.uniform(-3.0, 2.0, 100)
    else:
        eta = rng.uniform(-3.0, 3.0, 100)
    np.testing.assert_allclose(lk.link(lk.inverse(eta)), eta, rtol=1e-10, atol=1e-12)
    h = 1e-6
    fd = (lk.inverse(eta + h) - lk.inverse(eta - h)) / (2 * h)
    np.testing.assert_allclose(lk.mu_eta(eta), fd, rtol=1e-7, atol=1e-10)


def test_logit_tails_keep_precision():
    lk = F.LogitLink()
    eta = np.array([-800.0, -30.0, 0.0, 30.0, 800.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mu = lk.inverse(eta)
        me = lk.mu_eta(eta)
    np.testing.assert_allclose(mu[:2], np.exp(eta[:2]) / (1 + np.exp(eta[:2])), rtol=1e-14)
    np.testing.assert_allclose(me[[1, 3]], np.exp(-30.0) / (1 + np.exp(-30.0)) ** 2,
                               rtol=1e-14)
    assert mu[4] == 1.0 and me[0] == 0.0
    # mu is stored, not 1 - mu, so only the lower tail round-trips exactly
    np.testing.assert_allclose(lk.link(mu[1:3]), eta[1:3], rtol=1e-14, atol=1e-14)


def test_logistic():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = F.logistic(np.array([-800.0, -745.0, -30.0, 0.0, 30.0, 800.0]))
    assert v[0] == 0.0 and 0.0 < v[1] < 1e-300 and v[3] == 0.5 and v[5] == 1.0
    np.testing.assert_allclose(v[2], 1.0 / (1.0 + np.exp(30.0)), rtol=1e-14)
    assert isinstance(F.logistic(0.0), float)


def test_clamps_keep_everything_finite():
    eta = np.array([-800.0, -40.0, 40.0, 800.0])
    y = np.array([1.0, 1.0, 0.0, 0.0])
    mu, mu_eta, wrkwt, wrkresid, dev = _update(F.Bernoulli(), eta, y, np.ones(4))
    eps = np.finfo(float).eps
    assert mu.min() == eps and mu.max() == 1.0 - eps
    assert np.all(np.abs(mu_eta) >= eps)
    for a in (wrkwt, wrkresid, dev):
        assert np.all(np.isfinite(a))
    # y = 1 at η = -800: the deviance is 2 log(1 + e^800) = 1600 to rounding (from η, not
    # from the clamped μ)
    np.testing.assert_allclose(dev[0], 1600.0)
    mu, *_rest, dev = _update(F.Poisson(), np.array([-800.0]), np.array([3.0]), np.ones(1))
    assert mu[0] == eps and np.isfinite(dev[0])


def test_update_rejects_bad_outputs():
    n = 5
    fam = F.Poisson()
    good = _outputs(n)
    with pytest.raises(ValueError, match="length"):
        fam.update(np.zeros(n), np.ones(n), np.ones(n), *good[:4], np.empty(n + 1))
    with pytest.raises(ValueError):
        fam.update(np.zeros(n), np.ones(n), np.ones(n), *good[:4], np.empty(2 * n)[::2])
    with pytest.raises(ValueError, match="unknown family"):
        _glm.update(17, 0, np.zeros(n), np.ones(n), np.ones(n), *good)
    with pytest.raises(ValueError, match="phi"):
        F.Gamma().loglik(np.ones(n), np.ones(n), None, phi=0.0)


# ------------------------------------------------------------- objects and validation


def test_get_family_and_repr():
    assert repr(F.get_family("bernoulli")) == "Bernoulli(link=logit)"
    assert repr(F.get_family("Binomial")) == "Binomial(link=logit)"
    assert repr(F.get_family("POISSON")) == "Poisson(link=log)"
    assert repr(F.get_family("gamma")) == "Gamma(link=inverse)"
    assert repr(F.get_family("inverse_gaussian")) == "InverseGaussian(link=inverse_square)"
    assert F.get_family("inversegaussian") == F.InverseGaussian()
    assert F.get_family("gaussian") == F.Normal() == F.get_family(F.Normal)
    fam = F.Binomial(link="probit")
    assert F.get_family(fam) is fam and repr(fam) == "Binomial(link=probit)"
    assert F.Poisson(link=F.SqrtLink()).link == F.SqrtLink()
    assert not F.Gamma(link="log").canonical_link and F.Gamma().canonical_link
    assert [f.has_dispersion for f in map(F.get_family, FAMILIES)] == [
        False, False, False, True, True, True]
    for name in ("logit", "probit", "cloglog", "log", "identity", "inverse", "sqrt"):
        assert F.get_link(name).name == name
    with pytest.raises(ValueError, match="unknown family 'tweedie'"):
        F.get_family("tweedie")
    with pytest.raises(ValueError, match="unknown link 'cauchit'"):
        F.Binomial(link="cauchit")
    with pytest.raises(TypeError):
        F.get_family(3)
    with pytest.raises(TypeError):
        F.get_family(F.Family)


def test_starting_mu():
    y = np.array([0.0, 0.5, 1.0])
    w = np.array([2.0, 4.0, 1.0])
    np.testing.assert_allclose(F.Binomial().starting_mu(y, w), (w * y + 0.5) / (w + 1))
    np.testing.assert_allclose(F.Bernoulli().starting_mu([0.0, 1.0]), [0.25, 0.75])
    np.testing.assert_allclose(F.Poisson().starting_mu([0.0, 3.0]), [0.1, 3.1])
    np.testing.assert_allclose(F.Gamma().starting_mu([0.5, 3.0]), [0.5, 3.0])
    np.testing.assert_allclose(F.Normal().starting_mu([-1.0, 3.0]), [-1.0, 3.0])


def test_variance():
    mu = np.array([0.2, 0.5])
    np.testing.assert_allclose(F.Bernoulli().variance(mu), mu * (1 - mu))
    np.testing.assert_allclose(F.Binomial().variance(mu), mu * (1 - mu))
    np.testing.assert_allclose(F.Poisson().variance(mu), mu)
    np.testing.assert_allclose(F.Gamma().variance(mu), mu**2)
    np.testing.assert_allclose(F.InverseGaussian().variance(mu), mu**3)
    np.testing.assert_allclose(F.Normal().variance(mu), 1.0)


def test_validation_messages():
    with pytest.raises(ValueError, match=r"response 'r' must be binary \(0/1 or a "
                       r"two-level factor\) for Bernoulli; found values \[2, 3\]"):
        F.Bernoulli().validate(np.array([0, 1, 2, 3]), None, "r")
    with pytest.raises(ValueError, match=r"response 'p' must be a proportion in \[0, 1\]"):
        F.Binomial().validate(np.array([0.5, 1.5]), np.array([2.0, 2.0]), "p")
    with pytest.warns(RuntimeWarning, match="not a whole number of successes"):
        F.Binomial().validate(np.array([0.5, 0.3]), np.array([2.0, 2.0]), "p")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.Binomial().validate(np.array([0.5, 1 / 3, 1.0]), np.array([2.0, 3.0, 7.0]), "p")
    with pytest.raises(ValueError, match="response 'count' must be non-negative counts "
                       r"for Poisson; found negative values \[-1\]"):
        F.Poisson().validate(np.array([0.0, -1.0, 3.0]), None, "count")
    with pytest.raises(ValueError, match=r"'count' must be integer counts .*\[2\.5\]"):
        F.Poisson().validate(np.array([0.0, 2.5]), None, "count")
    for fam in (F.Gamma, F.InverseGaussian):
        with pytest.raises(ValueError, match=f"response 'z' must be strictly positive "
                           rf"for {fam.__name__}; found values \[0\]"):
            fam().validate(np.array([1.0, 0.0]), None, "z")
    for fam in FAMILIES:
        with pytest.raises(ValueError, match=r"response 'r' contains NaN at rows \[1\]"):
            fam().validate(np.array([1.0, np.nan]), None, "r")
    with pytest.raises(ValueError, match="weights for response 'r' contain NaN"):
        F.Poisson().validate(np.array([1.0, 2.0]), np.array([1.0, np.nan]), "r")
    with pytest.raises(ValueError, match="must be non-negative"):
        F.Normal().validate(np.array([1.0, 2.0]), np.array([1.0, -1.0]), "r")
    F.Normal().validate(np.array([-1.0, 2.0]), None, "r")
    F.Bernoulli().validate(np.array([True, False]), None, "r")

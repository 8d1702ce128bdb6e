"""Bernoulli and Binomial far in the tails of the logit, probit and cloglog links.

Tier: exact values. The deviance residuals and log densities of the compiled kernels
(``update``'s literal fast paths and its runtime-dispatch loop, ``agq_deviance``,
``loglik`` given eta), of their NumPy twins and of the vector AGQ's logit shortcut,
against the same quantities evaluated independently with mpmath at 50 digits, to 1e-12
relative, for |eta| up to 700 on both sides and both outcomes: the rows whose mean is
rounded near 1 (y = 0 with large positive eta, y = 1 with large negative eta) are the
ones a mean-based formula loses.
"""
import math

import numpy as np
import pytest

from mixedmodels import families as F
from mixedmodels._agq_vector import _RowDeviance
from mixedmodels._kernels import _glm
from mixedmodels._kernels import _glm_numpy as twin

import mpmath as mp  # noqa: E402  (a test dependency: a missing install must fail)

RTOL = 1e-12
ETAS = [s * v for v in (5.0, 20.0, 30.0, 35.0, 50.0, 100.0, 700.0) for s in (-1.0, 1.0)]
LINKS = {"logit": F.LogitLink, "probit": F.ProbitLink, "cloglog": F.CloglogLink}
TINY = np.finfo(float).tiny


# ----------------------------------------------------------------- exact references


def _probabilities(link, eta):
    """(mu, 1 - mu) at eta, each in closed form at 50 digits (so each keeps its
    relative precision, however close the other is to 1)."""
    e = mp.mpf(eta)
    if link == "logit":
        return 1 / (1 + mp.exp(-e)), 1 / (1 + mp.exp(e))
    if link == "probit":
        return mp.ncdf(e), mp.ncdf(-e)
    x = mp.exp(e)
    return -mp.expm1(-x), mp.exp(-x)


def _log_prob(p, q):
    """log p, given p and q = 1 - p, without cancellation."""
    return mp.log(p) if p <= 0.5 else mp.log1p(-q)


def exact_logs(link, eta):
    """(log mu, log(1 - mu)) at eta, at 50 digits."""
    with mp.workdps(50):
        p, q = _probabilities(link, eta)
        return _log_prob(p, q), _log_prob(q, p)


def exact_bernoulli(link, eta, y, w=1.0):
    """(deviance residual, log density) of a Bernoulli row with weight w."""
    with mp.workdps(50):
        lmu, l1mu = exact_logs(link, eta)
        ll = mp.mpf(w) * (lmu if y == 1.0 else l1mu)
        return -2 * ll, ll


def exact_binomial(link, eta, y, n):
    """(deviance residual, log density) of a Binomial proportion y of n trials."""
    with mp.workdps(50):
        lmu, l1mu = exact_logs(link, eta)
        y, n = mp.mpf(y), mp.mpf(n)
        k = n * y
        dev = mp.mpf(0)
        if y != 0:
            dev += y * (mp.log(y) - lmu)
        if y != 1:
            dev += (1 - y) * (mp.log(1 - y) - l1mu)
        ll = mp.loggamma(n + 1) - mp.loggamma(k + 1) - mp.loggamma(n - k + 1)
        if k != 0:
            ll += k * lmu
        if n - k != 0:
            ll += (n - k) * l1mu
        return 2 * n * dev, ll


def assert_exact(got, want, what):
    """got within RTOL of the exact value, rounded to a double (a true value that
    underflows must come out as 0 or below the smallest normal)."""
    w = float(want)
    if w == 0.0:
        assert abs(got) < TINY, f"{what}: {got!r}, exact {mp.nstr(want, 17)}"
    else:
        assert abs(got - w) <= RTOL * abs(w), (
            f"{what}: {got!r}, exact {mp.nstr(want, 17)}, relative error "
            f"{abs(got - w) / abs(w):.3g}")


# ---------------------------------------------------------------------- the cases


def _bernoulli_rows():
    """Every eta with both outcomes, and a prior weight."""
    eta = np.repeat(ETAS, 2)
    y = np.tile([0.0, 1.0], len(ETAS))
    w = np.linspace(0.5, 3.0, eta.size)
    return eta, y, w


def _binomial_rows():
    """Proportions of n trials, the boundary ones included, at every eta."""
    props = [(0.3, 10.0), (0.0, 7.0), (1.0, 7.0), (0.875, 8.0), (0.04, 25.0)]
    eta = np.repeat(ETAS, len(props))
    y = np.tile([p for p, _ in props], len(ETAS))
    n = np.tile([m for _, m in props], len(ETAS))
    return eta, y, n


def _exact(fam, link, eta, y, w):
    f = exact_bernoulli if fam is F.Bernoulli else exact_binomial
    return [f(link, e, yi, wi) for e, yi, wi in zip(eta, y, w)]


def _rows(fam):
    return _bernoulli_rows() if fam is F.Bernoulli else _binomial_rows()


def _update(fn, eta, y, w):
    n = eta.size
    out = [np.full(n, np.nan) for _ in range(5)]
    fn(eta, y, w, *out)
    return out


CASES = [(fam, link) for fam in (F.Bernoulli, F.Binomial) for link in LINKS]
IDS = [f"{fam.__name__}-{link}" for fam, link in CASES]


@pytest.mark.parametrize("fam,link", CASES, ids=IDS)
def test_update_deviance_is_exact(fam, link):
    eta, y, w = _rows(fam)
    family = fam(link=LINKS[link]())
    exact = _exact(fam, link, eta, y, w)
    mu, _, wrkwt, wrkresid, dev = _update(family.update, eta, y, w)
    for i, (d, _) in enumerate(exact):
        assert_exact(dev[i], d, f"devresid at eta={eta[i]}, y={y[i]}, w={w[i]}")
    # the clamp still keeps mu, the working weights and residuals finite
    eps = np.finfo(float).eps
    assert mu.min() >= eps and mu.max() <= 1.0 - eps
    assert np.all(np.isfinite(wrkwt)) and np.all(np.isfinite(wrkresid))


@pytest.mark.parametrize("fam,link", CASES, ids=IDS)
def test_twin_update_deviance_is_exact(fam, link):
    eta, y, w = _rows(fam)
    family = fam(link=LINKS[link]())
    exact = _exact(fam, link, eta, y, w)
    _, _, _, _, dev = _update(
        lambda *a: twin.update(family.code, family.link.code, *a), eta, y, w)
    for i, (d, _) in enumerate(exact):
        assert_exact(dev[i], d, f"twin devresid at eta={eta[i]}, y={y[i]}")


@pytest.mark.parametrize("fam,link", CASES, ids=IDS)
def test_agq_kernel_deviance_is_exact(fam, link):
    """agq_deviance's own loop (runtime codes, not update's literal ones): with one
    node at 0 of weight 1, each row its own level, u = 0 and unit scales, devc0 is each
    row's deviance residual."""
    eta, y, w = _rows(fam)
    family = fam(link=LINKS[link]())
    exact = _exact(fam, link, eta, y, w)
    n = eta.size
    devc0, devc, mult = np.empty(n), np.empty(n), np.empty(n)
    total = _glm.agq_deviance(family.code, family.link.code, eta, np.zeros(n),
                              np.arange(n, dtype=np.int32), y, w, np.zeros(n), np.ones(n),
                              np.zeros(1), np.ones(1), devc0, devc, mult)
    for i, (d, _) in enumerate(exact):
        assert_exact(devc0[i], d, f"agq devc0 at eta={eta[i]}, y={y[i]}")
    np.testing.assert_allclose(total, devc0.sum(), rtol=1e-14)


@pytest.mark.parametrize("fam,link", CASES, ids=IDS)
def test_loglik_from_eta_is_exact(fam, link):
    eta, y, w = _rows(fam)
    family = fam(link=LINKS[link]())
    exact = _exact(fam, link, eta, y, w)
    mu, *_ = _update(family.update, eta, y, w)
    out = np.full(eta.size, np.nan)
    total = _glm.loglik(family.code, y, mu, w, 1.0, out, math.nan, family.link.code, eta)
    ref = np.full(eta.size, np.nan)
    ref_total = twin.loglik(family.code, y, mu, w, 1.0, ref, math.nan, family.link.code,
                            eta)
    for i, (_, ll) in enumerate(exact):
        assert_exact(out[i], ll, f"log density at eta={eta[i]}, y={y[i]}, w={w[i]}")
        assert_exact(ref[i], ll, f"twin log density at eta={eta[i]}, y={y[i]}")
    np.testing.assert_allclose(total, out.sum(), rtol=1e-14)
    np.testing.assert_allclose(ref_total, ref.sum(), rtol=1e-14)


@pytest.mark.parametrize("fam", [F.Bernoulli, F.Binomial], ids=lambda c: c.__name__)
def test_vector_agq_logit_shortcut_is_exact(fam):
    eta, y, w = _rows(fam)
    exact = _exact(fam, "logit", eta, y, w)
    rows = _RowDeviance(fam(link="logit"), y, w, eta.size, 1)
    assert rows.kind == "logit"
    got = rows(eta[None, :])[0]
    for i, (d, _) in enumerate(exact):
        assert_exact(got[i], d, f"shortcut deviance at eta={eta[i]}, y={y[i]}")


# ------------------------------------------------------------------ the surroundings


def test_bernoulli_deviance_is_minus_twice_the_loglik_from_eta():
    eta, y, w = _bernoulli_rows()
    for link in LINKS.values():
        family = F.Bernoulli(link=link())
        mu, *_, dev = _update(family.update, eta, y, w)
        out = np.empty(eta.size)
        _glm.loglik(family.code, y, mu, w, 1.0, out, math.nan, family.link.code, eta)
        np.testing.assert_allclose(dev, -2.0 * out, rtol=1e-15)
        assert np.all(dev >= 0.0) and not np.any(np.signbit(dev))


@pytest.mark.parametrize("link", list(LINKS), ids=str)
def test_binomial_deviance_near_the_fit_keeps_absolute_precision(link):
    """Where y is close to mu the deviance is (y - mu)^2-small and the saturated part
    and the log probabilities cancel: the absolute error stays at rounding level."""
    lk = LINKS[link]()
    y = np.array([0.3, 0.04, 0.875, 0.5, 0.999])
    n = np.array([10.0, 25.0, 8.0, 2.0, 1000.0])
    eta = lk.link(y) + np.array([1e-3, -1e-4, 2e-3, 0.0, 1e-2])
    family = F.Binomial(link=lk)
    *_, dev = _update(family.update, eta, y, n)
    for i in range(y.size):
        want = float(exact_binomial(link, eta[i], y[i], n[i])[0])
        assert abs(dev[i] - want) <= 1e-13 * n[i], (i, dev[i], want)


@pytest.mark.parametrize("fam", [F.Bernoulli, F.Binomial], ids=lambda c: c.__name__)
@pytest.mark.parametrize("link", list(LINKS), ids=str)
def test_deviance_stays_finite_far_out(fam, link):
    """However far a trial eta strays, each row's deviance stays finite (probit: |eta|
    floored at 1e150 in the series; cloglog: y = 0 rows capped at eta = 700)."""
    eta = np.array([-1e300, -1e200, -1e6, -800.0, 800.0, 1e6, 1e200, 1e300])
    eta = np.repeat(eta, 2)
    y = np.tile([0.0, 1.0], eta.size // 2)
    family = fam(link=LINKS[link]())
    out = _update(family.update, eta, y, None)
    for a in out:
        assert np.all(np.isfinite(a))
    dev = out[4]
    assert np.all(dev >= 0.0)
    if link == "cloglog":
        # y = 0 at eta >= 700: -2 log(1 - mu) held at its value at eta = 700
        cap = 2.0 * math.exp(700.0)
        np.testing.assert_allclose(dev[(y == 0.0) & (eta > 700.0)], cap, rtol=1e-15)
    if link == "logit":
        # the wrong outcome costs 2|eta| (plus log 2-sized terms, lost at this size)
        wrong = ((y == 0.0) & (eta > 0.0)) | ((y == 1.0) & (eta < 0.0))
        np.testing.assert_allclose(dev[wrong], 2.0 * np.abs(eta[wrong]), rtol=1e-15)


def test_loglik_without_eta_still_reads_mu():
    """Without eta the log density is the mean-based one (the public
    Family.loglik(y, mu) is unchanged); with eta it no longer reads mu."""
    eta = np.array([-40.0, 2.0, 40.0])
    y = np.array([1.0, 0.0, 0.0])
    family = F.Bernoulli()
    mu, *_ = _update(family.update, eta, y, None)
    np.testing.assert_allclose(family.loglik(y, mu),
                               [math.log(mu[0]), math.log1p(-mu[1]), math.log1p(-mu[2])],
                               rtol=1e-15)
    out = np.empty(3)
    _glm.loglik(family.code, y, np.full(3, np.nan), np.empty(0), 1.0, out, math.nan,
                family.link.code, eta)
    assert out[0] == pytest.approx(-40.0 - math.log1p(math.exp(-40.0)), rel=1e-15)
    assert out[2] == pytest.approx(-40.0 - math.log1p(math.exp(-40.0)), rel=1e-15)
    # a family other than the binary ones ignores eta
    pois = F.Poisson()
    yp, mp_ = np.array([3.0, 0.0]), np.array([2.5, 0.1])
    a, b = np.empty(2), np.empty(2)
    _glm.loglik(pois.code, yp, mp_, np.empty(0), 1.0, a)
    _glm.loglik(pois.code, yp, mp_, np.empty(0), 1.0, b, math.nan, pois.link.code,
                np.array([1e3, -1e3]))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="eta"):
        _glm.loglik(family.code, y, mu, np.empty(0), 1.0, out, math.nan,
                    family.link.code, np.zeros(2))

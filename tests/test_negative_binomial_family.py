"""The negative binomial (NB2) family: kernels against NumPy twins, and the algebra.

Tier: every compiled kernel that takes the family (``update``, ``loglik``,
``pirls_blockdiag``, ``agq_deviance``) against a NumPy twin at KERNEL, for the log, sqrt
and identity links; the log density against scipy.stats.nbinom and its Poisson limit;
the deviance residual against the log densities; the observed weights against a finite
difference of the log density.
"""
import itertools
import math
import pickle
import zlib

import numpy as np
import pytest
from scipy import stats

from conftest import KERNEL
from mixedmodels import families as F
from mixedmodels._dispersion import observed_weights, variance_derivatives
from mixedmodels._kernels import _glm
from mixedmodels._kernels import _glm_numpy as twin

# As in test_families.py: deviance residuals near y = mu are differences of nearly
# equal terms, so their last-bit noise is measured against an absolute floor.
KERNEL_ATOL = 1e-12

LINKS = ["log", "sqrt", "identity"]
THETAS = [0.3, 4.0, 1e6]
NB = _glm.FAMILY_NEGATIVE_BINOMIAL


def _rng(*key):
    return np.random.default_rng(zlib.crc32("-".join(map(str, key)).encode()))


def _counts(rng, mu, theta):
    """NB2 draws with mean mu and shape theta (numpy's n = theta, p = theta/(theta+mu))."""
    return rng.negative_binomial(theta, theta / (theta + mu)).astype(float)


def _eta(link, rng, n):
    """Linear predictors for the link, the last few at or beyond the edges of the domain."""
    if link == "log":
        core, extra = rng.normal(0.5, 1.5, n), [-800.0, -40.0, 25.0, 0.0]
    elif link == "sqrt":
        core, extra = rng.uniform(0.05, 4.0, n), [0.0, -2.0, 30.0]
    else:
        core, extra = rng.uniform(0.01, 12.0, n), [-1.0, 0.0, 300.0]
    core[-len(extra):] = extra
    return core


def _problem(link, theta, n=400):
    rng = _rng(link, theta)
    family = F.NegativeBinomial(link=link, theta=theta)
    eta = _eta(link, rng, n)
    mu = np.clip(family.link.inverse(eta), 0.05, 50.0)
    y = _counts(rng, mu, min(theta, 1e3))
    y[:3] = [0.0, 1.0, 1000.0]
    w = rng.uniform(0.5, 3.0, n)
    w[3] = 0.0
    return family, eta, y, w


def _outputs(n, k=5):
    return [np.full(n, np.nan) for _ in range(k)]


# ------------------------------------------------------------ kernels against twins


@pytest.mark.parametrize("link,theta", list(itertools.product(LINKS, THETAS)))
@pytest.mark.parametrize("weighted", [True, False])
def test_update_matches_twin(link, theta, weighted):
    family, eta, y, w = _problem(link, theta)
    w = w if weighted else None
    got, ref = _outputs(len(y)), _outputs(len(y))
    dev_c = family.update(eta, y, w, *got)
    dev_n = twin.update(NB, family.link.code, eta, y, np.empty(0) if w is None else w,
                        *ref, param=theta)
    for name, a, b in zip(["mu", "mu_eta", "wrkwt", "wrkresid", "devresid"], got, ref):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, rtol=KERNEL, atol=KERNEL_ATOL, err_msg=name)
    np.testing.assert_allclose(dev_c, dev_n, rtol=KERNEL)
    np.testing.assert_allclose(dev_c, got[4].sum(), rtol=1e-14)
    assert got[0].min() >= np.finfo(float).eps   # mu clamped as for Poisson


@pytest.mark.parametrize("theta", [0.02, 0.3, 4.0, 1e6, 1e10])
def test_loglik_matches_twin(theta):
    family, eta, y, w = _problem("log", theta)
    mu = np.exp(np.clip(eta, -30.0, 6.0))
    got = family.loglik(y, mu, w)
    ref = np.empty_like(y)
    total = twin.loglik(NB, y, mu, w, 1.0, ref, param=theta)
    assert np.all(np.isfinite(got)) and got[3] == 0.0   # zero prior weight
    np.testing.assert_allclose(got, ref, rtol=KERNEL, atol=KERNEL_ATOL)
    np.testing.assert_allclose(got.sum(), total, rtol=KERNEL)
    # phi is ignored: the family has no dispersion
    np.testing.assert_array_equal(family.loglik(y, mu, w, phi=7.0), got)


def _numpy_pirls(link_code, theta, fixed, z, codes, y, w, lam, u, tol=1e-13,
                 maxiter=100, max_halving=30, step_tol=1e-9, mode_tol=1e-12):
    """The algorithm of _glm.pirls_blockdiag written with NumPy and the twin's update
    (the negative binomial's PIRLS is Fisher scoring: its exit and extrapolation)."""
    n, k = z.shape
    nlev = u.size // k
    out = _outputs(n)

    def evaluate(u_):
        eta = fixed + np.einsum("ia,ia->i", z, (u_.reshape(nlev, k) @ lam.T)[codes])
        return twin.update(NB, link_code, eta, y, w, *out, param=theta), eta

    dev, eta = evaluate(u)
    pdev = dev + u @ u
    it, converged = 0, False
    last_step, last_vec = -1.0, None
    while True:
        wrkwt, wrkresid = out[2], out[3]
        r = eta - fixed + wrkresid
        a = np.zeros((nlev, k, k))
        np.add.at(a, codes, wrkwt[:, None, None] * z[:, :, None] * z[:, None, :])
        rhs = np.zeros((nlev, k))
        np.add.at(rhs, codes, (wrkwt * r)[:, None] * z)
        m = lam.T @ a @ lam + np.eye(k)
        chol = np.linalg.cholesky(m)
        logdet = float(np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2))))
        if converged or it >= maxiter:
            break
        it += 1
        unew = np.linalg.solve(m, (rhs @ lam)[:, :, None])[:, :, 0].ravel()
        step = np.max(np.abs(unew - u))
        usize = np.max(np.abs(u))
        new_dev, eta = evaluate(unew)
        new_pdev = new_dev + unew @ unew
        halvings = 0
        while not (new_pdev <= pdev * (1.0 + 1e-12) + 1e-12) and halvings < max_halving:
            unew = 0.5 * (u + unew)
            new_dev, eta = evaluate(unew)
            new_pdev = new_dev + unew @ unew
            halvings += 1
        if halvings == max_halving:
            dev, eta = evaluate(u)
            converged = True
            continue
        # the modes' distance to their limit at the rate of the last two steps, or
        # steps that stopped shrinking, once the step is below step_tol
        converged = bool(step <= step_tol * (1.0 + usize) and (
            (halvings == 0 and step * step <= mode_tol * (1.0 + usize) * (last_step - step))
            or 0.0 <= last_step <= step))
        last_step = step
        svec = unew - u
        u, pdev, dev = unew, new_pdev, new_dev
        if converged:
            continue
        if halvings == 0 and last_vec is not None:
            # two nearly parallel steps at a ratio 0.5 <= |lam| < 1: on to the limit
            lam_ = (svec @ last_vec) / (last_vec @ last_vec)
            if 0.5 <= abs(lam_) < 1.0 and np.sum((svec - lam_ * last_vec) ** 2) <= 0.09 * (svec @ svec):
                far = u + lam_ / (1.0 - lam_) * svec
                far_dev, far_eta = evaluate(far)
                if far_dev + far @ far <= pdev * (1.0 + 1e-12) + 1e-12:
                    u, dev, eta, pdev = far, far_dev, far_eta, far_dev + far @ far
                    last_step, last_vec = -1.0, None
                    continue
                dev, eta = evaluate(u)
        last_vec = svec if halvings == 0 else None
    return u, logdet, dev, it, converged, out


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("k", [1, 2])
def test_pirls_blockdiag_matches_numpy(link, k):
    rng = _rng("pirls", link, k)
    n, nlev, theta = 600, 25, 2.5
    family = F.NegativeBinomial(link=link, theta=theta)
    codes = rng.integers(0, nlev, n).astype(np.intc)
    z = np.ones((n, k))
    if k == 2:
        z[:, 1] = rng.uniform(-1.0, 1.0, n)
    lam = np.array([[0.6]]) if k == 1 else np.array([[0.5, 0.0], [0.1, 0.3]])
    base = {"log": 1.0, "sqrt": 2.0, "identity": 6.0}[link]
    fixed = base + 0.2 * rng.normal(size=n)
    spread = {"log": 1.0, "sqrt": 1.0, "identity": 3.0}[link]
    b = rng.normal(size=(nlev, k)) @ (spread * lam).T
    eta_true = fixed + np.einsum("ia,ia->i", z, b[codes])
    y = _counts(rng, family.link.inverse(eta_true), theta)
    w = rng.uniform(0.5, 2.0, n)
    u = np.zeros(nlev * k)
    got = _outputs(n, 6)   # eta, mu, mu_eta, wrkwt, wrkresid, devresid
    lam_cm = np.ascontiguousarray(lam.T.ravel())   # column-major template
    logdet, dev, iters, converged = _glm.pirls_blockdiag(
        NB, family.link.code, fixed, z, codes, y, w, lam_cm, u, np.empty(nlev * k * k),
        *got, param=theta)
    u_n, logdet_n, dev_n, iters_n, converged_n, out_n = _numpy_pirls(
        family.link.code, theta, fixed, z, codes, y, w, lam, np.zeros(nlev * k))
    assert converged and converged_n and iters == iters_n
    np.testing.assert_allclose(u, u_n, rtol=KERNEL, atol=KERNEL)
    assert logdet == pytest.approx(logdet_n, rel=KERNEL)
    assert dev == pytest.approx(dev_n, rel=KERNEL)
    for a, b in zip(got[1:], out_n):
        np.testing.assert_allclose(a, b, rtol=KERNEL, atol=KERNEL_ATOL)
    # without the parameter the kernel refuses the family rather than guessing theta
    with pytest.raises(ValueError, match="theta"):
        _glm.pirls_blockdiag(NB, family.link.code, fixed, z, codes, y, w, lam_cm,
                             np.zeros(nlev * k), np.empty(nlev * k * k), *_outputs(n, 6))


@pytest.mark.parametrize("link", LINKS)
def test_agq_deviance_matches_numpy(link):
    rng = _rng("agq", link)
    n, nlev, theta = 500, 30, 1.7
    family = F.NegativeBinomial(link=link, theta=theta)
    codes = rng.integers(0, nlev, n).astype(np.intc)
    base = {"log": 1.0, "sqrt": 2.0, "identity": 6.0}[link]
    fixed = base + 0.2 * rng.normal(size=n)
    zlam = np.full(n, 0.4)
    y = _counts(rng, family.link.inverse(fixed), theta)
    w = rng.uniform(0.5, 2.0, n)
    u = 0.5 * rng.normal(size=nlev)
    sd = rng.uniform(0.3, 0.9, nlev)
    nodes, weights = np.polynomial.hermite_e.hermegauss(7)
    weights = weights / np.sqrt(2.0 * np.pi)
    got = _glm.agq_deviance(NB, family.link.code, fixed, zlam, codes, y, w, u, sd, nodes,
                            weights, np.empty(nlev), np.empty(nlev), np.empty(nlev),
                            param=theta)

    def devc(v):
        out = _outputs(n)
        twin.update(NB, family.link.code, fixed + zlam * v[codes], y, w, *out, param=theta)
        return v * v + np.bincount(codes, weights=out[4], minlength=nlev)

    devc0 = devc(u)
    mult = sum(wk * np.exp((zk * zk - devc(u + zk * sd) + devc0) / 2.0)
               for zk, wk in zip(nodes, weights))
    ref = np.sum(devc0) - 2.0 * (np.sum(np.log(mult)) + np.sum(np.log(sd)))
    assert got == pytest.approx(ref, rel=KERNEL)


def test_codes_agree_with_twin_and_defaults_leave_other_families_alone():
    assert _glm.FAMILY_NEGATIVE_BINOMIAL == twin.FAMILY_NEGATIVE_BINOMIAL == 6
    families = [F.Bernoulli, F.Binomial, F.Poisson, F.Gamma, F.InverseGaussian, F.Normal,
                F.NegativeBinomial]
    assert sorted(c.code for c in families) == list(range(len(families)))
    # the old call signatures (no param) still serve the other families, and param
    # does not reach them
    n = 50
    rng = _rng("defaults")
    eta, y = rng.normal(size=n), rng.poisson(2.0, n).astype(float)
    a, b = _outputs(n), _outputs(n)
    dev_a = _glm.update(F.Poisson.code, F.LogLink.code, eta, y, np.empty(0), *a)
    dev_b = _glm.update(F.Poisson.code, F.LogLink.code, eta, y, np.empty(0), *b, 123.0)
    assert dev_a == dev_b
    for x1, x2 in zip(a, b):
        np.testing.assert_array_equal(x1, x2)
    assert math.isnan(F.Poisson().param) and F.Poisson().n_extra_params == 0


# ---------------------------------------------------------------------- the algebra


@pytest.mark.parametrize("theta", [0.05, 0.7, 3.0, 40.0])
def test_loglik_against_scipy(theta):
    rng = _rng("scipy", theta)
    n = 300
    mu = rng.uniform(0.05, 30.0, n)
    y = _counts(rng, mu, theta)
    y[:3] = [0.0, 1.0, 200.0]
    w = rng.uniform(0.5, 3.0, n)
    ref = stats.nbinom.logpmf(y, theta, theta / (theta + mu))
    fam = F.NegativeBinomial(theta=theta)
    np.testing.assert_allclose(fam.loglik(y, mu), ref, rtol=1e-12, atol=1e-14)
    # prior weights multiply the log density, as for Poisson
    np.testing.assert_allclose(fam.loglik(y, mu, w), w * ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("theta", [0.3, 4.0, 1e6])
def test_deviance_residual_is_twice_saturated_minus_loglik(link, theta):
    family, eta, y, w = _problem(link, theta)
    # interior values only: the clamped rows are not at the mu the loglik is given
    eta, y, w = eta[4:-4], y[4:-4], w[4:-4]
    mu, _, _, _, dev = _outputs(len(y))
    family.update(eta, y, w, mu, *_outputs(len(y), 3), dev)
    sat = family.loglik(y, y, w)
    np.testing.assert_allclose(dev, 2.0 * (sat - family.loglik(y, mu, w)),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("theta", [0.4, 5.0])
def test_working_weights_and_residuals(link, theta):
    family, eta, y, w = _problem(link, theta)
    eta, y, w = eta[4:-4], y[4:-4], w[4:-4]
    mu, mu_eta, wrkwt, wrkresid, _ = out = _outputs(len(y))
    family.update(eta, y, w, *out)
    np.testing.assert_allclose(wrkwt, w * mu_eta**2 / (mu + mu * mu / theta), rtol=1e-13)
    np.testing.assert_allclose(wrkresid * mu_eta, y - mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(family.variance(mu), mu + mu**2 / theta, rtol=1e-15)


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("theta", [0.4, 5.0])
def test_observed_weights_against_finite_difference(link, theta):
    family, eta, y, w = _problem(link, theta, n=120)
    eta, y, w = eta[4:-4], y[4:-4], w[4:-4]
    mu = family.link.inverse(eta)
    got = observed_weights(family, y, mu, eta, w, 1.0)
    h = 1e-4 * np.maximum(1.0, np.abs(eta))

    def ll(e):
        return family.loglik(y, family.link.inverse(e), w)

    fd = -(ll(eta + h) - 2.0 * ll(eta) + ll(eta - h)) / (h * h)
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-5 * np.max(np.abs(fd)))
    if link == "log":
        # -d²ℓ/dη² = w θ μ (y + θ)/(μ + θ)² in closed form
        np.testing.assert_allclose(got, w * theta * mu * (y + theta) / (mu + theta)**2,
                                   rtol=1e-12)
    v, dv = variance_derivatives(family, mu)
    np.testing.assert_allclose(v, family.variance(mu), rtol=1e-15)
    np.testing.assert_allclose(dv, 1.0 + 2.0 * mu / theta, rtol=1e-15)


@pytest.mark.parametrize("link", LINKS)
def test_large_theta_approaches_poisson(link):
    family, eta, y, w = _problem(link, 1e10)
    eta, y, w = eta[4:-4], y[4:-4], w[4:-4]
    poisson = F.Poisson(link=link)
    nb_out, p_out = _outputs(len(y)), _outputs(len(y))
    family.update(eta, y, w, *nb_out)
    poisson.update(eta, y, w, *p_out)
    mu = nb_out[0]
    for a, b in zip(nb_out[:2] + nb_out[3:4], p_out[:2] + p_out[3:4]):
        np.testing.assert_array_equal(a, b)   # mu, mu_eta, wrkresid: the same link
    # V differs by the factor 1 + mu/theta
    np.testing.assert_allclose(nb_out[2], p_out[2], rtol=2.0 * mu.max() / 1e10)
    # deviance and log density differ by w (y - mu)²/theta and w ((y - mu)² - y)/(2 theta)
    # to first order, and by nothing more than rounding
    bound = 2.0 * w * ((y - mu) ** 2 + y) / 1e10 + 1e-13 * (1.0 + np.abs(p_out[4]))
    assert np.all(np.abs(nb_out[4] - p_out[4]) <= bound)
    ll_p = poisson.loglik(y, mu, w)
    bound = 2.0 * w * ((y - mu) ** 2 + y) / 1e10 + 1e-13 * (1.0 + np.abs(ll_p))
    assert np.all(np.abs(family.loglik(y, mu, w) - ll_p) <= bound)


def test_large_theta_keeps_its_digits():
    """theta (NB - Poisson) tends to its first-order term: (y-mu)²-y)/2 for the log
    density, -(y-mu)² for the deviance; a log density computed as the plain difference
    lgamma(y + theta) - lgamma(theta) loses that term in rounding."""
    rng = _rng("digits")
    theta = 1e7
    mu = rng.uniform(0.5, 10.0, 200)
    y = rng.poisson(mu).astype(float)
    nb, pois = F.NegativeBinomial(theta=theta), F.Poisson()
    np.testing.assert_allclose(theta * (nb.loglik(y, mu) - pois.loglik(y, mu)),
                               ((y - mu) ** 2 - y) / 2.0, rtol=1e-3, atol=1e-3)
    a, b = _outputs(200), _outputs(200)
    nb.update(np.log(mu), y, None, *a)
    pois.update(np.log(mu), y, None, *b)
    np.testing.assert_allclose(theta * (b[4] - a[4]), (y - mu) ** 2, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------- objects and validation


def test_construction_and_parameter_slot():
    fam = F.NegativeBinomial()
    assert fam.link == F.LogLink() and fam.canonical_link
    assert fam.theta is None and math.isnan(fam.param) and fam.estimate_param
    assert not fam.has_dispersion
    assert fam.n_extra_params == 1 and fam.extra_param_name == "theta"
    assert repr(fam) == "NegativeBinomial(link=log, theta=estimated)"
    fixed = F.NegativeBinomial(link="sqrt", theta=2.5)
    assert fixed.param == fixed.theta == 2.5 and not fixed.estimate_param
    assert repr(fixed) == "NegativeBinomial(link=sqrt, theta=2.5)"
    assert not fixed.canonical_link
    # with_theta: a new instance, the original unchanged, "estimated" carried over
    est = fam.with_theta(1.75)
    assert est is not fam and fam.theta is None
    assert est.theta == est.param == 1.75 and est.estimate_param
    assert repr(est) == "NegativeBinomial(link=log, theta=1.75 [estimated])"
    assert fixed.with_theta(3.0).estimate_param is False
    assert fam.with_param(2.0) == fam.with_theta(2.0)
    assert F.NegativeBinomial(theta=2) == F.NegativeBinomial(link="log", theta=2.0)
    assert F.NegativeBinomial(theta=2.0) != F.NegativeBinomial().with_theta(2.0)
    assert F.NegativeBinomial(theta=2.0) != F.NegativeBinomial(theta=3.0)
    assert F.NegativeBinomial(theta=2.0) != F.Poisson()
    assert len({F.NegativeBinomial(theta=2.0), F.NegativeBinomial(theta=2.0), fam}) == 2
    with pytest.raises(AttributeError):
        fixed.theta = 4.0
    with pytest.raises(ValueError, match="no parameter besides the dispersion"):
        F.Poisson().with_param(2.0)
    for name in ("negative_binomial", "NegativeBinomial", "nbinom2"):
        assert F.get_family(name) == fam
    assert F.get_family(F.NegativeBinomial) == fam


@pytest.mark.parametrize("family", [
    F.NegativeBinomial(), F.NegativeBinomial(link="identity", theta=0.5),
    F.NegativeBinomial().with_theta(3.25), F.Poisson(link="sqrt"), F.Gamma(link="log"),
    F.Binomial(link="probit")], ids=repr)
def test_families_pickle(family):
    back = pickle.loads(pickle.dumps(family))
    assert back == family and repr(back) == repr(family) and hash(back) == hash(family)
    assert back.estimate_param == family.estimate_param
    np.testing.assert_equal(back.param, family.param)


def test_bad_theta_and_links():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite positive"):
            F.NegativeBinomial(theta=bad)
        with pytest.raises(ValueError, match="finite positive"):
            F.NegativeBinomial().with_theta(bad)
    for bad in ("2", True, [2.0]):
        with pytest.raises(TypeError, match="theta must be a number"):
            F.NegativeBinomial(theta=bad)
    with pytest.raises(ValueError, match="supports the links 'log', 'sqrt', 'identity'; "
                       "got 'logit'"):
        F.NegativeBinomial(link="logit")


def test_unset_theta_is_refused_where_it_is_needed():
    fam = F.NegativeBinomial()
    n = 5
    with pytest.raises(ValueError, match=r"theta must be a finite positive number, got nan"
                       r".*with_theta"):
        fam.update(np.zeros(n), np.ones(n), None, *_outputs(n))
    with pytest.raises(ValueError, match="with_theta"):
        fam.loglik(np.ones(n), np.ones(n))
    with pytest.raises(ValueError, match="with_theta"):
        fam.variance(np.ones(n))
    with pytest.raises(ValueError, match="with_theta"):
        variance_derivatives(fam, np.ones(n))
    with pytest.raises(ValueError, match="theta"):
        _glm.agq_deviance(NB, F.LogLink.code, np.zeros(n), np.ones(n),
                          np.zeros(n, dtype=np.intc), np.ones(n), np.empty(0), np.zeros(1),
                          np.ones(1), np.zeros(1), np.ones(1), np.empty(1), np.empty(1),
                          np.empty(1))
    with pytest.raises(ValueError, match="theta"):
        twin.update(NB, F.LogLink.code, np.zeros(n), np.ones(n), np.empty(0), *_outputs(n))


def test_validation_and_starting_values():
    fam = F.NegativeBinomial()
    with pytest.raises(ValueError, match="response 'count' must be non-negative counts "
                       r"for NegativeBinomial; found negative values \[-1\]"):
        fam.validate(np.array([0.0, -1.0, 3.0]), None, "count")
    with pytest.raises(ValueError, match=r"'count' must be integer counts for "
                       r"NegativeBinomial; found non-integer values \[2\.5\]"):
        fam.validate(np.array([0.0, 2.5]), None, "count")
    with pytest.raises(ValueError, match="must be non-negative"):
        fam.validate(np.array([1.0, 2.0]), np.array([1.0, -1.0]), "count")
    fam.validate(np.array([0.0, 3.0, 10.0]), np.array([1.0, 0.5, 2.0]), "count")
    np.testing.assert_allclose(fam.starting_mu([0.0, 3.0]), [0.1, 3.1])

"""NumPy twins of the kernels in ``_glm.pyx``, held to them at 1e-10 by the tests.

Same arguments, same semantics: outputs are written into the caller's arrays and the
sum is returned; ``param`` is the family's own parameter (the negative binomial θ),
NaN for the families that have none. The inverse links are the public ``Link`` objects
of :mod:`mixedmodels.families`, so the test also ties the compiled link formulas to the
public ones. Written for clarity, not speed.
"""
import math

import numpy as np
from scipy.special import erfc, gammaln

FAMILY_BERNOULLI = 0
FAMILY_BINOMIAL = 1
FAMILY_POISSON = 2
FAMILY_GAMMA = 3
FAMILY_INVERSE_GAUSSIAN = 4
FAMILY_NORMAL = 5
FAMILY_NEGATIVE_BINOMIAL = 6
LINK_LOGIT = 0
LINK_PROBIT = 1
LINK_CLOGLOG = 2
LINK_LOG = 3
LINK_IDENTITY = 4
LINK_INVERSE = 5
LINK_SQRT = 6
LINK_INVERSE_SQUARE = 7

MU_EPS = np.finfo(np.float64).eps
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_STIRLING_SERIES_FROM = 15.0
# the thresholds of the binary log probabilities from eta (see _glm.pyx)
PROBIT_SERIES_BELOW = -30.0
PROBIT_X_FLOOR = 1e150
CLOGLOG_SERIES_BELOW = -30.0
CLOGLOG_ETA_CAP = 700.0

_BINARY = (FAMILY_BERNOULLI, FAMILY_BINOMIAL)
_TAIL_LINKS = (LINK_LOGIT, LINK_PROBIT, LINK_CLOGLOG)


def _check_param(family, param):
    if family == FAMILY_NEGATIVE_BINOMIAL and not (param > 0.0 and math.isfinite(param)):
        raise ValueError(f"the negative binomial theta must be a finite positive number, "
                         f"got {param}")


def _weights(prior_w, n):
    prior_w = np.asarray(prior_w, dtype=np.float64)
    return np.ones(n) if prior_w.size == 0 else prior_w


def _xlogy(x, y):
    """x * log(y) with 0 * log(anything) = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x != 0.0, x * np.log(y), 0.0)


def _xlog1py(x, y):
    """x * log1p(y) with 0 * log1p(anything) = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x != 0.0, x * np.log1p(y), 0.0)


def linkinv(link, eta):
    """(mu, mu_eta) of the link with code `link`, unclamped."""
    from ..families import _LINKS_BY_CODE
    lk = _LINKS_BY_CODE[link]()
    with np.errstate(all="ignore"):
        return lk.inverse(eta), lk.mu_eta(eta)


def clamp_mu(family, mu):
    """mu clamped into the family's domain, NaN left as NaN."""
    mu = np.array(mu, dtype=np.float64)
    if family in _BINARY:
        mu = np.where(mu < MU_EPS, MU_EPS, mu)
        mu = np.where(mu > 1.0 - MU_EPS, 1.0 - MU_EPS, mu)
    elif family != FAMILY_NORMAL:
        mu = np.where(mu < MU_EPS, MU_EPS, mu)
    return mu


def variance(family, mu, param=math.nan):
    if family in _BINARY:
        return mu * (1.0 - mu)
    if family == FAMILY_POISSON:
        return mu
    if family == FAMILY_GAMMA:
        return mu * mu
    if family == FAMILY_INVERSE_GAUSSIAN:
        return mu ** 3
    if family == FAMILY_NEGATIVE_BINOMIAL:
        return mu * (1.0 + mu / param)
    return np.ones_like(mu)


def stirling_rem(x):
    """lgamma(x) - [(x - 1/2) log x - x + log(2 pi)/2] for x > 0: from gammaln below
    15, from the asymptotic series (five terms) above."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        direct = gammaln(x) - (x - 0.5) * np.log(x) + x - _HALF_LOG_2PI
        s = 1.0 / x
        s2 = s * s
        series = s * (1 / 12 - s2 * (1 / 360 - s2 * (1 / 1260
                      - s2 * (1 / 1680 - s2 / 1188))))
    return np.where(x < _STIRLING_SERIES_FROM, direct, series)


def nbinom_logp(y, mu, theta):
    """log P(y) of NB2(mean mu, shape theta), rearranged as the kernel does."""
    with np.errstate(all="ignore"):
        t = (y + theta) * np.log1p(mu / theta)
        full = ((y + theta - 0.5) * np.log1p(y / theta) - y + stirling_rem(y + theta)
                - stirling_rem(theta) + _xlogy(y, mu) - t - gammaln(y + 1.0))
    return np.where(y == 0.0, -t, full)


def log_ndtr(x):
    """log Phi(x) to full relative precision: through erfc, and below
    PROBIT_SERIES_BELOW through the asymptotic series of the Mills ratio."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        upper = np.log1p(-0.5 * erfc(x / math.sqrt(2.0)))
        middle = np.log(0.5 * erfc(-x / math.sqrt(2.0)))
        xs = np.maximum(x, -PROBIT_X_FLOOR)
        t = 1.0 / (xs * xs)
        # 1 - t + 3t^2 - 15t^3 + ... - 135135 t^7 + 2027025 t^8, minus its leading 1
        s = t * (-1.0 + t * (3.0 + t * (-15.0 + t * (105.0 + t * (-945.0 + t * (10395.0
                 + t * (-135135.0 + t * 2027025.0)))))))
        series = -0.5 * xs * xs - np.log(-xs) - _HALF_LOG_2PI + np.log1p(s)
    return np.where(x > 0.0, upper, np.where(x >= PROBIT_SERIES_BELOW, middle, series))


def binary_logs(link, eta):
    """(log mu, log(1 - mu)) of a binary mean straight from eta, for the logit, probit
    and cloglog links, each to full relative precision (see ``_binary_nlogp`` in
    _glm.pyx for the forms; the kernel reuses its inverse link where the expressions
    coincide)."""
    eta = np.asarray(eta, dtype=np.float64)
    with np.errstate(all="ignore"):
        if link == LINK_LOGIT:
            lp = np.log1p(np.exp(-np.abs(eta)))
            return -(lp + np.maximum(-eta, 0.0)), -(lp + np.maximum(eta, 0.0))
        if link == LINK_PROBIT:
            return log_ndtr(eta), log_ndtr(-eta)
        if link == LINK_CLOGLOG:
            x = np.exp(eta)
            lmu = np.where(eta > 0.0, np.log1p(-np.exp(-x)),
                           np.where(eta >= CLOGLOG_SERIES_BELOW, np.log(-np.expm1(-x)),
                                    eta - 0.5 * x))
            return lmu, -np.exp(np.minimum(eta, CLOGLOG_ETA_CAP))
    raise ValueError(f"no binary log probabilities from eta for link code {link}")


def _binary_nlogp(link, a, b, eta):
    """-[a log mu + b log(1 - mu)] from eta, a term with a zero factor left out."""
    lmu, l1mu = binary_logs(link, eta)
    with np.errstate(all="ignore"):
        return np.where(a != 0.0, -a * lmu, 0.0) + np.where(b != 0.0, -b * l1mu, 0.0)


def binary_sat(y):
    """y log y + (1 - y) log(1 - y), 0 log 0 = 0."""
    return _xlogy(y, y) + _xlog1py(1.0 - y, -y)


def unit_deviance_eta(family, link, y, eta, mu, param=math.nan):
    """The unit deviance as ``update`` computes it: for Bernoulli and Binomial with the
    logit, probit or cloglog link from eta (``binary_logs``), otherwise from the
    clamped mu."""
    if family in _BINARY and link in _TAIL_LINKS:
        nll = _binary_nlogp(link, y, 1.0 - y, eta)
        if family == FAMILY_BERNOULLI:
            return 2.0 * nll
        dev = 2.0 * (binary_sat(y) + nll)
        if link == LINK_LOGIT:
            # a proportion inside (0, 1): the ratios y/mu and (1 - y)/(1 - mu) from
            # exp(-|eta|) directly, 1/mu = (1 + e) exp(max(-eta, 0)) and so on
            p = 1.0 + np.exp(-np.abs(eta))
            with np.errstate(all="ignore"):
                ratio = 2.0 * (y * (np.log(y * p) + np.maximum(-eta, 0.0))
                               + (1.0 - y) * (np.log((1.0 - y) * p) + np.maximum(eta, 0.0)))
            dev = np.where((y != 0.0) & (y != 1.0), ratio, dev)
        return dev
    return unit_deviance(family, y, mu, param)


def unit_deviance(family, y, mu, param=math.nan):
    with np.errstate(all="ignore"):
        if family == FAMILY_BERNOULLI:
            return -2.0 * (_xlogy(y, mu) + _xlog1py(1.0 - y, -mu))
        if family == FAMILY_BINOMIAL:
            return 2.0 * (_xlogy(y, y / mu) + _xlogy(1.0 - y, (1.0 - y) / (1.0 - mu)))
        if family == FAMILY_POISSON:
            return 2.0 * (_xlogy(y, y / mu) - (y - mu))
        if family == FAMILY_GAMMA:
            return -2.0 * (np.log(y / mu) - (y - mu) / mu)
        if family == FAMILY_INVERSE_GAUSSIAN:
            return (y - mu) ** 2 / (y * mu * mu)
        if family == FAMILY_NEGATIVE_BINOMIAL:
            r = (y - mu) / (mu + param)
            lr = np.where(r > -0.5, np.log1p(r), np.log((y + param) / (mu + param)))
            return 2.0 * (_xlogy(y, y / mu) - (y + param) * lr)
        return (y - mu) ** 2


def update(family, link, eta, y, prior_w, mu, mu_eta, wrkwt, wrkresid, devresid,
           param=math.nan):
    """NumPy twin of ``_glm.update``."""
    _check_param(family, param)
    eta = np.asarray(eta, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = _weights(prior_w, eta.shape[0])
    m, me = linkinv(link, eta)
    m = clamp_mu(family, m)
    me = np.where(np.abs(me) < MU_EPS, np.where(me < 0.0, -MU_EPS, MU_EPS), me)
    with np.errstate(all="ignore"):
        mu[:] = m
        mu_eta[:] = me
        wrkwt[:] = w * me * me / variance(family, m, param)
        wrkresid[:] = (y - m) / me
        devresid[:] = w * unit_deviance_eta(family, link, y, eta, m, param)
    return float(np.sum(devresid))


def loglik(family, y, mu, prior_w, phi, out, param=math.nan, link=-1, eta=None):
    """NumPy twin of ``_glm.loglik`` (with `eta`, the binary families under logit,
    probit and cloglog take their log probabilities from eta and do not read mu)."""
    _check_param(family, param)
    y = np.asarray(y, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    w = _weights(prior_w, y.shape[0])
    if family not in (FAMILY_BERNOULLI, FAMILY_BINOMIAL, FAMILY_POISSON,
                      FAMILY_NEGATIVE_BINOMIAL) and not phi > 0:
        raise ValueError(f"dispersion phi must be positive, got {phi}")
    if eta is not None and np.shape(eta) != y.shape:
        raise ValueError("loglik: eta must have the length of y")
    from_eta = eta is not None and family in _BINARY and link in _TAIL_LINKS
    if from_eta:
        eta = np.asarray(eta, dtype=np.float64)
    with np.errstate(all="ignore"):
        if family == FAMILY_BERNOULLI:
            if from_eta:
                v = -w * _binary_nlogp(link, y, 1.0 - y, eta)
            else:
                v = w * (_xlogy(y, mu) + _xlog1py(1.0 - y, -mu))
        elif family == FAMILY_BINOMIAL:
            k = w * y
            nk = w - k
            v = gammaln(w + 1.0) - gammaln(k + 1.0) - gammaln(nk + 1.0)
            if from_eta:
                v = v - _binary_nlogp(link, k, nk, eta)
            else:
                v = v + _xlogy(k, mu) + _xlog1py(nk, -mu)
        elif family == FAMILY_POISSON:
            v = w * (_xlogy(y, mu) - mu - gammaln(y + 1.0))
        elif family == FAMILY_GAMMA:
            a = 1.0 / phi
            t = a * y / mu
            v = w * (a * np.log(t) - t - np.log(y) - gammaln(a))
        elif family == FAMILY_NEGATIVE_BINOMIAL:
            v = w * nbinom_logp(y, mu, param)
        elif family == FAMILY_INVERSE_GAUSSIAN:
            v = w * (-0.5 * np.log(2.0 * np.pi * phi) - 1.5 * np.log(y)
                     - (y - mu) ** 2 / (2.0 * phi * mu * mu * y))
        else:
            v = -0.5 * (np.log(2.0 * np.pi * phi) - np.log(w) + w * (y - mu) ** 2 / phi)
        out[:] = np.where(w != 0.0, v, 0.0)
    return float(np.sum(out))


def row_pass(pattern, templates, u, fixed, y, prior_w, family, link, outputs,
             param=math.nan):
    """NumPy twin of ``PirlsKernel.evaluate`` (one evaluation of the compiled PIRLS):
    η = fixed + ZΛu, ``update`` at η into ``outputs`` (mu, mu_eta, wrkwt, wrkresid,
    devresid), and the cross-products at the new working weights W for the working
    response r = η - fixed + wrkresid: the blocks of Z'WZ (in ``accumulate_blocks``'
    layout), Z'W r and r'W r. Dense and slow.

    Returns (deviance, eta, avals, ztr, xtx).
    """
    from .._linalg import _twins
    z = _twins.dense_z(pattern)
    lam = _twins.dense_lambda(pattern, templates)
    eta = np.asarray(fixed, dtype=np.float64) + z @ (lam @ np.asarray(u, dtype=np.float64))
    dev = update(family, link, eta, y, prior_w, *outputs, param=param)
    w = outputs[2]
    r = eta - fixed + outputs[3]
    avals = _twins.accumulate_blocks(pattern, w)
    return dev, eta, avals, z.T @ (w * r), float(np.sum(w * r * r))


def predicted_modes(codes, z, wrkwt, wrkresid, avals, lam, u, dfixed, dlam):
    """NumPy twin of the warm start of ``PirlsKernel.laplace`` (one scalar term): the
    first-order change of the modes u of the last call (at template λ, with the working
    weights W, residuals ρ and level sums A_l = Σ W z² there) when Xβ + offset moves by
    ``dfixed`` and λ by ``dlam``:

        du_l = -m_l [λ Σ_{i in l} W_i z_i dfixed_i + dlam (½ S_l + λ A_l u_l)],
        m_l = 1/(λ² A_l + 1),  S_l = Σ_{i in l} -2 W_i ρ_i z_i.

    Returns du (length nlev = len(u))."""
    nlev = len(u)
    w, z = np.asarray(wrkwt, float), np.asarray(z, float)
    m = 1.0 / (lam * np.asarray(avals, float) * lam + 1.0)
    s = np.bincount(codes, weights=-2.0 * w * np.asarray(wrkresid, float) * z, minlength=nlev)
    b = np.bincount(codes, weights=w * z * np.asarray(dfixed, float), minlength=nlev)
    return -m * (lam * b + dlam * (0.5 * s + lam * avals * u))

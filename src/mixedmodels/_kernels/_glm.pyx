# cython: language_level=3
"""Per-observation kernels of the GLM response: link, variance, deviance, log density.

Design. Every PIRLS step (and every AGQ node) turns the linear predictor eta into the
quantities that weight the next penalized least-squares solve. For observation i, with
prior weight w_i,

    mu       = g^{-1}(eta)                       (clamped, see below)
    mu_eta   = d mu / d eta                      (|mu_eta| floored at DBL_EPSILON)
    wrkwt    = w * mu_eta^2 / V(mu)
    wrkresid = (y - mu) / mu_eta
    devresid = w * unit deviance(y, mu)          (0 log 0 taken as 0; Bernoulli and
                                                  Binomial: from eta, see below)

``update`` does this in a single pass over typed memoryviews without the GIL, writing
into five caller-allocated arrays, and returns the deviance (the sum of ``devresid``).
``loglik`` writes the per-observation log densities and returns their sum.

Parameter slot. A family may carry one shape parameter of its own that is not the
dispersion phi: the negative binomial theta (NB2, V(mu) = mu + mu^2/theta). It reaches
every kernel (``update``, ``loglik``, ``pirls_blockdiag``, ``agq_deviance``) as one extra
double, ``param``, last in the argument list and defaulting to NaN, so that callers of
the parameter-free families are unchanged; those families never read it. The
negative binomial kernels check once per call, before the loop, that theta is finite
and positive: a family whose theta is still to be estimated (NaN) is refused rather
than producing NaN deviances. theta, not 1/theta, is passed so that the number in the
kernel is the number the user reads; the one division per row it costs is lost among
the logarithms.

Dispatch. The family and the link arrive as two small integer codes and are dispatched
inside the loop by ``switch``-like chains in inline helpers (one for the inverse link,
one each for the clamp, the variance and the unit deviance), rather than through one
hand-written loop per family x link pair: 48 such loops (6 families x 8 links) would
state every formula many times over and multiply what has to be read and tested. The
codes are loop-invariant, so the branches are predicted, but a measurement showed the
dispatch still costing ~10% on the cheapest pair (Bernoulli-logit, 39 vs 35 ms per
10^6 observations). So the loop is written once, as the inline ``_update_loop``, and
``update`` calls it with literal codes for the pairs that dominate in practice
(Bernoulli-logit, Binomial-logit, Poisson-log, and negative binomial-log, the default
of that family), which lets the C compiler fold the dispatch away there (measured:
within noise of the hand-specialised loop), and with the runtime codes for every other
pair. Costs are then dominated by exp/log/erfc. Whether the deviance is taken from eta
(Bernoulli and Binomial under logit, probit, cloglog; see below) is a third literal
argument, decided once per call, so that the runtime-code copy the continuous families
run carries none of the binary families' code (with it inside, the cheapest of those
pairs measured up to ~25% slower).

Binary log probabilities from eta. mu is stored, not 1 - mu, so near 1 it is rounded
(relative error of 1 - mu about 1e-16 / (1 - mu)): log(1 - mu) taken from it would be
off by 7e-8 at logit eta = 20, 2e-3 at 30 and 0.1 at 35, and then capped by the clamp
at log(eps) = -36 where the truth falls like -eta. So for Bernoulli and Binomial with
the logit, probit and cloglog links the deviance and the log density take log(mu) and
log(1 - mu) straight from eta, in forms that keep their relative precision in both
tails (_binary_nlogp: softplus with the |eta| split for logit, log Phi through erfc
and its asymptotic series for probit, -exp(eta) for cloglog), reusing the exponential
or erfc the inverse link has just computed, so that the logit pair still costs one exp
and one log per row, and probit one erfc. The Binomial's y log(y/mu) + (1-y)
log((1-y)/(1-mu)) is y log y + (1-y) log(1-y) - [y log mu + (1-y) log(1-mu)], except
for a proportion strictly inside (0, 1) under the logit link, where the ratios y/mu
and (1-y)/(1-mu) are formed from exp(-|eta|) directly (two logarithms, as before). The
other links of these families (identity, log, inverse, sqrt, inverse square: no tail
along which mu creeps to 1, only the edge of the link's domain) keep the mu-based
forms. ``loglik`` receives mu, not eta: it takes the log probabilities from eta only
when given ``eta`` and ``link``.

Clamps. After the inverse link mu is clamped into the family's domain: [eps, 1 - eps]
for Bernoulli and Binomial, [eps, inf) for Poisson, negative binomial, Gamma and inverse
Gaussian, with eps = DBL_EPSILON; Normal is not clamped. The clamped mu is what is
stored and what the working weights and residuals are computed from (V(mu) = mu(1 - mu)
must stay positive); the logarithms of the Poisson, negative binomial, Gamma and inverse
Gaussian deviances, and of the binary families under the links that take no tail forms,
are taken from it too, and so stay finite however far a trial eta strays during
step-halving. The binary deviances under logit, probit and cloglog do not read the
clamped mu: they stay finite by their own construction (logit: 2|eta| for large |eta|;
probit: eta^2 for large |eta|, with |eta| floored at 1e150 inside the series; cloglog: y
= 0 rows at 2 exp(eta), with eta capped at 700, so 2.0e304 at most). For the logit link
the clamp acts only for |eta| > 36. |mu_eta| is floored at DBL_EPSILON (sign kept) so
that the working residual stays finite where the inverse link is flat
(logit/probit/cloglog tails, log link for eta < -36, sqrt link at eta = 0). An eta
outside the link's domain (eta <= 0 for the inverse-square link) gives NaN, which the
caller must treat as an invalid step.

The NumPy twin of every kernel is in ``_glm_numpy.py``; tests/test_families.py holds the
two together at 1e-10 for every family x link pair, and
tests/test_negative_binomial_family.py for the negative binomial (whose parameter the
family-agnostic tests there do not set).
"""
from libc.math cimport (exp, log, log1p, expm1, sqrt, erfc, lgamma, fabs, isfinite,
                        M_PI, M_SQRT1_2, NAN)
from libc.float cimport DBL_EPSILON
from libc.stdlib cimport malloc, free

from mixedmodels._linalg._blocked cimport blockdiag_factor_c, blockdiag_solve_c

cdef enum:
    FAM_BERNOULLI = 0
    FAM_BINOMIAL = 1
    FAM_POISSON = 2
    FAM_GAMMA = 3
    FAM_INVERSE_GAUSSIAN = 4
    FAM_NORMAL = 5
    FAM_NEGATIVE_BINOMIAL = 6
    N_FAMILIES = 7

cdef enum:
    LNK_LOGIT = 0
    LNK_PROBIT = 1
    LNK_CLOGLOG = 2
    LNK_LOG = 3
    LNK_IDENTITY = 4
    LNK_INVERSE = 5
    LNK_SQRT = 6
    LNK_INVERSE_SQUARE = 7
    N_LINKS = 8

# The codes, visible from Python (families.py and the NumPy twin use these numbers).
FAMILY_BERNOULLI = FAM_BERNOULLI
FAMILY_BINOMIAL = FAM_BINOMIAL
FAMILY_POISSON = FAM_POISSON
FAMILY_GAMMA = FAM_GAMMA
FAMILY_INVERSE_GAUSSIAN = FAM_INVERSE_GAUSSIAN
FAMILY_NORMAL = FAM_NORMAL
FAMILY_NEGATIVE_BINOMIAL = FAM_NEGATIVE_BINOMIAL
LINK_LOGIT = LNK_LOGIT
LINK_PROBIT = LNK_PROBIT
LINK_CLOGLOG = LNK_CLOGLOG
LINK_LOG = LNK_LOG
LINK_IDENTITY = LNK_IDENTITY
LINK_INVERSE = LNK_INVERSE
LINK_SQRT = LNK_SQRT
LINK_INVERSE_SQUARE = LNK_INVERSE_SQUARE

MU_EPS = DBL_EPSILON

cdef double INV_SQRT_2PI = 0.3989422804014327   # 1 / sqrt(2 pi)
cdef double HALF_LOG_2PI = 0.9189385332046728   # log(2 pi) / 2
# Below this argument lgamma's Stirling remainder is computed from lgamma itself; above
# it from its asymptotic series, whose first omitted term is then < 2.3e-16.
cdef double STIRLING_SERIES_FROM = 15.0
# log Phi(x) from its asymptotic series below this x (erfc's value there, ~5e-198, is
# still far from the subnormal range it reaches near x = -37.5); x^2 is kept finite by
# flooring x at -PROBIT_X_FLOOR.
cdef double PROBIT_SERIES_BELOW = -30.0
cdef double PROBIT_X_FLOOR = 1e150
# cloglog: log mu = eta - exp(eta)/2 below this eta; log(1 - mu) = -exp(eta) is held at
# its value at this cap above it (-1.0e304; exp overflows from eta = 709.8 on).
cdef double CLOGLOG_SERIES_BELOW = -30.0
cdef double CLOGLOG_ETA_CAP = 700.0


cdef inline double _linkinv(int link, double eta, double* mu_eta,
                            double* aux) noexcept nogil:
    """mu = g^{-1}(eta); writes d mu / d eta (unclamped) into mu_eta, and into aux what
    the binary log probabilities reuse (see _binary_nlogp): exp(-|eta|) for logit, the
    smaller tail Phi(-|eta|) for probit, exp(eta) for cloglog; aux is not written for
    the other links."""
    cdef double e, t
    if link == LNK_LOGIT:
        # e = exp(-|eta|) <= 1 never overflows
        e = exp(-fabs(eta))
        aux[0] = e
        t = 1.0 + e
        mu_eta[0] = e / (t * t)
        return 1.0 / t if eta >= 0.0 else e / t
    elif link == LNK_PROBIT:
        mu_eta[0] = INV_SQRT_2PI * exp(-0.5 * eta * eta)
        # one erfc, for the smaller tail, which keeps its relative precision (aux); mu =
        # 1 - t above 0 is within an eps or so, as erfc(-eta/sqrt 2)/2 was
        t = 0.5 * erfc(fabs(eta) * M_SQRT1_2)
        aux[0] = t
        return t if eta <= 0.0 else 1.0 - t
    elif link == LNK_CLOGLOG:
        e = exp(eta)
        aux[0] = e
        mu_eta[0] = exp(eta - e)
        return -expm1(-e)
    elif link == LNK_LOG:
        e = exp(eta)
        mu_eta[0] = e
        return e
    elif link == LNK_IDENTITY:
        mu_eta[0] = 1.0
        return eta
    elif link == LNK_INVERSE:
        mu_eta[0] = -1.0 / (eta * eta)
        return 1.0 / eta
    elif link == LNK_SQRT:
        mu_eta[0] = 2.0 * eta
        return eta * eta
    else:  # LNK_INVERSE_SQUARE
        t = sqrt(eta)
        mu_eta[0] = -0.5 / (eta * t)
        return 1.0 / t


cdef inline double _clamp_mu(int family, double mu) noexcept nogil:
    """Keep mu inside the family's domain (comparisons leave NaN as NaN)."""
    if family == FAM_BERNOULLI or family == FAM_BINOMIAL:
        if mu < DBL_EPSILON:
            return DBL_EPSILON
        if mu > 1.0 - DBL_EPSILON:
            return 1.0 - DBL_EPSILON
    elif family != FAM_NORMAL:
        if mu < DBL_EPSILON:
            return DBL_EPSILON
    return mu


cdef inline double _variance(int family, double mu, double param) noexcept nogil:
    if family == FAM_BERNOULLI or family == FAM_BINOMIAL:
        return mu * (1.0 - mu)
    elif family == FAM_POISSON:
        return mu
    elif family == FAM_GAMMA:
        return mu * mu
    elif family == FAM_INVERSE_GAUSSIAN:
        return mu * mu * mu
    elif family == FAM_NEGATIVE_BINOMIAL:
        return mu * (1.0 + mu / param)
    else:  # FAM_NORMAL
        return 1.0


cdef inline double _bernoulli_logp(double y, double mu) noexcept nogil:
    """y log(mu) + (1 - y) log(1 - mu), with 0 log 0 = 0."""
    cdef double t = 0.0
    if y != 0.0:
        t += y * log(mu)
    if y != 1.0:
        t += (1.0 - y) * log1p(-mu)
    return t


cdef inline bint _tail_link(int link) noexcept nogil:
    """The links whose binary log probabilities are taken from eta (_binary_nlogp)."""
    return link == LNK_LOGIT or link == LNK_PROBIT or link == LNK_CLOGLOG


cdef inline double _log_ndtr_lower(double x, double p) noexcept nogil:
    """log Phi(x) for x <= 0, given p = Phi(x) (computed through erfc, to full relative
    precision until it nears the subnormal range at x = -37.5)."""
    cdef double t
    if x >= PROBIT_SERIES_BELOW:
        return log(p)
    # Phi(x) = phi(x) / (-x) * (1 - t + 3t^2 - 15t^3 + ...), t = 1/x^2 <= 1/900, whose
    # terms (2k-1)!! t^k are below 1e-19 after the eighth; x is floored so that x^2
    # stays finite (the value is then -5e299 instead of the true -x^2/2).
    if x < -PROBIT_X_FLOOR:
        x = -PROBIT_X_FLOOR
    t = 1.0 / (x * x)
    t = t * (-1.0 + t * (3.0 + t * (-15.0 + t * (105.0 + t * (-945.0 + t * (10395.0
            + t * (-135135.0 + t * 2027025.0)))))))
    return -0.5 * x * x - log(-x) - HALF_LOG_2PI + log1p(t)


cdef inline double _logit_nlogp(double a, double b, double eta, double e) noexcept nogil:
    """_binary_nlogp of the logit link; e = exp(-|eta|)."""
    # a (L + max(-eta, 0)) + b (L + max(eta, 0)), L = log1p(e): one of the maxima is 0
    # and the other |eta|, so this is (a + b) L + (b if eta > 0 else a) |eta|, written
    # with selects rather than branches on a and b (which follow y, unpredictably); a
    # zero factor contributes 0 even at an infinite eta
    cdef double x = b if eta > 0.0 else a
    return (a + b) * log1p(e) + (x * fabs(eta) if x != 0.0 else 0.0)


cdef inline double _probit_nlogp(double a, double b, double eta, double p) noexcept nogil:
    """_binary_nlogp of the probit link; p = Phi(-|eta|), the probability of the
    outcome that eta makes unlikely."""
    # branches on whether that outcome has a weight (for a fitted model, mostly not)
    # rather than on a and b, which follow y
    cdef double x = b if eta > 0.0 else a       # the unlikely outcome's weight
    cdef double g = a if eta > 0.0 else b       # the likely one's
    cdef double t = 0.0
    if g != 0.0:
        t -= g * log1p(-p)
    if x != 0.0:
        t -= x * _log_ndtr_lower(-fabs(eta), p)
    return t


cdef inline double _cloglog_nlogp(double a, double b, double eta, double mu,
                                  double x) noexcept nogil:
    """_binary_nlogp of the cloglog link; x = exp(eta), mu the unclamped inverse link."""
    cdef double t = 0.0, lp
    if a != 0.0:
        if eta > 0.0:
            lp = log1p(-exp(-x))
        elif eta >= CLOGLOG_SERIES_BELOW:
            lp = log(mu)
        else:
            lp = eta - 0.5 * x
        t -= a * lp
    if b != 0.0:
        if eta > CLOGLOG_ETA_CAP:
            x = exp(CLOGLOG_ETA_CAP)
        t += b * x
    return t


cdef inline double _binary_nlogp(int link, double a, double b, double eta, double mu,
                                 double aux) noexcept nogil:
    """-[a log(mu) + b log(1 - mu)] straight from eta, a term left out where its factor
    is 0 (a sum of terms >= 0 for a, b >= 0, so a zero deviance is +0).

    For the links of _tail_link; mu is the unclamped inverse link at eta and aux what
    _linkinv leaves there (both reused only where no rounding near 1 has touched them).
    Every logarithm keeps its relative precision however far eta goes:

    - logit: with L = log1p(exp(-|eta|)), log mu = -(L + max(-eta, 0)) and
      log(1 - mu) = -(L + max(eta, 0)) (softplus, split at eta = 0). One log1p per row,
      as the mu-based form had one log.
    - probit: with aux = Phi(-|eta|), the smaller of mu and 1 - mu, the smaller one's
      logarithm is log(aux) (for |eta| > -PROBIT_SERIES_BELOW the asymptotic series:
      _log_ndtr_lower) and the larger one's is log1p(-aux). No erfc beyond the inverse
      link's.
    - cloglog: log(1 - mu) = -exp(eta) exactly, with eta capped at CLOGLOG_ETA_CAP so
      that it stays finite; log mu = log1p(-exp(-exp(eta))) above eta = 0, log(mu) for
      CLOGLOG_SERIES_BELOW <= eta <= 0, and eta - exp(eta)/2 below (the next term,
      exp(2 eta)/24, is below 1e-27).
    """
    if link == LNK_LOGIT:
        return _logit_nlogp(a, b, eta, aux)
    elif link == LNK_PROBIT:
        return _probit_nlogp(a, b, eta, aux)
    return _cloglog_nlogp(a, b, eta, mu, aux)


cdef inline double _binary_sat(double y) noexcept nogil:
    """y log y + (1 - y) log(1 - y), 0 log 0 = 0: the Binomial's saturated part."""
    if y == 0.0 or y == 1.0:
        return 0.0
    return y * log(y) + (1.0 - y) * log1p(-y)


cdef inline double _unit_deviance(int family, double y, double mu,
                                 double param) noexcept nogil:
    cdef double t, r
    if family == FAM_BERNOULLI:
        return -2.0 * _bernoulli_logp(y, mu)
    elif family == FAM_BINOMIAL:
        t = 0.0
        if y != 0.0:
            t += y * log(y / mu)
        if y != 1.0:
            t += (1.0 - y) * log((1.0 - y) / (1.0 - mu))
        return 2.0 * t
    elif family == FAM_POISSON:
        t = y * log(y / mu) if y != 0.0 else 0.0
        return 2.0 * (t - (y - mu))
    elif family == FAM_GAMMA:
        return -2.0 * (log(y / mu) - (y - mu) / mu)
    elif family == FAM_INVERSE_GAUSSIAN:
        r = y - mu
        return r * r / (y * mu * mu)
    elif family == FAM_NEGATIVE_BINOMIAL:
        # 2 [y log(y/mu) - (y + theta) log((y + theta)/(mu + theta))]. With
        # r = (y - mu)/(mu + theta) the second logarithm is log1p(r), which keeps its
        # digits when theta dwarfs y and mu (the Poisson limit); near r = -1 (y + theta
        # far below mu + theta) 1 + r would lose them, and the ratio itself is exact.
        t = y * log(y / mu) if y != 0.0 else 0.0
        r = (y - mu) / (mu + param)
        r = log1p(r) if r > -0.5 else log((y + param) / (mu + param))
        return 2.0 * (t - (y + param) * r)
    else:  # FAM_NORMAL
        r = y - mu
        return r * r


cdef inline bint _from_eta(int family, int link) noexcept nogil:
    """Whether the unit deviance is taken from eta (_binary_deviance_eta): Bernoulli
    and Binomial with a link of _tail_link. Loop-invariant: callers decide it once."""
    return (family == FAM_BERNOULLI or family == FAM_BINOMIAL) and _tail_link(link)


cdef inline double _binary_deviance_eta(int family, int link, double y, double eta,
                                        double mu_raw, double aux) noexcept nogil:
    """The unit deviance of Bernoulli or Binomial at eta, for a link of _tail_link,
    from the log probabilities of _binary_nlogp (mu_raw, aux: _linkinv's output at
    eta, unclamped)."""
    if family == FAM_BERNOULLI:
        return 2.0 * _binary_nlogp(link, y, 1.0 - y, eta, mu_raw, aux)
    if link == LNK_LOGIT and y != 0.0 and y != 1.0:
        # y log(y/mu) + (1-y) log((1-y)/(1-mu)) with 1/mu = (1 + e) exp(max(-eta, 0))
        # and 1/(1-mu) = (1 + e) exp(max(eta, 0)), e = exp(-|eta|): two logarithms per
        # row, as the mu-based form, each of a ratio computed to full relative precision
        return 2.0 * (y * (log(y * (1.0 + aux)) + (-eta if eta < 0.0 else 0.0))
                      + (1.0 - y) * (log((1.0 - y) * (1.0 + aux))
                                     + (eta if eta > 0.0 else 0.0)))
    # split into the saturated part and the log probabilities
    return 2.0 * (_binary_sat(y) + _binary_nlogp(link, y, 1.0 - y, eta, mu_raw, aux))


cdef inline double _stirling_rem(double x) noexcept nogil:
    """lgamma(x) - [(x - 1/2) log x - x + log(2 pi)/2], for x > 0.

    The negative binomial density needs lgamma(y + theta) - lgamma(theta), which for
    large theta is the difference of two numbers near theta log theta; written through
    this remainder it becomes a sum of terms of the size of the result.
    """
    cdef double s, s2
    if x < STIRLING_SERIES_FROM:
        return lgamma(x) - (x - 0.5) * log(x) + x - HALF_LOG_2PI
    s = 1.0 / x
    s2 = s * s
    # 1/(12x) - 1/(360x^3) + 1/(1260x^5) - 1/(1680x^7) + 1/(1188x^9)
    return s * (1.0 / 12.0 - s2 * (1.0 / 360.0 - s2 * (1.0 / 1260.0
                - s2 * (1.0 / 1680.0 - s2 / 1188.0))))


cdef inline double _nbinom_logp(double y, double mu, double theta,
                                double c) noexcept nogil:
    """log P(y) of NB2 with mean mu and shape theta; c = _stirling_rem(theta).

    lgamma(y + theta) - lgamma(theta) - lgamma(y + 1) + theta log(theta/(theta + mu))
    + y log(mu/(theta + mu)), with the two lgamma of theta and the log theta terms
    cancelled by hand (see _stirling_rem), so that it keeps its precision as theta
    grows and tends to the Poisson log probability.
    """
    cdef double t = (y + theta) * log1p(mu / theta)
    if y == 0.0:
        return -t
    return ((y + theta - 0.5) * log1p(y / theta) - y + _stirling_rem(y + theta) - c
            + y * log(mu) - t - lgamma(y + 1.0))


cdef inline double _logdens_const(int family, double phi, double param) noexcept nogil:
    """The part of the log density that depends on phi (or param) only, computed once
    per call."""
    if family == FAM_NEGATIVE_BINOMIAL:
        return _stirling_rem(param)
    elif family == FAM_GAMMA:
        return lgamma(1.0 / phi)
    elif family == FAM_INVERSE_GAUSSIAN:
        return -0.5 * log(2.0 * M_PI * phi)
    elif family == FAM_NORMAL:
        return log(2.0 * M_PI * phi)
    return 0.0


cdef inline double _logdens(int family, double y, double mu, double w, double phi,
                            double param, double c) noexcept nogil:
    """Log density of one observation with prior weight w > 0, dispersion phi and
    family parameter param; c = _logdens_const(family, phi, param)."""
    cdef double t, k, nk, a, r
    if family == FAM_BERNOULLI:
        return w * _bernoulli_logp(y, mu)
    elif family == FAM_BINOMIAL:
        # n = w trials, k = n y successes; log C(n, k) through lgamma
        k = w * y
        nk = w - k
        t = lgamma(w + 1.0) - lgamma(k + 1.0) - lgamma(nk + 1.0)
        if k != 0.0:
            t += k * log(mu)
        if nk != 0.0:
            t += nk * log1p(-mu)
        return t
    elif family == FAM_POISSON:
        t = y * log(mu) if y != 0.0 else 0.0
        return w * (t - mu - lgamma(y + 1.0))
    elif family == FAM_GAMMA:
        # shape a = 1/phi, scale mu/a; weight multiplies the log density
        a = 1.0 / phi
        t = a * y / mu
        return w * (a * log(t) - t - log(y) - c)
    elif family == FAM_INVERSE_GAUSSIAN:
        # mean mu, shape lambda = 1/phi; weight multiplies the log density
        r = y - mu
        return w * (c - 1.5 * log(y) - r * r / (2.0 * phi * mu * mu * y))
    elif family == FAM_NEGATIVE_BINOMIAL:
        # weight multiplies the log density, as for Poisson
        return w * _nbinom_logp(y, mu, param, c)
    else:  # FAM_NORMAL: variance phi / w
        r = y - mu
        return -0.5 * (c - log(w) + w * r * r / phi)


cdef inline double _update_loop(int family, int link, bint from_eta, double param,
                                const double[::1] eta,
                                const double[::1] y, const double[::1] prior_w,
                                bint weighted, double[::1] mu, double[::1] mu_eta,
                                double[::1] wrkwt, double[::1] wrkresid,
                                double[::1] devresid) noexcept nogil:
    cdef Py_ssize_t n = eta.shape[0], i
    cdef double m, mr, me, aux, wi, yi, ei, d, dev = 0.0
    for i in range(n):
        yi = y[i]
        ei = eta[i]
        aux = 0.0   # (written by _linkinv for some links only: no value across rows)
        wi = prior_w[i] if weighted else 1.0
        mr = _linkinv(link, ei, &me, &aux)
        m = _clamp_mu(family, mr)
        if fabs(me) < DBL_EPSILON:
            me = -DBL_EPSILON if me < 0.0 else DBL_EPSILON
        mu[i] = m
        mu_eta[i] = me
        wrkwt[i] = wi * me * me / _variance(family, m, param)
        wrkresid[i] = (yi - m) / me
        if from_eta:
            d = wi * _binary_deviance_eta(family, link, yi, ei, mr, aux)
        else:
            d = wi * _unit_deviance(family, yi, m, param)
        devresid[i] = d
        dev += d
    return dev


cdef inline double _update_dispatch(int family, int link, double param,
                                    const double[::1] eta,
                                    const double[::1] y, const double[::1] prior_w,
                                    bint weighted, double[::1] mu, double[::1] mu_eta,
                                    double[::1] wrkwt, double[::1] wrkresid,
                                    double[::1] devresid) noexcept nogil:
    # the common pairs get a copy of the loop with the codes as constants; the others
    # one of two copies, with and without the binary deviances from eta, so that the
    # copy the continuous families run holds no code of the binary ones
    if family == FAM_BERNOULLI and link == LNK_LOGIT:
        return _update_loop(FAM_BERNOULLI, LNK_LOGIT, True, param, eta, y, prior_w,
                            weighted, mu, mu_eta, wrkwt, wrkresid, devresid)
    if family == FAM_BINOMIAL and link == LNK_LOGIT:
        return _update_loop(FAM_BINOMIAL, LNK_LOGIT, True, param, eta, y, prior_w,
                            weighted, mu, mu_eta, wrkwt, wrkresid, devresid)
    if family == FAM_POISSON and link == LNK_LOG:
        return _update_loop(FAM_POISSON, LNK_LOG, False, param, eta, y, prior_w,
                            weighted, mu, mu_eta, wrkwt, wrkresid, devresid)
    if family == FAM_NEGATIVE_BINOMIAL and link == LNK_LOG:
        return _update_loop(FAM_NEGATIVE_BINOMIAL, LNK_LOG, False, param, eta, y, prior_w,
                            weighted, mu, mu_eta, wrkwt, wrkresid, devresid)
    if _from_eta(family, link):
        return _update_loop(family, link, True, param, eta, y, prior_w, weighted,
                            mu, mu_eta, wrkwt, wrkresid, devresid)
    return _update_loop(family, link, False, param, eta, y, prior_w, weighted,
                        mu, mu_eta, wrkwt, wrkresid, devresid)


cdef int _check_codes(int family, int link, double param) except -1:
    if family < 0 or family >= N_FAMILIES:
        raise ValueError(f"unknown family code {family}")
    if link < 0 or link >= N_LINKS:
        raise ValueError(f"unknown link code {link}")
    if family == FAM_NEGATIVE_BINOMIAL and not (param > 0.0 and isfinite(param)):
        raise ValueError(
            f"the negative binomial theta must be a finite positive number, got {param} "
            "(a family whose theta is to be estimated needs family.with_theta(value) "
            "before its kernels are called)")
    return 0


def update(int family, int link, const double[::1] eta, const double[::1] y,
           const double[::1] prior_w, double[::1] mu, double[::1] mu_eta,
           double[::1] wrkwt, double[::1] wrkresid, double[::1] devresid,
           double param=NAN):
    """From eta to mu, mu_eta, working weights and residuals and deviance residuals.

    Parameters
    ----------
    family, link : int
        Family and link codes (``FAMILY_*``, ``LINK_*`` in this module).
    eta, y : const double[::1], length n
        Linear predictor and response.
    prior_w : const double[::1], length n or 0
        Prior weights; an empty array means unit weights.
    mu, mu_eta, wrkwt, wrkresid, devresid : double[::1], length n
        Outputs, overwritten.
    param : float
        The family's own parameter (negative binomial: theta, finite and > 0);
        ignored by the other families.

    Returns
    -------
    float
        The deviance, sum(devresid).

    Notes
    -----
    NumPy (see ``_glm_numpy.update``)::

        mu = clamp(ginv(eta)); me = floor_abs(dmu_deta(eta), eps)
        wrkwt = w * me**2 / V(mu); wrkresid = (y - mu) / me
        devresid = w * unit_deviance(y, mu)    (binary families, logit/probit/cloglog:
                                                from eta, see the module docstring)
    """
    cdef Py_ssize_t n = eta.shape[0]
    cdef bint weighted = prior_w.shape[0] > 0
    cdef double dev
    _check_codes(family, link, param)
    if (y.shape[0] != n or mu.shape[0] != n or mu_eta.shape[0] != n
            or wrkwt.shape[0] != n or wrkresid.shape[0] != n or devresid.shape[0] != n
            or (weighted and prior_w.shape[0] != n)):
        raise ValueError("update: all arrays must have the length of eta "
                         "(prior_w may be empty for unit weights)")
    with nogil:
        dev = _update_dispatch(family, link, param, eta, y, prior_w, weighted,
                               mu, mu_eta, wrkwt, wrkresid, devresid)
    return dev


cdef inline double _binary_logdens_eta(int family, int link, double y, double w,
                                      double eta) noexcept nogil:
    """_logdens of Bernoulli or Binomial with the log probabilities taken from eta (a
    link of _tail_link), not from a mean rounded near 0 or 1."""
    cdef double me, aux = 0.0, m, k
    m = _linkinv(link, eta, &me, &aux)
    if family == FAM_BERNOULLI:
        return -w * _binary_nlogp(link, y, 1.0 - y, eta, m, aux)
    k = w * y
    return (lgamma(w + 1.0) - lgamma(k + 1.0) - lgamma(w - k + 1.0)
            - _binary_nlogp(link, k, w - k, eta, m, aux))


def loglik(int family, const double[::1] y, const double[::1] mu,
           const double[::1] prior_w, double phi, double[::1] out, double param=NAN,
           int link=-1, const double[::1] eta=None):
    """Per-observation log densities at mean mu and dispersion phi.

    Parameters
    ----------
    family : int
        Family code.
    y, mu : const double[::1], length n
        Response and means (used as given: no clamping here).
    prior_w : const double[::1], length n or 0
        Prior weights (Binomial: numbers of trials); empty means unit weights.
    phi : float
        Dispersion, > 0; ignored by Bernoulli, Binomial, Poisson and negative binomial.
    out : double[::1], length n
        Output, overwritten.
    param : float
        The family's own parameter (negative binomial: theta); ignored by the others.
    link : int, optional
        Link code, read only with `eta`.
    eta : const double[::1], length n, optional
        The linear predictor at which mu was computed. For Bernoulli and Binomial with
        the logit, probit or cloglog link, the log probabilities log(mu) and log(1 - mu)
        are then taken from eta in their stable forms (see ``_binary_nlogp``), and
        `mu` is not read: a mean rounded near 1 (or clamped at eps or 1 - eps by
        ``update``) would otherwise cap log(1 - mu) at about -36 where the truth falls
        like -eta. Ignored by every other family and link.

    Returns
    -------
    float
        The log-likelihood, sum(out).

    Notes
    -----
    An observation with weight 0 contributes 0. See ``Family.loglik`` for the
    densities; NumPy in ``_glm_numpy.loglik``.
    """
    cdef Py_ssize_t n = y.shape[0], i
    cdef bint weighted = prior_w.shape[0] > 0
    cdef bint from_eta = False
    cdef double wi, v, c, total = 0.0
    _check_codes(family, 0, param)
    if eta is not None:
        _check_codes(family, link, param)
        if eta.shape[0] != n:
            raise ValueError("loglik: eta must have the length of y")
        from_eta = ((family == FAM_BERNOULLI or family == FAM_BINOMIAL)
                    and _tail_link(link))
    if (family != FAM_BERNOULLI and family != FAM_BINOMIAL and family != FAM_POISSON
            and family != FAM_NEGATIVE_BINOMIAL):
        if not phi > 0.0:
            raise ValueError(f"dispersion phi must be positive, got {phi}")
    if mu.shape[0] != n or out.shape[0] != n or (weighted and prior_w.shape[0] != n):
        raise ValueError("loglik: all arrays must have the length of y "
                         "(prior_w may be empty for unit weights)")
    with nogil:
        c = _logdens_const(family, phi, param)
        for i in range(n):
            wi = prior_w[i] if weighted else 1.0
            if wi == 0.0:
                v = 0.0
            elif from_eta:
                v = _binary_logdens_eta(family, link, y[i], wi, eta[i])
            else:
                v = _logdens(family, y[i], mu[i], wi, phi, param, c)
            out[i] = v
            total += v
    return total


def agq_deviance(int family, int link, const double[::1] fixed, const double[::1] zlam,
                 const int[::1] codes, const double[::1] y, const double[::1] prior_w,
                 const double[::1] u, const double[::1] sd, const double[::1] nodes,
                 const double[::1] weights, double[::1] devc0, double[::1] devc,
                 double[::1] mult, double param=NAN):
    """Adaptive Gauss-Hermite deviance of a model with one scalar random-effects term.

    Row i belongs to level codes[i]; its linear predictor at random effect v of that
    level is fixed[i] + zlam[i] * v (zlam = the term's column times λ). With the modes
    u, the scales sd = 1/diag(L) and the standard-normal nodes and weights, it fills
    devc0 (per level: u² + the level's deviance at the mode), mult (the quadrature sum)
    and returns  Σ devc0 - 2 Σ (log mult + log sd).  A node at 0 reuses devc0.
    ``param`` is the family's own parameter (negative binomial theta), as in ``update``.
    See mixedmodels/_agq.py for the derivation; agq_deviance_numpy there is the twin.
    """
    _check_codes(family, link, param)
    cdef Py_ssize_t n = fixed.shape[0], nlev = u.shape[0], i, j, k
    cdef double me, m, e, aux = 0.0, z, total = 0.0
    cdef bint weighted = prior_w.shape[0] > 0
    cdef bint from_eta = _from_eta(family, link)
    if zlam.shape[0] != n or codes.shape[0] != n or y.shape[0] != n:
        raise ValueError("agq_deviance: per-observation arrays differ in length")
    if sd.shape[0] != nlev or devc0.shape[0] != nlev or devc.shape[0] != nlev or mult.shape[0] != nlev:
        raise ValueError("agq_deviance: per-level arrays differ in length")
    with nogil:
        for j in range(nlev):
            devc0[j] = u[j] * u[j]
            mult[j] = 0.0
        for i in range(n):
            j = codes[i]
            e = fixed[i] + zlam[i] * u[j]
            m = _linkinv(link, e, &me, &aux)
            devc0[j] += ((prior_w[i] if weighted else 1.0)
                         * (_binary_deviance_eta(family, link, y[i], e, m, aux) if from_eta
                            else _unit_deviance(family, y[i], _clamp_mu(family, m), param)))
        for k in range(nodes.shape[0]):
            z = nodes[k]
            if z == 0.0:
                for j in range(nlev):
                    mult[j] += weights[k]
                continue
            for j in range(nlev):
                devc[j] = (u[j] + z * sd[j]) * (u[j] + z * sd[j])
            for i in range(n):
                j = codes[i]
                e = fixed[i] + zlam[i] * (u[j] + z * sd[j])
                m = _linkinv(link, e, &me, &aux)
                devc[j] += ((prior_w[i] if weighted else 1.0)
                            * (_binary_deviance_eta(family, link, y[i], e, m, aux)
                               if from_eta
                               else _unit_deviance(family, y[i], _clamp_mu(family, m),
                                                   param)))
            for j in range(nlev):
                mult[j] += weights[k] * exp((z * z - devc[j] + devc0[j]) / 2.0)
        for j in range(nlev):
            total += devc0[j] - 2.0 * (log(mult[j]) + log(sd[j]))
    return total


cdef inline double _agq_row(int family, int link, bint from_eta, double y, double w, double e,
                            double *dev1) noexcept nogil:
    # the weighted unit deviance at eta = e, formed as agq_deviance forms it, and (dev1)
    # its derivative in eta for a canonical link, -2 w (y - mu) with mu clamped
    cdef double me, m, aux = 0.0, d
    m = _linkinv(link, e, &me, &aux)
    d = w * (_binary_deviance_eta(family, link, y, e, m, aux) if from_eta
             else _unit_deviance(family, y, _clamp_mu(family, m), NAN))
    dev1[0] = -2.0 * w * (y - _clamp_mu(family, m))
    return d


def agq_value_gradient(int family, int link, const double[::1] fixed,
                       const double[::1] zlam, const double[::1] z, const int[::1] codes,
                       const double[::1] y, const double[::1] prior_w, const double[::1] u,
                       const double[::1] sd, const double[::1] nodes,
                       const double[::1] weights, double theta, const double[::1] wrkwt,
                       const double[::1] mu, double[:, ::1] pi, double[:, ::1] gz,
                       double[:, ::1] dev1, double[::1] r):
    """``agq_deviance`` and its gradient over (β̃, θ), at the modes PIRLS has left.

    For the canonical links of Bernoulli, Binomial (logit) and Poisson (log) only (so no
    ``param``: these families have none); the derivation is in
    mixedmodels/_agq_gradient.py, whose ``value_and_gradient_numpy``
    is the twin. The inputs are agq_deviance's, and θ, the term's column z (zlam = θ z)
    and the working weights and means at the modes (wrkwt, mu: the state PIRLS left).
    pi, gz (K-by-nlev) and dev1 (K-by-n) are scratch; on return pi holds the normalized
    node weights π_jk and gz the sums Σ_{i in j} dev'_ik z_i. Fills r with the row
    weights of the β̃ gradient (dD/dβ̃ = X̃'r) and returns (value, dD/dθ); the value is
    formed exactly as ``agq_deviance`` forms it, a node at 0 reusing the modes.
    """
    _check_codes(family, link, NAN)
    if not ((family == FAM_BERNOULLI or family == FAM_BINOMIAL) and link == LNK_LOGIT
            or family == FAM_POISSON and link == LNK_LOG):
        raise ValueError("agq_value_gradient: only Bernoulli/Binomial-logit and Poisson-log")
    cdef Py_ssize_t n = fixed.shape[0], nlev = u.shape[0], K = nodes.shape[0], i, j, k
    cdef Py_ssize_t k0 = -1
    cdef double zk, t, total = 0.0, w, d1, v, s, dp, B, C, EM, gtheta = 0.0
    cdef bint weighted = prior_w.shape[0] > 0
    cdef bint from_eta = _from_eta(family, link)
    cdef bint logit = link == LNK_LOGIT
    if (zlam.shape[0] != n or z.shape[0] != n or codes.shape[0] != n or y.shape[0] != n
            or wrkwt.shape[0] != n or mu.shape[0] != n or r.shape[0] != n
            or dev1.shape[0] != K or dev1.shape[1] != n):
        raise ValueError("agq_value_gradient: per-observation arrays differ in length")
    if (sd.shape[0] != nlev or pi.shape[0] != K or pi.shape[1] != nlev
            or gz.shape[0] != K or gz.shape[1] != nlev or weights.shape[0] != K):
        raise ValueError("agq_value_gradient: per-level arrays differ in length")
    for k in range(K):
        if nodes[k] == 0.0:
            k0 = k
    # per level: d(û), d at the current node, the quadrature sum, Σ dev'(η̂) z, Σ W z²,
    # Σ W' z³, and the two coefficients of r_i = Σ_k π dev'_ik + ca W_i z_i + cb W'_i z_i²
    cdef double *lev = <double *> malloc(8 * nlev * sizeof(double))
    if lev == NULL:
        raise MemoryError()
    cdef double *devc0 = lev
    cdef double *devc = lev + nlev
    cdef double *mult = lev + 2 * nlev
    cdef double *gz0 = lev + 3 * nlev
    cdef double *wz2 = lev + 4 * nlev
    cdef double *t3 = lev + 5 * nlev
    cdef double *ca = lev + 6 * nlev
    cdef double *cb = lev + 7 * nlev
    with nogil:
        for j in range(nlev):
            devc0[j] = u[j] * u[j]
            mult[j] = 0.0
            gz0[j] = 0.0
            wz2[j] = 0.0
            t3[j] = 0.0
        # the modes; r holds W' = dW/dη until the last pass
        for i in range(n):
            j = codes[i]
            w = prior_w[i] if weighted else 1.0
            devc0[j] += _agq_row(family, link, from_eta, y[i], w, fixed[i] + zlam[i] * u[j],
                                 &d1)
            gz0[j] += d1 * z[i]
            if k0 >= 0:
                dev1[k0, i] = d1
            r[i] = wrkwt[i] * (1.0 - 2.0 * mu[i]) if logit else wrkwt[i]
            wz2[j] += wrkwt[i] * z[i] * z[i]
            t3[j] += r[i] * z[i] * z[i] * z[i]
        for k in range(K):
            zk = nodes[k]
            if k == k0:
                for j in range(nlev):
                    mult[j] += weights[k]
                    pi[k, j] = weights[k]
                    gz[k, j] = gz0[j]
                continue
            for j in range(nlev):
                devc[j] = (u[j] + zk * sd[j]) * (u[j] + zk * sd[j])
                gz[k, j] = 0.0
            for i in range(n):
                j = codes[i]
                w = prior_w[i] if weighted else 1.0
                devc[j] += _agq_row(family, link, from_eta, y[i], w,
                                    fixed[i] + zlam[i] * (u[j] + zk * sd[j]), &d1)
                dev1[k, i] = d1
                gz[k, j] += d1 * z[i]
            for j in range(nlev):
                t = weights[k] * exp((zk * zk - devc[j] + devc0[j]) / 2.0)
                mult[j] += t
                pi[k, j] = t
        for j in range(nlev):
            total += devc0[j] - 2.0 * (log(mult[j]) + log(sd[j]))
        # the chain rule per level (_agq_gradient.py): with d'(v) = 2v + θ gz,
        # A = Σ π d'(v), B = -2/s + Σ π z d'(v), C = -s³B/2, E/M = (A + C θ³ T) s²
        for j in range(nlev):
            ca[j] = 0.0
            cb[j] = 0.0
        for k in range(K):
            for j in range(nlev):
                pi[k, j] /= mult[j]
                v = u[j] + nodes[k] * sd[j]
                dp = 2.0 * v + theta * gz[k, j]
                ca[j] += pi[k, j] * dp
                cb[j] += pi[k, j] * nodes[k] * dp
                gtheta += pi[k, j] * v * gz[k, j]
        for j in range(nlev):
            s = sd[j]
            B = cb[j] - 2.0 / s
            C = -0.5 * s * s * s * B
            EM = (ca[j] + C * theta * theta * theta * t3[j]) * s * s
            gtheta += (-EM * (theta * u[j] * wz2[j] + 0.5 * gz0[j])
                       + C * (2.0 * theta * wz2[j] + theta * theta * u[j] * t3[j]))
            ca[j] = -EM * theta
            cb[j] = C * theta * theta
        for i in range(n):
            j = codes[i]
            t = 0.0
            for k in range(K):
                t += pi[k, j] * dev1[k, i]
            r[i] = t + (ca[j] * wrkwt[i] + cb[j] * r[i] * z[i]) * z[i]
    free(lev)
    return total, gtheta


cdef void _eta_blockdiag(const double[::1] fixed, const double[:, ::1] z, const int[::1] codes,
                         const double *lam, int k, Py_ssize_t nlev, const double *u,
                         double *b, double[::1] eta) noexcept nogil:
    # eta <- fixed + Z Λ u for one term: b = T u level by level, then one pass over rows
    cdef Py_ssize_t l, i, j
    cdef int a, e
    cdef double s
    for l in range(nlev):
        for a in range(k):
            s = 0.0
            for e in range(a + 1):
                s += lam[a + e * k] * u[l * k + e]
            b[l * k + a] = s
    for i in range(fixed.shape[0]):
        j = codes[i]
        s = fixed[i]
        for a in range(k):
            s += z[i, a] * b[j * k + a]
        eta[i] = s


cdef inline double _sumsq(const double *u, Py_ssize_t m) noexcept nogil:
    cdef double s = 0.0
    cdef Py_ssize_t i
    for i in range(m):
        s += u[i] * u[i]
    return s


def pirls_blockdiag(int family, int link, const double[::1] fixed, const double[:, ::1] z,
                    const int[::1] codes, const double[::1] y, const double[::1] prior_w,
                    const double[::1] lam, double[::1] u, double[::1] lblocks,
                    double[::1] eta, double[::1] mu, double[::1] mu_eta, double[::1] wrkwt,
                    double[::1] wrkresid, double[::1] devresid,
                    double tol=1e-13, int maxiter=100, int max_halving=30,
                    double step_tol=1e-9, double param=NAN):
    """PIRLS over u for a model with one random-effects term, β held fixed.

    Parameters
    ----------
    fixed : Xβ + offset.  z : the term's columns (n-by-k).  codes : level of each row.
    lam : the term's template T (k-by-k, column-major).  u : start, overwritten by the
    modes.  lblocks : out, the factor chol(T'A_l T + I) per level at the modes (the
    working weights evaluated at the modes).  eta ... devresid : out, the response side
    at the modes.  param : the family's own parameter (negative binomial theta), as in
    ``update``.

    Returns
    -------
    (logdet, deviance, iterations, converged) with logdet = Σ log diag(L).

    Notes
    -----
    Each iteration solves (Λ'Z'WZΛ + I) u = Λ'Z'W(ZΛu + wrkresid) level by level and
    halves a step that raises the penalized deviance Σ dev_i + ||u||². The same
    algorithm as mixedmodels._pirls.pirls (its NumPy-level twin), in one compiled loop.
    """
    _check_codes(family, link, param)
    cdef Py_ssize_t n = fixed.shape[0], nlev, q, l, i, j, m
    cdef int k = z.shape[1], it = 0, halvings, a, c
    cdef bint weighted = prior_w.shape[0] > 0, converged = False
    cdef double dev, pdev, new_dev = 0.0, new_pdev, logdet = 0.0, wi, r, zc, s
    cdef double step = 0.0, usize = 0.0
    q = u.shape[0]
    nlev = q // k
    if lam.shape[0] != k * k or lblocks.shape[0] != nlev * k * k or codes.shape[0] != n:
        raise ValueError("pirls_blockdiag: inconsistent sizes")
    cdef double *ablk = <double *> malloc((nlev * k * k + 3 * q + k * k) * sizeof(double))
    if ablk == NULL:
        raise MemoryError()
    cdef double *unew = ablk + nlev * k * k
    cdef double *uold = unew + q
    cdef double *b = uold + q
    cdef double *tmp = b + q
    with nogil:
        _eta_blockdiag(fixed, z, codes, &lam[0], k, nlev, &u[0], b, eta)
        dev = _update_dispatch(family, link, param, eta, y, prior_w, weighted, mu, mu_eta,
                               wrkwt, wrkresid, devresid)
        pdev = dev + _sumsq(&u[0], q)
        while True:
            # Z'WZ blocks and Z'W(working response) per level
            for m in range(nlev * k * k):
                ablk[m] = 0.0
            for m in range(q):
                unew[m] = 0.0
            for i in range(n):
                j = codes[i]
                wi = wrkwt[i]
                r = eta[i] - fixed[i] + wrkresid[i]
                for c in range(k):
                    zc = wi * z[i, c]
                    unew[j * k + c] += zc * r
                    for a in range(k):
                        ablk[j * k * k + a + c * k] += z[i, a] * zc
            logdet = blockdiag_factor_c(ablk, &lam[0], k, nlev, &lblocks[0], tmp)
            if converged or it >= maxiter or logdet != logdet:
                break
            it += 1
            # unew <- M⁻¹ T' unew, M = L L'
            for l in range(nlev):
                for a in range(k):
                    s = 0.0
                    for c in range(a, k):
                        s += lam[c + a * k] * unew[l * k + c]
                    b[l * k + a] = s
            for m in range(q):
                unew[m] = b[m]
            blockdiag_solve_c(&lblocks[0], k, nlev, unew, False)
            blockdiag_solve_c(&lblocks[0], k, nlev, unew, True)
            for m in range(q):
                uold[m] = u[m]
            # the full Newton step's size, and the modes' (see _pirls.STEP_TOL)
            step = 0.0
            usize = 0.0
            for m in range(q):
                if fabs(unew[m] - uold[m]) > step:
                    step = fabs(unew[m] - uold[m])
                if fabs(uold[m]) > usize:
                    usize = fabs(uold[m])
            _eta_blockdiag(fixed, z, codes, &lam[0], k, nlev, unew, b, eta)
            new_dev = _update_dispatch(family, link, param, eta, y, prior_w, weighted, mu,
                                       mu_eta, wrkwt, wrkresid, devresid)
            new_pdev = new_dev + _sumsq(unew, q)
            halvings = 0
            while not (new_pdev <= pdev * (1.0 + 1e-12) + 1e-12) and halvings < max_halving:
                for m in range(q):
                    unew[m] = 0.5 * (uold[m] + unew[m])
                _eta_blockdiag(fixed, z, codes, &lam[0], k, nlev, unew, b, eta)
                new_dev = _update_dispatch(family, link, param, eta, y, prior_w, weighted, mu,
                                           mu_eta, wrkwt, wrkresid, devresid)
                new_pdev = new_dev + _sumsq(unew, q)
                halvings += 1
            if halvings == max_halving:
                # no step lowers the penalized deviance: stay at the previous modes
                _eta_blockdiag(fixed, z, codes, &lam[0], k, nlev, &u[0], b, eta)
                dev = _update_dispatch(family, link, param, eta, y, prior_w, weighted, mu,
                                       mu_eta, wrkwt, wrkresid, devresid)
                converged = True
                continue
            converged = (fabs(pdev - new_pdev) <= tol * fabs(new_pdev) + tol
                         or (halvings == 0 and step <= step_tol * (1.0 + usize)))
            for m in range(q):
                u[m] = unew[m]
            pdev = new_pdev
            dev = new_dev
    free(ablk)
    return logdet, dev, it, bool(converged)

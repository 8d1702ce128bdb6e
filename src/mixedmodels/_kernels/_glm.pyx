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

Bernoulli-logit four rows at a time. On x86-64 CPUs with AVX2 and FMA (checked at
import) the Bernoulli-logit update runs four rows at a time with exp and log1p written
here (see the SIMD section below): ~5-7 ns a row against ~20 for the scalar loop, to
within a few ulps of it (tests/test_pirls_speed.py holds the two together, and
tests/test_family_tails.py both to mpmath in the tails); with AVX-512, eight rows at a
time (~4 ns a row), with each row's results those of the four-row loop. The
Binomial-logit update runs four rows at a time the same way (~8 ns a row against ~19),
with a logarithm of any normal number for the proportions strictly inside (0, 1); a
group of four with a row outside what it covers (eta not finite, y outside [0, 1], a
subnormal y (1 + e)) goes through the scalar loop (tests/test_glmm_search.py holds it
to the scalar loop; tests/test_family_tails.py, update to mpmath in the tails).

The compiled PIRLS. ``pirls_blockdiag`` (one random-effects term) and ``PirlsKernel``
(any blocked system, bound once per model to its rows, its workspace and the PIRLS state)
run the PIRLS loop of mixedmodels/_pirls.py for fixed β with no Python call per
iteration; each evaluation is one row pass (η, the family, and the cross-products the
next factorization needs: see the section before ``Rows``). Bound to X and the offset
too, ``PirlsKernel`` forms Xβ + offset itself, and its ``laplace`` is the whole
evaluation of a one-term GLMM's Laplace deviance and its gradient (canonical links) in
one call: PIRLS from the last modes moved by their first-order change, then the
gradient at the modes on the level blocks the last row pass left (_gradient.pyx).

The rest of a small GLMM's fit. ``glm_irls`` is the GLM start (IRLS with a Householder
QR per step; twin: glmm.py's NumPy loop), ``response_check`` one pass over a response
for the families' checks (twin: ``Family.validate``'s NumPy checks), and, on a
``PirlsKernel`` of one term, ``beta_covariance`` the covariance of β given θ at the
modes (twin: the workspace's factorization) and ``trust_region`` the whole
exact-gradient search, _search.pyx's trust region with the evaluations of ``laplace`` in
it (twin: ``_trust_region.trust_region_search``; tests/test_glmm_search.py holds all
four).

The NumPy twin of every kernel is in ``_glm_numpy.py``; tests/test_families.py holds the
two together at 1e-10 for every family x link pair, and
tests/test_negative_binomial_family.py for the negative binomial (whose parameter the
family-agnostic tests there do not set). The twin of the row pass is
``_glm_numpy.row_pass``, that of the compiled loops the Python loop of ``_pirls.pirls``
(``compiled=False``), both in tests/test_pirls_speed.py.
"""
from libc.math cimport (exp, log, log1p, expm1, sqrt, erfc, lgamma, fabs, isfinite,
                        rint, M_PI, M_SQRT1_2, NAN, INFINITY)
from libc.float cimport DBL_EPSILON
from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcmp, memcpy

import numpy as np
cimport numpy as cnp

cnp.import_array()

from mixedmodels._linalg._blocked cimport (i64, blockdiag_factor_c, blockdiag_solve_c,
                                           lambda_times_c, tf_set_theta, tf_lam,
                                           tf_lam_size, tf_factor, tf_has_small,
                                           tf_backward)
from mixedmodels._kernels._search cimport trust_region_c
from mixedmodels._kernels._gradient cimport (OneTerm, blockdiag_work_size,
                                            blockdiag_laplace_gradient_c,
                                            blockdiag_covariance_work_size,
                                            blockdiag_beta_covariance_c,
                                            raise_covariance_status)

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
        # e = exp(-|eta|) <= 1 never overflows; one reciprocal of 1 + e serves mu, mu_eta
        # and the log probabilities (_logit_nlogp forms the same 1 / (1 + e)); the
        # select between 1 and e, not a branch on the sign of eta (unpredictable)
        e = exp(-fabs(eta))
        aux[0] = e
        t = 1.0 / (1.0 + e)
        mu_eta[0] = e * t * t
        return (1.0 if eta >= 0.0 else e) * t
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


cdef inline double _log1p_unit(double e) noexcept nogil:
    """log1p(e) for 0 <= e <= 1 through log: with t = 1 + e rounded, t - 1 is exact and
    e - (t - 1) the rounding error, so log1p(e) = log(t) + (e - (t - 1))/t to within
    (e - (t - 1))²/t², below 1e-32: as accurate as log1p (an ulp or two, relative, also
    for e below the rounding of t, where it returns e), at the price of log, which runs
    in about half log1p's time. 1/t is written as the logit's inverse link writes it,
    so that inlined next to it the compiler forms it once."""
    cdef double t = 1.0 + e
    return log(t) + (e - (t - 1.0)) * (1.0 / (1.0 + e))


cdef inline double _logit_nlogp(double a, double b, double eta, double e) noexcept nogil:
    """_binary_nlogp of the logit link; e = exp(-|eta|)."""
    # a (L + max(-eta, 0)) + b (L + max(eta, 0)), L = log1p(e): one of the maxima is 0
    # and the other |eta|, so this is (a + b) L + (b if eta > 0 else a) |eta|, written
    # with selects rather than branches on a and b (which follow y, unpredictably); a
    # zero factor contributes 0 even at an infinite eta
    cdef double x = b if eta > 0.0 else a
    cdef double xe = x * fabs(eta)
    return (a + b) * _log1p_unit(e) + (xe if x != 0.0 else 0.0)


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


cdef inline double _family_row(int family, int link, bint from_eta, double param,
                               double yi, double wi, double ei, double *mu, double *mu_eta,
                               double *wrkwt, double *wrkresid) noexcept nogil:
    """One observation of ``update``: writes mu, mu_eta, the working weight and residual
    through the pointers and returns the weighted unit deviance. Inlined into every
    loop over the rows (with literal codes where the caller has them), so that the
    update alone and the fused passes of the compiled PIRLS do the same arithmetic."""
    cdef double m, mr, me, aux = 0.0   # (aux written by _linkinv for some links only)
    mr = _linkinv(link, ei, &me, &aux)
    m = _clamp_mu(family, mr)
    if fabs(me) < DBL_EPSILON:
        me = -DBL_EPSILON if me < 0.0 else DBL_EPSILON
    mu[0] = m
    mu_eta[0] = me
    wrkwt[0] = wi * me * me / _variance(family, m, param)
    wrkresid[0] = (yi - m) / me
    if from_eta:
        return wi * _binary_deviance_eta(family, link, yi, ei, mr, aux)
    return wi * _unit_deviance(family, yi, m, param)


cdef inline double _update_loop(int family, int link, bint from_eta, double param,
                                Py_ssize_t n, const double *eta, const double *y,
                                const double *pw, double *mu, double *mu_eta,
                                double *wrkwt, double *wrkresid,
                                double *devresid) noexcept nogil:
    # pw NULL: unit prior weights
    cdef Py_ssize_t i
    cdef double m, me, wt, wr, d, dev = 0.0
    for i in range(n):
        d = _family_row(family, link, from_eta, param, y[i],
                        pw[i] if pw != NULL else 1.0, eta[i], &m, &me, &wt, &wr)
        mu[i] = m
        mu_eta[i] = me
        wrkwt[i] = wt
        wrkresid[i] = wr
        devresid[i] = d
        dev += d
    return dev



# ------------------------------------------------------------------ SIMD: Bernoulli-logit
#
# The Bernoulli family under the logit link is the common case (binary responses) and
# its update is all arithmetic: one exp and one log per row, three divisions, selects.
# Four rows at a time with AVX2 and FMA, it runs at ~5-7 ns a row against ~20 for the
# scalar loop (glibc's exp and log are scalar calls). exp and log1p are written here:
# exp(x), x <= 0, as 2^k exp(r), |r| <= ln2/2, with the Taylor polynomial of degree 13
# (truncation below 4e-18) and 2^k applied in two halves so that subnormal results are
# rounded once; log1p(e), 0 <= e <= 1, from t = 1 + e rounded as j ln2 + log(1 + f)
# (t = 2^j (1 + f), f exact) plus the rounding error of t, (e - (t - 1))/t, with
# log(1 + f) = f - (f²/2 - s (f²/2 + R(s²))), s = f/(2 + f), R the tail of the atanh
# series 2 Σ s^(2j)/(2j + 1) to j = 11 (truncation below 2e-18). Both are within a few
# ulps of glibc's, and keep the relative precision the module docstring asks of the
# tails (tests/test_family_tails.py runs them against mpmath). The row formulas are
# those of _family_row; the deviance is summed in four lanes, so it differs from the
# scalar loop's sum in the last bits. Used where the CPU has AVX2 and FMA (checked once,
# at import) and the compiler is GCC or Clang on x86-64; elsewhere, and for the last
# n mod 4 rows, the scalar loop runs. ``simd_enabled`` switches it off (for the tests).
# Where the CPU has AVX-512 (F and DQ), the same loop runs eight rows at a time, with
# the same operations on each row (so the same per-row results) and the remaining
# rows four at a time and then one by one: on this project's machine (Xeon, Sapphire
# Rapids class) 3.9 against 6.5 ns a row. ``simd_width`` picks 8, 4 or 0 (tests).

cdef extern from *:
    """
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(MM_NO_SIMD)
    #include <immintrin.h>
    #include <float.h>
    #define MM_AVX __attribute__((target("avx2,fma")))
    #define MM_SET(c) _mm256_set1_pd(c)

    static int mm_simd_available(void)
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }

    /* exp(x) for x <= 0; x below -746 is taken as -746 (exp is 0 there), NaN stays NaN */
    MM_AVX static inline __m256d mm_exp_nonpos(__m256d x)
    {
        const __m256d shift = MM_SET(6755399441055744.0);        /* 1.5 * 2^52 */
        x = _mm256_max_pd(MM_SET(-746.0), x);
        /* k = round(x / ln 2) in the low bits of kd; r = x - k ln 2 (ln 2 in two parts) */
        __m256d kd = _mm256_fmadd_pd(x, MM_SET(1.4426950408889634), shift);
        __m256d kf = _mm256_sub_pd(kd, shift);
        __m256d r = _mm256_fnmadd_pd(kf, MM_SET(6.93147180369123816490e-01), x);
        r = _mm256_fnmadd_pd(kf, MM_SET(1.90821492927058770002e-10), r);
        /* exp(r) = 1 + r + r^2 (1/2! + r/3! + ... + r^11/13!) */
        __m256d p = MM_SET(1.0 / 6227020800.0);
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 479001600.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 39916800.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 3628800.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 362880.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 40320.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 5040.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 720.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 120.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 24.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(1.0 / 6.0));
        p = _mm256_fmadd_pd(p, r, MM_SET(0.5));
        p = _mm256_mul_pd(_mm256_mul_pd(r, r), p);
        __m256d e = _mm256_add_pd(MM_SET(1.0), _mm256_add_pd(r, p));
        /* times 2^k, k in [-1076, 0], as 2^k1 2^k2 with k1 = -floor(-k/2) and k2 = k - k1
           both normal: a subnormal result is rounded once, in the last product */
        __m256i zero = _mm256_setzero_si256();
        __m256i k = _mm256_sub_epi64(_mm256_castpd_si256(kd), _mm256_castpd_si256(shift));
        __m256i k1 = _mm256_sub_epi64(zero, _mm256_srli_epi64(_mm256_sub_epi64(zero, k), 1));
        __m256i k2 = _mm256_sub_epi64(k, k1);
        __m256i bias = _mm256_set1_epi64x(1023);
        __m256d s1 = _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(k1, bias), 52));
        __m256d s2 = _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(k2, bias), 52));
        return _mm256_mul_pd(_mm256_mul_pd(e, s1), s2);
    }

    /* log(1 + f) for sqrt(1/2) - 1 <= f <= sqrt(2) - 1: f - (f^2/2 - s (f^2/2 + R)),
       s = f/(2 + f), R = 2 (s^2/3 + s^4/5 + ...) */
    MM_AVX static inline __m256d mm_log1p_reduced(__m256d f)
    {
        __m256d s = _mm256_div_pd(f, _mm256_add_pd(MM_SET(2.0), f));
        __m256d z = _mm256_mul_pd(s, s);
        __m256d R = MM_SET(2.0 / 23.0);
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 21.0));
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 19.0));
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 17.0));
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 15.0));
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 13.0));
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 11.0));
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 9.0));
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 7.0));
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 5.0));
        R = _mm256_fmadd_pd(R, z, MM_SET(2.0 / 3.0));
        R = _mm256_mul_pd(R, z);
        __m256d hfsq = _mm256_mul_pd(MM_SET(0.5), _mm256_mul_pd(f, f));
        __m256d lf = _mm256_sub_pd(f, _mm256_fnmadd_pd(s, _mm256_add_pd(hfsq, R), hfsq));
        return lf;
    }

    /* log1p(e) for 0 <= e <= 1 (NaN stays NaN), given it = 1/(1 + e) */
    MM_AVX static inline __m256d mm_log1p_unit(__m256d e, __m256d it)
    {
        const __m256d one = MM_SET(1.0);
        /* t = 1 + e rounded = 2^j (1 + f), j in {0, 1}, f exact */
        __m256d t = _mm256_add_pd(one, e);
        __m256d big = _mm256_cmp_pd(t, MM_SET(1.4142135623730951), _CMP_GT_OQ);
        __m256d f = _mm256_sub_pd(_mm256_blendv_pd(t, _mm256_mul_pd(t, MM_SET(0.5)), big), one);
        __m256d lf = mm_log1p_reduced(f);
        /* plus j ln 2 and the rounding error of t: (e - (t - 1)) / t */
        __m256d corr = _mm256_mul_pd(_mm256_sub_pd(e, _mm256_sub_pd(t, one)), it);
        __m256d j = _mm256_and_pd(big, MM_SET(0.6931471805599453));
        return _mm256_add_pd(_mm256_add_pd(j, lf), corr);
    }

    /* the logit's inverse link at four rows from e = exp(-|η|) and it = 1/(1 + e), with
       _linkinv's clamps (the max/min keep NaN), and the working weight and residual
       (prior weights wi, responses yi), stored at mu, mu_eta, wrkwt, wrkresid */
    MM_AVX static inline void mm_logit_working(__m256d h, __m256d e, __m256d it, __m256d wi,
                                               __m256d yi, double *mu, double *mu_eta,
                                               double *wrkwt, double *wrkresid)
    {
        const __m256d one = MM_SET(1.0), zero = _mm256_setzero_pd();
        const __m256d eps = MM_SET(DBL_EPSILON), one_eps = MM_SET(1.0 - DBL_EPSILON);
        __m256d me = _mm256_max_pd(eps, _mm256_mul_pd(_mm256_mul_pd(e, it), it));
        __m256d nonneg = _mm256_cmp_pd(h, zero, _CMP_GE_OQ);
        __m256d m = _mm256_mul_pd(_mm256_blendv_pd(e, one, nonneg), it);
        m = _mm256_min_pd(one_eps, _mm256_max_pd(eps, m));
        _mm256_storeu_pd(mu, m);
        _mm256_storeu_pd(mu_eta, me);
        __m256d v = _mm256_mul_pd(m, _mm256_sub_pd(one, m));
        _mm256_storeu_pd(wrkwt, _mm256_div_pd(_mm256_mul_pd(_mm256_mul_pd(wi, me), me), v));
        _mm256_storeu_pd(wrkresid, _mm256_div_pd(_mm256_sub_pd(yi, m), me));
    }

    /* _update_loop of Bernoulli-logit for rows [0, n4), n4 a multiple of 4 (pw NULL:
       unit weights); returns the sum of the deviance residuals it writes */
    MM_AVX static double mm_bernoulli_logit_avx2(long n4, const double *eta, const double *y,
                                                 const double *pw, double *mu, double *mu_eta,
                                                 double *wrkwt, double *wrkresid,
                                                 double *devresid)
    {
        const __m256d one = MM_SET(1.0), zero = _mm256_setzero_pd(), two = MM_SET(2.0);
        const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
        __m256d acc = zero;
        for (long i = 0; i < n4; i += 4) {
            __m256d h = _mm256_loadu_pd(eta + i);
            __m256d yi = _mm256_loadu_pd(y + i);
            __m256d wi = pw ? _mm256_loadu_pd(pw + i) : one;
            __m256d ah = _mm256_and_pd(h, absmask);
            /* the inverse link (_linkinv), its clamps (the max/min keep NaN) */
            __m256d e = mm_exp_nonpos(_mm256_sub_pd(zero, ah));
            __m256d it = _mm256_div_pd(one, _mm256_add_pd(one, e));
            mm_logit_working(h, e, it, wi, yi, mu + i, mu_eta + i, wrkwt + i, wrkresid + i);
            /* the deviance from eta (_logit_nlogp with a = y, b = 1 - y) */
            __m256d lp = mm_log1p_unit(e, it);
            __m256d b = _mm256_sub_pd(one, yi);
            __m256d x = _mm256_blendv_pd(yi, b, _mm256_cmp_pd(h, zero, _CMP_GT_OQ));
            __m256d xe = _mm256_and_pd(_mm256_mul_pd(x, ah), _mm256_cmp_pd(x, zero, _CMP_NEQ_UQ));
            __m256d nlogp = _mm256_add_pd(_mm256_mul_pd(_mm256_add_pd(yi, b), lp), xe);
            __m256d d = _mm256_mul_pd(wi, _mm256_mul_pd(two, nlogp));
            _mm256_storeu_pd(devresid + i, d);
            acc = _mm256_add_pd(acc, d);
        }
        __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd(acc, 1));
        return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
    }

    /* log(x) for normal, finite x > 0: x = 2^j (1 + f) with sqrt(1/2) < 1 + f <= sqrt(2)
       (f exact), log(1 + f) by mm_log1p_reduced, and j ln 2 in two parts (the
       high part has zero low bits, so j times it is exact) */
    MM_AVX static inline __m256d mm_log_normal(__m256d x)
    {
        const __m256d one = MM_SET(1.0);
        __m256i bits = _mm256_castpd_si256(x);
        __m256d m = _mm256_castsi256_pd(_mm256_or_si256(
            _mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFLL)),
            _mm256_set1_epi64x(0x3FF0000000000000LL)));                     /* [1, 2) */
        /* the biased exponent as a double: its bits in the mantissa of 2^52 */
        __m256d jd = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(
            _mm256_srli_epi64(bits, 52), _mm256_set1_epi64x(0x4330000000000000LL))),
            MM_SET(4503599627370496.0 + 1023.0));
        __m256d big = _mm256_cmp_pd(m, MM_SET(1.4142135623730951), _CMP_GT_OQ);
        m = _mm256_blendv_pd(m, _mm256_mul_pd(m, MM_SET(0.5)), big);
        jd = _mm256_add_pd(jd, _mm256_and_pd(big, one));
        __m256d f = _mm256_sub_pd(m, one);
        __m256d lf = mm_log1p_reduced(f);
        return _mm256_fmadd_pd(jd, MM_SET(6.93147180369123816490e-01),
                               _mm256_fmadd_pd(jd, MM_SET(1.90821492927058770002e-10), lf));
    }

    /* _update_loop of Binomial-logit for rows [0, n4), n4 a multiple of 4, four at a
       time, up to the first group of four with a row the formulas here do not cover
       (eta not finite; a proportion strictly inside (0, 1) whose y (1 + e) or
       (1 - y)(1 + e) is not a normal number, y outside [0, 1] among them): returns the
       rows done (the caller runs that group's rows one by one, then comes back), and
       adds the sum of the deviance residuals written to *dev */
    MM_AVX static long mm_binomial_logit_avx2(long n4, const double *eta, const double *y,
                                              const double *pw, double *mu, double *mu_eta,
                                              double *wrkwt, double *wrkresid,
                                              double *devresid, double *dev)
    {
        const __m256d one = MM_SET(1.0), zero = _mm256_setzero_pd(), two = MM_SET(2.0);
        const __m256d tiny = MM_SET(DBL_MIN), huge = MM_SET(DBL_MAX);
        const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
        __m256d acc = zero;
        long i;
        for (i = 0; i < n4; i += 4) {
            __m256d h = _mm256_loadu_pd(eta + i);
            __m256d yi = _mm256_loadu_pd(y + i);
            __m256d ah = _mm256_and_pd(h, absmask);
            __m256d b = _mm256_sub_pd(one, yi);
            /* inside (0, 1) (NaN too): the two-logarithm form */
            __m256d inner = _mm256_and_pd(_mm256_cmp_pd(yi, zero, _CMP_NEQ_UQ),
                                          _mm256_cmp_pd(yi, one, _CMP_NEQ_UQ));
            __m256d e = mm_exp_nonpos(_mm256_sub_pd(zero, ah));
            __m256d ope = _mm256_add_pd(one, e);
            __m256d x1 = _mm256_mul_pd(yi, ope), x2 = _mm256_mul_pd(b, ope);
            __m256d odd = _mm256_cmp_pd(ah, huge, _CMP_NLE_UQ);
            __m256d bad1 = _mm256_or_pd(_mm256_cmp_pd(x1, tiny, _CMP_NGE_UQ),
                                        _mm256_cmp_pd(x1, huge, _CMP_NLE_UQ));
            __m256d bad2 = _mm256_or_pd(_mm256_cmp_pd(x2, tiny, _CMP_NGE_UQ),
                                        _mm256_cmp_pd(x2, huge, _CMP_NLE_UQ));
            odd = _mm256_or_pd(odd, _mm256_and_pd(inner, _mm256_or_pd(bad1, bad2)));
            if (_mm256_movemask_pd(odd))
                break;
            __m256d wi = pw ? _mm256_loadu_pd(pw + i) : one;
            /* the inverse link and its clamps (mm_bernoulli_logit_avx2's) */
            __m256d it = _mm256_div_pd(one, ope);
            mm_logit_working(h, e, it, wi, yi, mu + i, mu_eta + i, wrkwt + i, wrkresid + i);
            /* y in {0, 1}: _logit_nlogp with a = y, b = 1 - y (the Bernoulli's) */
            __m256d unit = zero;
            int im = _mm256_movemask_pd(inner);
            if (im != 0xF) {
                __m256d lp = mm_log1p_unit(e, it);
                __m256d x = _mm256_blendv_pd(yi, b, _mm256_cmp_pd(h, zero, _CMP_GT_OQ));
                __m256d xe = _mm256_and_pd(_mm256_mul_pd(x, ah), _mm256_cmp_pd(x, zero, _CMP_NEQ_UQ));
                unit = _mm256_add_pd(_mm256_mul_pd(_mm256_add_pd(yi, b), lp), xe);
            }
            /* inside: y (log(y (1 + e)) + max(-eta, 0)) + (1 - y)(log((1 - y)(1 + e))
               + max(eta, 0)), as _binary_deviance_eta */
            if (im != 0) {
                __m256d lo1 = mm_log_normal(_mm256_blendv_pd(one, x1, inner));
                __m256d lo2 = mm_log_normal(_mm256_blendv_pd(one, x2, inner));
                __m256d t1 = _mm256_add_pd(lo1, _mm256_and_pd(_mm256_sub_pd(zero, h),
                                                              _mm256_cmp_pd(h, zero, _CMP_LT_OQ)));
                __m256d t2 = _mm256_add_pd(lo2, _mm256_and_pd(h, _mm256_cmp_pd(h, zero, _CMP_GT_OQ)));
                __m256d in = _mm256_add_pd(_mm256_mul_pd(yi, t1), _mm256_mul_pd(b, t2));
                unit = _mm256_blendv_pd(unit, in, inner);
            }
            __m256d d = _mm256_mul_pd(wi, _mm256_mul_pd(two, unit));
            _mm256_storeu_pd(devresid + i, d);
            acc = _mm256_add_pd(acc, d);
        }
        __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd(acc, 1));
        *dev += _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
        return i;
    }

    #define MM_512 __attribute__((target("avx512f,avx512dq,fma")))
    #define S8(c) _mm512_set1_pd(c)

    static int mm_simd512_available(void)
    {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
               && __builtin_cpu_supports("fma");
    }

    /* mm_exp_nonpos, eight lanes */
    MM_512 static inline __m512d mm512_exp_nonpos(__m512d x)
    {
        const __m512d shift = S8(6755399441055744.0);
        x = _mm512_max_pd(S8(-746.0), x);
        __m512d kd = _mm512_fmadd_pd(x, S8(1.4426950408889634), shift);
        __m512d kf = _mm512_sub_pd(kd, shift);
        __m512d r = _mm512_fnmadd_pd(kf, S8(6.93147180369123816490e-01), x);
        r = _mm512_fnmadd_pd(kf, S8(1.90821492927058770002e-10), r);
        __m512d p = S8(1.0 / 6227020800.0);
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 479001600.0));
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 39916800.0));
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 3628800.0));
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 362880.0));
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 40320.0));
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 5040.0));
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 720.0));
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 120.0));
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 24.0));
        p = _mm512_fmadd_pd(p, r, S8(1.0 / 6.0));
        p = _mm512_fmadd_pd(p, r, S8(0.5));
        p = _mm512_mul_pd(_mm512_mul_pd(r, r), p);
        __m512d e = _mm512_add_pd(S8(1.0), _mm512_add_pd(r, p));
        __m512i zero = _mm512_setzero_si512();
        __m512i k = _mm512_sub_epi64(_mm512_castpd_si512(kd), _mm512_castpd_si512(shift));
        __m512i k1 = _mm512_sub_epi64(zero, _mm512_srli_epi64(_mm512_sub_epi64(zero, k), 1));
        __m512i k2 = _mm512_sub_epi64(k, k1);
        __m512i bias = _mm512_set1_epi64(1023);
        __m512d s1 = _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_add_epi64(k1, bias), 52));
        __m512d s2 = _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_add_epi64(k2, bias), 52));
        return _mm512_mul_pd(_mm512_mul_pd(e, s1), s2);
    }
    /* mm_log1p_unit, eight lanes */
    MM_512 static inline __m512d mm512_log1p_unit(__m512d e, __m512d it)
    {
        const __m512d one = S8(1.0);
        __m512d t = _mm512_add_pd(one, e);
        __mmask8 big = _mm512_cmp_pd_mask(t, S8(1.4142135623730951), _CMP_GT_OQ);
        __m512d f = _mm512_sub_pd(_mm512_mask_blend_pd(big, t, _mm512_mul_pd(t, S8(0.5))), one);
        __m512d s = _mm512_div_pd(f, _mm512_add_pd(S8(2.0), f));
        __m512d z = _mm512_mul_pd(s, s);
        __m512d R = S8(2.0 / 23.0);
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 21.0));
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 19.0));
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 17.0));
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 15.0));
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 13.0));
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 11.0));
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 9.0));
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 7.0));
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 5.0));
        R = _mm512_fmadd_pd(R, z, S8(2.0 / 3.0));
        R = _mm512_mul_pd(R, z);
        __m512d hfsq = _mm512_mul_pd(S8(0.5), _mm512_mul_pd(f, f));
        __m512d lf = _mm512_sub_pd(f, _mm512_fnmadd_pd(s, _mm512_add_pd(hfsq, R), hfsq));
        __m512d corr = _mm512_mul_pd(_mm512_sub_pd(e, _mm512_sub_pd(t, one)), it);
        __m512d j = _mm512_maskz_mov_pd(big, S8(0.6931471805599453));
        return _mm512_add_pd(_mm512_add_pd(j, lf), corr);
    }
    /* mm_bernoulli_logit_avx2, eight rows at a time (n8 a multiple of 8); the same
       operations on each row, so the same results but for the deviance's summation */
    MM_512 static double mm_bernoulli_logit_avx512(long n8, const double *eta, const double *y,
                                                 const double *pw, double *mu, double *mu_eta,
                                                 double *wrkwt, double *wrkresid, double *devresid)
    {
        const __m512d one = S8(1.0), zero = _mm512_setzero_pd(), two = S8(2.0);
        const __m512d eps = S8(DBL_EPSILON), one_eps = S8(1.0 - DBL_EPSILON);
        __m512d acc = zero;
        for (long i = 0; i < n8; i += 8) {
            __m512d h = _mm512_loadu_pd(eta + i);
            __m512d yi = _mm512_loadu_pd(y + i);
            __m512d wi = pw ? _mm512_loadu_pd(pw + i) : one;
            __m512d ah = _mm512_abs_pd(h);
            __m512d e = mm512_exp_nonpos(_mm512_sub_pd(zero, ah));
            __m512d it = _mm512_div_pd(one, _mm512_add_pd(one, e));
            __m512d me = _mm512_max_pd(eps, _mm512_mul_pd(_mm512_mul_pd(e, it), it));
            __mmask8 nonneg = _mm512_cmp_pd_mask(h, zero, _CMP_GE_OQ);
            __m512d m = _mm512_mul_pd(_mm512_mask_blend_pd(nonneg, e, one), it);
            m = _mm512_min_pd(one_eps, _mm512_max_pd(eps, m));
            _mm512_storeu_pd(mu + i, m);
            _mm512_storeu_pd(mu_eta + i, me);
            __m512d v = _mm512_mul_pd(m, _mm512_sub_pd(one, m));
            _mm512_storeu_pd(wrkwt + i, _mm512_div_pd(_mm512_mul_pd(_mm512_mul_pd(wi, me), me), v));
            _mm512_storeu_pd(wrkresid + i, _mm512_div_pd(_mm512_sub_pd(yi, m), me));
            __m512d lp = mm512_log1p_unit(e, it);
            __m512d b = _mm512_sub_pd(one, yi);
            __m512d x = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(h, zero, _CMP_GT_OQ), yi, b);
            __m512d xe = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(x, zero, _CMP_NEQ_UQ), _mm512_mul_pd(x, ah));
            __m512d nlogp = _mm512_add_pd(_mm512_mul_pd(_mm512_add_pd(yi, b), lp), xe);
            __m512d d = _mm512_mul_pd(wi, _mm512_mul_pd(two, nlogp));
            _mm512_storeu_pd(devresid + i, d);
            acc = _mm512_add_pd(acc, d);
        }
        return _mm512_reduce_add_pd(acc);
    }
    #else
    static int mm_simd_available(void) { return 0; }
    static int mm_simd512_available(void) { return 0; }
    static double mm_bernoulli_logit_avx512(long n8, const double *eta, const double *y,
                                            const double *pw, double *mu, double *mu_eta,
                                            double *wrkwt, double *wrkresid, double *devresid)
    { return 0.0; }
    static double mm_bernoulli_logit_avx2(long n4, const double *eta, const double *y,
                                          const double *pw, double *mu, double *mu_eta,
                                          double *wrkwt, double *wrkresid, double *devresid)
    { return 0.0; }
    static long mm_binomial_logit_avx2(long n4, const double *eta, const double *y,
                                       const double *pw, double *mu, double *mu_eta,
                                       double *wrkwt, double *wrkresid, double *devresid,
                                       double *dev)
    { return 0; }
    #endif
    """
    int mm_simd_available()
    int mm_simd512_available()
    double mm_bernoulli_logit_avx2(long n4, const double *eta, const double *y,
                                   const double *pw, double *mu, double *mu_eta,
                                   double *wrkwt, double *wrkresid,
                                   double *devresid) noexcept nogil
    double mm_bernoulli_logit_avx512(long n8, const double *eta, const double *y,
                                     const double *pw, double *mu, double *mu_eta,
                                     double *wrkwt, double *wrkresid,
                                     double *devresid) noexcept nogil
    long mm_binomial_logit_avx2(long n4, const double *eta, const double *y,
                                const double *pw, double *mu, double *mu_eta,
                                double *wrkwt, double *wrkresid, double *devresid,
                                double *dev) noexcept nogil

# rows per SIMD step the CPU allows: 8 (AVX-512), 4 (AVX2) or 0
cdef int _simd_widest = (8 if mm_simd512_available() and mm_simd_available()
                         else 4 if mm_simd_available() else 0)
cdef int _simd_width = _simd_widest


def simd_enabled(enable=None):
    """Whether ``update`` (and the compiled PIRLS) runs Bernoulli-logit rows several at
    a time (AVX-512 or AVX2 with FMA), and Binomial-logit rows four at a time;
    ``enable`` switches it (True: the widest the CPU has). Returns the setting in
    force."""
    global _simd_width
    if enable is not None:
        _simd_width = _simd_widest if enable else 0
    return _simd_width > 0


def simd_width(width=None):
    """Rows per SIMD step of the Bernoulli-logit update: 8 (AVX-512), 4 (AVX2) or 0
    (the scalar loop; the Binomial-logit one runs four at a time for any width but 0);
    ``width`` sets it, capped at what the CPU has (for the tests).
    Returns the setting in force."""
    global _simd_width
    if width is not None:
        _simd_width = min(int(width), _simd_widest)
        if _simd_width not in (0, 4, 8):
            _simd_width = 4 if _simd_width > 4 else 0
    return _simd_width


cdef double _binomial_logit_simd(double param, Py_ssize_t n, const double *eta,
                                 const double *y, const double *pw, double *mu,
                                 double *mu_eta, double *wrkwt, double *wrkresid,
                                 double *devresid) noexcept nogil:
    # Binomial-logit four rows at a time (mm_binomial_logit_avx2), the groups it leaves
    # and the last n mod 4 rows one by one
    cdef Py_ssize_t i = 0, n4 = n - n % 4, done, m
    cdef double dev = 0.0
    while i < n4:
        done = mm_binomial_logit_avx2(n4 - i, eta + i, y + i, pw + i if pw != NULL else NULL,
                                      mu + i, mu_eta + i, wrkwt + i, wrkresid + i,
                                      devresid + i, &dev)
        i += done
        if i < n4:
            dev += _update_loop(FAM_BINOMIAL, LNK_LOGIT, True, param, 4, eta + i, y + i,
                                pw + i if pw != NULL else NULL, mu + i, mu_eta + i,
                                wrkwt + i, wrkresid + i, devresid + i)
            i += 4
    m = n - n4
    if m:
        dev += _update_loop(FAM_BINOMIAL, LNK_LOGIT, True, param, m, eta + n4, y + n4,
                            pw + n4 if pw != NULL else NULL, mu + n4, mu_eta + n4,
                            wrkwt + n4, wrkresid + n4, devresid + n4)
    return dev


cdef inline double _update_dispatch(int family, int link, double param, Py_ssize_t n,
                                    const double *eta, const double *y, const double *pw,
                                    double *mu, double *mu_eta, double *wrkwt,
                                    double *wrkresid, double *devresid) noexcept nogil:
    # the common pairs get a copy of the loop with the codes as constants; the others
    # one of two copies, with and without the binary deviances from eta, so that the
    # copy the continuous families run holds no code of the binary ones
    cdef Py_ssize_t n4, n8 = 0
    cdef double dev = 0.0
    if family == FAM_BERNOULLI and link == LNK_LOGIT:
        if _simd_width == 8 and n >= 8:
            n8 = n - n % 8
            dev = mm_bernoulli_logit_avx512(n8, eta, y, pw, mu, mu_eta, wrkwt, wrkresid,
                                            devresid)
            if n - n8 < 4:
                return dev + _update_loop(FAM_BERNOULLI, LNK_LOGIT, True, param, n - n8,
                                          eta + n8, y + n8, pw + n8 if pw != NULL else NULL,
                                          mu + n8, mu_eta + n8, wrkwt + n8,
                                          wrkresid + n8, devresid + n8)
        if _simd_width > 0 and n >= 4:
            n4 = n - n % 4
            dev += mm_bernoulli_logit_avx2(n4 - n8, eta + n8, y + n8,
                                           pw + n8 if pw != NULL else NULL, mu + n8,
                                           mu_eta + n8, wrkwt + n8, wrkresid + n8,
                                           devresid + n8)
            return dev + _update_loop(FAM_BERNOULLI, LNK_LOGIT, True, param, n - n4,
                                      eta + n4, y + n4, pw + n4 if pw != NULL else NULL,
                                      mu + n4, mu_eta + n4, wrkwt + n4, wrkresid + n4,
                                      devresid + n4)
        return _update_loop(FAM_BERNOULLI, LNK_LOGIT, True, param, n, eta, y, pw,
                            mu, mu_eta, wrkwt, wrkresid, devresid)
    if family == FAM_BINOMIAL and link == LNK_LOGIT:
        if _simd_width > 0 and n >= 4:
            return _binomial_logit_simd(param, n, eta, y, pw, mu, mu_eta, wrkwt, wrkresid,
                                        devresid)
        return _update_loop(FAM_BINOMIAL, LNK_LOGIT, True, param, n, eta, y, pw,
                            mu, mu_eta, wrkwt, wrkresid, devresid)
    if family == FAM_POISSON and link == LNK_LOG:
        return _update_loop(FAM_POISSON, LNK_LOG, False, param, n, eta, y, pw,
                            mu, mu_eta, wrkwt, wrkresid, devresid)
    if family == FAM_NEGATIVE_BINOMIAL and link == LNK_LOG:
        return _update_loop(FAM_NEGATIVE_BINOMIAL, LNK_LOG, False, param, n, eta, y, pw,
                            mu, mu_eta, wrkwt, wrkresid, devresid)
    if _from_eta(family, link):
        return _update_loop(family, link, True, param, n, eta, y, pw,
                            mu, mu_eta, wrkwt, wrkresid, devresid)
    return _update_loop(family, link, False, param, n, eta, y, pw,
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
    if n == 0:
        return 0.0
    with nogil:
        dev = _update_dispatch(family, link, param, n, &eta[0], &y[0],
                               &prior_w[0] if weighted else NULL, &mu[0], &mu_eta[0],
                               &wrkwt[0], &wrkresid[0], &devresid[0])
    return dev


# -- the GLM without random effects: the starting values of a GLMM fit -------------------
#
# glmm.py starts a fit from the GLM's β (IRLS, as glm() does). The NumPy loop there made
# one least-squares call per iteration through LAPACK's dgelsd and five array operations
# around it; on a small model (cbpp: 56 rows, five iterations) that was 90 µs, a tenth
# of the whole fit. ``glm_irls`` is the same loop with a Householder QR of the weighted
# X (X̃ has orthogonal columns of norm √n, so the weighted one is far from rank
# deficiency unless weights vanish; there it hands back to the NumPy loop).

cdef int _householder_least_squares(Py_ssize_t n, Py_ssize_t p, double *a, double *b,
                                    double *diag, double *out) noexcept nogil:
    """out <- argmin ||a out - b|| for a column-major n-by-p a (a and b overwritten by
    the QR), or 1 where a column's part orthogonal to those before it is below 1e-10 of
    the largest column norm (or not finite): the caller's dgelsd then decides."""
    cdef Py_ssize_t i, j, c
    cdef double s, norm, alpha, v0, vtv, t, big = 0.0
    cdef double *col
    cdef double *other
    for j in range(p):
        s = 0.0
        for i in range(n):
            s += a[j * n + i] * a[j * n + i]
        if not isfinite(s):
            return 1
        if s > big:
            big = s
    big = sqrt(big)
    for j in range(p):
        col = a + j * n
        s = 0.0
        for i in range(j, n):
            s += col[i] * col[i]
        norm = sqrt(s)
        if not norm > 1e-10 * big:
            return 1
        alpha = -norm if col[j] >= 0.0 else norm
        v0 = col[j] - alpha
        vtv = 2.0 * norm * (norm + fabs(col[j]))       # v'v for v = col[j:] - alpha e_1
        col[j] = v0
        for c in range(j + 1, p + 1):                  # the later columns, then b
            other = a + c * n if c < p else b
            t = 0.0
            for i in range(j, n):
                t += col[i] * other[i]
            t = 2.0 * t / vtv
            for i in range(j, n):
                other[i] -= t * col[i]
        diag[j] = alpha
    for j in range(p - 1, -1, -1):
        s = b[j]
        for c in range(j + 1, p):
            s -= a[c * n + j] * out[c]
        out[j] = s / diag[j]
    return 0


def glm_irls(int family, int link, double param, x, y, prior_w, offset, eta, mu, mu_eta,
             wrkwt, wrkresid, devresid, beta, int maxiter=50, double tol=1e-10):
    """IRLS for the GLM without random effects (the loop of glmm.py's ``_glm_start``).

    From ``eta`` (the link of the starting means), up to ``maxiter`` times: the family's
    update at η (into mu ... devresid), a stop where the deviance changed by at most
    ``tol`` (|dev| + ``tol``), else β = the least-squares solution of the weighted
    problem min ||√W (Xβ - z)||, z = η - offset + working residual, and η = Xβ +
    offset. On return ``eta`` and the state arrays are those of the last update and
    ``beta`` the last solution (zero if none was taken). ``offset`` and ``prior_w`` may
    be empty (zero, unit).

    The arrays are NumPy arrays of float64, C-contiguous (x n-by-p; the rest vectors),
    the outputs (eta ... devresid, beta) writable: what typed memoryviews would take,
    bound through the NumPy C API instead (see ``_data_of``).

    Returns the number of least-squares solves, or -1 where a weighted X was
    (numerically) of lower rank or a value not finite: the caller then runs its NumPy
    loop, whose dgelsd takes the minimum-norm solution. NumPy twin: that loop
    (``_glm_start(compiled=False)``).
    """
    cdef Py_ssize_t n, p, i, j, nx, ne, nmu, nme, nwt, nwr, ndr, npw, noff, nb
    cdef cnp.npy_intp d[2]
    cdef bint weighted, has_off
    cdef double dev, dev_old = INFINITY, s, sw
    cdef int it, solves = 0, bad = 0
    cdef double *a
    cdef double *b
    cdef double *diag
    cdef double *newbeta
    cdef double *neweta
    cdef const double *xp = <const double *> _data_of(x, _F64, 2, False, False, "glm_irls",
                                                      "x", d)
    cdef const double *yp = _vec(y, False, "glm_irls", "y", &n)
    cdef const double *pwp = _vec(prior_w, False, "glm_irls", "prior_w", &npw)
    cdef const double *offp = _vec(offset, False, "glm_irls", "offset", &noff)
    cdef double *etap = _vec(eta, True, "glm_irls", "eta", &ne)
    cdef double *mup = _vec(mu, True, "glm_irls", "mu", &nmu)
    cdef double *mep = _vec(mu_eta, True, "glm_irls", "mu_eta", &nme)
    cdef double *wtp = _vec(wrkwt, True, "glm_irls", "wrkwt", &nwt)
    cdef double *wrp = _vec(wrkresid, True, "glm_irls", "wrkresid", &nwr)
    cdef double *drp = _vec(devresid, True, "glm_irls", "devresid", &ndr)
    cdef double *bp = _vec(beta, True, "glm_irls", "beta", &nb)
    nx, p = d[0], d[1]
    weighted, has_off = npw > 0, noff > 0
    _check_codes(family, link, param)
    if (nx != n or ne != n or nmu != n or nme != n or nwt != n or nwr != n or ndr != n
            or (weighted and npw != n) or (has_off and noff != n) or nb != p):
        raise ValueError("glm_irls: the arrays differ in length")
    if n == 0 or p == 0:
        return -1
    if not weighted:
        pwp = NULL
    a = <double *> malloc((n * p + 2 * n + 2 * p) * sizeof(double))
    if a == NULL:
        raise MemoryError()
    b = a + n * p
    neweta = b + n
    diag = neweta + n
    newbeta = diag + p
    with nogil:
        for j in range(p):
            bp[j] = 0.0
        for it in range(maxiter):
            if it > 0:
                for i in range(n):
                    etap[i] = neweta[i]
            dev = _update_dispatch(family, link, param, n, etap, yp, pwp, mup, mep, wtp, wrp,
                                   drp)
            if fabs(dev_old - dev) <= tol * (fabs(dev) + tol):
                break
            if not isfinite(dev):
                bad = 1
                break
            dev_old = dev
            for i in range(n):
                sw = sqrt(wtp[i])
                for j in range(p):
                    a[j * n + i] = xp[i * p + j] * sw
                s = (etap[i] - offp[i]) + wrp[i] if has_off else etap[i] + wrp[i]
                b[i] = s * sw
            if _householder_least_squares(n, p, a, b, diag, newbeta):
                bad = 1
                break
            solves += 1
            for j in range(p):
                bp[j] = newbeta[j]
            for i in range(n):
                s = 0.0
                for j in range(p):
                    s += xp[i * p + j] * newbeta[j]
                neweta[i] = s + offp[i] if has_off else s
    free(a)
    return -1 if bad else solves


def response_check(int family, y, prior_w):
    """One pass over a response and its prior weights: whether families.py's
    ``Family.validate`` would pass them without an error or a warning, and the range of
    y over the rows of positive weight.

    Clean means: every y and weight finite, no weight negative, and y in the family's
    support (Bernoulli: 0 or 1; Binomial: in [0, 1] with w·y within 1e-6 of a whole
    number; Poisson and negative binomial: whole numbers >= 0; Gamma and inverse
    Gaussian: > 0; Normal: any). ``prior_w`` may be empty (unit weights).

    Returns (clean, lo, hi), lo and hi NaN when no row has a positive weight. Where it
    is not clean the caller runs the NumPy checks, which say what is wrong (their
    messages are those of the twin: ``Family.validate``). y and prior_w: C-contiguous
    float64 NumPy arrays (bound as in ``glm_irls``).
    """
    cdef Py_ssize_t n, npw, i
    cdef const double *yp = _vec(y, False, "response_check", "y", &n)
    cdef const double *pwp = _vec(prior_w, False, "response_check", "prior_w", &npw)
    cdef bint weighted = npw > 0, clean = True, seen = False
    cdef double yi, wi, k, lo = NAN, hi = NAN
    if weighted and npw != n:
        return False, NAN, NAN
    if family < 0 or family >= N_FAMILIES:
        return False, NAN, NAN
    with nogil:
        for i in range(n):
            yi = yp[i]
            wi = pwp[i] if weighted else 1.0
            if not (isfinite(yi) and isfinite(wi) and wi >= 0.0):
                clean = False
                break
            if family == FAM_BERNOULLI:
                clean = yi == 0.0 or yi == 1.0
            elif family == FAM_BINOMIAL:
                k = wi * yi
                clean = (0.0 <= yi <= 1.0
                         and not fabs(k - rint(k)) > 1e-6 * (fabs(k) if fabs(k) > 1.0 else 1.0))
            elif family == FAM_POISSON or family == FAM_NEGATIVE_BINOMIAL:
                clean = yi >= 0.0 and yi == rint(yi)
            elif family == FAM_GAMMA or family == FAM_INVERSE_GAUSSIAN:
                clean = yi > 0.0
            if not clean:
                break
            if wi > 0.0:
                if not seen:
                    lo = hi = yi
                    seen = True
                elif yi < lo:
                    lo = yi
                elif yi > hi:
                    hi = yi
    if not clean:
        return False, NAN, NAN
    return True, lo, hi


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


def loglik(int family, y, mu, prior_w, double phi, out, double param=NAN, int link=-1,
           eta=None):
    """Per-observation log densities at mean mu and dispersion phi.

    The arrays are C-contiguous float64 NumPy arrays (``out`` writable), bound as in
    ``glm_irls``.

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
    cdef Py_ssize_t n, nmu, npw, nout, neta, i
    cdef const double *yp = _vec(y, False, "loglik", "y", &n)
    cdef const double *mup = _vec(mu, False, "loglik", "mu", &nmu)
    cdef const double *pwp = _vec(prior_w, False, "loglik", "prior_w", &npw)
    cdef double *outp = _vec(out, True, "loglik", "out", &nout)
    cdef const double *etap = NULL
    cdef bint weighted = npw > 0
    cdef bint from_eta = False
    cdef double wi, v, c, total = 0.0
    _check_codes(family, 0, param)
    if eta is not None:
        etap = _vec(eta, False, "loglik", "eta", &neta)
        _check_codes(family, link, param)
        if neta != n:
            raise ValueError("loglik: eta must have the length of y")
        from_eta = ((family == FAM_BERNOULLI or family == FAM_BINOMIAL)
                    and _tail_link(link))
    if (family != FAM_BERNOULLI and family != FAM_BINOMIAL and family != FAM_POISSON
            and family != FAM_NEGATIVE_BINOMIAL):
        if not phi > 0.0:
            raise ValueError(f"dispersion phi must be positive, got {phi}")
    if nmu != n or nout != n or (weighted and npw != n):
        raise ValueError("loglik: all arrays must have the length of y "
                         "(prior_w may be empty for unit weights)")
    with nogil:
        c = _logdens_const(family, phi, param)
        for i in range(n):
            wi = pwp[i] if weighted else 1.0
            if wi == 0.0:
                v = 0.0
            elif from_eta:
                v = _binary_logdens_eta(family, link, yp[i], wi, etap[i])
            else:
                v = _logdens(family, yp[i], mup[i], wi, phi, param, c)
            outp[i] = v
            total += v
    return total


cdef double _pairwise_sum(const double *a, Py_ssize_t n) noexcept nogil:
    # numpy's pairwise summation of a contiguous float64 vector (loops_utils.h.src,
    # ``pairwise_sum``): eight running sums over blocks of up to 128, halves above
    cdef Py_ssize_t i, n2
    cdef double r0, r1, r2, r3, r4, r5, r6, r7, res
    if n < 8:
        res = -0.0
        for i in range(n):
            res += a[i]
        return res
    if n <= 128:
        r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
        i = 8
        while i < n - (n % 8):
            r0 += a[i]
            r1 += a[i + 1]
            r2 += a[i + 2]
            r3 += a[i + 3]
            r4 += a[i + 4]
            r5 += a[i + 5]
            r6 += a[i + 6]
            r7 += a[i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(a, n2) + _pairwise_sum(a + n2, n - n2)


def add_reduce(a):
    """np.add.reduce of a contiguous float64 vector, bit for bit (its twin; the
    tests hold it to it), as a Python float."""
    cdef Py_ssize_t n
    cdef const double *ap = _vec(a, False, "add_reduce", "a", &n)
    return 0.0 + _pairwise_sum(ap, n)


def saturated_loglik(int family, int link, double param, y, mu, prior_w, eta, devresid):
    """Σ ℓ_i(y_i; μ_i) + ½ Σ devresid_i, the saturated part of the log-likelihood at
    φ = 1, as glmm.py's ``_optimum`` formed it in NumPy (its twin)::

        float(np.add.reduce(family.loglik(y, mu, prior_w, 1.0, eta=eta))
              + 0.5 * np.add.reduce(devresid))

    bit for bit: the log densities of :func:`loglik` (from ``eta`` where it takes
    them from η) and numpy's pairwise summation. One call where the NumPy form made
    seven (the family's conversions and two reductions). The arrays: C-contiguous
    float64 NumPy arrays of one length (``prior_w`` may be empty)."""
    cdef Py_ssize_t n, nmu, npw, neta, ndr, i
    cdef const double *yp = _vec(y, False, "saturated_loglik", "y", &n)
    cdef const double *mup = _vec(mu, False, "saturated_loglik", "mu", &nmu)
    cdef const double *pwp = _vec(prior_w, False, "saturated_loglik", "prior_w", &npw)
    cdef const double *etap = _vec(eta, False, "saturated_loglik", "eta", &neta)
    cdef const double *drp = _vec(devresid, False, "saturated_loglik", "devresid", &ndr)
    cdef bint weighted = npw > 0, from_eta
    cdef double wi, c, ll, dev
    cdef double *out
    _check_codes(family, 0, param)
    _check_codes(family, link, param)
    if nmu != n or neta != n or ndr != n or (weighted and npw != n):
        raise ValueError("saturated_loglik: all arrays must have the length of y "
                         "(prior_w may be empty for unit weights)")
    from_eta = (family == FAM_BERNOULLI or family == FAM_BINOMIAL) and _tail_link(link)
    out = <double *> malloc((n if n > 0 else 1) * sizeof(double))
    if out == NULL:
        raise MemoryError()
    with nogil:
        c = _logdens_const(family, 1.0, param)
        for i in range(n):
            wi = pwp[i] if weighted else 1.0
            if wi == 0.0:
                out[i] = 0.0
            elif from_eta:
                out[i] = _binary_logdens_eta(family, link, yp[i], wi, etap[i])
            else:
                out[i] = _logdens(family, yp[i], mup[i], wi, 1.0, param, c)
        ll = 0.0 + _pairwise_sum(out, n)
        dev = 0.0 + _pairwise_sum(drp, n)
    free(out)
    return ll + 0.5 * dev


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


# ------------------------------------------------------------------ the compiled PIRLS
#
# Every PIRLS evaluation is one row pass (_rows_pass): the linear predictor
# η = Xβ + offset + ZΛu, the family's update at η (the loop ``update`` runs), and the
# weighted cross-products the next iteration factors: the blocks of Z'WZ, Z'W r and
# r'W r for the working response r = η - Xβ - offset + wrkresid. The cross-products are
# accumulated at every evaluation, speculatively: the last evaluation of an iteration is
# always the point the next one factors (an accepted step, or the point a failed
# step-halving falls back to), so this is what set_products computed at the top of the
# iteration, with the same arithmetic in the same row order (bit for bit), without a
# call. A halved step costs an accumulation that is thrown away; halving is rare.
#
# The pass is three tight loops over the rows (η, the family, the accumulation) rather
# than one loop doing all three per row: measured on verbagg and contra, the single loop
# ran ~10-20% slower than the three (its long per-row dependency chains, exp then log,
# leave the out-of-order window no room to overlap the gathers and scattered additions).
# The accumulation keeps the running sum of the current level in a register while
# consecutive rows share it (data sorted by a grouping factor): a sum in memory would
# cost a store-to-load forwarding per row on that chain (verbagg's 316-row runs of one
# item: 8.5 against 3.7 ns a row for its five sums). The running sum starts from the
# value in memory, so every slot still adds its rows in row order.

cdef struct Rows:
    # What the row pass reads and writes: raw pointers into arrays its owner keeps
    # alive. Row i has level codes[t * n + i] of term t and model columns
    # zcat[i * ncol + zoff[t] + a]; its contribution to the blocks of Z'WZ of term pair
    # p starts at rowoff[p * n + i] (rowoff NULL: one term, level l's block at l k²).
    Py_ssize_t n
    int nterm, npair, ncol
    bint scalar            # every term has one column
    bint wz_first          # scalar blocks summed as (w z_r) z_c, as accumulate_blocks
                           # does, rather than z_r (w z_c), as the one-term loop did
    const double *zcat
    const int *codes
    const i64 *uoff
    const int *zoff
    const int *kk
    const i64 *rowoff
    const int *pair_tr
    const int *pair_tc
    const double *y
    const double *pw       # NULL: unit prior weights
    const double *fixed    # Xβ + offset
    double *eta
    double *mu
    double *mu_eta
    double *wrkwt
    double *wrkresid
    double *devresid
    double *avals          # the blocks of Z'WZ (accumulate_blocks' layout)
    Py_ssize_t nvals
    double *ztr            # Z'W r (length q)
    Py_ssize_t q
    double *xtx            # r'W r (one value), or NULL


cdef void _eta_pass(const Rows *R, const double *b) noexcept nogil:
    """eta <- fixed + Z b (z_times' arithmetic)."""
    cdef Py_ssize_t n = R.n, i
    cdef int nterm = R.nterm, ncol = R.ncol, t, a, k
    cdef const double *zcat = R.zcat
    cdef const int *codes = R.codes
    cdef const i64 *uoff = R.uoff
    cdef const int *zoff = R.zoff
    cdef const int *kk = R.kk
    cdef const double *fixed = R.fixed
    cdef double *eta = R.eta
    cdef double s
    cdef i64 r0
    if R.scalar and nterm == 1:
        for i in range(n):
            eta[i] = fixed[i] + zcat[i * ncol] * b[uoff[0] + codes[i]]
    elif R.scalar:
        for i in range(n):
            s = fixed[i]
            for t in range(nterm):
                s += zcat[i * ncol + t] * b[uoff[t] + codes[t * n + i]]
            eta[i] = s
    else:
        for i in range(n):
            s = fixed[i]
            for t in range(nterm):
                k = kk[t]
                r0 = uoff[t] + <i64> codes[t * n + i] * k
                for a in range(k):
                    s += zcat[i * ncol + zoff[t] + a] * b[r0 + a]
            eta[i] = s


cdef void _accumulate_scalar(const Rows *R) noexcept nogil:
    """The cross-products at the current weights, every term with one column: for each
    diagonal term pair the blocks of Z_t'WZ_t and Z_t'W r in one loop (both are per
    level of t), for each other pair its blocks, each with its running sum in a
    register while the destination repeats."""
    cdef Py_ssize_t n = R.n, i
    cdef int ncol = R.ncol, p, t, tr, tc
    cdef const double *zcat = R.zcat
    cdef const double *fixed = R.fixed
    cdef const double *eta = R.eta
    cdef const double *wt = R.wrkwt
    cdef const double *wr = R.wrkresid
    cdef double *avals = R.avals
    cdef double *ztr
    cdef const int *cd
    cdef const i64 *ro
    cdef bint wz_first = R.wz_first, first_diag = True
    cdef i64 cur, o
    cdef Py_ssize_t j, curj
    cdef double z, zr, zc, w, r, va, vz, aa, az, xtx = 0.0
    for p in range(R.npair):
        tr = R.pair_tr[p]
        tc = R.pair_tc[p]
        ro = R.rowoff + p * n if R.rowoff != NULL else NULL
        if tr == tc:
            t = tr
            cd = R.codes + t * n
            ztr = R.ztr + R.uoff[t]
            curj = -1
            cur = 0
            aa = az = 0.0
            for i in range(n):
                j = cd[i]
                z = zcat[i * ncol + t]
                w = wt[i]
                r = (eta[i] - fixed[i]) + wr[i]
                va = (w * z) * z if wz_first else z * (w * z)
                vz = (z * w) * r
                if first_diag:
                    xtx += w * r * r
                if j != curj:
                    if curj >= 0:
                        avals[cur] = aa
                        ztr[curj] = az
                    curj = j
                    cur = ro[i] if ro != NULL else j
                    aa = avals[cur]
                    az = ztr[j]
                aa += va
                az += vz
            if curj >= 0:
                avals[cur] = aa
                ztr[curj] = az
            first_diag = False
        else:
            cur = -1
            aa = 0.0
            for i in range(n):
                o = ro[i]
                va = wt[i] * zcat[i * ncol + tr] * zcat[i * ncol + tc]
                if o != cur:
                    if cur >= 0:
                        avals[cur] = aa
                    cur = o
                    aa = avals[o]
                aa += va
            if cur >= 0:
                avals[cur] = aa
    if R.xtx != NULL:
        R.xtx[0] = xtx


cdef void _accumulate_blocks(const Rows *R) noexcept nogil:
    """The cross-products at the current weights, terms of several columns: the loops of
    accumulate_blocks, accumulate_zt and weighted_crossprod (the k-by-k blocks leave
    little for a running sum to save)."""
    cdef Py_ssize_t n = R.n, i
    cdef int ncol = R.ncol, p, t, a, c, k, kr, kc, zr, zc
    cdef const double *zi
    cdef i64 off, r0
    cdef double w, r, wzc, xtx = 0.0
    for p in range(R.npair):
        kr = R.kk[R.pair_tr[p]]
        kc = R.kk[R.pair_tc[p]]
        zr = R.zoff[R.pair_tr[p]]
        zc = R.zoff[R.pair_tc[p]]
        for i in range(n):
            zi = R.zcat + i * ncol
            off = R.rowoff[p * n + i] if R.rowoff != NULL else <i64> R.codes[i] * kr * kc
            w = R.wrkwt[i]
            for c in range(kc):
                wzc = w * zi[zc + c]
                for a in range(kr):
                    R.avals[off + a + c * kr] += zi[zr + a] * wzc
    for t in range(R.nterm):
        k = R.kk[t]
        for i in range(n):
            zi = R.zcat + i * ncol
            r0 = R.uoff[t] + <i64> R.codes[t * n + i] * k
            w = R.wrkwt[i]
            r = (R.eta[i] - R.fixed[i]) + R.wrkresid[i]
            for a in range(k):
                R.ztr[r0 + a] += (zi[R.zoff[t] + a] * w) * r
    if R.xtx != NULL:
        for i in range(n):
            r = (R.eta[i] - R.fixed[i]) + R.wrkresid[i]
            xtx += R.wrkwt[i] * r * r
        R.xtx[0] = xtx


cdef double _rows_pass(int family, int link, double param, Rows *R, const double *b,
                       bint accumulate) noexcept nogil:
    """η = fixed + Z b, the family at η, and (accumulate) the cross-products at the
    resulting weights; returns the deviance."""
    cdef double dev
    _eta_pass(R, b)
    dev = _update_dispatch(family, link, param, R.n, R.eta, R.y, R.pw, R.mu, R.mu_eta,
                           R.wrkwt, R.wrkresid, R.devresid)
    if accumulate:
        memset(R.avals, 0, R.nvals * sizeof(double))
        memset(R.ztr, 0, R.q * sizeof(double))
        if R.scalar:
            _accumulate_scalar(R)
        else:
            _accumulate_blocks(R)
    return dev


cdef inline double _sumsq(const double *u, Py_ssize_t m) noexcept nogil:
    cdef double s = 0.0
    cdef Py_ssize_t i
    for i in range(m):
        s += u[i] * u[i]
    return s


cdef inline void _newton_step_size(const double *unew, const double *u, Py_ssize_t q,
                                   double *step, double *usize) noexcept nogil:
    # max |unew - u| and max |u| (see _pirls.STEP_TOL)
    cdef Py_ssize_t m
    step[0] = 0.0
    usize[0] = 0.0
    for m in range(q):
        if fabs(unew[m] - u[m]) > step[0]:
            step[0] = fabs(unew[m] - u[m])
        if fabs(u[m]) > usize[0]:
            usize[0] = fabs(u[m])


cdef inline bint _is_newton(int family, int link) noexcept nogil:
    # the canonical pairs: there the working weights (the expected information) are the
    # observed information too, and PIRLS is Newton's iteration
    return ((family == FAM_BERNOULLI or family == FAM_BINOMIAL) and link == LNK_LOGIT
            or family == FAM_POISSON and link == LNK_LOG
            or family == FAM_GAMMA and link == LNK_INVERSE
            or family == FAM_INVERSE_GAUSSIAN and link == LNK_INVERSE_SQUARE
            or family == FAM_NORMAL and link == LNK_IDENTITY)


def pirls_is_newton(int family, int link):
    """Whether PIRLS is a Newton iteration for this family and link (a canonical link:
    the working weights are the observed information), not Fisher scoring."""
    return bool(_is_newton(family, link))


cdef inline bint _fisher_converged(double step, double last_step, double usize,
                                   int halvings, double step_tol,
                                   double mode_tol) noexcept nogil:
    # Fisher scoring's end (see _pirls._fisher_converged, its twin): a full step below
    # step_tol, and either the distance left at the rate of the last two steps,
    # step²/(last_step - step), below mode_tol, or steps that no longer shrink (the
    # modes' rounding); last_step < 0 before the second step
    if not step <= step_tol * (1.0 + usize):
        return False
    return ((halvings == 0 and step * step <= mode_tol * (1.0 + usize) * (last_step - step))
            or 0.0 <= last_step <= step)


cdef inline bint _extrapolation(const double *u, const double *uold, const double *last_vec,
                                bint have_last, Py_ssize_t q, double *factor) noexcept nogil:
    # Fisher scoring's step s = u - uold and the one before it, last_vec: where they are
    # nearly parallel at a ratio 0.5 <= |λ| < 1, factor <- λ/(1 - λ) (the limit along s
    # is u + factor s) and True (see _pirls._extrapolation, its twin)
    cdef double ss = 0.0, sp = 0.0, pp = 0.0, d, lam
    cdef Py_ssize_t m
    if not have_last:
        return False
    for m in range(q):
        d = u[m] - uold[m]
        ss += d * d
        sp += d * last_vec[m]
        pp += last_vec[m] * last_vec[m]
    if not pp > 0.0:
        return False
    lam = sp / pp
    # ‖s - λ last_vec‖² = ss - λ sp
    if not (0.5 <= fabs(lam) < 1.0 and ss - lam * sp <= 0.09 * ss):
        return False
    factor[0] = lam / (1.0 - lam)
    return True


cdef int _check_levels(const int *codes, Py_ssize_t n, Py_ssize_t nlev, str name) except -1:
    cdef Py_ssize_t i
    cdef int bad = 0
    with nogil:
        for i in range(n):
            if codes[i] < 0 or codes[i] >= nlev:
                bad = 1
    if bad:
        raise ValueError(f"{name}: a level code is outside 0..{nlev - 1}")
    return 0


def pirls_blockdiag(int family, int link, const double[::1] fixed, const double[:, ::1] z,
                    const int[::1] codes, const double[::1] y, const double[::1] prior_w,
                    const double[::1] lam, double[::1] u, double[::1] lblocks,
                    double[::1] eta, double[::1] mu, double[::1] mu_eta, double[::1] wrkwt,
                    double[::1] wrkresid, double[::1] devresid,
                    double tol=1e-13, int maxiter=100, int max_halving=30,
                    double step_tol=1e-9, double param=NAN, double mode_tol=1e-12):
    """PIRLS over u for a model with one random-effects term, β held fixed.

    Parameters
    ----------
    fixed : Xβ + offset.  z : the term's columns (n-by-k).  codes : level of each row.
    lam : the term's template T (k-by-k, column-major).  u : start, overwritten by the
    modes.  lblocks : out, the factor chol(T'A_l T + I) per level at the modes (the
    working weights evaluated at the modes).  eta ... devresid : out, the response side
    at the modes.  param : the family's own parameter (negative binomial theta), as in
    ``update``.  step_tol, mode_tol : see mixedmodels._pirls (STEP_TOL, MODE_TOL).

    Returns
    -------
    (logdet, deviance, iterations, converged) with logdet = Σ log diag(L).

    Notes
    -----
    Each iteration solves (Λ'Z'WZΛ + I) u = Λ'Z'W(ZΛu + wrkresid) level by level and
    halves a step that raises the penalized deviance Σ dev_i + ||u||². The same
    algorithm as mixedmodels._pirls.pirls (its NumPy-level twin), in one compiled loop;
    each evaluation is one fused pass over the rows (see _rows_pass).
    """
    _check_codes(family, link, param)
    cdef Py_ssize_t n = fixed.shape[0], nlev, q, l, m
    cdef int k = z.shape[1], it = 0, halvings, a, c, nlev_i
    cdef bint converged = False, newton = _is_newton(family, link)
    cdef double dev, pdev, new_dev = 0.0, new_pdev, logdet = 0.0, s
    cdef double step = 0.0, usize = 0.0, last_step = -1.0, factor, far_dev, far_pdev
    cdef bint have_last = False
    cdef i64 zero64 = 0
    cdef int zero = 0
    cdef Rows R
    q = u.shape[0]
    if k < 1:
        raise ValueError("pirls_blockdiag: z has no columns")
    nlev = q // k
    if (lam.shape[0] != k * k or lblocks.shape[0] != nlev * k * k or q != nlev * k
            or nlev > 2147483647 or codes.shape[0] != n or z.shape[0] != n):
        raise ValueError("pirls_blockdiag: inconsistent sizes")
    if (y.shape[0] != n or eta.shape[0] != n or mu.shape[0] != n or mu_eta.shape[0] != n
            or wrkwt.shape[0] != n or wrkresid.shape[0] != n or devresid.shape[0] != n
            or (prior_w.shape[0] != 0 and prior_w.shape[0] != n)):
        raise ValueError("pirls_blockdiag: per-observation arrays differ in length")
    if n == 0 or q == 0:
        raise ValueError("pirls_blockdiag: no observations or no random effects")
    _check_levels(&codes[0], n, nlev, "pirls_blockdiag")
    nlev_i = <int> nlev
    cdef double *ablk = <double *> malloc((nlev * k * k + 5 * q + k * k) * sizeof(double))
    if ablk == NULL:
        raise MemoryError()
    cdef double *rhs = ablk + nlev * k * k
    cdef double *unew = rhs + q
    cdef double *uold = unew + q
    cdef double *b = uold + q
    cdef double *tmp = b + q
    cdef double *last_vec = tmp + k * k     # the last step taken whole (Fisher scoring)
    R.n = n
    R.nterm = 1
    R.npair = 1
    R.ncol = k
    R.scalar = k == 1
    R.wz_first = False
    R.zcat = &z[0, 0]
    R.codes = &codes[0]
    R.uoff = &zero64
    R.zoff = &zero
    R.kk = &k
    R.rowoff = NULL
    R.pair_tr = &zero
    R.pair_tc = &zero
    R.y = &y[0]
    R.pw = &prior_w[0] if prior_w.shape[0] > 0 else NULL
    R.fixed = &fixed[0]
    R.eta = &eta[0]
    R.mu = &mu[0]
    R.mu_eta = &mu_eta[0]
    R.wrkwt = &wrkwt[0]
    R.wrkresid = &wrkresid[0]
    R.devresid = &devresid[0]
    R.avals = ablk
    R.nvals = nlev * k * k
    R.ztr = rhs
    R.q = q
    R.xtx = NULL
    with nogil:
        lambda_times_c(&lam[0], &zero64, &zero64, &k, &nlev_i, 1, &u[0], b)
        dev = _rows_pass(family, link, param, &R, b, True)
        pdev = dev + _sumsq(&u[0], q)
        while True:
            # the cross-products of the last evaluation are the ones at u
            logdet = blockdiag_factor_c(ablk, &lam[0], k, nlev, &lblocks[0], tmp)
            if converged or it >= maxiter or logdet != logdet:
                break
            it += 1
            # unew <- M⁻¹ T' rhs, M = L L'
            for l in range(nlev):
                for a in range(k):
                    s = 0.0
                    for c in range(a, k):
                        s += lam[c + a * k] * rhs[l * k + c]
                    unew[l * k + a] = s
            blockdiag_solve_c(&lblocks[0], k, nlev, unew, False)
            blockdiag_solve_c(&lblocks[0], k, nlev, unew, True)
            for m in range(q):
                uold[m] = u[m]
            # the full Newton step's size, and the modes' (see _pirls.STEP_TOL)
            _newton_step_size(unew, uold, q, &step, &usize)
            lambda_times_c(&lam[0], &zero64, &zero64, &k, &nlev_i, 1, unew, b)
            new_dev = _rows_pass(family, link, param, &R, b, True)
            new_pdev = new_dev + _sumsq(unew, q)
            halvings = 0
            while not (new_pdev <= pdev * (1.0 + 1e-12) + 1e-12) and halvings < max_halving:
                for m in range(q):
                    unew[m] = 0.5 * (uold[m] + unew[m])
                lambda_times_c(&lam[0], &zero64, &zero64, &k, &nlev_i, 1, unew, b)
                new_dev = _rows_pass(family, link, param, &R, b, True)
                new_pdev = new_dev + _sumsq(unew, q)
                halvings += 1
            if halvings == max_halving:
                # no step lowers the penalized deviance: stay at the previous modes
                lambda_times_c(&lam[0], &zero64, &zero64, &k, &nlev_i, 1, &u[0], b)
                dev = _rows_pass(family, link, param, &R, b, True)
                converged = True
                continue
            if newton:
                converged = (fabs(pdev - new_pdev) <= tol * fabs(new_pdev) + tol
                             or (halvings == 0 and step <= step_tol * (1.0 + usize)))
            else:
                converged = _fisher_converged(step, last_step, usize, halvings, step_tol,
                                              mode_tol)
            last_step = step
            for m in range(q):
                u[m] = unew[m]
            pdev = new_pdev
            dev = new_dev
            if not (newton or converged):
                # along the one direction that dominates a slow rate, on to the limit
                # (see _pirls: _extrapolation)
                if halvings == 0 and _extrapolation(&u[0], uold, last_vec, have_last, q,
                                                    &factor):
                    for m in range(q):
                        unew[m] = u[m] + factor * (u[m] - uold[m])
                    lambda_times_c(&lam[0], &zero64, &zero64, &k, &nlev_i, 1, unew, b)
                    far_dev = _rows_pass(family, link, param, &R, b, True)
                    far_pdev = far_dev + _sumsq(unew, q)
                    if far_pdev <= pdev * (1.0 + 1e-12) + 1e-12:
                        for m in range(q):
                            u[m] = unew[m]
                        pdev = far_pdev
                        dev = far_dev
                        last_step = -1.0
                        have_last = False
                        continue
                    lambda_times_c(&lam[0], &zero64, &zero64, &k, &nlev_i, 1, &u[0], b)
                    _rows_pass(family, link, param, &R, b, True)
                have_last = halvings == 0
                for m in range(q):
                    last_vec[m] = u[m] - uold[m]
    free(ablk)
    return logdet, dev, it, bool(converged)


# laplace's warm start moves the modes by their first-order change up to this much
# (see PirlsKernel._save_sensitivity)
cdef void _matvec_rows(Py_ssize_t n, Py_ssize_t p, const double *x, const double *b,
                       const double *off, double *out) noexcept nogil:
    """out <- off + x b (x row-major n-by-p), row by row as _blocked.matvec sums (bit for
    bit), four rows at a time: their sums are independent chains, which one row's are
    not."""
    cdef Py_ssize_t i = 0, j
    cdef double s0, s1, s2, s3, bj
    while i + 4 <= n:
        s0, s1, s2, s3 = off[i], off[i + 1], off[i + 2], off[i + 3]
        for j in range(p):
            bj = b[j]
            s0 += x[i * p + j] * bj
            s1 += x[(i + 1) * p + j] * bj
            s2 += x[(i + 2) * p + j] * bj
            s3 += x[(i + 3) * p + j] * bj
        out[i], out[i + 1], out[i + 2], out[i + 3] = s0, s1, s2, s3
        i += 4
    while i < n:
        s0 = off[i]
        for j in range(p):
            s0 += x[i * p + j] * b[j]
        out[i] = s0
        i += 1


cdef double MAX_PREDICTED_STEP = 0.5

# the compiled PIRLS releases the GIL in its passes over the rows from this many rows
cdef Py_ssize_t RELEASE_GIL_ROWS = 1000


def max_predicted_step(value=None):
    """The largest first-order change of a mode that laplace's warm start applies (0:
    start from the last modes, as ``pirls`` does); ``value`` sets it. Returns the setting
    in force."""
    global MAX_PREDICTED_STEP
    if value is not None:
        MAX_PREDICTED_STEP = float(value)
    return MAX_PREDICTED_STEP


cdef enum:
    _F64 = 0
    _I32 = 1
    _I64 = 2


cdef void *_data_of(object a, int kind, int ndim, bint fortran, bint writable, str who,
                    str name, cnp.npy_intp *dims) except? NULL:
    # the data of a NumPy array a kernel binds, checked as a typed memoryview of its
    # kind would be (float64, or a signed integer of 4 or 8 bytes; C order, or Fortran
    # with ``fortran``; writable where written), and its shape into dims. (Acquiring a
    # memoryview goes through the buffer protocol and makes a Cython memoryview object:
    # a C path of its own, paid cold on every small fit while any argument still takes it.)
    cdef cnp.ndarray arr
    cdef bint ok
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{who}: {name} must be a NumPy array")
    arr = <cnp.ndarray> a
    if kind == _F64:
        ok = cnp.PyArray_TYPE(arr) == cnp.NPY_DOUBLE
    else:
        ok = (cnp.PyArray_ISINTEGER(arr) and cnp.PyArray_ISSIGNED(arr)
              and cnp.PyArray_ITEMSIZE(arr) == (4 if kind == _I32 else 8))
    if not (ok and cnp.PyArray_NDIM(arr) == ndim and cnp.PyArray_ISNOTSWAPPED(arr)
            and cnp.PyArray_ISALIGNED(arr)):
        raise ValueError(f"{who}: {name} must be a {ndim}-d array of "
                         f"{('float64', 'int32', 'int64')[kind]}")
    if not (cnp.PyArray_IS_F_CONTIGUOUS(arr) if fortran else cnp.PyArray_IS_C_CONTIGUOUS(arr)):
        raise ValueError(f"{who}: {name} must be contiguous")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{who}: {name} must be writable")
    dims[0] = cnp.PyArray_DIM(arr, 0)
    if ndim == 2:
        dims[1] = cnp.PyArray_DIM(arr, 1)
    return cnp.PyArray_DATA(arr)


cdef void *_data(object a, int kind, int ndim, bint fortran, bint writable, str name,
                 cnp.npy_intp *dims) except? NULL:
    return _data_of(a, kind, ndim, fortran, writable, "PirlsKernel", name, dims)


cdef inline double *_vec(object a, bint writable, str who, str name,
                        Py_ssize_t *n) except? NULL:
    # a float64 vector bound as ``const double[::1]`` (``double[::1]``: writable) would
    # be, its length into n
    cdef cnp.npy_intp d[2]
    cdef void *data
    n[0] = 0
    data = _data_of(a, _F64, 1, False, writable, who, name, d)
    n[0] = d[0]
    return <double *> data


cdef object _zeros(Py_ssize_t n, int typenum):
    # a new array of n zeros (n < 0: a 0-d one)
    cdef cnp.npy_intp d[1]
    d[0] = n
    return cnp.PyArray_ZEROS(0 if n < 0 else 1, d, typenum, 0)


cdef void *_rows(object a, bint writable, str name, Py_ssize_t n) except? NULL:
    # a float64 vector of the kernel's n rows
    cdef cnp.npy_intp d[2]
    cdef void *data = _data(a, _F64, 1, False, writable, name, d)
    if d[0] != n:
        raise ValueError(f"PirlsKernel: {name} has {d[0]} rows, the design {n}")
    return data


cdef struct LaplaceSearch:
    # what ``PirlsKernel.trust_region``'s evaluations share: the kernel (borrowed), the
    # family, the modes and their copy, PIRLS's settings, and the best evaluation so far
    void *kernel
    int family, link, maxiter, max_halving
    double param, tol, step_tol
    const double *pw
    Py_ssize_t p, nth, q
    double *u
    double *ubak
    void *exhausted             # a list (borrowed): the θ at which PIRLS ran out
    bint first                  # no evaluation yet
    bint last_is_best           # the kernel's state is that of the best evaluation
    double *block               # p by p: 2 X̃'WX̃'s Schur complement at the start
    Py_ssize_t nb               # p, or 0 where that block could not be made
    bint found
    double best_value, best_logdet
    double *best_x
    double *best_grad
    double *best_u


cdef int _laplace_search_step(void *context, const double *x, double *f,
                              double *g) except -1:
    # the Laplace deviance and its gradient at x = [β, θ] from the modes in u; where a
    # random-effects block is not positive definite, u is left as it was and f = inf
    cdef LaplaceSearch *ls = <LaplaceSearch *> context
    cdef double out[6]
    cdef Py_ssize_t n = ls.p + ls.nth, i
    ls.last_is_best = False
    memcpy(ls.ubak, ls.u, ls.q * sizeof(double))
    try:
        (<PirlsKernel> ls.kernel)._laplace_at(ls.family, ls.link, ls.param, ls.pw,
                                              x + ls.p, ls.nth, x, ls.p, ls.u, ls.q, g,
                                              ls.tol, ls.maxiter, ls.max_halving,
                                              ls.step_tol, out)
    except np.linalg.LinAlgError:
        memcpy(ls.u, ls.ubak, ls.q * sizeof(double))
        memset(g, 0, n * sizeof(double))
        f[0] = INFINITY
        return 0
    f[0] = out[0]
    if ls.first:
        # the deviance's curvature in β̃ at the start, twice the Schur complement of the
        # modes' factor (the check's β block): the search's first model has it, and
        # reaches the optimum in about a third fewer evaluations (see _glmm_search.py)
        ls.first = False
        if isfinite(out[0]) and ls.p > 0:
            try:
                schur, _ = (<PirlsKernel> ls.kernel).beta_covariance(_copy_of(x + ls.p,
                                                                              ls.nth))
                for i in range(ls.p * ls.p):
                    ls.block[i] = 2.0 * (<double *> cnp.PyArray_DATA(<cnp.ndarray> schur))[i]
                ls.nb = ls.p
            except np.linalg.LinAlgError:
                ls.nb = 0
    if out[5]:
        (<list> ls.exhausted).append(_copy_of(x + ls.p, ls.nth))
    if isfinite(out[0]) and (not ls.found or out[0] < ls.best_value):
        ls.found = True
        ls.last_is_best = True
        ls.best_value, ls.best_logdet = out[0], out[1]
        memcpy(ls.best_x, x, n * sizeof(double))
        memcpy(ls.best_grad, g, n * sizeof(double))
        memcpy(ls.best_u, ls.u, ls.q * sizeof(double))
    return 0


cdef object _copy_of(const double *v, Py_ssize_t n):
    cdef object a = _zeros(n, cnp.NPY_DOUBLE)
    if n:
        memcpy(cnp.PyArray_DATA(<cnp.ndarray> a), v, n * sizeof(double))
    return a


cdef class PirlsKernel:
    """PIRLS over u (β fixed) for any blocked system, in compiled code.

    Binds, once per model, the rows of the random-effects design (a BlockPattern), the
    workspace's cross-product arrays and factorizer, and the per-observation arrays of
    the PIRLS state; :meth:`pirls` then runs the loop of mixedmodels._pirls.pirls
    (``vary_beta=False``; that Python loop is its twin) with one row pass per evaluation
    (_rows_pass) and the factorization through the factorizer, so an iteration makes no
    Python call of its own (a CHOLMOD or dense-tail factor's methods are still called
    through Python). Where the workspace's factor is a simplicial CHOLMOD one, the
    factorizations before the last are its SimplicialFactor's (_blocked.pyx), the last
    (at the modes) CHOLMOD's. On return the workspace holds the cross-products and the
    factorization at the modes, and the state arrays the response side there, as after
    the Python loop.

    Bound to X and the offset too (``x``, ``offset``), it forms fixed = Xβ + offset
    itself (``beta``), and :meth:`laplace` runs PIRLS and, for one term, the gradient of
    the Laplace deviance at the modes in one call (_gradient.pyx's
    ``blockdiag_laplace_gradient_c``, on the level blocks the last evaluation left).

    Parameters
    ----------
    pattern : _pattern.BlockPattern (with its rows)
    lam_off : where each term's template starts in the factorizer's ``lam`` (the
        workspace's ``layout.lam_off``)
    factorizer : _blocked.ThetaFactorizer of the workspace, bound to ``avals``,
        ``ztxy``, ``xtxy`` and ``rzxy``
    avals, ztxy, xtxy, rzxy : the workspace's arrays for one column (ztxy, rzxy q-by-1
        Fortran, xtxy 1-by-1)
    y, fixed, eta, mu, mu_eta, wrkwt, wrkresid, devresid : length n; fixed = Xβ + offset
        is read (written where β is given), the others (but y) written
    x, offset : optional, X (n-by-p, C order) and the offset (length n)
    lam_index : optional, where each θ sits in ``lam`` (the layout's ``index``): the
        gradient's order of θ
    """
    cdef Rows R
    cdef object tf
    # the arrays the kernel reads and writes, by their data (their shapes below): bound
    # once per model, where typed memoryviews cost ~0.5 µs each warm, and their
    # acquisition machinery tens of µs cold, on a 56-row fit
    cdef object pattern_arrays       # keeps the pattern's arrays alive
    cdef const double *zcat          # n x ncol, C order
    cdef const int *codes            # nterm x n
    cdef const i64 *rowoff           # npair x n
    cdef const i64 *uoff
    cdef const i64 *lam_off
    cdef const i64 *lam_index
    cdef const int *zoff
    cdef const int *kk
    cdef const int *nlev
    cdef const int *pair_tr
    cdef const int *pair_tc
    cdef const double *y
    cdef double *fixed
    cdef double *eta
    cdef double *mu
    cdef double *mu_eta
    cdef double *wrkwt
    cdef double *wrkresid
    cdef double *devresid
    cdef double *avals
    cdef double *ztxy                # q x 1
    cdef double *rzxy                # q x 1
    cdef double *xtxy                # 1 x 1
    cdef const double *xmat          # n x p, C order
    cdef const double *offset
    cdef Py_ssize_t p                # X's columns
    cdef Py_ssize_t nth              # lam_index's length
    cdef Py_ssize_t navals
    cdef bint has_x, has_lam_index
    cdef object ubuf_arr
    cdef double *ubuf
    cdef readonly object arrays      # what the kernel is bound to (see ``bound_to``)
    cdef double *buf
    cdef double *gwork               # the one-term gradient's scratch (NULL: not yet)
    cdef double *pred                # the modes' sensitivity, for laplace's warm start
    cdef bint pred_ok                # pred holds that of the last laplace call
    cdef const double *pred_pw       # and the prior weights it was made with
    cdef double *lam             # the factorizer's templates (set from θ by each call)
    cdef Py_ssize_t q
    cdef bint release_gil        # whether the loops let other threads run (many rows)

    def __cinit__(self, *args, **kwargs):
        self.buf = NULL
        self.gwork = NULL
        self.pred = NULL
        self.pred_ok = False

    def __dealloc__(self):
        free(self.buf)
        free(self.gwork)
        free(self.pred)

    def __init__(self, pattern, lam_off, factorizer, avals, ztxy, xtxy, rzxy, y,
                 fixed, eta, mu, mu_eta, wrkwt, wrkresid, devresid, x=None, offset=None,
                 lam_index=None):
        cdef Py_ssize_t n, t, p, i, q, nterm, npair, ncol
        cdef cnp.npy_intp d[2]
        cdef cnp.npy_intp dn[2]
        self.tf = factorizer
        self.lam = tf_lam(factorizer)
        zcat, codes, rowoff = pattern.zcat, pattern.codes, pattern.rowoff
        uoff, zoff, kk, nlev = pattern.uoff, pattern.zoff, pattern.kk, pattern.nlev
        pair_tr, pair_tc = pattern.pair_tr, pattern.pair_tc
        self.pattern_arrays = (zcat, codes, rowoff, uoff, zoff, kk, nlev, pair_tr, pair_tc,
                               lam_off, lam_index)
        self.zcat = <const double *> _data(zcat, _F64, 2, False, False, "zcat", d)
        n, ncol = d[0], d[1]
        self.codes = <const int *> _data(codes, _I32, 2, False, False, "codes", d)
        nterm = d[0]
        if d[1] != n:
            raise ValueError("PirlsKernel: inconsistent pattern")
        self.rowoff = <const i64 *> _data(rowoff, _I64, 2, False, False, "rowoff", d)
        npair = d[0]
        if d[1] != n or npair == 0:
            raise ValueError("PirlsKernel: inconsistent pattern")
        for a, name, typenum, size in (
                (uoff, "uoff", _I64, nterm), (lam_off, "lam_off", _I64, nterm),
                (zoff, "zoff", _I32, nterm), (kk, "kk", _I32, nterm),
                (nlev, "nlev", _I32, nterm), (pair_tr, "pair_tr", _I32, npair),
                (pair_tc, "pair_tc", _I32, npair)):
            _data(a, typenum, 1, False, False, name, d)
            if d[0] != size:
                raise ValueError("PirlsKernel: inconsistent pattern")
        self.uoff = <const i64 *> _data(uoff, _I64, 1, False, False, "uoff", d)
        self.lam_off = <const i64 *> _data(lam_off, _I64, 1, False, False, "lam_off", d)
        self.zoff = <const int *> _data(zoff, _I32, 1, False, False, "zoff", d)
        self.kk = <const int *> _data(kk, _I32, 1, False, False, "kk", d)
        self.nlev = <const int *> _data(nlev, _I32, 1, False, False, "nlev", d)
        self.pair_tr = <const int *> _data(pair_tr, _I32, 1, False, False, "pair_tr", d)
        self.pair_tc = <const int *> _data(pair_tc, _I32, 1, False, False, "pair_tc", d)
        self.avals = <double *> _data(avals, _F64, 1, False, True, "avals", d)
        self.navals = d[0]
        # the workspace's products for one column: ztxy, rzxy q x 1, xtxy 1 x 1
        self.ztxy = <double *> _data(ztxy, _F64, 2, True, True, "ztxy", d)
        self.rzxy = <double *> _data(rzxy, _F64, 2, True, True, "rzxy", dn)
        q = int(pattern.q)
        if d[0] != q or d[1] != 1 or dn[0] != q or dn[1] != 1:
            raise ValueError("PirlsKernel: the workspace's products must be for one column")
        self.xtxy = <double *> _data(xtxy, _F64, 2, False, True, "xtxy", d)
        if d[0] != 1 or d[1] != 1:
            raise ValueError("PirlsKernel: the workspace's products must be for one column")
        self.y = <const double *> _rows(y, False, "y", n)
        self.fixed = <double *> _rows(fixed, True, "fixed", n)
        self.eta = <double *> _rows(eta, True, "eta", n)
        self.mu = <double *> _rows(mu, True, "mu", n)
        self.mu_eta = <double *> _rows(mu_eta, True, "mu_eta", n)
        self.wrkwt = <double *> _rows(wrkwt, True, "wrkwt", n)
        self.wrkresid = <double *> _rows(wrkresid, True, "wrkresid", n)
        self.devresid = <double *> _rows(devresid, True, "devresid", n)
        self.has_x = x is not None
        self.p = 0
        if self.has_x:
            self.xmat = <const double *> _data(x, _F64, 2, False, False, "x", d)
            self.p = d[1]
            self.offset = <const double *> _data(offset, _F64, 1, False, False, "offset", dn)
            if d[0] != n or dn[0] != n:
                raise ValueError("PirlsKernel: X and the offset must have a row per "
                                 "observation")
        self.has_lam_index = lam_index is not None
        self.nth = 0
        if self.has_lam_index:
            self.lam_index = <const i64 *> _data(lam_index, _I64, 1, False, False,
                                                 "lam_index", d)
            self.nth = d[0]
        self.arrays = (avals, ztxy, xtxy, rzxy, y, x, offset, fixed, eta, mu, mu_eta, wrkwt,
                       wrkresid, devresid)
        R = &self.R
        R.n = n
        R.nterm = <int> nterm
        R.npair = <int> npair
        R.ncol = <int> ncol
        self._check_shapes(n, q, nterm)
        self.q = q
        # releasing the GIL costs ~0.1 µs (a mutex each way), a tenth of a pass over 50
        # rows: only where the passes are long enough for other threads to gain from it
        self.release_gil = n >= RELEASE_GIL_ROWS
        d[0], d[1] = q, 1
        self.ubuf_arr = cnp.PyArray_ZEROS(2, d, cnp.NPY_DOUBLE, 1)     # q x 1, Fortran
        self.ubuf = <double *> cnp.PyArray_DATA(<cnp.ndarray> self.ubuf_arr)
        # unew, uold, Λu (the 3q + 1 it always had), then Fisher scoring's last step
        self.buf = <double *> malloc((4 * q + 1) * sizeof(double))
        if self.buf == NULL:
            raise MemoryError()
        R.scalar = True
        for t in range(nterm):
            R.scalar = R.scalar and self.kk[t] == 1
        # one term: the arithmetic of pirls_blockdiag (the results of that path stay as
        # they were); several: that of accumulate_blocks (set_products')
        R.wz_first = nterm > 1
        R.zcat = self.zcat
        R.codes = self.codes
        R.uoff = self.uoff
        R.zoff = self.zoff
        R.kk = self.kk
        R.rowoff = self.rowoff
        R.pair_tr = self.pair_tr
        R.pair_tc = self.pair_tc
        R.y = self.y
        R.pw = NULL
        R.fixed = self.fixed
        R.eta = self.eta
        R.mu = self.mu
        R.mu_eta = self.mu_eta
        R.wrkwt = self.wrkwt
        R.wrkresid = self.wrkresid
        R.devresid = self.devresid
        R.avals = self.avals
        R.nvals = self.navals
        R.ztr = self.ztxy
        R.q = q
        R.xtx = self.xtxy

    cdef int _check_shapes(self, Py_ssize_t n, Py_ssize_t q, Py_ssize_t nterm) except -1:
        # everything the fused pass indexes without bounds checks, checked once here
        # (the arrays' own shapes by __init__)
        cdef Py_ssize_t t, p, i, width, nlam, npair = self.R.npair
        cdef i64 hi
        if n == 0 or q == 0 or nterm == 0:
            raise ValueError("PirlsKernel: no observations or no random effects")
        nlam = tf_lam_size(self.tf)
        for t in range(nterm):
            if (self.kk[t] < 1 or self.zoff[t] < 0 or self.zoff[t] + self.kk[t] > self.R.ncol
                    or self.uoff[t] < 0 or self.uoff[t] + <i64> self.kk[t] * self.nlev[t] > q
                    or self.lam_off[t] < 0 or self.lam_off[t] + self.kk[t] * self.kk[t] > nlam):
                raise ValueError("PirlsKernel: inconsistent pattern")
            _check_levels(self.codes + t * n, n, self.nlev[t], "PirlsKernel")
        for i in range(self.nth):
            if not 0 <= self.lam_index[i] < nlam:
                raise ValueError("PirlsKernel: a theta index is outside the templates")
        for p in range(npair):
            if not (0 <= self.pair_tr[p] < nterm and 0 <= self.pair_tc[p] < nterm):
                raise ValueError("PirlsKernel: inconsistent pattern")
            width = self.kk[self.pair_tr[p]] * self.kk[self.pair_tc[p]]
            hi = self.navals - width
            for i in range(n):
                if self.rowoff[p * n + i] < 0 or self.rowoff[p * n + i] > hi:
                    raise ValueError("PirlsKernel: a block offset is outside avals")
        return 0

    def bound_to(self, avals, ztxy, xtxy, rzxy, y, x=None, offset=None):
        """Whether the kernel writes into these very arrays (a workspace reallocates its
        products when the number of columns changes) and reads this X and offset."""
        mine = self.arrays
        return (mine[0] is avals and mine[1] is ztxy and mine[2] is xtxy
                and mine[3] is rzxy and mine[4] is y and mine[5] is x and mine[6] is offset)

    cdef double _evaluate(self, int family, int link, double param, const double *u,
                          bint accumulate) noexcept nogil:
        cdef double *b = self.buf + 2 * self.q
        lambda_times_c(self.lam, self.lam_off, self.uoff, self.kk,
                       self.nlev, self.R.nterm, u, b)
        return _rows_pass(family, link, param, &self.R, b, accumulate)

    cdef const double *_weights(self, object prior_w) except? NULL:
        # the prior weights' data, NULL for unit weights (an empty array)
        cdef Py_ssize_t npw
        cdef const double *pw = _vec(prior_w, False, "PirlsKernel", "prior_w", &npw)
        if npw != 0 and npw != self.R.n:
            raise ValueError("PirlsKernel: prior_w must have one weight per row (or none)")
        return pw if npw > 0 else NULL

    cdef int _set_theta(self, object theta) except -1:
        # θ into the factorizer's templates: through the kernel's own lam_index where it
        # has one (layout.index, the factorizer's too), else the factorizer's setter
        cdef Py_ssize_t nt
        cdef const double *t
        if not self.has_lam_index:
            return tf_set_theta(self.tf, theta)
        t = _vec(theta, False, "PirlsKernel", "theta", &nt)
        return self._theta_at(t, nt)

    cdef int _theta_at(self, const double *theta, Py_ssize_t nt) except -1:
        cdef Py_ssize_t i
        if nt != self.nth:
            raise ValueError("theta has the wrong length")
        for i in range(nt):
            self.lam[self.lam_index[i]] = theta[i]
        return 0

    cdef int _set_fixed(self, const double *beta, Py_ssize_t nbeta) except -1:
        # fixed <- offset + Xβ (_matvec_rows)
        cdef Py_ssize_t n = self.R.n, p
        cdef const double *x
        cdef const double *off
        cdef const double *b
        cdef double *out
        if not self.has_x:
            raise ValueError("PirlsKernel: bound without X; set fixed = Xβ + offset instead")
        p = self.p
        if nbeta != p:
            raise ValueError(f"beta has {nbeta} entries; X has {p} columns")
        off = self.offset
        out = self.fixed
        x = self.xmat if p > 0 else NULL
        b = beta if p > 0 else NULL
        if self.release_gil:
            with nogil:
                _matvec_rows(n, p, x, b, off, out)
        else:
            _matvec_rows(n, p, x, b, off, out)
        return 0

    def evaluate(self, int family, int link, double param, prior_w, theta, u,
                 bint accumulate=True):
        """One fused pass at θ and u: η = fixed + ZΛu into eta, the family's update into
        mu ... devresid, and (accumulate) the cross-products Z'WZ, Z'Wr, r'Wr at the new
        weights into the workspace's avals, ztxy and xtxy. Returns the deviance.
        NumPy: system.linear_predictor, families.Family.update, system.set_products."""
        cdef Py_ssize_t nu
        cdef const double *up = _vec(u, False, "PirlsKernel", "u", &nu)
        cdef double dev
        _check_codes(family, link, param)
        if nu != self.q:
            raise ValueError(f"u has {nu} entries; the model has {self.q}")
        self._set_theta(theta)
        self.R.pw = self._weights(prior_w)
        with nogil:
            dev = self._evaluate(family, link, param, up, accumulate)
        self.R.pw = NULL
        return dev

    def pirls(self, int family, int link, double param, prior_w, theta, u, double tol=1e-13,
              int maxiter=100, int max_halving=30, double step_tol=1e-9, beta=None,
              double mode_tol=1e-12):
        """PIRLS over u from u (overwritten by the modes), as mixedmodels._pirls.pirls
        with ``vary_beta=False``; ``fixed`` must hold Xβ + offset, or ``beta`` be given
        (the kernel bound to X and the offset: fixed is formed here). step_tol and
        mode_tol: mixedmodels._pirls's STEP_TOL and MODE_TOL.

        Returns (logdet, deviance, iterations, converged, exhausted): log det(L) of the
        last factorization, the deviance at the modes, the Newton steps taken, the
        convergence flag, and whether the loop ran out of iterations (the Python loop
        warns then). Raises numpy.linalg.LinAlgError where the random-effects block is
        not positive definite. One difference from the Python loop, where it ran out of
        iterations only: the cross-products are then those of the last evaluation (at
        the modes returned), not those of the last factorization (one step before).
        """
        cdef double out[5]
        cdef double *up = self._prepare(family, link, param, prior_w, theta, u, beta)
        try:
            self._pirls(family, link, param, up, tol, maxiter, max_halving, step_tol,
                        mode_tol, out)
        finally:
            self.R.pw = NULL
        return out[0], out[1], int(out[2]), bool(out[3]), bool(out[4])

    def laplace(self, int family, int link, double param, prior_w, theta, beta, u, grad,
                double tol=1e-13, int maxiter=100, int max_halving=30, double step_tol=1e-9):
        """The Laplace deviance of a one-term GLMM with a canonical link and its gradient
        over (β, θ): fixed = Xβ + offset, PIRLS from u (overwritten by the modes), and
        at the modes _gradient.pyx's ``blockdiag_laplace_gradient_c`` into ``grad``
        (p + ntheta; θ in the order of ``lam_index``).

        Returns (value, logdet, deviance, iterations, converged, exhausted) with value =
        deviance + u'u + 2 logdet (mixedmodels.glmm's ``_value``); the rest as
        :meth:`pirls`. Bernoulli and Binomial with the logit link, Poisson with the log
        link only (the gradient's W' = dW/dη is theirs). NumPy: glmm's ``_value`` and
        _gradient._gradient_at_modes_numpy.
        """
        cdef double out[6]
        cdef Py_ssize_t p, nth, ng, nt, nb, nu
        cdef const double *pw
        cdef const double *tp
        cdef const double *bp
        cdef double *up
        cdef double *gp
        if not ((family == FAM_BERNOULLI or family == FAM_BINOMIAL) and link == LNK_LOGIT
                or family == FAM_POISSON and link == LNK_LOG):
            raise ValueError("laplace: Bernoulli or Binomial with the logit link, or Poisson "
                             "with the log link")
        if self.R.nterm != 1 or not self.has_x or not self.has_lam_index:
            raise ValueError("laplace: one random-effects term, and a kernel bound to X, "
                             "the offset and the theta indices")
        p = self.p
        nth = self.nth
        pw = self._weights(prior_w)
        tp = _vec(theta, False, "PirlsKernel", "theta", &nt)
        bp = _vec(beta, False, "PirlsKernel", "beta", &nb)
        up = _vec(u, True, "PirlsKernel", "u", &nu)
        gp = _vec(grad, True, "PirlsKernel", "grad", &ng)
        if ng != p + nth:
            raise ValueError(f"grad has {ng} entries; the model has {p + nth}")
        self._laplace_at(family, link, param, pw, tp, nt, bp, nb, up, nu, gp, tol, maxiter,
                         max_halving, step_tol, out)
        return out[0], out[1], out[2], int(out[3]), bool(out[4]), bool(out[5])

    cdef int _laplace_at(self, int family, int link, double param, const double *pw,
                         const double *theta, Py_ssize_t ntheta, const double *beta,
                         Py_ssize_t nbeta, double *u, Py_ssize_t nu, double *grad,
                         double tol, int maxiter, int max_halving, double step_tol,
                         double *result) except -1:
        # the work of ``laplace`` (its checks made by the caller; pw: the prior weights,
        # NULL for unit ones; grad: p + ntheta entries); result <- (value, logdet,
        # deviance, iterations, converged, exhausted)
        cdef double out[5]
        cdef double usq = 0.0
        cdef Py_ssize_t p = self.p, m, j, k = self.kk[0]
        cdef Py_ssize_t nth = self.nth
        cdef OneTerm ot
        cdef int bad
        cdef double *gt
        if self.gwork == NULL:
            self.gwork = <double *> malloc((k * k + blockdiag_work_size(
                self.R.n, self.nlev[0], <int> k)) * sizeof(double))
            if self.gwork == NULL:
                raise MemoryError()
        self._prepare_at(family, link, param, pw, theta, ntheta, beta, nbeta, nu)
        if self.pred_ok and self.pred_pw == self.R.pw:
            self._predict_modes(u, theta[0])
        self.pred_ok = False
        try:
            # (the canonical pairs only: Newton's rule, mode_tol unused)
            self._pirls(family, link, param, u, tol, maxiter, max_halving, step_tol,
                        1e-12, out)
        finally:
            self.R.pw = NULL
        ot.n, ot.nlev, ot.p, ot.zstride, ot.k = self.R.n, self.nlev[0], p, self.R.ncol, <int> k
        ot.codes = self.R.codes
        ot.z = self.R.zcat + self.zoff[0]
        ot.x = self.xmat if p > 0 else NULL
        ot.wrkwt, ot.wrkresid, ot.mu = self.R.wrkwt, self.R.wrkresid, self.R.mu
        ot.logit = link == LNK_LOGIT
        gt = self.gwork
        for m in range(self.q):
            usq += u[m] * u[m]
        if self.release_gil:
            with nogil:
                bad = blockdiag_laplace_gradient_c(&ot, self.lam + self.lam_off[0],
                                                   self.avals, u, grad if p > 0 else NULL,
                                                   gt, self.gwork + k * k)
        else:
            bad = blockdiag_laplace_gradient_c(&ot, self.lam + self.lam_off[0],
                                               self.avals, u, grad if p > 0 else NULL,
                                               gt, self.gwork + k * k)
        if not bad:
            for j in range(nth):
                grad[p + j] = gt[self.lam_index[j] - self.lam_off[0]]
        if bad:
            raise np.linalg.LinAlgError("random-effects block not positive definite")
        if k == 1 and out[3] and not out[4]:
            self._save_sensitivity(u, theta[0], self.gwork + 1, pw)
        result[0] = out[1] + usq + 2.0 * out[0]
        for j in range(5):
            result[j + 1] = out[j]
        return 0

    def trust_region(self, int family, int link, double param, prior_w, x0, lower, u,
                     double radius, double ftol, int maxeval, double tol=1e-13,
                     int maxiter=100, int max_halving=30, double step_tol=1e-9):
        """The trust-region quasi-Newton search (``_search.trust_region_c``; its twin
        ``_trust_region.trust_region_search``) over x = [β, θ] of :meth:`laplace`'s
        deviance and gradient, from x0 within ``lower`` (-inf: none).

        Each evaluation is :meth:`laplace` at x from the modes ``u``; where a
        random-effects block is not positive definite u is left as it was and the value
        is infinite (the search then shrinks its step). At the end ``u`` holds the modes
        of the best evaluation (the lowest value, the first of equal ones), and the
        kernel's state is that evaluation's (PIRLS runs there again from those modes
        where a later trial left the state; ``best`` then has that run's value,
        gradient and log-determinant, the log the search's own). The search's
        first quadratic model has, in β's block, twice :meth:`beta_covariance`'s Schur
        complement at the start (where it can be made).

        Returns (xs, fs, code, best, exhausted): every point evaluated and its value, in
        order; TR_CONVERGED (0) or TR_MAXEVAL (1); ``best``, (x, value, gradient,
        logdet) of the best evaluation, or None where none had a finite value;
        ``exhausted``, the θ at which PIRLS ran out of iterations. Twin:
        ``trust_region_search(model._joint_value_and_grad, ...)``
        (tests/test_glmm_search.py).
        """
        cdef Py_ssize_t n, nlow, nu, i
        cdef const double *x0p
        cdef const double *lowerp
        cdef LaplaceSearch ls
        cdef double *work
        cdef double out[6]
        if not ((family == FAM_BERNOULLI or family == FAM_BINOMIAL) and link == LNK_LOGIT
                or family == FAM_POISSON and link == LNK_LOG):
            raise ValueError("trust_region: Bernoulli or Binomial with the logit link, or "
                             "Poisson with the log link")
        if self.R.nterm != 1 or not self.has_x or not self.has_lam_index:
            raise ValueError("trust_region: one random-effects term, and a kernel bound to "
                             "X, the offset and the theta indices")
        ls.p = self.p
        ls.nth = self.nth
        ls.q = self.q
        ls.pw = self._weights(prior_w)
        x0p = _vec(x0, False, "PirlsKernel", "x0", &n)
        lowerp = _vec(lower, False, "PirlsKernel", "lower", &nlow)
        ls.u = _vec(u, True, "PirlsKernel", "u", &nu)
        if n != ls.p + ls.nth or nlow != n:
            raise ValueError(f"trust_region: x0 and lower must have {ls.p + ls.nth} entries")
        if nu != ls.q:
            raise ValueError(f"u has {nu} entries; the model has {ls.q}")
        ls.kernel = <void *> self
        ls.family, ls.link, ls.param = family, link, param
        ls.tol, ls.maxiter, ls.max_halving, ls.step_tol = tol, maxiter, max_halving, step_tol
        exhausted = []
        ls.exhausted = <void *> exhausted
        ls.found = False
        ls.first = True
        ls.last_is_best = False
        ls.nb = 0
        # x (the start, overwritten), then the best x and gradient, the modes' copy, the
        # best modes and the start's block
        work = <double *> malloc((3 * n + 2 * ls.q + ls.p * ls.p + 1) * sizeof(double))
        if work == NULL:
            raise MemoryError()
        try:
            memcpy(work, x0p, n * sizeof(double))
            ls.best_x, ls.best_grad = work + n, work + 2 * n
            ls.ubak, ls.best_u = work + 3 * n, work + 3 * n + ls.q
            ls.block = work + 3 * n + 2 * ls.q
            xs, fs, code = trust_region_c(_laplace_search_step, &ls, n, work, lowerp,
                                          radius, ftol, maxeval, NULL, ls.block, &ls.nb)
            best = None
            if ls.found:
                memcpy(ls.u, ls.best_u, ls.q * sizeof(double))
                if not ls.last_is_best:
                    # the working weights and the factor the state holds are those of
                    # a later evaluation (a trial the search rejected): PIRLS again at
                    # the best point from its modes, for what reads the state next (the
                    # check's β block); the log keeps the search's own value
                    self._laplace_at(family, link, param, ls.pw, ls.best_x + ls.p,
                                     ls.nth, ls.best_x, ls.p, ls.u, ls.q, ls.best_grad,
                                     tol, maxiter, max_halving, step_tol, out)
                    ls.best_value, ls.best_logdet = out[0], out[1]
                best = (_copy_of(ls.best_x, n), ls.best_value, _copy_of(ls.best_grad, n),
                        ls.best_logdet)
        finally:
            free(work)
        return xs, fs, code, best, exhausted

    def beta_covariance(self, theta, schur=None, vcov=None):
        """One term: the Schur complement S = X'WX - X'WZΛ M⁻¹ Λ'Z'WX at the working
        weights the state holds (the modes, after :meth:`pirls` or :meth:`laplace` at
        this θ) into ``schur``, and S⁻¹, the covariance of β̃ given θ, into ``vcov``
        (both p-by-p, C order; None: new arrays, made here). _gradient.pyx's
        ``blockdiag_beta_covariance_c``; NumPy: glmm's ``_vcov_working`` on the
        workspace. Sets the factorizer's template to θ; raises numpy.linalg.LinAlgError
        where M_l or S is not positive definite. Returns (schur, vcov)."""
        cdef Py_ssize_t p, k
        cdef OneTerm ot
        cdef int status
        cdef double *work
        cdef cnp.npy_intp ds[2]
        cdef cnp.npy_intp dv[2]
        cdef double *sp
        cdef double *vp
        if self.R.nterm != 1 or not self.has_x:
            raise ValueError("beta_covariance: one random-effects term, and a kernel bound "
                             "to X")
        p = self.p
        k = self.kk[0]
        ds[0] = ds[1] = p
        if schur is None:
            schur = cnp.PyArray_EMPTY(2, ds, cnp.NPY_DOUBLE, 0)
        if vcov is None:
            vcov = cnp.PyArray_EMPTY(2, ds, cnp.NPY_DOUBLE, 0)
        sp = <double *> _data(schur, _F64, 2, False, True, "schur", ds)
        vp = <double *> _data(vcov, _F64, 2, False, True, "vcov", dv)
        if ds[0] != p or ds[1] != p or dv[0] != p or dv[1] != p:
            raise ValueError(f"beta_covariance: schur and vcov must be {p}-by-{p}")
        self._set_theta(theta)
        ot.n, ot.nlev, ot.p, ot.zstride, ot.k = self.R.n, self.nlev[0], p, self.R.ncol, <int> k
        ot.codes = self.R.codes
        ot.z = self.R.zcat + self.zoff[0]
        ot.x = self.xmat if p > 0 else NULL
        ot.wrkwt = self.R.wrkwt
        ot.wrkresid = ot.mu = NULL
        ot.logit = False
        work = <double *> malloc(blockdiag_covariance_work_size(ot.nlev, <int> k, p)
                                 * sizeof(double))
        if work == NULL:
            raise MemoryError()
        with nogil:
            status = blockdiag_beta_covariance_c(&ot, self.lam + self.lam_off[0],
                                                 sp if p > 0 else NULL,
                                                 vp if p > 0 else NULL, work)
        free(work)
        raise_covariance_status(status)
        return schur, vcov

    # -- the warm start of laplace: the modes moved to first order ----------------------
    #
    # From one call to the next (the optimizer's next point, close to the last) PIRLS
    # starts from the last modes û. One scalar term: where the modes are a function of
    # (β, λ) (λ the template), f_u(û; β, λ) = 0, so with f_uu = 2M, per level l,
    #     dû_l = -m_l [λ Σ_{i in l} W_i z_i (x_i'dβ) + dλ (½ S_l + λ A_l û_l)],
    # m_l = M_l⁻¹, S_l = Σ_{i in l} d_i z_i, A_l = Σ_{i in l} W_i z_i² (d_i = -2 W_i ρ_i),
    # all at the last modes. Started from û + dû, whose error is of the second order in
    # the step, PIRLS takes a Newton step fewer on most of a fit's calls (contra: 61 →
    # 53 steps; cbpp: 58 → 45). The modes it converges to are those of the point, to
    # PIRLS's tolerance, from any start. A step whose first-order change of a mode
    # exceeds MAX_PREDICTED_STEP (far from the last point: the early, long steps of a
    # search) starts from û as before. Only for a caller that starts from the last
    # modes (u equal to them) and the same prior weights.

    cdef int _save_sensitivity(self, const double *u, double lam, const double *minv,
                               const double *pw) except -1:
        # pred <- [W_i z_i (n) | fixed (n) | -m_l λ (nlev) | dû_l/dλ (nlev) | û (q) | λ],
        # dû_l/dλ = -m_l (½ S_l + λ A_l û_l) = m_l (c_l - 2λ A_l û_l) with c = Z'W r
        # (ztxy, at the modes), r = ZΛû + ρ the working response: Σ_{i in l} W_i ρ_i z_i
        # = c_l - λ A_l û_l, so no pass over the rows for S
        cdef Py_ssize_t n = self.R.n, nlev = self.nlev[0], i, l
        cdef double *wz
        cdef double *kappa
        cdef double *dlam
        cdef const double *zc = self.R.zcat + self.zoff[0]
        cdef Py_ssize_t zs = self.R.ncol
        if self.pred == NULL:
            self.pred = <double *> malloc((2 * n + 2 * nlev + self.q + 1) * sizeof(double))
            if self.pred == NULL:
                raise MemoryError()
        wz = self.pred
        kappa = wz + 2 * n
        dlam = kappa + nlev
        # (with the GIL: a copy of two columns, short beside the PIRLS call before it)
        for i in range(n):
            wz[i] = self.R.wrkwt[i] * zc[i * zs]
            wz[n + i] = self.R.fixed[i]
        for l in range(nlev):
            kappa[l] = -minv[l] * lam
            dlam[l] = minv[l] * (self.R.ztr[l] - 2.0 * lam * self.avals[l] * u[l])
        for l in range(self.q):
            dlam[nlev + l] = u[l]
        dlam[nlev + self.q] = lam
        self.pred_pw = pw
        self.pred_ok = True
        return 0

    cdef void _predict_modes(self, double *u, double lam) noexcept:
        # u <- û + dû (see above) where u is û and the change is small; fixed holds the
        # new Xβ + offset
        cdef Py_ssize_t n = self.R.n, nlev = self.nlev[0], i, l, cur = -1
        cdef const double *wz = self.pred
        cdef const double *kappa = wz + 2 * n
        cdef const double *gamma = kappa + nlev
        cdef const double *ulast = gamma + nlev
        cdef double *du = self.buf              # scratch until _pirls
        cdef double acc = 0.0, dlam, big = 0.0
        cdef const int *codes = self.R.codes
        if memcmp(u, ulast, self.q * sizeof(double)) != 0:
            return
        dlam = lam - ulast[self.q]
        # (with the GIL: one pass of a multiply-add per row, short beside the PIRLS
        # call after it)
        for l in range(nlev):
            du[l] = 0.0
        for i in range(n):              # Σ_{i in l} W_i z_i x_i'dβ
            l = codes[i]
            if l != cur:
                if cur >= 0:
                    du[cur] = acc
                cur = l
                acc = du[l]
            acc += wz[i] * (self.R.fixed[i] - wz[n + i])
        if cur >= 0:
            du[cur] = acc
        for l in range(nlev):
            du[l] = kappa[l] * du[l] + gamma[l] * dlam
            if not fabs(du[l]) <= big:
                big = fabs(du[l])
        if big <= MAX_PREDICTED_STEP:
            for l in range(nlev):
                u[l] += du[l]

    cdef double *_prepare(self, int family, int link, double param, object prior_w,
                          object theta, object u, object beta) except NULL:
        # the checks and settings of a PIRLS call: codes, u's length, θ into the
        # templates, fixed from β (when given), the prior weights (reset by the caller);
        # returns u's data
        cdef Py_ssize_t nu, nb
        cdef double *up = _vec(u, True, "PirlsKernel", "u", &nu)
        _check_codes(family, link, param)
        if nu != self.q:
            raise ValueError(f"u has {nu} entries; the model has {self.q}")
        self._set_theta(theta)
        if beta is not None:
            self._set_fixed(_vec(beta, False, "PirlsKernel", "beta", &nb), nb)
        self.R.pw = self._weights(prior_w)
        return up

    cdef int _prepare_at(self, int family, int link, double param, const double *pw,
                         const double *theta, Py_ssize_t ntheta, const double *beta,
                         Py_ssize_t nbeta, Py_ssize_t nu) except -1:
        # _prepare from C arrays (a kernel with lam_index; β given)
        _check_codes(family, link, param)
        if nu != self.q:
            raise ValueError(f"u has {nu} entries; the model has {self.q}")
        self._theta_at(theta, ntheta)
        self._set_fixed(beta, nbeta)
        self.R.pw = pw
        return 0

    cdef int _pirls(self, int family, int link, double param, double *u, double tol,
                    int maxiter, int max_halving, double step_tol, double mode_tol,
                    double *out) except -1:
        # the loop of ``pirls``; out <- (logdet, deviance, iterations, converged,
        # exhausted)
        cdef Py_ssize_t q = self.q, m
        cdef double *unew = self.buf
        cdef double *uold = self.buf + q
        cdef double dev, pdev, logdet = NAN, last_step = -1.0
        cdef int it = 0, j, have_last = False
        cdef bint converged = False, exhausted = True, newton = _is_newton(family, link)
        if self.release_gil:
            with nogil:
                dev = self._evaluate(family, link, param, u, True)
        else:
            dev = self._evaluate(family, link, param, u, True)
        pdev = dev + _sumsq(u, q)
        for j in range(maxiter):
            # the factorization the workspace keeps (at the modes) is CHOLMOD's; the
            # ones before it, where it allows, the SimplicialFactor's
            logdet = tf_factor(self.tf, not converged)
            if not isfinite(logdet):
                raise np.linalg.LinAlgError("random-effects block not positive definite")
            if converged:
                exhausted = False
                break
            it += 1
            self._solve_modes(unew)
            if self.release_gil:
                with nogil:
                    converged = self._newton_step(family, link, param, u, unew, uold, &pdev,
                                                  &dev, tol, max_halving, step_tol, newton,
                                                  mode_tol, &last_step, &have_last)
            else:
                converged = self._newton_step(family, link, param, u, unew, uold, &pdev,
                                              &dev, tol, max_halving, step_tol, newton,
                                              mode_tol, &last_step, &have_last)
        if exhausted and tf_has_small(self.tf):
            # out of iterations after a SimplicialFactor step: the workspace's own
            # factor at the last products (the modes returned)
            tf_factor(self.tf, False)
        out[0] = logdet
        out[1] = dev
        out[2] = it
        out[3] = converged
        out[4] = exhausted
        return 0

    cdef bint _newton_step(self, int family, int link, double param, double *u,
                           double *unew, double *uold, double *pdev, double *dev,
                           double tol, int max_halving, double step_tol, bint newton,
                           double mode_tol, double *last_step, int *have_last) noexcept nogil:
        # from u to the solution unew of the last factorization, halved while it raises
        # the penalized deviance; u, pdev, dev, last_step (the full step's size) and, for
        # Fisher scoring, the last whole step (have_last: whether there is one) move with
        # it. Returns convergence.
        cdef Py_ssize_t q = self.q, m
        cdef double new_dev, new_pdev, step, usize, factor, far_dev, far_pdev
        cdef double *last_vec
        cdef int halvings = 0
        cdef bint converged
        for m in range(q):
            uold[m] = u[m]
        _newton_step_size(unew, uold, q, &step, &usize)
        new_dev = self._evaluate(family, link, param, unew, True)
        new_pdev = new_dev + _sumsq(unew, q)
        while (not (new_pdev <= pdev[0] * (1.0 + 1e-12) + 1e-12)
               and halvings < max_halving):
            for m in range(q):
                unew[m] = 0.5 * (uold[m] + unew[m])
            new_dev = self._evaluate(family, link, param, unew, True)
            new_pdev = new_dev + _sumsq(unew, q)
            halvings += 1
        if halvings == max_halving:
            # no step lowers the penalized deviance: stay at u
            self._evaluate(family, link, param, u, True)
            return True
        if newton:
            converged = (fabs(pdev[0] - new_pdev) <= tol * fabs(new_pdev) + tol
                         or (halvings == 0 and step <= step_tol * (1.0 + usize)))
        else:
            converged = _fisher_converged(step, last_step[0], usize, halvings, step_tol,
                                          mode_tol)
        last_step[0] = step
        for m in range(q):
            u[m] = unew[m]
        pdev[0] = new_pdev
        dev[0] = new_dev
        if not (newton or converged):
            # along the one direction that dominates a slow rate, on to the limit (see
            # _pirls: _extrapolation)
            last_vec = self.buf + 3 * q + 1
            if halvings == 0 and _extrapolation(u, uold, last_vec, have_last[0], q, &factor):
                for m in range(q):
                    unew[m] = u[m] + factor * (u[m] - uold[m])
                far_dev = self._evaluate(family, link, param, unew, True)
                far_pdev = far_dev + _sumsq(unew, q)
                if far_pdev <= pdev[0] * (1.0 + 1e-12) + 1e-12:
                    for m in range(q):
                        u[m] = unew[m]
                    pdev[0] = far_pdev
                    dev[0] = far_dev
                    last_step[0] = -1.0
                    have_last[0] = False
                    return False
                self._evaluate(family, link, param, u, True)
            have_last[0] = halvings == 0
            for m in range(q):
                last_vec[m] = u[m] - uold[m]
        return converged

    cdef int _solve_modes(self, double *unew) except -1:
        # unew <- P' L'⁻¹ (L⁻¹ P Λ'Z'W r): the column the factorization left in rzxy
        cdef Py_ssize_t m, q = self.q
        for m in range(q):
            self.ubuf[m] = self.rzxy[m]
        tf_backward(self.tf, self.ubuf_arr, self.ubuf)
        for m in range(q):
            unew[m] = self.ubuf[m]
        return 0

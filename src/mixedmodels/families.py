"""Response distributions and link functions for generalized linear mixed models.

A *family* says how the response is distributed given its mean μ (the variance
function V(μ), the deviance, the log density); a *link* g maps μ to the linear
predictor η = g(μ). The PIRLS loop needs, for every observation and at every step,
μ = g⁻¹(η), dμ/dη, the working weight and residual and the deviance residual: that
one pass is done in compiled code (:mod:`mixedmodels._kernels._glm`) and is reached
here through :meth:`Family.update`. Everything else on these objects is plain NumPy.

The integer ``code`` on every family and link is the code the compiled kernels
dispatch on; it is an implementation detail shared with the kernels and their NumPy
twins (:mod:`mixedmodels._kernels._glm_numpy`). So is ``param``, the one slot through
which a family hands the kernels a shape parameter of its own (the negative binomial
θ); families without one leave it NaN.
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings

import numpy as np
from scipy import special

from ._kernels import _glm

__all__ = [
    "Link", "LogitLink", "ProbitLink", "CloglogLink", "LogLink", "IdentityLink",
    "InverseLink", "SqrtLink", "InverseSquareLink",
    "Family", "Bernoulli", "Binomial", "Poisson", "Gamma", "InverseGaussian", "Normal",
    "NegativeBinomial", "get_family", "get_link", "logistic",
]


def logistic(eta):
    """The logistic function 1 / (1 + exp(-η)), evaluated without overflow.

    Parameters
    ----------
    eta : array_like
        Linear predictor values.

    Returns
    -------
    ndarray or float
        Values in [0, 1], of the same shape as `eta` (a float for scalar input).

    Notes
    -----
    With :math:`e = \\exp(-|\\eta|) \\le 1`, the result is :math:`1/(1+e)` for
    :math:`\\eta \\ge 0` and :math:`e/(1+e)` otherwise, so ``exp`` never overflows and
    small probabilities keep their relative precision.
    """
    eta = np.asarray(eta, dtype=np.float64)
    e = np.exp(-np.abs(eta))
    out = np.where(eta >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return out[()] if out.ndim == 0 else out


_EMPTY = np.empty(0)   # the kernels read an empty weight array as unit weights


def _as_float(x):
    return np.asarray(x, dtype=np.float64)


def _is_plain_float_vector(x):
    """A C-contiguous one-dimensional float64 ndarray in native byte order (what the
    compiled kernels read without a copy)."""
    return (type(x) is np.ndarray and x.ndim == 1 and x.dtype == np.float64
            and x.dtype.isnative and x.flags.c_contiguous)


# ----------------------------------------------------------------------------- links


class Link:
    """A link function g with η = g(μ).

    Subclasses define ``name``, ``code`` and the vectorised methods :meth:`link`,
    :meth:`inverse` and :meth:`mu_eta`. Links hold no state; two links are equal when
    they are of the same class.

    The methods here are the plain mathematical maps with no clamping. The compiled
    family update (:meth:`Family.update`) uses the same formulas and then keeps μ
    inside the family's domain; see :class:`Family` for the clamps.
    """

    name = ""
    code = -1

    def link(self, mu):
        """η = g(μ).

        Parameters
        ----------
        mu : array_like
            Means.

        Returns
        -------
        ndarray
            Linear predictor values, same shape as `mu`.
        """
        raise NotImplementedError

    def inverse(self, eta):
        """μ = g⁻¹(η).

        Parameters
        ----------
        eta : array_like
            Linear predictor values.

        Returns
        -------
        ndarray
            Means, same shape as `eta`.
        """
        raise NotImplementedError

    def mu_eta(self, eta):
        """dμ/dη = (g⁻¹)'(η).

        Parameters
        ----------
        eta : array_like
            Linear predictor values.

        Returns
        -------
        ndarray
            Derivative of the inverse link at `eta`, same shape.
        """
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


class LogitLink(Link):
    """The logit link, η = log(μ / (1 - μ)); canonical for Bernoulli and Binomial.

    Notes
    -----
    :math:`\\mu = 1/(1+e^{-\\eta})`, :math:`d\\mu/d\\eta = \\mu(1-\\mu)`, evaluated as
    :math:`e^{-|\\eta|}/(1+e^{-|\\eta|})^2` so that it keeps its precision for large
    :math:`|\\eta|`.
    """

    name = "logit"
    code = _glm.LINK_LOGIT

    def link(self, mu):
        mu = _as_float(mu)
        return np.log(mu) - np.log1p(-mu)

    def inverse(self, eta):
        return _as_float(logistic(eta))

    def mu_eta(self, eta):
        e = np.exp(-np.abs(_as_float(eta)))
        return e / ((1.0 + e) * (1.0 + e))


class ProbitLink(Link):
    """The probit link, η = Φ⁻¹(μ) with Φ the standard normal distribution function.

    Notes
    -----
    :math:`\\mu = \\Phi(\\eta)`, :math:`d\\mu/d\\eta = \\phi(\\eta)`, the standard normal
    density.
    """

    name = "probit"
    code = _glm.LINK_PROBIT

    def link(self, mu):
        return special.ndtri(_as_float(mu))

    def inverse(self, eta):
        return special.ndtr(_as_float(eta))

    def mu_eta(self, eta):
        eta = _as_float(eta)
        return np.exp(-0.5 * eta * eta) / np.sqrt(2.0 * np.pi)


class CloglogLink(Link):
    """The complementary log-log link, η = log(-log(1 - μ)).

    Notes
    -----
    :math:`\\mu = 1 - \\exp(-e^{\\eta})` (computed as ``-expm1(-exp(eta))``),
    :math:`d\\mu/d\\eta = \\exp(\\eta - e^{\\eta})`.
    """

    name = "cloglog"
    code = _glm.LINK_CLOGLOG

    def link(self, mu):
        return np.log(-np.log1p(-_as_float(mu)))

    def inverse(self, eta):
        return -np.expm1(-np.exp(_as_float(eta)))

    def mu_eta(self, eta):
        eta = _as_float(eta)
        return np.exp(eta - np.exp(eta))


class LogLink(Link):
    """The log link, η = log(μ); canonical for Poisson.

    Notes
    -----
    :math:`\\mu = d\\mu/d\\eta = e^{\\eta}`.
    """

    name = "log"
    code = _glm.LINK_LOG

    def link(self, mu):
        return np.log(_as_float(mu))

    def inverse(self, eta):
        return np.exp(_as_float(eta))

    def mu_eta(self, eta):
        return np.exp(_as_float(eta))


class IdentityLink(Link):
    """The identity link, η = μ; canonical for Normal."""

    name = "identity"
    code = _glm.LINK_IDENTITY

    def link(self, mu):
        return np.array(mu, dtype=np.float64)

    def inverse(self, eta):
        return np.array(eta, dtype=np.float64)

    def mu_eta(self, eta):
        return np.ones_like(_as_float(eta))


class InverseLink(Link):
    """The inverse link, η = 1/μ; canonical for Gamma.

    Notes
    -----
    :math:`\\mu = 1/\\eta`, :math:`d\\mu/d\\eta = -1/\\eta^2`.
    """

    name = "inverse"
    code = _glm.LINK_INVERSE

    def link(self, mu):
        return 1.0 / _as_float(mu)

    def inverse(self, eta):
        return 1.0 / _as_float(eta)

    def mu_eta(self, eta):
        eta = _as_float(eta)
        return -1.0 / (eta * eta)


class SqrtLink(Link):
    """The square-root link, η = √μ.

    Notes
    -----
    :math:`\\mu = \\eta^2`, :math:`d\\mu/d\\eta = 2\\eta`.
    """

    name = "sqrt"
    code = _glm.LINK_SQRT

    def link(self, mu):
        return np.sqrt(_as_float(mu))

    def inverse(self, eta):
        eta = _as_float(eta)
        return eta * eta

    def mu_eta(self, eta):
        return 2.0 * _as_float(eta)


class InverseSquareLink(Link):
    """The inverse-square link, η = 1/μ²; canonical for the inverse Gaussian.

    Notes
    -----
    :math:`\\mu = \\eta^{-1/2}`, :math:`d\\mu/d\\eta = -\\tfrac12\\eta^{-3/2}`; defined
    for η > 0 only (NaN otherwise).
    """

    name = "inverse_square"
    code = _glm.LINK_INVERSE_SQUARE

    def link(self, mu):
        mu = _as_float(mu)
        return 1.0 / (mu * mu)

    def inverse(self, eta):
        return 1.0 / np.sqrt(_as_float(eta))

    def mu_eta(self, eta):
        eta = _as_float(eta)
        with np.errstate(invalid="ignore"):
            return -0.5 / (eta * np.sqrt(eta))


_LINK_CLASSES = (LogitLink, ProbitLink, CloglogLink, LogLink, IdentityLink,
                 InverseLink, SqrtLink, InverseSquareLink)
_LINKS_BY_NAME = {cls.name: cls for cls in _LINK_CLASSES}
_LINKS_BY_NAME.update({"inversesquare": InverseSquareLink, "1/mu^2": InverseSquareLink})
_LINKS_BY_CODE = {cls.code: cls for cls in _LINK_CLASSES}


def get_link(spec):
    """Resolve a link specification to a :class:`Link` instance.

    Parameters
    ----------
    spec : Link, type or str
        A link instance (returned as is), a :class:`Link` subclass, or a
        case-insensitive name: ``"logit"``, ``"probit"``, ``"cloglog"``, ``"log"``,
        ``"identity"``, ``"inverse"``, ``"sqrt"``, ``"inverse_square"``.

    Returns
    -------
    Link

    Raises
    ------
    ValueError
        For an unknown name.
    TypeError
        For anything else.
    """
    if isinstance(spec, Link):
        return spec
    if isinstance(spec, type) and issubclass(spec, Link) and spec is not Link:
        return spec()
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in _LINKS_BY_NAME:
            return _LINKS_BY_NAME[key]()
        raise ValueError(
            f"unknown link {spec!r}; expected one of "
            + ", ".join(repr(c.name) for c in _LINK_CLASSES))
    raise TypeError(f"link must be a Link or a link name, not {type(spec).__name__}")


# -------------------------------------------------------------------------- families


def _show(values, limit=5):
    """A short listing of offending values for an error message."""
    u = np.unique(values)
    shown = ", ".join(f"{v:g}" for v in u[:limit])
    return f"[{shown}{', ...' if u.size > limit else ''}]"


def _rows(mask, limit=5):
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    return f"[{shown}{', ...' if idx.size > limit else ''}]"


def _check_counts(y, family_name, response_name):
    if (y < 0).any():
        raise ValueError(
            f"response {response_name!r} must be non-negative counts for {family_name}; "
            f"found negative values {_show(y[y < 0])}")
    frac = y != np.round(y)
    if frac.any():
        raise ValueError(
            f"response {response_name!r} must be integer counts for {family_name}; "
            f"found non-integer values {_show(y[frac])}")


class Family:
    """A response distribution with its link, as used by GLMM fitting.

    Parameters
    ----------
    link : Link, str or None
        The link function; None means the family's canonical link.

    Attributes
    ----------
    name : str
        The family's name, e.g. ``"Bernoulli"``.
    link : Link
        The link function.
    has_dispersion : bool
        Whether the family has a free dispersion parameter φ (False for Bernoulli,
        Binomial, Poisson and negative binomial, whose dispersion is fixed at 1).
    code : int
        The family code the compiled kernels dispatch on.
    n_extra_params : int
        How many parameters of its own the family has besides the dispersion: 0, or 1
        for :class:`NegativeBinomial` (θ).
    extra_param_name : str or None
        The name of that parameter (``"theta"``), None when there is none.
    param : float
        Its current value, the number handed to every compiled kernel; NaN when the
        family has no such parameter or its value is not yet known.
    estimate_param : bool
        Whether a fit must estimate the parameter (True when the user gave no value),
        as opposed to holding it fixed.

    Notes
    -----
    For the binary and binomial families, :meth:`update` keeps μ inside
    [ε, 1 - ε]; for Poisson, negative binomial, Gamma and inverse Gaussian it keeps
    μ ≥ ε (ε = 2.22e-16, the double-precision machine epsilon), so that every
    logarithm in the deviance stays finite however far η strays;
    :math:`|d\\mu/d\\eta|` is kept ≥ ε (sign preserved) so that the working residual
    stays finite. The Normal family is not clamped. These clamps only act where μ is
    within ε of the edge of its domain (for the logit link, :math:`|\\eta| > 36`).
    """

    name = ""
    code = -1
    has_dispersion = True
    n_extra_params = 0
    extra_param_name: str | None = None
    param = math.nan
    estimate_param = False
    _canonical: type = Link

    def __init__(self, link=None):
        self.link = self._canonical() if link is None else get_link(link)

    def with_param(self, value):
        """A copy of the family with its own parameter set to `value`.

        Parameters
        ----------
        value : float
            The new value (negative binomial: θ > 0).

        Returns
        -------
        Family
            A new instance; this one is unchanged. Whether the parameter is estimated
            (:attr:`estimate_param`) is carried over.

        Raises
        ------
        ValueError
            If the family has no parameter of its own, or `value` is not valid for it.
        """
        raise ValueError(f"the {self.name} family has no parameter besides the "
                         "dispersion")

    def __repr__(self):
        return f"{self.name}(link={self.link.name})"

    def __eq__(self, other):
        return type(self) is type(other) and self.link == other.link

    def __hash__(self):
        return hash((type(self), type(self.link)))

    @property
    def canonical_link(self):
        """bool: whether :attr:`link` is the family's canonical link."""
        return type(self.link) is self._canonical

    # -- the variance function -------------------------------------------------------
    def variance(self, mu):
        """The variance function V(μ); Var(y) = φ V(μ) / w.

        Parameters
        ----------
        mu : array_like
            Means.

        Returns
        -------
        ndarray
        """
        raise NotImplementedError

    # -- checks and starting values -------------------------------------------------
    def validate(self, y, weights=None, response_name="y"):
        """Check that a response (and prior weights) suit this family.

        Parameters
        ----------
        y : array_like
            The response, one value per observation.
        weights : array_like or None
            Prior weights (for Binomial, the number of trials); None means all ones.
        response_name : str
            The name of the response column, used in error messages.

        Raises
        ------
        ValueError
            If `y` or `weights` hold NaN or infinite values, if a weight is negative,
            or if `y` is outside the family's support; the message names the column
            and shows the offending values.
        """
        self._validate_with_range(y, weights, response_name)

    def _validate_with_range(self, y, weights, response_name):
        """:meth:`validate`, returning the smallest and largest y over the rows of
        positive weight where the compiled pass found them (NaN, NaN for no such row),
        else None."""
        checked = self._compiled_check(y, weights)
        if checked is None:
            self._validate_numpy(y, weights, response_name)
        return checked

    def _validate_numpy(self, y, weights, response_name):
        y = _as_float(y)
        bad = ~np.isfinite(y)
        if bad.any():
            kind = "NaN" if np.isnan(y).any() else "infinite values"
            raise ValueError(
                f"response {response_name!r} contains {kind} at rows {_rows(bad)}; "
                "drop or impute those rows before fitting")
        if weights is not None:
            w = _as_float(weights)
            if w.shape != y.shape:
                raise ValueError(
                    f"weights have shape {w.shape} but response {response_name!r} "
                    f"has shape {y.shape}")
            if not np.isfinite(w).all():
                raise ValueError(
                    f"weights for response {response_name!r} contain NaN or infinite "
                    f"values at rows {_rows(~np.isfinite(w))}")
            if (w < 0).any():
                raise ValueError(
                    f"weights for response {response_name!r} must be non-negative; "
                    f"found {_show(w[w < 0])} at rows {_rows(w < 0)}")
        else:
            w = None
        self._check_support(y, w, response_name)

    def _compiled_check(self, y, weights):
        """One compiled pass (``_glm.response_check``): (lo, hi), the range of y over the
        rows of positive weight (NaN, NaN where there is none), if it finds nothing the
        checks of :meth:`validate` would raise or warn about, else None. On a small
        model those checks' dozen NumPy calls cost 10 µs. Only for this module's own
        families, whose supports the pass knows, and float64 arrays as ``validate``
        reads them; anything it does not pass goes through the NumPy checks, which say
        what is wrong."""
        if type(self) not in _FAMILY_CLASSES or not _is_plain_float_vector(y):
            return None
        if weights is None:
            weights = _EMPTY
        elif not (_is_plain_float_vector(weights) and weights.shape == y.shape):
            return None
        clean, lo, hi = _glm.response_check(self.code, y, weights)
        return (lo, hi) if clean else None

    def _check_support(self, y, w, response_name):
        pass

    def starting_mu(self, y, weights=None):
        """Starting values for μ, as R's ``mustart``.

        Parameters
        ----------
        y : array_like
            The response.
        weights : array_like or None
            Prior weights; None means all ones.

        Returns
        -------
        ndarray
            Starting means, strictly inside the family's domain for a valid response.
        """
        return np.array(y, dtype=np.float64)

    # -- the compiled pass ----------------------------------------------------------
    def update(self, eta, y, prior_w, mu, mu_eta, wrkwt, wrkresid, devresid):
        """One PIRLS pass: from η to μ, dμ/dη, working weights and residuals, deviance.

        Parameters
        ----------
        eta, y : ndarray of float64, shape (n,)
            Linear predictor and response (C-contiguous float64; other inputs are
            converted, at the price of a copy).
        prior_w : ndarray of float64, shape (n,), or None
            Prior weights (Binomial: numbers of trials); None means unit weights.
        mu, mu_eta, wrkwt, wrkresid, devresid : ndarray of float64, shape (n,)
            Outputs, written in place; they must be C-contiguous, writable float64.

        Returns
        -------
        float
            The deviance, the sum of `devresid`.

        Notes
        -----
        For each observation :math:`\\mu = g^{-1}(\\eta)` (clamped, see
        :class:`Family`), :math:`\\mu' = d\\mu/d\\eta`,

        .. math::

            w^{wrk} = w \\, \\mu'^2 / V(\\mu), \\qquad
            r^{wrk} = (y - \\mu) / \\mu', \\qquad
            d = w \\, \\mathrm{dev}(y, \\mu),

        where dev is the family's unit deviance (0·log 0 taken as 0).

        Raises
        ------
        ValueError
            For a family whose own parameter is needed but unknown (a
            :class:`NegativeBinomial` whose θ is still to be estimated).
        """
        return _glm.update(self.code, self.link.code,
                           np.ascontiguousarray(eta, dtype=np.float64),
                           np.ascontiguousarray(y, dtype=np.float64),
                           _EMPTY if prior_w is None
                           else np.ascontiguousarray(prior_w, dtype=np.float64),
                           mu, mu_eta, wrkwt, wrkresid, devresid, self.param)

    def loglik(self, y, mu, prior_w=None, phi=1.0, out=None, eta=None):
        """Per-observation log densities (or log probabilities).

        Parameters
        ----------
        y, mu : array_like, shape (n,)
            Response and means.
        prior_w : array_like or None
            Prior weights; None means all ones.
        phi : float
            The dispersion φ (ignored by families without one); must be > 0.
        out : ndarray of float64, shape (n,), optional
            Where to write the result (C-contiguous, writable).
        eta : array_like, shape (n,), optional
            The linear predictor; Bernoulli and Binomial then compute their log
            probabilities from η (accurate in the tails) and ignore ``mu``.

        Returns
        -------
        ndarray of float64
            The log density of each observation; their sum is the log-likelihood.

        Notes
        -----
        An observation with weight 0 contributes 0. Otherwise, with weight w:

        - Bernoulli: :math:`w\\,[y\\log\\mu + (1-y)\\log(1-\\mu)]`.
        - Binomial (n = w trials, k = n y successes): :math:`\\log\\binom{n}{k} +
          k\\log\\mu + (n-k)\\log(1-\\mu)`, the binomial coefficient through
          ``lgamma``.
        - Poisson: :math:`w\\,[y\\log\\mu - \\mu - \\log\\Gamma(y+1)]`.
        - Normal: the normal log density with variance φ/w.
        - Gamma: :math:`w` times the gamma log density with shape 1/φ and mean μ.
        - InverseGaussian: :math:`w` times the inverse Gaussian log density with mean
          μ and shape λ = 1/φ.
        - NegativeBinomial: :math:`w` times the NB2 log probability with mean μ and
          shape θ (see :class:`NegativeBinomial`).

        These are the conventions of R's family ``aic`` functions (precision weights
        for the Normal, multiplicative weights for Gamma, inverse Gaussian, Poisson
        and negative binomial).
        """
        y = np.ascontiguousarray(y, dtype=np.float64)
        mu = np.ascontiguousarray(mu, dtype=np.float64)
        w = (_EMPTY if prior_w is None
             else np.ascontiguousarray(prior_w, dtype=np.float64))
        if out is None:
            out = np.empty_like(y)
        if eta is None:
            _glm.loglik(self.code, y, mu, w, float(phi), out, self.param)
        else:
            # Bernoulli and Binomial take log μ and log(1 - μ) from η itself: from μ they
            # lose every digit where μ rounds to 1
            _glm.loglik(self.code, y, mu, w, float(phi), out, self.param, self.link.code,
                        np.ascontiguousarray(eta, dtype=np.float64))
        return out


class Bernoulli(Family):
    """Binary response, y ∈ {0, 1}; canonical link logit; no dispersion.

    Notes
    -----
    :math:`V(\\mu) = \\mu(1-\\mu)`; deviance residual
    :math:`-2w\\,[y\\log\\mu + (1-y)\\log(1-\\mu)]`, which equals
    :math:`-2` times the log probability.
    """

    name = "Bernoulli"
    code = _glm.FAMILY_BERNOULLI
    has_dispersion = False
    _canonical = LogitLink

    def variance(self, mu):
        mu = _as_float(mu)
        return mu * (1.0 - mu)

    def _check_support(self, y, w, response_name):
        bad = (y != 0) & (y != 1)
        if bad.any():
            raise ValueError(
                f"response {response_name!r} must be binary (0/1 or a two-level factor) "
                f"for Bernoulli; found values {_show(y[bad])}")

    def starting_mu(self, y, weights=None):
        return (_as_float(y) + 0.5) / 2.0


class Binomial(Family):
    """Proportion of successes out of n trials, the prior weights being n.

    Canonical link logit; no dispersion.

    Notes
    -----
    The response is the proportion y = k/n in [0, 1] and the prior weight is the
    number of trials n. :math:`V(\\mu) = \\mu(1-\\mu)`; deviance residual
    :math:`2n\\,[y\\log(y/\\mu) + (1-y)\\log((1-y)/(1-\\mu))]`.
    """

    name = "Binomial"
    code = _glm.FAMILY_BINOMIAL
    has_dispersion = False
    _canonical = LogitLink

    def variance(self, mu):
        mu = _as_float(mu)
        return mu * (1.0 - mu)

    def _check_support(self, y, w, response_name):
        bad = (y < 0) | (y > 1)
        if bad.any():
            raise ValueError(
                f"response {response_name!r} must be a proportion in [0, 1] for "
                f"Binomial (successes / trials, with the trials as weights); "
                f"found values {_show(y[bad])}")
        n = np.ones_like(y) if w is None else w
        k = n * y
        off = np.abs(k - np.round(k)) > 1e-6 * np.maximum(1.0, np.abs(k))
        if off.any():
            warnings.warn(
                f"response {response_name!r} times the weights (number of trials) is "
                f"not a whole number of successes at rows {_rows(off)}; Binomial "
                "expects proportions with the trials as weights",
                RuntimeWarning, stacklevel=3)

    def starting_mu(self, y, weights=None):
        y = _as_float(y)
        w = np.ones_like(y) if weights is None else _as_float(weights)
        return (w * y + 0.5) / (w + 1.0)


class Poisson(Family):
    """Counts; canonical link log; no dispersion.

    Notes
    -----
    :math:`V(\\mu) = \\mu`; deviance residual
    :math:`2w\\,[y\\log(y/\\mu) - (y-\\mu)]`.
    """

    name = "Poisson"
    code = _glm.FAMILY_POISSON
    has_dispersion = False
    _canonical = LogLink

    def variance(self, mu):
        return np.array(mu, dtype=np.float64)

    def _check_support(self, y, w, response_name):
        _check_counts(y, self.name, response_name)

    def starting_mu(self, y, weights=None):
        return _as_float(y) + 0.1


class _PositiveFamily(Family):
    def _check_support(self, y, w, response_name):
        bad = y <= 0
        if bad.any():
            raise ValueError(
                f"response {response_name!r} must be strictly positive for "
                f"{self.name}; found values {_show(y[bad])}")


class Gamma(_PositiveFamily):
    """Positive continuous response; canonical link inverse; dispersion φ.

    Notes
    -----
    :math:`V(\\mu) = \\mu^2`; deviance residual
    :math:`-2w\\,[\\log(y/\\mu) - (y-\\mu)/\\mu]`.
    """

    name = "Gamma"
    code = _glm.FAMILY_GAMMA
    _canonical = InverseLink

    def variance(self, mu):
        mu = _as_float(mu)
        return mu * mu


class InverseGaussian(_PositiveFamily):
    """Positive continuous response; canonical link 1/μ²; dispersion φ.

    Notes
    -----
    :math:`V(\\mu) = \\mu^3`; deviance residual :math:`w\\,(y-\\mu)^2/(y\\mu^2)`.
    """

    name = "InverseGaussian"
    code = _glm.FAMILY_INVERSE_GAUSSIAN
    _canonical = InverseSquareLink

    def variance(self, mu):
        mu = _as_float(mu)
        return mu * mu * mu


class Normal(Family):
    """Gaussian response; canonical link identity; dispersion φ = σ².

    Notes
    -----
    :math:`V(\\mu) = 1`; deviance residual :math:`w\\,(y-\\mu)^2`.
    """

    name = "Normal"
    code = _glm.FAMILY_NORMAL
    _canonical = IdentityLink

    def variance(self, mu):
        return np.ones_like(_as_float(mu))


def _checked_theta(theta):
    # bool is a numbers.Real, and True would otherwise pass as θ = 1
    if isinstance(theta, (bool, np.bool_)) or not isinstance(theta, numbers.Real):
        raise TypeError(f"theta must be a number or None, not {type(theta).__name__}")
    value = float(theta)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"theta must be a finite positive number, got {value!r} (theta = inf is "
            "the Poisson family)")
    return value


class NegativeBinomial(Family):
    """Overdispersed counts, NB2: Var(y) = μ + μ²/θ; default link log; no dispersion.

    Parameters
    ----------
    link : Link, str or None
        ``"log"`` (the default), ``"sqrt"`` or ``"identity"``.
    theta : float or None
        The shape θ > 0. None (the default) means the fit estimates it; a number fixes
        it at that value.

    Attributes
    ----------
    theta : float or None
        The current θ: the fixed value, or for an estimated θ the value set by
        :meth:`with_theta` (None before that). Read-only.
    estimate_param : bool
        True when θ is to be estimated (the family was made with ``theta=None``).

    Notes
    -----
    y counts the failures before the θ-th success of Bernoulli trials with success
    probability θ/(θ+μ), θ allowed to be any positive number; equivalently y is Poisson
    given a gamma-distributed mean with mean μ and shape θ. θ → ∞ is the Poisson
    family. With θ fixed this is an exponential family (its canonical link,
    log(μ/(μ+θ)), is not offered), with

    .. math::

        V(\\mu) = \\mu + \\mu^2/\\theta, \\qquad
        \\mathrm{dev}(y, \\mu) = 2\\Big[y\\log\\frac{y}{\\mu}
            - (y+\\theta)\\log\\frac{y+\\theta}{\\mu+\\theta}\\Big],

    and the log probability

    .. math::

        \\log\\Gamma(y+\\theta) - \\log\\Gamma(\\theta) - \\log\\Gamma(y+1)
        + \\theta\\log\\frac{\\theta}{\\theta+\\mu} + y\\log\\frac{\\mu}{\\theta+\\mu},

    which equals ``scipy.stats.nbinom.logpmf(y, n=theta, p=theta/(theta+mu))`` and is
    evaluated so that it keeps its precision for large θ. Prior weights multiply the
    log probability and the deviance residual, as for :class:`Poisson`, so that for
    every weight the deviance residual is twice the log probability at μ = y less
    that at μ.

    The dispersion φ is 1 (:attr:`has_dispersion` is False); θ is the family's own
    parameter (:attr:`n_extra_params` = 1, :attr:`extra_param_name` = ``"theta"``) and
    reaches the compiled kernels as :attr:`param`. A family with an estimated θ has to
    be given a value through :meth:`with_theta` before :meth:`update` or
    :meth:`loglik` can be called.

    Examples
    --------
    >>> NegativeBinomial()
    NegativeBinomial(link=log, theta=estimated)
    >>> NegativeBinomial(link="sqrt", theta=2.5)
    NegativeBinomial(link=sqrt, theta=2.5)
    >>> NegativeBinomial().with_theta(1.75)
    NegativeBinomial(link=log, theta=1.75 [estimated])
    """

    name = "NegativeBinomial"
    code = _glm.FAMILY_NEGATIVE_BINOMIAL
    has_dispersion = False
    n_extra_params = 1
    extra_param_name = "theta"
    _canonical = LogLink
    _links = (LogLink, SqrtLink, IdentityLink)

    def __init__(self, link=None, theta=None):
        super().__init__(link)
        if type(self.link) not in self._links:
            raise ValueError(
                "NegativeBinomial supports the links "
                + ", ".join(repr(c.name) for c in self._links)
                + f"; got {self.link.name!r}")
        # read-only through the properties: a family is a value (it is hashed, and
        # shared between a model and its fits); with_theta makes a new one
        self._theta = None if theta is None else _checked_theta(theta)
        self._estimate = theta is None

    @property
    def theta(self):
        """float or None: the current θ (None while an estimated θ has no value)."""
        return self._theta

    @property
    def estimate_param(self):
        """bool: whether a fit must estimate θ (the family was made with theta=None)."""
        return self._estimate

    @property
    def param(self):
        """float: θ, or NaN while an estimated θ has no value yet."""
        return math.nan if self._theta is None else self._theta

    def with_theta(self, theta):
        """A copy of the family with θ set to `theta`.

        Parameters
        ----------
        theta : float
            The new θ, finite and > 0.

        Returns
        -------
        NegativeBinomial
            A new instance with the same link; whether θ is estimated is carried
            over, so a fit can hand out its estimate without fixing it.

        Raises
        ------
        ValueError
            If `theta` is not finite and positive.
        """
        new = copy.copy(self)
        new._theta = _checked_theta(theta)
        return new

    with_param = with_theta

    def __repr__(self):
        if self.theta is None:
            shown = "estimated"
        else:
            shown = f"{self.theta:.6g}" + (" [estimated]" if self.estimate_param else "")
        return f"{self.name}(link={self.link.name}, theta={shown})"

    def __eq__(self, other):
        return (type(self) is type(other) and self.link == other.link
                and self.theta == other.theta
                and self.estimate_param == other.estimate_param)

    def __hash__(self):
        return hash((type(self), type(self.link), self.theta, self.estimate_param))

    def variance(self, mu):
        """V(μ) = μ + μ²/θ (θ must be known).

        Parameters
        ----------
        mu : array_like
            Means.

        Returns
        -------
        ndarray
        """
        if self.theta is None:
            raise ValueError("the variance of a NegativeBinomial family needs theta; "
                             "set it with with_theta(value)")
        mu = _as_float(mu)
        return mu * (1.0 + mu / self.theta)

    def _check_support(self, y, w, response_name):
        _check_counts(y, self.name, response_name)

    def starting_mu(self, y, weights=None):
        return _as_float(y) + 0.1


_FAMILY_CLASSES = (Bernoulli, Binomial, Poisson, Gamma, InverseGaussian, Normal,
                   NegativeBinomial)
_FAMILIES_BY_NAME = {cls.name.lower(): cls for cls in _FAMILY_CLASSES}
_FAMILIES_BY_NAME.update({"inverse_gaussian": InverseGaussian, "gaussian": Normal,
                          "negative_binomial": NegativeBinomial,
                          "nbinom2": NegativeBinomial})
_FAMILIES_BY_CODE = {cls.code: cls for cls in _FAMILY_CLASSES}


def get_family(spec):
    """Resolve a family specification to a :class:`Family` instance.

    Parameters
    ----------
    spec : Family, type or str
        A family instance (returned as is), a :class:`Family` subclass (instantiated
        with its canonical link), or a case-insensitive name: ``"bernoulli"``,
        ``"binomial"``, ``"poisson"``, ``"gamma"``, ``"inversegaussian"`` /
        ``"inverse_gaussian"``, ``"normal"`` / ``"gaussian"``,
        ``"negativebinomial"`` / ``"negative_binomial"`` / ``"nbinom2"`` (with θ to be
        estimated).

    Returns
    -------
    Family

    Raises
    ------
    ValueError
        For an unknown name.
    TypeError
        For anything else.

    Examples
    --------
    >>> get_family("binomial")
    Binomial(link=logit)
    >>> get_family(Poisson)
    Poisson(link=log)
    """
    if isinstance(spec, Family):
        return spec
    if (isinstance(spec, type) and issubclass(spec, Family)
            and spec not in (Family, _PositiveFamily)):
        return spec()
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in _FAMILIES_BY_NAME:
            return _FAMILIES_BY_NAME[key]()
        raise ValueError(
            f"unknown family {spec!r}; expected one of 'bernoulli', 'binomial', "
            "'poisson', 'gamma', 'inverse_gaussian', 'normal', 'negative_binomial'")
    raise TypeError(
        f"family must be a Family, a Family class or a family name, "
        f"not {type(spec).__name__}")

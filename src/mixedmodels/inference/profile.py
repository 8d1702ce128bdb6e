"""Likelihood profiles of a fit's parameters, and the intervals they give.

The parameters are those lme4 reports (``confint(..., oldNames = FALSE)``): for each
random-effects term the standard deviations and correlations of its columns, in θ's
order (``sd_(Intercept)|subj``, ``cor_days.(Intercept)|subj``, ``sd_days|subj``),
then ``sigma`` (LMMs, and GLMMs with a dispersion: √φ), then the fixed effects.

Notes
-----
For one parameter ψ fixed at c, the profiled deviance is the minimum of -2 log L over
every other parameter, and

    ζ(c) = sign(c - ψ̂) √(dev(c) - dev(ψ̂)),

which is the standard normal quantile of the likelihood-ratio test of ψ = c. A
100·level % interval is the set where |ζ| ≤ Φ⁻¹((1 + level)/2). ζ is nearly linear in c
for a well-behaved parameter, its curvature shows how far a Wald interval is off.

How the other parameters are eliminated:

- LMM: σ and β analytically wherever the constraint allows. With r²(θ) the penalized
  RSS at β̂(θ), log det L(θ), n rows and Σ log w the precision weights,
  ``dev(θ, σ) = n log(2πσ²) + 2 log det L + r²/σ² - Σ log w`` and, profiled over σ,
  ``n (1 + log(2π r²/n)) + 2 log det L - Σ log w``. Fixing β_j = c adds
  (c - β̂_j(θ))² / V_jj(θ) to r² (V = (RX'RX)⁻¹: the least-squares cost of moving one
  coefficient with the others re-fitted), so β_j is profiled over the other
  coefficients exactly and over θ by BOBYQA; this is the same profile lme4 computes by
  refitting with X_j c as an offset, without rebuilding a model per point.
- The covariance parameters are re-optimized by BOBYQA on a Cholesky scale that makes
  the constraint a coordinate: the term holding the parameter is refactored with its
  columns permuted so that the profiled column comes first (then its sd is σ·M₀₀) or,
  for a correlation between columns a and e, a and e come first, and row 1 of the
  factor M is v·(ρ, √(1-ρ²)) with v ≥ 0 free (then the correlation is ρ whatever the
  other entries). No correlation matrix can then leave the positive semi-definite cone,
  and ρ = ±1 is an ordinary point. For an LMM sd, σ is a free coordinate (log scale)
  and M₀₀ = c/σ; a correlation is scale-free, so σ stays profiled out.
- GLMM: the optimizer's own function ``_joint_value`` of (β̃, θ[, log φ]), with the
  fixed parameter held as above; β_j = c is the hyperplane a'β̃ = c in the working
  coordinates (a the j-th row of R̃⁻¹), searched along an orthonormal basis of its
  complement so that the scaling of the working basis is kept.

Each side of each parameter is walked outwards from the estimate in steps of about
``step`` in ζ (the next value from the secant slope of the last two points, as lme4
does), every re-optimization starting from the previous points' solutions extrapolated
linearly. The walk stops past the ζ of the requested level, or at the parameter's
bound (sd 0, correlation ±1, σ 0). An interval end is then the root of ζ(c) = ±z to
1e-6 in ζ, found by regula falsi inside the bracket the walk found, rather than read
off a spline through the walk's points as lme4 does (which is where lme4's bounds
differ from these, by up to 2e-4 relative on the reference models, and by 2e-3 where
its spline fails and it falls back to linear interpolation). A profile that reaches its
bound first gives the bound (lower = 0 for a singular variance component).

A REML fit is profiled through its ML refit, on the specification's workspace, as lme4
does: the REML criterion does not depend on β and is not a likelihood to invert for it.
"""
import math
import warnings

import nlopt
import numpy as np
import pandas as pd
from scipy.linalg import lapack
from scipy.stats import norm

from .._optimize import OptSummary, minimize, rectify

__all__ = ["Profile", "parameter_names", "profile"]

# A profile deviance further than this below the fit's is more than the optimizers'
# rounding: the fit was not at the optimum (Profile.confint warns).
_NEGATIVE_TOLERANCE = 1e-6


# -- names and values on lme4's scale ----------------------------------------------------
def _variance_names(model):
    """lme4's ``sd_<col>|<group>`` / ``cor_<col>.<col>|<group>`` per θ entry, θ's order."""
    names = []
    for t, e, a in model.layout.entries:
        term = model.reterms[t]
        cn, g = term.cnames, term.group_name
        names.append(f"sd_{cn[e]}|{g}" if e == a else f"cor_{cn[e]}.{cn[a]}|{g}")
    return names


def _has_sigma(fit):
    return fit.sigma is not None


def parameter_names(fit):
    """The names of a fit's parameters, in lme4's order.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit

    Returns
    -------
    variance : list of str
        ``sd_...|group`` and ``cor_...|group`` per θ entry, then ``sigma`` when the fit
        has a residual scale (LMMs; GLMMs with a dispersion, where it is √φ).
    fixed : list of str
        ``fit.coef_names``.
    """
    var = _variance_names(fit.model)
    if _has_sigma(fit):
        var.append("sigma")
    return var, list(fit.coef_names)


def _sd_cor(layout, theta, scale):
    """sd and correlation per θ entry from θ (Λ relative to ``scale``)."""
    out = np.empty(layout.ntheta)
    lams = layout.templates(theta)
    for i, (t, e, a) in enumerate(layout.entries):
        lam = lams[t]
        if e == a:
            out[i] = scale * math.sqrt(float(lam[e] @ lam[e]))
        else:
            ne, na = math.sqrt(float(lam[e] @ lam[e])), math.sqrt(float(lam[a] @ lam[a]))
            out[i] = float(lam[e] @ lam[a]) / (ne * na) if ne > 0 and na > 0 else np.nan
    return out


def _zerocorr(layout, t):
    """Whether term t is uncorrelated (``||``): θ holds only its diagonal."""
    return sum(1 for (tt, _, _) in layout.entries if tt == t) == layout.kk[t] > 1


def _chol_psd(s):
    """Lower-triangular L with LL' = s for a positive semi-definite s (a list of rows).

    A zero pivot (a column that is a combination of the earlier ones: a singular
    covariance, as at a boundary fit) gives a zero column instead of an error. Plain
    floats: the terms are a few columns wide, and this runs once per evaluation.
    """
    k = len(s)
    lo = [[0.0] * k for _ in range(k)]
    tiny = 1e-14 * max(max(abs(s[i][i]) for i in range(k)), 1e-300)
    for j in range(k):
        row_j = lo[j]
        d = s[j][j] - sum(row_j[m] * row_j[m] for m in range(j))
        if d <= tiny:
            continue
        piv = math.sqrt(d)
        row_j[j] = piv
        for i in range(j + 1, k):
            row_i = lo[i]
            row_i[j] = (s[i][j] - sum(row_i[m] * row_j[m] for m in range(j))) / piv
    return lo


class _Held:
    """θ from free coordinates with one sd or correlation of one term held fixed.

    The term holding the parameter is re-expressed through the lower-triangular factor
    M of P Σ P' (Σ its covariance, relative to σ for an LMM; P moves the held columns
    to the front), stored in θ's own layout and order; every other term keeps θ. Then

    - an sd of column e (P moves e first) is M₀₀: one coordinate, held at the value
      :meth:`theta` is given;
    - a correlation of columns a and e (P moves a, e first) is ρ when row 1 of M is
      v·(ρ, √(1-ρ²)), whatever the rest of M: v ≥ 0 (the relative sd of column e)
      takes the slot of M₁₁ and M₁₀ follows from ρ.

    M's diagonal keeps θ's lower bound of 0, so no coordinate leaves the positive
    semi-definite cone, and ρ = ±1 or an sd of 0 are ordinary points. With ``kind``
    None nothing is held and the coordinates are θ.

    Attributes
    ----------
    free : int array
        Positions of the free coordinates in θ's layout.
    x0 : array
        The free coordinates at the fit.
    value : float
        The held quantity at the fit (M₀₀, or ρ; NaN for a correlation of a column
        whose sd is zero).
    """

    def __init__(self, layout, theta_hat, kind=None, index=None):
        self.kind = kind
        self.perm = None
        m0 = np.array(theta_hat, dtype=float)
        held = []
        self.value = math.nan
        if kind is not None:
            t, e, a = layout.entries[index]
            idx = np.flatnonzero(layout.term_of == t)
            self.sl = slice(int(idx[0]), int(idx[-1]) + 1)
            self.k = k = layout.kk[t]
            # (row, col) of the term's θ entries, in their order
            self.rc = [(ee, aa) for (tt, ee, aa) in layout.entries if tt == t]
            pos = {rc: self.sl.start + i for i, rc in enumerate(self.rc)}
            first = [e] if kind == "sd" else [a, e]
            if _zerocorr(layout, t) or first == list(range(len(first))):
                first = None            # the factor needs no permutation
            else:
                self.perm = first + [c for c in range(k) if c not in first]
                self.inv = [int(i) for i in np.argsort(self.perm)]
                lam = layout.templates(theta_hat)[t]
                cov = lam @ lam.T
                mm = _chol_psd([[float(cov[i, j]) for j in self.perm] for i in self.perm])
                m0[self.sl] = [mm[ee][aa] for ee, aa in self.rc]
            if kind == "sd":
                # an uncorrelated term's sd is its own diagonal entry of θ
                self.at = index if _zerocorr(layout, t) else pos[(0, 0)]
                self.value = abs(m0[self.at])
                held = [self.at]
            else:
                self.p10, self.p11 = pos[(1, 0)], pos[(1, 1)]
                v = math.hypot(m0[self.p10], m0[self.p11])
                self.value = m0[self.p10] / v if v > 0 else math.nan
                m0[self.p10], m0[self.p11] = 0.0, v
                held = [self.p10]
        self.m0 = m0
        self.free = np.array([i for i in range(layout.ntheta) if i not in held], dtype=np.intp)
        self.x0 = m0[self.free]
        self.lower = layout.lower[self.free]

    def theta(self, x, held=None):
        """θ with the free coordinates x and the held value (M₀₀ or ρ)."""
        m = self.m0.copy()
        m[self.free] = x
        if self.kind == "sd":
            m[self.at] = held
        elif self.kind == "cor":
            v = m[self.p11]
            m[self.p10] = held * v
            m[self.p11] = v * math.sqrt(max(0.0, 1.0 - held * held))
        if self.perm is None:
            return m
        return self._unpermute(m)

    def _unpermute(self, m):
        """θ of Σ = P'MM'P: the factor of the term in its own column order."""
        theta = m.copy()
        if self.k == 2:
            # the two columns swapped: M = [[m00, 0], [m10, m11]] factors the swapped
            # covariance, whose own factor is written down directly
            m00, m10, m11 = m[self.sl].tolist()
            l00 = math.hypot(m10, m11)
            if l00 > 0.0:
                theta[self.sl] = [l00, m00 * m10 / l00, abs(m00 * m11) / l00]
            else:
                theta[self.sl] = [0.0, 0.0, abs(m00)]
            return theta
        k = self.k
        mm = [[0.0] * k for _ in range(k)]
        for (e, a), v in zip(self.rc, m[self.sl].tolist()):
            mm[e][a] = v
        # entry (i, j) of Σ is row inv[i] of M times row inv[j]
        rows = [mm[i] for i in self.inv]
        cov = [[sum(x * y for x, y in zip(ri, rj)) for rj in rows] for ri in rows]
        lo = _chol_psd(cov)
        theta[self.sl] = [lo[e][a] for e, a in self.rc]
        return theta


def _forward_transposed(r, a, p):
    """w = RX⁻ᵀa for the upper-triangular RX = r[:p, :p].

    Plain floats for the usual handful of coefficients: LAPACK's entry costs more than
    the solve, and a threaded BLAS can take milliseconds to wake for it.
    """
    if p > 12:
        w, info = lapack.dtrtrs(r[:p, :p], a, lower=0, trans=1)
        if info != 0:
            raise np.linalg.LinAlgError("singular fixed-effects factor")
        return w
    rr = r[:p, :p].tolist()
    aa = a.tolist()
    w = [0.0] * p
    for i in range(p):
        acc = aa[i]
        for k in range(i):
            acc -= rr[k][i] * w[k]
        d = rr[i][i]
        if d == 0.0:
            raise np.linalg.LinAlgError("singular fixed-effects factor")
        w[i] = acc / d
    return np.array(w)


def _upper_inverse(u):
    """The inverse of a small upper-triangular matrix (plain floats, as above)."""
    p = u.shape[0]
    if p == 0:
        return np.zeros((0, 0))
    if p > 12:
        return np.linalg.inv(u)
    uu = u.tolist()
    inv = [[0.0] * p for _ in range(p)]
    for j in range(p):
        inv[j][j] = 1.0 / uu[j][j]
        for i in range(j - 1, -1, -1):
            acc = 0.0
            for k in range(i + 1, j + 1):
                acc += uu[i][k] * inv[k][j]
            inv[i][j] = -acc / uu[i][i]
    return np.array(inv)


# -- the deviance of an LMM away from its optimum ----------------------------------------
class _LmmCore:
    """ML deviance pieces of an LMM specification at θ (the fit's workspace).

    A REML fit is first refitted by ML over θ on the same workspace (lme4's
    ``refitML``), since its profile is that of the likelihood.
    """

    def __init__(self, fit):
        model = fit.model
        self.model = model
        self.n = float(model.n)
        self.p = model.p
        self.layout = model.layout
        self.fixed = model.fixed
        self.r_inverse = _upper_inverse(model.fixed.R)
        w = model.design.weights
        self.logw = 0.0 if w is None else float(np.sum(np.log(w)))
        theta = np.asarray(fit.theta, dtype=float)
        self.refitted = bool(fit.REML)
        if self.refitted:
            theta = self._refit_ml(theta)
        self.theta_hat = theta
        self.base = self.dev_profiled(theta)
        beta, v, pwrss = self.point(theta)
        self.sigma_hat = math.sqrt(pwrss / self.n)
        self.beta_hat = beta
        self.vcov_hat = self.sigma_hat ** 2 * v
        self.estimates = np.concatenate([_sd_cor(self.layout, theta, self.sigma_hat),
                                         [self.sigma_hat], beta])

    def point(self, theta):
        """(β̂(θ), (RX'RX)⁻¹, r²) in the coefficients' own coordinates.

        As ``profiled_parts`` gives them, from one factorization and without the LAPACK
        calls a threaded BLAS wakes up for (milliseconds each on a busy machine).
        """
        _, r, pwrss = self._parts(theta)
        p = self.p
        # β = R̃⁻¹ RX⁻¹ r_Xy and its covariance factor A = (RX R̃)⁻¹
        a = _upper_inverse(r[:p, :p] @ self.fixed.R)
        return a @ r[:p, p], a @ a.T, float(pwrss)

    def _refit_ml(self, theta0):
        layout = self.layout
        optsum = OptSummary(initial=theta0, lowerbd=layout.lower,
                            initial_step=np.maximum(0.05 * np.abs(theta0), 0.01))
        minimize(self.dev_profiled, optsum)
        rectify(self.dev_profiled, optsum, np.flatnonzero(np.isfinite(layout.lower)))
        return np.asarray(optsum.final, dtype=float)

    def _parts(self, theta):
        # the specification's own evaluation at θ: log det L, the factor [RX rXy; 0 r]
        # (a buffer the next call overwrites) and the penalized RSS at β̂(θ)
        _, logdet, r, pwrss = self.model._evaluate(theta)
        return logdet, r, pwrss

    def dev_profiled(self, theta):
        """-2 log L at θ, profiled over β and σ."""
        try:
            logdet, _, pwrss = self._parts(theta)
        except np.linalg.LinAlgError:
            return math.inf
        if not pwrss > 0.0:
            return math.inf
        n = self.n
        return 2.0 * logdet + n * (1.0 + math.log(2.0 * math.pi * pwrss / n)) - self.logw

    def dev_at_sigma(self, theta, sigma):
        """-2 log L at θ and σ, profiled over β."""
        if not sigma > 0.0:
            return math.inf
        try:
            logdet, _, pwrss = self._parts(theta)
        except np.linalg.LinAlgError:
            return math.inf
        s2 = sigma * sigma
        return self.n * math.log(2.0 * math.pi * s2) + 2.0 * logdet + pwrss / s2 - self.logw

    def coef_shift(self, theta, a):
        """(log det L, a'β̂(θ), a'(RX'RX)⁻¹a, r²) with a'β̃ one original coefficient."""
        logdet, r, pwrss = self._parts(theta)
        p = self.p
        w = _forward_transposed(r, a, p)
        return logdet, float(w @ r[:p, p]), float(w @ w), pwrss

    def dev_beta(self, theta, a, c):
        """-2 log L at θ with a'β̃ = c (one original coefficient), profiled over the rest
        of β and σ."""
        try:
            logdet, bj, vjj, pwrss = self.coef_shift(theta, a)
        except np.linalg.LinAlgError:
            return math.inf
        rss = pwrss + (c - bj) ** 2 / vjj
        if not rss > 0.0:
            return math.inf
        n = self.n
        return 2.0 * logdet + n * (1.0 + math.log(2.0 * math.pi * rss / n)) - self.logw

    def values(self, theta, sigma=None, coef=None):
        """Every parameter on lme4's scale at θ (σ, β profiled unless given)."""
        beta, v, rss = self.point(theta)
        if coef is not None:
            j, c = coef
            shift = c - beta[j]
            # the other coefficients' least-squares response to holding β_j at c
            beta = beta + v[:, j] * shift / v[j, j]
            rss += shift ** 2 / v[j, j]
        if sigma is None:
            sigma = math.sqrt(rss / self.n)
        return np.concatenate([_sd_cor(self.layout, theta, sigma), [sigma], beta])


# -- the parameters to profile -------------------------------------------------------------
class _Target:
    """One parameter: its estimate and range, and the deviance with it held at c as a
    function of the other parameters' coordinates x (``value(c, x)``), which the walk
    minimizes over x from ``x0`` (lower bounds ``xlower``, typical steps ``xscale``).
    ``values(c, x)`` gives every parameter on lme4's scale at such a point."""

    name = ""
    kind = ""          # "sd", "cor", "sigma" or "beta"
    lower = -math.inf
    upper = math.inf
    estimate = math.nan
    start_step = 0.0   # the first step away from the estimate


def _range_of(kind):
    return {"sd": (0.0, math.inf), "sigma": (0.0, math.inf), "cor": (-1.0, 1.0),
            "beta": (-math.inf, math.inf)}[kind]


def _theta_scale(theta):
    # a step on θ's scale: a few percent of the value, and never below 1e-3 (θ is
    # relative to σ, or the sd of b itself, so 1e-3 is small on either scale)
    return np.maximum(0.02 * np.abs(theta), 1e-3)


class _LmmVariance(_Target):
    """An sd, correlation or σ of an LMM; θ (and σ for an sd) re-optimized, β profiled.

    For an sd, c = σ·M₀₀: σ is a free coordinate (log σ, last in x) and M₀₀ = c/σ. A
    correlation does not depend on σ, which stays profiled out; for σ itself, θ is free.
    """

    def __init__(self, core, name, kind, index=None):
        self.core, self.name, self.kind = core, name, kind
        self.lower, self.upper = _range_of(kind)
        sig = core.sigma_hat
        self.held = _Held(core.layout, core.theta_hat, None if kind == "sigma" else kind, index)
        extra = [math.log(sig)] if kind == "sd" else []
        if kind == "sigma":
            self.estimate = sig
            # the ML σ̂ has a standard error near σ̂/√(2n): ζ ≈ 0.3
            self.start_step = 0.3 * sig / math.sqrt(2.0 * core.n)
        elif kind == "sd":
            self.estimate = sig * self.held.value
            self.start_step = max(0.05 * self.estimate, 0.02 * sig)
        else:
            self.estimate = self.held.value
            self.start_step = 0.05
        self.x0 = np.concatenate([self.held.x0, extra])
        self.xlower = np.concatenate([self.held.lower, [-np.inf] * len(extra)])
        self.xscale = np.concatenate([_theta_scale(self.held.x0), [0.01] * len(extra)])

    def _theta_sigma(self, c, x):
        if self.kind == "sd":
            sigma = math.exp(x[-1])
            return self.held.theta(x[:-1], c / sigma), sigma
        if self.kind == "sigma":
            return self.held.theta(x), c
        return self.held.theta(x, c), None

    def value(self, c, x):
        theta, sigma = self._theta_sigma(c, x)
        if sigma is None:
            return self.core.dev_profiled(theta)
        return self.core.dev_at_sigma(theta, sigma)

    def values(self, c, x):
        theta, sigma = self._theta_sigma(c, x)
        return self.core.values(theta, sigma=sigma)


class _LmmCoef(_Target):
    """β_j of an LMM: θ re-optimized; σ and the other coefficients profiled exactly."""

    kind = "beta"

    def __init__(self, core, name, j):
        self.core, self.name, self.j = core, name, j
        # β_j = a'β̃: the j-th row of R̃⁻¹
        self.a = np.ascontiguousarray(core.r_inverse[j])
        self.estimate = float(core.beta_hat[j])
        self.start_step = 0.5 * math.sqrt(core.vcov_hat[j, j])
        self.x0 = core.theta_hat.copy()
        self.xlower = core.layout.lower.copy()
        self.xscale = _theta_scale(self.x0)

    def value(self, c, x):
        return self.core.dev_beta(x, self.a, c)

    def values(self, c, x):
        return self.core.values(x, coef=(self.j, c))


class _GlmmCore:
    """A GLMM's joint objective over (β̃, θ[, log φ]) and its optimum.

    Bernoulli, binomial and Poisson fits minimize MixedModels.jl's deviance, -2 log L
    less a constant: the differences ζ is made of are those of -2 log L.
    """

    def __init__(self, fit):
        model = fit.model
        if getattr(fit, "fast", False):
            raise ValueError("a fast (nAGQ = 0) fit does not maximize the likelihood over β: "
                             "profile the full fit (fast=False)")
        self.model = model
        self.layout = model.layout
        self.p = model.p
        self.r_inverse = _upper_inverse(model.fixed.R)
        self.disp = bool(model.has_dispersion)
        self.theta_hat = np.asarray(fit.theta, dtype=float)
        self.beta_w_hat = np.asarray(fit.beta_w, dtype=float)
        self.logphi_hat = math.log(fit.dispersion) if self.disp else None
        # PIRLS starts from the modes of its last call: start from scratch, as the fit's
        # own evaluation at the optimum did
        model._u = None
        self.base = self.joint(self.beta_w_hat, self.theta_hat, self.logphi_hat)
        r = model.fixed.R
        self.vcov_w = r @ np.asarray(fit.vcov) @ r.T
        self.se_w = np.sqrt(np.maximum(np.diag(self.vcov_w), 0.0))
        self.estimates = self.values(self.beta_w_hat, self.theta_hat, self.logphi_hat)

    def joint(self, beta_w, theta, logphi):
        x = np.concatenate([beta_w, theta, [] if logphi is None else [logphi]])
        v = self.model._joint_value(x)
        return v if math.isfinite(v) else math.inf

    def values(self, beta_w, theta, logphi):
        sig = [] if logphi is None else [math.exp(0.5 * logphi)]
        return np.concatenate([_sd_cor(self.layout, theta, 1.0), sig,
                               self.r_inverse @ beta_w])


class _GlmmVariance(_Target):
    """An sd, correlation or σ = √φ of a GLMM; θ, β̃ (and log φ) re-optimized."""

    def __init__(self, core, name, kind, index=None):
        self.core, self.name, self.kind = core, name, kind
        self.lower, self.upper = _range_of(kind)
        self.held = _Held(core.layout, core.theta_hat, None if kind == "sigma" else kind, index)
        if kind == "sigma":
            self.estimate = math.exp(0.5 * core.logphi_hat)
            self.start_step = 0.05 * self.estimate
        elif kind == "sd":
            self.estimate = self.held.value
            self.start_step = max(0.05 * self.estimate, 0.01)
        else:
            self.estimate = self.held.value
            self.start_step = 0.05
        self.keep_phi = core.disp and kind != "sigma"
        extra = [core.logphi_hat] if self.keep_phi else []
        self.nf = len(self.held.free)
        self.x0 = np.concatenate([self.held.x0, core.beta_w_hat, extra])
        self.xlower = np.concatenate([self.held.lower, np.full(core.p, -np.inf),
                                      [-np.inf] * len(extra)])
        self.xscale = np.concatenate([_theta_scale(self.held.x0),
                                      np.where(core.se_w > 0, 0.05 * core.se_w, 1e-3),
                                      [0.01] * len(extra)])

    def _split(self, c, x):
        nf, p = self.nf, self.core.p
        theta = self.held.theta(x[:nf], None if self.kind == "sigma" else c)
        beta_w = x[nf:nf + p]
        if self.kind == "sigma":
            logphi = 2.0 * math.log(c) if c > 0 else -math.inf
        else:
            logphi = x[nf + p] if self.keep_phi else None
        return beta_w, theta, logphi

    def value(self, c, x):
        beta_w, theta, logphi = self._split(c, x)
        if logphi is not None and not math.isfinite(logphi):
            return math.inf
        return self.core.joint(beta_w, theta, logphi)

    def values(self, c, x):
        return self.core.values(*self._split(c, x))


class _GlmmCoef(_Target):
    """β_j of a GLMM: β̃ on the hyperplane a'β̃ = c, θ (and log φ) re-optimized."""

    kind = "beta"

    def __init__(self, core, name, j):
        self.core, self.name, self.j = core, name, j
        p, nt = core.p, core.layout.ntheta
        a = core.r_inverse[j]
        self.a_unit = a / float(a @ a)
        # an orthonormal basis of the complement of a: the directions that keep β_j
        q, _ = np.linalg.qr(np.column_stack([a, np.eye(p)]))
        self.basis = np.ascontiguousarray(q[:, 1:p])
        self.estimate = float(a @ core.beta_w_hat)
        self.start_step = 0.5 * math.sqrt(float(a @ core.vcov_w @ a))
        z0 = self.basis.T @ core.beta_w_hat
        zse = np.sqrt(np.maximum(np.diag(self.basis.T @ core.vcov_w @ self.basis), 0.0))
        extra = [core.logphi_hat] if core.disp else []
        self.nt = nt
        self.x0 = np.concatenate([core.theta_hat, z0, extra])
        self.xlower = np.concatenate([core.layout.lower, np.full(p - 1, -np.inf),
                                      [-np.inf] * len(extra)])
        self.xscale = np.concatenate([_theta_scale(core.theta_hat),
                                      np.where(zse > 0, 0.05 * zse, 1e-3), [0.01] * len(extra)])

    def _split(self, c, x):
        nt, p = self.nt, self.core.p
        beta_w = c * self.a_unit + self.basis @ x[nt:nt + p - 1]
        logphi = x[nt + p - 1] if self.core.disp else None
        return beta_w, x[:nt], logphi

    def value(self, c, x):
        return self.core.joint(*self._split(c, x))

    def values(self, c, x):
        return self.core.values(*self._split(c, x))


# -- walking a profile ------------------------------------------------------------------
def _minimize_nuisance(f, x0, lower, step):
    """min_x f(x) by BOBYQA from x0 (a warm start); returns (x, f(x)).

    NLopt is called directly rather than through ``_optimize.minimize``, whose fit log
    keeps a copy of every point: a profile runs a hundred small optimizations.
    """
    n = len(x0)
    x0 = np.maximum(np.asarray(x0, dtype=float), lower)
    if n == 0:
        return x0, f(x0)
    best = [math.inf, x0.copy()]

    def objective(x, grad):
        val = f(x)
        if val < best[0]:
            best[0], best[1] = val, x.copy()
        # BOBYQA's quadratic model cannot take inf: a point with no likelihood is a
        # very bad one
        return val if val < math.inf else 1e300

    opt = nlopt.opt(nlopt.LN_BOBYQA, n)
    opt.set_lower_bounds(lower)
    opt.set_min_objective(objective)
    # a deviance resolved to 1e-8 moves ζ near the cut-off by 3e-9 (Δζ = Δdev / 2ζ),
    # and the coordinates are of order one
    opt.set_ftol_abs(1e-8)
    opt.set_ftol_rel(1e-14)
    opt.set_xtol_abs(1e-7)
    opt.set_maxeval(200 * (n + 1) ** 2)
    opt.set_initial_step(step)
    try:
        opt.optimize(x0)
    except nlopt.RoundoffLimited:
        pass        # the best point so far is kept
    return best[1], best[0]


class _Walk:
    """The evaluated points of one parameter's profile: (c, deviance, x) in the order
    they were computed, each x the optimum of the other parameters at c."""

    def __init__(self, target, base):
        self.target = target
        self.base = base
        self.c = [target.estimate]
        self.dev = [base]
        self.x = [target.x0.copy()]
        self._index = {float(target.estimate): 0}
        self.lowest = base

    def zeta(self, c, dev):
        d = dev - self.base
        if d < 0.0:
            # rounding at the optimum; a deviance well below the fit's is reported by
            # Profile.confint
            self.lowest = min(self.lowest, dev)
            d = 0.0
        if c == self.target.estimate:
            return 0.0
        return math.copysign(math.sqrt(d), c - self.target.estimate)

    def zetas(self):
        return np.array([self.zeta(c, d) for c, d in zip(self.c, self.dev)])

    def _start(self, c):
        """Warm start at c: the solutions at the two nearest evaluated points,
        interpolated or extrapolated linearly to c; the first steps cover the change."""
        cs = np.array(self.c)
        order = np.argsort(np.abs(cs - c))
        i = int(order[0])
        x = self.x[i]
        step = np.array(self.target.xscale, dtype=float)
        if len(order) > 1:
            j = int(order[1])
            if cs[j] != cs[i]:
                delta = (self.x[i] - self.x[j]) * ((c - cs[i]) / (cs[i] - cs[j]))
                x = x + delta
                step = np.maximum(step, 0.25 * np.abs(delta))
        return x, step

    def evaluate(self, c):
        """ζ at c, re-optimizing the other parameters (a point already evaluated is
        looked up: the root finder asks for its bracket's ends again)."""
        c = float(c)
        i = self._index.get(c)
        if i is not None:
            return self.zeta(c, self.dev[i])
        t = self.target
        x0, step = self._start(c)
        x, dev = _minimize_nuisance(lambda xx: t.value(c, xx), x0, t.xlower, step)
        self._index[c] = len(self.c)
        self.c.append(c)
        self.dev.append(dev)
        self.x.append(x)
        return self.zeta(c, dev)

    def walk(self, sign, zmax, step_zeta, max_points):
        """Extend the profile towards ``sign`` until |ζ| ≥ zmax or the bound.

        Each step aims at a change of ``step_zeta`` in ζ from the secant slope of the
        last two points (lme4's rule), at most ten times the previous step.
        """
        t = self.target
        if not math.isfinite(t.estimate):
            return
        bound = t.upper if sign > 0 else t.lower
        cs, zs = np.array(self.c), self.zetas()
        side = np.flatnonzero(((cs - t.estimate) * sign > 0) & np.isfinite(zs))
        side = side[np.argsort(np.abs(cs[side] - t.estimate))]
        points = [(t.estimate, 0.0)] + [(cs[i], zs[i]) for i in side]
        c_last, z_last = points[-1]
        if c_last == bound or abs(z_last) >= zmax:
            return
        if len(points) == 1:
            last_step = t.start_step
            c = t.estimate + sign * last_step
        else:
            c_prev, z_prev = points[-2]
            last_step = abs(c_last - c_prev)
            c = None
        for _ in range(max_points):
            if c is None:
                slope = (z_last - z_prev) / (c_last - c_prev)
                # flat or non-monotone (rounding near the optimum): keep moving
                step = step_zeta / slope if slope > 0 else 2.0 * last_step
                last_step = min(step, 10.0 * last_step)
                c = c_last + sign * last_step
            if (c - bound) * sign >= 0:
                c = bound
            if not math.isfinite(c):
                break
            z = self.evaluate(c)
            if not math.isfinite(z):
                warnings.warn(f"the likelihood could not be evaluated with {t.name} = {c:.6g}: "
                              "its profile stops there")
                return
            if abs(z) >= zmax or c == bound:
                return
            c_prev, z_prev, c_last, z_last, c = c_last, z_last, c, z, None
        warnings.warn(f"the profile of {t.name} did not reach |ζ| = {zmax:.3g} in "
                      f"{max_points} steps")

    def crossing(self, z_target):
        """The parameter value where ζ = z_target (signed), or the bound the profile
        reaches first (0 for a singular sd, ±1 for a correlation, ±inf when the
        profile stays below the cut-off)."""
        t = self.target
        if not math.isfinite(t.estimate):
            return math.nan
        cs, zs = np.array(self.c), self.zetas()
        keep = np.isfinite(zs)
        order = np.argsort(cs[keep])
        cs, zs = cs[keep][order], zs[keep][order]
        if z_target > 0:
            beyond = np.flatnonzero(zs >= z_target)
            if beyond.size == 0:
                return self._open_end(t.upper)
            hi = int(beyond[0])
            lo = hi - 1
        else:
            beyond = np.flatnonzero(zs <= z_target)
            if beyond.size == 0:
                return self._open_end(t.lower)
            lo = int(beyond[-1])
            hi = lo + 1
        return self._root(cs[lo], zs[lo], cs[hi], zs[hi], z_target)

    def _open_end(self, bound):
        if not math.isfinite(bound):
            warnings.warn(f"the profile of {self.target.name} stays below the cut-off on "
                          f"one side: the interval is open there ({bound})")
        return bound

    def _root(self, a, za, b, zb, z_target, ztol=1e-6, maxiter=40):
        """c in [a, b] with ζ(c) = z_target, given ζ(a) and ζ(b) on either side.

        Regula falsi with the Illinois modification: ζ is close to linear in c, so the
        first secant step usually lands within 1e-3 of the target, and the Illinois
        halving keeps a curved profile from stalling at one end of the bracket. ζ to
        1e-6 puts c within about 1e-6 standard errors of the root.
        """
        fa, fb = za - z_target, zb - z_target
        if fa == 0.0:
            return float(a)
        if fb == 0.0:
            return float(b)
        side = 0
        c = a
        for _ in range(maxiter):
            c = (a * fb - b * fa) / (fb - fa)
            if not (min(a, b) < c < max(a, b)):
                c = 0.5 * (a + b)
            fc = self.evaluate(c) - z_target
            if abs(fc) <= ztol or abs(b - a) <= 1e-12 * max(abs(a), abs(b), 1e-300):
                return float(c)
            if (fc > 0) == (fb > 0):
                b, fb = c, fc
                if side == 1:
                    fa *= 0.5
                side = 1
            else:
                a, fa = c, fc
                if side == -1:
                    fb *= 0.5
                side = -1
        return float(c)


# -- the profile ---------------------------------------------------------------------------
def _resolve_which(which, var_names, coef_names):
    names = var_names + coef_names
    if which is None:
        return names
    if isinstance(which, (str, int, np.integer)):
        which = [which]
    chosen = set()
    for w in which:
        if isinstance(w, (int, np.integer)):
            chosen.add(names[int(w)])
        elif w == "theta_":
            chosen.update(var_names)
        elif w == "beta_":
            chosen.update(coef_names)
        elif w in names:
            chosen.add(w)
        else:
            raise ValueError(f"no parameter {w!r}; the parameters are {names}")
    return [n for n in names if n in chosen]


class Profile:
    """Likelihood profiles of some or all of a fit's parameters.

    Made by :func:`profile`. Each profiled parameter has a table of the points its walk
    evaluated: ζ, and every parameter (on lme4's scale) at the optimum of the others.
    The profile keeps the fit, so :meth:`confint` at a level beyond the walk's extends
    it. It pickles with its fit.

    Attributes
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
    names : list of str
        The profiled parameters, in lme4's order.
    parameters : list of str
        Every parameter (the columns of the tables after ``zeta``).
    estimates : pandas.Series
        The parameters at the optimum the profile is centred on (for a REML fit, its ML
        refit).
    deviance : float
        The deviance there: -2 log L for an LMM; for a GLMM the value its fit minimizes
        (MixedModels.jl's deviance for Bernoulli, binomial and Poisson fits: -2 log L
        less a constant).
    ml_refit : bool
        Whether the fit was REML and was refitted by ML to be profiled.
    level : float
        The level the walk was made for: |ζ| up to Φ⁻¹((1 + level)/2) on each side.
    """

    def __init__(self, fit, walks, estimates, deviance, level, ml_refit, step, max_points):
        self.fit = fit
        self.names = list(walks)
        self.parameters = list(estimates.index)
        self.estimates = estimates
        self.deviance = deviance
        self.ml_refit = ml_refit
        self.level = level
        self._walks = walks
        self._step = step
        self._max_points = max_points
        self._crossings = {}
        self._tables = {}

    def __repr__(self):
        refit = "; profiled through the ML refit of a REML fit" if self.ml_refit else ""
        return f"Profile({len(self.names)} parameters: {', '.join(self.names)}{refit})"

    # -- the curves ------------------------------------------------------------------
    def table(self, name):
        """One parameter's profile as a DataFrame sorted by its value.

        Columns: ``zeta``, then every parameter (:attr:`parameters`) at the optimum of
        the others with ``name`` held at the row's value.
        """
        if name not in self._walks:
            raise KeyError(f"{name!r} was not profiled; profiled: {self.names}")
        walk = self._walks[name]
        cached = self._tables.get(name)
        if cached is not None and len(cached) == len(walk.c):
            return cached
        t = walk.target
        rows = [np.concatenate([[z], t.values(c, x)])
                for c, z, x in zip(walk.c, walk.zetas(), walk.x)]
        frame = pd.DataFrame(rows, columns=["zeta"] + self.parameters)
        # the held parameter as held (recomputed from θ it would carry rounding)
        frame[name] = walk.c
        frame = frame.sort_values(name, kind="stable").reset_index(drop=True)
        self._tables[name] = frame
        return frame

    @property
    def tables(self):
        """Every profiled parameter's :meth:`table`, by name."""
        return {n: self.table(n) for n in self.names}

    def to_frame(self):
        """All tables stacked, with a ``parameter`` column naming the one held (the
        layout of lme4's ``as.data.frame(profile(fit))``)."""
        return pd.concat([self.table(n).assign(parameter=n) for n in self.names],
                         ignore_index=True)

    # -- intervals -------------------------------------------------------------------
    def _crossing(self, name, z):
        key = (name, z)
        if key not in self._crossings:
            walk = self._walks[name]
            walk.walk(1.0 if z > 0 else -1.0, abs(z), self._step, self._max_points)
            self._crossings[key] = walk.crossing(z)
        return self._crossings[key]

    def confint(self, level=0.95):
        """Profile-likelihood intervals: where ζ crosses ∓Φ⁻¹((1 + level)/2).

        A variance component whose profile reaches its bound first gets the bound
        (lower = 0 for a singular sd, ±1 for a correlation); a profile that stays below
        the cut-off towards an unbounded side gives ±inf (with a warning).

        Parameters
        ----------
        level : float, default 0.95

        Returns
        -------
        pandas.DataFrame
            Indexed by parameter (:attr:`names`), columns ``lower`` and ``upper``.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be between 0 and 1, not {level}")
        z = float(norm.ppf(0.5 + level / 2.0))
        lower = [self._crossing(n, -z) for n in self.names]
        upper = [self._crossing(n, z) for n in self.names]
        lowest = min(w.lowest for w in self._walks.values())
        if lowest < self.deviance - _NEGATIVE_TOLERANCE:
            warnings.warn(f"profiling found a deviance {self.deviance - lowest:.3g} below the "
                          "fit's: the fit is not at the optimum, and these intervals are "
                          "centred on a point that is not the maximum")
        return pd.DataFrame({"lower": lower, "upper": upper},
                            index=pd.Index(self.names, name="parameter"))


def profile(fit, which=None, level=0.95, *, step=0.5, max_points=60, progress=None):
    """Profile the likelihood of a fitted model over its parameters.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
        A REML fit is profiled through its ML refit (as lme4 does). A GLMM needs a full
        fit (not ``fast``).
    which : None, str, int or list, optional
        The parameters to profile (default: all): names as in :func:`parameter_names`,
        positions in that list, ``"theta_"`` (the variance parameters, σ included) and
        ``"beta_"`` (the fixed effects), as lme4's ``which``.
    level : float, default 0.95
        How far to walk: until |ζ| ≥ Φ⁻¹((1 + level)/2) on each side. The intervals at
        this level are computed at once; :meth:`Profile.confint` extends the walk for
        a higher one.
    step : float, default 0.5
        The spacing of the evaluated points, in ζ.
    max_points : int, default 60
        The most points one side of one walk adds at a time.
    progress : bool or None, default None
        A progress bar on stderr, one step per side of each parameter's walk: True
        shows it, False never; None shows it only in an interactive session (a
        terminal or a notebook) once the profile has taken half a second.

    Returns
    -------
    Profile

    Examples
    --------
    >>> import mixedmodels as mm
    >>> fit = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
    >>> pr = profile(fit)
    >>> pr.confint(0.95).loc["sigma"].round(3).tolist()
    [22.898, 28.858]
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, not {level}")
    var_names, coef_names = parameter_names(fit)
    wanted = _resolve_which(which, var_names, coef_names)
    ntheta = fit.model.layout.ntheta
    if fit.is_glmm:
        core = _GlmmCore(fit)
        make_var, make_coef = _GlmmVariance, _GlmmCoef
        ml_refit = False
    else:
        core = _LmmCore(fit)
        make_var, make_coef = _LmmVariance, _LmmCoef
        ml_refit = core.refitted
    walks = {}
    for name in wanted:
        if name in coef_names:
            target = make_coef(core, name, coef_names.index(name))
        elif name == "sigma":
            target = make_var(core, name, "sigma")
        else:
            i = var_names.index(name)
            assert i < ntheta
            target = make_var(core, name, "sd" if name.startswith("sd_") else "cor", i)
            if not math.isfinite(target.estimate):
                warnings.warn(f"{name} is undefined at the fit (a standard deviation in it "
                              "is 0): it is not profiled and its interval is NaN")
        walks[name] = _Walk(target, core.base)
    estimates = pd.Series(core.estimates, index=var_names + coef_names)
    for name, walk in walks.items():
        # the walk starts at its target's estimate, computed through the held
        # parameter: the same number to the last bit in the tables and the estimates
        if math.isfinite(walk.target.estimate):
            estimates[name] = walk.target.estimate
    pr = Profile(fit, walks, estimates, core.base, level, ml_refit, step, max_points)
    try:
        _walk_all(pr, level, progress)
        pr.confint(level)
    finally:
        if fit.is_glmm:
            # PIRLS's warm start belongs to the specification: leave it as fit() does
            fit.model._u = None
    return pr


def _walk_all(pr, level, progress):
    """Walk every profile to the level's cut-off, lower sides first and then the upper
    ones (the order ``Profile.confint`` takes them in), one progress step per side."""
    from .._progress import progress_bar

    bar = progress_bar(progress, total=2 * len(pr.names), desc="profile", unit="side")
    if bar is None:
        return
    z = float(norm.ppf(0.5 + level / 2.0))
    try:
        for sign in (-1.0, 1.0):
            for name in pr.names:
                bar.set_postfix_str(name, refresh=False)
                pr._crossing(name, sign * z)
                bar.update(1)
    finally:
        bar.close()

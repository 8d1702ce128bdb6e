"""Satterthwaite's denominator degrees of freedom for a linear mixed model.

The method is lmerTest's (Kuznetsova, Brockhoff and Christensen 2017): the variance of a
contrast, Var(L β̂) = L V_β(φ) L', is a function of the variance parameters
φ = (θ, σ); its gradient over φ and the asymptotic covariance of φ̂ give the degrees of
freedom of a scaled chi-square matching its first two moments.

What is differenced, and why
----------------------------
Everything here is differentiated at the fitted θ̂ only over θ, by central finite
differences with Richardson extrapolation (``_derivs.finite_difference_derivatives``):

- With d = n (ML) or n - p (REML), the deviance at (θ, σ) (``deviance_at``) is

      D(θ, σ) = d log(2πσ²) + F(θ) + r²(θ) / σ² - Σ log w,
      F(θ) = 2 log det L(θ) [+ 2 log det RX(θ) for REML],

  r²(θ) the penalized residual sum of squares at β̂(θ). σ enters in closed form, so the
  σ rows of the Hessian are exact (see :func:`satterthwaite_parts`) and only the
  Hessians of F and r² over θ are differenced.
- V_β(θ, σ) = σ² C(θ), C = (RX'RX)⁻¹ (``vcov_at``): ∂V_β/∂σ = 2σC exactly, and the
  θ-derivatives of C come from the same θ points as the Hessians.

One factorization at a θ gives F, r² and C together (``profiled_parts``), so the whole
computation costs the Hessian stencil: 4 k² + 1 factorizations for k = len(θ) (37 for
three variance parameters).

The step is larger than the usual 1e-4: h_i = 5e-3 max(|θ_i|, 0.1). r² comes out of the
factorization as the square of its last diagonal element, y'Wy less what X and Z explain,
and so carries a relative error of about ε y'Wy / r² (5e-12 on ``pastes``, where the mean
is large against the residual standard deviation); a second difference divides that by
h². At 1e-4 this gave errors of 1e-3 in the degrees of freedom; at 5e-3 with Richardson
extrapolation (error O(h⁴)) the reference models agree with lmerTest (itself numDeriv's
extrapolated differences from steps of 0.1 |θ_i|) to 1e-6 when evaluated at lme4's θ, and
the result is flat in the step between 3e-3 and 1e-2. An analytic route (the
derivatives of the sparse Cholesky factor, or the dense q-by-q algebra the Kenward-Roger
module uses) would avoid the differences but needs second derivatives of log det L,
which the blocked factorization does not give; the observed Hessian lmerTest uses is
naturally a finite-difference object. No refit is ever made.

Differences cross θ = 0 freely (no bounds): the deviance is a smooth function of ΛΛ',
hence of θ, on both sides of a diagonal zero, and lmerTest differences there too.
"""
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .._derivs import finite_difference_derivatives

__all__ = [
    "SatterthwaiteParts",
    "fstat_ddf",
    "satterthwaite_f",
    "satterthwaite_parts",
    "satterthwaite_t",
]

# lmerTest's tolerance for the eigenvalues of the Hessian over (θ, σ): below it (in
# absolute value) an eigenvalue counts as zero and its direction is left out of the
# Moore-Penrose inverse (a variance parameter on its boundary, a flat direction).
EIGEN_TOL = 1e-8

# lmerTest's relative tolerance for the rank of L V_β L'
_SQRT_EPS = float(np.sqrt(np.finfo(float).eps))

# the relative finite-difference step over θ (see the module docstring)
STEP = 5e-3


@dataclass(frozen=True, eq=False)
class SatterthwaiteParts:
    """What every Satterthwaite test of one fit needs, computed once.

    Attributes
    ----------
    vcov_beta : ndarray, shape (p, p)
        σ̂² C(θ̂), the covariance of β̂.
    vcov_varpar : ndarray, shape (k + 1, k + 1)
        2 H⁺, the asymptotic covariance of φ̂ = (θ̂, σ̂), with H the Hessian of the
        deviance over φ and ⁺ the Moore-Penrose inverse over eigenvalues above 1e-8.
    jacobian : ndarray, shape (k + 1, p, p)
        ∂V_β/∂φ_i, one p-by-p matrix per variance parameter (θ first, σ last).
    hessian : ndarray, shape (k + 1, k + 1)
        H itself.
    gradient : ndarray, shape (k + 1,)
        The gradient of the deviance over φ at the fit (near zero at an interior optimum).
    nfeval : int
        Factorizations spent.
    """

    vcov_beta: np.ndarray
    vcov_varpar: np.ndarray
    jacobian: np.ndarray
    hessian: np.ndarray
    gradient: np.ndarray
    nfeval: int


def satterthwaite_parts(fit, step=None):
    """The covariance of the variance parameters and the Jacobian of V_β at a fit.

    Parameters
    ----------
    fit : LinearMixedModelFit
    step : float or array_like, optional
        Finite-difference step per θ component (default ``5e-3 * max(|θ_i|, 0.1)``; see
        the module docstring).

    Returns
    -------
    SatterthwaiteParts

    Warns
    -----
    UserWarning
        When the Hessian over (θ, σ) has negative eigenvalues (the fit is not at a
        minimum) or eigenvalues near zero (a variance parameter on its boundary), as
        lmerTest warns; the near-zero directions are left out of the inverse.

    Notes
    -----
    With F, r², C and d as in the module docstring, the Hessian of D over φ = (θ, σ) is

        H_θθ = ∇²F + ∇²r² / σ²,   H_θσ = -2 ∇r² / σ³,   H_σσ = -2d / σ² + 6 r² / σ⁴,

    (at σ̂² = r²/d the last is 4d/σ̂²), the covariance of φ̂ is A = 2 H⁺ (D is -2 log L),
    and the Jacobian of V_β = σ² C is σ² ∂C/∂θ_i and 2σC.
    """
    model = fit.model
    theta = np.array(fit.theta, dtype=float)
    sigma = float(fit.sigma)
    reml = bool(fit.REML)
    k = theta.size
    if step is None:
        step = STEP * np.maximum(np.abs(theta), 0.1)

    # one factorization per θ point serves F, r² and C: the two Hessian passes and the
    # Jacobian below revisit the same points, which come out of this cache
    cache = {}

    def parts(th):
        key = th.tobytes()
        hit = cache.get(key)
        if hit is None:
            pp = model.profiled_parts(th)
            logdets = 2.0 * pp["logdet_l"] + (2.0 * pp["logdet_rx"] if reml else 0.0)
            hit = (logdets, pp["pwrss"], pp["rx_inverse_crossprod"], pp["dfr"])
            cache[key] = hit
        return hit

    gF, HF, info = finite_difference_derivatives(lambda th: parts(th)[0], theta, step=step,
                                                 richardson=True, full_output=True)
    gR, HR = finite_difference_derivatives(lambda th: parts(th)[1], theta, step=step,
                                           richardson=True)
    _, r2, C, dfr = parts(theta)

    H = np.empty((k + 1, k + 1))
    H[:k, :k] = HF + HR / sigma ** 2
    H[:k, k] = H[k, :k] = -2.0 * gR / sigma ** 3
    H[k, k] = -2.0 * dfr / sigma ** 2 + 6.0 * r2 / sigma ** 4
    gradient = np.append(gF + gR / sigma ** 2, 2.0 * dfr / sigma - 2.0 * r2 / sigma ** 3)

    jac = np.empty((k + 1, C.shape[0], C.shape[0]))
    for i in range(k):
        jac[i] = sigma ** 2 * _derivative(lambda th: parts(th)[2], theta, i, info.step[i],
                                          info.scheme[i])
    jac[k] = 2.0 * sigma * C

    return SatterthwaiteParts(vcov_beta=sigma ** 2 * C, vcov_varpar=_covariance(H),
                              jacobian=jac, hessian=H, gradient=gradient,
                              nfeval=len(cache))


def _derivative(f, x, i, h, scheme):
    """∂f/∂x_i of an array-valued f on the stencil ``finite_difference_derivatives`` used
    for parameter i, Richardson-extrapolated, so that every point is already cached."""

    def at(m):
        point = x.copy()
        point[i] = x[i] + m * h      # the same arithmetic as _derivs, hence the same floats
        return f(point)

    if scheme == "central":
        def diff(m):
            return (at(m) - at(-m)) / (2.0 * m * h)
    else:
        s = 1 if scheme == "forward" else -1

        def diff(m):
            return (-3.0 * f(x) + 4.0 * at(s * m) - at(2 * s * m)) / (2.0 * s * m * h)
    return (4.0 * diff(1) - diff(2)) / 3.0


def _covariance(H):
    """2 H⁺ over the eigenvalues above EIGEN_TOL, warning as lmerTest does."""
    H = 0.5 * (H + H.T)
    values, vectors = np.linalg.eigh(H)
    neg = values < -EIGEN_TOL
    pos = values > EIGEN_TOL
    zero = ~neg & ~pos
    if neg.any():
        warnings.warn(
            f"the Hessian of the deviance over (theta, sigma) has {int(neg.sum())} negative "
            f"eigenvalue(s) ({', '.join(f'{v:.1e}' for v in values[neg])}): the fit is not at "
            "a minimum and the Satterthwaite degrees of freedom are unreliable", stacklevel=4)
    if zero.any():
        warnings.warn(
            f"the Hessian of the deviance over (theta, sigma) has {int(zero.sum())} "
            f"eigenvalue(s) near zero ({', '.join(f'{v:.1e}' for v in values[zero])}), as for a "
            "variance parameter on its boundary; those directions are left out", stacklevel=4)
    v = vectors[:, pos]
    return 2.0 * (v / values[pos]) @ v.T


def _grad_var(parts, l):
    """(l' ∂V_β/∂φ_i l)_i for a contrast vector l."""
    return np.einsum("j,ijk,k->i", l, parts.jacobian, l)


def satterthwaite_t(parts, l):
    """Variance and Satterthwaite degrees of freedom of l'β̂.

    Parameters
    ----------
    parts : SatterthwaiteParts
    l : array_like, shape (p,)

    Returns
    -------
    var : float
        l' V_β l.
    df : float
        2 var² / (g' A g), g_i = l' (∂V_β/∂φ_i) l and A = ``parts.vcov_varpar``
        (inf when g'Ag is zero).
    """
    l = np.asarray(l, dtype=float)
    var = float(l @ parts.vcov_beta @ l)
    g = _grad_var(parts, l)
    denom = float(g @ parts.vcov_varpar @ g)
    with np.errstate(divide="ignore"):
        df = 2.0 * var ** 2 / denom if denom != 0 else np.inf
    return var, df


def satterthwaite_f(parts, beta, L, eps=_SQRT_EPS):
    """The F test of L β = 0 with Satterthwaite's denominator degrees of freedom.

    Parameters
    ----------
    parts : SatterthwaiteParts
    beta : ndarray, shape (p,)
    L : array_like, shape (m, p)
    eps : float
        Relative tolerance for the rank of L V_β L'.

    Returns
    -------
    dict
        ``F``, ``numdf`` (the rank q of L V_β L'), ``dendf``, ``p``.

    Notes
    -----
    As lmerTest's ``contestMD``: with L V_β L' = P diag(d) P' (eigenvalues in decreasing
    order, those above ``eps * d_1`` kept), the q rows of P'L are independent contrasts
    with t² statistics (P'Lβ)²_m / d_m, F is their mean, and each has
    ν_m = 2 d_m² / (g_m' A g_m) degrees of freedom. The F statistic's denominator degrees
    of freedom match the mean of a sum of q F(1, ν_m) variables:

        E = Σ ν_m / (ν_m - 2),   dendf = 2E / (E - q),

    or the common ν when all ν_m agree (within 1e-8), or 2 when some ν_m ≤ 2. A single
    row (or q = 1) is the t test squared. The numbers depend on L only through its row
    space up to an orthogonal transformation, so the hypothesis matrices must be built as
    lmerTest builds them for the degrees of freedom to agree.
    """
    L = np.atleast_2d(np.asarray(L, dtype=float))
    beta = np.asarray(beta, dtype=float)
    if L.shape[0] == 1:
        var, df = satterthwaite_t(parts, L[0])
        F = float(L[0] @ beta) ** 2 / var
        return {"F": F, "numdf": 1, "dendf": df, "p": float(stats.f.sf(F, 1, df))}
    VL = L @ parts.vcov_beta @ L.T
    d, P = np.linalg.eigh(0.5 * (VL + VL.T))
    d, P = d[::-1], P[:, ::-1]
    keep = d > max(eps * d[0], 0.0)
    q = int(keep.sum())
    if q == 0:
        return {"F": np.nan, "numdf": 0, "dendf": np.nan, "p": np.nan}
    PtL = P[:, keep].T @ L
    if q == 1:
        var, df = satterthwaite_t(parts, PtL[0])
        F = float(PtL[0] @ beta) ** 2 / var
        return {"F": F, "numdf": 1, "dendf": df, "p": float(stats.f.sf(F, 1, df))}
    d = d[keep]
    F = float(np.sum((PtL @ beta) ** 2 / d)) / q
    nu = np.empty(q)
    for m in range(q):
        g = _grad_var(parts, PtL[m])
        nu[m] = 2.0 * d[m] ** 2 / float(g @ parts.vcov_varpar @ g)
    dendf = fstat_ddf(nu)
    return {"F": F, "numdf": q, "dendf": dendf, "p": float(stats.f.sf(F, q, dendf))}


def fstat_ddf(nu, tol=1e-8):
    """Denominator degrees of freedom of the mean of q squared t statistics (lmerTest's
    ``get_Fstat_ddf``): ν itself for one, the common value when all agree within
    ``tol``, 2 when some ν_m ≤ 2, else 2E / (E - q) with E = Σ ν_m / (ν_m - 2)."""
    nu = np.atleast_1d(np.asarray(nu, dtype=float))
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(nu.mean())
    if np.any(nu <= 2):
        return 2.0
    E = float(np.sum(nu / (nu - 2.0)))
    return 2.0 * E / (E - nu.size)

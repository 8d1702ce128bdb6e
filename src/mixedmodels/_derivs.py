"""Finite-difference derivatives of the objective at the optimum, and the checks built on them.

BOBYQA never sees a derivative, so it cannot tell us whether it stopped at a minimum.
After the fit, lme4 differentiates the deviance numerically (``deriv12``) and looks at
two things (``checkConv``): whether the gradient, scaled by the curvature, is small, and
whether the Hessian is positive definite and reasonably conditioned. This module does
the same in our own terms:

- :func:`finite_difference_derivatives` -- gradient and Hessian by central differences on
  the same stencil as ``deriv12`` (2 points per parameter, 4 per pair), switching to
  second-order one-sided differences next to a bound so that the objective is never
  evaluated outside the feasible region;
- :func:`check_convergence` -- the gradient and Hessian tests, returning messages;
- :class:`ConvergenceCheck` -- a picklable record of both, for the optimization summary;
- :func:`assess_convergence` -- the two steps together.

Parameters on their bound (a variance parameter at exactly zero in a singular fit) are
left out of the checks: at a constrained minimum the gradient does not vanish, it points
into the bound, and the curvature there is only seen from one side.
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

try:
    from ._kernels import _dense
except ImportError:  # pragma: no cover - not built: the LAPACK twins
    _dense = None

__all__ = ["finite_difference_derivatives", "check_convergence", "assess_convergence",
           "ConvergenceCheck", "DerivativeInfo", "NonFiniteObjectiveError",
           "DEFAULT_STEP", "GRAD_TOL", "HESS_TOL"]

# lme4's deriv12 step. With |f| ~ 1e3 and f accurate to machine precision the rounding in
# a second difference is ~ 4 eps |f| / h^2 ~ 1e-5, while the truncation error h^2 f''''/12
# is ~ 1e-9 for a function varying on a unit scale: 1e-4 sits near the best trade-off
# for the Hessian (h ~ eps^(1/4)) and is well inside it for the gradient.
DEFAULT_STEP = 1e-4

# lme4's defaults for check.conv.grad and check.conv.hess.
GRAD_TOL = 2e-3
HESS_TOL = 1e-6


class NonFiniteObjectiveError(FloatingPointError):
    """The objective was inf or nan at a point the finite differences cannot do without.

    Attributes
    ----------
    point : ndarray
        Where the objective was evaluated.
    value : float
        What it returned.
    """

    def __init__(self, message, point, value):
        super().__init__(message)
        self.point = point
        self.value = value


@dataclass(frozen=True, eq=False)
class DerivativeInfo:
    """How :func:`finite_difference_derivatives` differentiated.

    Attributes
    ----------
    nfeval : int
        Calls of ``f`` made (``fx``, if given, is not counted; failed trial points are).
    step : ndarray
        The step actually used for each parameter (after shrinking to fit the bounds).
    scheme : tuple of str
        Per parameter: ``"central"``, ``"forward"`` or ``"backward"``.
    """

    nfeval: int
    step: np.ndarray
    scheme: tuple


def _as_bounds(bound, n, fill, name):
    if bound is None:
        return np.full(n, fill)
    b = np.array(bound, dtype=float).reshape(-1) if np.ndim(bound) else np.full(n, float(bound))
    if b.shape != (n,):
        raise ValueError(f"{name} has {b.size} entries; x has {n}")
    if np.isnan(b).any():
        raise ValueError(f"{name} contains nan; use -inf/inf for an absent bound")
    return b


def _plan(x, lower, upper, step, reach):
    """Scheme and step per parameter so that every trial point stays in [lower, upper].

    Central differences need ``reach * h`` on both sides; one-sided ones ``3 * reach * h``
    on one side (the second-order second-derivative formula goes out to three steps).
    ``reach`` is 2 with Richardson extrapolation, which also uses the doubled step. When
    neither scheme fits, the step shrinks to what the interval allows rather than
    leaving the box.
    """
    n = x.size
    schemes, steps = [], np.empty(n)
    for i in range(n):
        h = step[i]
        down, up = x[i] - lower[i], upper[i] - x[i]
        # compare the trial coordinates as they will be computed, so rounding cannot
        # put a point a hair outside the box
        if x[i] - reach * h >= lower[i] and x[i] + reach * h <= upper[i]:
            schemes.append("central")
        elif x[i] + 3 * reach * h <= upper[i]:
            schemes.append("forward")
        elif x[i] - 3 * reach * h >= lower[i]:
            schemes.append("backward")
        elif up <= 0.0 and down <= 0.0:
            raise ValueError(f"parameter {i} cannot move: its lower and upper bounds "
                             f"are both {x[i]}")
        elif min(down, up) >= max(down, up) / 3.0:
            h = min(down, up) / reach
            schemes.append("central")
        else:
            h = max(down, up) / (3 * reach)
            schemes.append("forward" if up >= down else "backward")
        steps[i] = h
    return schemes, steps


# Stencils as (multiple of the signed step s, weight times s or s^2); s = +h for central
# and forward, -h for backward differences, and f_k = f(x + k s e_i).
# First derivative, central: (f_1 - f_-1) / 2s; one-sided: (-3 f_0 + 4 f_1 - f_2) / 2s.
# Second derivative, central: (f_1 - 2 f_0 + f_-1) / s^2;
# one-sided: (2 f_0 - 5 f_1 + 4 f_2 - f_3) / s^2. Each is exact for polynomials of one
# degree more than the derivative it takes, hence the O(h^2) error.
_FIRST = {"central": ((-1, -0.5), (1, 0.5)),
          "one-sided": ((0, -1.5), (1, 2.0), (2, -0.5))}
_SECOND = {"central": ((-1, 1.0), (0, -2.0), (1, 1.0)),
           "one-sided": ((0, 2.0), (1, -5.0), (2, 4.0), (3, -1.0))}


def finite_difference_derivatives(f, x, lower=None, upper=None, step=None, *, fx=None,
                                  richardson=False, full_output=False):
    """Gradient and Hessian of a scalar function by finite differences.

    For each parameter, ``f(x ± h_i e_i)`` give the gradient component and the Hessian
    diagonal (lme4's ``deriv12``); for each pair, the two points
    ``f(x ± (h_i e_i + h_j e_j))`` with the axis points give the off-diagonal entry,
    ``(f₊₊ + f₋₋ - f₊ᵢ - f₋ᵢ - f₊ⱼ - f₋ⱼ + 2f₀) / 2h_ih_j`` (where lme4 takes the four
    points ``f(x ± h_i e_i ± h_j e_j)``: the same order for half the evaluations). All
    formulas are second order (error O(h^2)).

    Parameters
    ----------
    f : callable
        ``f(x) -> float`` for a 1-d float array ``x`` (a fresh copy each call, so ``f``
        may keep or modify it).
    x : array_like, shape (n,)
        Where to differentiate; must lie within ``[lower, upper]``.
    lower, upper : array_like or float, optional
        Bounds on ``x``; ``-inf``/``inf`` (the default) for none. ``f`` is never called
        outside them.
    step : array_like or float, optional
        Absolute step per parameter. Default ``1e-4 * max(1, |x_i|)``: lme4's absolute
        ``1e-4`` for parameters of order one or less (so that a parameter at or near
        zero is not differenced on the scale of roundoff), relative for large
        parameters, whose function scale usually grows with them.
    fx : float, optional
        ``f(x)`` if already known (the optimizer's minimum); saves one evaluation.
    richardson : bool, default False
        Also difference with the doubled step and extrapolate, ``(4 D(h) - D(2h)) / 3``,
        which cancels the ``h^2`` error term: O(h^4) for central, O(h^3) for one-sided
        differences, for about twice the evaluations. Use it when a parameter's function
        scale is much smaller than its step (see Notes).
    full_output : bool, default False
        Also return a :class:`DerivativeInfo` (evaluation count, steps, schemes).

    Returns
    -------
    gradient : ndarray, shape (n,)
    hessian : ndarray, shape (n, n)
        Exactly symmetric: each off-diagonal entry is computed once.
    info : DerivativeInfo
        Only with ``full_output=True``.

    Raises
    ------
    ValueError
        If ``x`` is outside the bounds, a parameter's bounds coincide, or a step is not
        positive and finite.
    NonFiniteObjectiveError
        If ``f(x)`` is not finite, or a trial point gives inf/nan and cannot be avoided.

    Notes
    -----
    **Bounds.** A parameter with less than ``h_i`` room below (on or within one step
    of a finite lower bound) uses forward differences, with ``f`` at ``x + k h_i e_i``,
    ``k = 1, 2, 3``: gradient ``(-3 f0 + 4 f1 - f2) / 2h`` and second derivative
    ``(2 f0 - 5 f1 + 4 f2 - f3) / h^2``, both second order. Symmetrically, a parameter
    near its upper bound uses backward differences. Off-diagonal entries combine the two
    parameters' first-derivative stencils (central or one-sided), which always takes
    four new points. If the interval is too narrow for either scheme at step ``h_i``,
    the step shrinks to fit (see ``info.step``). With ``richardson=True`` the room
    needed doubles (``2h`` for central, ``6h`` for one-sided differences).

    **Non-finite values.** If ``f`` is inf or nan at a central point below ``x_i``,
    parameter ``i`` falls back to forward differences (reusing the points above), and
    likewise to backward differences if a point above is bad; this is what happens when
    ``f`` has an implicit bound the caller did not declare. When no scheme avoids the
    bad point, or an off-diagonal point is bad, :class:`NonFiniteObjectiveError` is
    raised.

    **Cost.** ``1 + 2n + n(n-1)`` evaluations when all parameters are central (``n^2 + n
    + 1``); a pair with a one-sided parameter takes four points instead of two, and a
    one-sided parameter one more on its axis; ``richardson=True`` about doubles it.
    Passing ``fx`` saves one; a fallback after a non-finite value costs the failed calls
    plus the extra one-sided points.

    **Accuracy.** The truncation error is about ``h^2 f'''/6`` for the gradient and
    ``h^2 f''''/12`` for the Hessian, the rounding error about ``eps |f| / h`` and
    ``eps |f| / h^2``. For a deviance of order 1e3 whose parameters vary on a scale of
    order one (whatever their values, 1 or 0.01) the default step gives about eight
    significant digits of the gradient and seven of the Hessian. A parameter whose
    scale is far smaller -- the coefficient of a squared or large-unit predictor, over
    which the deviance bends within 1e-3 -- gets a relative error of order
    ``(h / scale)^2``, 1e-4 and worse, and its gradient component, near zero at an
    optimum, may be wrong in every digit. ``richardson=True`` recovers most of those
    digits; differentiating in well-scaled coordinates recovers all of them. An
    objective computed to less than full precision (an inner iteration stopped at a
    tolerance) loses correspondingly more in the Hessian.
    """
    x = np.array(x, dtype=float).reshape(-1)
    n = x.size
    if not np.isfinite(x).all():
        raise ValueError("x must be finite")
    lower = _as_bounds(lower, n, -np.inf, "lower")
    upper = _as_bounds(upper, n, np.inf, "upper")
    if (x < lower).any() or (x > upper).any():
        bad = np.flatnonzero((x < lower) | (x > upper))
        raise ValueError(f"x is outside its bounds at parameter(s) {bad.tolist()}")
    if step is None:
        step = DEFAULT_STEP * np.maximum(1.0, np.abs(x))
    else:
        step = np.array(step, dtype=float).reshape(-1) if np.ndim(step) else np.full(n, float(step))
        if step.shape != (n,):
            raise ValueError(f"step has {step.size} entries; x has {n}")
        if not (np.isfinite(step).all() and (step > 0).all()):
            raise ValueError("step must be positive and finite")

    levels = (1, 2) if richardson else (1,)
    reach = levels[-1]
    schemes, steps = _plan(x, lower, upper, step, reach)
    direction = [-1 if s == "backward" else 1 for s in schemes]

    # Values by point, a point being a tuple of (parameter, signed multiple of h_i)
    # with zero multiples left out: the stencils of different entries and of the two
    # Richardson levels share points, and each is evaluated once.
    cache = {}
    nfeval = 0

    def point_of(key):
        point = x.copy()
        for i, k in key:
            point[i] = x[i] + k * steps[i]
        # a shrunken step can overshoot a bound by an ulp; the clip moves it by no more
        return np.clip(point, lower, upper, out=point)

    def value(key, strict=True):
        nonlocal nfeval
        if key not in cache:
            nfeval += 1
            cache[key] = float(np.asarray(f(point_of(key)), dtype=float).item())
        v = cache[key]
        if strict and not math.isfinite(v):
            point = point_of(key)
            moves = ", ".join(f"parameter {i} {'+' if k > 0 else '-'} {abs(k)}h" for i, k in key)
            raise NonFiniteObjectiveError(
                f"the objective is {v} at {point.tolist()} ({moves}), a point the finite "
                "differences cannot do without", point, v)
        return v

    if fx is None:
        f0 = value((), strict=False)
    else:
        f0 = float(fx)
    if not math.isfinite(f0):
        raise NonFiniteObjectiveError(f"the objective is {f0} at x = {x.tolist()}", x.copy(), f0)
    cache[()] = f0

    for i in range(n):
        if schemes[i] == "central":
            above = [value(((i, m),), strict=False) for m in levels]
            below = [value(((i, -m),), strict=False) for m in levels]
            if all(map(math.isfinite, above + below)):
                continue
            # an implicit bound: go one-sided towards the side that worked, if there is room
            h = steps[i]
            if all(map(math.isfinite, above)) and x[i] + 3 * reach * h <= upper[i]:
                schemes[i], direction[i] = "forward", 1
            elif all(map(math.isfinite, below)) and x[i] - 3 * reach * h >= lower[i]:
                schemes[i], direction[i] = "backward", -1
            else:
                for k in sorted({k for m in levels for k in (m, -m)}, key=abs):
                    value(((i, k),))      # raises at the first bad point
        for m in levels:
            for k in (1, 2, 3):
                value(((i, direction[i] * k * m),))

    def key_of(*moves):
        return tuple(sorted((i, k) for i, k in moves if k != 0))

    kind = ["central" if sc == "central" else "one-sided" for sc in schemes]

    def estimate(m):
        """Gradient and Hessian from the stencils at step m * h."""
        d = [direction[i] * m for i in range(n)]
        s = [d[i] * steps[i] for i in range(n)]
        g = np.empty(n)
        H = np.empty((n, n))
        for i in range(n):
            g[i] = sum(w * value(key_of((i, k * d[i]))) for k, w in _FIRST[kind[i]]) / s[i]
            H[i, i] = sum(w * value(key_of((i, k * d[i]))) for k, w in _SECOND[kind[i]]) / s[i] ** 2
        for i in range(n):
            for j in range(i):
                if kind[i] == kind[j] == "central":
                    # f(x ± (h_i e_i + h_j e_j)) with the axis points already at hand:
                    # second order, and two new points where the product stencil takes four
                    total = (value(key_of((i, d[i]), (j, d[j])))
                             + value(key_of((i, -d[i]), (j, -d[j])))
                             - value(key_of((i, d[i]))) - value(key_of((i, -d[i])))
                             - value(key_of((j, d[j]))) - value(key_of((j, -d[j]))) + 2.0 * f0)
                    H[i, j] = H[j, i] = total / (2.0 * s[i] * s[j])
                    continue
                # mixed partial: one parameter's first-derivative stencil applied to the
                # other's (one-sided schemes)
                total = 0.0
                for ki, wi in _FIRST[kind[i]]:
                    for kj, wj in _FIRST[kind[j]]:
                        total += wi * wj * value(key_of((i, ki * d[i]), (j, kj * d[j])))
                H[i, j] = H[j, i] = total / (s[i] * s[j])
        return g, H

    gradient, hessian = estimate(1)
    if richardson:
        g2, H2 = estimate(2)
        gradient = (4.0 * gradient - g2) / 3.0
        hessian = (4.0 * hessian - H2) / 3.0

    if full_output:
        return gradient, hessian, DerivativeInfo(nfeval=nfeval, step=steps.copy(),
                                                 scheme=tuple(schemes))
    return gradient, hessian


def _free_mask(boundary, n):
    if boundary is None:
        return np.ones(n, dtype=bool)
    b = np.asarray(boundary, dtype=bool).reshape(-1)
    if b.shape != (n,):
        raise ValueError(f"boundary has {b.size} entries; the gradient has {n}")
    return ~b


# Up to this many parameters the checks' linear algebra is compiled (``_kernels._dense``):
# a fit runs cold, and each SciPy LAPACK wrapper it touched cost ~50 µs there against a
# microsecond of arithmetic on a 3 by 3 Hessian. Jacobi's O(n³) sweeps stay below
# LAPACK's cost well past the 2-20 parameters of the usual model; above this, LAPACK.
_COMPILED_MAX_N = 40

# False: the LAPACK twins throughout (for timing and tests)
COMPILED = True


def cholesky_lower(a):
    """The lower Cholesky factor of a small symmetric matrix (its lower triangle read),
    zeros above the diagonal, or None where it is not positive definite.

    Compiled up to 40 by 40 (a nan pivot gives None there; LAPACK's OpenBLAS dpotrf
    lets it through); above, or for another dtype, :func:`cholesky_lower_lapack`."""
    if (COMPILED and _dense is not None and type(a) is np.ndarray and a.ndim == 2
            and a.dtype == np.float64 and a.dtype.isnative
            and a.shape[0] <= _COMPILED_MAX_N):
        return _dense.cholesky_lower(a)
    return cholesky_lower_lapack(a)


def cholesky_lower_lapack(a):
    """:func:`cholesky_lower` by LAPACK's dpotrf directly (its twin): NumPy's wrapper costs
    2.6 µs on a 3 by 3 matrix, five times the factorization."""
    c, info = lapack.dpotrf(a, lower=1, clean=1)
    return c if info == 0 else None


def _check(gradient, hessian, boundary, grad_tol, hess_tol):
    """Scaled gradient (full length, nan where not computed) and the messages.

    The numbers come from one compiled call (``_dense.convergence_numbers``) up to 40
    parameters; the messages are built here, only for a failed test. Its twin, and the
    path above 40 parameters: :func:`_check_python`.
    """
    g = np.asarray(gradient, dtype=float).reshape(-1)
    n = g.size
    if not COMPILED or _dense is None or n > _COMPILED_MAX_N:
        return _check_python(gradient, hessian, boundary, grad_tol, hess_tol)
    H = np.asarray(hessian, dtype=float)
    if H.shape != (n, n):
        raise ValueError(f"hessian has shape {H.shape}; the gradient has {n} entries")
    if not (grad_tol >= 0 and hess_tol >= 0):
        raise ValueError("grad_tol and hess_tol must be non-negative")
    if boundary is not None:
        boundary = np.asarray(boundary, dtype=bool).reshape(-1)
        if boundary.shape != (n,):
            raise ValueError(f"boundary has {boundary.size} entries; the gradient has {n}")
    scaled, status, k, value, lo, hi, neg = _dense.convergence_numbers(g, H, boundary,
                                                                       hess_tol)
    if status == _dense.NO_FREE:
        return scaled, []
    if status == _dense.NOT_FINITE:
        return scaled, [f"convergence not checked: the derivatives are inf or nan for "
                        f"parameter(s) {k}"]
    if status == _dense.NO_EIGENVALUES:
        raise np.linalg.LinAlgError("the Hessian's eigenvalues did not converge")
    messages = []
    if status == _dense.NOT_DEFINITE:
        messages.append(f"gradient not scaled: the Hessian is not positive definite "
                        f"(max |gradient| = {value:.4g} at parameter {k})")
    elif value > grad_tol:
        messages.append(f"failed to converge: max |scaled gradient| = {value:.4g} at "
                        f"parameter {k} (tolerance {grad_tol:g})")
    return scaled, messages + _hessian_messages(lo, hi, neg, hess_tol)


def _hessian_messages(lo, hi, neg, hess_tol):
    """The Hessian's messages from its smallest and largest eigenvalues and the number
    of them below -hess_tol."""
    if lo < hess_tol:
        return [f"failed to converge: degenerate Hessian with {neg} negative "
                f"eigenvalue{'' if neg == 1 else 's'} (smallest eigenvalue "
                f"{lo:.4g}, tolerance {hess_tol:g})"]
    if lo > 0 and hess_tol > 0 and hi / lo > 1.0 / hess_tol:
        return [f"nearly unidentifiable: very large eigenvalue ratio {hi / lo:.4g} "
                f"(limit {1.0 / hess_tol:g}); consider rescaling the predictors"]
    return []


def _check_python(gradient, hessian, boundary, grad_tol, hess_tol):
    """:func:`_check` with NumPy and LAPACK (its twin, and its path above 40 parameters)."""
    g = np.asarray(gradient, dtype=float).reshape(-1)
    n = g.size
    H = np.asarray(hessian, dtype=float)
    if H.shape != (n, n):
        raise ValueError(f"hessian has shape {H.shape}; the gradient has {n} entries")
    if not (grad_tol >= 0 and hess_tol >= 0):
        raise ValueError("grad_tol and hess_tol must be non-negative")
    free = _free_mask(boundary, n)
    everything = bool(free.all())
    if everything:
        index, gf, Hf = None, g, H
    else:
        index = np.flatnonzero(free)
        if index.size == 0:
            return np.full(n, np.nan), []
        gf, Hf = g[index], H[np.ix_(index, index)]
    Hf = 0.5 * (Hf + Hf.T)

    # one sum is finite when every entry is (or they overflow: then the full test)
    if not np.isfinite(gf.sum() + Hf.sum()):
        finite = np.isfinite(gf) & np.isfinite(Hf).all(axis=0)
        if not finite.all():
            bad = np.flatnonzero(~finite) if everything else index[~finite]
            return np.full(n, np.nan), [f"convergence not checked: the derivatives are inf "
                                        f"or nan for parameter(s) {bad.tolist()}"]
    scaled = np.full(n, np.nan)

    messages = []
    # Gradient. A raw gradient of 0.01 is large or negligible depending on the curvature,
    # so it is divided by the Cholesky factor first. lme4 solves with the upper factor
    # R (H = R'R) rather than R', which is not invariant to rescaling the parameters;
    # we keep its choice so that the numbers compare with lme4's. The smaller of the
    # scaled and raw values is used per component, so a very flat direction cannot
    # inflate a tiny raw gradient into a failure.
    L = cholesky_lower_lapack(Hf)
    if L is None:
        k = int(np.argmax(np.abs(gf)))
        messages.append(f"gradient not scaled: the Hessian is not positive definite "
                        f"(max |gradient| = {abs(gf[k]):.4g} at parameter "
                        f"{k if everything else index[k]})")
    else:
        sf = lapack.dtrtrs(L, gf, lower=1, trans=1)[0]      # R = L', solve R s = g
        if everything:
            scaled = sf
        else:
            scaled[index] = sf
        crit = np.minimum(np.abs(sf), np.abs(gf))
        k = int(np.argmax(crit))
        if crit[k] > grad_tol:
            messages.append(f"failed to converge: max |scaled gradient| = {crit[k]:.4g} at "
                            f"parameter {k if everything else index[k]} (tolerance {grad_tol:g})")

    # Hessian. An eigenvalue below hess_tol means the minimum is not (numerically)
    # strict; otherwise a ratio beyond 1/hess_tol means some direction is barely
    # determined by the data.
    eig, info = lapack.dsyev(Hf, compute_v=0)[::2]
    if info != 0:
        raise np.linalg.LinAlgError("the Hessian's eigenvalues did not converge")
    lo, hi = eig[0], eig[-1]
    neg = int(np.sum(eig < -hess_tol))
    return scaled, messages + _hessian_messages(lo, hi, neg, hess_tol)


def check_convergence(gradient, hessian, *, boundary=None, grad_tol=GRAD_TOL, hess_tol=HESS_TOL):
    """Convergence messages from the gradient and Hessian at the optimum (lme4's checks).

    Parameters
    ----------
    gradient : array_like, shape (n,)
    hessian : array_like, shape (n, n)
        Symmetrized before use.
    boundary : array_like of bool, shape (n,), optional
        Parameters on a bound (e.g. a relative standard deviation at exactly 0 in a
        singular fit). They are dropped from both checks: at a minimum on the bound the
        gradient points into the bound instead of vanishing, and the Hessian there was
        differenced from one side only, so neither says anything about convergence.
        Singularity is a separate diagnosis, as in lme4.
    grad_tol : float, default 2e-3
        Tolerance for ``max_i min(|s_i|, |g_i|)``, where ``s`` solves ``R s = g`` for the
        upper Cholesky factor ``R`` of ``H = R'R`` (lme4's ``solve(chol(H), g)``).
    hess_tol : float, default 1e-6
        The Hessian must have every eigenvalue at least ``hess_tol`` and a largest to
        smallest eigenvalue ratio of at most ``1 / hess_tol``.

    Returns
    -------
    list of str
        Empty when both checks pass. Otherwise, in this order:

        - ``"failed to converge: max |scaled gradient| = {v} at parameter {k}
          (tolerance {grad_tol})"``, ``k`` the 0-based index into ``gradient``;
        - or, when the Cholesky factorization fails, ``"gradient not scaled: the Hessian
          is not positive definite (max |gradient| = {v} at parameter {k})"``;
        - ``"failed to converge: degenerate Hessian with {m} negative eigenvalue(s)
          (smallest eigenvalue {lo}, tolerance {hess_tol})"`` (``m`` counts eigenvalues
          below ``-hess_tol``, so it may be 0 for a singular Hessian);
        - or ``"nearly unidentifiable: very large eigenvalue ratio {r} (limit
          {1/hess_tol}); consider rescaling the predictors"``.

        If a non-excluded derivative is inf or nan, the only message is
        ``"convergence not checked: the derivatives are inf or nan for parameter(s)
        [...]"``.

    Notes
    -----
    lme4 also warns about a very large eigenvalue in absolute terms; that depends on the
    units of the parameters and is not repeated here.
    """
    return _check(gradient, hessian, boundary, grad_tol, hess_tol)[1]


@dataclass(frozen=True, eq=False)
class ConvergenceCheck:
    """The derivative-based convergence diagnosis of a fit.

    Plain NumPy arrays and a tuple of strings, so it pickles with the fitted model.

    Attributes
    ----------
    gradient : ndarray, shape (n,)
    hessian : ndarray, shape (n, n)
    scaled_gradient : ndarray, shape (n,)
        ``solve(R, gradient)`` over the parameters not on a bound (see
        :func:`check_convergence`); nan for parameters on a bound, and everywhere if the
        Hessian is not positive definite.
    messages : tuple of str
        The messages of :func:`check_convergence`; empty when converged.
    nfeval : int
        Objective evaluations spent on the derivatives.
    stencil : {"central", "forward", "forward+known", "central+known"}
        How the Hessian was differenced: "central" (second order; one-sided at a bound),
        or "forward" from an exact gradient (n + 1 gradients, first order: ~1e-3
        relative, enough for these checks and a Newton step, not for standard errors);
        "+known" where a leading block came from elsewhere (a GLMM's β block from its
        PIRLS factor, within a few per cent).
    point, step : ndarray or None
        Where the Hessian was taken and its steps, when it came from an exact gradient
        (so the central one can be taken again at the same point).
    """

    gradient: np.ndarray
    hessian: np.ndarray
    scaled_gradient: np.ndarray
    messages: tuple
    nfeval: int
    # defaults, so records pickled before these fields existed still load
    stencil: str = "central"
    point: np.ndarray | None = None
    step: np.ndarray | None = None

    @property
    def converged(self):
        """True when no check raised a message."""
        return not self.messages

    @classmethod
    def from_derivatives(cls, gradient, hessian, *, nfeval=0, boundary=None,
                         grad_tol=GRAD_TOL, hess_tol=HESS_TOL, stencil="central",
                         point=None, step=None):
        """Run :func:`check_convergence` and keep the derivatives with its result."""
        g = np.array(gradient, dtype=float).reshape(-1)
        H = np.array(hessian, dtype=float)
        scaled, messages = _check(g, H, boundary, grad_tol, hess_tol)
        # every field given: set at once, without the frozen __init__'s setattr per field
        record = object.__new__(cls)
        record.__dict__.update(
            gradient=g, hessian=H, scaled_gradient=scaled, messages=tuple(messages),
            nfeval=int(nfeval), stencil=stencil,
            point=None if point is None else np.array(point, dtype=float),
            step=None if step is None else np.array(step, dtype=float))
        return record

    def __repr__(self):
        status = "converged" if self.converged else "; ".join(self.messages)
        return (f"ConvergenceCheck(n={self.gradient.size}, nfeval={self.nfeval}, "
                f"max|grad|={np.max(np.abs(self.gradient), initial=0.0):.3g}, {status})")


def assess_convergence(f, x, lower=None, upper=None, *, fx=None, boundary=None, step=None,
                       richardson=False, grad_tol=GRAD_TOL, hess_tol=HESS_TOL):
    """Differentiate ``f`` at ``x`` and check convergence, in one call.

    Parameters
    ----------
    f, x, lower, upper, step, fx, richardson
        As for :func:`finite_difference_derivatives`.
    boundary : array_like of bool, optional
        As for :func:`check_convergence`. Default: parameters exactly on a finite lower
        or upper bound.
    grad_tol, hess_tol : float
        As for :func:`check_convergence`.

    Returns
    -------
    ConvergenceCheck
    """
    x = np.array(x, dtype=float).reshape(-1)
    g, H, info = finite_difference_derivatives(f, x, lower, upper, step, fx=fx,
                                                 richardson=richardson, full_output=True)
    if boundary is None:
        lo = _as_bounds(lower, x.size, -np.inf, "lower")
        hi = _as_bounds(upper, x.size, np.inf, "upper")
        boundary = (np.isfinite(lo) & (x == lo)) | (np.isfinite(hi) & (x == hi))
    return ConvergenceCheck.from_derivatives(g, H, nfeval=info.nfeval, boundary=boundary,
                                             grad_tol=grad_tol, hess_tol=hess_tol)

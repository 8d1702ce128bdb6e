"""The outer loop: a derivative-free, bound-constrained minimizer over θ (and β for GLMMs).

NLopt's BOBYQA, as MixedModels.jl uses, with its default tolerances. The record of the
optimization (``OptSummary``) stays on the fitted model.
"""
import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import warnings

import nlopt
import numpy as np
from scipy.linalg import lapack

from ._derivs import ConvergenceCheck, assess_convergence, cholesky_lower
from ._kernels import _search
from ._kernels._check import check_and_polish
from ._kernels import _dense
from ._kernels._dense import cholesky_solve
from ._kernels._lmm_gradient import LmmObjective


class ConvergenceWarning(UserWarning):
    """The optimizer's result fails lme4's convergence checks (gradient, Hessian)."""


@dataclass
class OptSummary:
    """What the optimizer did: start, end, tolerances, evaluations, status, fit log."""

    initial: np.ndarray
    lowerbd: np.ndarray
    optimizer: str = "LN_BOBYQA"
    ftol_rel: float = 1e-12
    ftol_abs: float = 1e-8
    xtol_abs: float = 1e-10
    initial_step: np.ndarray | None = None
    maxfeval: int = 100_000
    final: np.ndarray | None = None
    fmin: float = np.inf
    feval: int = 0
    returnvalue: str = ""
    elapsed: float = 0.0
    fitlog: list = field(default_factory=list)
    rectified: list = field(default_factory=list)
    derivs: object = None        # a ConvergenceCheck: gradient and Hessian at the optimum
    polished: bool = False       # a Newton step from those derivatives lowered the objective

    def __repr__(self):
        return (f"OptSummary(optimizer={self.optimizer}, feval={self.feval}, fmin={self.fmin:.10g}, "
                f"returnvalue={self.returnvalue}, initial={np.round(self.initial, 6).tolist()}, "
                f"final={np.round(self.final, 6).tolist() if self.final is not None else None}, "
                f"elapsed={self.elapsed:.4g}s)")


_RESULTS = {
    nlopt.SUCCESS: "SUCCESS", nlopt.STOPVAL_REACHED: "STOPVAL_REACHED",
    nlopt.FTOL_REACHED: "FTOL_REACHED", nlopt.XTOL_REACHED: "XTOL_REACHED",
    nlopt.MAXEVAL_REACHED: "MAXEVAL_REACHED", nlopt.MAXTIME_REACHED: "MAXTIME_REACHED",
}


class _Progress:
    """The optimizer's progress: a tqdm counter on stderr, as MixedModels.jl shows it,
    'Minimizing 123  Time: 00:01 ( 2.29 ms/it)'.

    ``_Progress(enabled)`` and ``update(count, final=False)`` are all the optimizer uses.
    Disabled, no tqdm object is made and ``update`` returns at once (see _progress.py).
    """

    __slots__ = ("bar",)

    def __init__(self, enabled):
        self.bar = None
        if enabled:
            from ._progress import progress_bar

            self.bar = progress_bar(True, desc="Minimizing", unit="it",
                                    bar_format="{desc} {n}  Time: {elapsed} ({ms_per_it:6.2f} ms/it)")

    def update(self, count, final=False):
        bar = self.bar
        if bar is None:
            return
        if count > bar.n:
            bar.update(count - bar.n)
        if final:
            bar.close()
            self.bar = None


def minimize(objective, optsum, progress=False):
    """Minimize ``objective(x)`` from ``optsum.initial`` within ``optsum.lowerbd``.

    Fills in ``optsum`` (final, fmin, feval, returnvalue, fitlog, elapsed) and returns it.
    A non-finite objective value counts as +inf so that the optimizer backs off.
    """
    if not progress and isinstance(objective, LmmObjective) and _search.available():
        return _minimize_compiled(objective, optsum)
    x0 = np.asarray(optsum.initial, dtype=float)
    n = len(x0)
    opt = nlopt.opt(nlopt.LN_BOBYQA, n)
    lower = np.asarray(optsum.lowerbd, dtype=float)
    opt.set_lower_bounds(lower)
    opt.set_ftol_rel(optsum.ftol_rel)
    opt.set_ftol_abs(optsum.ftol_abs)
    opt.set_xtol_abs(optsum.xtol_abs)
    opt.set_maxeval(optsum.maxfeval)
    if optsum.initial_step is not None:
        opt.set_initial_step(np.asarray(optsum.initial_step, dtype=float))
    bar = _Progress(progress)
    best = [np.inf, x0.copy()]
    fitlog = optsum.fitlog

    def f(x, grad):
        val = float(objective(x))
        if not math.isfinite(val):
            val = math.inf
        fitlog.append((x.copy(), val))
        if val < best[0]:
            best[0], best[1] = val, x.copy()
        if progress:
            bar.update(len(fitlog))
        return val if val != math.inf else 1e300

    t0 = time.perf_counter()
    try:
        opt.set_min_objective(f)
        opt.optimize(x0)
        optsum.returnvalue = _RESULTS.get(opt.last_optimize_result(), str(opt.last_optimize_result()))
    except nlopt.RoundoffLimited:
        optsum.returnvalue = "ROUNDOFF_LIMITED"
    optsum.elapsed = time.perf_counter() - t0
    bar.update(len(optsum.fitlog), final=True)
    optsum.fmin, optsum.final = best
    optsum.feval = len(optsum.fitlog)
    if optsum.returnvalue == "MAXEVAL_REACHED":
        warnings.warn(f"the optimizer stopped after {optsum.feval} evaluations without converging")
    return optsum


# what NLopt's Python wrapper raises for its error codes (ROUNDOFF_LIMITED is a result)
_ERRORS = {nlopt.FAILURE: RuntimeError, nlopt.INVALID_ARGS: ValueError,
           nlopt.OUT_OF_MEMORY: MemoryError}


def _minimize_compiled(objective, optsum):
    """:func:`minimize` with NLopt calling a compiled objective (_kernels/_search.pyx):
    the same BOBYQA and settings, the same record, no Python per evaluation."""
    x0 = np.asarray(optsum.initial, dtype=float)
    step = None if optsum.initial_step is None else np.asarray(optsum.initial_step, dtype=float)
    t0 = time.perf_counter()
    xs, fs, code = _search.bobyqa(objective, x0, np.asarray(optsum.lowerbd, dtype=float), step,
                                  optsum.ftol_rel, optsum.ftol_abs, optsum.xtol_abs,
                                  optsum.maxfeval)
    optsum.elapsed = time.perf_counter() - t0
    if code in _ERRORS:
        raise _ERRORS[code](f"NLopt's BOBYQA failed (code {code})")
    optsum.returnvalue = "ROUNDOFF_LIMITED" if code == nlopt.ROUNDOFF_LIMITED else \
        _RESULTS.get(code, str(code))
    optsum.fitlog.extend(zip(xs, fs.tolist()))
    if len(fs) and fs.min() < math.inf:
        best = int(np.argmin(fs))          # the first of equal values, as minimize keeps
        optsum.fmin, optsum.final = float(fs[best]), xs[best].copy()
    else:
        optsum.fmin, optsum.final = math.inf, x0.copy()
    optsum.feval = len(optsum.fitlog)
    if optsum.returnvalue == "MAXEVAL_REACHED":
        warnings.warn(f"the optimizer stopped after {optsum.feval} evaluations without converging")
    return optsum


def minimize_with_gradient(value_and_grad, optsum, progress=False, ftol=1e-14):
    """Minimize with L-BFGS-B and an exact gradient, from ``optsum.initial`` within the
    lower bounds; fills in ``optsum`` as :func:`minimize` does.

    The Laplace deviance is flat in β near its optimum (four digits of β need changes of
    1e-9 resolved), so the stopping rules are tight by default: a relative change of
    ``ftol`` = 1e-14 or a projected gradient below 1e-7. (At 1e-15, below the
    objective's own rounding on contra's nAGQ = 9 fit, the line search kept failing
    after convergence and ended ABNORMAL at 51 evaluations instead of SUCCESS at 19.)
    An LMM, whose fit ends with Newton steps on the exact gradient, stops at 1e-12.
    """
    x0 = np.asarray(optsum.initial, dtype=float)
    lower = np.asarray(optsum.lowerbd, dtype=float)
    bar = _Progress(progress)
    best = [np.inf, x0.copy()]
    fitlog = optsum.fitlog

    def f(x):
        val, grad = value_and_grad(x)
        val = float(val)
        if not math.isfinite(val):
            # a point where the approximation does not exist: a wall the line search
            # backs off from
            val, grad = 1e300, np.zeros_like(x)
        fitlog.append((x.copy(), val))
        if val < best[0]:
            best[0], best[1] = val, x.copy()
        if progress:
            bar.update(len(fitlog))
        return val, np.asarray(grad, dtype=float)

    t0 = time.perf_counter()
    success, message = lbfgsb(f, x0, lower, maxfun=optsum.maxfeval, ftol=ftol, gtol=1e-7)
    optsum.elapsed = time.perf_counter() - t0
    bar.update(len(fitlog), final=True)
    optsum.optimizer = "L-BFGS-B"
    optsum.returnvalue = "SUCCESS" if success else message.upper().replace(" ", "_")
    optsum.fmin, optsum.final = best
    optsum.feval = len(fitlog)
    return optsum


class LastValueAndGradient:
    """``value_and_grad`` that remembers its last point: the convergence check asks for
    the gradient at the optimizer's end point, which the search evaluated last (on
    insteval a value and gradient cost 80 ms). For objectives that are a function of
    their argument alone (an LMM's profiled deviance), within one fit."""

    __slots__ = ("fn", "x", "result")

    def __init__(self, fn):
        self.fn, self.x, self.result = fn, None, None

    def __call__(self, x):
        if self.x is not None and np.array_equal(x, self.x):
            return self.result
        result = self.fn(x)
        self.x, self.result = np.array(x, dtype=float), result
        return result


# where leave_the_bound looks at the derivatives: θ = 0.01 (b = θu, u ~ N(0, 1)), far
# enough from 0 for the curvature's signal (D''·h) to stand above the gradient's rounding
# (~1e-8), near enough to see an optimum a little way off the bound
BOUND_PROBE = 1e-2


def leave_the_bound(value_and_grad, optsum, bounded, progress=False, ftol=1e-14):
    """Restart L-BFGS-B off the bound where it stopped at a θ of zero that is no minimum.

    The deviance (Laplace, AGQ, or an LMM's profiled one) is even in each column of Λ
    (u_j -> -u_j), so with a scalar term its derivative in θ is exactly zero at θ = 0,
    whatever else is: a line search whose step is projected onto the bound never leaves
    it, and the convergence check holds bound parameters fixed. (Simulated Bernoulli and
    Poisson data, 400-600 rows in 15-30 groups, Laplace and nAGQ = 5: 42 of 320 fits
    stopped at θ = 0 or 1e-12, 1e-4 to 10 above the optimum, at θ = 0.03-0.22; none with
    this probe, which costs one evaluation, and a second search where it finds the way
    down.) One evaluation with the ``bounded`` parameters below ``BOUND_PROBE`` moved to
    it shows which way the objective goes; if down (a negative derivative there, or a
    lower value), the search restarts from that point, and the lower end is kept.
    """
    trial = probe_off_the_bound(value_and_grad, optsum, bounded)
    if trial is not None:
        restart_lbfgsb(value_and_grad, optsum, trial, progress, ftol=ftol)


def probe_off_the_bound(value_and_grad, optsum, bounded):
    """The probe of :func:`leave_the_bound`: ``optsum.final`` with the ``bounded``
    components on (or within ``BOUND_PROBE`` of) their bound moved to the probe, if the
    objective falls away from the bound there (a negative derivative in one of them, or a
    lower value), else None. The evaluation joins ``optsum``'s log."""
    # on the bound, or short of the probe (L-BFGS-B stops at θ ~ 1e-12 as often); a few
    # components, so in Python floats
    final, lower = optsum.final.tolist(), optsum.lowerbd.tolist()
    at = [i for i in np.asarray(bounded, dtype=int).tolist()
          if final[i] < lower[i] + BOUND_PROBE]
    if not at:
        return None
    trial = optsum.final.copy()
    for i in at:
        trial[i] = lower[i] + BOUND_PROBE
    value, grad = value_and_grad(trial)
    optsum.fitlog.append((trial.copy(), float(value)))
    optsum.feval = len(optsum.fitlog)
    if math.isfinite(value) and (any(grad[i] < 0.0 for i in at) or value < optsum.fmin):
        return trial
    return None


def restart_lbfgsb(value_and_grad, optsum, start, progress=False, ftol=1e-14):
    """L-BFGS-B again from ``start`` with a fresh memory; its evaluations join
    ``optsum``'s log, and its end replaces ``optsum``'s if lower."""
    again = OptSummary(initial=np.array(start, dtype=float), lowerbd=optsum.lowerbd)
    minimize_with_gradient(value_and_grad, again, progress=progress, ftol=ftol)
    optsum.fitlog.extend(again.fitlog)
    optsum.feval = len(optsum.fitlog)
    optsum.elapsed += again.elapsed
    if again.fmin < optsum.fmin:
        optsum.final, optsum.fmin, optsum.returnvalue = again.final, again.fmin, again.returnvalue


_EPS = float(np.finfo(float).eps)

_SETULB = []


def scipy_setulb():
    """scipy's private L-BFGS-B routine and its status and task messages, or None where
    they are not there; looked up once (an import statement in a function goes through
    the import machinery on every call, a cold path of its own on a small fit)."""
    if not _SETULB:
        try:
            from scipy.optimize import _lbfgsb
            from scipy.optimize._lbfgsb_py import status_messages, task_messages
            _SETULB.append((_lbfgsb.setulb, status_messages, task_messages))
        except ImportError:
            _SETULB.append(None)
    return _SETULB[0]


def setulb_arrays(x0, lower, maxcor, ftol):
    """What scipy's L-BFGS-B routine (``scipy.optimize._lbfgsb.setulb``) works in, for a
    start x0 and lower bounds (-inf: none), as :func:`lbfgsb` drives it: x (x0 moved onto its bounds), the
    bounds and their kinds, f (one element; setulb reads its 0-d view ``f0``), g, the
    work arrays, the task and factr."""
    n = len(x0)
    bounded = np.isfinite(lower)
    low = np.where(bounded, lower, 0.0)
    f = np.zeros(1)
    return SimpleNamespace(
        x=np.where(bounded, np.maximum(x0, low), x0).astype(np.float64),
        low=low, upp=np.zeros(n),
        nbd=bounded.astype(np.int32),           # 1: a lower bound only; 0: unbounded
        f=f, f0=f.reshape(()), g=np.zeros(n),
        wa=np.zeros(2 * maxcor * n + 5 * n + 11 * maxcor * maxcor + 8 * maxcor),
        iwa=np.zeros(3 * n, dtype=np.int32), task=np.zeros(2, dtype=np.int32),
        ln_task=np.zeros(2, dtype=np.int32), lsave=np.zeros(4, dtype=np.int32),
        isave=np.zeros(44, dtype=np.int32), dsave=np.zeros(29),
        factr=ftol / _EPS)


def lbfgsb(fun_and_grad, x0, lower, maxfun, ftol, gtol, maxcor=10, maxls=20):
    """scipy's L-BFGS-B with lower bounds, driven step by step here: the same iterates as
    ``scipy.optimize.minimize(method="L-BFGS-B")`` without its wrappers, which cost
    ~70 µs a step (a millisecond of a 56-row GLMM's fit). Returns (success, message).

    The compiled routine (``scipy.optimize._lbfgsb.setulb``) is private; where its
    interface differs from scipy 1.15's, the public ``minimize`` runs instead.
    """
    private = scipy_setulb()
    if private is None:
        return _lbfgsb_public(fun_and_grad, x0, lower, maxfun, ftol, gtol)
    setulb, status_messages, task_messages = private
    w = setulb_arrays(x0, lower, maxcor, ftol)
    x, task = w.x, w.task
    nfev = 0
    niter = 0
    try:
        while True:
            setulb(maxcor, x, w.low, w.upp, w.nbd, w.f0, w.g, w.factr, gtol, w.wa,
                           w.iwa, task, w.lsave, w.isave, w.dsave, maxls, w.ln_task)
            if task[0] == 3:            # f and g wanted at x
                val, grad = fun_and_grad(x.copy())
                nfev += 1
                w.f[0] = val
                w.g[:] = grad
            elif task[0] == 1:          # a new iterate
                niter += 1
                if niter >= maxfun or nfev > maxfun:
                    task[0], task[1] = 5, 502
            else:
                break
    except TypeError:
        # another interface of the private routine (before any evaluation)
        if nfev:
            raise
        return _lbfgsb_public(fun_and_grad, x0, lower, maxfun, ftol, gtol)
    message = status_messages.get(int(task[0]), "") + ": " + task_messages.get(int(task[1]), "")
    return bool(task[0] == 4), message


def _lbfgsb_public(fun_and_grad, x0, lower, maxfun, ftol, gtol):
    from scipy.optimize import minimize as scipy_minimize

    bounds = [(lo if np.isfinite(lo) else None, None) for lo in lower]
    res = scipy_minimize(fun_and_grad, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                         options={"ftol": ftol, "gtol": gtol, "maxiter": maxfun,
                                  "maxfun": maxfun})
    return bool(res.success), str(res.message)


def gradient_hessian(value_and_grad, x, step, lower, stencil="central", grad=None,
                     known=None):
    """The Hessian from differences of an exact gradient at ``x``, symmetrized.

    "central": (g(x + h e_i) - g(x - h e_i)) / 2h, and where x - h would cross the lower
    bound the one-sided second-order (-3 g(x) + 4 g(x + h e_i) - g(x + 2h e_i)) / 2h; 2
    gradients per parameter, O(h²). "forward": (g(x + h e_i) - g(x)) / h, 1 gradient per
    parameter (upwards, so never across a lower bound), O(h): with the steps of
    :func:`hessian_steps`, ~1e-3 relative. ``grad`` is g(x) if known (forward needs
    it). ``known`` is (k, block): the leading k-by-k block is given, so only the other
    columns are differenced (the rows of the leading ones come from symmetry). Returns
    (Hessian, gradient evaluations spent).
    """
    if stencil not in ("central", "forward"):
        raise ValueError(f"stencil must be 'central' or 'forward', not {stencil!r}")
    x = np.asarray(x, dtype=float)
    lower = np.asarray(lower, dtype=float)
    step = np.asarray(step, dtype=float)
    n = len(x)
    k = 0 if known is None else int(known[0])
    if stencil == "forward" and grad is not None:
        small = (_dense.forward_hessian(value_and_grad, x, step, grad, k, known)
                 if COMPILED_SMALL_LOOPS else None)
        if small is None:
            small = _forward_hessian_floats(value_and_grad, x, step, grad, k, known)
        if small is not None:
            return small
    hess = np.empty((n, n))
    nfeval = 0

    def at(point):
        nonlocal nfeval
        nfeval += 1
        return np.asarray(value_and_grad(point)[1], dtype=float)

    for i in range(k, n):
        e = np.zeros(n)
        e[i] = step[i]
        if stencil == "forward":
            if grad is None:
                grad = at(x)
            hess[:, i] = (at(x + e) - grad) / step[i]
        elif np.isfinite(lower[i]) and x[i] - step[i] < lower[i]:
            if grad is None:
                grad = at(x)
            g1, g2 = at(x + e), at(x + 2 * e)
            hess[:, i] = (-3 * grad + 4 * g1 - g2) / (2 * step[i])
        else:
            hess[:, i] = (at(x + e) - at(x - e)) / (2 * step[i])
    if k:
        hess[:k, :k] = known[1]
        hess[k:, :k] = hess[:k, k:].T
    return 0.5 * (hess + hess.T), nfeval


def _forward_hessian_floats(value_and_grad, x, step, grad, k, known):
    """:func:`gradient_hessian`'s forward stencil (``grad`` given) in Python floats: the
    same operations on the same numbers, so the same Hessian bit for bit (its twin is
    the NumPy loop there; tests/test_glmm_cold_path.py). On a GLMM's handful of
    parameters NumPy's ufuncs on 5-element arrays (zeros, add, subtract, divide,
    transpose-add, multiply: each a C path of its own) cost more cold than the
    arithmetic. None where a step is zero (Python would raise where NumPy gives inf)."""
    xs, hs, g0 = x.tolist(), step.tolist(), np.asarray(grad, dtype=float).tolist()
    n = len(xs)
    if 0.0 in hs[k:]:
        return None
    # x + e: the entries off the stepped one are x + 0.0 (-0.0 becomes 0.0 there)
    base = [v + 0.0 for v in xs]
    hess = [[0.0] * n for _ in range(n)]
    for i in range(k, n):
        point = list(base)
        point[i] = xs[i] + hs[i]
        gi = np.asarray(value_and_grad(np.array(point))[1], dtype=float).tolist()
        h = hs[i]
        for r in range(n):
            hess[r][i] = (gi[r] - g0[r]) / h
    if k:
        block = known[1]
        block = (block.tolist() if isinstance(block, np.ndarray) else block)
        for r in range(k):
            row = hess[r]
            for c in range(k):
                row[c] = float(block[r][c])
        for r in range(k, n):
            for c in range(k):
                hess[r][c] = hess[c][r]
    sym = [[0.5 * (hess[r][c] + hess[c][r]) for c in range(n)] for r in range(n)]
    return np.array(sym, dtype=float).reshape(n, n), n - k


def check_optimum_with_gradient(value_and_grad, optsum, warn=True, step=None,
                                stencil="central", known=None, grad=None):
    """:func:`check_optimum` with an exact gradient: the Hessian from differences of the
    gradient (:func:`gradient_hessian`) instead of 2n² values, then a Newton step.

    ``stencil="central"`` spends 2n gradients and gives a Hessian good for standard
    errors; ``"forward"`` spends n, and its ~1e-3 relative error moves neither the
    checks (a scaled gradient against 2e-3, positive definiteness) nor, noticeably, the
    Newton step. ``known`` = (k, block) supplies the leading k-by-k block (a GLMM's β
    block from its PIRLS factor) and saves k gradients; the record's stencil then says
    "forward+known". ``grad``, the gradient at ``optsum.final`` where the caller has it
    (a search's last evaluation is usually there), saves evaluating it again; the
    record's ``nfeval`` counts it all the same. The record keeps the stencil, the point
    and the steps, so a consumer that needs the central Hessian can take it there
    (``vcov_hessian`` does).
    """
    x = np.asarray(optsum.final, dtype=float)
    lower = np.asarray(optsum.lowerbd, dtype=float)
    boundary = x <= lower               # -inf bounds are never reached
    step = hessian_steps(x) if step is None else np.asarray(step, dtype=float)
    if grad is None:
        # no evaluation at x again to leave the model's state there: the Newton step's
        # trial starts PIRLS from the last stencil point as well as from x, and the
        # caller evaluates its optimum afresh
        grad = value_and_grad(x)[1]
    grad = np.asarray(grad, dtype=float)
    hess, spent = gradient_hessian(value_and_grad, x, step, lower, stencil, grad=grad,
                                   known=known)
    if known is not None:
        stencil = stencil + "+known"
    record = ConvergenceCheck.from_derivatives(grad, hess, nfeval=spent + 1, boundary=boundary,
                                               stencil=stencil, point=x, step=step)
    optsum.derivs = record
    # (gradient_hessian's Hessian is symmetric, bit for bit)
    _newton_polish(lambda v: value_and_grad(v)[0], optsum, record, boundary, lower,
                   symmetric=True)
    if optsum.polished and not record.converged:
        # the messages must speak of the point the fit reports
        grad = np.asarray(value_and_grad(optsum.final)[1], dtype=float)
        record = ConvergenceCheck.from_derivatives(grad, hess, nfeval=record.nfeval + 1,
                                                   boundary=boundary, stencil=stencil,
                                                   point=x, step=step)
        optsum.derivs = record
    if warn:
        for msg in record.messages:
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    return record


def rectify(objective, optsum, candidates, near=None):
    """Put bounded components of the optimum on their bound (zero) where that is no worse.

    BOBYQA approaches a boundary optimum but rarely lands on it: a variance component
    left at 1e-4 prints a correlation of 1.0 while the fit does not count as singular.
    Each bounded component, smallest first, is tried at zero, and the trial is kept
    whenever the objective there is no larger than the best value so far (lme4's
    ``isSingular`` then sees the boundary the fit is really on). ``near`` limits the
    trials to components within that distance of their bound: after a gradient search
    (whose projected steps land on a bound exactly, and :func:`leave_the_bound` has
    probed everything closer than ``BOUND_PROBE``) a component farther away sits in the
    interior with a vanishing gradient, and a trial there costs an evaluation (a
    PIRLS solve, an insteval factorization) for nothing.
    """
    if near is not None:
        candidates = [i for i in candidates
                      if optsum.final[i] < optsum.lowerbd[i] + near]
    x = optsum.final.copy()
    order = sorted((i for i in candidates if x[i] > 0.0), key=lambda i: x[i])
    for i in order:
        trial = x.copy()
        trial[i] = 0.0
        val = float(objective(trial))
        optsum.fitlog.append((trial.copy(), val))
        if val <= optsum.fmin:
            x, optsum.fmin = trial, val
            optsum.rectified.append(int(i))
    optsum.final = x
    optsum.feval = len(optsum.fitlog)
    return optsum


# False: the Python floats of _forward_hessian_floats and _hessian_steps_floats (the twins
# of _dense.forward_hessian and _dense.hessian_steps; for timing and tests)
COMPILED_SMALL_LOOPS = True


def hessian_steps(x, beta_se=None):
    """Finite-difference steps: 1e-3 relative for variance parameters, and for working
    coefficients 5% of their conditional standard error.

    lme4's 1e-4 lets the objective's rounding noise (PIRLS stops at a relative 1e-13)
    into the Hessian, divided by h²: on a Gamma GLMM that moved a Hessian-based standard
    error by 1.3%. Steps of 1e-3 keep that noise below 1e-5 relative while the O(h²)
    truncation error stays near 1e-6; for coefficients, a step scaled to their standard
    error changes the objective by a fixed, well-resolved amount however the
    coefficient is scaled.
    """
    # relative to the parameter itself (floored at 0.05): a small standard deviation
    # (0.0175 on a log scale) is curved on its own scale, and a step of 1e-3 there
    # biased the gradient enough to raise a false convergence warning. One compiled call
    # of the Python floats below: interpreted, they were ~40 lines of a cold GLMM fit
    if COMPILED_SMALL_LOOPS:
        return _dense.hessian_steps(x, beta_se)
    return _hessian_steps_floats(x, beta_se)


def _hessian_steps_floats(x, beta_se=None):
    """:func:`hessian_steps` in Python floats (a handful of them), as
    1e-3 * np.maximum(0.05, np.abs(x)) and
    np.where(np.isfinite(se) & (se > 0), 0.05 * se, step) compute them, NaN included."""
    step = []
    for v in np.asarray(x, dtype=float).reshape(-1).tolist():
        a = abs(v)
        step.append(1e-3 * (0.05 if 0.05 >= a else a))
    if beta_se is not None:
        se = beta_se if isinstance(beta_se, list) else np.asarray(beta_se, dtype=float).tolist()
        for i, s in enumerate(se[:len(step)]):
            s = float(s)
            if math.isfinite(s) and s > 0:
                step[i] = 0.05 * s
    return np.array(step, dtype=float)


# a Newton step shorter than this (relative to the parameters, floored at 1e-3) whose
# decrement is below the objective's rounding is not tried: it cannot change the fit
MAX_SKIPPED_STEP = 1e-5


def _newton_polish(objective, optsum, record, boundary, lower, symmetric=False):
    """One Newton step from the optimizer's end point with the derivatives just taken.

    BOBYQA stops when its trust region is small, a few 1e-8 short of the optimum on some
    models (pastes, chickweight); that moves p-values in the far tail by 1e-3. With the
    gradient and Hessian already at hand a Newton step costs one evaluation and lands
    within ~1e-10; it is kept only if the objective is lower and the bounds hold. It is
    not tried where it would lower the objective by less than the objective's rounding
    (the decrement g'H⁻¹g against 1e-14 of the value, as :func:`polish_with_gradient`
    judges it) and is short: after L-BFGS-B with the exact gradient at a relative
    tolerance of 1e-14 that is the rule (on the eight lme4 reference GLMMs the trials
    changed the objective by -3e-12 to +1e-12), and a trial cost a fifth of cbpp's check.
    """
    x = optsum.final
    grad, hess = record.gradient, record.hessian
    # (Python's any over a handful of flags: no ufunc reduction on a small fit's path)
    if True in boundary.tolist():
        free = ~boundary
        if not free.any():
            return
        grad, hess = grad[free], hess[np.ix_(free, free)]
        xf = x[free]
    else:
        free, xf = slice(None), x
    if not symmetric:
        hess = 0.5 * (hess + hess.T)
    # LAPACK's dposv in compiled code of ours: scipy's wrapper is the only LAPACK call
    # left on a small GLMM's path, and its cold start costs more than the solve
    step, info = cholesky_solve(hess, grad)
    # g's: the decrement decides only whether the step is tried, so its summation
    # order (Python's, not BLAS's) does not matter
    decrement = sum([a * b for a, b in zip(grad.tolist(), step.tolist())], 0.0)
    if info != 0 or not math.isfinite(decrement):
        # not positive definite, or derivatives not finite: no Newton step, and the
        # record says why
        return
    if decrement < 1e-14 * max(1.0, abs(optsum.fmin)) and max(
            abs(a) / max(abs(b), 1e-3) for a, b in zip(step.tolist(), xf.tolist())
    ) < MAX_SKIPPED_STEP:
        return
    trial = np.array(x, dtype=float)
    trial[free] -= step
    if (trial < lower).any():
        return
    val = float(objective(trial))
    optsum.fitlog.append((trial.copy(), val))
    optsum.feval = len(optsum.fitlog)
    if val < optsum.fmin:
        optsum.final, optsum.fmin = trial, val
        optsum.polished = True


def _refine(objective, optsum, record, boundary, lower, step):
    """A second Newton step with a Richardson-extrapolated gradient (4 values per free
    parameter), for parameters away from their bounds.

    Where the objective is flat to its rounding (a REML criterion of 1,700 resolved to
    ~1e-12), BOBYQA's end point, and the first Newton step from an O(h²) gradient, leave
    θ uncertain at ~1e-6 (sleepstudy: two orders of the same rows gave θ 3e-6 apart); the
    gradient is known far better than the value differences, so this step is kept when
    the objective is no worse than its rounding (1e-13 relative).
    """
    free = ~boundary & ~(np.isfinite(lower) & (optsum.final - 2 * step < lower))
    hess = record.hessian
    if not free.any() or not np.all(np.isfinite(hess)):
        return
    x = np.asarray(optsum.final, dtype=float)
    grad = np.zeros(len(x))
    for i in np.flatnonzero(free):
        e = np.zeros(len(x))
        e[i] = step[i]
        d1 = (float(objective(x + e)) - float(objective(x - e))) / (2 * step[i])
        d2 = (float(objective(x + 2 * e)) - float(objective(x - 2 * e))) / (4 * step[i])
        grad[i] = (4 * d1 - d2) / 3
    h = hess[np.ix_(free, free)]
    try:
        chol = np.linalg.cholesky(0.5 * (h + h.T))
    except np.linalg.LinAlgError:
        objective(x)
        return
    trial = x.copy()
    trial[free] -= np.linalg.solve(chol.T, np.linalg.solve(chol, grad[free]))
    if np.any(trial < lower):
        objective(x)
        return
    val = float(objective(trial))
    optsum.fitlog.append((trial.copy(), val))
    optsum.feval = len(optsum.fitlog)
    if val <= optsum.fmin + 1e-13 * max(1.0, abs(optsum.fmin)):
        optsum.final, optsum.fmin = trial, min(val, optsum.fmin)
        optsum.polished = True
    else:
        objective(x)


def check_with_exact_gradient(value_and_grad, optsum, warn=True, step=None, max_steps=3,
                              kernel=None, known_grad=None):
    """lme4's check with an exact gradient that is cheap (a one-term LMM): the Hessian
    from forward differences of the gradient (n gradients; an O(h) error of ~1e-3
    relative, which neither the checks nor a Newton step notice), then
    :func:`polish_with_gradient` from the gradient already at hand. With ``kernel``, a
    compiled objective that has the gradient (_kernels/_lmm_gradient.pyx), both run in
    compiled code (_kernels/_check.pyx; this function is its twin). ``known_grad``: the
    gradient at ``optsum.final`` where the search computed it there (its value is
    ``optsum.fmin``), which is then not evaluated again."""
    x = np.asarray(optsum.final, dtype=float)
    if kernel is not None and kernel.has_gradient and step is None:
        return _check_compiled(kernel, optsum, warn, max_steps, known_grad)
    step = hessian_steps(x) if step is None else np.asarray(step, dtype=float)
    if known_grad is None:
        val, grad = value_and_grad(x)
    else:
        val, grad = optsum.fmin, known_grad
    grad = np.asarray(grad, dtype=float)
    # upwards: always within a lower bound; column i from the step in θ_i
    shifted = [value_and_grad(xi)[1] for xi in x + np.diag(step)]
    hess = (np.array(shifted, dtype=float) - grad).T / step
    hess = 0.5 * (hess + hess.T)
    return polish_with_gradient(value_and_grad, optsum, warn=warn, start=(val, grad),
                                max_steps=max_steps,
                                restore=False, hessian=(hess, len(x) + 1))


def _check_compiled(kernel, optsum, warn, max_steps, known_grad=None):
    out = check_and_polish(kernel, np.asarray(optsum.final, dtype=float),
                           np.asarray(optsum.lowerbd, dtype=float), float(optsum.fmin),
                           max_steps, known_grad)
    trials = out["trials"]
    optsum.fitlog.extend(zip(trials, out["trial_values"].tolist()))
    optsum.feval = len(optsum.fitlog)
    if out["polished"]:
        optsum.final, optsum.fmin, optsum.polished = out["x"], out["fmin"], True
    record = ConvergenceCheck.from_derivatives(out["grad"], out["hessian"],
                                               nfeval=len(out["x"]) + len(trials)
                                               + (known_grad is None),
                                               boundary=out["boundary"], stencil="forward")
    optsum.derivs = record
    if warn:
        for msg in record.messages:
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    return record


def polish_with_gradient(value_and_grad, optsum, warn=True, max_steps=3, start=None,
                         restore=True, hessian=None):
    """Newton steps with an exact gradient and the Hessian of the check just taken.

    Finite differences of the value resolve θ only to ~1e-7 on a flat objective (the
    value's rounding divided by the step); an exact gradient vanishes at the optimum to
    its own rounding, so a Newton step with it lands where two workspaces whose sums
    differ in the last bits (rows in another order, out-of-core partial sums) agree to
    ~1e-9 (the polish stops where the next step is below 1e-8 relative and would lower
    the objective by less than its rounding). A step is kept when it shrinks the Newton decrement g'H⁻¹g and the objective
    is no worse than its evaluation noise (1e-11 relative: penicillin's objective of 332
    wobbles by 2e-10 over changes of θ of 1e-6, while its exact gradient is smooth there);
    components on their bound stay there. The gradient in ``optsum.derivs`` is then the
    exact one at the reported point. ``start`` is (value, gradient) at ``optsum.final``
    if known; ``restore=False`` leaves the model's state wherever the last step was;
    ``hessian`` is (Hessian, evaluations spent on it) when no check has recorded one.
    """
    x = np.asarray(optsum.final, dtype=float)
    lower = np.asarray(optsum.lowerbd, dtype=float)
    boundary = x <= lower           # -inf bounds are never reached
    free = ~boundary
    hess, spent = (optsum.derivs.hessian, optsum.derivs.nfeval) if hessian is None else hessian
    newton = _newton_direction(hess, free)
    working = hess
    tol = 1e-11 * max(1.0, abs(optsum.fmin))
    val, grad = value_and_grad(x) if start is None else start
    grad = np.asarray(grad, dtype=float)
    nfeval = 1 if start is None else 0
    fitlog = optsum.fitlog
    step, decrement = newton(grad) if newton is not None else (None, None)
    for _ in range(max_steps if step is not None else 0):
        size = float(np.max(np.abs(step) / np.maximum(np.abs(x[free]), 1e-3)))
        # (a step of 1e-11 relative or more always moves x: no test that trial differs)
        if size < 1e-11:
            break           # there already, to the gradient's rounding
        if decrement < 1e-14 * max(1.0, abs(float(val))) and size < 1e-8:
            # the step would lower the objective by less than its own rounding (insteval:
            # steps of 1e-10 in θ at 35 ms each chased a value of 2.4e5 wobbling by 1e-8;
            # and a fifth step of 1.3e-9 after one of 2.7e-8, at 50 ms, lowered nothing)
            break
        trial = x.copy()
        trial[free] -= step
        if (trial < lower).any():
            break
        tval, tgrad = value_and_grad(trial)
        tval = float(tval)
        nfeval += 1
        fitlog.append((trial.copy(), tval))
        if not tval <= optsum.fmin + tol:
            break
        tgrad = np.asarray(tgrad, dtype=float)
        tstep, tdecrement = newton(tgrad)
        if tstep is None or not tdecrement < decrement:
            break
        # the Hessian was differenced where the search stopped: BFGS-updated by each step
        # kept, the steps from a search stopped early converge in 3-5 instead of 7-8
        working = _bfgs_update(working, free, trial - x, tgrad - grad)
        updated = _newton_direction(working, free)
        if updated is not None:
            newton = updated
            tstep, tdecrement = newton(tgrad)
            if tstep is None:
                break
        x, val, grad, step, decrement = trial, tval, tgrad, tstep, tdecrement
        # fmin is the value at the reported point, which may exceed an earlier value by
        # the objective's noise
        optsum.final, optsum.fmin = x, val
        optsum.polished = True
    if restore:
        value_and_grad(optsum.final)       # leave the model's state at the optimum
    optsum.feval = len(fitlog)
    # the Hessian's stencil: the caller's forward differences of the exact gradient, or
    # the earlier check's
    record = ConvergenceCheck.from_derivatives(
        np.asarray(grad, dtype=float), hess, nfeval=spent + nfeval, boundary=boundary,
        stencil="forward" if hessian is not None else optsum.derivs.stencil)
    optsum.derivs = record
    if warn:
        for msg in record.messages:
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    return record


def _bfgs_update(hess, free, s, y):
    """The BFGS update of the free block of hess by the step s and the change of the
    gradient y (where s'y > 0, which keeps it positive definite)."""
    s, y = s[free], y[free]
    sy = float(s @ y)
    if not sy > 0.0:
        return hess
    out = np.array(hess, dtype=float)
    idx = np.ix_(free, free)
    h = out[idx]
    hs = h @ s
    out[idx] = h - np.outer(hs, hs) / float(s @ hs) + np.outer(y, y) / sy
    return out


def _newton_direction(hess, free):
    """g -> (H⁻¹g over the free components, g'H⁻¹g), or (None, None) for a gradient that
    is not finite; None where the free block of H is not positive definite (or not
    finite): no Newton step, and the check says why."""
    if not free.any() or not np.isfinite(hess).all():
        return None
    everything = bool(free.all())
    h = hess if everything else hess[np.ix_(free, free)]
    chol = cholesky_lower(0.5 * (h + h.T))
    if chol is None:
        return None

    def newton(g):
        g = g if everything else g[free]
        step = lapack.dpotrs(chol, g, lower=1)[0]
        decrement = float(g @ step)
        # finite exactly when g is (H⁻¹ is): one test instead of one per component
        return (step, decrement) if math.isfinite(decrement) else (None, None)
    return newton


def _central_gradient(objective, x, step, lower):
    """Central differences (forward, second order, within h of a lower bound)."""
    x = np.asarray(x, dtype=float)
    f0 = None
    grad = np.empty(len(x))
    for i in range(len(x)):
        e = np.zeros(len(x))
        e[i] = step[i]
        if np.isfinite(lower[i]) and x[i] - step[i] < lower[i]:
            if f0 is None:
                f0 = float(objective(x))
            f1, f2 = float(objective(x + e)), float(objective(x + 2 * e))
            grad[i] = (-3 * f0 + 4 * f1 - f2) / (2 * step[i])
        else:
            grad[i] = (float(objective(x + e)) - float(objective(x - e))) / (2 * step[i])
    objective(x)        # leave the model's state at the optimum
    return grad


def check_optimum(objective, optsum, warn=True, step=None, refine=True):
    """lme4's ``check.conv``: derivatives of the objective at the optimum, and warnings.

    The gradient and Hessian over the optimized parameters come from central finite
    differences (one-sided at a bound); parameters sitting on their bound (a variance
    component at zero) are left out of the checks, since the gradient need not vanish
    there. The record goes to ``optsum.derivs``; each message is also a warning. Then
    one Newton step with these derivatives is tried (see ``_newton_polish``); the
    derivatives describe the point before it, which it moves by far less than their
    finite-difference steps.
    """
    x = np.asarray(optsum.final, dtype=float)
    lower = np.asarray(optsum.lowerbd, dtype=float)
    boundary = np.isfinite(lower) & (x <= lower)
    if step is None:
        step = hessian_steps(x)
    record = assess_convergence(objective, x, lower=lower, fx=optsum.fmin, boundary=boundary,
                                step=step)
    optsum.derivs = record
    _newton_polish(objective, optsum, record, boundary, lower)
    if not refine:
        # the caller polishes with an exact gradient and judges convergence there
        return record
    _refine(objective, optsum, record, boundary, lower, step)
    if optsum.polished and not record.converged:
        # the warning must speak of the point the fit reports: take the gradient again
        # there (2n values) and judge it with the Hessian already in hand
        grad = _central_gradient(objective, optsum.final, step, lower)
        record = ConvergenceCheck.from_derivatives(grad, record.hessian,
                                                   nfeval=record.nfeval + 2 * len(grad),
                                                   boundary=boundary)
        optsum.derivs = record
    if warn:
        for msg in record.messages:
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    return record

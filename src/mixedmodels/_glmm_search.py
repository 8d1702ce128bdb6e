"""The exact-gradient search of a GLMM and the convergence check after it.

Variants, for glmm.py's one-stage L-BFGS-B fit, of two functions of _optimize.py:

**The search** (:func:`minimize_one_term`). One term with a canonical link: the Laplace
deviance and its gradient are one call of the compiled PIRLS (``PirlsKernel.laplace``),
~6 µs on cbpp (56 rows), and ``minimize_with_gradient`` around it spent twice that per
evaluation in Python: the loop around scipy's ``setulb``, the logging wrapper and the
model's dispatch to the kernel. ``PirlsKernel.lbfgsb`` runs that loop in compiled code
with the evaluations in it: the same routine, driven the same way, handed the same
numbers, so the same iterates and the same record (its twin,
``minimize_with_gradient(model._joint_value_and_grad, ...)``, gives the same log bit for
bit: tests/test_glmm_search.py).

**The check** (:func:`check_with_gradient`), a variant of
``check_optimum_with_gradient``. The derivatives and the record are the same (the
Hessian by forward differences of the exact gradient, its β block given;
``ConvergenceCheck``); two things differ:

* The gradient at the end point may be handed in: the search's last evaluation is
  usually there, and evaluating again repeats PIRLS and the gradient.
* The Newton step from the end point is tried only where it could lower the
  objective by more than the objective's rounding: the decrement g'H⁻¹g (twice the
  predicted decrease) against 1e-14 of the value, as
  :func:`mixedmodels._optimize.polish_with_gradient` judges it. After L-BFGS-B with
  the exact gradient and a relative tolerance of 1e-14 it never can: on the eight GLMMs
  of the lme4 references (cbpp, contra's gm1-gm3 and (1 | urban & dist), grouseticks,
  verbagg) the decrement was 4e-16 to 2e-12 against a rounding of 1e-12 to 8e-11, and
  the trials, taken anyway, changed the objective by -3e-12 to +1e-12. On cbpp that
  trial (an evaluation and the Newton solve around it) was a fifth of the check.
  Unlike ``polish_with_gradient`` a long step (above ``MAX_SKIPPED_STEP`` of the
  parameters) is still tried, however small its decrement: the step of a search that
  stopped early in a flat direction.
"""
import math
import time
import warnings

import numpy as np
from scipy.linalg import lapack

from ._derivs import ConvergenceCheck
from ._optimize import ConvergenceWarning, gradient_hessian
from ._gradient import _PIRLS_MAXITER
from ._pirls import STEP_TOL, row_kernel, warn_exhausted

# minimize_with_gradient's stopping rules
FTOL, GTOL = 1e-14, 1e-7

# the longest Newton step (relative to the parameters, floored at 1e-3) that is skipped
# for a decrement below the objective's rounding; the eight reference GLMMs' steps were
# 1.5e-8 to 9e-7
MAX_SKIPPED_STEP = 1e-5


def minimize_one_term(model, optsum):
    """L-BFGS-B over (β̃, θ) from ``optsum.initial`` within ``optsum.lowerbd``, the
    evaluations in compiled code (see the module docstring); fills in ``optsum`` as
    ``minimize_with_gradient(model._joint_value_and_grad, optsum)`` does and leaves the
    model as its evaluations do (the modes, the log-determinant, the last evaluation).

    For a model whose ``_joint_value_and_grad`` is one call of the Laplace kernel (one
    term, nAGQ = 1, a canonical link of Bernoulli, Binomial or Poisson). Returns None,
    with nothing done, where scipy's private routine is not there or has another
    interface (the caller takes ``minimize_with_gradient``)."""
    try:
        from scipy.optimize import _lbfgsb
        from scipy.optimize._lbfgsb_py import status_messages, task_messages
    except ImportError:
        return None
    fam = model.family
    u = np.array(model._u, dtype=float)
    t0 = time.perf_counter()
    result = row_kernel(model).lbfgsb(_lbfgsb.setulb, fam.code, fam.link.code, fam.param,
                                      model.prior_w, optsum.initial, optsum.lowerbd, u,
                                      optsum.maxfeval, FTOL, GTOL, tol=1e-13,
                                      maxiter=_PIRLS_MAXITER, max_halving=30,
                                      step_tol=STEP_TOL)
    if result is None:
        return None
    log, (task, code), last, exhausted = result
    optsum.elapsed = time.perf_counter() - t0
    for theta in exhausted:
        warn_exhausted(theta, _PIRLS_MAXITER)
    if last is not None:
        model._u = u
        model._last_logdet = 2.0 * last[3]
        model._last_evaluation = (last[0], last[1], last[2], model._u)
    optsum.fitlog.extend(log)
    values = [value for _, value in log]
    if values:
        best = int(np.argmin(values))           # the first of equal values
        optsum.fmin, optsum.final = values[best], log[best][0].copy()
    else:
        optsum.fmin, optsum.final = np.inf, np.array(optsum.initial, dtype=float)
    message = status_messages.get(task, "") + ": " + task_messages.get(code, "")
    optsum.optimizer = "L-BFGS-B"
    optsum.returnvalue = "SUCCESS" if task == 4 else message.upper().replace(" ", "_")
    optsum.feval = len(optsum.fitlog)
    return optsum


def check_with_gradient(value_and_grad, optsum, step, known=None, grad=None, warn=True,
                        stencil="forward"):
    """lme4's check at ``optsum.final`` from an exact gradient, then a Newton step where
    it can make a difference (see the module docstring).

    Parameters
    ----------
    value_and_grad : callable, x -> (value, gradient)
    optsum : OptSummary
        After the search; ``final``, ``fmin`` and the log are updated if the Newton step
        is taken and lowers the objective.
    step : ndarray
        The finite-difference steps (``hessian_steps``).
    known : (k, block), optional
        The leading k-by-k block of the Hessian, given.
    grad : ndarray, optional
        The gradient at ``optsum.final``, if known.
    warn : bool
        Issue the record's messages as ConvergenceWarnings.
    stencil : {"forward", "central"}

    Returns
    -------
    ConvergenceCheck (also in ``optsum.derivs``)
    """
    x = np.asarray(optsum.final, dtype=float)
    lower = np.asarray(optsum.lowerbd, dtype=float)
    boundary = x <= lower               # -inf bounds are never reached
    if grad is None:
        grad = value_and_grad(x)[1]
    grad = np.asarray(grad, dtype=float)
    hess, differenced = gradient_hessian(value_and_grad, x, step, lower, stencil, grad=grad,
                                         known=known)
    if known is not None:
        stencil = stencil + "+known"
    # nfeval counts the gradient at x, evaluated here or handed in: the derivatives'
    # cost, as check_optimum_with_gradient reports it
    record = ConvergenceCheck.from_derivatives(grad, hess, nfeval=differenced + 1,
                                               boundary=boundary, stencil=stencil, point=x,
                                               step=step)
    optsum.derivs = record
    _newton_trial(value_and_grad, optsum, record, boundary, lower)
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


def _newton_trial(value_and_grad, optsum, record, boundary, lower):
    """One Newton step from ``optsum.final`` with the record's derivatives, kept if the
    objective is lower and the bounds hold; not tried where it would lower the
    objective by less than its rounding. The step is the one ``_newton_polish`` and
    ``polish_with_gradient`` take (the Cholesky factor of the symmetrized free block,
    LAPACK's dposv here in one call)."""
    x = optsum.final
    grad, hess = record.gradient, record.hessian
    if boundary.any():
        free = ~boundary
        if not free.any():
            return
        grad, hess = grad[free], hess[np.ix_(free, free)]
        xf = x[free]
    else:
        free, xf = slice(None), x
    _, step, info = lapack.dposv(0.5 * (hess + hess.T), grad, lower=1)
    decrement = float(grad @ step)
    if info != 0 or not math.isfinite(decrement):
        # not positive definite, or derivatives not finite (which leave a step that is
        # not either): no Newton step, and the record says why
        return
    if decrement < 1e-14 * max(1.0, abs(optsum.fmin)) and max(
            abs(a) / max(abs(b), 1e-3) for a, b in zip(step.tolist(), xf.tolist())
    ) < MAX_SKIPPED_STEP:
        return
    trial = np.array(x, dtype=float)
    trial[free] -= step
    if (trial < lower).any():
        return
    value = float(value_and_grad(trial)[0])
    optsum.fitlog.append((trial.copy(), value))
    optsum.feval = len(optsum.fitlog)
    if value < optsum.fmin:
        optsum.final, optsum.fmin = trial, value
        optsum.polished = True

"""The exact-gradient search of a one-term GLMM with no Python between evaluations.

:func:`minimize_one_term` is glmm.py's one-stage L-BFGS-B fit for one term with a
canonical link: the Laplace deviance and its gradient are one call of the compiled PIRLS
(``PirlsKernel.laplace``), ~6 µs on cbpp (56 rows), and ``minimize_with_gradient`` around
it spent twice that per evaluation in Python: the loop around scipy's ``setulb``, the
logging wrapper and the model's dispatch to the kernel. ``PirlsKernel.lbfgsb`` runs that
loop in compiled code with the evaluations in it: the same routine, driven the same way,
handed the same numbers, so the same iterates and the same record (its twin,
``minimize_with_gradient(model._joint_value_and_grad, ...)``, gives the same log bit for
bit: tests/test_glmm_search.py). The check after it is
``_optimize.check_optimum_with_gradient``, handed the search's last gradient.
"""
import time

import numpy as np

from ._gradient import _PIRLS_MAXITER
from ._optimize import scipy_setulb
from ._pirls import STEP_TOL, row_kernel, warn_exhausted

# minimize_with_gradient's stopping rules
FTOL, GTOL = 1e-14, 1e-7



def minimize_one_term(model, optsum):
    """L-BFGS-B over (β̃, θ) from ``optsum.initial`` within ``optsum.lowerbd``, the
    evaluations in compiled code (see the module docstring); fills in ``optsum`` as
    ``minimize_with_gradient(model._joint_value_and_grad, optsum)`` does and leaves the
    model as its evaluations do (the modes, the log-determinant, the last evaluation).

    For a model whose ``_joint_value_and_grad`` is one call of the Laplace kernel (one
    term, nAGQ = 1, a canonical link of Bernoulli, Binomial or Poisson). Returns None,
    with nothing done, where scipy's private routine is not there or has another
    interface (the caller takes ``minimize_with_gradient``)."""
    private = scipy_setulb()
    if private is None:
        return None
    setulb, status_messages, task_messages = private
    fam = model.family
    u = np.array(model._u, dtype=float)
    t0 = time.perf_counter()
    result = row_kernel(model).lbfgsb(setulb, fam.code, fam.link.code, fam.param,
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



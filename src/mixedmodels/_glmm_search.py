"""The exact-gradient search of a one-term GLMM with no Python between evaluations.

:func:`minimize_one_term` is glmm.py's one-stage fit for one term with a canonical link:
the Laplace deviance and its gradient are one call of the compiled PIRLS
(``PirlsKernel.laplace``), ~6 µs on cbpp (56 rows), and ``PirlsKernel.trust_region``
runs the trust-region quasi-Newton search (_kernels/_search.pyx, the LMM's default
search) with the evaluations in compiled code. Its twin,
``trust_region_search(model._joint_value_and_grad, ...)``, gives the same log bit for bit
(tests/test_glmm_search.py). The check after it is
``_optimize.check_optimum_with_gradient``, handed the search's best gradient.

It replaced scipy's L-BFGS-B driven step by step from compiled code: the same number of
evaluations on cbpp (16), but scipy's routine cost ~50 µs of a warm fit and ~230 µs of a
cold one across its 30 calls (an f2py wrapper of 17 arguments, and no C symbol to call
it by).
"""
import math
import time

import numpy as np

from ._gradient import _PIRLS_MAXITER
from ._pirls import STEP_TOL, row_kernel, warn_exhausted
from ._trust_region import TR_CONVERGED, TRUST_RADIUS, trust_region_search

# the search's stopping rule: a relative change of the deviance (see glmm.py's
# _fit_with_gradient for what was measured)
GLMM_TRUST_FTOL = 1e-12


def minimize_one_term(model, optsum, compiled=True):
    """The trust-region search over (β̃, θ) from ``optsum.initial`` within
    ``optsum.lowerbd``, the evaluations in compiled code (see the module docstring);
    fills in ``optsum`` (the log, the best point, ``optimizer`` "TRUST_REGION_BFGS") and
    leaves the model, and the kernel's state, at its best evaluation (the modes, the
    log-determinant, the record of that evaluation, which the check starts from; PIRLS
    runs there again where a later trial left the state).

    For a model whose ``_joint_value_and_grad`` is one call of the Laplace kernel (one
    term, nAGQ = 1, a canonical link of Bernoulli, Binomial or Poisson). ``compiled=False``
    runs the twin: ``trust_region_search`` over ``model._joint_value_and_grad``."""
    t0 = time.perf_counter()
    if compiled:
        fam = model.family
        u = np.array(model._u, dtype=float)
        xs, fs, code, best, exhausted = row_kernel(model).trust_region(
            fam.code, fam.link.code, fam.param, model.prior_w, optsum.initial,
            optsum.lowerbd, u, TRUST_RADIUS, GLMM_TRUST_FTOL, optsum.maxfeval, tol=1e-13,
            maxiter=_PIRLS_MAXITER, max_halving=30, step_tol=STEP_TOL)
        for theta in exhausted:
            warn_exhausted(theta, _PIRLS_MAXITER)
    else:
        xs, fs, code, best, u = _twin_search(model, optsum)
    optsum.elapsed = time.perf_counter() - t0
    values = fs.tolist()
    optsum.fitlog.extend(zip(xs, values))
    if best is not None:
        model._u = u
        model._last_logdet = 2.0 * best[3]
        model._last_evaluation = (best[0], best[1], best[2], model._u)
        optsum.final = best[0]
        # the search's own value there (best's may be PIRLS run again: see the kernel)
        optsum.fmin = min(v for v in values if math.isfinite(v))
    else:
        optsum.fmin, optsum.final = math.inf, np.array(optsum.initial, dtype=float)
    optsum.optimizer = "TRUST_REGION_BFGS"
    optsum.returnvalue = "SUCCESS" if code == TR_CONVERGED else "MAXEVAL_REACHED"
    optsum.feval = len(values)
    return optsum


def _twin_search(model, optsum):
    """``PirlsKernel.trust_region``'s twin: (xs, fs, code, best, modes of the best)."""
    best = []
    last_is_best = [False]

    def evaluate(x):
        value, grad = model._joint_value_and_grad(x)
        last_is_best[0] = math.isfinite(value) and (not best or value < best[1])
        if last_is_best[0]:
            best[:] = [np.array(x), value, np.array(grad), model._last_logdet / 2.0,
                       np.array(model._u)]
        return value, grad

    def start_block():
        # PirlsKernel.trust_region's: twice the Schur complement at the start's modes
        p = len(optsum.initial) - model.layout.ntheta
        if p == 0 or not best:
            return None
        try:
            schur, _ = row_kernel(model).beta_covariance(np.array(best[0][p:]))
        except np.linalg.LinAlgError:
            return None
        return [[2.0 * v for v in row] for row in schur.tolist()]

    xs, fs, code = trust_region_search(evaluate, optsum.initial, optsum.lowerbd,
                                       TRUST_RADIUS, GLMM_TRUST_FTOL, optsum.maxfeval,
                                       start_block)
    if not best:
        return np.array(xs), np.array(fs), code, None, np.array(model._u, dtype=float)
    if not last_is_best[0]:
        # as the kernel does: PIRLS again at the best point from its modes
        model._u = best[4]
        value, grad = model._joint_value_and_grad(best[0])
        best[1:5] = [value, np.array(grad), model._last_logdet / 2.0, np.array(model._u)]
    return np.array(xs), np.array(fs), code, tuple(best[:4]), best[4]

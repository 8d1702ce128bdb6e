# cython: boundscheck=False, wraparound=False, cdivision=True
"""The LMM's convergence check and Newton polish with a compiled value and gradient.

``_optimize.check_with_exact_gradient`` (its NumPy twin) in one call: the Hessian from
forward differences of the exact gradient, then Newton steps with it (BFGS-updated by
each step kept), each kept where the objective is no worse than its noise and the Newton
decrement shrinks. On a small
model the vectors have two or three entries and the Python version spent ~70 µs in NumPy
calls around six ~2 µs evaluations. The convergence messages stay in Python
(``ConvergenceCheck.from_derivatives``), from the gradient and Hessian returned here.
"""
from libc.math cimport fabs, isfinite
from libc.stdlib cimport malloc, free

import numpy as np

from mixedmodels._kernels._lmm_gradient cimport LmmObjective
from mixedmodels._linalg._blocked cimport chol_inplace


cdef int _newton(const double *chol, int nf, const Py_ssize_t *free_, const double *g,
                 double *step, double *decrement) noexcept nogil:
    """step = H⁻¹g over the free components (H = chol chol', column-major nf by nf) and
    the decrement g'H⁻¹g; returns 1 where that is not finite (g is not)."""
    cdef int a, e
    cdef double s
    for a in range(nf):                     # forward: chol y = g
        s = g[free_[a]]
        for e in range(a):
            s -= chol[a + e * nf] * step[e]
        step[a] = s / chol[a + a * nf]
    for a in range(nf - 1, -1, -1):         # backward: chol' step = y
        s = step[a]
        for e in range(a + 1, nf):
            s -= chol[e + a * nf] * step[e]
        step[a] = s / chol[a + a * nf]
    s = 0.0
    for a in range(nf):
        s += g[free_[a]] * step[a]
    decrement[0] = s
    return 0 if isfinite(s) else 1


def check_and_polish(LmmObjective objective, x0, lower, double fmin, int max_steps,
                     known_grad=None):
    """The derivatives at x0 and Newton steps from there (``check_with_exact_gradient``).

    Parameters
    ----------
    objective : an LmmObjective with ``has_gradient``
    x0 : where the search stopped (its value is ``fmin``)
    lower : the lower bounds; components on theirs stay there
    known_grad : the gradient at x0 where the search has it (the same numbers an
        evaluation there gives), else None: it is evaluated

    Returns
    -------
    dict
        ``x`` (the point reached), ``fmin`` (its value), ``grad`` (the exact gradient
        there), ``hessian`` (at x0, symmetrized), ``boundary``, ``trials`` ((k, n): the
        points the Newton steps evaluated, in order) and ``trial_values``, ``polished``
        (a step was kept).
    """
    if not objective.has_gradient:
        raise ValueError("the objective has no gradient")
    cdef Py_ssize_t n = objective.ntheta, i, r, nf = 0
    cdef const double[::1] lo = np.ascontiguousarray(lower, dtype=np.float64)
    x_out = np.array(x0, dtype=np.float64)
    if x_out.shape[0] != n or lo.shape[0] != n or (known_grad is not None
                                                    and len(known_grad) != n):
        raise ValueError(f"x0, lower and known_grad must have {n} entries")
    hess = np.empty((n, n))
    grad = np.empty(n)
    boundary = np.zeros(n, dtype=bool)
    trials = np.empty((max(max_steps, 0), n))
    trial_values = np.empty(max(max_steps, 0))
    cdef double[::1] x = x_out, g = grad
    cdef const double[::1] kv
    cdef double[:, ::1] h = hess, tx = trials
    cdef double[::1] tf = trial_values
    cdef double *buf = <double *> malloc((9 * n + 4 * n * n + 1) * sizeof(double))
    cdef Py_ssize_t *free_ = <Py_ssize_t *> malloc((n + 1) * sizeof(Py_ssize_t))
    if buf == NULL or free_ == NULL:
        free(buf)
        free(free_)
        raise MemoryError()
    cdef double *hstep = buf
    cdef double *shifted = hstep + n
    cdef double *tgrad = shifted + n
    cdef double *step = tgrad + n
    cdef double *tstep = step + n
    cdef double *trial = tstep + n
    cdef double *cols = trial + n             # n by n: the gradients at x + h_i e_i
    cdef double *chol = cols + n * n
    cdef double *work = chol + n * n          # the free block of H, BFGS-updated
    cdef double *trychol = work + n * n
    cdef double *sv = trychol + n * n          # the step and the change of the gradient
    cdef double *yv = sv + n
    cdef double *hs = yv + n
    cdef double sy, shs
    cdef int a, e
    cdef double val, tval, decrement = 0.0, tdecrement, size, ratio, tol, logdet = 0.0
    cdef bint can_step = True, polished = False
    cdef int ntrials = 0, it
    try:
        # the Hessian: forward differences of the gradient, upwards (within a lower bound)
        for i in range(n):
            hstep[i] = 1e-3 * (fabs(x[i]) if fabs(x[i]) > 0.05 else 0.05)
        if known_grad is None:
            objective.value_gradient(&x[0], &val, &g[0])
        else:
            val = fmin
            known = np.ascontiguousarray(known_grad, dtype=np.float64)
            kv = known
            for i in range(n):
                g[i] = kv[i]
        for i in range(n):
            for r in range(n):
                shifted[r] = x[r]
            shifted[i] += hstep[i]
            objective.value_gradient(shifted, &tval, &cols[i * n])
        for r in range(n):
            for i in range(n):
                h[r, i] = (cols[i * n + r] - g[r]) / hstep[i]
        for r in range(n):
            for i in range(r + 1, n):
                h[r, i] = h[i, r] = 0.5 * (h[r, i] + h[i, r])
        for i in range(n):
            if x[i] <= lo[i]:
                boundary[i] = True
            else:
                free_[nf] = i
                nf += 1
        # the Newton direction over the free components: none where their block of the
        # Hessian is not finite or not positive definite (the messages say why)
        for r in range(n):
            for i in range(n):
                if not isfinite(h[r, i]):
                    can_step = False
        if nf == 0 or not can_step:
            can_step = False
        else:
            for r in range(nf):
                for i in range(nf):
                    chol[r + i * nf] = work[r + i * nf] = h[free_[r], free_[i]]
            can_step = chol_inplace(chol, <int> nf, &logdet) == 0
        if can_step:
            can_step = _newton(chol, <int> nf, free_, &g[0], step, &decrement) == 0
        tol = 1e-11 * (fabs(fmin) if fabs(fmin) > 1.0 else 1.0)
        for it in range(max_steps if can_step else 0):
            size = 0.0
            for r in range(nf):
                i = free_[r]
                ratio = fabs(step[r]) / (fabs(x[i]) if fabs(x[i]) > 1e-3 else 1e-3)
                if ratio > size:
                    size = ratio
            if size < 1e-11:
                break           # there already, to the gradient's rounding
            if decrement < 1e-14 * (fabs(val) if fabs(val) > 1.0 else 1.0) and size < 1e-8:
                break           # a decrease below the objective's rounding
            for i in range(n):
                trial[i] = x[i]
            for r in range(nf):
                trial[free_[r]] -= step[r]
            for i in range(n):
                if trial[i] < lo[i]:
                    can_step = False
            if not can_step:
                break
            objective.value_gradient(trial, &tval, tgrad)
            for i in range(n):
                tx[ntrials, i] = trial[i]
            tf[ntrials] = tval
            ntrials += 1
            if not tval <= fmin + tol:
                break
            if _newton(chol, <int> nf, free_, tgrad, tstep, &tdecrement) or \
                    not tdecrement < decrement:
                break
            # the BFGS update of the free block by this step (where s'y > 0), and the
            # step from the new point with it (the old factor where it fails)
            sy = 0.0
            for r in range(nf):
                sv[r] = trial[free_[r]] - x[free_[r]]
                yv[r] = tgrad[free_[r]] - g[free_[r]]
                sy += sv[r] * yv[r]
            if sy > 0.0:
                shs = 0.0
                for a in range(nf):
                    hs[a] = 0.0
                    for e in range(nf):
                        hs[a] += work[a + e * nf] * sv[e]
                    shs += sv[a] * hs[a]
                for a in range(nf):
                    for e in range(nf):
                        work[a + e * nf] = (work[a + e * nf] - hs[a] * hs[e] / shs
                                            + yv[a] * yv[e] / sy)
                for a in range(nf * nf):
                    trychol[a] = work[a]
                if chol_inplace(trychol, <int> nf, &logdet) == 0:
                    for a in range(nf * nf):
                        chol[a] = trychol[a]
                    if _newton(chol, <int> nf, free_, tgrad, tstep, &tdecrement):
                        break
            for i in range(n):
                x[i] = trial[i]
                g[i] = tgrad[i]
            for r in range(nf):
                step[r] = tstep[r]
            val, decrement, fmin = tval, tdecrement, tval
            polished = True
    finally:
        free(buf)
        free(free_)
    return dict(x=x_out, fmin=fmin, grad=grad, hessian=hess, boundary=boundary,
                trials=trials[:ntrials], trial_values=trial_values[:ntrials],
                polished=polished)

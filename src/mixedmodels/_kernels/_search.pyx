# cython: boundscheck=False, wraparound=False, cdivision=True
"""BOBYQA over an LMM's profiled objective with no Python between evaluations.

On a small model an evaluation is ~1 µs of arithmetic (sleepstudy: 18 levels of 2 by 2
blocks) and NLopt's Python wrapper plus our logging cost ~5 µs around it, 40-60 times a
fit. Here NLopt calls a C function that factors at θ and forms the objective from the
factorization, and the fit log is written to a C buffer.

NLopt is the one the ``nlopt`` Python package loaded: its extension module exports the C
API (``nlopt_create``, ``nlopt_optimize``, ...), found with dlsym, so the compiled search
runs the same BOBYQA, of the same version, as :func:`mixedmodels._optimize.minimize`, with
no library to install or vendor. Where the symbols cannot be found ``available()`` is
False and the fit takes the Python route.

The objective is ``_lmm_gradient.LmmObjective`` (its NumPy twin
``LinearMixedModel._objective_unchecked``); the twin of ``bobyqa`` is
``_optimize.minimize`` with that objective (tests/test_compiled_search.py).
"""
from libc.math cimport INFINITY
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy

import numpy as np

from mixedmodels._kernels._lmm_gradient cimport LmmObjective


cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flag)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_LOCAL


ctypedef void *nlopt_opt
ctypedef double (*nlopt_func)(unsigned n, const double *x, double *gradient, void *data) noexcept
ctypedef nlopt_opt (*create_t)(int algorithm, unsigned n) noexcept
ctypedef void (*destroy_t)(nlopt_opt opt) noexcept
ctypedef int (*set_objective_t)(nlopt_opt opt, nlopt_func f, void *data) noexcept
ctypedef int (*set_array_t)(nlopt_opt opt, const double *values) noexcept
ctypedef int (*set_double_t)(nlopt_opt opt, double value) noexcept
ctypedef int (*set_int_t)(nlopt_opt opt, int value) noexcept
ctypedef int (*optimize_t)(nlopt_opt opt, double *x, double *opt_f) noexcept
ctypedef int (*force_stop_t)(nlopt_opt opt) noexcept


cdef struct NloptApi:
    create_t create
    destroy_t destroy
    set_objective_t set_min_objective
    set_array_t set_lower_bounds
    set_double_t set_ftol_rel
    set_double_t set_ftol_abs
    set_double_t set_xtol_abs1
    set_int_t set_maxeval
    set_array_t set_initial_step
    optimize_t optimize
    force_stop_t force_stop


cdef NloptApi _api
cdef bint _loaded = False
cdef int _bobyqa = -1


cdef void *_symbol(void *handle, const char *name):
    return dlsym(handle, name)


def _load():
    """Find NLopt's C API in the module the ``nlopt`` package loaded."""
    global _loaded, _bobyqa
    try:
        import nlopt
        import nlopt._nlopt as ext
        path = ext.__file__.encode()
        _bobyqa = int(nlopt.LN_BOBYQA)
    except Exception:
        return
    cdef void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL)
    if h == NULL:
        return
    cdef void *ptrs[11]
    names = [b"nlopt_create", b"nlopt_destroy", b"nlopt_set_min_objective",
             b"nlopt_set_lower_bounds", b"nlopt_set_ftol_rel", b"nlopt_set_ftol_abs",
             b"nlopt_set_xtol_abs1", b"nlopt_set_maxeval", b"nlopt_set_initial_step",
             b"nlopt_optimize", b"nlopt_force_stop"]
    cdef Py_ssize_t i
    for i in range(11):
        ptrs[i] = _symbol(h, names[i])
        if ptrs[i] == NULL:
            return
    _api.create = <create_t> ptrs[0]
    _api.destroy = <destroy_t> ptrs[1]
    _api.set_min_objective = <set_objective_t> ptrs[2]
    _api.set_lower_bounds = <set_array_t> ptrs[3]
    _api.set_ftol_rel = <set_double_t> ptrs[4]
    _api.set_ftol_abs = <set_double_t> ptrs[5]
    _api.set_xtol_abs1 = <set_double_t> ptrs[6]
    _api.set_maxeval = <set_int_t> ptrs[7]
    _api.set_initial_step = <set_array_t> ptrs[8]
    _api.optimize = <optimize_t> ptrs[9]
    _api.force_stop = <force_stop_t> ptrs[10]
    _loaded = True


_load()


def available():
    """Whether NLopt's C API was found (else the fit takes the Python route)."""
    return _loaded


cdef struct SearchLog:
    void *objective             # the LmmObjective (borrowed)
    nlopt_opt opt
    Py_ssize_t n, count, capacity
    double *xs                  # count rows of n: every point evaluated
    double *fs
    bint failed                 # an exception other than a singular system: stop


cdef double _evaluate(unsigned n, const double *x, double *gradient, void *data) noexcept:
    cdef SearchLog *log_ = <SearchLog *> data
    cdef double val
    cdef Py_ssize_t cap
    cdef double *grown
    if log_.count == log_.capacity:
        cap = 2 * log_.capacity
        grown = <double *> realloc(log_.xs, cap * log_.n * sizeof(double))
        if grown == NULL:
            log_.failed = True
            _api.force_stop(log_.opt)
            return 1e300
        log_.xs = grown
        grown = <double *> realloc(log_.fs, cap * sizeof(double))
        if grown == NULL:
            log_.failed = True
            _api.force_stop(log_.opt)
            return 1e300
        log_.fs = grown
        log_.capacity = cap
    try:
        val = (<LmmObjective> log_.objective).value(x)
    except BaseException as err:
        # NLopt cannot carry it: bobyqa re-raises it once NLopt has returned
        (<LmmObjective> log_.objective).pending = err
        log_.failed = True
        _api.force_stop(log_.opt)
        return 1e300
    memcpy(&log_.xs[log_.count * log_.n], x, log_.n * sizeof(double))
    log_.fs[log_.count] = val
    log_.count += 1
    return val if val != INFINITY else 1e300


def bobyqa(LmmObjective objective, x0, lower, initial_step, double ftol_rel,
           double ftol_abs, double xtol_abs, int maxeval):
    """BOBYQA from x0 within the lower bounds, as ``_optimize.minimize`` sets it up.

    Returns
    -------
    xs : (k, n) ndarray
        Every point evaluated, in order.
    fs : (k,) ndarray
        Their values (+inf where the system is singular).
    code : int
        NLopt's result (negative: an error, such as -4 for ROUNDOFF_LIMITED).
    """
    if not _loaded:
        raise RuntimeError("NLopt's C API was not found; use _optimize.minimize")
    cdef Py_ssize_t n = objective.ntheta
    cdef double[::1] x = np.array(x0, dtype=np.float64)
    cdef const double[::1] lo = np.ascontiguousarray(lower, dtype=np.float64)
    cdef const double[::1] dx
    if x.shape[0] != n or lo.shape[0] != n:
        raise ValueError(f"x0 and lower must have {n} entries")
    cdef SearchLog log_
    cdef double[:, ::1] xv
    cdef double[::1] fv
    cdef double fmin = INFINITY
    cdef int code
    log_.objective = <void *> objective
    log_.n, log_.count, log_.capacity, log_.failed = n, 0, 64, False
    log_.xs = <double *> malloc(64 * n * sizeof(double))
    log_.fs = <double *> malloc(64 * sizeof(double))
    log_.opt = _api.create(_bobyqa, <unsigned> n)
    try:
        if log_.xs == NULL or log_.fs == NULL or log_.opt == NULL:
            raise MemoryError()
        _api.set_lower_bounds(log_.opt, &lo[0])
        _api.set_ftol_rel(log_.opt, ftol_rel)
        _api.set_ftol_abs(log_.opt, ftol_abs)
        _api.set_xtol_abs1(log_.opt, xtol_abs)
        _api.set_maxeval(log_.opt, maxeval)
        if initial_step is not None:
            dx = np.ascontiguousarray(initial_step, dtype=np.float64)
            _api.set_initial_step(log_.opt, &dx[0])
        _api.set_min_objective(log_.opt, _evaluate, &log_)
        objective.pending = None
        code = _api.optimize(log_.opt, &x[0], &fmin)
        if log_.failed:
            pending, objective.pending = objective.pending, None
            raise pending if pending is not None else MemoryError("the search's log could not grow")
        xs = np.empty((log_.count, n))
        fs = np.empty(log_.count)
        if log_.count:
            xv, fv = xs, fs
            memcpy(&xv[0, 0], log_.xs, log_.count * n * sizeof(double))
            memcpy(&fv[0], log_.fs, log_.count * sizeof(double))
        return xs, fs, code
    finally:
        if log_.opt != NULL:
            _api.destroy(log_.opt)
        free(log_.xs)
        free(log_.fs)


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

``trust_region`` is the default search of LMMs with a compiled exact gradient: a
projected trust-region quasi-Newton search in plain C, no NLopt (its twin
``_trust_region.trust_region_search``, tests/test_gradient_search.py).
"""
from libc.math cimport INFINITY, NAN
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


cdef struct PointLog:
    # every point a search evaluated, in order, and its value
    Py_ssize_t n, count, capacity
    double *xs                  # count rows of n
    double *fs


cdef int _points_open(PointLog *log, Py_ssize_t n, Py_ssize_t capacity) noexcept:
    """Empty buffers for ``capacity`` points of n entries; 1 where memory runs out (the
    caller frees either way)."""
    log.n, log.count, log.capacity = n, 0, capacity
    log.xs = <double *> malloc(capacity * n * sizeof(double))
    log.fs = <double *> malloc(capacity * sizeof(double))
    return log.xs == NULL or log.fs == NULL


cdef int _points_add(PointLog *log, const double *x, double f) noexcept:
    """Append (x, f), the buffers doubled when full; 1 where memory runs out."""
    cdef Py_ssize_t cap
    cdef double *grown
    if log.count == log.capacity:
        cap = 2 * log.capacity
        grown = <double *> realloc(log.xs, cap * log.n * sizeof(double))
        if grown == NULL:
            return 1
        log.xs = grown
        grown = <double *> realloc(log.fs, cap * sizeof(double))
        if grown == NULL:
            return 1
        log.fs = grown
        log.capacity = cap
    memcpy(&log.xs[log.count * log.n], x, log.n * sizeof(double))
    log.fs[log.count] = f
    log.count += 1
    return 0


cdef object _points_arrays(PointLog *log):
    """(xs, fs): the log as NumPy arrays."""
    cdef double[:, ::1] xv
    cdef double[::1] fv
    xs = np.empty((log.count, log.n))
    fs = np.empty(log.count)
    if log.count:
        xv, fv = xs, fs
        memcpy(&xv[0, 0], log.xs, log.count * log.n * sizeof(double))
        memcpy(&fv[0], log.fs, log.count * sizeof(double))
    return xs, fs


cdef struct SearchLog:
    void *objective             # the LmmObjective (borrowed)
    nlopt_opt opt
    PointLog points
    bint failed                 # an exception other than a singular system: stop


cdef double _evaluate(unsigned n, const double *x, double *gradient, void *data) noexcept:
    cdef SearchLog *log_ = <SearchLog *> data
    cdef double val
    try:
        val = (<LmmObjective> log_.objective).value(x)
    except BaseException as err:
        # NLopt cannot carry it: bobyqa re-raises it once NLopt has returned
        (<LmmObjective> log_.objective).pending = err
        log_.failed = True
        _api.force_stop(log_.opt)
        return 1e300
    if _points_add(&log_.points, x, val):
        log_.failed = True
        _api.force_stop(log_.opt)
        return 1e300
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
    cdef double fmin = INFINITY
    cdef int code
    log_.objective = <void *> objective
    log_.failed = False
    cdef int no_memory = _points_open(&log_.points, n, 64)
    log_.opt = _api.create(_bobyqa, <unsigned> n)
    try:
        if no_memory or log_.opt == NULL:
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
        xs, fs = _points_arrays(&log_.points)
        return xs, fs, code
    finally:
        if log_.opt != NULL:
            _api.destroy(log_.opt)
        free(log_.points.xs)
        free(log_.points.fs)



# -- a projected trust-region quasi-Newton search with the exact gradient -------------
#
# For LMMs whose objective has a compiled exact gradient (LmmObjective.has_gradient).
# Its NumPy twin is ``mixedmodels._trust_region.trust_region_search``, which does the same
# arithmetic in the same order (tests/test_gradient_search.py holds them to the same
# iterates); the algorithm is described there.

cdef extern from "<math.h>" nogil:
    double sqrt(double x)
    double fabs(double x)
    bint isfinite(double x)

# what ``trust_region`` returns as its code
TR_CONVERGED, TR_MAXEVAL = 0, 1


cdef int _tr_log(PointLog *st, const double *x, double f) except -1:
    if _points_add(st, x, f):
        raise MemoryError()
    return 0


cdef double _model(Py_ssize_t n, const double *g, const double *B, const double *s) noexcept nogil:
    """g's + s'Bs/2."""
    cdef Py_ssize_t i, j
    cdef double m = 0.0, bs
    for i in range(n):
        bs = 0.0
        for j in range(n):
            bs = bs + B[i * n + j] * s[j]
        m = m + s[i] * (g[i] + 0.5 * bs)
    return m


cdef void _box_qp(Py_ssize_t n, const double *g, const double *B, const double *lo,
                  const double *hi, const char *held, double *s, double *q, double *d,
                  double *sn, double *L, Py_ssize_t *free_) noexcept nogil:
    """s minimizing g's + s'Bs/2 over lo <= s <= hi (B positive definite; held components
    stay 0): projected Newton steps on the free components with a backtracking search."""
    cdef Py_ssize_t i, j, a, b, c, nf, it, ls
    cdef double gmax = 0.0, qmax, v, ms, mn, dq, t
    cdef bint fail, same
    for i in range(n):
        s[i] = 0.0
        if fabs(g[i]) > gmax:
            gmax = fabs(g[i])
    for it in range(30):
        for i in range(n):
            v = g[i]
            for j in range(n):
                v = v + B[i * n + j] * s[j]
            q[i] = v
        nf = 0
        for i in range(n):
            if held[i] or (s[i] <= lo[i] and q[i] > 0.0) or (s[i] >= hi[i] and q[i] < 0.0):
                continue
            free_[nf] = i
            nf += 1
        if nf == 0:
            break
        qmax = 0.0
        for a in range(nf):
            if fabs(q[free_[a]]) > qmax:
                qmax = fabs(q[free_[a]])
        if qmax <= 1e-14 * (1.0 + gmax):
            break
        fail = False
        for a in range(nf):                 # L L' = B over the free components (row-major)
            for b in range(a + 1):
                v = B[free_[a] * n + free_[b]]
                for c in range(b):
                    v = v - L[a * nf + c] * L[b * nf + c]
                if a == b:
                    if not v > 0.0:
                        fail = True
                        break
                    L[a * nf + a] = sqrt(v)
                else:
                    L[a * nf + b] = v / L[b * nf + b]
            if fail:
                break
        for i in range(n):
            d[i] = 0.0
        if fail:                            # rounding lost definiteness: steepest descent
            for a in range(nf):
                d[free_[a]] = -q[free_[a]]
        else:
            for a in range(nf):             # L y = q_F, into sn as scratch
                v = q[free_[a]]
                for c in range(a):
                    v = v - L[a * nf + c] * sn[c]
                sn[a] = v / L[a * nf + a]
            for a in range(nf - 1, -1, -1):  # L' z = y
                v = sn[a]
                for c in range(a + 1, nf):
                    v = v - L[c * nf + a] * sn[c]
                sn[a] = v / L[a * nf + a]
            for a in range(nf):
                d[free_[a]] = -sn[a]
        ms = _model(n, g, B, s)
        t = 1.0
        for ls in range(30):
            for i in range(n):
                sn[i] = min(max(s[i] + t * d[i], lo[i]), hi[i])
            mn = _model(n, g, B, sn)
            dq = 0.0
            for i in range(n):
                dq = dq + q[i] * (sn[i] - s[i])
            if mn <= ms + 1e-4 * dq:
                break
            t = 0.5 * t
        same = True
        for i in range(n):
            if sn[i] != s[i]:
                same = False
            s[i] = sn[i]
        if same:
            break


cdef double _scaled_identity(Py_ssize_t n, const double *g, double radius, double *B) noexcept nogil:
    """B = I times the largest |g_i| over the radius: the first step's Newton step then
    reaches the trust region's edge, as BOBYQA's first steps do."""
    cdef Py_ssize_t i
    cdef double gmax = 0.0
    for i in range(n):
        if fabs(g[i]) > gmax:
            gmax = fabs(g[i])
    gmax = gmax / radius
    if not gmax > 1e-8:
        gmax = 1e-8
    for i in range(n * n):
        B[i] = 0.0
    for i in range(n):
        B[i * n + i] = gmax
    return gmax


cdef int _lmm_value_gradient(void *objective, const double *x, double *f,
                             double *g) except -1:
    return (<LmmObjective> objective).value_gradient(x, f, g)


def trust_region(LmmObjective objective, x0, lower, double radius, double ftol, int maxeval,
                 end=None):
    """The trust-region search of ``_trust_region.trust_region_search`` (its twin) over a compiled
    objective with the exact gradient; ``end`` (optional, 2-by-n float64) receives the
    point the search ended at (the best it kept) and the gradient there, which the
    convergence check then need not compute again.

    Returns
    -------
    xs : (k, n) ndarray
        Every point evaluated (value and gradient), in order.
    fs : (k,) ndarray
        Their values (+inf where the system is singular).
    code : int
        TR_CONVERGED or TR_MAXEVAL.
    """
    if not objective.has_gradient:
        raise ValueError("the objective has no gradient")
    cdef Py_ssize_t n = objective.ntheta, i
    cdef double[::1] x = np.array(x0, dtype=np.float64)
    cdef const double[::1] lower_ = np.ascontiguousarray(lower, dtype=np.float64)
    if x.shape[0] != n or lower_.shape[0] != n or n == 0:
        raise ValueError(f"x0 and lower must have {n} > 0 entries")
    cdef double[:, ::1] end_
    cdef double *g_end = NULL
    if end is not None:
        end_ = end
        if end_.shape[0] != 2 or end_.shape[1] != n:
            raise ValueError(f"end must be 2 by {n}")
        g_end = &end_[1, 0]
    out = trust_region_c(_lmm_value_gradient, <void *> objective, n, &x[0], &lower_[0],
                         radius, ftol, maxeval, g_end)
    if end is not None:
        for i in range(n):
            end_[0, i] = x[i]
    return out


cdef object trust_region_c(value_gradient_t value_gradient, void *context, Py_ssize_t n,
                           double *x, const double *lower_, double radius, double ftol,
                           int maxeval, double *g_end=NULL, const double *b_start=NULL,
                           const Py_ssize_t *nb_start=NULL):
    """``trust_region`` over any compiled value and gradient: ``value_gradient(context,
    x, &f, g)`` (an infinite f where the point has no value); x (n entries, the start)
    is overwritten by the point the search ended at, and g_end (unless NULL) by the
    gradient there. Where b_start is given, the quadratic model starts with its
    nb_start-square block (row-major; both read after the first evaluation, which may
    set them) in its leading rows and columns, the curvature the caller knows there.
    Returns (xs, fs, code) as ``trust_region``."""
    cdef Py_ssize_t i, j
    cdef PointLog st
    cdef int no_memory = _points_open(&st, n, 32)
    # g, gn, B, lo, hi, s, q, d, sn, L, xn, sv, yv, bs
    cdef double *buf = <double *> malloc((11 * n + 3 * n * n) * sizeof(double))
    cdef Py_ssize_t *free_ = <Py_ssize_t *> malloc(n * sizeof(Py_ssize_t))
    cdef char *held = <char *> malloc(n)
    cdef char *near = <char *> malloc(n)
    cdef double *g
    cdef double *gn
    cdef double *B
    cdef double *lo
    cdef double *hi
    cdef double *s
    cdef double *q
    cdef double *d
    cdef double *sn
    cdef double *L
    cdef double *xn
    cdef double *sv
    cdef double *yv
    cdef double *bs
    cdef double f, fn, delta, pred, snorm, fscale, ared, rho, sy, sbs, th, v
    cdef int code = TR_MAXEVAL, escapes = 0, escaped
    cdef bint any_strict, any_near, down
    try:
        if no_memory or buf == NULL or free_ == NULL or held == NULL \
                or near == NULL:
            raise MemoryError()
        g, gn, lo, hi, s, q, d, sn, xn, sv, yv = (buf, buf + n, buf + 2 * n, buf + 3 * n,
                                                  buf + 4 * n, buf + 5 * n, buf + 6 * n,
                                                  buf + 7 * n, buf + 8 * n, buf + 9 * n,
                                                  buf + 10 * n)
        B, L, bs = buf + 11 * n, buf + 11 * n + n * n, buf + 11 * n + 2 * n * n
        for i in range(n):
            held[i] = 0
            if x[i] < lower_[i]:        # a start below its bound moves onto it
                x[i] = lower_[i]
        value_gradient(context, x, &f, g)
        _tr_log(&st, x, f)
        if not isfinite(f):
            if g_end != NULL:           # no gradient to hand on
                for i in range(n):
                    g_end[i] = NAN
            return _tr_result(&st, TR_MAXEVAL)
        _scaled_identity(n, g, radius, B)
        if b_start != NULL and nb_start != NULL and 0 < nb_start[0] <= n:
            for i in range(nb_start[0]):
                for j in range(nb_start[0]):
                    B[i * n + j] = b_start[i * nb_start[0] + j]
        delta = radius
        while st.count < maxeval:
            for i in range(n):
                lo[i] = max(lower_[i] - x[i], -delta)
                hi[i] = delta
            _box_qp(n, g, B, lo, hi, held, s, q, d, sn, L, free_)
            pred = -_model(n, g, B, s)
            snorm = 0.0
            for i in range(n):
                if fabs(s[i]) > snorm:
                    snorm = fabs(s[i])
            fscale = max(1.0, fabs(f))
            escaped = 0
            if snorm == 0.0 or pred <= 1e-3 * ftol * fscale:
                escaped = -1
            else:
                for i in range(n):
                    xn[i] = max(x[i] + s[i], lower_[i])
                value_gradient(context, xn, &fn, gn)
                _tr_log(&st, xn, fn)
                if not isfinite(fn):
                    delta = 0.25 * snorm
                    continue
                # the damped BFGS update (Powell's), with every trial point
                sy = 0.0
                sbs = 0.0
                for i in range(n):
                    sv[i] = xn[i] - x[i]
                    yv[i] = gn[i] - g[i]
                for i in range(n):
                    v = 0.0
                    for j in range(n):
                        v = v + B[i * n + j] * sv[j]
                    bs[i] = v
                for i in range(n):
                    sy = sy + sv[i] * yv[i]
                    sbs = sbs + sv[i] * bs[i]
                if sy <= 0.2 * sbs:
                    th = 0.8 * sbs / (sbs - sy)
                    sy = 0.0
                    for i in range(n):
                        yv[i] = th * yv[i] + (1.0 - th) * bs[i]
                        sy = sy + sv[i] * yv[i]
                for i in range(n):
                    for j in range(n):
                        B[i * n + j] = B[i * n + j] - bs[i] * bs[j] / sbs + yv[i] * yv[j] / sy
                ared = f - fn
                rho = ared / pred
                if rho < 0.25:
                    delta = 0.25 * snorm
                elif rho > 0.75 and snorm >= 0.99 * delta:
                    delta = 2.0 * delta
                if ared > 0.0 and rho > 1e-4:
                    for i in range(n):
                        x[i] = xn[i]
                        g[i] = gn[i]
                    f = fn
                    fscale = max(1.0, fabs(f))
                    if ared <= ftol * fscale and pred <= 10.0 * ftol * fscale:
                        escaped = -1
            if escaped == 0:
                continue
            code = TR_CONVERGED
            if escapes >= 2 or st.count >= maxeval:
                break
            escapes += 1
            # a bounded component within 0.01 of its bound: onto the bound where that is
            # no worse (and held there), else off it to 0.01 where the objective falls
            # there (see _trust_region.trust_region_search)
            any_strict = any_near = False
            for i in range(n):
                near[i] = isfinite(lower_[i]) and x[i] < lower_[i] + 0.01
                any_near = any_near or near[i]
                any_strict = any_strict or (near[i] and x[i] > lower_[i])
            if any_strict:
                for i in range(n):
                    xn[i] = lower_[i] if (near[i] and x[i] > lower_[i]) else x[i]
                value_gradient(context, xn, &fn, gn)
                _tr_log(&st, xn, fn)
                if fn <= f:
                    for i in range(n):
                        if near[i] and x[i] > lower_[i]:
                            held[i] = 1
                        x[i] = xn[i]
                        g[i] = gn[i]
                    f = fn
                    code = TR_MAXEVAL
                    continue
            if any_near:
                for i in range(n):
                    xn[i] = lower_[i] + 0.01 if near[i] else x[i]
                value_gradient(context, xn, &fn, gn)
                _tr_log(&st, xn, fn)
                down = fn < f
                for i in range(n):
                    if near[i] and gn[i] < 0.0:
                        down = True
                if isfinite(fn) and down:
                    for i in range(n):
                        x[i] = xn[i]
                        g[i] = gn[i]
                        held[i] = 0
                    f = fn
                    _scaled_identity(n, g, radius, B)
                    delta = radius
                    code = TR_MAXEVAL
                    continue
            break
        if g_end != NULL:
            memcpy(g_end, g, n * sizeof(double))
        return _tr_result(&st, code)
    finally:
        free(st.xs)
        free(st.fs)
        free(buf)
        free(free_)
        free(held)
        free(near)


cdef object _tr_result(PointLog *st, int code):
    xs, fs = _points_arrays(st)
    return xs, fs, code

# cython: boundscheck=False, wraparound=False, cdivision=True
"""Small dense linear algebra without LAPACK.

A small-model fit runs cold in the benchmark (the process sleeps between fits, so caches
and TLBs are flushed), and then every distinct library C path it touches costs tens of
microseconds: NumPy's LAPACK gufunc QR about 90 µs, each of SciPy's f2py LAPACK wrappers
about 50 µs, where the arithmetic on a 180 by 2 design or a 3 by 3 Hessian takes a
microsecond. The same algorithms written out here are a few hundred bytes of code each:

- :func:`householder_qr`: LAPACK's unblocked Householder QR (``dgeqr2``, reflectors by
  ``dlarfg``, so the signs of R's diagonal are LAPACK's) and the explicit Q by backward
  accumulation (``dorg2r``); ``numpy.linalg.qr`` (reduced) to rounding. For p ≤ 128
  LAPACK's ``dgeqrf``/``dorgqr`` run these same unblocked algorithms.
- :func:`convergence_numbers`: the numbers of ``_derivs._check`` (its NumPy/LAPACK twin,
  ``_derivs._check_python``) in one call: Cholesky (``dpotrf``), the triangular solve
  (``dtrtrs``) and the eigenvalues of the Hessian's free block by cyclic Jacobi rotations
  (where ``dsyev`` tridiagonalizes and runs implicit QL/QR: equal to rounding).
- :func:`cholesky_lower`: ``dpotrf``'s lower factor, or None.
"""
from libc.math cimport sqrt, fabs, isfinite, isnan, copysign, frexp, ldexp, NAN
from libc.float cimport DBL_MIN, DBL_MAX, DBL_EPSILON
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

import numpy as np
cimport numpy as cnp

cnp.import_array()

# LAPACK's safe minimum for dlarfg: dlamch('S') / dlamch('E'), eps the unit roundoff
cdef double SAFMIN = DBL_MIN / (0.5 * DBL_EPSILON)

# Enough for a matrix of any size these kernels take: Jacobi's sweeps converge
# quadratically (a sweep or two after the off-diagonal part first falls below the
# diagonal's spread; 6-10 sweeps in all for n up to 40).
cdef enum:
    MAX_SWEEPS = 60


# -- vector helpers: four partial sums, so the compiler can keep several multiply-adds in
# flight (OpenBLAS's kernels sum in another order too: equal to rounding) ------------------

cdef inline double _dot(const double *x, const double *y, Py_ssize_t m) noexcept nogil:
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t i = 0
    while i + 4 <= m:
        s0 += x[i] * y[i]
        s1 += x[i + 1] * y[i + 1]
        s2 += x[i + 2] * y[i + 2]
        s3 += x[i + 3] * y[i + 3]
        i += 4
    while i < m:
        s0 += x[i] * y[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef inline void _axpy(double alpha, const double *x, double *y, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(m):
        y[i] += alpha * x[i]


cdef inline void _scal(double alpha, double *x, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(m):
        x[i] *= alpha


cdef double _nrm2(const double *x, Py_ssize_t m) noexcept nogil:
    """‖x‖₂ of finite x: the plain sum of squares, rescaled only where that under- or
    overflowed (as dnrm2 guards against)."""
    cdef double s = _dot(x, x, m), amax = 0.0, t
    cdef Py_ssize_t i
    # above 1e-280 the squares lost below the normal range are < 1e-300 of the sum
    if s >= 1e-280 and s <= DBL_MAX:
        return sqrt(s)
    for i in range(m):
        if fabs(x[i]) > amax:
            amax = fabs(x[i])
    if amax == 0.0:
        return 0.0
    s = 0.0
    for i in range(m):
        t = x[i] / amax
        s += t * t
    return amax * sqrt(s)


cdef inline double _lapy2(double x, double y) noexcept nogil:
    """sqrt(x² + y²) without overflow, as LAPACK's dlapy2."""
    cdef double xa = fabs(x), ya = fabs(y), w, z
    w = xa if xa > ya else ya
    z = ya if xa > ya else xa
    if z == 0.0 or w > DBL_MAX:
        return w
    return w * sqrt(1.0 + (z / w) * (z / w))


# -- Householder QR -------------------------------------------------------------------------

cdef double _larfg(Py_ssize_t nn, double *alpha, double *x) noexcept nogil:
    """LAPACK's dlarfg: H (alpha; x) = (beta; 0) with H = I - tau (1; v)(1; v)'; alpha
    becomes beta (of the sign opposite to alpha's), x becomes v; returns tau."""
    cdef Py_ssize_t m = nn - 1
    cdef int knt = 0, j
    cdef double xnorm, beta, tau, a = alpha[0], rsafmn
    if nn <= 1:
        return 0.0
    xnorm = _nrm2(x, m)
    if xnorm == 0.0:
        return 0.0
    beta = -copysign(_lapy2(a, xnorm), a)
    if fabs(beta) < SAFMIN:
        # xnorm and beta may be inaccurate: scale x up and recompute them
        rsafmn = 1.0 / SAFMIN
        while True:
            knt += 1
            _scal(rsafmn, x, m)
            beta *= rsafmn
            a *= rsafmn
            if not (fabs(beta) < SAFMIN and knt < 20):
                break
        xnorm = _nrm2(x, m)
        beta = -copysign(_lapy2(a, xnorm), a)
    tau = (beta - a) / beta
    _scal(1.0 / (a - beta), x, m)
    for j in range(knt):
        beta *= SAFMIN
    alpha[0] = beta
    return tau


cdef inline void _apply_reflector(const double *v, double tau, double *a, Py_ssize_t n,
                                  Py_ssize_t m, Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """(I - tau v v') applied to columns j0..j1-1 of a (column j at a + j n), rows given
    by the m entries from v's offset (dlarf: w = A'v, then A -= tau v w')."""
    cdef Py_ssize_t k
    cdef double w
    if tau == 0.0:
        return
    for k in range(j0, j1):
        w = _dot(v, a + k * n, m)
        _axpy(-(tau * w), v, a + k * n, m)


cdef void householder_qr_c(double *a, Py_ssize_t n, Py_ssize_t p, double *r,
                           double *work) noexcept nogil:
    cdef Py_ssize_t i, j, k
    cdef double *col
    cdef double diag, tau
    # dgeqr2: reflector j from column j's rows j.., applied to the columns after it
    for j in range(p):
        col = a + j * n
        tau = _larfg(n - j, col + j, col + j + 1)
        work[j] = tau
        if j + 1 < p:
            diag = col[j]
            col[j] = 1.0
            _apply_reflector(col + j, tau, a + j, n, n - j, j + 1, p)
            col[j] = diag
    for i in range(p):
        for k in range(p):
            r[i * p + k] = a[k * n + i] if k >= i else 0.0
    # dorg2r: Q = H(0) ... H(p-1) applied to the first p columns of I, from the last
    # reflector back, in the storage of the reflectors
    for i in range(p - 1, -1, -1):
        col = a + i * n
        tau = work[i]
        if i + 1 < p:
            col[i] = 1.0
            _apply_reflector(col + i, tau, a + i, n, n - i, i + 1, p)
        _scal(-tau, col + i + 1, n - i - 1)
        col[i] = 1.0 - tau
        for k in range(i):
            col[k] = 0.0


def householder_qr(cnp.ndarray X not None):
    """The reduced Householder QR of a finite float64 matrix with n ≥ p ≥ 1.

    Parameters
    ----------
    X : (n, p) float64 ndarray, native byte order, any strides

    Returns
    -------
    (q, r) or None
        q (n, p) and r (p, p) upper triangular, both C-contiguous, as
        ``numpy.linalg.qr(X)`` gives them to rounding; None where X has an inf or nan
        entry (NumPy's LAPACK path then decides what that gives).
    """
    if (cnp.PyArray_TYPE(X) != cnp.NPY_DOUBLE or cnp.PyArray_NDIM(X) != 2
            or not cnp.PyArray_ISNOTSWAPPED(X)):
        raise TypeError("X must be a 2-d float64 array in native byte order")
    cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), p = cnp.PyArray_DIM(X, 1), i, j
    if not (n >= p >= 1):
        raise ValueError("householder_qr takes n >= p >= 1")
    cdef Py_ssize_t rs = cnp.PyArray_STRIDE(X, 0), cs = cnp.PyArray_STRIDE(X, 1)
    cdef const char *xp = <const char *> cnp.PyArray_DATA(X)
    cdef double *a = <double *> malloc((n * p + p) * sizeof(double))
    if a == NULL:
        raise MemoryError()
    cdef double check = 0.0
    cdef cnp.npy_intp qdims[2]
    cdef cnp.npy_intp rdims[2]
    cdef cnp.ndarray q, r
    cdef double *qp
    try:
        # by columns: each reflector and each column it meets is contiguous
        for j in range(p):
            for i in range(n):
                a[j * n + i] = (<const double *> (xp + i * rs + j * cs))[0]
        for i in range(n * p):
            check += a[i] * 0.0          # nan once any entry is inf or nan
        if check != 0.0:
            return None
        qdims[0] = n
        qdims[1] = p
        rdims[0] = p
        rdims[1] = p
        q = cnp.PyArray_EMPTY(2, qdims, cnp.NPY_DOUBLE, 0)
        r = cnp.PyArray_EMPTY(2, rdims, cnp.NPY_DOUBLE, 0)
        with nogil:
            householder_qr_c(a, n, p, <double *> cnp.PyArray_DATA(r), a + n * p)
            qp = <double *> cnp.PyArray_DATA(q)
            for i in range(n):
                for j in range(p):
                    qp[i * p + j] = a[j * n + i]
        return q, r
    finally:
        free(a)


# -- Cholesky, triangular solve, Jacobi eigenvalues -----------------------------------------

cdef int cholesky_lower_c(const double *a, Py_ssize_t n, double *L) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef double s, ljj, rinv
    for j in range(n):
        s = a[j * n + j] - _dot(L + j * n, L + j * n, j)
        # a nan pivot is no more positive than a negative one
        if not s > 0.0:
            return <int> j + 1
        ljj = sqrt(s)
        L[j * n + j] = ljj
        rinv = 1.0 / ljj                 # dpotf2 scales by the reciprocal
        for i in range(j + 1, n):
            L[i * n + j] = (a[i * n + j] - _dot(L + i * n, L + j * n, j)) * rinv
        for i in range(j + 1, n):
            L[j * n + i] = 0.0
    return 0


cdef void solve_lower_transposed_c(const double *L, Py_ssize_t n, double *x) noexcept nogil:
    cdef Py_ssize_t i, k
    cdef double s
    for i in range(n - 1, -1, -1):
        s = x[i]
        for k in range(i + 1, n):
            s -= L[k * n + i] * x[k]
        x[i] = s / L[i * n + i]


cdef int symmetric_eigenvalues_c(double *a, Py_ssize_t n, double *w) noexcept nogil:
    cdef Py_ssize_t i, pp, qq, rr
    cdef int sweep, e = 0, rotated
    cdef double amax = 0.0, apq, app, aqq, theta, t, c, s, tau, h, g, hh
    for i in range(n * n):
        if fabs(a[i]) > amax:
            amax = fabs(a[i])
    if amax == 0.0:
        for i in range(n):
            w[i] = 0.0
        return 0
    # by a power of two (exact): the rotation formulas below neither over- nor underflow
    frexp(amax, &e)
    for i in range(n * n):
        a[i] = ldexp(a[i], -e)
    for sweep in range(MAX_SWEEPS):
        rotated = 0
        for pp in range(n - 1):
            for qq in range(pp + 1, n):
                apq = a[pp * n + qq]
                app = a[pp * n + pp]
                aqq = a[qq * n + qq]
                # below this an off-diagonal entry moves no eigenvalue by more than a
                # rounding of the diagonal entries it couples (Demmel and Veselić's test,
                # which keeps small eigenvalues of a definite matrix to relative accuracy)
                if fabs(apq) <= 0.5 * DBL_EPSILON * sqrt(fabs(app) * fabs(aqq)) \
                        or fabs(apq) < 1e-300:
                    continue
                rotated = 1
                # the rotation that zeros a[p, q] (Rutishauser's formulas, as in
                # Numerical Recipes' jacobi)
                theta = 0.5 * (aqq - app) / apq
                if fabs(theta) > 1e150:
                    t = 0.5 / theta
                else:
                    t = 1.0 / (fabs(theta) + sqrt(1.0 + theta * theta))
                    if theta < 0.0:
                        t = -t
                c = 1.0 / sqrt(1.0 + t * t)
                s = t * c
                tau = s / (1.0 + c)
                h = t * apq
                a[pp * n + pp] = app - h
                a[qq * n + qq] = aqq + h
                a[pp * n + qq] = 0.0
                a[qq * n + pp] = 0.0
                for rr in range(n):
                    if rr == pp or rr == qq:
                        continue
                    g = a[rr * n + pp]
                    hh = a[rr * n + qq]
                    g, hh = g - s * (hh + g * tau), hh + s * (g - hh * tau)
                    a[rr * n + pp] = g
                    a[pp * n + rr] = g
                    a[rr * n + qq] = hh
                    a[qq * n + rr] = hh
        if not rotated:
            for i in range(n):
                w[i] = ldexp(a[i * n + i], e)
            return 0
    return 1


cdef inline double _read2(const char *base, Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t i,
                          Py_ssize_t j) noexcept nogil:
    return (<const double *> (base + i * s0 + j * s1))[0]


cdef int _check_float64(cnp.ndarray arr, int ndim, str name) except -1:
    if (cnp.PyArray_TYPE(arr) != cnp.NPY_DOUBLE or cnp.PyArray_NDIM(arr) != ndim
            or not cnp.PyArray_ISNOTSWAPPED(arr)):
        raise TypeError(f"{name} must be a {ndim}-d float64 array in native byte order")
    return 0


cdef Py_ssize_t _square(cnp.ndarray a) except -1:
    """The order of a square float64 matrix (TypeError or ValueError otherwise)."""
    _check_float64(a, 2, "a")
    if cnp.PyArray_DIM(a, 1) != cnp.PyArray_DIM(a, 0):
        raise ValueError("a must be square")
    return cnp.PyArray_DIM(a, 0)


def cholesky_lower(cnp.ndarray a not None):
    """The lower Cholesky factor of a square float64 matrix (its lower triangle read),
    zeros above the diagonal, Fortran-ordered as LAPACK's dpotrf leaves it; None where
    the matrix is not positive definite (a nan pivot included)."""
    cdef Py_ssize_t n = _square(a), i, j
    cdef Py_ssize_t s0 = cnp.PyArray_STRIDE(a, 0), s1 = cnp.PyArray_STRIDE(a, 1)
    cdef const char *ap = <const char *> cnp.PyArray_DATA(a)
    cdef double *buf = <double *> malloc((n * n + 1) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    cdef int info
    cdef cnp.ndarray out
    cdef double *op
    cdef cnp.npy_intp dims[2]
    dims[0] = n
    dims[1] = n
    try:
        for i in range(n):
            for j in range(i + 1):
                buf[i * n + j] = _read2(ap, s0, s1, i, j)
        info = cholesky_lower_c(buf, n, buf)
        if info != 0:
            return None
        # Fortran order: the transpose of the row-major factor, laid out by rows
        out = cnp.PyArray_EMPTY(2, dims, cnp.NPY_DOUBLE, 1)
        op = <double *> cnp.PyArray_DATA(out)
        for i in range(n):
            for j in range(n):
                op[j * n + i] = buf[i * n + j]
        return out
    finally:
        free(buf)


def cholesky_solve(cnp.ndarray a not None, cnp.ndarray b not None):
    """LAPACK's dposv of a square float64 matrix (lower triangle read) and a vector:
    ``(x, info)``, x = a⁻¹b where info == 0, else info = j + 1 for the first pivot j that
    is not positive (and x is b)."""
    _check_float64(a, 2, "a")
    _check_float64(b, 1, "b")
    cdef Py_ssize_t n = cnp.PyArray_DIM(a, 0), i, j, k
    if cnp.PyArray_DIM(a, 1) != n or cnp.PyArray_DIM(b, 0) != n:
        raise ValueError("a must be square and b as long as a")
    cdef Py_ssize_t s0 = cnp.PyArray_STRIDE(a, 0), s1 = cnp.PyArray_STRIDE(a, 1)
    cdef Py_ssize_t bs = cnp.PyArray_STRIDE(b, 0)
    cdef const char *ap = <const char *> cnp.PyArray_DATA(a)
    cdef const char *bp = <const char *> cnp.PyArray_DATA(b)
    cdef double *buf = <double *> malloc((n * n + 1) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    cdef cnp.npy_intp dim = n
    cdef cnp.ndarray x = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_DOUBLE, 0)
    cdef double *xp = <double *> cnp.PyArray_DATA(x)
    cdef double s
    cdef int info
    try:
        for i in range(n):
            xp[i] = (<const double *> (bp + i * bs))[0]
            for j in range(i + 1):
                buf[i * n + j] = _read2(ap, s0, s1, i, j)
        info = cholesky_lower_c(buf, n, buf)
        if info == 0:
            for i in range(n):                 # L y = b
                s = xp[i]
                for k in range(i):
                    s -= buf[i * n + k] * xp[k]
                xp[i] = s / buf[i * n + i]
            solve_lower_transposed_c(buf, n, xp)
        return x, info
    finally:
        free(buf)


def symmetric_eigenvalues(cnp.ndarray a not None):
    """The eigenvalues of a symmetric float64 matrix (both triangles read: symmetrize
    first), ascending, by cyclic Jacobi rotations; LinAlgError if they do not converge."""
    cdef Py_ssize_t n = _square(a), i, j
    cdef Py_ssize_t s0 = cnp.PyArray_STRIDE(a, 0), s1 = cnp.PyArray_STRIDE(a, 1)
    cdef const char *ap = <const char *> cnp.PyArray_DATA(a)
    cdef double *buf = <double *> malloc((n * n + n + 1) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    cdef int status
    try:
        for i in range(n):
            for j in range(n):
                buf[i * n + j] = _read2(ap, s0, s1, i, j)
        status = symmetric_eigenvalues_c(buf, n, buf + n * n)
        if status != 0:
            raise np.linalg.LinAlgError("Jacobi eigenvalue iteration did not converge")
        return np.sort(np.array([buf[n * n + i] for i in range(n)], dtype=np.float64))
    finally:
        free(buf)


# -- the convergence check's numbers --------------------------------------------------------

# convergence_numbers' status
NO_FREE = 0          # every parameter on its bound: nothing to check
NOT_FINITE = 1       # k: the parameters with an inf or nan derivative
NOT_DEFINITE = 2     # k, value: argmax and max of |g| over the free parameters
DEFINITE = 3         # k, value: argmax and max of min(|s|, |g|)
NO_EIGENVALUES = 4   # the Jacobi sweeps ran out (LAPACK's dsyev info != 0)


def convergence_numbers(cnp.ndarray g not None, cnp.ndarray H not None, boundary,
                        double hess_tol):
    """What ``_derivs._check`` computes, in one call (its twin: ``_check_python``).

    Parameters
    ----------
    g : (n,) float64 ndarray
    H : (n, n) float64 ndarray (symmetrized here, as 0.5 (H + H'))
    boundary : (n,) bool ndarray or None
        Parameters on a bound, left out.
    hess_tol : float
        Eigenvalues below -hess_tol are counted.

    Returns
    -------
    (scaled, status, k, value, lo, hi, neg)
        scaled: (n,) the solution s of R s = g (H = R'R over the free parameters), nan for
        the others and everywhere unless status is DEFINITE. status: see the constants
        above. k: an index into g (a list of indices for NOT_FINITE). lo, hi: the smallest
        and largest eigenvalue of the free block, neg: how many are below -hess_tol (for
        NOT_DEFINITE and DEFINITE).
    """
    _check_float64(g, 1, "g")
    _check_float64(H, 2, "H")
    cdef Py_ssize_t n = cnp.PyArray_DIM(g, 0), i, j, nf = 0, k = 0
    if cnp.PyArray_DIM(H, 0) != n or cnp.PyArray_DIM(H, 1) != n:
        raise ValueError("H must be n by n for n entries of g")
    cdef cnp.ndarray b
    cdef const char *bp = NULL
    cdef Py_ssize_t bs = 0
    if boundary is not None:
        b = boundary
        if (cnp.PyArray_TYPE(b) != cnp.NPY_BOOL or cnp.PyArray_NDIM(b) != 1
                or cnp.PyArray_DIM(b, 0) != n):
            raise TypeError("boundary must be a 1-d bool array as long as g")
        bp = <const char *> cnp.PyArray_DATA(b)
        bs = cnp.PyArray_STRIDE(b, 0)
    cdef Py_ssize_t gs = cnp.PyArray_STRIDE(g, 0)
    cdef Py_ssize_t s0 = cnp.PyArray_STRIDE(H, 0), s1 = cnp.PyArray_STRIDE(H, 1)
    cdef const char *gp = <const char *> cnp.PyArray_DATA(g)
    cdef const char *hp = <const char *> cnp.PyArray_DATA(H)
    cdef cnp.npy_intp dim = n
    cdef cnp.ndarray scaled = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_DOUBLE, 0)
    cdef double *sp = <double *> cnp.PyArray_DATA(scaled)
    for i in range(n):
        sp[i] = NAN
    # index (nf), gf (nf), Hf (nf²), L (nf²), s (nf), eigenvalues (nf)
    cdef Py_ssize_t *index = <Py_ssize_t *> malloc((n + 1) * sizeof(Py_ssize_t))
    cdef double *buf = <double *> malloc((2 * n * n + 3 * n + 1) * sizeof(double))
    if index == NULL or buf == NULL:
        free(index)
        free(buf)
        raise MemoryError()
    cdef double *gf
    cdef double *Hf
    cdef double *L
    cdef double *sf
    cdef double *eig
    cdef double best = 0.0, c, a_s, a_g, lo, hi
    cdef int info, chol_info, neg = 0
    cdef bint ok
    try:
        for i in range(n):
            if bp == NULL or not (<const char *> (bp + i * bs))[0]:
                index[nf] = i
                nf += 1
        if nf == 0:
            return scaled, NO_FREE, 0, 0.0, 0.0, 0.0, 0
        gf = buf
        Hf = gf + nf
        L = Hf + nf * nf
        sf = L + nf * nf
        eig = sf + nf
        for i in range(nf):
            gf[i] = (<const double *> (gp + index[i] * gs))[0]
            for j in range(nf):
                # as NumPy's 0.5 * (Hf + Hf.T): the same operations, so the same
                # overflow to inf
                Hf[i * nf + j] = 0.5 * (_read2(hp, s0, s1, index[i], index[j])
                                        + _read2(hp, s0, s1, index[j], index[i]))
        # parameters with an inf or nan derivative (their row of Hf, which is their column)
        bad = None
        for i in range(nf):
            ok = isfinite(gf[i])
            for j in range(nf):
                ok = ok and isfinite(Hf[i * nf + j])
            if not ok:
                if bad is None:
                    bad = []
                bad.append(index[i])
        if bad is not None:
            return scaled, NOT_FINITE, bad, 0.0, 0.0, 0.0, 0
        with nogil:
            chol_info = cholesky_lower_c(Hf, nf, L)
            if chol_info == 0:
                memcpy(sf, gf, nf * sizeof(double))
                solve_lower_transposed_c(L, nf, sf)
                # argmax of np.minimum(|s|, |g|) as NumPy's: the first nan (np.minimum
                # gives nan where either is), else the first maximum
                for i in range(nf):
                    a_s = fabs(sf[i])
                    a_g = fabs(gf[i])
                    if isnan(a_s) or isnan(a_g):
                        k = i
                        best = a_s + a_g
                        break
                    c = a_s if a_s < a_g else a_g
                    if i == 0 or c > best:
                        k = i
                        best = c
                for i in range(nf):
                    sp[index[i]] = sf[i]
            else:
                k = 0
                best = fabs(gf[0])
                for i in range(1, nf):
                    if fabs(gf[i]) > best:
                        k = i
                        best = fabs(gf[i])
            info = symmetric_eigenvalues_c(Hf, nf, eig)
        if info != 0:
            return scaled, NO_EIGENVALUES, 0, 0.0, 0.0, 0.0, 0
        lo = eig[0]
        hi = eig[0]
        for i in range(nf):
            if eig[i] < lo:
                lo = eig[i]
            if eig[i] > hi:
                hi = eig[i]
            if eig[i] < -hess_tol:
                neg += 1
        return (scaled, DEFINITE if chol_info == 0 else NOT_DEFINITE, index[k], best,
                lo, hi, neg)
    finally:
        free(index)
        free(buf)


# -- the fixed-effects basis of a small X (its twin: _fixed.FixedEffectsBasis._from_qr's
# Python-float path, with _fixed._upper_inverse and _fixed._rows_far_from_aliased) ---------

# Up to this many columns, as the Python floats it stands for (_fixed._FLOAT_BASIS_MAX)
cdef enum:
    _BASIS_MAX = 8

BASIS_MAX_COLUMNS = _BASIS_MAX


def fixed_basis(cnp.ndarray r not None, cnp.ndarray q not None, double scale,
                double near_alias):
    """R̃, R̃⁻¹, |diag R̃| and the near-alias verdict of ``_fixed.FixedEffectsBasis`` from
    X's QR, with q scaled to X̃ = √n Q in place: one call where the Python floats cost a
    cold fit ~250 interpreted lines for four columns.

    The same IEEE operations in the same order as the Python floats (this module is
    built without FMA contraction), so the same numbers bit for bit, signed zeros
    included: R̃ = (r · sign(r_ii)) / scale by rows; R̃⁻¹ column by column from the last
    row up, as ``_blocked.upper_solve``; column j clearly far from aliased when
    |R̃_jj| > (2 near_alias) √(Σ_{i≤j} R̃_ij²), the sum from i = 0.

    Parameters
    ----------
    r : (p, p) float64 ndarray, 1 ≤ p ≤ BASIS_MAX_COLUMNS, any strides
    q : (n, p) float64 ndarray, C-contiguous and writeable: overwritten by q · (signs ·
        scale)
    scale : √n
    near_alias : ``_fixed.NEAR_ALIAS``

    Returns
    -------
    (R, Rinv, absdiag, far) or None
        None, with q untouched, where the arguments are not of that kind or R has a zero
        on its diagonal (where the caller's solve raises).
    """
    if (cnp.PyArray_TYPE(r) != cnp.NPY_DOUBLE or cnp.PyArray_NDIM(r) != 2
            or not cnp.PyArray_ISNOTSWAPPED(r)
            or cnp.PyArray_TYPE(q) != cnp.NPY_DOUBLE or cnp.PyArray_NDIM(q) != 2
            or not cnp.PyArray_ISNOTSWAPPED(q) or not cnp.PyArray_IS_C_CONTIGUOUS(q)
            or not cnp.PyArray_ISWRITEABLE(q)):
        return None
    cdef Py_ssize_t p = cnp.PyArray_DIM(r, 0), n = cnp.PyArray_DIM(q, 0), i, j, k
    if (cnp.PyArray_DIM(r, 1) != p or cnp.PyArray_DIM(q, 1) != p or p < 1
            or p > _BASIS_MAX):
        return None
    cdef Py_ssize_t s0 = cnp.PyArray_STRIDE(r, 0), s1 = cnp.PyArray_STRIDE(r, 1)
    cdef const char *rp = <const char *> cnp.PyArray_DATA(r)
    cdef double signs[_BASIS_MAX]
    cdef double colscale[_BASIS_MAX]
    cdef double s, norm2, threshold = 2.0 * near_alias
    for i in range(p):
        s = _read2(rp, s0, s1, i, i)
        signs[i] = -1.0 if s < 0 else 1.0
        if (s * signs[i]) / scale == 0.0:
            return None
    cdef cnp.npy_intp dims[2]
    dims[0] = p
    dims[1] = p
    cdef cnp.ndarray R = cnp.PyArray_EMPTY(2, dims, cnp.NPY_DOUBLE, 0)
    cdef cnp.ndarray Rinv = cnp.PyArray_EMPTY(2, dims, cnp.NPY_DOUBLE, 0)
    cdef cnp.ndarray absdiag = cnp.PyArray_EMPTY(1, dims, cnp.NPY_DOUBLE, 0)
    cdef double *Rd = <double *> cnp.PyArray_DATA(R)
    cdef double *Rid = <double *> cnp.PyArray_DATA(Rinv)
    cdef double *ad = <double *> cnp.PyArray_DATA(absdiag)
    cdef double *qd = <double *> cnp.PyArray_DATA(q)
    cdef bint far = True
    with nogil:
        for i in range(p):
            for j in range(p):
                Rd[i * p + j] = (_read2(rp, s0, s1, i, j) * signs[i]) / scale
            ad[i] = fabs(Rd[i * p + i])
        # column j of R̃⁻¹ = R̃⁻¹ e_j, in place in its column of Rinv; every entry
        # computed, the zeros below the diagonal too (their signs are the solve's)
        for j in range(p):
            for i in range(p):
                Rid[i * p + j] = 0.0
            Rid[j * p + j] = 1.0
            for i in range(p - 1, -1, -1):
                s = Rid[i * p + j]
                for k in range(i + 1, p):
                    s -= Rd[i * p + k] * Rid[k * p + j]
                Rid[i * p + j] = s / Rd[i * p + i]
        for j in range(p):
            norm2 = 0.0
            for i in range(j + 1):
                norm2 += Rd[i * p + j] * Rd[i * p + j]
            if not ad[j] > threshold * sqrt(norm2):
                far = False
                break
        for j in range(p):
            colscale[j] = signs[j] * scale
        for i in range(n):
            for j in range(p):
                qd[i * p + j] *= colscale[j]
    return R, Rinv, absdiag, far


# -- the convergence check's arithmetic around its gradients (twins: _optimize's
# _forward_hessian_floats and _hessian_steps_floats) ------------------------------------

cdef inline double _as_double(object v) except? -1.0:
    # float(v): a Python float read directly, anything else through float()
    if type(v) is float:
        return <double> v
    return <double> float(v)


cdef cnp.ndarray _float_vector(object v):
    """v itself where it is a 1-d float64 ndarray in native order, else
    np.asarray(v, dtype=float)."""
    if (type(v) is np.ndarray and cnp.PyArray_TYPE(<cnp.ndarray> v) == cnp.NPY_DOUBLE
            and cnp.PyArray_NDIM(<cnp.ndarray> v) == 1
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray> v)):
        return <cnp.ndarray> v
    return np.asarray(v, dtype=float)


cdef inline double _at(cnp.ndarray v, Py_ssize_t i) noexcept:
    return (<const double *> (<const char *> cnp.PyArray_DATA(v)
                              + i * cnp.PyArray_STRIDE(v, 0)))[0]


def forward_hessian(value_and_grad, cnp.ndarray x not None, cnp.ndarray step not None,
                    grad, Py_ssize_t k, known):
    """``_optimize.gradient_hessian``'s forward stencil with g(x) known, in one call: its
    twin ``_optimize._forward_hessian_floats`` (the same operations on the same numbers,
    so the same Hessian bit for bit). ``value_and_grad`` is called at x + h_i e_i for
    i ≥ k with a fresh float64 array, as the twin calls it.

    Returns (Hessian, gradient evaluations spent), or None where a step is zero (or the
    arguments are not 1-d float64 arrays of one length: the caller's path then).
    """
    if (cnp.PyArray_TYPE(x) != cnp.NPY_DOUBLE or cnp.PyArray_NDIM(x) != 1
            or not cnp.PyArray_ISNOTSWAPPED(x)
            or cnp.PyArray_TYPE(step) != cnp.NPY_DOUBLE or cnp.PyArray_NDIM(step) != 1
            or not cnp.PyArray_ISNOTSWAPPED(step)):
        return None
    cdef Py_ssize_t n = cnp.PyArray_DIM(x, 0), i, r, c
    if cnp.PyArray_DIM(step, 0) != n or k < 0:
        return None
    cdef cnp.ndarray g0 = _float_vector(grad)
    if cnp.PyArray_NDIM(g0) != 1 or cnp.PyArray_DIM(g0, 0) < n:
        return None
    for i in range(k, n):
        if _at(step, i) == 0.0:
            return None
    cdef cnp.npy_intp dims[2]
    dims[0] = n
    dims[1] = n
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(2, dims, cnp.NPY_DOUBLE, 0)
    cdef double *hess = <double *> malloc((n * n + 1) * sizeof(double))
    if hess == NULL:
        raise MemoryError()
    cdef cnp.ndarray point, gi
    cdef double *pt
    cdef double *hp = <double *> cnp.PyArray_DATA(out)
    cdef double h
    try:
        for i in range(k, n):
            point = cnp.PyArray_EMPTY(1, dims, cnp.NPY_DOUBLE, 0)
            pt = <double *> cnp.PyArray_DATA(point)
            # x + e: the entries off the stepped one are x + 0.0 (-0.0 becomes 0.0)
            for r in range(n):
                pt[r] = _at(x, r) + 0.0
            pt[i] = _at(x, i) + _at(step, i)
            gi = _float_vector(value_and_grad(point)[1])
            if cnp.PyArray_NDIM(gi) != 1:
                raise TypeError("the gradient must be a vector")
            if cnp.PyArray_DIM(gi, 0) < n:
                raise IndexError("list index out of range")
            h = _at(step, i)
            for r in range(n):
                hess[r * n + i] = (_at(gi, r) - _at(g0, r)) / h
        if k:
            block = known[1]
            if isinstance(block, np.ndarray):
                block = block.tolist()
            for r in range(k):
                row = block[r]
                for c in range(k):
                    hess[r * n + c] = _as_double(row[c])
            for r in range(k, n):
                for c in range(k):
                    hess[r * n + c] = hess[c * n + r]
        for r in range(n):
            for c in range(n):
                hp[r * n + c] = 0.5 * (hess[r * n + c] + hess[c * n + r])
        return out, n - k
    finally:
        free(hess)


def hessian_steps(x, beta_se):
    """``_optimize.hessian_steps`` in one call (its twin: ``_hessian_steps_floats``, the
    same operations on the same numbers): 1e-3 · max(0.05, |x_i|), NaN kept, and
    0.05 se_i where se_i (``beta_se``, a list or an array, or None) is finite and
    positive."""
    cdef cnp.ndarray xv = _float_vector(x)
    if cnp.PyArray_NDIM(xv) != 1:
        xv = xv.reshape(-1)
    cdef Py_ssize_t n = cnp.PyArray_DIM(xv, 0), i, m
    cdef cnp.npy_intp dim = n
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_DOUBLE, 0)
    cdef double *op = <double *> cnp.PyArray_DATA(out)
    cdef double a, s
    for i in range(n):
        a = fabs(_at(xv, i))
        op[i] = 1e-3 * (0.05 if 0.05 >= a else a)
    if beta_se is not None:
        se = beta_se if isinstance(beta_se, list) else \
            np.asarray(beta_se, dtype=float).tolist()
        m = len(se)
        for i in range(m if m < n else n):
            s = _as_double(se[i])
            if isfinite(s) and s > 0:
                op[i] = 0.05 * s
    return out

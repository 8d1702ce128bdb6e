# cython: language_level=3
"""Kernels of the blocked system  M = Λ'Z'WZΛ + I  and the products that feed it.

Design. Every random-effects term t has k_t columns and nlev_t levels, and each row of
the data belongs to exactly one level of every term, so Z'WZ is made of small dense
blocks: one k_r-by-k_c block per pair of (term, level) that share a row. The blocks are
stored flat (column-major each) in ``avals``; ``rowoff[p, i]`` says where row i adds to
the block of term pair p. Λ is block diagonal with one lower-triangular k_t-by-k_t
template T_t per term, so each block of M is T_r' A T_c, written through the index map
``pos`` straight into the values array that the CHOLMOD factor borrows (-1 marks the
strict upper half of a diagonal block, which the lower-triangle CSC does not hold).

For a model with a single term, M is block diagonal: ``blockdiag_*`` factor and solve it
level by level with no sparse machinery at all.

Each kernel writes into caller-allocated arrays and runs without the GIL; its NumPy twin
is in _twins.py and tests/test_blocked.py holds the two together.
"""
from libc.math cimport log, sqrt, NAN
from libc.stdlib cimport malloc, free

ctypedef long long i64


def accumulate_blocks(const double[:, ::1] zcat, const i64[:, ::1] rowoff,
                      const int[::1] pair_tr, const int[::1] pair_tc,
                      const int[::1] zoff, const int[::1] kk,
                      const double[::1] w, double[::1] avals):
    """avals <- the blocks of Z'WZ (w empty means unit weights).

    NumPy: for each pair p and row i,
        avals[rowoff[p, i] + block] += w[i] * outer(z_r[i], z_c[i]) (column-major)
    """
    cdef Py_ssize_t n = zcat.shape[0], npair = rowoff.shape[0]
    cdef Py_ssize_t p, i, a, d
    cdef int kr, kc, zr, zc
    cdef i64 off
    cdef double wi, zd
    cdef bint weighted = w.shape[0] > 0
    with nogil:
        avals[:] = 0.0
        for p in range(npair):
            kr = kk[pair_tr[p]]
            kc = kk[pair_tc[p]]
            zr = zoff[pair_tr[p]]
            zc = zoff[pair_tc[p]]
            if kr == 1 and kc == 1:
                # scalar terms (the common case) without the inner loops
                for i in range(n):
                    wi = w[i] if weighted else 1.0
                    avals[rowoff[p, i]] += wi * zcat[i, zr] * zcat[i, zc]
                continue
            for i in range(n):
                off = rowoff[p, i]
                wi = w[i] if weighted else 1.0
                for d in range(kc):
                    zd = wi * zcat[i, zc + d]
                    for a in range(kr):
                        avals[off + a + d * kr] += zcat[i, zr + a] * zd


def accumulate_zt(const double[:, ::1] zcat, const int[:, ::1] codes,
                  const i64[::1] uoff, const int[::1] zoff, const int[::1] kk,
                  const double[::1] w, const double[:, ::1] xy, double[::1, :] out):
    """out <- Z'W xy, out is q-by-m (Fortran), xy is n-by-m (C order).

    NumPy: out = Z.T @ (w[:, None] * xy)
    """
    cdef Py_ssize_t n = zcat.shape[0], m = xy.shape[1], nterm = codes.shape[0]
    cdef Py_ssize_t t, i, a, j
    cdef i64 r0
    cdef double s
    cdef bint weighted = w.shape[0] > 0
    with nogil:
        out[:, :] = 0.0
        for t in range(nterm):
            for i in range(n):
                r0 = uoff[t] + <i64> codes[t, i] * kk[t]
                for a in range(kk[t]):
                    s = zcat[i, zoff[t] + a]
                    if weighted:
                        s = s * w[i]
                    for j in range(m):
                        out[r0 + a, j] += s * xy[i, j]


cdef inline void congruence(const double *A, const double *Tr, const double *Tc,
                            int kr, int kc, double *tmp, double *M) noexcept nogil:
    # M = Tr' A Tc for column-major A (kr x kc) and lower-triangular Tr, Tc
    cdef int a, d, e
    cdef double s
    for d in range(kc):            # tmp = A Tc
        for a in range(kr):
            s = 0.0
            for e in range(d, kc):
                s += A[a + e * kr] * Tc[e + d * kc]
            tmp[a + d * kr] = s
    for d in range(kc):            # M = Tr' tmp
        for a in range(kr):
            s = 0.0
            for e in range(a, kr):
                s += Tr[e + a * kr] * tmp[e + d * kr]
            M[a + d * kr] = s


cdef void _scatter_lambda(const double[::1] avals, const i64[::1] blk_off,
                          const int[::1] blk_tr, const int[::1] blk_tc, const char[::1] blk_diag,
                          const double[::1] lam, const i64[::1] lam_off, const int[::1] kk,
                          const i64[::1] pos, double[::1] mx, double *tmp) noexcept nogil:
    # tmp: 2 * maxk * maxk doubles of scratch
    cdef Py_ssize_t nblk = blk_off.shape[0], b
    cdef int kr, kc, a, d, maxk = 0, t
    cdef i64 off, idx
    for t in range(kk.shape[0]):
        maxk = max(maxk, kk[t])
    cdef double *M = tmp + maxk * maxk
    for b in range(nblk):
        kr = kk[blk_tr[b]]
        kc = kk[blk_tc[b]]
        off = blk_off[b]
        if kr == 1 and kc == 1:
            M[0] = lam[lam_off[blk_tr[b]]] * avals[off] * lam[lam_off[blk_tc[b]]]
        else:
            congruence(&avals[off], &lam[lam_off[blk_tr[b]]], &lam[lam_off[blk_tc[b]]],
                       kr, kc, tmp, M)
        if blk_diag[b]:
            for a in range(kr):
                M[a + a * kr] += 1.0
        for d in range(kc):
            for a in range(kr):
                idx = pos[off + a + d * kr]
                if idx >= 0:
                    mx[idx] = M[a + d * kr]


cdef int _maxk(const int[::1] kk) noexcept nogil:
    cdef int t, m = 0
    for t in range(kk.shape[0]):
        m = max(m, kk[t])
    return m


def scatter_lambda(const double[::1] avals, const i64[::1] blk_off,
                   const int[::1] blk_tr, const int[::1] blk_tc, const char[::1] blk_diag,
                   const double[::1] lam, const i64[::1] lam_off, const int[::1] kk,
                   const i64[::1] pos, double[::1] mx):
    """mx <- the lower-triangle CSC values of Λ'AΛ + I.

    NumPy: M_b = T_r.T @ A_b @ T_c (+ I on diagonal blocks); mx[pos[off_b:]] = M_b.ravel('F')
    """
    cdef int maxk = _maxk(kk)
    cdef double *tmp = <double *> malloc(2 * maxk * maxk * sizeof(double))
    if tmp == NULL:
        raise MemoryError()
    with nogil:
        _scatter_lambda(avals, blk_off, blk_tr, blk_tc, blk_diag, lam, lam_off, kk, pos, mx, tmp)
    free(tmp)


cdef void _lambda_apply(const double[::1, :] src, const i64[::1] uoff, const int[::1] kk,
                        const int[::1] nlev, const double[::1] lam, const i64[::1] lam_off,
                        bint transpose, double[::1, :] dst) noexcept nogil:
    cdef Py_ssize_t m = src.shape[1], nterm = kk.shape[0], t, l, j
    cdef int k, a, e
    cdef i64 r0
    cdef double s
    cdef const double *T
    for t in range(nterm):
        k = kk[t]
        T = &lam[lam_off[t]]
        for l in range(nlev[t]):
            r0 = uoff[t] + l * k
            for j in range(m):
                for a in range(k):
                    s = 0.0
                    if transpose:       # (T' x)_a = sum_{e >= a} T[e, a] x_e
                        for e in range(a, k):
                            s += T[e + a * k] * src[r0 + e, j]
                    else:               # (T x)_a = sum_{e <= a} T[a, e] x_e
                        for e in range(a + 1):
                            s += T[a + e * k] * src[r0 + e, j]
                    dst[r0 + a, j] = s


def lambda_apply(const double[::1, :] src, const i64[::1] uoff, const int[::1] kk,
                 const int[::1] nlev, const double[::1] lam, const i64[::1] lam_off,
                 bint transpose, double[::1, :] dst):
    """dst <- Λ' src (transpose) or Λ src, for a q-by-m block (Fortran).

    NumPy: dst = Lambda.T @ src if transpose else Lambda @ src
    """
    with nogil:
        _lambda_apply(src, uoff, kk, nlev, lam, lam_off, transpose, dst)


cdef double blockdiag_factor_c(const double *avals, const double *lam, int k, Py_ssize_t nlev,
                               double *L, double *tmp) noexcept nogil:
    # L_l <- chol(T'A_l T + I), level by level; returns sum of log diag(L), NaN if not PD
    cdef Py_ssize_t l
    cdef int a, d, e
    cdef double s, logdet = 0.0
    cdef double *B
    for l in range(nlev):
        B = &L[l * k * k]
        if k == 1:
            s = lam[0] * lam[0] * avals[l] + 1.0
            B[0] = sqrt(s)
            logdet += 0.5 * log(s)
            continue
        congruence(&avals[l * k * k], lam, lam, k, k, tmp, B)
        for a in range(k):
            B[a + a * k] += 1.0
        if chol_inplace(B, k, &logdet):
            return NAN
    return logdet


cdef int chol_inplace(double *B, int k, double *logdet) noexcept nogil:
    """In place: the lower Cholesky factor of the column-major k-by-k B (its lower
    triangle is read; the strict upper one is zeroed); adds Σ log diag to logdet.
    Returns 1 (B left part-way) if B is not positive definite."""
    cdef int a, d, e
    cdef double s
    for d in range(k):              # by columns
        s = B[d + d * k]
        for e in range(d):
            s -= B[d + e * k] * B[d + e * k]
        if s <= 0.0:
            return 1
        s = sqrt(s)
        B[d + d * k] = s
        logdet[0] += log(s)
        for a in range(d + 1, k):
            for e in range(d):
                B[a + d * k] -= B[a + e * k] * B[d + e * k]
            B[a + d * k] /= s
        for a in range(d):
            B[a + d * k] = 0.0
    return 0


cdef void blockdiag_solve_c(const double *L, int k, Py_ssize_t nlev, double *b,
                            bint transpose) noexcept nogil:
    # one column b (length nlev*k): b <- L⁻¹ b, or L'⁻¹ b when transpose
    cdef Py_ssize_t l
    cdef int a, e
    cdef double s
    cdef const double *B
    cdef double *x
    for l in range(nlev):
        B = &L[l * k * k]
        x = &b[l * k]
        if not transpose:
            for a in range(k):
                s = x[a]
                for e in range(a):
                    s -= B[a + e * k] * x[e]
                x[a] = s / B[a + a * k]
        else:
            for a in range(k - 1, -1, -1):
                s = x[a]
                for e in range(a + 1, k):
                    s -= B[e + a * k] * x[e]
                x[a] = s / B[a + a * k]


def blockdiag_factor(const double[::1] avals, const double[::1] lam, int k,
                     double[::1] L):
    """L <- chol(T'A_l T + I) for every level l (k-by-k blocks, column-major, lower).

    Returns log det(L) = sum of log diag, or nan when a block is not positive definite.
    NumPy: L_l = numpy.linalg.cholesky(T.T @ A_l @ T + I)
    """
    cdef Py_ssize_t nlev = avals.shape[0] // (k * k)
    cdef double logdet
    cdef double *tmp = <double *> malloc(k * k * sizeof(double))
    if tmp == NULL:
        raise MemoryError()
    with nogil:
        logdet = blockdiag_factor_c(&avals[0], &lam[0], k, nlev, &L[0], tmp)
    free(tmp)
    return logdet


def blockdiag_forward(const double[::1] L, int k, double[::1, :] b):
    """In place b <- L⁻¹ b for the block-diagonal factor (q-by-m, Fortran).

    NumPy: b = scipy.linalg.solve_triangular(blockdiag(L_l), b, lower=True)
    """
    cdef Py_ssize_t nlev = L.shape[0] // (k * k), j
    with nogil:
        for j in range(b.shape[1]):
            blockdiag_solve_c(&L[0], k, nlev, &b[0, j], False)


def blockdiag_backward(const double[::1] L, int k, double[::1, :] b):
    """In place b <- L'⁻¹ b for the block-diagonal factor (q-by-m, Fortran).

    NumPy: b = scipy.linalg.solve_triangular(blockdiag(L_l), b, lower=True, trans='T')
    """
    cdef Py_ssize_t nlev = L.shape[0] // (k * k), j
    with nogil:
        for j in range(b.shape[1]):
            blockdiag_solve_c(&L[0], k, nlev, &b[0, j], True)


cdef int _schur_cholesky(const double[:, ::1] xtxy, const double[::1, :] rzxy,
                         double[:, ::1] r) noexcept nogil:
    cdef Py_ssize_t m = xtxy.shape[0], q = rzxy.shape[0], i, j, k
    cdef double s
    for j in range(m):
        for i in range(j + 1):
            s = xtxy[i, j]
            for k in range(q):
                s -= rzxy[k, i] * rzxy[k, j]
            r[i, j] = s
        for i in range(j + 1, m):
            r[i, j] = 0.0
    for j in range(m):
        for i in range(j):
            s = r[i, j]
            for k in range(i):
                s -= r[k, i] * r[k, j]
            r[i, j] = s / r[i, i]
        s = r[j, j]
        for k in range(j):
            s -= r[k, j] * r[k, j]
        if s <= 0.0:
            if j == m - 1 and s > -1e-10 * (xtxy[j, j] + 1.0):
                s = 0.0
            else:
                return <int> j + 1
        r[j, j] = sqrt(s)
    return 0


def schur_cholesky(const double[:, ::1] xtxy, const double[::1, :] rzxy, double[:, ::1] r):
    """r <- upper Cholesky factor of xtxy - rzxy' rzxy (m-by-m); returns a status.

    Status 0: success. Status j > 0: the leading j-by-j block is not positive definite
    (column j of [X y] is, numerically, a combination of the earlier ones). The last
    column is the response: a zero penalized residual leaves r[m-1, m-1] = 0 and is not
    an error here.
    NumPy: r = numpy.linalg.cholesky(xtxy - rzxy.T @ rzxy).T
    """
    cdef int status
    with nogil:
        status = _schur_cholesky(xtxy, rzxy, r)
    return status


def upper_solve(const double[:, ::1] r, double[::1] b):
    """In place b <- r⁻¹ b for the leading len(b)-square block of an upper-triangular r.

    Plain loops rather than LAPACK: the fixed-effects block is small, and a threaded BLAS
    costs more to wake than the solve itself.
    NumPy: b = scipy.linalg.solve_triangular(r[:p, :p], b)
    """
    cdef Py_ssize_t p = b.shape[0], i, k
    cdef double s
    with nogil:
        for i in range(p - 1, -1, -1):
            s = b[i]
            for k in range(i + 1, p):
                s -= r[i, k] * b[k]
            b[i] = s / r[i, i]


def z_times(const double[:, ::1] zcat, const int[:, ::1] codes, const i64[::1] uoff,
            const int[::1] zoff, const int[::1] kk, const double[::1] b,
            const double[::1] base, double[::1] out):
    """out <- base + Z b: the linear predictor from the random effects b = Λu.

    NumPy: out = base + Z @ b
    """
    cdef Py_ssize_t n = zcat.shape[0], nterm = codes.shape[0], t, i, a
    cdef i64 r0
    cdef double s
    with nogil:
        for i in range(n):
            s = base[i]
            for t in range(nterm):
                r0 = uoff[t] + <i64> codes[t, i] * kk[t]
                for a in range(kk[t]):
                    s += zcat[i, zoff[t] + a] * b[r0 + a]
            out[i] = s


def weighted_crossprod(const double[:, ::1] xy, const double[::1] w, double[:, ::1] out):
    """out <- xy' W xy (m-by-m), w empty meaning unit weights.

    NumPy: out = xy.T @ (w[:, None] * xy)
    """
    cdef Py_ssize_t n = xy.shape[0], m = xy.shape[1], i, a, c
    cdef double wi
    cdef bint weighted = w.shape[0] > 0
    with nogil:
        out[:, :] = 0.0
        for i in range(n):
            wi = w[i] if weighted else 1.0
            for c in range(m):
                for a in range(c + 1):
                    out[a, c] += wi * xy[i, a] * xy[i, c]
        for c in range(m):
            for a in range(c + 1, m):
                out[a, c] = out[c, a]


def matvec(const double[:, ::1] x, const double[::1] beta, const double[::1] base,
           double[::1] out):
    """out <- base + X β (plain loops: X is tall and thin).

    NumPy: out = base + X @ beta
    """
    cdef Py_ssize_t n = x.shape[0], p = x.shape[1], i, j
    cdef double s
    with nogil:
        for i in range(n):
            s = base[i]
            for j in range(p):
                s += x[i, j] * beta[j]
            out[i] = s


cdef class ThetaFactorizer:
    """The per-θ work of the blocked system in one call, over views bound once.

    Each kernel above is a Python-callable function, and unpacking its memoryview
    arguments costs about a microsecond apiece: on a small model that is more than the
    arithmetic. This object binds the arrays once (when the cross-products are
    (re)allocated) and then runs θ → Λ templates → Λ'Z'W[X y] → factor → forward solve →
    Schur complement in one call. ``factor`` is None for the block-diagonal path, else the
    CHOLMOD factor whose values array is ``mx``.
    """
    cdef const double[::1] avals
    cdef double[::1] lam, lblocks, mx
    cdef const i64[::1] lam_index, lam_off, uoff, blk_off, pos
    cdef const int[::1] kk, nlev, blk_tr, blk_tc
    cdef const char[::1] blk_diag
    cdef const double[::1, :] ztxy
    cdef double[::1, :] rzxy
    cdef const double[:, ::1] xtxy
    cdef double[:, ::1] r
    cdef object factor
    cdef int k0
    cdef double *tmp

    def __cinit__(self, *args, **kwargs):
        self.tmp = NULL

    def __dealloc__(self):
        free(self.tmp)

    def __init__(self, pattern, layout, avals, lam, lblocks, mx, factor):
        self.avals = avals
        self.lam = lam
        self.lblocks = lblocks
        self.mx = mx
        self.lam_index = layout.index
        self.lam_off = layout.lam_off
        self.uoff = pattern.uoff
        self.kk = pattern.kk
        self.nlev = pattern.nlev
        self.blk_off = pattern.blk_off
        self.blk_tr = pattern.blk_tr
        self.blk_tc = pattern.blk_tc
        self.blk_diag = pattern.blk_diag
        if pattern.pos is not None:
            self.pos = pattern.pos
        self.factor = factor
        self.k0 = pattern.kk[0]
        cdef int maxk = _maxk(self.kk)
        self.tmp = <double *> malloc(2 * maxk * maxk * sizeof(double))
        if self.tmp == NULL:
            raise MemoryError()

    def bind_products(self, ztxy, rzxy, xtxy, r):
        self.ztxy = ztxy
        self.rzxy = rzxy
        self.xtxy = xtxy
        self.r = r

    def factorize(self, const double[::1] theta, bint schur):
        """Returns (log det(L), status of the Schur Cholesky; -1 when skipped).

        A non-positive-definite block diagonal gives a NaN log-determinant.
        """
        cdef Py_ssize_t i
        cdef double logdet
        cdef int status = -1
        if theta.shape[0] != self.lam_index.shape[0]:
            raise ValueError("theta has the wrong length")
        cdef Py_ssize_t j, nlev0 = self.lblocks.shape[0] // (self.k0 * self.k0)
        for i in range(theta.shape[0]):
            self.lam[self.lam_index[i]] = theta[i]
        with nogil:
            _lambda_apply(self.ztxy, self.uoff, self.kk, self.nlev, self.lam, self.lam_off,
                          True, self.rzxy)
        if self.factor is None:
            with nogil:
                logdet = blockdiag_factor_c(&self.avals[0], &self.lam[0], self.k0, nlev0,
                                            &self.lblocks[0], self.tmp)
                if logdet == logdet:
                    for j in range(self.rzxy.shape[1]):
                        blockdiag_solve_c(&self.lblocks[0], self.k0, nlev0, &self.rzxy[0, j], False)
            if logdet != logdet:
                return logdet, status
        else:
            with nogil:
                _scatter_lambda(self.avals, self.blk_off, self.blk_tr, self.blk_tc,
                                self.blk_diag, self.lam, self.lam_off, self.kk, self.pos,
                                self.mx, self.tmp)
            self.factor.factorize()
            logdet = self.factor.logdet()
            self.factor.forward(self.rzxy)
        if schur:
            with nogil:
                status = _schur_cholesky(self.xtxy, self.rzxy, self.r)
        return logdet, status


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
from libc.math cimport log, sqrt, frexp, NAN, M_LN2
from libc.string cimport memset

import numpy as np
cimport numpy as cnp
from libc.stdlib cimport malloc, free, qsort
from cpython.pycapsule cimport PyCapsule_GetPointer

cnp.import_array()

# i64 is declared in _blocked.pxd


def accumulate_blocks(const double[:, ::1] zcat, const i64[:, ::1] rowoff not None,
                      const int[::1] pair_tr, const int[::1] pair_tc,
                      const int[::1] zoff, const int[::1] kk,
                      const double[::1] w, double[::1] avals):
    """avals <- the blocks of Z'WZ (w empty means unit weights).

    NumPy: for each pair p and row i,
        avals[rowoff[p, i] + block] += w[i] * outer(z_r[i], z_c[i]) (column-major)
    """
    with nogil:
        _blocks_into(zcat, rowoff, None, pair_tr, pair_tc, zoff, kk, w, avals)


cdef void _blocks_into(const double[:, ::1] zcat, const i64[:, ::1] rowoff,
                       const int[:, ::1] codes, const int[::1] pair_tr,
                       const int[::1] pair_tc, const int[::1] zoff, const int[::1] kk,
                       const double[::1] w, double[::1] avals) noexcept nogil:
    """accumulate_blocks' sums. ``rowoff`` None: one term, whose blocks sit at
    ``codes[0] * k * k`` (what its rowoff holds)."""
    cdef Py_ssize_t n = zcat.shape[0], npair = pair_tr.shape[0]
    cdef Py_ssize_t p, i, a, d
    cdef int kr, kc, zr, zc
    cdef i64 off
    cdef double wi, zd
    cdef bint weighted = w.shape[0] > 0
    avals[:] = 0.0
    if rowoff is None:
        kr = kk[0]
        for i in range(n):
            off = <i64> codes[0, i] * kr * kr
            wi = w[i] if weighted else 1.0
            for d in range(kr):
                zd = wi * zcat[i, d]
                for a in range(kr):
                    avals[off + a + d * kr] += zcat[i, a] * zd
        return
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
    with nogil:
        _zt_into(zcat, codes, uoff, zoff, kk, w, xy, out)


cdef void _zt_into(const double[:, ::1] zcat, const int[:, ::1] codes,
                   const i64[::1] uoff, const int[::1] zoff, const int[::1] kk,
                   const double[::1] w, const double[:, ::1] xy,
                   double[::1, :] out) noexcept nogil:
    """accumulate_zt's sums."""
    cdef Py_ssize_t n = zcat.shape[0], m = xy.shape[1], nterm = codes.shape[0]
    cdef Py_ssize_t t, i, a, j
    cdef i64 r0
    cdef double s
    cdef bint weighted = w.shape[0] > 0
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
    cdef Py_ssize_t nblk = blk_off.shape[0], b = 0, e, t2
    cdef int kr, kc, a, d, maxk = 0, t, tr, tc
    cdef i64 off, idx, o0
    cdef double lr, lc, v
    cdef bint diag
    cdef const double *pa
    cdef const i64 *pp
    cdef double *pm
    for t in range(kk.shape[0]):
        maxk = max(maxk, kk[t])
    cdef double *M = tmp + maxk * maxk
    while b < nblk:
        tr = blk_tr[b]
        tc = blk_tc[b]
        kr = kk[tr]
        kc = kk[tc]
        if kr == 1 and kc == 1:
            # a run of scalar blocks of one term pair (the blocks come pair by pair):
            # one multiply-add and a store each, the template entries held in registers
            e = b + 1
            while e < nblk and blk_tr[e] == tr and blk_tc[e] == tc:
                e += 1
            lr = lam[lam_off[tr]]
            lc = lam[lam_off[tc]]
            diag = blk_diag[b]
            o0 = blk_off[b]
            if blk_off[e - 1] - o0 == e - 1 - b:
                # the run's values are contiguous (as _pattern lays them out): two
                # streams in, one scattered store out, no branch on the block kind
                pa = &avals[o0]
                pp = &pos[o0]
                pm = &mx[0]
                if diag:
                    for t2 in range(e - b):
                        idx = pp[t2]
                        if idx >= 0:
                            pm[idx] = lr * pa[t2] * lc + 1.0
                else:
                    for t2 in range(e - b):
                        idx = pp[t2]
                        if idx >= 0:
                            pm[idx] = lr * pa[t2] * lc
                b = e
                continue
            while b < e:
                off = blk_off[b]
                v = lr * avals[off] * lc
                if diag:
                    v += 1.0
                idx = pos[off]
                if idx >= 0:
                    mx[idx] = v
                b += 1
            continue
        off = blk_off[b]
        congruence(&avals[off], &lam[lam_off[tr]], &lam[lam_off[tc]], kr, kc, tmp, M)
        if blk_diag[b]:
            for a in range(kr):
                M[a + a * kr] += 1.0
        for d in range(kc):
            for a in range(kr):
                idx = pos[off + a + d * kr]
                if idx >= 0:
                    mx[idx] = M[a + d * kr]
        b += 1


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
    if not transpose:                   # column by column: Λ u as the compiled PIRLS takes it
        for j in range(m):
            lambda_times_c(&lam[0], &lam_off[0], &uoff[0], &kk[0], &nlev[0], <int> nterm,
                           &src[0, j], &dst[0, j])
        return
    for t in range(nterm):
        k = kk[t]
        T = &lam[lam_off[t]]
        for l in range(nlev[t]):
            r0 = uoff[t] + l * k
            for j in range(m):
                for a in range(k):
                    s = 0.0             # (T' x)_a = sum_{e >= a} T[e, a] x_e
                    for e in range(a, k):
                        s += T[e + a * k] * src[r0 + e, j]
                    dst[r0 + a, j] = s


def lambda_apply(const double[::1, :] src, const i64[::1] uoff, const int[::1] kk,
                 const int[::1] nlev, const double[::1] lam, const i64[::1] lam_off,
                 bint transpose, double[::1, :] dst):
    """dst <- Λ' src (transpose) or Λ src, for a q-by-m block (Fortran).

    NumPy: dst = Lambda.T @ src if transpose else Lambda @ src
    """
    with nogil:
        _lambda_apply(src, uoff, kk, nlev, lam, lam_off, transpose, dst)


cdef void lambda_times_c(const double *lam, const i64 *lam_off, const i64 *uoff,
                         const int *kk, const int *nlev, int nterm, const double *u,
                         double *out) noexcept nogil:
    """out <- Λ u for one vector u (length q): the arithmetic of _lambda_apply (not
    transposed), on raw pointers for the compiled PIRLS."""
    cdef Py_ssize_t l
    cdef int t, k, a, e
    cdef i64 r0
    cdef double s
    cdef const double *T
    for t in range(nterm):
        k = kk[t]
        T = &lam[lam_off[t]]
        for l in range(nlev[t]):
            r0 = uoff[t] + l * k
            for a in range(k):
                s = 0.0
                for e in range(a + 1):
                    s += T[a + e * k] * u[r0 + e]
                out[r0 + a] = s


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
    with nogil:
        _crossprod_into(xy, w, out)


cdef void _crossprod_into(const double[:, ::1] xy, const double[::1] w,
                          double[:, ::1] out) noexcept nogil:
    """weighted_crossprod's sums."""
    cdef Py_ssize_t n = xy.shape[0], m = xy.shape[1], i, a, c
    cdef double wi
    cdef bint weighted = w.shape[0] > 0
    out[:, :] = 0.0
    for i in range(n):
        wi = w[i] if weighted else 1.0
        for c in range(m):
            for a in range(c + 1):
                out[a, c] += wi * xy[i, a] * xy[i, c]
    for c in range(m):
        for a in range(c + 1, m):
            out[a, c] = out[c, a]


def accumulate_products(const double[:, ::1] zcat, const int[:, ::1] codes,
                        const i64[:, ::1] rowoff, const int[::1] pair_tr,
                        const int[::1] pair_tc, const i64[::1] uoff, const int[::1] zoff,
                        const int[::1] kk, const double[::1] w, const double[:, ::1] xy,
                        double[::1] avals, double[::1, :] ztxy, double[:, ::1] xtxy):
    """accumulate_blocks, accumulate_zt and weighted_crossprod in one call: their sums,
    the same bits (rowoff None: one term, whose blocks sit at ``codes * k * k``; w
    empty: unit weights). ThetaFactorizer.accumulate runs this over the arrays it has
    bound: on a small model the three calls' argument unpacking cost more than the sums.

    NumPy: avals as accumulate_blocks', ztxy = Z.T @ (w[:, None] * xy),
    xtxy = xy.T @ (w[:, None] * xy)
    """
    if rowoff is None and (codes.shape[0] != 1 or pair_tr.shape[0] != 1):
        raise ValueError("rowoff may be left out for one term only")
    if rowoff is not None and (rowoff.shape[0] != pair_tr.shape[0] or
                               rowoff.shape[1] != zcat.shape[0]):
        raise ValueError("rowoff must be npair-by-n")
    _check_products(zcat.shape[0], xy.shape[1], codes.shape[1], xy.shape[0], w.shape[0],
                    ztxy.shape[1], xtxy.shape[0], xtxy.shape[1])
    with nogil:
        _blocks_into(zcat, rowoff, codes, pair_tr, pair_tc, zoff, kk, w, avals)
        _zt_into(zcat, codes, uoff, zoff, kk, w, xy, ztxy)
        _crossprod_into(xy, w, xtxy)


cdef int _check_products(Py_ssize_t n, Py_ssize_t m, Py_ssize_t ncodes, Py_ssize_t nxy,
                         Py_ssize_t nw, Py_ssize_t mz, Py_ssize_t m0, Py_ssize_t m1) except -1:
    if ncodes != n or nxy != n or (nw and nw != n):
        raise ValueError("zcat, codes, xy and w must have a row each for the same rows")
    if mz != m or m0 != m or m1 != m:
        raise ValueError("ztxy must be q-by-m and xtxy m-by-m for xy's m columns")
    return 0


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


cdef class SimplicialFactor:
    cdef readonly int n
    cdef int[::1] lp, li, perm
    cdef i64[::1] dest
    cdef double[::1] lx, x
    cdef int[::1] nxt, head, link
    cdef readonly double logdet_value
    """L L' = P M P' on the pattern of another factor's symbolic analysis, numerically.

    For the small multi-term models whose CHOLMOD factor is simplicial (grouseticks:
    q = 584, nnz(L) = 1,508), a CHOLMOD refactorization is mostly call overhead (~18 µs
    against ~5 here, its log-determinant and each solve ~3-8 µs against ~1). The
    compiled PIRLS therefore refactors with this object inside its loop, on CHOLMOD's
    permutation P and pattern of L (so the same fill), and calls CHOLMOD once, for the
    factorization at the modes that the workspace keeps (see ThetaFactorizer.
    factor_small).

    Left-looking column Cholesky: column j of L is M's column j (P applied) less
    L[j:, k] L[j, k] for the columns k < j with L[j, k] != 0, found through linked
    lists of the columns by their next row (each column joins the list of its next row
    once it has been used), then scaled by 1/L[j, j]. log det(L) is summed as the log of
    the product of the diagonal (its exponent split off as it grows), one log per
    factorization rather than one per column.

    Parameters
    ----------
    indptr, indices : M's lower triangle, CSC (the layout of the values ``mx``)
    perm : P as an index array (new -> old: row j of P M P' is row perm[j] of M)
    lp, li : the pattern of L (CSC, rows ascending, each column's diagonal first),
        which must hold every entry of P M P' (a symbolic factorization's pattern does)
    """

    def __init__(self, indptr, indices, perm, lp, li):
        cdef int[::1] ip = np.ascontiguousarray(indptr, dtype=np.int32)
        cdef int[::1] ix = np.ascontiguousarray(indices, dtype=np.int32)
        cdef Py_ssize_t n = ip.shape[0] - 1, j, t, lo, hi, mid, c, r, a, b
        perm = np.ascontiguousarray(perm, dtype=np.int32)
        lp = np.ascontiguousarray(lp, dtype=np.int32)
        li = np.ascontiguousarray(li, dtype=np.int32)
        if (n < 0 or perm.shape[0] != n or lp.shape[0] != n + 1 or lp[0] != 0
                or lp[n] != li.shape[0] or np.any(np.diff(lp) < 1)
                or not np.array_equal(np.sort(perm), np.arange(n))
                or ix.shape[0] != ip[n] or (li.shape[0] and (li.min() < 0 or li.max() >= n))):
            raise ValueError("SimplicialFactor: inconsistent pattern")
        self.n = <int> n
        self.perm = perm
        self.lp = lp
        self.li = li
        # each column: its diagonal first, rows ascending
        for j in range(n):
            if self.li[self.lp[j]] != j:
                raise ValueError("SimplicialFactor: a column of L does not start at its diagonal")
            for t in range(self.lp[j] + 1, self.lp[j + 1]):
                if self.li[t] <= self.li[t - 1]:
                    raise ValueError("SimplicialFactor: rows of L not ascending")
        inv = np.empty(n, dtype=np.int32)
        inv[perm] = np.arange(n, dtype=np.int32)
        cdef int[::1] iv = inv
        self.dest = np.empty(ix.shape[0], dtype=np.int64)
        # where each value of M lands in L: entry (i, j) of M is (inv i, inv j) of
        # P M P', in the lower triangle at (max, min)
        for j in range(n):
            for t in range(ip[j], ip[j + 1]):
                if ix[t] < 0 or ix[t] >= n:
                    raise ValueError("SimplicialFactor: row index out of range")
                a = iv[ix[t]]
                b = iv[j]
                r = a if a > b else b
                c = b if a > b else a
                lo = self.lp[c]
                hi = self.lp[c + 1]
                while lo < hi:
                    mid = (lo + hi) // 2
                    if self.li[mid] < r:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo == self.lp[c + 1] or self.li[lo] != r:
                    raise ValueError("SimplicialFactor: M has an entry outside L's pattern")
                self.dest[t] = lo
        self.lx = np.zeros(li.shape[0])
        self.x = np.zeros(max(n, 1))
        self.nxt = np.zeros(max(n, 1), dtype=np.int32)
        self.head = np.zeros(max(n, 1), dtype=np.int32)
        self.link = np.zeros(max(n, 1), dtype=np.int32)
        self.logdet_value = NAN

    cdef int factor_c(self, const double *mx) noexcept nogil:
        """Factor at the values mx (M's lower CSC); 1 if not positive definite."""
        cdef int n = self.n, j, k, knext, i
        cdef Py_ssize_t p, pend, t, nnz = self.lx.shape[0], nm = self.dest.shape[0]
        cdef const int *lp = &self.lp[0]
        cdef const int *li = &self.li[0]
        cdef const i64 *dest = &self.dest[0] if nm > 0 else NULL
        cdef double *lx = &self.lx[0]
        cdef double *x = &self.x[0]
        cdef int *nxt = &self.nxt[0]
        cdef int *head = &self.head[0]
        cdef int *link = &self.link[0]
        cdef double d, ljk, prod = 1.0
        cdef int ex, eacc = 0
        memset(lx, 0, nnz * sizeof(double))
        for t in range(nm):
            lx[dest[t]] = mx[t]
        for j in range(n):
            head[j] = -1
        for j in range(n):
            # column j of P M P' (lower part) into x
            for p in range(lp[j], lp[j + 1]):
                x[li[p]] = lx[p]
            # less L[j:, k] L[j, k] for the columns k in row j's list
            k = head[j]
            while k >= 0:
                knext = link[k]
                p = nxt[k]                  # where L[j, k] sits in column k
                pend = lp[k + 1]
                ljk = lx[p]
                while p < pend:
                    x[li[p]] -= lx[p] * ljk
                    p += 1
                # k joins the list of its next row below j
                p = nxt[k] + 1
                nxt[k] = <int> p
                if p < pend:
                    i = li[p]
                    link[k] = head[i]
                    head[i] = k
                k = knext
            d = x[j]
            x[j] = 0.0
            if not d > 0.0:
                # leave x zeroed for the next call
                for p in range(lp[j] + 1, lp[j + 1]):
                    x[li[p]] = 0.0
                for i in range(n):
                    x[i] = 0.0
                self.logdet_value = NAN
                return 1
            d = sqrt(d)
            lx[lp[j]] = d
            for p in range(lp[j] + 1, lp[j + 1]):
                lx[p] = x[li[p]] / d
                x[li[p]] = 0.0
            p = lp[j] + 1
            nxt[j] = <int> p
            if p < lp[j + 1]:
                i = li[p]
                link[j] = head[i]
                head[i] = j
            prod *= d
            if prod > 1e150 or prod < 1e-150:
                prod = frexp(prod, &ex)
                eacc += ex
        self.logdet_value = log(prod) + eacc * M_LN2
        return 0

    cdef void forward_c(self, double *b) noexcept nogil:
        """b <- L⁻¹ P b for one vector."""
        cdef int n = self.n, j
        cdef Py_ssize_t p
        cdef double v
        cdef double *x = &self.x[0]
        for j in range(n):
            x[j] = b[self.perm[j]]
        for j in range(n):
            v = x[j] / self.lx[self.lp[j]]
            x[j] = v
            for p in range(self.lp[j] + 1, self.lp[j + 1]):
                x[self.li[p]] -= self.lx[p] * v
        for j in range(n):
            b[j] = x[j]
            x[j] = 0.0

    cdef void backward_c(self, double *b) noexcept nogil:
        """b <- P' L'⁻¹ b for one vector."""
        cdef int n = self.n, j
        cdef Py_ssize_t p
        cdef double v
        cdef double *x = &self.x[0]
        for j in range(n - 1, -1, -1):
            v = b[j]
            for p in range(self.lp[j] + 1, self.lp[j + 1]):
                v -= self.lx[p] * b[self.li[p]]
            b[j] = v / self.lx[self.lp[j]]
        for j in range(n):
            x[self.perm[j]] = b[j]
        for j in range(n):
            b[j] = x[j]
            x[j] = 0.0

    def factorize(self, const double[::1] mx):
        """Factor at M's values mx; raises numpy.linalg.LinAlgError if M is not positive
        definite."""
        cdef int status
        if mx.shape[0] != self.dest.shape[0]:
            raise ValueError(f"mx has {mx.shape[0]} values; M's pattern has {self.dest.shape[0]}")
        with nogil:
            status = self.factor_c(&mx[0] if mx.shape[0] > 0 else NULL)
        if status:
            raise np.linalg.LinAlgError("random-effects block not positive definite")

    def logdet(self):
        """log det(L) of the last factorization (NaN after a failed one)."""
        return self.logdet_value

    def forward(self, double[::1, :] b):
        """In place: b <- L⁻¹ P b (n-by-m, Fortran)."""
        self._check(b)
        cdef Py_ssize_t c
        for c in range(b.shape[1]):
            self.forward_c(&b[0, c])
        return b

    def backward(self, double[::1, :] b):
        """In place: b <- P' L'⁻¹ b (n-by-m, Fortran)."""
        self._check(b)
        cdef Py_ssize_t c
        for c in range(b.shape[1]):
            self.backward_c(&b[0, c])
        return b

    def _check(self, b):
        if not self.logdet_value == self.logdet_value:
            raise ValueError("the factor holds no factorization")
        if b.shape[0] != self.n:
            raise ValueError(f"b has {b.shape[0]} rows; the factor has {self.n}")


cdef class ThetaFactorizer:
    """The per-θ work of the blocked system in one call, over views bound once.

    Each kernel above is a Python-callable function, and unpacking its memoryview
    arguments costs about a microsecond apiece: on a small model that is more than the
    arithmetic. This object binds the arrays once (when the cross-products are
    (re)allocated) and then runs θ → Λ templates → Λ'Z'W[X y] → factor → forward solve →
    Schur complement in one call. ``factor`` is None for the block-diagonal path, else the
    CHOLMOD factor whose values array is ``mx``.
    """
    # avals, ztxy and xtxy are written by ``accumulate`` only, read by the rest
    cdef double[::1] avals
    cdef double[::1] lam, lblocks, mx
    cdef const i64[::1] lam_index, lam_off, uoff, blk_off, pos
    cdef const int[::1] kk, nlev, blk_tr, blk_tc
    cdef const char[::1] blk_diag
    cdef double[::1, :] ztxy
    cdef double[::1, :] rzxy
    cdef double[:, ::1] xtxy
    cdef double[:, ::1] r
    cdef readonly object factor
    cdef ExternalFactor ext          # the factor's C functions, where it offers them
    cdef readonly int k0
    cdef double *tmp
    cdef readonly SimplicialFactor small
    cdef readonly bint small_allowed, last_small
    # factorizations made, by any caller (Python, the compiled search, check or PIRLS): a
    # result kept from one is current while the count has not moved
    cdef readonly unsigned long long count
    cdef object _m_pattern
    cdef bint bound                  # products bound (bind_products)

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
        self.factor = factor
        self.ext.obj = NULL
        if factor is not None:
            # the blocks' list and M's slots are read by the scatter into mx alone (the
            # block-diagonal path factors avals level by level)
            self.blk_off = pattern.blk_off
            self.blk_tr = pattern.blk_tr
            self.blk_tc = pattern.blk_tc
            self.blk_diag = pattern.blk_diag
            if pattern.pos is not None:
                self.pos = pattern.pos
            if hasattr(factor, "external"):
                self.ext = (<ExternalFactor *> PyCapsule_GetPointer(
                    factor.external(), b"mixedmodels.ExternalFactor"))[0]
        self.k0 = self.kk[0]
        self.small = None
        self.small_allowed = False
        self.last_small = False
        self._m_pattern = None
        self.bound = False
        cdef int maxk = _maxk(self.kk)
        self.tmp = <double *> malloc(2 * maxk * maxk * sizeof(double))
        if self.tmp == NULL:
            raise MemoryError()

    def allow_small(self, indptr, indices):
        """Let the compiled PIRLS refactor with a SimplicialFactor on the (simplicial)
        CHOLMOD factor's pattern between the factorizations the workspace keeps (see
        ``factor_small``); built after its first CHOLMOD factorization (``tf_factor``).
        indptr, indices: M's lower CSC pattern."""
        self._m_pattern = (indptr, indices)
        self.small_allowed = True

    def bind_products(self, ztxy, rzxy, xtxy, r):
        self.ztxy = ztxy
        self.rzxy = rzxy
        self.xtxy = xtxy
        self.r = r
        self.bound = True

    def new_products(self, Py_ssize_t q, Py_ssize_t m):
        """Zeroed products for m columns of [X y], bound here and returned for the
        workspace to hold: (ztxy, rzxy) q-by-m Fortran, (xtxy, r) m-by-m C order.

        NumPy: np.zeros((q, m), order="F") twice, np.zeros((m, m)) twice."""
        cdef cnp.npy_intp dims[2]
        dims[0] = q
        dims[1] = m
        ztxy = cnp.PyArray_ZEROS(2, dims, cnp.NPY_DOUBLE, 1)
        rzxy = cnp.PyArray_ZEROS(2, dims, cnp.NPY_DOUBLE, 1)
        dims[0] = m
        xtxy = cnp.PyArray_ZEROS(2, dims, cnp.NPY_DOUBLE, 0)
        r = cnp.PyArray_ZEROS(2, dims, cnp.NPY_DOUBLE, 0)
        self.bind_products(ztxy, rzxy, xtxy, r)
        return ztxy, rzxy, xtxy, r

    def accumulate(self, pattern, const double[:, ::1] xy, const double[::1] w):
        """The cross-products of the rows of ``pattern`` (the one this object was made
        with) in one call: Z'WZ into the bound avals, Z'W xy and xy'W xy into the bound
        ztxy and xtxy (``accumulate_products`` over the arrays bound here; w empty: unit
        weights). Where no products of xy's width are bound, they are made and bound
        first (``new_products``) and returned, for the workspace to hold; else None."""
        cdef const double[:, ::1] zcat = pattern.zcat
        cdef const int[:, ::1] codes = pattern.codes
        cdef const int[::1] zoff = pattern.zoff
        cdef const i64[:, ::1] rowoff = None
        cdef const int[::1] pair_tr, pair_tc
        cdef Py_ssize_t m = xy.shape[1], nterm = self.kk.shape[0]
        cdef Py_ssize_t q = self.uoff[nterm - 1] + self.kk[nterm - 1] * self.nlev[nterm - 1]
        if codes.shape[0] != nterm:
            raise ValueError("the pattern is not the one this factorizer was made with")
        made = None
        if not self.bound or self.ztxy.shape[1] != m or self.ztxy.shape[0] != q:
            made = self.new_products(q, m)
        _check_products(zcat.shape[0], m, codes.shape[1], xy.shape[0], w.shape[0],
                        self.ztxy.shape[1], self.xtxy.shape[0], self.xtxy.shape[1])
        if nterm == 1:
            # one term: its one pair (0, 0), which zoff's single 0 spells, and blocks at
            # codes * k * k, without reading the rowoff a one-term pattern makes on demand
            pair_tr = pair_tc = zoff
        else:
            rowoff = pattern.rowoff
            pair_tr = pattern.pair_tr
            pair_tc = pattern.pair_tc
        with nogil:
            _blocks_into(zcat, rowoff, codes, pair_tr, pair_tc, zoff, self.kk, w, self.avals)
            _zt_into(zcat, codes, self.uoff, zoff, self.kk, w, xy, self.ztxy)
            _crossprod_into(xy, w, self.xtxy)
        return made

    def factorize(self, const double[::1] theta, bint schur):
        """Returns (log det(L), status of the Schur Cholesky; -1 when skipped).

        A non-positive-definite block diagonal gives a NaN log-determinant.
        """
        cdef double logdet
        cdef int status = -1
        self.set_theta(theta)
        logdet = self.factor_now(schur, &status)
        return logdet, status

    cdef int set_theta(self, const double[::1] theta) except -1:
        """Λ's templates from θ (into ``lam``, which the factorization reads)."""
        cdef Py_ssize_t i
        if theta.shape[0] != self.lam_index.shape[0]:
            raise ValueError("theta has the wrong length")
        for i in range(theta.shape[0]):
            self.lam[self.lam_index[i]] = theta[i]
        return 0

    cdef double factor_now(self, bint schur, int *status) except? -1.0:
        """The factorization at the templates ``lam`` holds (see ``factorize``); the
        compiled PIRLS calls this once per iteration. Errors of the factor propagate."""
        cdef double logdet
        cdef Py_ssize_t j, nlev0 = self.lblocks.shape[0] // (self.k0 * self.k0)
        status[0] = -1
        self.last_small = False
        self.count += 1
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
                return logdet
        else:
            with nogil:
                _scatter_lambda(self.avals, self.blk_off, self.blk_tr, self.blk_tc,
                                self.blk_diag, self.lam, self.lam_off, self.kk, self.pos,
                                self.mx, self.tmp)
            if self.ext.obj != NULL:
                if self.ext.factorize(self.ext.obj, &logdet):
                    raise np.linalg.LinAlgError("random-effects block not positive definite")
                if self.rzxy.shape[1] > 0:
                    self.ext.solve(self.ext.obj, &self.rzxy[0, 0], self.rzxy.shape[0],
                                   self.rzxy.shape[1], False)
            else:
                self.factor.factorize()
                logdet = self.factor.logdet()
                self.factor.forward(self.rzxy)
        if schur:
            with nogil:
                status[0] = _schur_cholesky(self.xtxy, self.rzxy, self.r)
        return logdet

    def _make_small(self):
        # the CHOLMOD factor's permutation and pattern of L; where they cannot be had or
        # used (any error: this is only a faster route) CHOLMOD does every factorization
        try:
            lp, li, _, _ = self.factor.unit_factor()
            self.small = SimplicialFactor(self._m_pattern[0], self._m_pattern[1],
                                          self.factor.perm, lp, li)
        except Exception:
            self.small_allowed = False
            self.small = None

    cdef double factor_small(self) except? -1.0:
        """``factor_now`` with the SimplicialFactor in place of CHOLMOD (which keeps its
        last factorization): the templates' congruence into mx, the numeric factor, the
        forward solve of rzxy. Returns log det(L), NaN if M is not positive definite.
        Call only once ``small`` exists (a CHOLMOD factorization has been made)."""
        cdef Py_ssize_t j
        cdef int status
        self.last_small = True
        self.count += 1
        with nogil:
            _lambda_apply(self.ztxy, self.uoff, self.kk, self.nlev, self.lam, self.lam_off,
                          True, self.rzxy)
            _scatter_lambda(self.avals, self.blk_off, self.blk_tr, self.blk_tc,
                            self.blk_diag, self.lam, self.lam_off, self.kk, self.pos,
                            self.mx, self.tmp)
            status = self.small.factor_c(&self.mx[0])
            if status == 0:
                for j in range(self.rzxy.shape[1]):
                    self.small.forward_c(&self.rzxy[0, j])
        if status:
            return NAN
        return self.small.logdet_value

    cdef int backward_last(self, object b_arr, double *b) except -1:
        """b <- P' L'⁻¹ b (one vector; b_arr its q-by-1 Fortran array) with the factor of
        the last factorization: the SimplicialFactor, the level blocks, or CHOLMOD's."""
        cdef Py_ssize_t nlev0
        if self.last_small:
            self.small.backward_c(b)
        elif self.factor is None:
            nlev0 = self.lblocks.shape[0] // (self.k0 * self.k0)
            blockdiag_solve_c(&self.lblocks[0], self.k0, nlev0, b, True)
        elif self.ext.obj != NULL:
            self.ext.solve(self.ext.obj, b, self.rzxy.shape[0], 1, True)
        else:
            self.factor.backward(b_arr)
        return 0


# -- the factorizer from other compiled modules (see _blocked.pxd) ------------------------

cdef ThetaFactorizer _tf(object tf):
    if not isinstance(tf, ThetaFactorizer):
        raise TypeError("expected a ThetaFactorizer")
    return <ThetaFactorizer> tf


cdef int tf_set_theta(object tf, const double[::1] theta) except -1:
    return _tf(tf).set_theta(theta)


cdef double *tf_lam(object tf) except NULL:
    cdef ThetaFactorizer t = _tf(tf)
    if t.lam.shape[0] == 0:
        raise ValueError("the factorizer has no templates")
    return &t.lam[0]


cdef Py_ssize_t tf_lam_size(object tf) except -1:
    return _tf(tf).lam.shape[0]


cdef double tf_factor(object tf, bint small) except? -1.0:
    """The factorization at the templates set (no Schur complement): the
    SimplicialFactor's with ``small`` (where it exists), else the workspace's own."""
    cdef ThetaFactorizer t = _tf(tf)
    cdef int status
    cdef double logdet
    if small and t.small is not None:
        return t.factor_small()
    logdet = t.factor_now(False, &status)
    if small and t.small_allowed and t.factor is not None:
        # the pattern of L exists once CHOLMOD has factored: the next ones are ours
        t._make_small()
    return logdet


cdef bint tf_has_small(object tf) except -1:
    return _tf(tf).small is not None


cdef int tf_backward(object tf, object b_arr, double *b) except -1:
    return _tf(tf).backward_last(b_arr, b)


cdef double tf_factor_at(object tf, const double *theta, Py_ssize_t n, int *status) except? -1.0:
    """``factorize(theta, schur=True)`` from a C array: the compiled search's evaluation."""
    cdef ThetaFactorizer t = _tf(tf)
    cdef Py_ssize_t i
    if n != t.lam_index.shape[0]:
        raise ValueError("theta has the wrong length")
    for i in range(n):
        t.lam[t.lam_index[i]] = theta[i]
    return t.factor_now(True, status)


cdef int tf_arrays(object tf, TfArrays *out) except -1:
    cdef ThetaFactorizer t = _tf(tf)
    if t.r.shape[0] == 0 or t.rzxy.shape[0] == 0:
        raise ValueError("the factorizer has no products bound")
    out.ztxy = &t.ztxy[0, 0]
    out.rzxy = &t.rzxy[0, 0]
    out.r = &t.r[0, 0]
    out.lblocks = &t.lblocks[0] if t.lblocks.shape[0] else NULL
    out.avals = &t.avals[0] if t.avals.shape[0] else NULL
    out.lam = &t.lam[0]
    out.q, out.m = t.rzxy.shape[0], t.r.shape[0]
    out.k0 = t.k0
    out.nlev0 = t.lblocks.shape[0] // (t.k0 * t.k0)
    out.blockdiag = t.factor is None
    return 0


cdef int tf_lambda_times(object tf, const double *u, double *out) except -1:
    """out = Λu at the templates last set (u and out of length q)."""
    cdef ThetaFactorizer t = _tf(tf)
    lambda_times_c(&t.lam[0], &t.lam_off[0], &t.uoff[0], &t.kk[0], &t.nlev[0],
                   <int> t.kk.shape[0], u, out)
    return 0


cdef void inverse_from_lower(const double *lo, int k, double *li, double *minv) noexcept nogil:
    """minv = (lo lo')⁻¹ for a lower-triangular k by k lo (column-major); li is scratch."""
    cdef int a, c, e
    cdef double s
    for c in range(k):                  # li = lo⁻¹, column by column
        for e in range(k):
            if e < c:
                li[e + c * k] = 0.0
                continue
            s = 1.0 if e == c else 0.0
            for a in range(c, e):
                s -= lo[e + a * k] * li[a + c * k]
            li[e + c * k] = s / lo[e + e * k]
    for c in range(k):                  # minv = li' li
        for e in range(k):
            s = 0.0
            for a in range(e if e > c else c, k):
                s += li[a + e * k] * li[a + c * k]
            minv[e + c * k] = s

# -- the block pattern in one call -------------------------------------------------------
#
# _pattern.build_pattern's arrays for the terms as they come from the design: on a small
# model its NumPy construction was ~45 small calls (penicillin: 60 µs back to back, 130
# after a pause, when every distinct NumPy path runs cold); here it is one. The NumPy
# construction stays as the twin (_pattern.build_pattern_numpy) and builds whatever this
# declines; tests/test_pattern_compiled.py holds the two together bit for bit.

cdef struct _TermIn:
    const char *codes           # n level codes at stride cstride, 4 or 8 bytes each
    Py_ssize_t cstride
    bint cwide
    const char *z               # n-by-k float64 at strides zs0, zs1
    Py_ssize_t zs0, zs1
    int k, nlev


cdef inline i64 _code_at(const _TermIn *t, Py_ssize_t i) noexcept nogil:
    if t.cwide:
        return (<const i64 *> (t.codes + i * t.cstride))[0]
    return (<const int *> (t.codes + i * t.cstride))[0]


cdef object _new_array(int nd, cnp.npy_intp d0, cnp.npy_intp d1, int typenum):
    cdef cnp.npy_intp dims[2]
    dims[0] = d0
    dims[1] = d1
    return cnp.PyArray_EMPTY(nd, dims, typenum, 0)


cdef inline void *_data(object arr) noexcept:
    return cnp.PyArray_DATA(<cnp.ndarray> arr)


cdef int _terms_in(object codes, object z, object nlevels, _TermIn *terms,
                   Py_ssize_t nterm, Py_ssize_t *n_out) except -1:
    """Reads the terms into ``terms``; returns 1 if they are all of the kinds the compiled
    builder takes (ndarrays: 1-d signed 4- or 8-byte codes, one row count, 2-d float64
    columns; integer level counts from 1 to 2³¹ - 2), else 0."""
    cdef Py_ssize_t t, n = -1
    cdef object c, zt, nl
    cdef cnp.ndarray ca, za
    cdef long long nlv
    for t in range(nterm):
        c = codes[t]
        zt = z[t]
        if not (cnp.PyArray_Check(c) and cnp.PyArray_Check(zt)):
            return 0
        ca = <cnp.ndarray> c
        za = <cnp.ndarray> zt
        if (cnp.PyArray_NDIM(ca) != 1 or not cnp.PyArray_ISINTEGER(ca)
                or not cnp.PyArray_ISSIGNED(ca)
                or (cnp.PyArray_ITEMSIZE(ca) != 4 and cnp.PyArray_ITEMSIZE(ca) != 8)
                or not cnp.PyArray_ISNOTSWAPPED(ca) or not cnp.PyArray_ISALIGNED(ca)):
            return 0
        if (cnp.PyArray_NDIM(za) != 2 or cnp.PyArray_TYPE(za) != cnp.NPY_DOUBLE
                or not cnp.PyArray_ISNOTSWAPPED(za) or not cnp.PyArray_ISALIGNED(za)):
            return 0
        if t == 0:
            n = cnp.PyArray_DIMS(ca)[0]
        if cnp.PyArray_DIMS(ca)[0] != n or cnp.PyArray_DIMS(za)[0] != n:
            return 0
        if cnp.PyArray_DIMS(za)[1] < 1 or cnp.PyArray_DIMS(za)[1] > 1 << 20:
            return 0
        nl = nlevels[t]
        if type(nl) is not int and not isinstance(nl, np.integer):
            return 0
        try:
            nlv = nl
        except OverflowError:
            return 0
        if nlv < 1 or nlv >= 2147483647:
            return 0
        terms[t].codes = <const char *> cnp.PyArray_DATA(ca)
        terms[t].cstride = cnp.PyArray_STRIDES(ca)[0]
        terms[t].cwide = cnp.PyArray_ITEMSIZE(ca) == 8
        terms[t].z = <const char *> cnp.PyArray_DATA(za)
        terms[t].zs0 = cnp.PyArray_STRIDES(za)[0]
        terms[t].zs1 = cnp.PyArray_STRIDES(za)[1]
        terms[t].k = <int> cnp.PyArray_DIMS(za)[1]
        terms[t].nlev = <int> nlv
    n_out[0] = n
    return 1


cdef int _rows_in(const _TermIn *terms, Py_ssize_t nterm, Py_ssize_t n, int ktot,
                  int *codes_out, double *zcat) noexcept nogil:
    """codes_out (nterm-by-n) <- the codes as int32, zcat (n-by-ktot, C order) <- the terms'
    columns side by side. Returns 1 if a code lies outside its term's levels, else 0."""
    cdef Py_ssize_t t, i
    cdef i64 code
    cdef int a, col = 0
    cdef const _TermIn *tm
    for t in range(nterm):
        tm = &terms[t]
        for i in range(n):
            code = _code_at(tm, i)
            if code < 0 or code >= tm.nlev:
                return 1
            codes_out[t * n + i] = <int> code
        for i in range(n):
            for a in range(tm.k):
                zcat[i * ktot + col + a] = (<const double *> (tm.z + i * tm.zs0 + a * tm.zs1))[0]
        col += tm.k
    return 0


cdef int _cmp_i64(const void *a, const void *b) noexcept nogil:
    cdef i64 x = (<const i64 *> a)[0], y = (<const i64 *> b)[0]
    return (x > y) - (x < y)


cdef i64 _pair_blocks(const int *ctr, const int *ctc, Py_ssize_t n, int nlr, int nlc,
                      i64 size, i64 nvals, int *table, i64 *keys, i64 *rowoff, int *lr,
                      int *lc) noexcept nogil:
    """The blocks of an off-diagonal term pair: their levels (lr, lc) in increasing key
    ``lr * nlc + lc``, and ``rowoff`` <- nvals + size * (the block of each row): the
    sorted distinct keys and each row's index among them, as _pattern._unique_inverse
    finds them. With ``table`` (nlr * nlc ints) by its presence table, which then holds
    each key's block; else (table NULL: a table that would be large for the rows) by
    sorting the rows' keys in ``keys`` (n of them) and a binary search per row. Returns
    the number of blocks."""
    cdef Py_ssize_t i, lo, hi, mid
    cdef i64 key, ntab = <i64> nlr * nlc
    cdef int nb = 0, r, c
    if table == NULL:
        for i in range(n):
            keys[i] = <i64> ctr[i] * nlc + ctc[i]
        qsort(keys, n, sizeof(i64), _cmp_i64)
        for i in range(n):
            if i == 0 or keys[i] != keys[nb - 1]:
                keys[nb] = keys[i]
                lr[nb] = <int> (keys[i] // nlc)
                lc[nb] = <int> (keys[i] % nlc)
                nb += 1
        for i in range(n):
            key = <i64> ctr[i] * nlc + ctc[i]
            lo, hi = 0, nb - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if keys[mid] < key:
                    lo = mid + 1
                else:
                    hi = mid
            rowoff[i] = nvals + size * lo
        return nb
    memset(table, 0, ntab * sizeof(int))
    for i in range(n):
        table[<i64> ctr[i] * nlc + ctc[i]] = 1
    key = 0
    for r in range(nlr):
        for c in range(nlc):
            if table[key]:
                table[key] = nb
                lr[nb] = r
                lc[nb] = c
                nb += 1
            key += 1
    for i in range(n):
        rowoff[i] = nvals + size * table[<i64> ctr[i] * nlc + ctc[i]]
    return nb


cdef void _csc_entries(const int *kk, const i64 *uoff, const i64 *blk_off, const int *blk_tr,
                       const int *blk_tc, const int *lr, const int *lc, Py_ssize_t nblk,
                       int *indptr, int *indices, i64 *pos, bint fill) noexcept nogil:
    """M's lower CSC pattern from the blocks (the entries on or below the diagonal; pos -1
    for the rest). Without ``fill``: indptr[j + 1] <- the entries of column j. With it
    (indptr[j] then being where column j starts, and moved on to where it ends): indices,
    pos. The blocks come in pair order (tr ascending, each tc's pair after the pairs of
    lower tr), each pair's in increasing (lr, lc) and a block's entries column by column,
    so the entries of one column come in increasing row: a counting sort by column is the
    NumPy twin's sort by (column, row)."""
    cdef Py_ssize_t b
    cdef int kr, kc, a, d
    cdef i64 row0, col, row, v
    for b in range(nblk):
        kr = kk[blk_tr[b]]
        kc = kk[blk_tc[b]]
        row0 = uoff[blk_tr[b]] + <i64> lr[b] * kr
        for d in range(kc):
            col = uoff[blk_tc[b]] + <i64> lc[b] * kc + d
            v = blk_off[b] + <i64> d * kr
            for a in range(kr):
                row = row0 + a
                if not fill:
                    if row >= col:
                        indptr[col + 1] += 1
                elif row >= col:
                    indices[indptr[col]] = <int> row
                    pos[v + a] = indptr[col]
                    indptr[col] += 1
                else:
                    pos[v + a] = -1


def pattern_fields(codes, z, nlevels):
    """The fields of _pattern.build_pattern's pattern for these terms (a dict, with the
    same arrays bit for bit), or None where it takes the NumPy construction
    (_pattern.build_pattern_numpy, the twin): terms not ndarrays of the usual kinds, codes
    outside their levels, or possibly 2³¹ or more values.

    One term: kk, nlev, uoff, zoff, zcat, codes, nvals, q and no CSC pattern (the fields a
    _pattern._OneTermPattern is made with). Several: every BlockPattern field."""
    cdef Py_ssize_t nterm = len(codes), n = 0, t, tr, tc, p, npair, nblk, b, i
    if nterm < 1 or len(z) != nterm or len(nlevels) != nterm:
        return None
    cdef _TermIn *terms = <_TermIn *> malloc(nterm * sizeof(_TermIn))
    if terms == NULL:
        raise MemoryError()
    cdef int *table = NULL
    cdef int *blr = NULL
    cdef int *blc = NULL
    cdef i64 *pair_nb = NULL
    cdef i64 *keys = NULL
    cdef bint sorted_pairs = False
    cdef i64 q = 0, nvals = 0, vmax = 0, size, ntab, maxtab = 1, cap = 0, off, nnz
    cdef int ktot = 0, bad, nb
    cdef int *kk_p
    cdef int *nlev_p
    cdef int *zoff_p
    cdef i64 *uoff_p
    cdef int *codes_p
    cdef int *ptr_p
    cdef int *ptr_tr
    cdef int *ptr_tc
    cdef i64 *rowoff_p
    cdef i64 *boff_p
    cdef int *btr_p
    cdef int *btc_p
    cdef char *bdiag_p
    cdef double *zcat_p
    cdef int *ind_p
    cdef i64 *pos_p
    try:
        if not _terms_in(codes, z, nlevels, terms, nterm, &n):
            return None
        npair = nterm * (nterm + 1) // 2
        # bounds: a diagonal pair has a block per level, another at most one per row
        for tr in range(nterm):
            ktot += terms[tr].k
            q += <i64> terms[tr].k * terms[tr].nlev
            cap += terms[tr].nlev
            vmax += <i64> terms[tr].k * terms[tr].k * terms[tr].nlev
            for tc in range(tr):
                ntab = <i64> terms[tr].nlev * terms[tc].nlev
                if ntab <= 4 * n + 1024:       # the twin's choice of presence table
                    maxtab = max(maxtab, ntab)
                else:
                    sorted_pairs = True
                cap += min(<i64> n, ntab)
                vmax += min(<i64> n, ntab) * terms[tr].k * terms[tc].k
        if q >= 2147483647 or vmax >= 2147483647:
            return None
        kk = _new_array(1, nterm, 0, cnp.NPY_INT32)
        nlev = _new_array(1, nterm, 0, cnp.NPY_INT32)
        uoff = _new_array(1, nterm, 0, cnp.NPY_INT64)
        zoff = _new_array(1, nterm, 0, cnp.NPY_INT32)
        kk_p, nlev_p = <int *> _data(kk), <int *> _data(nlev)
        uoff_p, zoff_p = <i64 *> _data(uoff), <int *> _data(zoff)
        for t in range(nterm):
            kk_p[t] = terms[t].k
            nlev_p[t] = terms[t].nlev
            uoff_p[t] = uoff_p[t - 1] + <i64> terms[t - 1].k * terms[t - 1].nlev if t else 0
            zoff_p[t] = zoff_p[t - 1] + terms[t - 1].k if t else 0
        zcat = _new_array(2, n, ktot, cnp.NPY_DOUBLE)
        codes_arr = _new_array(2, nterm, n, cnp.NPY_INT32)
        codes_p = <int *> _data(codes_arr)
        zcat_p = <double *> _data(zcat)
        with nogil:
            bad = _rows_in(terms, nterm, n, ktot, codes_p, zcat_p)
        if bad:
            return None
        if nterm == 1:
            nvals = vmax
            return dict(kk=kk, nlev=nlev, uoff=uoff, zoff=zoff, zcat=zcat, codes=codes_arr,
                        nvals=nvals, indptr=None, indices=None, pos=None, q=q)

        # every term pair's blocks, and where each row adds to them
        pair_tr = _new_array(1, npair, 0, cnp.NPY_INT32)
        pair_tc = _new_array(1, npair, 0, cnp.NPY_INT32)
        rowoff = _new_array(2, npair, n, cnp.NPY_INT64)
        ptr_tr, ptr_tc = <int *> _data(pair_tr), <int *> _data(pair_tc)
        rowoff_p = <i64 *> _data(rowoff)
        table = <int *> malloc(maxtab * sizeof(int))
        if sorted_pairs:
            keys = <i64 *> malloc(n * sizeof(i64) + 1)
        blr = <int *> malloc(cap * sizeof(int) + 1)
        blc = <int *> malloc(cap * sizeof(int) + 1)
        pair_nb = <i64 *> malloc(npair * sizeof(i64))
        if (table == NULL or blr == NULL or blc == NULL or pair_nb == NULL
                or (sorted_pairs and keys == NULL)):
            raise MemoryError()
        nvals = 0
        nblk = 0
        p = 0
        with nogil:
            for tr in range(nterm):
                for tc in range(tr + 1):
                    ptr_tr[p] = <int> tr
                    ptr_tc[p] = <int> tc
                    size = <i64> terms[tr].k * terms[tc].k
                    if tr == tc:
                        nb = terms[tr].nlev
                        for i in range(n):
                            rowoff_p[p * n + i] = nvals + size * codes_p[tr * n + i]
                        for b in range(nb):
                            blr[nblk + b] = <int> b
                            blc[nblk + b] = <int> b
                    else:
                        ntab = <i64> terms[tr].nlev * terms[tc].nlev
                        nb = <int> _pair_blocks(&codes_p[tr * n], &codes_p[tc * n], n,
                                                terms[tr].nlev, terms[tc].nlev, size, nvals,
                                                table if ntab <= 4 * n + 1024 else NULL,
                                                keys, &rowoff_p[p * n], &blr[nblk], &blc[nblk])
                    pair_nb[p] = nb
                    nblk += nb
                    nvals += nb * size
                    p += 1

        blk_off = _new_array(1, nblk, 0, cnp.NPY_INT64)
        blk_tr = _new_array(1, nblk, 0, cnp.NPY_INT32)
        blk_tc = _new_array(1, nblk, 0, cnp.NPY_INT32)
        blk_diag = _new_array(1, nblk, 0, cnp.NPY_INT8)
        pos = _new_array(1, nvals, 0, cnp.NPY_INT64)
        indptr = _new_array(1, q + 1, 0, cnp.NPY_INT32)
        boff_p, btr_p = <i64 *> _data(blk_off), <int *> _data(blk_tr)
        btc_p, bdiag_p = <int *> _data(blk_tc), <char *> _data(blk_diag)
        ptr_p = <int *> _data(indptr)
        with nogil:
            b = 0
            off = 0
            for p in range(npair):
                size = <i64> kk_p[ptr_tr[p]] * kk_p[ptr_tc[p]]
                for i in range(pair_nb[p]):
                    boff_p[b] = off
                    btr_p[b] = ptr_tr[p]
                    btc_p[b] = ptr_tc[p]
                    bdiag_p[b] = ptr_tr[p] == ptr_tc[p]
                    off += size
                    b += 1
            memset(ptr_p, 0, (q + 1) * sizeof(int))
            _csc_entries(kk_p, uoff_p, boff_p, btr_p, btc_p, blr, blc, nblk, ptr_p,
                         NULL, NULL, False)
            for i in range(q):
                ptr_p[i + 1] += ptr_p[i]
        nnz = ptr_p[q]
        indices = _new_array(1, nnz, 0, cnp.NPY_INT32)
        ind_p, pos_p = <int *> _data(indices), <i64 *> _data(pos)
        with nogil:
            # ptr_p[j + 1] <- where column j starts: the fill's cursor of column j, which
            # it moves on to where the column ends, indptr's own entry
            for i in range(q, 0, -1):
                ptr_p[i] = ptr_p[i - 1]
            _csc_entries(kk_p, uoff_p, boff_p, btr_p, btc_p, blr, blc, nblk, &ptr_p[1],
                         ind_p, pos_p, True)
        return dict(kk=kk, nlev=nlev, uoff=uoff, zoff=zoff, zcat=zcat, codes=codes_arr,
                    pair_tr=pair_tr, pair_tc=pair_tc, rowoff=rowoff, blk_off=blk_off,
                    blk_tr=blk_tr, blk_tc=blk_tc, blk_diag=blk_diag, nvals=nvals,
                    indptr=indptr, indices=indices, pos=pos)
    finally:
        free(terms)
        free(table)
        free(blr)
        free(blc)
        free(pair_nb)
        free(keys)


def zero_vectors(*sizes):
    """A float64 zero vector of each size (numpy.zeros(size) for each) in one call: the
    workspace's value arrays, made where a small model's set-up pays for every NumPy call."""
    cdef cnp.npy_intp dims[1]
    out = []
    for size in sizes:
        dims[0] = size
        if dims[0] < 0:
            raise ValueError("negative dimensions are not allowed")
        out.append(cnp.PyArray_ZEROS(1, dims, cnp.NPY_DOUBLE, 0))
    return out


def stack_columns(x, y):
    """[x y] as a new C-ordered float64 n-by-(p + 1) array (numpy.ascontiguousarray of
    numpy.column_stack([x, y]), bit for bit; the twin in tests/test_pattern_compiled.py),
    for x an n-by-p and y a length-n float64 ndarray of any strides; None
    for anything else (the caller takes numpy.column_stack). A small model's
    ``set_products`` paid more for column_stack's Python-level dispatch, cold, than for
    the sums themselves."""
    if not (cnp.PyArray_Check(x) and cnp.PyArray_Check(y)):
        return None
    cdef cnp.ndarray xa = x, ya = y
    if (cnp.PyArray_NDIM(xa) != 2 or cnp.PyArray_NDIM(ya) != 1
            or cnp.PyArray_TYPE(xa) != cnp.NPY_DOUBLE or cnp.PyArray_TYPE(ya) != cnp.NPY_DOUBLE
            or not cnp.PyArray_ISNOTSWAPPED(xa) or not cnp.PyArray_ISNOTSWAPPED(ya)
            or not cnp.PyArray_ISALIGNED(xa) or not cnp.PyArray_ISALIGNED(ya)):
        return None
    cdef Py_ssize_t n = cnp.PyArray_DIMS(xa)[0], p = cnp.PyArray_DIMS(xa)[1], i, j
    if cnp.PyArray_DIMS(ya)[0] != n:
        return None
    cdef Py_ssize_t xs0 = cnp.PyArray_STRIDES(xa)[0], xs1 = cnp.PyArray_STRIDES(xa)[1]
    cdef Py_ssize_t ys = cnp.PyArray_STRIDES(ya)[0]
    cdef const char *xp = <const char *> cnp.PyArray_DATA(xa)
    cdef const char *yp = <const char *> cnp.PyArray_DATA(ya)
    out = _new_array(2, n, p + 1, cnp.NPY_DOUBLE)
    cdef double *o = <double *> _data(out)
    with nogil:
        for i in range(n):
            for j in range(p):
                o[i * (p + 1) + j] = (<const double *> (xp + i * xs0 + j * xs1))[0]
            o[i * (p + 1) + p] = (<const double *> (yp + i * ys))[0]
    return out

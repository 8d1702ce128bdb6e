# cython: language_level=3
"""The exact gradient of a several-term LMM's objective over θ, through the dense tail.

The notation of _lmm_gradient.py: C = Z'WZ, M = Λ'CΛ + I, and per term t the sums over
its levels m of

    K_mm = Σ_i C_mi T_s(i) (M⁻¹)_im          (K = CΛM⁻¹; i runs over C's blocks in row m)

give the log-determinant's part of the gradient. They need M⁻¹ only on C's block pattern,
which is M's. With term 0 eliminated level by level (_densetail.pyx: M = [[A, B'], [B, Cₜ]],
A_l = L_l L_l', W_l = L_l⁻¹B_l', S = Cₜ - W'W) and R_l the tail rows level l of term 0
meets,

    (M⁻¹)_ll       = A_l⁻¹ + Ỹ_l W̃_l'           Ỹ_l = L_l⁻ᵀ W_l S⁻¹[R_l, R_l]
    (M⁻¹)[l, R_l]  = -Ỹ_l                       W̃_l = L_l⁻ᵀ W_l   (both k₀-by-n_l)
    tail blocks    = S⁻¹

so beyond S⁻¹ (LAPACK's dpotri on the tail's factor, in DenseTailFactor.tail_inverse)
each level of term 0 costs k₀n_l² (the same as its share of S), and the tail one pass over
C's stored entries. The residual and REML parts need û (and for REML V = M⁻¹Λ'Z'WX), here
from the same blocks (M⁻¹b: z₀ = L_A⁻¹b₀, x_r = S⁻¹(b_r - W'z₀), x₀ = L_A⁻ᵀ(z₀ - W x_r),
with L_l and W recomputed from M's values, as the factor does not expose its own), and
one product of C with Λ[V û].

The Y_l = W_l S⁻¹[R_l, R_l] are made column by column of S⁻¹ (each column serving every
level that meets its row, while it is in cache from the product S⁻¹b), not level by
level (n_l scattered reads per row from all of S⁻¹): on insteval (S⁻¹ 10 MB) the pass
took 8 instead of 21 ms. Only S⁻¹'s lower triangle is read.

Blocks are column-major, as in _blocked.pyx: entry (e, a) of a k-by-k block at e + a·k;
θ's templates T_t sit at ``lam[lam_off[t]:]`` that way, and so do the sums written here.
"""
from libc.math cimport log, sqrt, isfinite, INFINITY, NAN, M_PI
from libc.stdlib cimport malloc, realloc, free

from cpython.pycapsule cimport PyCapsule_GetPointer

from mixedmodels._linalg._blocked cimport (blockdiag_solve_c, tf_factor_at,
                                          tf_arrays, TfArrays, inverse_from_lower,
                                          tf_backward, tf_lambda_times, ExternalFactor)

import numpy as np
cimport numpy as cnp

cnp.import_array()

ctypedef long long i64

cdef enum:
    # up to this many tail rows S⁻¹ (32 KB) stays in L1, and reading it level by level
    # costs no more than by rows (_scalar_term0_traces)
    _LEVEL_MAJOR_ROWS = 64


cdef inline int _term_of(const i64[::1] uoff, int nterm, Py_ssize_t x) noexcept nogil:
    """The term of u index x."""
    cdef int t = nterm - 1
    while t > 0 and x < uoff[t]:
        t -= 1
    return t


cdef inline double _lower(const double *a, Py_ssize_t n, Py_ssize_t i,
                          Py_ssize_t j) noexcept nogil:
    """Entry (i, j) of the symmetric n-by-n a (column-major) from its lower triangle."""
    return a[i + j * n] if i >= j else a[j + i * n]


cdef void _lower_solve(const double *lo, int k, double *x) noexcept nogil:
    """x <- L⁻¹x for a k-vector."""
    cdef int a, c
    cdef double v
    for c in range(k):
        v = x[c]
        for a in range(c):
            v -= lo[c + a * k] * x[a]
        x[c] = v / lo[c + c * k]


cdef void _lower_t_solve(const double *lo, int k, double *x) noexcept nogil:
    """x <- L⁻ᵀx for a k-vector."""
    cdef int a, c
    cdef double v
    for c in range(k - 1, -1, -1):
        v = x[c]
        for a in range(c + 1, k):
            v -= lo[a + c * k] * x[a]
        x[c] = v / lo[c + c * k]


cdef class DenseTailGradient:
    """The gradient of a several-term LMM's objective over θ through the dense tail, over
    arrays bound once (unpacking a memoryview argument costs about a microsecond, more
    than the arithmetic on a small model), in one call per θ: :meth:`gradient`.

    Bound: M's lower CSC pattern (``indptr``, ``indices``; term 0 first, its columns
    holding their own level's rows then the same tail rows, as DenseTailFactor takes it)
    and its values ``mx`` at θ; C = Z'WZ, whose value at slot i is
    ``avals[aval_at[i]]``; θ's templates (``lam``, written in place by the workspace at
    every θ, ``lam_off``, ``lam_index``), ``kk`` and ``uoff`` per term; and with
    :meth:`bind_products` Z'W[X y] (q-by-m) and the m-square upper factor r of the
    Schur complement that the factorization leaves.

    NumPy twin: _lmm_gradient.dense_tail_sums_numpy.
    """
    cdef const int[::1] indptr, indices, kk
    cdef const double[::1] mx, avals, lam
    cdef const i64[::1] aval_at, lam_off, lam_index, uoff
    cdef const double[::1, :] ztxy
    cdef const double[:, ::1] r
    cdef double[:, ::1] sums
    cdef object sums_array
    cdef int k0, nterm, maxnr
    cdef bint level_major       # Y_l made level by level (_scalar_term0_traces)
    cdef Py_ssize_t q, q0, rdim, nslot, m
    cdef double *l0             # L_l per level of term 0, column-major k0-by-k0
    cdef double *w              # W_l = L_l⁻¹B_l', at term 0's tail slots
    cdef double *ys             # Y_l = W_l S⁻¹[R_l, R_l], at the same slots
    cdef Py_ssize_t *by_row     # term 0's tail slots of its levels' first columns, by row
    cdef Py_ssize_t *by_row_lev # the level of each
    cdef Py_ssize_t *by_row_ptr # where each tail row's run starts in by_row (r + 1)
    cdef double *scratch        # one level's (M⁻¹)_ll, C_ll, T₀(M⁻¹)_ll, W̃_l, Ỹ_l
    # REML: m columns, else the first alone (û's)
    cdef double *xb             # q-by-m: Λ'Z'W[X y], then M⁻¹ of it: [V, M⁻¹Λ'Z'Wy]
    cdef double *xh             # q-by-m: Λ[V û], then V RX⁻¹
    cdef double *cxh            # q-by-m: CΛ[V û], then [Wₓ RX⁻¹, Z'Wε]
    cdef double *tmp            # r-by-m
    cdef double *beta           # m
    cdef double *uu             # q: û
    cdef bint bound

    def __cinit__(self, *args, **kwargs):
        self.l0 = self.w = self.ys = self.scratch = NULL
        self.by_row = self.by_row_ptr = self.by_row_lev = NULL
        self.xb = self.xh = self.cxh = self.tmp = self.beta = self.uu = NULL
        self.bound = False

    def __dealloc__(self):
        self._free_products()
        free(self.l0)
        free(self.w)
        free(self.ys)
        free(self.scratch)
        free(self.by_row)
        free(self.by_row_ptr)
        free(self.by_row_lev)

    cdef void _free_products(self) noexcept:
        free(self.xb)
        free(self.xh)
        free(self.cxh)
        free(self.tmp)
        free(self.beta)
        free(self.uu)
        self.xb = self.xh = self.cxh = self.tmp = self.beta = self.uu = NULL

    def __init__(self, indptr, indices, mx, avals, aval_at, lam, lam_off, lam_index, kk, uoff):
        self.indptr = indptr
        self.indices = indices
        self.mx = mx
        self.avals = avals
        self.aval_at = aval_at
        self.lam = lam
        self.lam_off = lam_off
        self.lam_index = lam_index
        self.kk = kk
        self.uoff = uoff
        _check_pattern(self.indptr, self.indices, self.mx, self.avals, self.aval_at, self.lam,
                       self.lam_off, self.lam_index, self.kk, self.uoff)
        self.q = self.indptr.shape[0] - 1
        self.nslot = self.indices.shape[0]
        self.nterm = self.kk.shape[0]
        self.k0 = self.kk[0]
        self.q0 = self.uoff[1]
        self.rdim = self.q - self.q0
        cdef Py_ssize_t lev
        self.maxnr = 0
        for lev in range(self.q0 // self.k0):
            self.maxnr = max(self.maxnr, <int> (self.indptr[lev * self.k0 + 1]
                                                 - self.indptr[lev * self.k0] - self.k0))
        # a tail whose S⁻¹ sits in L1 need not be swept by rows (_sweep_tail)
        self.level_major = self.k0 == 1 and self.rdim <= _LEVEL_MAJOR_ROWS
        self.sums_array = np.zeros((3, self.lam.shape[0]))
        self.sums = self.sums_array
        self.l0 = <double *> malloc(max(self.q0 * self.k0, 1) * sizeof(double))
        self.w = <double *> malloc(max(self.nslot, 1) * sizeof(double))
        self.ys = <double *> malloc(max(self.nslot, 1) * sizeof(double))
        self.scratch = <double *> malloc((3 * self.k0 * self.k0 + 2 * self.k0 * self.maxnr)
                                         * sizeof(double))
        if self.l0 == NULL or self.w == NULL or self.ys == NULL or self.scratch == NULL:
            raise MemoryError()
        self._index_by_row()

    cdef _index_by_row(self):
        """by_row: the slots (in the first column of their level of term 0) of every tail
        row, row by row, so that S⁻¹'s columns can be swept once each."""
        cdef Py_ssize_t k0 = self.k0, rd = self.rdim, lev, t, x, base, nr
        self.by_row_ptr = <Py_ssize_t *> malloc((rd + 1) * sizeof(Py_ssize_t))
        if self.by_row_ptr == NULL:
            raise MemoryError()
        for x in range(rd + 1):
            self.by_row_ptr[x] = 0
        for lev in range(self.q0 // k0):
            base = self.indptr[lev * k0] + k0
            for t in range(self.indptr[lev * k0 + 1] - base):
                self.by_row_ptr[self.indices[base + t] - self.q0 + 1] += 1
        for x in range(rd):
            self.by_row_ptr[x + 1] += self.by_row_ptr[x]
        self.by_row = <Py_ssize_t *> malloc(max(self.by_row_ptr[rd], 1) * sizeof(Py_ssize_t))
        self.by_row_lev = <Py_ssize_t *> malloc(max(self.by_row_ptr[rd], 1) * sizeof(Py_ssize_t))
        if self.by_row == NULL or self.by_row_lev == NULL:
            raise MemoryError()
        for lev in range(self.q0 // k0):      # levels ascend, so do the runs
            base = self.indptr[lev * k0] + k0
            nr = self.indptr[lev * k0 + 1] - base
            for t in range(nr):
                x = self.indices[base + t] - self.q0
                self.by_row[self.by_row_ptr[x]] = base + t
                self.by_row_lev[self.by_row_ptr[x]] = lev
                self.by_row_ptr[x] += 1
        for x in range(rd, 0, -1):            # back to where each run starts
            self.by_row_ptr[x] = self.by_row_ptr[x - 1]
        self.by_row_ptr[0] = 0

    def bind_products(self, ztxy, r):
        """Bind Z'W[X y] (q-by-m, Fortran) and the upper factor r (m-by-m, C order)."""
        cdef const double[::1, :] z = ztxy
        cdef const double[:, ::1] rr = r
        cdef Py_ssize_t m = z.shape[1]
        if z.shape[0] != self.q or m < 1 or rr.shape[0] != m or rr.shape[1] != m:
            raise ValueError(f"ztxy must be ({self.q}, m) and r (m, m), m >= 1; got "
                             f"{z.shape[0]}-by-{m} and {rr.shape[0]}-by-{rr.shape[1]}")
        self._free_products()
        self.bound = False
        self.xb = <double *> malloc(self.q * m * sizeof(double))
        self.xh = <double *> malloc(self.q * m * sizeof(double))
        self.cxh = <double *> malloc(self.q * m * sizeof(double))
        self.tmp = <double *> malloc(self.rdim * m * sizeof(double))
        self.beta = <double *> malloc(m * sizeof(double))
        self.uu = <double *> malloc(self.q * sizeof(double))
        if (self.xb == NULL or self.xh == NULL or self.cxh == NULL or self.tmp == NULL
                or self.beta == NULL or self.uu == NULL):
            self._free_products()
            raise MemoryError()
        self.ztxy = z
        self.r = rr
        self.m = m
        self.bound = True

    @property
    def sums(self):
        """(3, len(lam)): Σ K_mm, Σ (Z'Wε)_m û_m' and Σ (Wₓ S⁻¹V')_mm per template entry
        [e, a] (laid out as lam), at the last :meth:`gradient`."""
        return self.sums_array.copy()

    def gradient(self, cnp.ndarray sinv not None, bint reml, double dfr):
        """The gradient over θ at the θ whose M is in ``mx`` and whose factorization left
        r, given S⁻¹ (the tail's Schur complement's inverse, r-by-r, Fortran order; only
        its lower triangle is read):

            2 (Σ K_mm - dfr/r² Σ (Z'Wε)_m û_m' - [reml] Σ (Wₓ S⁻¹V')_mm)  at lam_index.

        Raises LinAlgError if a level block A_l of term 0 is not positive definite."""
        # an ndarray, not a typed memoryview: acquiring one costs about a microsecond
        if not self.bound:
            raise ValueError("bind_products first")
        if (cnp.PyArray_TYPE(sinv) != cnp.NPY_DOUBLE or cnp.PyArray_NDIM(sinv) != 2
                or not cnp.PyArray_IS_F_CONTIGUOUS(sinv)
                or cnp.PyArray_DIM(sinv, 0) != self.rdim
                or cnp.PyArray_DIM(sinv, 1) != self.rdim):
            raise ValueError(f"sinv must be a Fortran-ordered {self.rdim}-by-{self.rdim} "
                             "float64 array")
        cdef cnp.npy_intp n = self.lam_index.shape[0]
        cdef cnp.ndarray grad = cnp.PyArray_EMPTY(1, &n, cnp.NPY_DOUBLE, 0)
        cdef const double *sp = <const double *> cnp.PyArray_DATA(sinv)
        cdef double *gp = <double *> cnp.PyArray_DATA(grad)
        cdef int status
        with nogil:
            status = self._run(sp, reml, dfr, gp)
        if status:
            raise np.linalg.LinAlgError("a level block of the first term is not positive "
                                        "definite")
        return grad

    cdef int _run(self, const double *sinv, bint reml, double dfr,
                  double *grad) noexcept nogil:
        cdef Py_ssize_t i, nlam = self.lam.shape[0], m = self.m
        cdef double scale
        for i in range(nlam):
            self.sums[0, i] = 0.0
            self.sums[1, i] = 0.0
            self.sums[2, i] = 0.0
        if self._levels():
            return 1
        reml = reml and m > 1
        self._beta()
        self._forward(m if reml else 1)
        self._sweep_tail(sinv, m if reml else 1)
        self._backward(m if reml else 1)
        self._term0_traces(sinv)
        self._tail_traces(sinv)
        self._residual_sums(reml)
        scale = dfr / (self.r[m - 1, m - 1] * self.r[m - 1, m - 1])
        for i in range(self.lam_index.shape[0]):
            grad[i] = 2.0 * (self.sums[0, self.lam_index[i]]
                             - scale * self.sums[1, self.lam_index[i]]
                             - self.sums[2, self.lam_index[i]])
        return 0

    cdef int _levels(self) noexcept nogil:
        """L_l (A_l = L_l L_l', A_l from M's values) and W_l = L_l⁻¹B_l' per level of term 0:
        the factor's own arithmetic, so the same bits, without chol_inplace's log per
        diagonal entry (on penicillin 24 logs, a fifth of this pass)."""
        cdef int k0 = self.k0, a, c, d, e
        cdef Py_ssize_t lev, j0, nr, t, base
        cdef double *lo
        cdef double v
        if k0 == 1:
            for lev in range(self.q0):
                base = self.indptr[lev]
                v = self.mx[base]
                if v <= 0.0:
                    return 1
                v = sqrt(v)
                self.l0[lev] = v
                for t in range(base + 1, self.indptr[lev + 1]):
                    self.w[t] = self.mx[t] / v
            return 0
        for lev in range(self.q0 // k0):
            j0 = lev * k0
            nr = self.indptr[j0 + 1] - self.indptr[j0] - k0
            lo = &self.l0[lev * k0 * k0]
            for c in range(k0):
                base = self.indptr[j0 + c]
                for a in range(c):
                    lo[a + c * k0] = 0.0
                for a in range(c, k0):
                    lo[a + c * k0] = self.mx[base + a - c]
            for d in range(k0):               # chol_inplace's loops
                v = lo[d + d * k0]
                for e in range(d):
                    v -= lo[d + e * k0] * lo[d + e * k0]
                if v <= 0.0:
                    return 1
                v = sqrt(v)
                lo[d + d * k0] = v
                for a in range(d + 1, k0):
                    for e in range(d):
                        lo[a + d * k0] -= lo[a + e * k0] * lo[d + e * k0]
                    lo[a + d * k0] /= v
            for t in range(nr):               # column c of the level holds row c of B_l'
                for c in range(k0):
                    base = self.indptr[j0 + c] + k0 - c + t
                    v = self.mx[base]
                    for e in range(c):
                        v -= lo[c + e * k0] * self.w[self.indptr[j0 + e] + k0 - e + t]
                    self.w[base] = v / lo[c + c * k0]
        return 0

    cdef void _beta(self) noexcept nogil:
        """β̂ = RX⁻¹rxy from the factor r."""
        cdef Py_ssize_t p = self.m - 1, i, j
        cdef double v
        for j in range(p - 1, -1, -1):
            v = self.r[j, p]
            for i in range(j + 1, p):
                v -= self.r[j, i] * self.beta[i]
            self.beta[j] = v / self.r[j, j]

    cdef void _forward(self, Py_ssize_t ncol) noexcept nogil:
        """The first half of xb = M⁻¹b, with b = Λ'Z'W[X y] (ncol = m, for REML's V) or
        b = Λ'Z'W(y - Xβ̂) (ncol = 1: û alone): z₀ = L_A⁻¹b₀ and b_r - W'z₀ in xb. The
        tail x_r = S⁻¹(b_r - W'z₀) follows in _sweep_tail, x₀ = L_A⁻ᵀ(z₀ - W x_r) in
        _backward."""
        cdef int k0 = self.k0, t, k, a, e, c
        cdef Py_ssize_t q = self.q, q0 = self.q0, p = self.m - 1
        cdef Py_ssize_t j, x, lev, j0, nr, tt, end, slot
        cdef double v
        cdef const double *tm
        cdef double *col
        cdef double *zr = self.cxh            # free until _residual_sums: Z'W(y - Xβ̂)
        if ncol == 1:
            for x in range(q):
                v = self.ztxy[x, p]
                for j in range(p):
                    v -= self.ztxy[x, j] * self.beta[j]
                zr[x] = v
        for t in range(self.nterm):           # b = Λ'(...)
            k = self.kk[t]
            tm = &self.lam[self.lam_off[t]]
            end = self.uoff[t + 1] if t + 1 < self.nterm else q
            for j in range(ncol):
                x = self.uoff[t]
                while x < end:
                    for a in range(k):
                        v = 0.0
                        for e in range(a, k):
                            v += tm[e + a * k] * (zr[x + e] if ncol == 1 else self.ztxy[x + e, j])
                        self.xb[x + a + j * q] = v
                    x += k
        for j in range(ncol):
            col = &self.xb[j * q]
            for lev in range(q0 // k0):       # z₀ = L_A⁻¹b₀, b_r -= W'z₀
                j0 = lev * k0
                nr = self.indptr[j0 + 1] - self.indptr[j0] - k0
                _lower_solve(&self.l0[lev * k0 * k0], k0, &col[j0])
                for c in range(k0):
                    slot = self.indptr[j0 + c] + k0 - c
                    v = col[j0 + c]
                    for tt in range(nr):
                        col[self.indices[slot + tt]] -= self.w[slot + tt] * v

    cdef void _backward(self, Py_ssize_t ncol) noexcept nogil:
        """x_r from tmp into xb, then x₀ = L_A⁻ᵀ(z₀ - W x_r)."""
        cdef int k0 = self.k0, c
        cdef Py_ssize_t q = self.q, q0 = self.q0, rd = self.rdim
        cdef Py_ssize_t j, x, lev, j0, nr, tt, slot
        cdef double v
        cdef double *col
        for j in range(ncol):
            col = &self.xb[j * q]
            for x in range(rd):
                col[q0 + x] = self.tmp[x + j * rd]
            for lev in range(q0 // k0):
                j0 = lev * k0
                nr = self.indptr[j0 + 1] - self.indptr[j0] - k0
                for c in range(k0):
                    slot = self.indptr[j0 + c] + k0 - c
                    v = 0.0
                    for tt in range(nr):
                        v += self.w[slot + tt] * col[self.indices[slot + tt]]
                    col[j0 + c] -= v
                _lower_t_solve(&self.l0[lev * k0 * k0], k0, &col[j0])

    cdef void _sweep_tail(self, const double *sinv, Py_ssize_t ncol) noexcept nogil:
        """One pass down the columns of S⁻¹'s lower triangle for two things: the tail of
        the solve, tmp = S⁻¹(b_r - W'z₀) (BLAS would first copy S⁻¹ into its packed
        layout, more traffic than the product for a few columns), and ys = Y_l =
        W_l S⁻¹[R_l, R_l] for every level l of term 0. The column of tail row x, in cache
        from the product, serves every level that meets x, where level by level Y would
        take n_l scattered reads per row from all of S⁻¹. (With ``level_major`` Y is
        left to _scalar_term0_traces.)"""
        cdef int k0 = self.k0, c
        cdef Py_ssize_t q0 = self.q0, q = self.q, rd = self.rdim, x, i, j, slot, j0
        cdef Py_ssize_t first, t, t2, nr, base
        cdef double v, wt, sv, bx
        cdef const double *col
        cdef const double *b
        cdef double *out
        cdef const int *rows
        cdef double *w = self.w
        cdef double *ys = self.ys
        if not self.level_major:
            for i in range(self.nslot):
                ys[i] = 0.0
        for x in range(rd * ncol):
            self.tmp[x] = 0.0
        for x in range(rd):
            col = &sinv[x * rd]               # col[i] = S⁻¹[i, x], read for i >= x
            for j in range(ncol):             # tmp += S⁻¹ b on the lower triangle
                b = &self.xb[q0 + j * q]
                out = &self.tmp[j * rd]
                bx = b[x]
                v = col[x] * bx
                for i in range(x + 1, rd):
                    out[i] += col[i] * bx
                    v += col[i] * b[i]
                out[x] += v
            if self.level_major:
                continue
            for i in range(self.by_row_ptr[x], self.by_row_ptr[x + 1]):
                slot = self.by_row[i]
                j0 = self.by_row_lev[i] * k0
                first = self.indptr[j0] + k0
                t = slot - first
                nr = self.indptr[j0 + 1] - first
                rows = &self.indices[first]
                if k0 == 1:
                    wt = w[slot]
                    v = wt * col[rows[t] - q0]
                    for t2 in range(t + 1, nr):
                        sv = col[rows[t2] - q0]
                        v += w[first + t2] * sv
                        ys[first + t2] += wt * sv
                    ys[slot] += v
                    continue
                for c in range(k0):
                    base = self.indptr[j0 + c] + k0 - c
                    wt = w[base + t]
                    v = wt * col[rows[t] - q0]
                    for t2 in range(t + 1, nr):
                        sv = col[rows[t2] - q0]
                        v += w[base + t2] * sv
                        ys[base + t2] += wt * sv
                    ys[base + t] += v

    cdef void _term0_traces(self, const double *sinv) noexcept nogil:
        """Adds to sums[0] the K_mm of term 0's levels and the tail's share of K_ii from C's
        blocks between them."""
        cdef int nterm = self.nterm, k0 = self.k0, s, ks, a, b, bb, c, e
        cdef Py_ssize_t q0 = self.q0, lev, j0, nr, t, base, rho
        cdef double v, cval
        cdef double *minv = self.scratch      # (M⁻¹)_ll
        cdef double *cll = minv + k0 * k0     # C_ll, both triangles
        cdef double *tm = cll + k0 * k0       # T₀(M⁻¹)_ll
        cdef double *wb = tm + k0 * k0        # W̃_l (column t: k0 values)
        cdef double *yb = wb + k0 * self.maxnr  # Y_l, then Ỹ_l
        cdef double *kt = &self.sums[0, 0]
        cdef const double *lo
        cdef const int *rows
        cdef const double *t0 = &self.lam[self.lam_off[0]]
        cdef const double *ts
        if k0 == 1:
            self._scalar_term0_traces(sinv)
            return
        for lev in range(q0 // k0):
            j0 = lev * k0
            nr = self.indptr[j0 + 1] - self.indptr[j0] - k0
            lo = &self.l0[lev * k0 * k0]
            rows = &self.indices[self.indptr[j0] + k0]
            for c in range(k0):
                base = self.indptr[j0 + c]
                for a in range(c, k0):
                    v = self.avals[self.aval_at[base + a - c]]
                    cll[a + c * k0] = v
                    cll[c + a * k0] = v
                for t in range(nr):
                    wb[c + t * k0] = self.w[base + k0 - c + t]
                    yb[c + t * k0] = self.ys[base + k0 - c + t]
            for t in range(nr):               # Ỹ_l = L_l⁻ᵀY_l, W̃_l = L_l⁻ᵀW_l
                _lower_t_solve(lo, k0, &yb[t * k0])
                _lower_t_solve(lo, k0, &wb[t * k0])
            for c in range(k0):               # (M⁻¹)_ll = A_l⁻¹ + Ỹ_l W̃_l'
                for a in range(k0):
                    minv[a + c * k0] = 1.0 if a == c else 0.0
                _lower_solve(lo, k0, &minv[c * k0])
                _lower_t_solve(lo, k0, &minv[c * k0])
                for a in range(k0):
                    v = 0.0
                    for t in range(nr):
                        v += yb[a + t * k0] * wb[c + t * k0]
                    minv[a + c * k0] += v
            for a in range(k0):               # K_ll += C_ll T₀ (M⁻¹)_ll
                for b in range(k0):
                    v = 0.0
                    for bb in range(b + 1):
                        v += t0[b + bb * k0] * minv[bb + a * k0]
                    tm[b + a * k0] = v
            for a in range(k0):
                for e in range(k0):
                    v = 0.0
                    for b in range(k0):
                        v += cll[e + b * k0] * tm[b + a * k0]
                    kt[self.lam_off[0] + e + a * k0] += v
            # blocks (i, l), i a tail level in R_l: (M⁻¹)[(s,i,b), (0,l,a)] = -Ỹ_l[a, t]
            for t in range(nr):
                rho = rows[t]
                s = _term_of(self.uoff, nterm, rho)
                ks = self.kk[s]
                b = <int> ((rho - self.uoff[s]) % ks)
                ts = &self.lam[self.lam_off[s]]
                for c in range(k0):
                    cval = self.avals[self.aval_at[self.indptr[j0 + c] + k0 - c + t]]
                    for a in range(k0):       # K_ll[c, a] += C_li[c, b] (T_s M⁻¹_il)[b, a]
                        v = 0.0
                        for bb in range(b + 1):
                            v -= ts[b + bb * ks] * yb[a + (t - b + bb) * k0]
                        kt[self.lam_off[0] + c + a * k0] += cval * v
                    for a in range(ks):       # K_ii[b, a] += C_il[b, c] (T₀ M⁻¹_li)[c, a]
                        v = 0.0
                        for e in range(c + 1):
                            v -= t0[c + e * k0] * yb[e + (t - b + a) * k0]
                        kt[self.lam_off[s] + b + a * ks] += cval * v

    cdef void _scalar_term0_traces(self, const double *sinv) noexcept nogil:
        """_term0_traces for a scalar term 0 (k₀ = 1: L_l, W̃_l and Ỹ_l are numbers per
        slot), the loops above without their k₀-sized inner ones. With ``level_major``
        Y_l is made here, level by level, where _sweep_tail would make it row by row:
        the same sums in the same order (row x = R_l[t] adds to Y_l[t] last), so the same
        bits, without the sweep's bookkeeping per (row, level) or a pass through ys."""
        cdef int nterm = self.nterm, s, ks, b, bb, a
        cdef Py_ssize_t lev, first, nr, t, t2, rho, bound, q0 = self.q0, rd = self.rdim
        cdef double lo, minv, v, y, cval, acc, wt, sv, k_own = 0.0
        cdef double *kt = &self.sums[0, 0]
        cdef const int *rows
        cdef double t0 = self.lam[self.lam_off[0]]
        cdef const double *ts
        cdef const double *col
        cdef const double *w
        cdef double *ys
        for lev in range(self.q0):
            first = self.indptr[lev] + 1
            nr = self.indptr[lev + 1] - first
            rows = &self.indices[first]
            lo = self.l0[lev]
            w = &self.w[first]
            minv = 1.0                        # L_l²(M⁻¹)_ll = 1 + Y_l W_l'
            if self.level_major:
                ys = self.scratch
                for t in range(nr):
                    ys[t] = 0.0
                for t in range(nr):           # _sweep_tail's loop at row R_l[t]
                    col = &sinv[(rows[t] - q0) * rd]
                    wt = w[t]
                    v = wt * col[rows[t] - q0]
                    for t2 in range(t + 1, nr):
                        sv = col[rows[t2] - q0]
                        v += w[t2] * sv
                        ys[t2] += wt * sv
                    ys[t] += v
                    minv += ys[t] * wt
            else:
                ys = &self.ys[first]
                for t in range(nr):
                    minv += ys[t] * w[t]
            v = self.avals[self.aval_at[first - 1]] * t0 * minv / (lo * lo)
            t = 0
            while t < nr:                     # (M⁻¹)[(s,i,b), l] = -Ỹ_l[t] = -Y_l[t] / L_l
                rho = rows[t]
                s = _term_of(self.uoff, nterm, rho)
                ks = self.kk[s]
                ts = &self.lam[self.lam_off[s]]
                if ks == 1:
                    # the run of term s's rows, its K sum in a register: through memory
                    # each slot waited on the last one's store; same order, same bits
                    bound = self.uoff[s + 1] if s + 1 < nterm else self.q
                    acc = kt[self.lam_off[s]]
                    while t < nr and rows[t] < bound:
                        cval = self.avals[self.aval_at[first + t]] / lo
                        y = ys[t]
                        v -= cval * ts[0] * y
                        acc -= cval * t0 * y
                        t += 1
                    kt[self.lam_off[s]] = acc
                    continue
                cval = self.avals[self.aval_at[first + t]] / lo
                b = <int> ((rho - self.uoff[s]) % ks)
                y = 0.0
                for bb in range(b + 1):
                    y += ts[b + bb * ks] * ys[t - b + bb]
                v -= cval * y
                for a in range(ks):
                    kt[self.lam_off[s] + b + a * ks] -= cval * t0 * ys[t - b + a]
                t += 1
            k_own += v
        kt[self.lam_off[0]] += k_own


    cdef void _tail_traces(self, const double *sinv) noexcept nogil:
        """Adds to sums[0] the K_mm of the tail's levels from C's blocks within the tail."""
        cdef int nterm = self.nterm, t, s, kt_, ks, a, b, bb, e, ee
        cdef Py_ssize_t q0 = self.q0, rd = self.rdim, j, jm, slot, rho, ri
        cdef double v, cval
        cdef double *kt = &self.sums[0, 0]
        cdef const double *tt
        cdef const double *ts
        for j in range(q0, self.q):
            t = _term_of(self.uoff, nterm, j)
            kt_ = self.kk[t]
            e = <int> ((j - self.uoff[t]) % kt_)
            jm = j - e - q0                   # level m's first tail column
            tt = &self.lam[self.lam_off[t]]
            for slot in range(self.indptr[j], self.indptr[j + 1]):
                rho = self.indices[slot]
                s = _term_of(self.uoff, nterm, rho)
                ks = self.kk[s]
                b = <int> ((rho - self.uoff[s]) % ks)
                ri = rho - b - q0             # level i's first tail column
                ts = &self.lam[self.lam_off[s]]
                cval = self.avals[self.aval_at[slot]]   # C[(s,i,b), (t,m,e)]
                for a in range(kt_):          # K_mm[e, a] += c (T_s S⁻¹_im)[b, a]
                    v = 0.0
                    for bb in range(b + 1):
                        v += ts[b + bb * ks] * _lower(sinv, rd, ri + bb, jm + a)
                    kt[self.lam_off[t] + e + a * kt_] += cval * v
                if rho == j:
                    continue
                for a in range(ks):           # K_ii[b, a] += c (T_t S⁻¹_mi)[e, a]
                    v = 0.0
                    for ee in range(e + 1):
                        v += tt[e + ee * kt_] * _lower(sinv, rd, jm + ee, ri + a)
                    kt[self.lam_off[s] + b + a * ks] += cval * v

    cdef void _residual_sums(self, bint reml) noexcept nogil:
        """Adds to sums[1] Σ_m (Z'Wε)_m û_m' and (REML) to sums[2] Σ_m (Wₓ RX⁻¹)_m (V RX⁻¹)_m',
        per term, from xb ([V, M⁻¹Λ'Z'Wy] for REML, else û) and Wₓ = Z'WX - CΛV."""
        cdef int nterm = self.nterm, t, k, a, e
        cdef Py_ssize_t q = self.q, p = self.m - 1, ncol = self.m if reml else 1
        cdef Py_ssize_t uc = p if reml else 0         # û's column in xh and cxh
        cdef Py_ssize_t i, j, x, slot, rho, base, end
        cdef double v, cval, xj, acc, acc2
        cdef const double *tt
        cdef double *xi
        cdef double *ci
        cdef double *xb = self.xb
        cdef double *xh = self.xh
        cdef double *cxh = self.cxh
        cdef double *uu = self.uu
        cdef double *beta = self.beta
        for x in range(q):                    # û
            v = xb[x + uc * q]
            if reml:
                for j in range(p):
                    v -= xb[x + j * q] * beta[j]
            uu[x] = v
        for t in range(nterm):                # xh = Λ[V û] (REML) or Λû
            k = self.kk[t]
            tt = &self.lam[self.lam_off[t]]
            end = self.uoff[t + 1] if t + 1 < nterm else q
            for j in range(ncol):
                x = self.uoff[t]
                while x < end:
                    for e in range(k):
                        v = 0.0
                        for a in range(e + 1):
                            v += tt[e + a * k] * (uu[x + a] if j == uc else xb[x + a + j * q])
                        xh[x + e + j * q] = v
                    x += k
        for x in range(q * ncol):
            cxh[x] = 0.0
        for i in range(ncol):                 # cxh = C xh, C from its lower triangle
            xi = &xh[i * q]
            ci = &cxh[i * q]
            for j in range(q):
                # row j's sum in a register: through memory, each slot waited on the
                # last one's store (a fifth of this pass on penicillin); same order, bits
                xj = xi[j]
                acc = ci[j]
                for slot in range(self.indptr[j], self.indptr[j + 1]):
                    rho = self.indices[slot]
                    cval = self.avals[self.aval_at[slot]]
                    if rho == j:
                        acc += cval * xj
                    else:
                        ci[rho] += cval * xj
                        acc += cval * xi[rho]
                ci[j] = acc
        for x in range(q):                    # cxh[:, uc] <- Z'Wε; REML: cxh[:, :p] <- Wₓ
            v = self.ztxy[x, p] - cxh[x + uc * q]
            for j in range(p):
                v -= self.ztxy[x, j] * beta[j]
                if reml:
                    cxh[x + j * q] = self.ztxy[x, j] - cxh[x + j * q]
            cxh[x + uc * q] = v
        if reml:
            for x in range(q):                # xh[:, :p] <- V RX⁻¹, cxh[:, :p] <- Wₓ RX⁻¹
                for j in range(p):
                    v = xb[x + j * q]
                    cval = cxh[x + j * q]
                    for i in range(j):
                        v -= xh[x + i * q] * self.r[i, j]
                        cval -= cxh[x + i * q] * self.r[i, j]
                    xh[x + j * q] = v / self.r[j, j]
                    cxh[x + j * q] = cval / self.r[j, j]
        for t in range(nterm):
            k = self.kk[t]
            base = self.uoff[t]
            end = self.uoff[t + 1] if t + 1 < nterm else q
            if k == 1:                        # the two sums in registers, as above
                acc = self.sums[1, self.lam_off[t]]
                acc2 = self.sums[2, self.lam_off[t]]
                for x in range(base, end):
                    acc += cxh[x + uc * q] * uu[x]
                    if reml:
                        v = 0.0
                        for j in range(p):
                            v += cxh[x + j * q] * xh[x + j * q]
                        acc2 += v
                self.sums[1, self.lam_off[t]] = acc
                self.sums[2, self.lam_off[t]] = acc2
                continue
            while base < end:
                for a in range(k):
                    for e in range(k):
                        self.sums[1, self.lam_off[t] + e + a * k] += \
                            cxh[base + e + uc * q] * uu[base + a]
                        if reml:
                            v = 0.0
                            for j in range(p):
                                v += cxh[base + e + j * q] * xh[base + a + j * q]
                            self.sums[2, self.lam_off[t] + e + a * k] += v
                base += k


cdef _check_pattern(const int[::1] indptr, const int[::1] indices, const double[::1] mx,
                    const double[::1] avals, const i64[::1] aval_at, const double[::1] lam,
                    const i64[::1] lam_off, const i64[::1] lam_index, const int[::1] kk,
                    const i64[::1] uoff):
    """The pattern and the layout the loops rely on (they run without bounds checks)."""
    cdef Py_ssize_t q = indptr.shape[0] - 1, nslot = indices.shape[0]
    cdef Py_ssize_t i, t, nterm = kk.shape[0], end
    if nterm < 2 or uoff.shape[0] != nterm or lam_off.shape[0] != nterm or q < 1:
        raise ValueError("need two terms or more, with uoff and lam_off per term")
    for t in range(nterm):
        end = uoff[t + 1] if t + 1 < nterm else q
        if kk[t] < 1 or lam_off[t] < 0 or lam_off[t] + kk[t] * kk[t] > lam.shape[0]:
            raise ValueError("templates do not fit in lam")
        if uoff[t] < 0 or end <= uoff[t] or end > q or (end - uoff[t]) % kk[t]:
            raise ValueError("uoff does not cut u into whole levels of every term")
    if uoff[0] != 0:
        raise ValueError("uoff does not start at 0")
    if indptr[0] != 0 or indptr[q] != nslot or mx.shape[0] != nslot or aval_at.shape[0] != nslot:
        raise ValueError("mx, aval_at and the pattern differ in length")
    for i in range(q):
        if indptr[i + 1] < indptr[i]:
            raise ValueError("indptr decreases")
    for i in range(q):
        for t in range(indptr[i], indptr[i + 1]):
            if indices[t] < i or indices[t] >= q:
                raise ValueError("the pattern is not a lower triangle")
    for i in range(nslot):
        if aval_at[i] < 0 or aval_at[i] >= avals.shape[0]:
            raise ValueError("aval_at out of range")
    for i in range(lam_index.shape[0]):
        if lam_index[i] < 0 or lam_index[i] >= lam.shape[0]:
            raise ValueError("lam_index out of range")
    _check_term0(indptr, indices, kk, uoff)


cdef _check_term0(const int[::1] indptr, const int[::1] indices, const int[::1] kk,
                  const i64[::1] uoff):
    """Each column of term 0 holds its own level's rows, then the same tail rows as the
    level's first column, ascending, in whole levels of the tail's terms."""
    cdef int nterm = kk.shape[0], k0 = kk[0], c, s, ks, b
    cdef Py_ssize_t q0 = uoff[1], lev, j0, nr, t, rho
    for lev in range(q0 // k0):
        j0 = lev * k0
        nr = indptr[j0 + 1] - indptr[j0] - k0
        for c in range(k0):
            if indptr[j0 + c + 1] - indptr[j0 + c] != nr + k0 - c:
                raise ValueError(f"column {j0 + c} of term 0 is not its level's")
            for t in range(k0 - c):
                if indices[indptr[j0 + c] + t] != j0 + c + t:
                    raise ValueError(f"column {j0 + c} of term 0 is not its level's")
            for t in range(nr):
                if indices[indptr[j0 + c] + k0 - c + t] != indices[indptr[j0] + k0 + t]:
                    raise ValueError(f"column {j0 + c} of term 0 is not its level's")
        for t in range(nr):
            rho = indices[indptr[j0] + k0 + t]
            if rho < q0 or (t and rho <= indices[indptr[j0] + k0 + t - 1]):
                raise ValueError(f"the tail rows of level {lev} of term 0 are not ascending")
            s = _term_of(uoff, nterm, rho)
            ks = kk[s]
            b = <int> ((rho - uoff[s]) % ks)
            if t < b or t - b + ks > nr or indices[indptr[j0] + k0 + t - b] != rho - b \
                    or indices[indptr[j0] + k0 + t - b + ks - 1] != rho - b + ks - 1:
                raise ValueError(f"level {lev} of term 0 meets part of a level of term {s}")


# -- the profiled objective and the one-term gradient as compiled calls -----------------
#
# The search (_search.pyx) and the check call these 40-60 times a fit; on a small model
# the arithmetic is ~1 µs and a path through Python (model → workspace → factorizer,
# then the modes and the kernel's eleven array arguments) cost 3 µs for the value and
# 12 µs for the gradient.

cdef double profiled_objective(double logdet, const double *r, Py_ssize_t m, double dfr,
                               double logw, bint reml, double logabsdet) noexcept nogil:
    """``LinearMixedModel._factorized``'s value from log det(L) and the Schur factor r
    (m by m, row-major): +inf where the penalized RSS is not positive."""
    cdef double pwrss = r[m * m - 1] * r[m * m - 1]
    cdef double val, logdiag = 0.0
    cdef Py_ssize_t i
    if not pwrss > 0.0:
        return INFINITY
    val = 2.0 * logdet + dfr * (1.0 + log(2.0 * M_PI * pwrss / dfr)) - logw
    if reml:
        for i in range(m - 1):
            logdiag += log(r[i * m + i])
        val += 2.0 * (logdiag + logabsdet)
    return val if isfinite(val) else INFINITY


cdef class LmmObjective:
    """The profiled objective of a LinearMixedModel (ML deviance or REML criterion) from
    the workspace's per-θ factorizer, +inf where the system is singular: what
    ``LinearMixedModel._objective_unchecked`` returns (its NumPy twin)."""

    def __init__(self, factorizer, Py_ssize_t ntheta, double dfr, double logw, bint reml,
                 double logabsdet):
        self.factorizer = factorizer
        self.ntheta = ntheta
        self.dfr, self.logw, self.reml, self.logabsdet = dfr, logw, reml, logabsdet
        self.has_gradient = False

    cdef int value_gradient(self, const double *theta, double *val,
                            double *grad) except -1:
        """val and grad at θ (+inf and NaN where singular), in the subclasses that have
        the gradient."""
        raise NotImplementedError("this objective has no gradient")

    def value_and_gradient(self, theta):
        """(value, gradient); (inf, NaN gradient) where the system is singular."""
        cdef const double[::1] t = np.ascontiguousarray(theta, dtype=np.float64)
        if t.shape[0] != self.ntheta:
            raise ValueError(f"theta has {t.shape[0]} entries, not {self.ntheta}")
        grad = np.empty(self.ntheta)
        cdef double[::1] g = grad
        cdef double val
        self.value_gradient(&t[0], &val, &g[0])
        return val, grad

    cdef double value(self, const double *theta) except? -2.0:
        cdef int status = -1
        cdef double logdet
        cdef TfArrays a
        try:
            logdet = tf_factor_at(self.factorizer, theta, self.ntheta, &status)
        except np.linalg.LinAlgError:
            return INFINITY
        if not isfinite(logdet) or status != 0:
            return INFINITY
        tf_arrays(self.factorizer, &a)
        return profiled_objective(logdet, a.r, a.m, self.dfr, self.logw, self.reml,
                                  self.logabsdet)

    def __call__(self, theta):
        cdef const double[::1] t = np.ascontiguousarray(theta, dtype=np.float64)
        if t.shape[0] != self.ntheta:
            raise ValueError(f"theta has {t.shape[0]} entries, not {self.ntheta}")
        return self.value(&t[0] if self.ntheta else NULL)

    def solution(self, theta, cnp.ndarray basis_rinv=None, cnp.ndarray x=None):
        """The numbers of the fit at θ, in the working basis of X: a dict of ``objective``,
        ``logdet`` (log det L), ``pwrss``, ``beta_w`` (β̃), ``rx_inverse_crossprod``
        ((RX'RX)⁻¹), ``u`` (the spherical modes) and ``b`` (Λu). Given the basis's R̃⁻¹
        (``basis_rinv``, p-square) and X̃ (``x``, n by p), both C-ordered float64, also ``coef``
        (β = R̃⁻¹β̃), ``coef_crossprod`` (R̃⁻¹ (RX'RX)⁻¹ R̃⁻ᵀ) and ``xbeta`` (X̃β̃), which
        NumPy's products would give to rounding (on a small model three cold starts of
        their own). Raises LinAlgError where the system is singular. NumPy twin:
        ``LinearMixedModel._optimum``'s path through ``_evaluate``."""
        cdef const double[::1] t = np.ascontiguousarray(theta, dtype=np.float64)
        cdef int status = -1
        cdef TfArrays a
        cdef Py_ssize_t p, q, m, i, j
        cdef double s
        if t.shape[0] != self.ntheta:
            raise ValueError(f"theta has {t.shape[0]} entries, not {self.ntheta}")
        cdef double logdet = tf_factor_at(self.factorizer, &t[0] if self.ntheta else NULL,
                                          self.ntheta, &status)
        if not isfinite(logdet):
            raise np.linalg.LinAlgError("random-effects block not positive definite")
        if status:
            raise np.linalg.LinAlgError(
                f"fixed-effects block not positive definite at column {status}: the columns "
                "of X are numerically collinear")
        tf_arrays(self.factorizer, &a)
        q, m = a.q, a.m
        p = m - 1
        beta = np.empty(p)
        rxinv = np.empty((p, p))
        rinv = np.empty((p, p))
        u = np.empty((q, 1), order="F")
        b = np.empty(q)
        cdef double[::1] bv = beta, uv = u[:, 0], lv = b
        cdef double[:, ::1] xv = rxinv, rv = rinv
        with nogil:
            for i in range(p - 1, -1, -1):          # RX β̃ = r[:p, p]
                s = a.r[i * m + p]
                for j in range(i + 1, p):
                    s -= a.r[i * m + j] * bv[j]
                bv[i] = s / a.r[i * m + i]
            for j in range(q):                      # L'P u = rzxy[:, p] - rzxy[:, :p] β̃
                s = a.rzxy[p * q + j]
                for i in range(p):
                    s -= a.rzxy[i * q + j] * bv[i]
                uv[j] = s
            if p:
                _schur_inverse(a.r, m, &rv[0, 0], &xv[0, 0])
        tf_backward(self.factorizer, u, &uv[0])
        tf_lambda_times(self.factorizer, &uv[0], &lv[0])
        val = profiled_objective(logdet, a.r, m, self.dfr, self.logw, self.reml,
                                 self.logabsdet)
        pwrss = a.r[m * m - 1] * a.r[m * m - 1]
        out = dict(objective=val if pwrss > 0.0 else -INFINITY, logdet=logdet,
                   pwrss=pwrss, beta_w=beta, rx_inverse_crossprod=rxinv, u=u[:, 0], b=b)
        if basis_rinv is not None and x is not None:
            out.update(_in_original_basis(basis_rinv, x, beta, rxinv))
        return out


def _in_original_basis(cnp.ndarray rinv, cnp.ndarray x, cnp.ndarray beta,
                       cnp.ndarray rxinv):
    """``coef`` = R̃⁻¹β̃, ``coef_crossprod`` = R̃⁻¹ (RX'RX)⁻¹ R̃⁻ᵀ and ``xbeta`` = X̃β̃ (see
    ``LmmObjective.solution``)."""
    cdef Py_ssize_t p = cnp.PyArray_DIM(beta, 0), n, i, j, l
    for a, name, rows in ((rinv, "rinv", p), (x, "x", -1)):
        if (cnp.PyArray_TYPE(a) != cnp.NPY_DOUBLE or cnp.PyArray_NDIM(a) != 2
                or not cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_DIM(a, 1) != p
                or (rows >= 0 and cnp.PyArray_DIM(a, 0) != rows)):
            raise ValueError(f"{name} must be a C-ordered float64 array with {p} columns")
    n = cnp.PyArray_DIM(x, 0)
    cdef cnp.npy_intp dims[2]
    dims[0] = p
    dims[1] = p
    cdef cnp.ndarray coef = cnp.PyArray_EMPTY(1, dims, cnp.NPY_DOUBLE, 0)
    cdef cnp.ndarray cross = cnp.PyArray_EMPTY(2, dims, cnp.NPY_DOUBLE, 0)
    dims[0] = n
    cdef cnp.ndarray xbeta = cnp.PyArray_EMPTY(1, dims, cnp.NPY_DOUBLE, 0)
    cdef const double *r = <const double *> cnp.PyArray_DATA(rinv)
    cdef const double *xv = <const double *> cnp.PyArray_DATA(x)
    cdef const double *bv = <const double *> cnp.PyArray_DATA(beta)
    cdef const double *v = <const double *> cnp.PyArray_DATA(rxinv)
    cdef double *c = <double *> cnp.PyArray_DATA(coef)
    cdef double *w = <double *> cnp.PyArray_DATA(cross)
    cdef double *xb = <double *> cnp.PyArray_DATA(xbeta)
    cdef double *t = <double *> malloc(max(p * p, 1) * sizeof(double))
    cdef double s
    if t == NULL:
        raise MemoryError()
    with nogil:
        for i in range(p):
            s = 0.0
            for j in range(p):
                s += r[i * p + j] * bv[j]
            c[i] = s
        for i in range(p):                      # t = R̃⁻¹ V
            for j in range(p):
                s = 0.0
                for l in range(p):
                    s += r[i * p + l] * v[l * p + j]
                t[i * p + j] = s
        for i in range(p):                      # w = t R̃⁻ᵀ
            for j in range(p):
                s = 0.0
                for l in range(p):
                    s += t[i * p + l] * r[j * p + l]
                w[i * p + j] = s
        for i in range(n):
            s = 0.0
            for j in range(p):
                s += xv[i * p + j] * bv[j]
            xb[i] = s
    free(t)
    return dict(coef=coef, coef_crossprod=cross, xbeta=xbeta)


cdef class OneTermGradient(LmmObjective):
    """The objective and its exact gradient over θ for a one-term LMM (the block-diagonal
    workspace), in one call: factor at θ, β̂ and û from the factorization, the per-level
    sums (``one_term_sums``), the gradient. NumPy twin: ``_lmm_gradient.one_term_sums_numpy``
    and ``lmm_value_and_gradient``'s formula."""
    cdef const i64[::1] lam_index
    cdef int k
    cdef double *buf                # scratch of the last size asked for (grown, kept)
    cdef Py_ssize_t buf_size

    def __cinit__(self, *args, **kwargs):
        self.buf = NULL
        self.buf_size = 0

    def __dealloc__(self):
        free(self.buf)

    def __init__(self, factorizer, lam_index, int k, double dfr, double logw, bint reml,
                 double logabsdet):
        LmmObjective.__init__(self, factorizer, len(lam_index), dfr, logw, reml, logabsdet)
        self.lam_index = lam_index
        self.k = k
        self.has_gradient = True

    cdef double *scratch(self, Py_ssize_t size) except NULL:
        """``size`` doubles, allocated once per size rather than once per evaluation."""
        cdef double *grown
        if size > self.buf_size:
            grown = <double *> realloc(self.buf, size * sizeof(double))
            if grown == NULL:
                raise MemoryError()
            self.buf, self.buf_size = grown, size
        return self.buf

    cdef int value_gradient(self, const double *theta, double *val,
                            double *grad) except -1:
        cdef Py_ssize_t n = self.ntheta, i, j, q, m, p
        cdef int status = -1, k = self.k, e, c
        cdef double logdet, scale
        cdef TfArrays a
        try:
            logdet = tf_factor_at(self.factorizer, theta, n, &status)
        except np.linalg.LinAlgError:
            logdet = NAN
        if isfinite(logdet) and status == 0:
            tf_arrays(self.factorizer, &a)
            if not a.blockdiag or a.k0 != k:
                raise ValueError("OneTermGradient needs a one-term (block-diagonal) workspace")
            val[0] = profiled_objective(logdet, a.r, a.m, self.dfr, self.logw, self.reml,
                                        self.logabsdet)
        else:
            val[0] = INFINITY
        if val[0] == INFINITY:
            for i in range(n):
                grad[i] = NAN
            return 0
        q, m = a.q, a.m
        p = m - 1
        cdef double *buf = self.scratch(p + q + 2 * p * p + 3 * k * k
                                        + one_term_work_size(k, p))
        cdef double *beta = buf
        cdef double *u = beta + p
        cdef double *sinv = u + q
        cdef double *rinv = sinv + p * p
        cdef double *sums = rinv + p * p          # ktrace, rss, schur (k by k, row-major)
        cdef double *work = sums + 3 * k * k
        with nogil:
            _modes(a.r, m, a.rzxy, q, a.lblocks, k, beta, u)
            if self.reml and p:
                _schur_inverse(a.r, m, rinv, sinv)
            for i in range(3 * k * k):
                sums[i] = 0.0
            one_term_sums(a.avals, a.lam, a.lblocks, k, a.nlev0, u, a.ztxy, q, p,
                          &a.ztxy[p * q], beta, sinv if (self.reml and p) else NULL,
                          sums, &sums[k * k], &sums[2 * k * k], work)
            scale = self.dfr / (a.r[m * m - 1] * a.r[m * m - 1])
            for i in range(n):
                e = <int> (self.lam_index[i] % k)
                c = <int> (self.lam_index[i] // k)
                j = e * k + c
                grad[i] = 2.0 * (sums[j] - scale * sums[k * k + j] - sums[2 * k * k + j])
        return 0


cdef class DenseTailValueGradient(LmmObjective):
    """The objective and its exact gradient for the tail routes of _lmm_gradient.py: the
    value from the factorizer, then S⁻¹ and ``DenseTailGradient``'s pass (the tail factor
    refactored first where it sits beside CHOLMOD's, ``side``). NumPy twin:
    ``_lmm_gradient.dense_tail_sums_numpy``."""
    cdef object tail
    cdef DenseTailGradient kernel
    cdef bint side
    # the tail factor's C functions, and S⁻¹'s buffer: Python calls and a new array per
    # evaluation cost more than penicillin's gradient arithmetic
    cdef ExternalFactor ext
    cdef object sinv
    cdef double *sinv_ptr

    def __init__(self, factorizer, Py_ssize_t ntheta, double dfr, double logw, bint reml,
                 double logabsdet, tail, DenseTailGradient kernel, bint side):
        LmmObjective.__init__(self, factorizer, ntheta, dfr, logw, reml, logabsdet)
        self.tail, self.kernel, self.side = tail, kernel, side
        if tail.r != kernel.rdim:
            raise ValueError(f"the tail factor has {tail.r} rows; the gradient's tail "
                             f"{kernel.rdim}")
        self.ext = (<ExternalFactor *> PyCapsule_GetPointer(
            tail.external(), b"mixedmodels.ExternalFactor"))[0]
        self.sinv = np.zeros((max(kernel.rdim, 1), max(kernel.rdim, 1)), order="F")
        self.sinv_ptr = <double *> cnp.PyArray_DATA(self.sinv)
        self.has_gradient = True

    cdef int value_gradient(self, const double *theta, double *val,
                            double *grad) except -1:
        cdef Py_ssize_t i
        val[0] = self.value(theta)
        if val[0] != INFINITY and self.side:
            try:
                self.tail.factorize()           # the M the factorizer has just written
            except np.linalg.LinAlgError:
                val[0] = INFINITY
        if val[0] != INFINITY:
            if not self.kernel.bound:
                raise ValueError("bind_products first")
            # S singular, or a level block of term 0 not positive definite
            if (self.ext.tail_inverse(self.ext.obj, self.sinv_ptr)
                    or self.kernel._run(self.sinv_ptr, self.reml, self.dfr, grad)):
                val[0] = INFINITY
        if val[0] == INFINITY:
            for i in range(self.ntheta):
                grad[i] = NAN
        return 0


cdef void _modes(const double *r, Py_ssize_t m, const double *rzxy, Py_ssize_t q,
                 const double *lblocks, int k, double *beta, double *u) noexcept nogil:
    """β̂ from the Schur factor (R_X β = r[:p, p]) and û = P'L'⁻¹(rzxy[:, p] - rzxy[:, :p]β̂)
    with the level-wise factor (``lmm._modes``)."""
    cdef Py_ssize_t p = m - 1, i, j
    cdef double s
    for i in range(p - 1, -1, -1):
        s = r[i * m + p]
        for j in range(i + 1, p):
            s -= r[i * m + j] * beta[j]
        beta[i] = s / r[i * m + i]
    for j in range(q):
        s = rzxy[p * q + j]
        for i in range(p):
            s -= rzxy[i * q + j] * beta[i]
        u[j] = s
    blockdiag_solve_c(lblocks, k, q // k, u, True)


cdef void _schur_inverse(const double *r, Py_ssize_t m, double *rinv,
                         double *sinv) noexcept nogil:
    """sinv = (R_X'R_X)⁻¹ = R_X⁻¹R_X⁻ᵀ (p by p, row-major) from the upper R_X = r[:p, :p]."""
    cdef Py_ssize_t p = m - 1, i, j, l
    cdef double s
    for j in range(p):                      # column j of R_X⁻¹, upper triangular
        for i in range(p - 1, -1, -1):
            if i > j:
                rinv[i * p + j] = 0.0
                continue
            s = 1.0 if i == j else 0.0
            for l in range(i + 1, j + 1):
                s -= r[i * m + l] * rinv[l * p + j]
            rinv[i * p + j] = s / r[i * m + i]
    for i in range(p):
        for j in range(p):
            s = 0.0
            for l in range(j if j > i else i, p):
                s += rinv[i * p + l] * rinv[j * p + l]
            sinv[i * p + j] = s


cdef Py_ssize_t one_term_work_size(int k, Py_ssize_t p) noexcept nogil:
    return 4 * k * k + k + 3 * k * (p if p > 1 else 1)


cdef void one_term_sums(const double *avals, const double *lam, const double *L, int k,
                        Py_ssize_t nlev, const double *u, const double *zx, Py_ssize_t q,
                        Py_ssize_t p, const double *zy, const double *beta,
                        const double *sinv, double *ktrace, double *rss, double *schur,
                        double *buf) noexcept nogil:
    """The per-level sums behind the gradient of a one-term LMM's objective over T.

    With A_l the level's block of Z'WZ (column-major, full), T the template (``lam``,
    column-major), L_l the factor of M_l = T'A_l T + I (as ``blockdiag_factor`` leaves
    it), u the modes, zx = Z'WX (q by p, column-major), zy = Z'Wy and β the coefficients,
    adds over the levels, each k by k, row-major, indexed [e, a]:

        ktrace += A_l T M_l⁻¹                          (K_ll)
        rss    += (zy_l - A_l T u_l - zx_l β) u_l'      ((Z'Wε)_l u_l')
        schur  += (zx_l - A_l T V_l) S⁻¹ V_l'           (V_l = M_l⁻¹ T' zx_l; when sinv,
                                                         p by p row-major, is not NULL)

    ``buf`` holds ``one_term_work_size(k, p)`` doubles. NumPy twin:
    _lmm_gradient.one_term_sums_numpy.
    """
    cdef Py_ssize_t l, i, j
    cdef int a, c, e
    cdef double s
    cdef double *ct = buf                      # A_l T
    cdef double *linv = buf + k * k            # L_l⁻¹ (lower)
    cdef double *minv = buf + 2 * k * k        # M_l⁻¹
    cdef double *zres = buf + 4 * k * k
    cdef Py_ssize_t pp = p if p > 1 else 1
    cdef double *v = zres + k                  # V_l, then V_l S⁻¹ (k by p, column-major)
    cdef double *w = v + k * pp                # zx_l - A_l T V_l
    cdef double *y = w + k * pp
    cdef const double *A
    cdef const double *B
    for l in range(nlev):
        A = &avals[l * k * k]
        B = &L[l * k * k]
        for c in range(k):                     # ct = A T (T lower)
            for e in range(k):
                s = 0.0
                for a in range(c, k):
                    s += A[e + a * k] * lam[a + c * k]
                ct[e + c * k] = s
        inverse_from_lower(B, k, linv, minv)
        for e in range(k):
            for c in range(k):
                s = 0.0
                for a in range(k):
                    s += ct[e + a * k] * minv[a + c * k]
                ktrace[e * k + c] += s
            s = zy[l * k + e]
            for a in range(k):
                s -= ct[e + a * k] * u[l * k + a]
            for j in range(p):
                s -= zx[j * q + l * k + e] * beta[j]
            zres[e] = s
        for e in range(k):
            for a in range(k):
                rss[e * k + a] += zres[e] * u[l * k + a]
        if sinv == NULL:
            continue
        for j in range(p):                     # y = T' zx_l, v = M⁻¹ y, w = zx_l - ct v
            for a in range(k):
                s = 0.0
                for e in range(a, k):
                    s += lam[e + a * k] * zx[j * q + l * k + e]
                y[a + j * k] = s
            for a in range(k):
                s = 0.0
                for e in range(k):
                    s += minv[a + e * k] * y[e + j * k]
                v[a + j * k] = s
            for e in range(k):
                s = zx[j * q + l * k + e]
                for a in range(k):
                    s -= ct[e + a * k] * v[a + j * k]
                w[e + j * k] = s
        for a in range(k):                     # y = v S⁻¹
            for j in range(p):
                s = 0.0
                for i in range(p):
                    s += v[a + i * k] * sinv[i * p + j]
                y[a + j * k] = s
        for e in range(k):
            for a in range(k):
                s = 0.0
                for j in range(p):
                    s += w[e + j * k] * y[a + j * k]
                schur[e * k + a] += s


def lmm_blockdiag_gradient(const double[::1] avals, const double[::1] lam,
                           const double[::1] L, int k, const double[::1] u,
                           const double[::1, :] zx, const double[::1] zy,
                           const double[::1] beta, const double[:, ::1] sinv,
                           double[:, ::1] ktrace, double[:, ::1] rss, double[:, ::1] schur):
    """``one_term_sums`` on arrays (ktrace, rss, schur: k by k, added to); sinv with p
    rows gives the REML part, with 0 rows none. For the twin test."""
    cdef Py_ssize_t nlev = L.shape[0] // (k * k), p = zx.shape[1], q = zx.shape[0]
    cdef bint reml = sinv.shape[0] == p and p > 0
    cdef double *buf = <double *> malloc(one_term_work_size(k, p) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    with nogil:
        one_term_sums(&avals[0], &lam[0], &L[0], k, nlev, &u[0],
                      &zx[0, 0] if p else NULL, q, p, &zy[0], &beta[0] if p else NULL,
                      &sinv[0, 0] if reml else NULL, &ktrace[0, 0], &rss[0, 0],
                      &schur[0, 0], buf)
    free(buf)


def slot_values(cnp.ndarray pos not None, Py_ssize_t nslot):
    """For each of the nslot CSC slots of M's lower triangle, the index in C's values
    (``avals``) of the value there, from ``pos`` (int64: each value's slot, or -1): one
    pass where the NumPy expression (the twin, ``_lmm_gradient.aval_at``) is five calls,
    a cold start of its own on a small model's set-up. Raises ValueError where a slot
    has no value."""
    if (cnp.PyArray_TYPE(pos) != cnp.NPY_INT64 or cnp.PyArray_NDIM(pos) != 1
            or not cnp.PyArray_IS_C_CONTIGUOUS(pos)):
        raise ValueError("pos must be a contiguous int64 vector")
    cdef cnp.npy_intp n = nslot
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &n, cnp.NPY_INT64, 0)
    cdef i64 *o = <i64 *> cnp.PyArray_DATA(out)
    cdef const i64 *p = <const i64 *> cnp.PyArray_DATA(pos)
    cdef Py_ssize_t i, npos = cnp.PyArray_DIM(pos, 0)
    cdef bint bad = False
    with nogil:
        for i in range(nslot):
            o[i] = -1
        for i in range(npos):
            if p[i] >= nslot:
                bad = True
            elif p[i] >= 0:
                o[p[i]] = i
        for i in range(nslot):
            if o[i] < 0:
                bad = True
    if bad:
        raise ValueError("a slot of M's pattern has no value of C")
    return out

# cython: language_level=3
"""The Cholesky factor of M = Λ'Z'WZΛ + I with the first term eliminated level by level
and the rest as one dense block: the factor for models whose trailing block fills in.

With term 0 (the most levels) first, M = [[A, B'], [B, C]] where A is block diagonal (one
k₀-by-k₀ block per level: a row of the data has one level of each term) and B, C hold the
other terms. Then

    L = [[L_A, 0], [W', L_S]],   L_A L_A' = A,   W = L_A⁻¹B',   L_S L_S' = S = C - W'W,

and S, the Schur complement, is r-by-r for r = q - q₀ random effects after term 0. On
insteval (q₀ = 2,972 students, r = 1,142 lecturers and departments) S is practically dense
once term 0 is eliminated, whatever the ordering: CHOLMOD's supernodal factorization of
the whole M took 45-65 ms per θ on one thread, and a dense Cholesky of S alone 10 ms,
S itself (a rank-k₀ update per level of term 0, Σ_l n_l² k₀ flops for n_l other levels
met by level l) 3 more. That is MixedModels.jl's layout, with one dense factorization of
the whole tail instead of its blocked one.

Per θ on insteval (one thread, CPU time): L_l and W 0.3 ms, S formed column by column
(``_form_schur``) 2.7-2.9, its Cholesky by panels (``_blocked_cholesky``) 9.7 (LAPACK's
one dpotrf: 12.8-13.3), L⁻¹ on the three columns of [X y] 0.75 (0.35 of it the tail,
``_tail_solve``). The fill-reducing order CHOLMOD picks for S alone would leave 3.8 times
fewer flops, but scattered: in blocks of 48 the factor is still 88% full.

The factor reads M's lower triangle in the CSC layout the CHOLMOD factor reads (the
values ``mx`` that ``ThetaFactorizer`` writes), and offers the same calls: factorize(),
logdet(), forward(b), backward(b), with no fill-reducing permutation (P = I). With P = I
the factor is the Cholesky factor of M itself, so its NumPy twin is
``numpy.linalg.cholesky`` of the dense M (tests/test_blocked.py). ``selected_inverse``
gives M⁻¹ on M's own pattern (for the Laplace gradient, _gradient.py), held to a dense
twin in tests/test_gradient_selinv.py.
"""
from libc.math cimport log, sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memset

import numpy as np
cimport numpy as cnp

from scipy.linalg.cython_lapack cimport dlauum, dpotrf, dtrtri
from scipy.linalg.cython_blas cimport dgemm, dgemv, dsyrk, dtrmm, dtrsm

from mixedmodels._linalg._blocked cimport chol_inplace, ExternalFactor
from cpython.pycapsule cimport PyCapsule_New

ctypedef long long i64

cnp.import_array()


cdef int _first_rest(const int[::1] ip, const int[::1] ix, int k0, int q0,
                     int[::1] first) noexcept nogil:
    """first[j] = the first CSC slot of column j < q0 below term 0. Checks that column j
    holds its level's own rows j..(level end) first and that every column of a level
    meets the same rows below term 0 (which W's storage per level relies on); returns
    the first column where that fails, or -1."""
    cdef Py_ssize_t j, t, lo, hi, c, own, prev_lo, prev_hi
    for j in range(q0):
        lo, hi = ip[j], ip[j + 1]
        c = j % k0
        own = k0 - c
        if hi - lo < own:
            return <int> j
        for t in range(own):
            if ix[lo + t] != j + t:
                return <int> j
        if lo + own < hi and ix[lo + own] < q0:
            return <int> j
        first[j] = <int> (lo + own)
        if c:
            prev_lo, prev_hi = first[j - 1], ip[j]
            if hi - first[j] != prev_hi - prev_lo:
                return <int> j
            for t in range(hi - first[j]):
                if ix[first[j] + t] != ix[prev_lo + t]:
                    return <int> j
    return -1


def _tail_columns(indptr, indices, first, int k0, int q0, int r):
    """B' by rows of the tail: for each tail column c, the slots of B (in the first column of
    each level of term 0) whose row is q0 + c, with their levels, levels ascending.
    Returns (ptr, slot, level) in CSR form over c. The NumPy twin of ``_tail_fill``, which
    the constructor runs (tests/test_setup_fused_products.py holds the two together)."""
    nlev0 = q0 // k0
    starts = np.asarray(first[::k0], dtype=np.int64)[:nlev0]
    counts = np.asarray(indptr[1:q0 + 1:k0], dtype=np.int64) - starts
    level = np.repeat(np.arange(nlev0, dtype=np.int32), counts)
    ahead = np.cumsum(counts) - counts             # entries of the levels before each level
    slot = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - ahead, counts)
    rows = np.asarray(indices, dtype=np.int64)[slot] - q0
    order = np.argsort(rows, kind="stable")        # stable: levels stay ascending per row
    ptr = np.zeros(r + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=r), out=ptr[1:])
    return ptr, slot[order].astype(np.int32), level[order]


cdef Py_ssize_t _tail_count(const int *ip, const int *fr, int k0, Py_ssize_t nlev0) noexcept nogil:
    """The number of slots of B: Σ over the levels of term 0 of the tail rows each meets."""
    cdef Py_ssize_t lev, total = 0
    for lev in range(nlev0):
        total += ip[lev * k0 + 1] - fr[lev * k0]
    return total


cdef void _tail_fill(const int *ip, const int *ix, const int *fr, int k0, int q0, int r,
                     Py_ssize_t nlev0, int *ptr, int *slot, int *level) noexcept nogil:
    """``_tail_columns`` in two passes over B's slots, a counting sort by tail row: the
    slots of each row come level by level, as the stable sort of the twin leaves them.
    ptr has r + 1 entries, slot and level ``_tail_count`` each; ptr itself is the rows'
    cursors while they fill."""
    cdef Py_ssize_t lev, t, c
    cdef int row
    memset(ptr, 0, (r + 1) * sizeof(int))
    for lev in range(nlev0):
        for t in range(fr[lev * k0], ip[lev * k0 + 1]):
            ptr[ix[t] - q0 + 1] += 1
    for c in range(r):
        ptr[c + 1] += ptr[c]
    # ptr[c] is where row c starts: fill from there, moving it to where row c ends (the
    # start of row c + 1), then shift back by one row
    for lev in range(nlev0):
        for t in range(fr[lev * k0], ip[lev * k0 + 1]):
            row = ix[t] - q0
            slot[ptr[row]] = <int> t
            level[ptr[row]] = <int> lev
            ptr[row] += 1
    for c in range(r, 0, -1):
        ptr[c] = ptr[c - 1]
    ptr[0] = 0


def _tail_columns_compiled(const int[::1] indptr, const int[::1] indices, int k0, int q0):
    """``_tail_columns`` as the constructor computes it (``_first_rest``, then
    ``_tail_fill``), for the tests: (ptr, slot, level)."""
    cdef Py_ssize_t q = indptr.shape[0] - 1, nlev0 = q0 // k0, nnz
    first = np.empty(q0, dtype=np.int32)
    cdef int[::1] fr = first
    if _first_rest(indptr, indices, k0, q0, fr) >= 0:
        raise ValueError("not a dense-tail pattern")
    nnz = _tail_count(&indptr[0], &fr[0] if q0 else NULL, k0, nlev0)
    ptr = np.empty(q - q0 + 1, dtype=np.int32)
    slot = np.empty(nnz, dtype=np.int32)
    level = np.empty(nnz, dtype=np.int32)
    cdef int[::1] p = ptr, sl = slot, lv = level
    _tail_fill(&indptr[0], &indices[0], &fr[0] if q0 else NULL, k0, q0, <int> (q - q0),
               nlev0, &p[0], &sl[0] if nnz else NULL, &lv[0] if nnz else NULL)
    return ptr, slot, level


# panel width of the triangular inverse: 48-96 measured alike at r = 1,142
cdef enum:
    _INVERSE_PANEL = 64


cdef inline int _panel_width(int n) noexcept nogil:
    # measured on one thread (OpenBLAS 0.3.30, AVX-512): 48 best from 300 to 2,000, 96
    # from about 3,000 on, where the trailing matrix outgrows the caches
    return 48 if n <= 2500 else 96


# A tail this small runs plain loops, not BLAS and LAPACK: on penicillin's (r = 6) the
# OpenBLAS calls of an evaluation (a dozen distinct kernels behind each call's dispatch)
# cost more than their flops, warm and most of all cold.
cdef enum:
    _SMALL_TAIL = 32


cdef int _small_cholesky(double *a, int n, int lda) noexcept nogil:
    """``_blocked_cholesky`` of a small a: a column at a time (left-looking). Returns 0, or
    j > 0 when the leading j-by-j block is not positive definite."""
    cdef int i, j, k
    cdef double v, d
    for j in range(n):
        v = a[j + <Py_ssize_t> j * lda]
        for k in range(j):
            v -= a[j + <Py_ssize_t> k * lda] * a[j + <Py_ssize_t> k * lda]
        if not v > 0.0:
            return j + 1
        d = sqrt(v)
        a[j + <Py_ssize_t> j * lda] = d
        for i in range(j + 1, n):
            v = a[i + <Py_ssize_t> j * lda]
            for k in range(j):
                v -= a[i + <Py_ssize_t> k * lda] * a[j + <Py_ssize_t> k * lda]
            a[i + <Py_ssize_t> j * lda] = v / d
    return 0


cdef int _small_tail_inverse(double *a, int n) noexcept nogil:
    """``_tail_inverse_c`` of a small L_S: X = L_S⁻¹ in place a column at a time (the
    columns after it still hold L_S), then the lower triangle of X'X, entry (i, j) from
    rows i.. of columns i and j (column j's rows above i no longer needed)."""
    cdef int i, j, k
    cdef double v
    for j in range(n):
        if a[j + j * n] == 0.0:
            return j + 1
    for j in range(n):
        a[j + j * n] = 1.0 / a[j + j * n]
        for i in range(j + 1, n):
            v = 0.0
            for k in range(j, i):
                v += a[i + k * n] * a[k + j * n]
            a[i + j * n] = -v / a[i + i * n]
    for j in range(n):
        for i in range(j, n):
            v = 0.0
            for k in range(i, n):
                v += a[k + i * n] * a[k + j * n]
            a[i + j * n] = v
    return 0


cdef int _blocked_cholesky(double *a, int n, int lda, int nb) noexcept nogil:
    """In place: a (column-major n-by-n, leading dimension lda) <- its lower Cholesky factor,
    right-looking by panels of nb columns: dpotrf on the panel's diagonal block, dtrsm for
    the rows below it, dsyrk for the trailing lower triangle. Only the lower triangle is
    read or written. Returns 0, or j > 0 when the leading j-by-j block is not positive
    definite (dpotrf's info).

    Why not one dpotrf: OpenBLAS's ran the 1,142-square tail of insteval at 33-37 GFlop/s
    on one thread; these narrow panels keep nearly every flop in dsyrk, at 50-57 (its dgemm
    runs 56), 13.5 against 9.5-10 ms."""
    cdef int k = 0, kb, below, info = 0
    cdef double one = 1.0, minus_one = -1.0
    cdef double *diag
    if n <= _SMALL_TAIL:
        return _small_cholesky(a, n, lda)
    while k < n:
        kb = min(nb, n - k)
        diag = a + k + <Py_ssize_t> k * lda
        dpotrf(b"L", &kb, diag, &lda, &info)
        if info != 0:
            return k + info
        below = n - k - kb
        if below > 0:
            dtrsm(b"R", b"L", b"T", b"N", &below, &kb, &one, diag, &lda, diag + kb, &lda)
            dsyrk(b"L", b"N", &below, &kb, &minus_one, diag + kb, &lda, &one,
                  diag + kb + <Py_ssize_t> kb * lda, &lda)
        k += kb
    return 0


def blocked_cholesky(double[::1, :] a, int nb=0):
    """In place: a (square, Fortran) <- its lower Cholesky factor by the kernel the dense
    tail uses (panels of nb columns; 0: its own choice), the strict upper triangle left as
    it was. Returns 0, or j > 0 when the leading j-by-j block is not positive definite.
    NumPy twin: numpy.linalg.cholesky (tests/test_densetail.py)."""
    if a.shape[0] != a.shape[1]:
        raise ValueError("a must be square")
    cdef int n = a.shape[0], status = 0
    if nb < 0:
        raise ValueError("nb must be positive (or 0 for the default)")
    if nb == 0:
        nb = _panel_width(n)
    if n == 0:
        return 0
    with nogil:
        status = _blocked_cholesky(&a[0, 0], n, n, nb)
    return status


cdef int _blocked_triangular_inverse(double *a, int n, int lda, int nb) noexcept nogil:
    """In place: the lower-triangular a (column-major n-by-n, leading dimension lda) <- its
    inverse, by panels of nb columns from the last: the rows below a panel become
    -L₂₂⁻¹ L₂₁ L₁₁⁻¹ (dtrmm with the inverse made so far, then dtrsm), its diagonal block
    LAPACK's dtrtri. Only the lower triangle is touched. Returns 0, or j > 0 when a[j-1, j-1]
    is zero (dtrtri's info).

    LAPACK's dtrtri (OpenBLAS 0.3.30, one thread) took 19-20 ms on insteval's 1,142-square
    L_S, this 12; S⁻¹ (``_tail_inverse_c``: this, then dlauum) went from 28 to 20 ms."""
    cdef int j, jb, rest, info = 0
    cdef double one = 1.0, minus_one = -1.0
    cdef double *diag
    j = ((n - 1) // nb) * nb
    while j >= 0:
        jb = min(nb, n - j)
        rest = n - j - jb
        diag = a + j + <Py_ssize_t> j * lda
        if rest > 0:
            dtrmm(b"L", b"L", b"N", b"N", &rest, &jb, &one, diag + jb + <Py_ssize_t> jb * lda,
                  &lda, diag + jb, &lda)
            dtrsm(b"R", b"L", b"N", b"N", &rest, &jb, &minus_one, diag, &lda, diag + jb, &lda)
        dtrtri(b"L", b"N", &jb, diag, &lda, &info)
        if info != 0:
            return j + info
        j -= nb
    return 0


def blocked_triangular_inverse(double[::1, :] a, int nb=0):
    """In place: the lower-triangular a (square, Fortran) <- its inverse by the kernel the
    dense tail uses (panels of nb columns; 0: its own choice), the strict upper triangle
    left as it was. Returns 0, or j > 0 when a[j-1, j-1] is zero.
    NumPy twin: numpy.linalg.inv of np.tril(a) (tests/test_densetail.py)."""
    if a.shape[0] != a.shape[1]:
        raise ValueError("a must be square")
    cdef int n = a.shape[0], status = 0
    if nb < 0:
        raise ValueError("nb must be positive (or 0 for the default)")
    if nb == 0:
        nb = _INVERSE_PANEL
    if n == 0:
        return 0
    with nogil:
        status = _blocked_triangular_inverse(&a[0, 0], n, n, nb)
    return status


cdef int _tail_inverse_c(double *a, int n) noexcept nogil:
    """In place: a (n-square, leading dimension n) holding L_S in its lower triangle <- the
    lower triangle of S⁻¹ = L_S⁻ᵀL_S⁻¹ (what LAPACK's dpotri does, with the inverse of L_S
    by panels). Returns 0, or nonzero when L_S is singular."""
    cdef int info = 0
    if n <= _SMALL_TAIL:
        return _small_tail_inverse(a, n)
    if _blocked_triangular_inverse(a, n, n, _INVERSE_PANEL):
        return 1
    dlauum(b"L", &n, a, &n, &info)
    return info


cdef void _mirror_lower(double *a, Py_ssize_t n) noexcept nogil:
    """The strict upper triangle of the column-major n-square a <- its lower one, by tiles
    of 32: a column at a time, the writes went 8n bytes apart (1.6 against 0.7-0.9 ms at
    n = 1,142)."""
    cdef Py_ssize_t c0, c1, i0, i1, i, c
    for c0 in range(0, n, 32):
        c1 = min(c0 + 32, n)
        for i0 in range(c0, n, 32):
            i1 = min(i0 + 32, n)
            for i in range(i0, i1):             # row i of the tile -> column i above
                for c in range(c0, min(c1, i)):
                    a[c + i * n] = a[i + c * n]


cdef void _tail_solve(const double *l, int n, double *b, int ldb, int m,
                      bint transpose) noexcept nogil:
    """In place b <- L⁻¹b (or L'⁻¹b with ``transpose``) for the lower-triangular n-square L
    (leading dimension n) and n-by-m b (leading dimension ldb), by panels of 64 rows: dtrsm
    on each diagonal block, dgemm for the rows after it (before it, for L'⁻¹).

    OpenBLAS's one dtrsm over the whole L took 0.9 ms on insteval's tail (r = 1,142) with
    the three columns of [X y], these panels 0.3 (the work is one pass over L's 5 MB)."""
    cdef int k, kb, rest, nb = 64, i, c
    cdef double one = 1.0, minus_one = -1.0, v
    cdef double *diag
    cdef double *x
    if n <= _SMALL_TAIL:                # substitution, a column of b at a time
        for c in range(m):
            x = b + <Py_ssize_t> c * ldb
            if transpose:
                for i in range(n - 1, -1, -1):
                    v = x[i]
                    for k in range(i + 1, n):
                        v -= l[k + i * n] * x[k]
                    x[i] = v / l[i + i * n]
            else:
                for i in range(n):
                    v = x[i]
                    for k in range(i):
                        v -= l[i + k * n] * x[k]
                    x[i] = v / l[i + i * n]
        return
    if transpose:
        k = ((n - 1) // nb) * nb
        while k >= 0:
            kb = min(nb, n - k)
            rest = n - k - kb
            diag = <double *> l + k + <Py_ssize_t> k * n
            if rest > 0:
                dgemm(b"T", b"N", &kb, &m, &rest, &minus_one, diag + kb, &n, b + k + kb, &ldb,
                      &one, b + k, &ldb)
            dtrsm(b"L", b"L", b"T", b"N", &kb, &m, &one, diag, &n, b + k, &ldb)
            k -= nb
        return
    k = 0
    while k < n:
        kb = min(nb, n - k)
        rest = n - k - kb
        diag = <double *> l + k + <Py_ssize_t> k * n
        dtrsm(b"L", b"L", b"N", b"N", &kb, &m, &one, diag, &n, b + k, &ldb)
        if rest > 0:
            dgemm(b"N", b"N", &rest, &m, &kb, &minus_one, diag + kb, &n, b + k, &ldb, &one,
                  b + k + kb, &ldb)
        k += kb


cdef class DenseTailFactor:
    """Factor of M (lower CSC pattern ``indptr``/``indices``, values ``mx``) with term 0's
    q₀ = k₀·nlev₀ columns block diagonal and the remaining r columns dense."""

    cdef const int[::1] indptr, indices
    cdef const double[::1] mx
    cdef readonly int k0, q, q0, r
    cdef readonly Py_ssize_t nlev0
    cdef int[::1] first_rest        # per column of term 0: first CSC slot with row >= q0
    cdef int[::1] tail_ptr, tail_slot, tail_level   # B' by tail rows (_tail_columns)
    cdef double[::1] l0             # level factors L_l, column-major k0-by-k0 each
    cdef double[::1] w              # W = L_A⁻¹B', at B's CSC slots
    cdef double[::1, :] s           # S, then L_S (lower)
    cdef double[::1, :] sinv        # S⁻¹ for selected_inverse, allocated on first use
    cdef double _logdet
    cdef readonly bint factored
    cdef ExternalFactor _ext

    def __init__(self, indptr, indices, mx, int k0, int q0):
        self.indptr = indptr
        self.indices = indices
        self.mx = mx
        self.k0 = k0
        self.q0 = q0
        self.q = self.indptr.shape[0] - 1
        self.r = self.q - q0
        self.nlev0 = q0 // k0
        cdef Py_ssize_t nnz
        cdef cnp.npy_intp dims[2]
        cdef int[::1] ints
        cdef const int *fr
        # the int arrays in one allocation: first_rest (q0), then tail_ptr (r + 1); the
        # slots and levels of B (_tail_count of each) in another, once first_rest is known
        dims[0] = q0 + self.r + 1
        ints = cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT32, 0)
        self.first_rest = ints[:q0]
        self.tail_ptr = ints[q0:]
        cdef int bad = _first_rest(self.indptr, self.indices, k0, q0, self.first_rest)
        if bad >= 0:
            raise ValueError("M's pattern is not that of a first term with levels of "
                             f"{k0} columns (column {bad})")
        fr = &self.first_rest[0] if q0 else NULL
        nnz = _tail_count(&self.indptr[0], fr, k0, self.nlev0)
        dims[0] = 2 * nnz
        ints = cnp.PyArray_EMPTY(1, dims, cnp.NPY_INT32, 0)
        self.tail_slot = ints[:nnz]
        self.tail_level = ints[nnz:]
        _tail_fill(&self.indptr[0], &self.indices[0], fr, k0, q0, self.r, self.nlev0,
                   &self.tail_ptr[0], &ints[0] if nnz else NULL, &ints[nnz] if nnz else NULL)
        dims[0] = self.nlev0 * k0 * k0
        self.l0 = cnp.PyArray_ZEROS(1, dims, cnp.NPY_DOUBLE, 0)
        dims[0] = self.mx.shape[0]
        self.w = cnp.PyArray_ZEROS(1, dims, cnp.NPY_DOUBLE, 0)
        dims[0] = dims[1] = self.r
        self.s = cnp.PyArray_ZEROS(2, dims, cnp.NPY_DOUBLE, 1)
        self.factored = False
        self.sinv = None

    @property
    def is_supernodal(self):
        """Whether the factor has dense blocks worth BLAS threads (a large tail)."""
        return self.r >= 256

    @property
    def nnz_factor(self):
        return int(self.first_rest[self.q0 - 1] - self.indptr[0]) if self.q0 else 0

    def logdet(self):
        """Σ log diag(L), half the log-determinant of M, at the last factorization."""
        return self._logdet

    def external(self):
        """This factor for ThetaFactorizer as C functions (_blocked.pxd, ExternalFactor):
        a PyCapsule, valid while the factor lives (the factorizer holds both)."""
        self._ext.obj = <void *> self
        self._ext.factorize = _external_factorize
        self._ext.solve = _external_solve
        self._ext.tail_inverse = _external_tail_inverse
        return PyCapsule_New(&self._ext, b"mixedmodels.ExternalFactor", NULL)

    def factorize(self):
        """Factor M at the current values; raises LinAlgError if it is not positive
        definite."""
        cdef int status
        with nogil:
            status = self._factorize()
        if status:
            self.factored = False
            raise np.linalg.LinAlgError("random-effects block not positive definite")
        self.factored = True

    cdef int _factorize(self) noexcept nogil:
        cdef int r = self.r, a
        cdef double logdet = 0.0
        cdef double *s = &self.s[0, 0] if r > 0 else NULL
        if self._level_factors(&logdet):
            return 1
        if r > 0:
            self._form_schur()
            if _blocked_cholesky(s, r, r, _panel_width(r)):
                return 1
            for a in range(r):
                logdet += log(s[a + a * r])
        self._logdet = logdet
        return 0

    cdef int _level_factors(self, double *logdet) noexcept nogil:
        """Term 0 level by level: L_l (into l0) and W_l = L_l⁻¹B_l' (into w, at B's slots);
        adds Σ log diag L_l to logdet. Returns 1 if some A_l is not positive definite."""
        cdef int k0 = self.k0, a, c, e
        cdef Py_ssize_t lev, j, jj, t, nr
        cdef double v
        cdef double *lo
        cdef const int *ip = &self.indptr[0]
        cdef const int *ix = &self.indices[0]
        cdef const int *fr = &self.first_rest[0] if self.q0 > 0 else NULL
        cdef const double *mx = &self.mx[0]
        cdef double *w = &self.w[0]
        for lev in range(self.nlev0):
            lo = &self.l0[lev * k0 * k0]
            # A_l: the lower triangle of the level's own k0 columns
            for c in range(k0):
                j = lev * k0 + c
                for a in range(k0):
                    lo[a + c * k0] = 0.0
                for t in range(ip[j], fr[j]):
                    lo[(ix[t] - lev * k0) + c * k0] = mx[t]
            if chol_inplace(lo, k0, logdet):
                return 1
            # W_l = L_l⁻¹ B_l': column c of the level holds row c of B_l at its slots
            nr = ip[lev * k0 + 1] - fr[lev * k0]
            for t in range(nr):
                for c in range(k0):
                    jj = fr[lev * k0 + c]
                    v = mx[jj + t]
                    for e in range(c):
                        v -= lo[c + e * k0] * w[fr[lev * k0 + e] + t]
                    w[jj + t] = v / lo[c + c * k0]
        return 0

    cdef void _form_schur(self) noexcept nogil:
        """s's lower triangle <- S = C - W'W, one column of S at a time: zeros, C's column,
        then for each level l meeting tail row c (levels ascending) -W_l[:, rows ≥ c]'W_l[:, c].

        Every entry gets the same terms in the same order as a pass level by level would
        give it (the same bits), but the writes stay in one column (≤ 32 KB at r = 4,000,
        in L1) while W (insteval: 0.7 MB) streams past; level by level they scatter over
        all of S (10 MB there), and with a memset of S ahead that took 6 ms against 1.
        The strict upper triangle is never written (the factor reads the lower)."""
        cdef int k0 = self.k0, q0 = self.q0, r = self.r, a
        cdef Py_ssize_t c, j, t, e, p, nr, base, jj, lev
        cdef double v
        cdef double *col
        cdef double *s = &self.s[0, 0]
        cdef const int *ip = &self.indptr[0]
        cdef const int *ix = &self.indices[0]
        cdef const int *fr = &self.first_rest[0] if q0 > 0 else NULL
        cdef const int *tp = &self.tail_ptr[0]
        cdef const int *ts = &self.tail_slot[0] if self.tail_slot.shape[0] > 0 else NULL
        cdef const int *tl = &self.tail_level[0] if self.tail_level.shape[0] > 0 else NULL
        cdef const double *mx = &self.mx[0]
        cdef const double *w = &self.w[0]
        for c in range(r):
            col = s + c * r
            memset(col + c, 0, (r - c) * sizeof(double))
            j = q0 + c
            for t in range(ip[j], ip[j + 1]):
                col[ix[t] - q0] = mx[t]
            for e in range(tp[c], tp[c + 1]):
                p = ts[e]
                lev = tl[e]
                if k0 == 1:
                    v = w[p]
                    for t in range(p, ip[lev + 1]):
                        col[ix[t] - q0] -= w[t] * v
                    continue
                base = fr[lev * k0]
                nr = ip[lev * k0 + 1] - base
                for t in range(p - base, nr):
                    v = 0.0
                    for a in range(k0):
                        jj = fr[lev * k0 + a]
                        v += w[jj + t] * w[jj + p - base]
                    col[ix[base + t] - q0] -= v

    def tail_inverse(self):
        """S⁻¹ (r-by-r, Fortran, both triangles), at the last factorization."""
        if not self.factored:
            raise ValueError("the factor holds no factorization")
        out = np.zeros((self.r, self.r), order="F")
        cdef double[::1, :] o = out
        cdef int r = self.r
        if r == 0:
            return out
        if _external_tail_inverse(<void *> self, &o[0, 0]):
            raise np.linalg.LinAlgError("S is singular")
        with nogil:
            _mirror_lower(&o[0, 0], r)
        return out

    def selected_inverse(self, double[::1] out):
        """out <- M⁻¹ at the slots of M's lower CSC pattern (the layout of ``mx``), from the
        last factorization.

        With M = [[A, B'], [B, C]], L_A L_A' = A, W = L_A⁻¹B' and S = L_S L_S':

            M⁻¹ = [[A⁻¹ + L_A⁻ᵀ W S⁻¹ W' L_A⁻¹,  -L_A⁻ᵀ W S⁻¹],
                   [-S⁻¹ W' L_A⁻¹,                S⁻¹        ]],

        so with S⁻¹ whole (``_tail_inverse_c`` on L_S) and, for each level l of term 0 with
        the tail rows R_l it meets, Y_l = S⁻¹[R_l, R_l] W_l' L_l⁻¹ (n_l-by-k₀):
        the tail block is -Y_l and the level's own block L_l⁻ᵀ(L_l⁻¹ + W_l Y_l). That is
        Σ_l n_l² k₀ flops beyond S⁻¹, as much as forming S. NumPy twin:
        _gradient._dense_tail_selected_inverse_numpy.
        """
        if not self.factored:
            raise ValueError("the factor holds no factorization")
        if out.shape[0] != self.indices.shape[0]:
            raise ValueError(f"out has {out.shape[0]} entries; M's pattern has "
                             f"{self.indices.shape[0]}")
        if self.r > 0 and self.sinv is None:
            self.sinv = np.zeros((self.r, self.r), order="F")
        cdef int status
        with nogil:
            status = self._selected_inverse(&out[0])
        if status == 2:
            raise MemoryError()
        if status:
            raise np.linalg.LinAlgError("S is singular")

    cdef int _selected_inverse(self, double *out) noexcept nogil:
        cdef int k0 = self.k0, q0 = self.q0, r = self.r, info = 0, a, c, e
        cdef Py_ssize_t lev, j, t, t2, nr, maxr = 0, base
        cdef double v
        cdef const int *ip = &self.indptr[0]
        cdef const int *ix = &self.indices[0]
        cdef const int *fr = &self.first_rest[0] if q0 > 0 else NULL
        cdef const double *w = &self.w[0]
        cdef const double *lo
        cdef double *si = &self.sinv[0, 0] if r > 0 else NULL
        cdef double *x
        cdef double *y
        cdef double *blk
        cdef double *zl
        cdef const double *col
        cdef Py_ssize_t *rows
        cdef int nri, inc = 1
        cdef double one = 1.0, zero = 0.0
        if r > 0:
            for c in range(r):
                for e in range(c, r):
                    si[e + c * r] = self.s[e, c]
            info = _tail_inverse_c(si, r)
            if info != 0:
                return 1
            _mirror_lower(si, r)
        for j in range(q0, q0 + r):             # the tail: S⁻¹
            for t in range(ip[j], ip[j + 1]):
                out[t] = si[(ix[t] - q0) + (j - q0) * r]
        for lev in range(self.nlev0):
            maxr = max(maxr, ip[lev * k0 + 1] - fr[lev * k0])
        x = <double *> malloc((2 * maxr * k0 + 2 * k0 * k0 + 1) * sizeof(double))
        rows = <Py_ssize_t *> malloc((maxr + 1) * sizeof(Py_ssize_t))
        if x == NULL or rows == NULL:
            free(x)
            free(rows)
            return 2
        y = x + maxr * k0
        blk = y + maxr * k0                     # L_l⁻¹ + W_l Y_l
        zl = blk + k0 * k0                      # the level's block of M⁻¹
        for lev in range(self.nlev0):
            lo = &self.l0[lev * k0 * k0]
            base = fr[lev * k0]
            nr = ip[lev * k0 + 1] - base
            for t in range(nr):                 # R as tail indices
                rows[t] = ix[base + t] - q0
            if nr > 0 and rows[nr - 1] - rows[0] == nr - 1 and r > _SMALL_TAIL:
                # R a run of the tail (verbagg: every subject meets every item): BLAS
                nri = <int> nr
                for c in range(k0):
                    dgemv(b"N", &nri, &nri, &one, si + rows[0] * (r + 1), &r,
                          &w[fr[lev * k0 + c]], &inc, &zero, &x[c * nr], &inc)
            else:
                for t in range(nr * k0):
                    x[t] = 0.0
                for t2 in range(nr):            # x = S⁻¹[R, R] W_l', down S⁻¹'s columns
                    col = si + rows[t2] * r
                    for c in range(k0):
                        v = w[fr[lev * k0 + c] + t2]
                        for t in range(nr):
                            x[t + c * nr] += col[rows[t]] * v
            for t in range(nr):                 # y = x L_l⁻¹, row by row
                for c in range(k0 - 1, -1, -1):
                    v = x[t + c * nr]
                    for a in range(c + 1, k0):
                        v -= lo[a + c * k0] * y[t + a * nr]
                    y[t + c * nr] = v / lo[c + c * k0]
            for c in range(k0):                 # the tail rows of the level's columns
                for t in range(nr):
                    out[fr[lev * k0 + c] + t] = -y[t + c * nr]
            for c in range(k0):                 # blk = L_l⁻¹ + W_l y
                for a in range(k0):
                    v = 0.0
                    for t in range(nr):
                        v += w[fr[lev * k0 + a] + t] * y[t + c * nr]
                    blk[a + c * k0] = v
                for a in range(c, k0):          # column c of L_l⁻¹ (lower)
                    v = 1.0 if a == c else 0.0
                    for e in range(c, a):
                        v -= lo[a + e * k0] * zl[e]
                    zl[a] = v / lo[a + a * k0]
                    blk[a + c * k0] += zl[a]
            for c in range(k0):                 # zl = L_l⁻ᵀ blk
                for a in range(k0 - 1, -1, -1):
                    v = blk[a + c * k0]
                    for e in range(a + 1, k0):
                        v -= lo[e + a * k0] * zl[e + c * k0]
                    zl[a + c * k0] = v / lo[a + a * k0]
            for c in range(k0):                 # its lower triangle, at the level's slots
                j = lev * k0 + c
                for t in range(ip[j], fr[j]):
                    out[t] = zl[(ix[t] - lev * k0) + c * k0]
        free(x)
        free(rows)
        return 0

    def g_blocks(self, const double[::1, :] sinv, const int[::1] level,
                 const i64[::1] col, int ks):
        """Blocks of G = -A⁻¹B'S⁻¹ = -L_A⁻ᵀW S⁻¹: for each i, the k₀-by-ks block at term 0's
        level ``level[i]`` and the tail's columns col[i]..col[i]+ks (n-by-k₀-by-ks). What
        the Laplace gradient reads of M⁻¹'s columns after term 0, one block per row of the
        data, without forming G whole (q₀·r entries)."""
        cdef Py_ssize_t n = level.shape[0], i, t, nr, j, lev
        cdef int k0 = self.k0, q0 = self.q0, a, c, b
        cdef double v
        out = np.empty((n, k0, ks))
        cdef double[:, :, ::1] o = out
        cdef const double *lo
        cdef const double *wp = &self.w[0]
        cdef const int *ix = &self.indices[0]
        cdef const int *fr = &self.first_rest[0]
        cdef const int *ip = &self.indptr[0]
        with nogil:
            for i in range(n):
                lev = level[i]
                lo = &self.l0[lev * k0 * k0]
                nr = ip[lev * k0 + 1] - fr[lev * k0]
                for b in range(ks):
                    for c in range(k0):         # -W_l S⁻¹[R_l, col]
                        j = fr[lev * k0 + c]
                        v = 0.0
                        for t in range(nr):
                            v += wp[j + t] * sinv[ix[j + t] - q0, col[i] + b]
                        o[i, c, b] = -v
                    for c in range(k0 - 1, -1, -1):   # L_l⁻ᵀ
                        v = o[i, c, b]
                        for a in range(c + 1, k0):
                            v -= lo[a + c * k0] * o[i, a, b]
                        o[i, c, b] = v / lo[c + c * k0]
        return out

    def forward(self, double[::1, :] b):
        """In place b <- L⁻¹ b (q-by-m, Fortran)."""
        self._check(b)
        with nogil:
            self._solve(b, False)
        return b

    def backward(self, double[::1, :] b):
        """In place b <- L'⁻¹ b (q-by-m, Fortran)."""
        self._check(b)
        with nogil:
            self._solve(b, True)
        return b

    def _check(self, b):
        if not self.factored:
            raise ValueError("the factor holds no factorization")
        if b.shape[0] != self.q:
            raise ValueError(f"b has {b.shape[0]} rows; the factor has {self.q}")

    cdef void _solve(self, double[::1, :] b, bint transpose) noexcept nogil:
        self._solve_ptr(&b[0, 0] if b.shape[1] > 0 else NULL, b.shape[0], b.shape[1],
                        transpose)

    cdef void _solve_ptr(self, double *b, Py_ssize_t ldb, Py_ssize_t m,
                         bint transpose) noexcept nogil:
        """L⁻¹: term 0 level by level, then the tail (_tail_solve); L'⁻¹: the other way
        (m columns of b at leading dimension ldb)."""
        cdef int k0 = self.k0, q0 = self.q0, r = self.r
        cdef Py_ssize_t lev, col, t, nr, j
        cdef int a, c
        cdef double v
        cdef double *x
        cdef const double *lo
        cdef const int *ix = &self.indices[0]
        if transpose and r > 0 and m > 0:
            _tail_solve(&self.s[0, 0], r, &b[q0], <int> ldb, <int> m, True)
        for col in range(m):
            x = &b[col * ldb]
            for lev in range(self.nlev0):
                lo = &self.l0[lev * k0 * k0]
                nr = self.indptr[lev * k0 + 1] - self.first_rest[lev * k0]
                if not transpose:
                    for c in range(k0):         # x0 <- L_l⁻¹ x0
                        v = x[lev * k0 + c]
                        for a in range(c):
                            v -= lo[c + a * k0] * x[lev * k0 + a]
                        x[lev * k0 + c] = v / lo[c + c * k0]
                    for c in range(k0):         # x_r[R_l] -= W_l' x0
                        j = self.first_rest[lev * k0 + c]
                        v = x[lev * k0 + c]
                        for t in range(nr):
                            x[ix[j + t]] -= self.w[j + t] * v
                    continue
                for c in range(k0):             # x0 -= W_l x_r[R_l]
                    j = self.first_rest[lev * k0 + c]
                    v = 0.0
                    for t in range(nr):
                        v += self.w[j + t] * x[ix[j + t]]
                    x[lev * k0 + c] -= v
                for c in range(k0 - 1, -1, -1):  # x0 <- L_l⁻ᵀ x0
                    v = x[lev * k0 + c]
                    for a in range(c + 1, k0):
                        v -= lo[a + c * k0] * x[lev * k0 + a]
                    x[lev * k0 + c] = v / lo[c + c * k0]
        if not transpose and r > 0 and m > 0:
            _tail_solve(&self.s[0, 0], r, &b[q0], <int> ldb, <int> m, False)


cdef int _external_factorize(void *obj, double *logdet) noexcept:
    cdef DenseTailFactor f = <DenseTailFactor> obj
    cdef int status
    with nogil:
        status = f._factorize()
    f.factored = status == 0
    logdet[0] = f._logdet
    return status


cdef int _external_tail_inverse(void *obj, double *out) noexcept:
    cdef DenseTailFactor f = <DenseTailFactor> obj
    cdef int r = f.r, info
    cdef Py_ssize_t i, col
    if not f.factored:
        return 1
    if r == 0:
        return 0
    with nogil:
        for col in range(r):
            for i in range(col, r):
                out[i + col * r] = f.s[i, col]
        info = _tail_inverse_c(out, r)
    return 1 if info else 0


cdef void _external_solve(void *obj, double *b, Py_ssize_t ldb, Py_ssize_t m,
                          bint transpose) noexcept:
    cdef DenseTailFactor f = <DenseTailFactor> obj
    with nogil:
        f._solve_ptr(b, ldb, m, transpose)

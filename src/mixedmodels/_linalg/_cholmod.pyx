# cython: language_level=3
"""A sparse Cholesky factor with a fixed pattern, over CHOLMOD (through csrc/mm_cholmod.c).

Design: the symmetric matrix M = Λ'Z'WZΛ + I keeps one sparsity pattern for a whole fit,
so it is analysed (fill-reducing ordering, symbolic factorization) once when the object is
built, and refactorized in place for each θ. The values array is the caller's: the blocked
update writes M's new values straight into it, then calls ``factorize``. Every CHOLMOD
status becomes a Python exception here, so no failure is left to surface deep in C.
``selected_inverse`` gives M⁻¹ on M's own pattern from the factor (Takahashi's
recurrences in csrc/mm_cholmod.c), for the Laplace gradient (_gradient.py).
"""
import numpy as np
cimport numpy as cnp
from libc.stdlib cimport malloc, free

from scipy.linalg.cython_blas cimport dgemm, dsymm, dtrsm
from scipy.linalg.cython_lapack cimport dpotri

cnp.import_array()

cdef extern from "mm_cholmod.h":
    ctypedef struct mm_chol:
        pass
    mm_chol *mm_chol_new(int n, int *colptr, int *rowind, double *x, int mode, int *status)
    void mm_chol_free(mm_chol *h)
    int mm_chol_factorize(mm_chol *h) nogil
    double mm_chol_logdet(const mm_chol *h) nogil
    int mm_chol_forward(mm_chol *h, int nrhs, double *b, int ld) nogil
    int mm_chol_backward(mm_chol *h, int nrhs, double *b, int ld) nogil
    int mm_chol_selected_inverse(mm_chol *h, double *out) nogil
    int mm_chol_unit_factor(mm_chol *h, const int **p, const int **i, const double **x,
                            const double **d)
    int mm_chol_supernodes(const mm_chol *h, int *nsuper, const int **super, const int **pi,
                           const int **px, const int **rows, const double **x,
                           size_t *xsize)
    const int *mm_chol_perm(const mm_chol *h)
    int mm_chol_is_super(const mm_chol *h)
    double mm_chol_lnz(const mm_chol *h)
    double mm_chol_flops(const mm_chol *h)
    int mm_chol_version()
    int mm_openmp_serial(int serial)

_MODES = {"auto": 0, "simplicial": 1, "supernodal": 2}


class CholmodError(RuntimeError):
    """CHOLMOD reported an error (out of memory, invalid input)."""


def cholmod_version():
    """CHOLMOD's version code as compiled in (major * 1000 + minor)."""
    return mm_chol_version()


def openmp_serial(bint serial):
    """Run CHOLMOD's OpenMP regions on one thread (True) or as built (False).

    Returns False where the shim has no OpenMP to switch (see csrc/mm_cholmod.h).
    """
    return bool(mm_openmp_serial(serial))


cdef class SparseCholesky:
    """Cholesky factor P M P' = L L' of a symmetric positive definite sparse matrix.

    Parameters
    ----------
    indptr, indices : int32 arrays
        The CSC pattern of the lower triangle of M (sorted row indices).
    data : float64 array
        Its values, borrowed: rewrite them in place, then call :meth:`factorize`.
    mode : {"auto", "simplicial", "supernodal"}
    """
    cdef mm_chol *h
    cdef readonly int n
    cdef object _indptr, _indices, _data   # keep the borrowed arrays alive
    cdef object _zx, _slot_at, _supmap      # supernodal selected inversion, made on first use

    def __cinit__(self, indptr, indices, data, mode="auto"):
        self.h = NULL
        cdef int[::1] p = np.ascontiguousarray(indptr, dtype=np.int32)
        cdef int[::1] i = np.ascontiguousarray(indices, dtype=np.int32)
        if not (isinstance(data, np.ndarray) and data.dtype == np.float64
                and data.flags.c_contiguous and data.flags.writeable):
            raise TypeError("data must be a writeable, contiguous float64 array (it is borrowed)")
        cdef double[::1] x = data
        self.n = p.shape[0] - 1
        if self.n < 1 or p[self.n] != x.shape[0] or p[self.n] != i.shape[0]:
            raise ValueError("inconsistent CSC arrays for the sparse Cholesky factor")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}")
        self._indptr, self._indices, self._data = p.base, i.base, data
        cdef int status = 0
        self.h = mm_chol_new(self.n, &p[0], &i[0], &x[0], _MODES[mode], &status)
        if self.h == NULL:
            raise CholmodError(f"CHOLMOD could not analyse the matrix (status {status})")

    def __dealloc__(self):
        if self.h != NULL:
            mm_chol_free(self.h)
            self.h = NULL

    def factorize(self):
        """Refactorize from the current values; raise if M is not positive definite."""
        cdef int s
        with nogil:
            s = mm_chol_factorize(self.h)
        if s > 0:
            raise np.linalg.LinAlgError(
                f"matrix not positive definite (CHOLMOD stopped at column {s})")
        if s < 0:
            raise CholmodError(f"CHOLMOD factorization failed (status {s})")

    def logdet(self):
        """log det(L), half the log-determinant of M."""
        return mm_chol_logdet(self.h)

    def forward(self, double[::1, :] b):
        """In place: b <- L⁻¹ P b, for a Fortran-ordered n-by-m block."""
        self._solve(b, 0)

    def backward(self, double[::1, :] b):
        """In place: b <- P' L'⁻¹ b, for a Fortran-ordered n-by-m block."""
        self._solve(b, 1)

    cdef _solve(self, double[::1, :] b, int which):
        if b.shape[0] != self.n:
            raise ValueError(f"right-hand side has {b.shape[0]} rows, factor has {self.n}")
        if b.shape[1] == 0:
            return
        cdef int s
        with nogil:
            if which == 0:
                s = mm_chol_forward(self.h, <int> b.shape[1], &b[0, 0], <int> b.shape[0])
            else:
                s = mm_chol_backward(self.h, <int> b.shape[1], &b[0, 0], <int> b.shape[0])
        if s != 0:
            raise CholmodError(f"CHOLMOD solve failed (status {s})")

    def selected_inverse(self, double[::1] out):
        """out <- M⁻¹ at the slots of M's lower-triangle pattern (the layout of the values
        array), from the last factorization.

        A selected inversion: Takahashi's recurrences on the pattern of L give P M⁻¹ P'
        there, about one factorization's work, without the q solves a column-by-column
        inverse takes. A simplicial factor is inverted entry by entry in the shim, a
        supernodal one block by block here (``_supernodal_inverse``). NumPy twin:
        _gradient._takahashi_numpy on :meth:`unit_factor`.
        """
        if out.shape[0] != (<object> self._data).shape[0]:
            raise ValueError(f"out has {out.shape[0]} entries; M's pattern has "
                             f"{(<object> self._data).shape[0]}")
        cdef int s
        if self.is_supernodal:
            self._supernodal_inverse(out)
            return
        with nogil:
            s = mm_chol_selected_inverse(self.h, &out[0])
        if s != 0:
            raise CholmodError(f"selected inversion failed (status {s}): is the matrix "
                               "factorized?")

    cdef _supernodal_inverse(self, double[::1] out):
        """Takahashi's recurrences a supernode at a time, from the last: with J its
        columns, R its rows below them, L_JJ, L_RJ its blocks and Z = (P M P')⁻¹,

            Y = L_RJ L_JJ⁻¹,   Z_RJ = -Z_RR Y,   Z_JJ = (L_JJ L_JJ')⁻¹ - Z_RJ'Y,

        where Z_RR, gathered from the later supernodes, lies on L's pattern (R is a
        clique of the filled graph). That is dense BLAS work of the size of the
        factorization's; Z is kept in the factor's own supernodal layout."""
        cdef int nsuper, info = 0, status
        cdef const int *sup
        cdef const int *pi
        cdef const int *px
        cdef const int *ls
        cdef const double *lx
        cdef size_t xsize
        status = mm_chol_supernodes(self.h, &nsuper, &sup, &pi, &px, &ls, &lx, &xsize)
        if status != 0:
            raise CholmodError(f"selected inversion failed (status {status}): is the "
                               "matrix factorized?")
        if self._slot_at is None:
            self._slot_at = _supernodal_slots(self, nsuper, sup, pi, px, ls)
            self._zx = np.empty(xsize)
            self._supmap = np.repeat(np.arange(nsuper, dtype=np.int32),
                                     np.diff(np.array(<const int[:nsuper + 1]> sup)))
        cdef double[::1] zx = self._zx
        cdef const long long[::1] slot_at = self._slot_at
        cdef const int[::1] supmap = self._supmap
        cdef int k, maxr = 0, maxc = 0
        for k in range(nsuper):
            maxc = max(maxc, sup[k + 1] - sup[k])
            maxr = max(maxr, pi[k + 1] - pi[k] - (sup[k + 1] - sup[k]))
        cdef double *y = <double *> malloc((<size_t> maxr * maxc + <size_t> maxr * maxr + 1)
                                           * sizeof(double))
        if y == NULL:
            raise MemoryError()
        cdef Py_ssize_t t
        with nogil:
            info = _supernodal_takahashi(nsuper, sup, pi, px, ls, lx, &zx[0], &supmap[0], y,
                                         y + <size_t> maxr * maxc)
            if info == 0:
                for t in range(out.shape[0]):
                    out[t] = zx[slot_at[t]]
        free(y)
        if info != 0:
            raise CholmodError(f"supernodal selected inversion failed ({info})")

    def unit_factor(self):
        """The last factorization as P M P' = U D U', U unit lower triangular.

        Returns
        -------
        indptr, indices, data : U in CSC (each column's diagonal first, 1 there)
        d : D, length n
        """
        cdef const int *p
        cdef const int *i
        cdef const double *x
        cdef const double *d
        cdef int s = mm_chol_unit_factor(self.h, &p, &i, &x, &d)
        if s != 0:
            raise CholmodError(f"no numeric factor to export (status {s})")
        cdef Py_ssize_t nnz = p[self.n]
        indptr = np.array(<const int[:self.n + 1]> p, dtype=np.int32)
        indices = np.array(<const int[:nnz]> i, dtype=np.int32) if nnz else np.zeros(0, np.int32)
        data = np.array(<const double[:nnz]> x) if nnz else np.zeros(0)
        return indptr, indices, data, np.array(<const double[:self.n]> d)

    @property
    def perm(self):
        """The fill-reducing permutation P as an index array."""
        cdef const int *pp = mm_chol_perm(self.h)
        return np.array(<int[:self.n]> pp, dtype=np.intp)

    @property
    def is_supernodal(self):
        return bool(mm_chol_is_super(self.h))

    @property
    def flops(self):
        """Floating-point operations of one factorization, as counted by the analysis."""
        return float(mm_chol_flops(self.h))

    @property
    def nnz_factor(self):
        """Nonzeros in L as counted by the analysis."""
        return int(mm_chol_lnz(self.h))


cdef object _supernodal_slots(SparseCholesky f, int nsuper, const int *sup, const int *pi,
                              const int *px, const int *ls):
    """For each slot (i, j) of M's lower pattern, where its entry of P M⁻¹ P' sits in the
    supernodal layout: row max(Pinv i, Pinv j) of column min(...). The pattern and the
    supernodes are fixed at the analysis, so this is made once. Checks that each
    supernode's rows ascend (the gathers walk them in step)."""
    cdef Py_ssize_t n = f.n, k, t, j, col, cc, lo, hi, r
    cdef int[::1] indptr = f._indptr
    cdef int[::1] indices = f._indices
    for k in range(nsuper):
        for t in range(pi[k] + 1, pi[k + 1]):
            if ls[t] <= ls[t - 1]:
                raise CholmodError("a supernode's rows do not ascend")
    perm = f.perm
    pinv = np.empty(n, dtype=np.intp)
    pinv[perm] = np.arange(n)
    supmap = np.repeat(np.arange(nsuper), np.diff(np.array(<const int[:nsuper + 1]> sup)))
    cols = np.repeat(np.arange(n), np.diff(np.asarray(indptr)))
    a, b = pinv[np.asarray(indices)], pinv[cols]
    row, column = np.maximum(a, b), np.minimum(a, b)
    out = np.empty(len(row), dtype=np.int64)
    cdef long long[::1] o = out
    cdef Py_ssize_t[::1] rv = row
    cdef Py_ssize_t[::1] cv = column
    cdef long long[::1] sm = supmap.astype(np.int64)
    for t in range(len(row)):
        j = cv[t]
        k = sm[j]
        cc = j - sup[k]
        lo, hi = pi[k] + cc, pi[k + 1]
        while lo < hi:                          # binary search among the ascending rows
            r = (lo + hi) // 2
            if ls[r] < rv[t]:
                lo = r + 1
            else:
                hi = r
        if lo >= pi[k + 1] or ls[lo] != rv[t]:
            raise CholmodError("an entry of M is not on the pattern of its factor")
        o[t] = px[k] + cc * (pi[k + 1] - pi[k]) + (lo - pi[k])
    return out


cdef int _supernodal_takahashi(int nsuper, const int *sup, const int *pi, const int *px,
                               const int *ls, const double *lx, double *zx,
                               const int *supmap, double *y, double *zrr) noexcept nogil:
    # see SparseCholesky._supernodal_inverse; y and zrr hold the largest R-by-J and R-by-R
    cdef int k, k2, nc, ns, nr, ns2, c, c2, q, cc, a, info = 0
    cdef double one = 1.0, mone = -1.0, zero = 0.0
    cdef const int *rows
    cdef const int *rows2
    cdef const double *l
    cdef double *z
    cdef const double *z2
    for k in range(nsuper - 1, -1, -1):
        nc = sup[k + 1] - sup[k]
        ns = pi[k + 1] - pi[k]
        nr = ns - nc
        rows = ls + pi[k]
        l = lx + px[k]
        z = zx + px[k]
        for c in range(nc):                     # Z_JJ <- L_JJ (lower), then its inverse
            for a in range(c, nc):
                z[a + c * ns] = l[a + c * ns]
        dpotri(b"L", &nc, z, &ns, &info)
        if info != 0:
            return 1
        if nr == 0:
            continue
        for c in range(nc):                     # Y = L_RJ L_JJ⁻¹
            for a in range(nr):
                y[a + c * nr] = l[nc + a + c * ns]
        dtrsm(b"R", b"L", b"N", b"N", &nr, &nc, &one, <double *> l, &ns, y, &nr)
        for c in range(nr):                     # Z_RR's lower triangle, column by column
            k2 = supmap[rows[nc + c]]
            cc = rows[nc + c] - sup[k2]
            rows2 = ls + pi[k2]
            ns2 = pi[k2 + 1] - pi[k2]
            z2 = zx + px[k2] + cc * ns2
            q = cc
            for c2 in range(c, nr):
                while q < ns2 and rows2[q] < rows[nc + c2]:
                    q += 1
                if q >= ns2 or rows2[q] != rows[nc + c2]:
                    return 2                    # not a clique: not an elimination's pattern
                zrr[c2 + c * nr] = z2[q]
        # Z_RJ = -Z_RR Y, then Z_JJ -= Z_RJ'Y
        dsymm(b"L", b"L", &nr, &nc, &mone, zrr, &nr, y, &nr, &zero, z + nc, &ns)
        dgemm(b"T", b"N", &nc, &nc, &nr, &mone, z + nc, &ns, y, &nr, &one, z, &ns)
    return 0

# cython: language_level=3
"""A sparse Cholesky factor with a fixed pattern, over CHOLMOD (through csrc/mm_cholmod.c).

Design: the symmetric matrix M = Λ'Z'WZΛ + I keeps one sparsity pattern for a whole fit,
so it is analysed (fill-reducing ordering, symbolic factorization) once when the object is
built, and refactorized in place for each θ. The values array is the caller's: the blocked
update writes M's new values straight into it, then calls ``factorize``. Every CHOLMOD
status becomes a Python exception here, so no failure is left to surface deep in C.
"""
import numpy as np
cimport numpy as cnp

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

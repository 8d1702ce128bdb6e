# What other kernel modules may cimport from _dense.pyx: small dense linear algebra on raw
# pointers, without LAPACK (see the module for why).

# A = L L' of a symmetric n by n matrix (row-major, lower triangle read) into L (row-major,
# zeros above the diagonal; L may be A). Returns 0, or j + 1 where pivot j is not positive.
cdef int cholesky_lower_c(const double *a, Py_ssize_t n, double *L) noexcept nogil

# x <- L'⁻¹ x for the row-major lower-triangular L of cholesky_lower_c.
cdef void solve_lower_transposed_c(const double *L, Py_ssize_t n, double *x) noexcept nogil

# The eigenvalues of a symmetric n by n matrix a (row-major, overwritten) into w, in no
# particular order, by cyclic Jacobi rotations. Returns 0, or 1 when the sweeps ran out.
cdef int symmetric_eigenvalues_c(double *a, Py_ssize_t n, double *w) noexcept nogil

# The Householder QR of an n by p matrix (n >= p) held by columns in a (column j at
# a + j n): on return a holds Q's columns the same way and r (p by p, row-major) R.
# work needs p doubles.
cdef void householder_qr_c(double *a, Py_ssize_t n, Py_ssize_t p, double *r,
                           double *work) noexcept nogil

# What other kernel modules cimport from _blocked.pyx: the level-by-level factor and
# solves of a block-diagonal random-effects block, Λu, and the per-θ factorizer (the
# compiled PIRLS of _kernels/_glm.pyx drives it without a Python call per iteration).

ctypedef long long i64

cdef double blockdiag_factor_c(const double *avals, const double *lam, int k, Py_ssize_t nlev,
                               double *L, double *tmp) noexcept nogil

cdef void blockdiag_solve_c(const double *L, int k, Py_ssize_t nlev, double *b,
                            bint transpose) noexcept nogil

cdef int chol_inplace(double *B, int k, double *logdet) noexcept nogil

cdef void lambda_times_c(const double *lam, const i64 *lam_off, const i64 *uoff,
                         const int *kk, const int *nlev, int nterm, const double *u,
                         double *out) noexcept nogil


# The per-θ factorizer (ThetaFactorizer) through functions rather than its declaration:
# a cdef class declared here would tie the binary layout of every module that cimports
# this file to its fields. tf must be a ThetaFactorizer (checked).
cdef int tf_set_theta(object tf, const double[::1] theta) except -1
cdef double *tf_lam(object tf) except NULL
cdef Py_ssize_t tf_lam_size(object tf) except -1
cdef double tf_factor(object tf, bint small) except? -1.0
cdef bint tf_has_small(object tf) except -1
cdef int tf_backward(object tf, object b_arr, double *b) except -1

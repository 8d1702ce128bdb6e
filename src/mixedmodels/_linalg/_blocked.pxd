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


# A factor of M from another module (the dense tail) as C functions, so the per-θ step
# calls it without a Python method call (a microsecond each on a small model). ``obj`` is
# the factor object (borrowed); ``factorize`` returns 0, or 1 where M is not positive
# definite, and sets *logdet; ``solve`` is b <- L⁻¹b (L'⁻¹b with transpose) for m columns of
# length q at leading dimension ldb; ``tail_inverse`` writes the lower triangle of S⁻¹, the
# inverse of the tail's Schur complement at the last factorization (r-square, column-major),
# and returns 0, or 1 where there is no factorization or S is singular; all called with the
# GIL held. Handed over in a PyCapsule named "mixedmodels.ExternalFactor".
ctypedef int (*external_factorize_t)(void *obj, double *logdet) noexcept
ctypedef void (*external_solve_t)(void *obj, double *b, Py_ssize_t ldb, Py_ssize_t m,
                                  bint transpose) noexcept
ctypedef int (*external_tail_inverse_t)(void *obj, double *out) noexcept

cdef struct ExternalFactor:
    void *obj
    external_factorize_t factorize
    external_solve_t solve
    external_tail_inverse_t tail_inverse


# The per-θ factorizer (ThetaFactorizer) through functions rather than its declaration:
# a cdef class declared here would tie the binary layout of every module that cimports
# this file to its fields. tf must be a ThetaFactorizer (checked).
cdef int tf_set_theta(object tf, const double[::1] theta) except -1
cdef double *tf_lam(object tf) except NULL
cdef Py_ssize_t tf_lam_size(object tf) except -1
cdef double tf_factor(object tf, bint small) except? -1.0
cdef bint tf_has_small(object tf) except -1
cdef int tf_backward(object tf, object b_arr, double *b) except -1
cdef double tf_factor_at(object tf, const double *theta, Py_ssize_t n, int *status) except? -1.0


# The arrays a factorization at θ leaves (valid until the workspace rebinds its products):
# Z'W[X y] and L⁻¹PΛ'Z'W[X y] (q by m, column-major), the Schur factor r (m by m,
# row-major), the level blocks of the first term's factor and of Z'WZ, the templates.
cdef struct TfArrays:
    const double *ztxy
    const double *rzxy
    const double *r
    const double *lblocks
    const double *avals
    const double *lam
    Py_ssize_t q, m, k0, nlev0
    bint blockdiag          # one term: lblocks holds the whole factor

cdef int tf_arrays(object tf, TfArrays *out) except -1
cdef int tf_lambda_times(object tf, const double *u, double *out) except -1
cdef void inverse_from_lower(const double *lo, int k, double *li, double *minv) noexcept nogil

# What other kernel modules cimport from _blocked.pyx: the level-by-level factor and
# solves of a block-diagonal random-effects block (used by the compiled PIRLS).

cdef double blockdiag_factor_c(const double *avals, const double *lam, int k, Py_ssize_t nlev,
                               double *L, double *tmp) noexcept nogil

cdef void blockdiag_solve_c(const double *L, int k, Py_ssize_t nlev, double *b,
                            bint transpose) noexcept nogil

cdef int chol_inplace(double *B, int k, double *logdet) noexcept nogil

# What other kernel modules cimport from _gradient.pyx: the one-term Laplace gradient on
# raw pointers, so that the compiled PIRLS (_glm.PirlsKernel.laplace) runs it on the
# arrays it is bound to, with no Python call between the modes and the gradient.

cdef struct OneTerm:
    # one random-effects term: row i has level codes[i] (0 <= codes[i] < nlev) and the
    # term's k columns at z[i * zstride]; X is n-by-p, row-major
    Py_ssize_t n, nlev, p, zstride
    int k
    const int *codes
    const double *z
    const double *x
    const double *wrkwt
    const double *wrkresid
    const double *mu
    bint logit             # W' = W(1 - 2μ) (logit), else W (log)

cdef Py_ssize_t blockdiag_work_size(Py_ssize_t n, Py_ssize_t nlev, int k) noexcept nogil

cdef int blockdiag_laplace_gradient_c(const OneTerm *ot, const double *lam,
                                      const double *avals, const double *u,
                                      double *grad_beta, double *grad_t,
                                      double *work) noexcept nogil

cdef Py_ssize_t blockdiag_covariance_work_size(Py_ssize_t nlev, int k,
                                               Py_ssize_t p) noexcept nogil

cdef int blockdiag_beta_covariance_c(const OneTerm *ot, const double *lam, double *schur,
                                     double *vcov, double *work) noexcept nogil

cdef int raise_covariance_status(int status) except -1

# What _glm.pyx cimports: the trust-region search over any compiled value and gradient
# (the one-term GLMM's Laplace deviance as well as the LMM's profiled objective).

ctypedef int (*value_gradient_t)(void *context, const double *x, double *f,
                                 double *g) except -1

cdef object trust_region_c(value_gradient_t value_gradient, void *context, Py_ssize_t n,
                           double *x, const double *lower_, double radius, double ftol,
                           int maxeval, double *g_end=*, const double *b_start=*,
                           const Py_ssize_t *nb_start=*)

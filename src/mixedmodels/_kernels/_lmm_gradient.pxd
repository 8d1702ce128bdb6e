# What _search.pyx and _check.pyx cimport: the LMM's profiled objective (and, where the
# class has it, its exact gradient) as compiled methods, so that NLopt's callback and the
# convergence check evaluate them without a Python call.

cdef class LmmObjective:
    cdef readonly object factorizer
    cdef readonly double dfr, logw, logabsdet
    cdef readonly bint reml
    cdef readonly Py_ssize_t ntheta
    cdef public object pending      # an exception raised inside a compiled search
    cdef readonly bint has_gradient
    cdef double value(self, const double *theta) except? -2.0
    cdef int value_gradient(self, const double *theta, double *val, double *grad) except -1

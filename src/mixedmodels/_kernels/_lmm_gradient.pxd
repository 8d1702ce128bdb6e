# What _search.pyx cimports: the LMM's profiled objective as a compiled method, so that
# NLopt's callback evaluates it without a Python call.

cdef class LmmObjective:
    cdef readonly object factorizer
    cdef readonly double dfr, logw, logabsdet
    cdef readonly bint reml
    cdef readonly Py_ssize_t ntheta
    cdef public object pending      # an exception raised inside a compiled search
    cdef double value(self, const double *theta) except? -2.0

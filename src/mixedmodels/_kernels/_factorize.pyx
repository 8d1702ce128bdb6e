# cython: boundscheck=False, wraparound=False
"""Sorted levels and codes of a short Arrow string column, from its buffers.

A grouping factor read from an Arrow-backed pandas column (sleepstudy's subject,
penicillin's plate and sample) was factorized by turning every row into a Python string
(``to_pylist``), a set, a sort and a dict lookup per row: ~20 µs for 180 rows, a sixth of
a small model's set-up. Here the rows' bytes are hashed and compared in place, the
distinct values sorted by their UTF-8 bytes (the order of their code points, which is
Python's order of the strings), and Python strings made only for the levels.

NumPy twin: ``formula._columns._sorted_string_codes_python`` (tests/test_factorize_strings.py).
"""
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, memset

import numpy as np
cimport numpy as cnp

cnp.import_array()


cdef inline unsigned long long _hash(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # FNV-1a
    cdef unsigned long long h = 1469598103934665603ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


cdef inline int _compare(const unsigned char *a, Py_ssize_t na, const unsigned char *b,
                         Py_ssize_t nb) noexcept nogil:
    """Byte order, a prefix first: the code-point order of the UTF-8 strings."""
    cdef int c = memcmp(a, b, na if na < nb else nb)
    if c:
        return c
    return (na > nb) - (na < nb)


def arrow_string_codes(size_t offsets_address, Py_ssize_t offsets_size,
                       size_t data_address, Py_ssize_t data_size, Py_ssize_t offset,
                       Py_ssize_t length, bint wide):
    """(codes, levels) of ``length`` rows of an Arrow string array from ``offset`` on:
    levels the distinct values as str, sorted; codes (int32) each row's place among them.
    Given the array's buffers' addresses and sizes in bytes (``pyarrow.Buffer``'s
    ``address`` and ``size``): the offsets (int64 where ``wide``, a large_string, else
    int32) and the UTF-8 data. Reading the buffers in place spares NumPy views of them,
    a cold start of their own on a small model's set-up. Raises ValueError where the
    offsets do not fit the buffers."""
    cdef Py_ssize_t width = 8 if wide else 4, i
    if length < 0 or offset < 0 or (offset + length + 1) * width > offsets_size or (
            length and offsets_address == 0):
        raise ValueError("the offsets buffer is shorter than the rows")
    cdef long long *bounds = <long long *> malloc((length + 1) * sizeof(long long))
    if bounds == NULL:
        raise MemoryError()
    cdef const long long *o64 = <const long long *> offsets_address
    cdef const int *o32 = <const int *> offsets_address
    try:
        for i in range(length + 1):
            bounds[i] = o64[offset + i] if wide else o32[offset + i]
            if not 0 <= bounds[i] <= data_size or (i and bounds[i] < bounds[i - 1]):
                raise ValueError(f"row {i} lies outside the string data")
        return _codes(bounds, bounds + 1, length, <const unsigned char *> data_address)
    finally:
        free(bounds)


cdef _codes(const long long *starts, const long long *ends, Py_ssize_t n,
            const unsigned char *base):
    cdef Py_ssize_t i, j, slot, u = 0, cap = 16
    while cap < 2 * n:
        cap *= 2
    cdef cnp.npy_intp dim = n
    cdef cnp.ndarray codes = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INT32, 0)
    cdef int *cv = <int *> cnp.PyArray_DATA(codes)
    cdef Py_ssize_t *table = <Py_ssize_t *> malloc(cap * sizeof(Py_ssize_t))
    cdef Py_ssize_t *first = <Py_ssize_t *> malloc((n + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *order = <Py_ssize_t *> malloc((n + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *rank = <Py_ssize_t *> malloc((n + 1) * sizeof(Py_ssize_t))
    cdef const unsigned char *p
    cdef Py_ssize_t length, k
    try:
        if table == NULL or first == NULL or order == NULL or rank == NULL:
            raise MemoryError()
        for i in range(cap):
            table[i] = -1
        with nogil:
            for i in range(n):              # distinct values, by first occurrence
                p = base + starts[i]
                length = ends[i] - starts[i]
                slot = <Py_ssize_t> (_hash(p, length) & <unsigned long long> (cap - 1))
                while True:
                    j = table[slot]
                    if j < 0:
                        table[slot] = u
                        first[u] = i
                        cv[i] = <int> u
                        u += 1
                        break
                    k = first[j]
                    if ends[k] - starts[k] == length and memcmp(base + starts[k], p, length) == 0:
                        cv[i] = <int> j
                        break
                    slot = (slot + 1) & (cap - 1)
            for i in range(u):              # sort them (insertion: a few hundred at most)
                j = i
                while j > 0 and _compare(base + starts[first[order[j - 1]]],
                                         ends[first[order[j - 1]]] - starts[first[order[j - 1]]],
                                         base + starts[first[i]],
                                         ends[first[i]] - starts[first[i]]) > 0:
                    order[j] = order[j - 1]
                    j -= 1
                order[j] = i
            for i in range(u):
                rank[order[i]] = i
            for i in range(n):
                cv[i] = <int> rank[cv[i]]
        levels = [PyUnicode_DecodeUTF8(<const char *> (base + starts[first[order[i]]]),
                                       ends[first[order[i]]] - starts[first[order[i]]],
                                       NULL) for i in range(u)]
        return codes, levels
    finally:
        free(table)
        free(first)
        free(order)
        free(rank)

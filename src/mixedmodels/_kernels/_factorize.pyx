# cython: boundscheck=False, wraparound=False
"""Sorted levels and codes of a short Arrow string column, from its buffers.

A grouping factor read from an Arrow-backed pandas column (sleepstudy's subject,
penicillin's plate and sample) was factorized by turning every row into a Python string
(``to_pylist``), a set, a sort and a dict lookup per row: ~20 µs for 180 rows, a sixth of
a small model's set-up. Here the rows' bytes are hashed and compared in place, the
distinct values sorted by their UTF-8 bytes (the order of their code points, which is
Python's order of the strings), and Python strings made only for the levels.

NumPy twin: ``formula._columns._sorted_string_codes`` (tests/test_factorize_strings.py).
"""
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, memset

import numpy as np


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


def sorted_string_codes(const long long[::1] starts, const long long[::1] ends,
                        const unsigned char[::1] data):
    """(codes, levels): row i is the UTF-8 bytes data[starts[i]:ends[i]]; levels the
    distinct values as str, sorted; codes (int32) each row's place among them."""
    cdef Py_ssize_t n = starts.shape[0], i, j, slot, u = 0, cap = 16
    while cap < 2 * n:
        cap *= 2
    codes = np.empty(n, dtype=np.int32)
    cdef int[::1] cv = codes
    cdef Py_ssize_t *table = <Py_ssize_t *> malloc(cap * sizeof(Py_ssize_t))
    cdef Py_ssize_t *first = <Py_ssize_t *> malloc((n + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *order = <Py_ssize_t *> malloc((n + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *rank = <Py_ssize_t *> malloc((n + 1) * sizeof(Py_ssize_t))
    cdef const unsigned char *base = &data[0] if data.shape[0] else NULL
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

"""How many threads the compiled core uses: CHOLMOD's OpenMP loops and the BLAS.

Debian's SuiteSparse 5.12 fixes CHOLMOD's OpenMP thread count (4) when it is built, so
``OMP_NUM_THREADS=1`` alone is not honoured: on two busy cores insteval's evaluation took
112 ms with those four threads and 45 ms on one. At import, a thread count of 1 in
``MIXEDMODELS_NUM_THREADS`` or ``OMP_NUM_THREADS`` puts CHOLMOD's OpenMP regions on one
thread; ``set_num_threads(n)`` does so at run time and also limits the BLAS (through
threadpoolctl) to n threads.

With n > 1 CHOLMOD runs its loops as built (capped by ``OMP_THREAD_LIMIT``); OpenMP offers
no way to lower an explicit thread count other than that cap or serial execution.
"""
import os

from ._linalg import _cholmod

__all__ = ["set_num_threads", "get_num_threads"]

_state = {"n": None}


def set_num_threads(n):
    """Limit the compiled core to ``n`` threads (None: CHOLMOD's loops as built again;
    a BLAS limit set before stays).

    Parameters
    ----------
    n : int or None
        1 runs CHOLMOD's OpenMP loops and the BLAS on one thread (what a benchmark or a
        process pool wants); n > 1 lets CHOLMOD use its built-in count and the BLAS n.
    """
    if n is not None:
        n = int(n)
        if n < 1:
            raise ValueError(f"the number of threads must be at least 1, not {n}")
    _cholmod.openmp_serial(n == 1)
    if n is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n, user_api="blas")
    _state["n"] = n


def get_num_threads():
    """The limit set by :func:`set_num_threads` or the environment (None: none)."""
    return _state["n"]


def _from_environment():
    for var in ("MIXEDMODELS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value.split(",")[0])
            except ValueError:
                return
            if n == 1:
                # the BLAS reads its own variables; only CHOLMOD needs telling
                _cholmod.openmp_serial(True)
                _state["n"] = 1
            return


_from_environment()

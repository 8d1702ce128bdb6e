"""The compiled core honours a thread count of one (CHOLMOD's OpenMP loops included)."""
import os
import subprocess
import sys
import textwrap

import mixedmodels as mm

SCRIPT = textwrap.dedent("""
    import os, numpy as np, pandas as pd
    import mixedmodels as mm
    rng = np.random.default_rng(0)
    n = 4000
    d = pd.DataFrame({"a": rng.integers(0, 300, n).astype(str),
                      "b": rng.integers(0, 100, n).astype(str)})
    d["y"] = rng.normal(size=n)
    import mixedmodels._linalg.system as system
    system.DENSE_TAIL = False        # CHOLMOD's own threads are what is counted
    m = mm.LinearMixedModel("y ~ 1 + (1 | a) + (1 | b)", d)
    assert m.path == "cholmod"
    m.objective(np.array([0.5, 0.5]))
    print(len(os.listdir("/proc/self/task")))
""")


def _threads_after_a_factorization(env):
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_omp_num_threads_one_keeps_cholmod_on_one_thread():
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "MIXEDMODELS_NUM_THREADS", "OMP_THREAD_LIMIT")}
    base["OPENBLAS_NUM_THREADS"] = "1"
    serial = _threads_after_a_factorization({**base, "OMP_NUM_THREADS": "1"})
    as_built = _threads_after_a_factorization(base)
    # the main thread (and at most one runtime helper); CHOLMOD's OpenMP team, when the
    # library has one, appears only without the limit
    assert serial <= 2
    assert as_built >= serial


def test_set_num_threads_round_trip():
    before = mm.get_num_threads()
    try:
        mm.set_num_threads(1)
        assert mm.get_num_threads() == 1
        fit = mm.fit("diameter ~ 1 + (1 | plate) + (1 | sample)", mm.dataset("penicillin"))
        mm.set_num_threads(None)
        again = mm.fit("diameter ~ 1 + (1 | plate) + (1 | sample)", mm.dataset("penicillin"))
        assert fit.objective == again.objective
    finally:
        mm.set_num_threads(before)

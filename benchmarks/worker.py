"""A persistent worker process for one Python library (``python worker.py LIB``).

Reads one JSON request per line on stdin and answers one line ``@@ {json}`` per request
on the protocol descriptor (the original stdout; anything the library itself prints is
sent to stderr).  Requests:

``{"op": "load", "id": PROBLEM}``   read and prepare the data (not timed)
``{"op": "fit"}``                   fit once; the time is taken here, around the fit call
``{"op": "memfit"}``                as fit, and measure the fit's peak resident memory
``{"op": "evals", "k": K}``         set-up vs per-evaluation time, where the library allows
``{"op": "quit"}``

Peak memory of a fit: the garbage is collected and glibc asked to return free memory
(``malloc_trim``), the kernel's high-water mark of the process is reset
(``/proc/self/clear_refs`` = 5), the resident size is read (``VmRSS``) and, after the
fit, the high-water mark (``VmHWM``); the difference is the peak memory the fit needed
above what the process already held (the data frame, the imported library).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The protocol gets its own descriptor; fd 1 then points at stderr, so that output of
# the libraries (Python or native) cannot corrupt an answer.
_proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

from problems import by_id  # noqa: E402
from runners import ADAPTERS, CannotExpress  # noqa: E402

try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover
    _libc = None


def answer(**kw):
    _proto.write("@@ " + json.dumps(kw, default=_default) + "\n")
    _proto.flush()


def _default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def status_kb(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main():
    lib = sys.argv[1]
    adapter = ADAPTERS[lib]
    try:
        version = adapter.version()
    except Exception as e:  # library missing
        answer(ok=False, hello=lib, error=f"import failed: {e}")
        return
    answer(ok=True, hello=lib, version=version, pid=os.getpid(),
           threads={k: os.environ.get(k) for k in
                    ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "RAYON_NUM_THREADS")})
    fit = None
    problem = None
    last_model = None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        op = req["op"]
        if op == "quit":
            break
        try:
            if op == "load":
                fit, last_model = None, None
                problem = by_id(req["id"])
                t0 = time.perf_counter()
                try:
                    fit = adapter.prepare(problem)
                except CannotExpress as e:
                    answer(ok=False, cannot=str(e))
                    continue
                gc.collect()
                answer(ok=True, loaded=problem.id, load_time=time.perf_counter() - t0)
            elif op in ("fit", "memfit"):
                mem = op == "memfit"
                last_model = None
                if mem:
                    gc.collect()
                    if _libc is not None:
                        _libc.malloc_trim(0)
                    reset_ok = reset_hwm()
                    base = status_kb("VmRSS")
                t0 = time.perf_counter()
                res, model = fit()
                el = time.perf_counter() - t0
                if mem:
                    hwm = status_kb("VmHWM")
                    res.update(peak_kb=hwm - base, base_kb=base, hwm_reset=reset_ok)
                last_model = model if req.get("keep") else None
                del model
                answer(ok=True, time=el, **res)
            elif op == "evals":
                answer(**evals(adapter, problem, fit, req.get("k", 20)))
            else:
                answer(ok=False, error=f"unknown op {op}")
        except Exception as e:
            traceback.print_exc()
            answer(ok=False, error=f"{type(e).__name__}: {e}"[:500])


def evals(adapter, problem, fit, k):
    """Set-up vs per-evaluation time; implemented for ours (see ours_evals)."""
    hook = getattr(adapter, "evals", None)
    if hook is None:
        return {"ok": False, "error": "no per-evaluation hook for this library"}
    return hook(problem, fit, k)


if __name__ == "__main__":
    try:
        main()
    finally:
        _proto.close()

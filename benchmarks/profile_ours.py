"""Where mixedmodels spends a fit: ``python benchmarks/profile_ours.py [PROBLEM ...]``.

Wraps the phases of a fit with timers (inclusive wall time and call counts) and runs one
warm fit of each problem (default: lmm/insteval and glmm/verbagg:laplace), then a
cProfile of the same fit.  Phases:

- formula/design    ``build_design``: parsing, model frame, X, y, the Z columns
- analysis          ``BlockedSystem.__init__``: the sparsity pattern of Z'Z, CHOLMOD's
                    symbolic analysis (fill-reducing ordering)
- cross-products    ``set_products``: Z'WZ, Z'W[X y], [X y]'W[X y] (once for an LMM;
                    at every PIRLS iteration for a GLMM, whose weights change)
- factorization     ``factorize`` at θ, split into: Λ update (scatter of Λ'Z'ZΛ + I into
                    the factor's matrix / Λ'Z'[X y]), numeric Cholesky (CHOLMOD, or the
                    block-diagonal kernel), Schur complement for the fixed effects
- PIRLS             ``pirls`` (inclusive of the cross-products and factorizations it calls)
- AGQ               ``agq_deviance``
- objective         the function the optimizer calls, inclusive
- optimizer         ``minimize`` minus the objective calls: NLopt's BOBYQA itself and the
                    Python callback glue
- rectify/result    boundary checks after the optimizer, building the fitted object

Writes ``benchmarks/results/profile.md`` (tables) and ``profile_<problem>.txt`` (cProfile).
The threads are pinned to 1 like the suite (set before numpy is imported).
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import cProfile  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# MM_SRC: benchmark a built snapshot instead of this tree's src/ (see README)
sys.path.insert(0, os.environ.get("MM_SRC", str(HERE.parent / "src")))

import problems as P  # noqa: E402
from runners import Ours  # noqa: E402

T = defaultdict(float)
N = defaultdict(int)


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            T[name] += time.perf_counter() - t0
            N[name] += 1
    return wrapper


def instrument():
    import mixedmodels._model as model_mod
    import mixedmodels.glmm as glmm_mod
    import mixedmodels.lmm as lmm_mod
    from mixedmodels._linalg import system as sysmod

    model_mod.build_design = timed("formula/design", model_mod.build_design)
    BS = sysmod.BlockedSystem
    BS.__init__ = timed("analysis", BS.__init__)
    BS.set_products = timed("cross-products", BS.set_products)
    BS.factorize = timed("factorization", BS.factorize)
    bl = sysmod._blocked
    for name, phase in [("lambdat_times", "  Λ'Z'[X y]"), ("scatter_lambda", "  Λ update (scatter)"),
                        ("blockdiag_factor", "  block-diagonal Cholesky"),
                        ("blockdiag_forward", "  block-diagonal solve"),
                        ("schur_cholesky", "  Schur complement (fixed effects)")]:
        if hasattr(bl, name):
            try:
                setattr(bl, name, timed(phase, getattr(bl, name)))
            except (AttributeError, TypeError):
                pass
    if hasattr(glmm_mod, "pirls"):
        glmm_mod.pirls = timed("PIRLS", glmm_mod.pirls)
    if hasattr(glmm_mod, "agq_deviance"):
        glmm_mod.agq_deviance = timed("AGQ", glmm_mod.agq_deviance)

    def wrap_minimize(mod):
        orig = mod.minimize

        @functools.wraps(orig)
        def minimize(objective, optsum, *a, **kw):
            t0 = time.perf_counter()
            try:
                return orig(timed("objective (inclusive)", objective), optsum, *a, **kw)
            finally:
                T["minimize"] += time.perf_counter() - t0
        mod.minimize = minimize
        mod.rectify = timed("rectify", mod.rectify)
    wrap_minimize(lmm_mod)
    wrap_minimize(glmm_mod)


def git_state():
    snap = Path(os.environ.get("MM_SRC", HERE.parent / "src")).parent / "COMMIT"
    if snap.exists():
        return snap.read_text().strip() + " (snapshot)"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=HERE.parent,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (src has uncommitted changes)" if dirty else "")
    except OSError:
        return "?"


def profile(pid, lines):
    p = P.by_id(pid)
    fit = Ours().prepare(p)
    fit()                      # warm-up (imports, caches)
    T.clear()
    N.clear()
    t0 = time.perf_counter()
    res, m = fit()
    total = time.perf_counter() - t0
    optim = T["minimize"] - T["objective (inclusive)"]
    lines.append(f"### `{pid}`\n")
    lines.append(f"Fit {total:.3f} s, objective {res['objective']:.4f}, {res.get('nfev')} objective "
                 f"evaluations, path: {getattr(m.model, 'path', '?')} "
                 f"({m.model.describe() if hasattr(m.model, 'describe') else ''}).\n")
    lines.append("| phase | calls | seconds | % of fit |")
    lines.append("|---|---:|---:|---:|")
    order = ["formula/design", "analysis", "cross-products", "factorization", "  Λ'Z'[X y]",
             "  Λ update (scatter)", "  block-diagonal Cholesky", "  block-diagonal solve",
             "  Schur complement (fixed effects)", "PIRLS", "AGQ", "objective (inclusive)"]
    subs = ("  Λ'Z'[X y]", "  Λ update (scatter)", "  block-diagonal Cholesky",
            "  block-diagonal solve", "  Schur complement (fixed effects)")
    for k in order:
        if N.get(k):
            lines.append(f"| {k.replace('  ', '&nbsp;&nbsp;')} | {N[k]} | {T[k]:.4f} | {100 * T[k] / total:.1f} |")
        if k == subs[-1] and N.get("factorization"):
            fac = T["factorization"] - sum(T[s] for s in subs)
            label = ("rest of factorize (CHOLMOD numeric, solves)" if any(N.get(s) for s in subs)
                     else "all of it in one compiled call (Λ update, CHOLMOD numeric, solves, Schur)")
            lines.append(f"| &nbsp;&nbsp;{label} | | {fac:.4f} | {100 * fac / total:.1f} |")
    lines.append(f"| optimizer (minimize − objective) | | {optim:.4f} | {100 * optim / total:.1f} |")
    if N.get("rectify"):
        lines.append(f"| rectify (boundary checks) | {N['rectify']} | {T['rectify']:.4f} | {100 * T['rectify'] / total:.1f} |")
    other = total - T["formula/design"] - T["analysis"] - T["minimize"] - T["rectify"]
    if not p.glmm:
        other -= T["cross-products"] if N["cross-products"] == 1 else 0
    lines.append(f"| everything else (result object, GLM start, set-up glue) | | {other:.4f} | {100 * other / total:.1f} |")
    if N.get("objective (inclusive)"):
        lines.append(f"\nPer objective evaluation: {1e3 * T['objective (inclusive)'] / N['objective (inclusive)']:.2f} ms.\n")

    pr = cProfile.Profile()
    pr.enable()
    fit()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(25)
    out = HERE / "results" / f"profile_{pid.replace('/', '_').replace(':', '_')}.txt"
    out.write_text(s.getvalue())
    # the functions with the most own time (compiled calls count as their caller's line)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:8]
    lines.append("Most own time under cProfile (which adds overhead to small calls):\n")
    lines.append("| function | calls | own seconds |")
    lines.append("|---|---:|---:|")
    for (fname, lineno, func), (cc, nc, tt, ct, callers) in rows:
        short = fname.split("/src/")[-1] if "/src/" in fname else Path(fname).name
        if fname == "~":
            short = ""
        lines.append(f"| `{short}:{lineno}({func})` | {nc} | {tt:.3f} |")
    lines.append(f"\nFull listing: `{out.relative_to(HERE.parent)}`\n")


def main():
    pids = sys.argv[1:] or ["lmm/insteval", "glmm/verbagg:laplace"]
    instrument()
    import mixedmodels as mm
    lines = ["# Profile of mixedmodels fits\n",
             f"mixedmodels {mm.__version__} at {git_state()}; threads pinned to 1; "
             f"one warm fit per problem (`python benchmarks/profile_ours.py`).\n",
             "Phases are inclusive wall times; indented rows are parts of the row above.\n"]
    for pid in pids:
        profile(pid, lines)
    (HERE / "results" / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

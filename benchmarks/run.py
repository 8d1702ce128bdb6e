"""Run the benchmark suite: ``python benchmarks/run.py`` (see --help and README.md).

One persistent worker process per library (``worker.py LIB`` for the Python libraries,
``Rscript r_worker.R`` for lme4) is started with the thread counts pinned; for every
problem each worker loads the data (not timed), fits once to warm up, then fits
``--repeats`` more times with the libraries taking turns (the order rotates each round),
each fit timed inside its worker.  A second pass measures the peak memory of one fit
per (problem, library) in a fresh process.  Results go to ``benchmarks/results/``:
``results.json`` (every measurement), ``results.csv`` (one row per problem and library),
``results.md`` (the tables) and ``scaling.png``.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import problems as P  # noqa: E402
from _workers import LineWorker, WorkerDied  # noqa: E402

LIBS = ["mixedmodels", "lme4", "glmm", "mixedlm", "statsmodels"]
THREAD_VARS = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "RAYON_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"]
# Warm-up problems of the memory pass, per family: a first fit in the fresh process
# loads lazily imported code so that it is not counted in the measured fit's peak.
WARMUP = {"gaussian": "lmm/sleepstudy:ml", "bernoulli": "glmm/contra:urbandist-laplace",
          "binomial": "glmm/cbpp", "poisson": "glmm/grouseticks"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------

class Worker(LineWorker):
    """A library's fitting worker (worker.py, or r_worker.R for lme4)."""

    def __init__(self, lib, env):
        if lib == "lme4":
            cmd = ["Rscript", "--vanilla", str(HERE / "r_worker.R")]
            self.quit_line = "quit"
        else:
            cmd = [sys.executable, str(HERE / "worker.py"), lib]
        super().__init__(lib, cmd, env, HERE, HERE / "results" / "tmp" / f"worker_{lib}.log",
                         120)

    def request(self, line, timeout):
        return self.request_line(line, timeout)

    # the two dialects
    def load(self, p, timeout=600):
        if self.lib != "lme4":
            return self.request(json.dumps({"op": "load", "id": p.id}), timeout)
        if p.data == "generated":
            source, path = "generated", str(P.generate(p))
        else:
            source, path = "bundled", str(P.DATA_DIR / f"{p.data}.csv.gz")
        fields = {"id": p.id, "source": source, "path": path, "prep": p.prep or "",
                  "r_formula": p.r_formula, "family": p.family,
                  "nAGQ": str(0 if p.fast else p.nAGQ), "REML": "true" if p.REML else "false",
                  "weights": p.weights or "",
                  "contrasts": ",".join(f"{k}={v}" for k, v in p.contrasts.items())}
        return self.request("\t".join(["load"] + [x for kv in fields.items() for x in kv]), timeout)

    def op(self, op, timeout, **kw):
        if self.lib == "lme4":
            return self.request("\t".join([op] + [str(x) for kv in kw.items() for x in kv]), timeout)
        return self.request(json.dumps({"op": op, **kw}), timeout)


# ----------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------

# import name -> what pip installs; the peers and the plot, from PyPI when missing
PYTHON_DEPS = {"matplotlib": "matplotlib", "statsmodels": "statsmodels", "psutil": "psutil",
               "glmm": "glmm", "mixedlm": "mixedlm"}


def ensure_python_deps():
    """Install the Python peers and matplotlib with pip when they are missing, and say so."""
    import importlib.util
    missing = [pkg for mod, pkg in PYTHON_DEPS.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    log(f"installing missing Python packages with pip: {' '.join(missing)}")
    for pkg in missing:   # one at a time: a peer that fails to install is left out, not fatal
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", pkg],
                           capture_output=True, text=True)
        if r.returncode != 0:
            log(f"pip could not install {pkg}; it is left out ({r.stderr.strip().splitlines()[-1:]})")


def ensure_ours(ours_src):
    """A fresh clone has no compiled extensions yet: build them with scripts/setup.sh."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import mixedmodels._linalg._cholmod, mixedmodels._kernels._glm, mixedmodels; "
            "assert mixedmodels.__file__.startswith(sys.argv[1]), mixedmodels.__file__")
    probe = [sys.executable, "-c", code, str(Path(ours_src).resolve())]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return
    log("mixedmodels is not built here; running scripts/setup.sh")
    subprocess.run(["bash", str(P.REPO / "scripts" / "setup.sh")], check=True)


def ensure_lme4():
    """lme4 through Debian's r-cran-lme4; installed with apt-get when missing."""
    def ok():
        return shutil.which("Rscript") and subprocess.run(
            ["Rscript", "-e", "suppressMessages(library(lme4))"],
            capture_output=True).returncode == 0
    if ok():
        return True
    log("lme4 runner: R/lme4 not found; installing it: apt-get install -y r-cran-lme4")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL)
    r = subprocess.run(["apt-get", "install", "-y", "r-cran-lme4"], env=env,
                       stdout=subprocess.DEVNULL)
    if r.returncode != 0 or not ok():
        log("lme4 runner: installing r-cran-lme4 failed; lme4 is left out")
        return False
    return True


def machine_info(threads, ours_src):
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        import numpy
        npv = numpy.__version__
    except ImportError:
        npv = None
    blas = None
    for cand in ("/usr/lib/x86_64-linux-gnu/libblas.so.3", "/lib/x86_64-linux-gnu/libblas.so.3"):
        if os.path.exists(cand):
            blas = os.path.realpath(cand)   # what CHOLMOD (ours) and R resolve libblas.so.3 to
            break
    git = {"ours_src": str(ours_src)}
    snap = Path(ours_src).parent / "COMMIT"
    if snap.exists():   # a snapshot made with `git archive` (see README)
        git["head"] = snap.read_text().strip()
        git["src_dirty"] = False
    else:
        try:
            git["head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=P.REPO,
                                         capture_output=True, text=True).stdout.strip()
            git["src_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "src"], cwd=P.REPO,
                                                   capture_output=True, text=True).stdout.strip())
        except OSError:
            pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "memory": mem,
            "python": platform.python_version(), "numpy": npv,
            "platform": platform.platform(), "threads": threads, "system_blas": blas,
            "git": git, "loadavg_start": os.getloadavg()}


# ----------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------

def select(problems, patterns, include_all):
    if not patterns:
        return [p for p in problems if p.default or include_all]
    out = []
    for p in problems:
        if any(fnmatch.fnmatch(p.id, pat) or pat == p.id or
               (not any(c in pat for c in "*?[") and pat in p.id) for pat in patterns):
            out.append(p)
    return out


def run_suite(args):
    threads = args.threads
    env = dict(os.environ)
    for v in THREAD_VARS:
        env[v] = str(threads)
    ours_src = Path(args.ours_src).resolve() if args.ours_src else P.REPO / "src"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ours_src)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    (HERE / "results" / "tmp").mkdir(parents=True, exist_ok=True)
    log(f"threads pinned: {', '.join(f'{v}={threads}' for v in THREAD_VARS)}")

    libs = [x for x in args.libs.split(",") if x]
    ensure_python_deps()
    if "mixedmodels" in libs:
        ensure_ours(ours_src)
    if "lme4" in libs and not ensure_lme4():
        libs.remove("lme4")
    problems = select(P.registry(args.scaling), args.problems, args.all)
    log(f"{len(problems)} problems x {len(libs)} libraries, {args.repeats} timed runs each")

    results = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python", "benchmarks/run.py"] + sys.argv[1:]),
               "machine": machine_info(threads, ours_src), "libraries": {}, "problems": {},
               "repeats": args.repeats, "budget": args.budget, "timeout": args.timeout,
               "references": P.reference_objectives()}

    workers = {}

    def start(lib):
        try:
            w = Worker(lib, env)
        except (TimeoutError, WorkerDied) as e:
            results["libraries"][lib] = {"ok": False, "error": str(e)}
            return None
        if not w.hello.get("ok"):
            results["libraries"][lib] = w.hello
            w.kill()
            return None
        results["libraries"].setdefault(lib, {k: v for k, v in w.hello.items() if k != "pid"})
        return w

    for lib in libs:
        w = start(lib)
        if w is not None:
            workers[lib] = w
            log(f"  {lib}: {w.hello.get('version')}")
        else:
            log(f"  {lib}: unavailable: {results['libraries'][lib].get('error')}")

    given_up = {}   # (lib, series) -> size at which it timed out: larger sizes are skipped
    for p in problems:
        log(f"\n== {p.id}")
        if p.data == "generated":
            P.generate(p)
        rec = results["problems"].setdefault(p.id, {"spec": p.to_json(), "libs": {}})
        rec["loadavg"] = os.getloadavg()
        active = []
        for lib in libs:
            r = rec["libs"].setdefault(lib, {"runs": []})
            w = workers.get(lib)
            series = p.id.split(":")[0]
            if w is None and lib in results["libraries"] and not results["libraries"][lib].get("ok", True):
                r["status"] = "unavailable"
                continue
            if (lib, series) in given_up and p.gen and p.gen["n"] > given_up[(lib, series)]:
                r["status"] = "skipped"
                r["error"] = f"timed out at a smaller size of this series"
                continue
            if w is None:
                w = workers[lib] = start(lib)
                if w is None:
                    r["status"] = "unavailable"
                    continue
            try:
                msg = w.load(p, timeout=args.timeout)
            except (TimeoutError, WorkerDied) as e:
                r.update(status="error", error=f"load: {e}")
                workers.pop(lib, None)
                continue
            if msg.get("cannot"):
                r.update(status="cannot", error=msg["cannot"])
                log(f"  {lib:12s} cannot express: {msg['cannot']}")
                continue
            if not msg.get("ok"):
                r.update(status="error", error=msg.get("error"))
                log(f"  {lib:12s} load error: {msg.get('error')}")
                continue
            active.append(lib)

        # warm-up fit (not counted), which also sets how many timed runs fit the budget
        reps = {}
        for lib in list(active):
            r = rec["libs"][lib]
            res = fit_one(workers, lib, "fit", args.timeout, given_up, p)
            r["warmup"] = res
            if not res.get("ok"):
                r.update(status="error" if res.get("status") != "timeout" else "timeout",
                         error=res.get("error"))
                log(f"  {lib:12s} {r['status']}: {res.get('error')}")
                active.remove(lib)
                continue
            t = max(res["time"], 1e-6)
            reps[lib] = max(1, min(args.repeats, int(args.budget // t)))
        # timed runs, libraries in alternation (rotating order)
        rounds = max(reps.values(), default=0)
        for i in range(rounds):
            order = active[i % len(active):] + active[:i % len(active)] if active else []
            for lib in order:
                if len(rec["libs"][lib]["runs"]) >= reps[lib]:
                    continue
                res = fit_one(workers, lib, "fit", args.timeout, given_up, p)
                if not res.get("ok"):
                    rec["libs"][lib].update(status="error", error=res.get("error"))
                    active.remove(lib)
                    continue
                rec["libs"][lib]["runs"].append(res)
        for lib in active:
            r = rec["libs"][lib]
            if not r["runs"]:
                continue
            times = [x["time"] for x in r["runs"]]
            last = r["runs"][-1]
            r.update(status="ok", median=statistics.median(times), min=min(times),
                     n=len(times), objective=last.get("objective"),
                     converged=last.get("converged"), nfev=last.get("nfev"),
                     method=last.get("method", "lmer" if p.family == "gaussian" else "glmer"),
                     approximation=bool(last.get("approximation")),
                     warnings=last.get("warnings") or None)
            log(f"  {lib:12s} {r['median'] * 1e3:10.1f} ms  (n={r['n']})  obj={r['objective']}")
        # set-up vs per-evaluation time (ours and lme4), on the LMMs that show scaling
        if args.evals and p.family == "gaussian" and ("scaling" in p.tags or "large" in p.tags):
            for lib in ("lme4", "mixedmodels"):
                if lib in active:
                    try:
                        e = workers[lib].op("evals", args.timeout, k=args.eval_k)
                    except (TimeoutError, WorkerDied) as ex:
                        e = {"ok": False, "error": str(ex)}
                        workers.pop(lib, None)
                    rec["libs"][lib]["evals"] = e
        save(results, args)

    for w in workers.values():
        w.close()

    if args.memory:
        memory_pass(results, problems, libs, env, args)
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["machine"]["loadavg_end"] = os.getloadavg()
    save(results, args)
    import report
    report.write_all(results, Path(args.out))
    log(f"\nwrote {args.out}/results.json, results.csv, results.md, scaling.png")


def fit_one(workers, lib, op, timeout, given_up, p):
    w = workers[lib]
    try:
        return w.op(op, timeout)
    except TimeoutError:
        workers.pop(lib, None)
        if p.gen:
            given_up[(lib, p.id.split(":")[0])] = p.gen["n"]
        return {"ok": False, "status": "timeout", "error": f"timeout (> {timeout:g} s)"}
    except WorkerDied as e:
        workers.pop(lib, None)
        return {"ok": False, "error": str(e)}


def memory_pass(results, problems, libs, env, args):
    """Peak memory of one fit per (problem, library), each in a fresh worker process."""
    log("\n== memory (one fresh process per problem and library)")
    byid = {p.id: p for p in P.registry("huge")}
    # glibc: every block of 64 KiB or more is mmap-ed and given back on free, so memory
    # freed by the warm-up fit is not silently reused by the measured one (the same
    # setting for R, Python and the Rust libraries, which use the system allocator)
    menv = dict(env, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    for p in problems:
        for lib in libs:
            r = results["problems"][p.id]["libs"].get(lib, {})
            if r.get("status") != "ok":
                continue
            if r.get("median", 0) * 2 > args.timeout:
                continue
            try:
                w = Worker(lib, menv)
            except (TimeoutError, WorkerDied) as e:
                r["memory"] = {"ok": False, "error": str(e)}
                continue
            try:
                # warm-up: the problem itself when it is quick, else a small one of its family
                warm = p if r.get("median", 0) < args.mem_warm_same else byid[WARMUP[p.family]]
                m = w.load(warm, timeout=args.timeout)
                if m.get("ok"):
                    w.op("fit", args.timeout)
                if warm is not p:
                    w.load(p, timeout=args.timeout)
                m = w.op("memfit", args.timeout)
                r["memory"] = m
                if m.get("ok"):
                    log(f"  {p.id:32s} {lib:12s} peak {m['peak_kb'] / 1024:9.1f} MiB "
                        f"(process held {m['base_kb'] / 1024:.0f} MiB before)")
            except (TimeoutError, WorkerDied) as e:
                r["memory"] = {"ok": False, "error": str(e)}
            finally:
                w.close()
        save(results, args)


def save(results, args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "results.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("problems", nargs="*",
                    help="problem ids, globs (glmm/*) or substrings (verbagg); default: the default suite")
    ap.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated (default {','.join(LIBS)})")
    ap.add_argument("--repeats", type=int, default=5, help="timed warm runs per problem and library (default 5)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds of timed runs per problem and library: slow fits get fewer runs, at least 1 (default 20)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before a fit is abandoned (default 300)")
    ap.add_argument("--threads", type=int, default=1, choices=[1, 2], help="BLAS/OpenMP/Rayon threads for every library (default 1)")
    ap.add_argument("--scaling", default="default", choices=["none", "default", "large", "huge"],
                    help="scaling series: none; default (1e4..1e5 rows); large (+3e5, 1e6); huge (+1e7 crossed)")
    ap.add_argument("--all", action="store_true", help="with no problem ids: every problem of the chosen scaling")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory pass")
    ap.add_argument("--no-evals", dest="evals", action="store_false", help="skip set-up vs per-evaluation timing")
    ap.add_argument("--eval-k", type=int, default=20, help="objective evaluations timed per problem (default 20)")
    ap.add_argument("--mem-warm-same", type=float, default=5.0,
                    help="memory pass: warm up on the problem itself when its fit takes less than this many seconds, "
                         "else on a small problem of the same family (default 5)")
    ap.add_argument("--ours-src", default=None,
                    help="the src/ directory mixedmodels is imported from (default: this tree's src/; "
                         "point it at a built snapshot to keep concurrent edits out of a run)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory (default benchmarks/results)")
    ap.add_argument("--list", action="store_true", help="list the problems and exit")
    args = ap.parse_args(argv)
    if args.list:
        for p in select(P.registry(args.scaling), args.problems, True):
            print(f"{p.id:32s} {'default' if p.default else 'opt-in ':7s} {p.family:9s} "
                  f"nAGQ={0 if p.fast else p.nAGQ} REML={p.REML!s:5s} {p.formula}")
        return
    run_suite(args)


if __name__ == "__main__":
    main()

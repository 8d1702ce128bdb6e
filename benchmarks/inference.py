"""The inference benchmark: ``python benchmarks/inference.py`` (see --help and README.md).

Profile intervals, the parametric bootstrap, Satterthwaite's degrees of freedom and the
negative binomial fit, timed for mixedmodels and for the R package that does the same
(lme4, lmerTest, glmmTMB) in one run, on one thread, libraries in alternation.

One persistent worker process per library: ``python inference.py --worker`` for ours,
``Rscript r_inference.R LIB`` for each R package (only that package loaded).  For every
task each worker prepares the data (not timed) and runs once to warm up; then the
libraries take turns, the order rotating each round, for ``--repeats`` timed runs each.
Every run first makes its untimed set-up (a fresh fit where the timed call starts from
a fit, so that nothing computed by an earlier run is reused), then times the call alone
inside the worker.  The tables show medians and ratios to the R package measured in the
same run.  Results: ``benchmarks/results/inference.json`` (every run) and
``inference.md``.

Single-threading is checked, not assumed: every worker reports, around each timed call,
the process CPU time (all threads) and the CPU ticks of each of its threads (from
``/proc/self/task``); the report gives CPU / wall time and the CPU time spent in threads
other than the main one.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from _workers import LineWorker, WorkerDied

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA_DIR = REPO / "src" / "mixedmodels" / "datasets" / "data"

SLEEP = "reaction ~ 1 + days + (1 + days | subj)"
CBPP = "incid / hsz ~ 1 + period + (1 | herd)"
INSTEVAL = "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)"
TICKS = "ticks ~ 1 + year + ch + (1 | brood) + (1 | location)"
SEED = 20240601

# task id -> what it is, the libraries (ours first, then the R reference the ratio is
# taken against, then any other), what each library times, and the target
TASKS = {
    "profile/sleepstudy": {
        "what": f"profile intervals, `{SLEEP}`, ML (6 parameters)",
        "libs": ["mixedmodels", "lme4"], "ref": "lme4",
        "calls": {"mixedmodels": 'fit.confint(method="profile")',
                  "lme4": 'confint(m, method = "profile")'},
        "target": ("speedup", 10.0)},
    "profile/cbpp": {
        "what": f"profile intervals, binomial `{CBPP}`, weights hsz (5 parameters)",
        "libs": ["mixedmodels", "lme4"], "ref": "lme4",
        "calls": {"mixedmodels": 'fit.confint(method="profile")',
                  "lme4": 'confint(m, method = "profile")'},
        "target": ("speedup", 10.0)},
    "bootstrap/sleepstudy": {
        "what": f"parametric bootstrap, 1,000 replicates, `{SLEEP}`, ML",
        "libs": ["mixedmodels", "lme4"], "ref": "lme4",
        "calls": {"mixedmodels": "mm.bootstrap(fit, 1000, seed=s)",
                  "lme4": ('bootMer(m, FUN = function(x) c(fixef(x), getME(x, "theta"), '
                           'sigma(x)), nsim = 1000)')},
        "target": ("seconds", 2.0)},
    "satterthwaite/insteval": {
        "what": f"Satterthwaite t tests, `{INSTEVAL}`, REML (73,421 rows)",
        "libs": ["mixedmodels", "lmerTest"], "ref": "lmerTest",
        "calls": {"mixedmodels": 'fit.coeftable(ddf="satterthwaite")',
                  "lmerTest": 'summary(m, ddf = "Satterthwaite")'},
        "target": None},
    "negbin/grouseticks": {
        "what": f"negative binomial GLMM, `{TICKS}`, the whole fit from the data frame",
        "libs": ["mixedmodels", "lme4", "glmmTMB"], "ref": "lme4",
        "calls": {"mixedmodels": "mm.fit(formula, g, family=mm.NegativeBinomial())",
                  "lme4": "glmer.nb(formula, g)",
                  "glmmTMB": "glmmTMB(formula, g, family = nbinom2)"},
        "target": ("speedup", 10.0)},
}
# Published, not measured here: MixedModels.jl's documentation times its parametric
# bootstrap of the same sleepstudy model (m2 there: ML, `reaction ~ 1+days+(1+days|subj)`).
MIXEDMODELS_JL = {
    "page": "https://juliastats.org/MixedModels.jl/stable/bootstrap/",
    "version": "MixedModels.jl v5.8.4 docs (Documenter 1.17.0, Julia 1.10.12, built on "
               "GitHub Actions ubuntu-22.04; thread settings not stated)",
    "section": "Reduced Precision Bootstrap",
    "call": "t = @timed parametricbootstrap(MersenneTwister(42), 1000, m2; progress=false)",
    "seconds": 0.729804013,
    "seconds_ftol_rel_1e-8": 0.677052369,
}
THREAD_VARS = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "RAYON_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"]
R_LIBS = {"lme4": "r-cran-lme4", "lmerTest": "r-cran-lmertest", "glmmTMB": "r-cran-glmmtmb",
          "jsonlite": "r-cran-jsonlite"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------
# The Python worker (ours): python inference.py --worker
# ----------------------------------------------------------------------------------

def thread_ticks():
    """CPU ticks (utime + stime) of each thread of this process, by thread id."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                f = fh.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        ticks[tid] = int(f[11]) + int(f[12])
    return ticks


class OursTask:
    """Untimed set-up and the timed call of each task, for mixedmodels."""

    def __init__(self, task, n):
        import mixedmodels as mm
        self.mm, self.task, self.n = mm, task, n
        if task in ("profile/sleepstudy", "bootstrap/sleepstudy"):
            self.df = mm.dataset("sleepstudy")
        elif task == "profile/cbpp":
            self.df = mm.dataset("cbpp")
        elif task == "satterthwaite/insteval":
            self.df = mm.dataset("insteval")
        elif task == "negbin/grouseticks":
            g = mm.dataset("grouseticks")
            g["ch"] = g.height - g.height.mean()
            self.df = g
        else:
            raise ValueError(f"unknown task {task}")

    def setup(self, seed, n):
        """A fresh fit (not timed) and the call to time, with a summary of its result."""
        mm, df = self.mm, self.df
        if self.task == "profile/sleepstudy":
            fit = mm.fit(SLEEP, df, REML=False)
            return (lambda: fit.confint(method="profile")), _ci_result
        if self.task == "profile/cbpp":
            fit = mm.fit(CBPP, df, family=mm.Binomial(), weights="hsz")
            return (lambda: fit.confint(method="profile")), _ci_result
        if self.task == "bootstrap/sleepstudy":
            fit = mm.fit(SLEEP, df, REML=False)
            return (lambda: mm.bootstrap(fit, n, seed=seed)), _boot_result
        if self.task == "satterthwaite/insteval":
            fit = mm.fit(INSTEVAL, df, REML=True)
            return (lambda: fit.coeftable(ddf="satterthwaite")), _ddf_result
        if self.task == "negbin/grouseticks":
            return (lambda: mm.fit(TICKS, df, family=mm.NegativeBinomial())), _nb_result
        raise ValueError(self.task)


def _ci_result(ci):
    return {"names": list(ci.index), "lower": ci["lower"].tolist(), "upper": ci["upper"].tolist()}


def _boot_result(b):
    import numpy as np
    cols = ["(Intercept)", "days", "theta1", "theta2", "theta3", "sigma"]   # bootMer's FUN
    frame = b.to_frame()[cols].dropna()
    return {"n": int(b.n), "n_failed": int(b.n_failed), "n_warned": int(b.n_warned),
            "columns": cols, "mean": frame.mean().tolist(),
            "q025": np.quantile(frame.to_numpy(), 0.025, axis=0).tolist(),
            "q975": np.quantile(frame.to_numpy(), 0.975, axis=0).tolist()}


def _ddf_result(ct):
    return {"names": list(ct.index), "estimate": ct["Coef."].tolist(),
            "se": ct["Std. Error"].tolist(), "df": ct["df"].tolist(), "t": ct["t"].tolist()}


def _nb_result(m):
    return {"objective": -2.0 * float(m.loglik), "nb_theta": float(m.nb_theta),
            "coef": [float(x) for x in m.coef]}


def worker_main():
    # the protocol gets its own descriptor; fd 1 then points at stderr, so that anything
    # the library prints cannot corrupt an answer (as worker.py)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(**kw):
        proto.write("@@ " + json.dumps(kw, default=str) + "\n")
        proto.flush()

    import warnings
    try:
        import mixedmodels as mm
    except Exception as e:  # pragma: no cover
        answer(ok=False, error=f"import failed: {e}")
        return
    import numpy
    import pandas
    import scipy
    answer(ok=True, lib="mixedmodels", pid=os.getpid(), version=getattr(mm, "__version__", "?"),
           file=mm.__file__,
           versions={"numpy": numpy.__version__, "pandas": pandas.__version__,
                     "scipy": scipy.__version__},
           blas=_blas_info())
    task = None
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            if req["op"] == "prepare":
                task = OursTask(req["task"], req.get("n"))
                gc.collect()
                answer(ok=True, task=req["task"], rows=len(task.df))
            elif req["op"] == "run":
                call, summarise = task.setup(req.get("seed"), req.get("n"))
                gc.collect()
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    ticks0 = thread_ticks()
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    value = call()
                    el = time.perf_counter() - t0
                    cpu = time.process_time() - c0
                    ticks1 = thread_ticks()
                answer(ok=True, time=el, cpu=cpu, pid=os.getpid(), ticks_before=ticks0,
                       ticks_after=ticks1,
                       warnings=" | ".join(sorted({str(x.message)[:200] for x in w})),
                       result=summarise(value))
            else:
                answer(ok=False, error=f"unknown op {req['op']}")
        except Exception as e:
            traceback.print_exc()
            answer(ok=False, error=f"{type(e).__name__}: {e}"[:500])


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
        return [{k: i.get(k) for k in ("internal_api", "num_threads", "filepath", "version")}
                for i in threadpool_info()]
    except Exception:   # threadpoolctl is optional
        return None


# ----------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------

class Worker(LineWorker):
    """A library's inference worker (this file with --worker, or r_inference.R)."""

    def __init__(self, lib, env, tmp):
        if lib == "mixedmodels":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        else:
            cmd = ["Rscript", "--vanilla", str(HERE / "r_inference.R"), lib]
        super().__init__(lib, cmd, env, HERE, tmp / f"inference_worker_{lib}.log", 300)

    def request(self, timeout, **req):
        return self.request_line(json.dumps(req), timeout)

    def close(self):
        super().close(timeout=20)


def ensure_r(libs):
    """Rscript with the R packages the workers load; apt-get installs what is missing."""
    need = sorted({"jsonlite", *[x for x in libs if x != "mixedmodels"]})
    if not need or need == ["jsonlite"]:
        return []

    def missing():
        if not shutil.which("Rscript"):
            return need
        code = "for (p in commandArgs(TRUE)) if (!requireNamespace(p, quietly = TRUE)) cat(p, '\\n')"
        r = subprocess.run(["Rscript", "-e", code, *need], capture_output=True, text=True,
                           check=False)
        return r.stdout.split()

    gone = missing()
    if gone:
        pkgs = [R_LIBS[p] for p in gone]
        log(f"R packages missing: {' '.join(gone)}; installing: apt-get install -y {' '.join(pkgs)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=False)
        subprocess.run(["apt-get", "install", "-y", *pkgs], env=env, stdout=subprocess.DEVNULL,
                       check=False)
        gone = missing()
        if gone:
            log(f"still missing after apt-get: {' '.join(gone)}; those libraries are left out")
    return gone


def run_stats(runs, clk):
    """Median and min of the timed runs, and the single-thread check over them."""
    times = [r["time"] for r in runs]
    wall = sum(times)
    cpu = sum(r["cpu"] for r in runs)
    other, main, nthreads = 0, 0, 0
    for r in runs:
        pid = str(r["pid"])
        before, after = r["ticks_before"], r["ticks_after"]
        nthreads = max(nthreads, len(after))
        for tid, t in after.items():
            d = t - before.get(tid, 0)
            if tid == pid:
                main += d
            else:
                other += d
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "median_cpu": statistics.median(r["cpu"] for r in runs),
            "n": len(times), "cpu_over_wall": cpu / wall if wall > 0 else None,
            "cpu_main_thread_s": main / clk, "cpu_other_threads_s": other / clk,
            "max_threads": nthreads}


def run(args):
    env = dict(os.environ)
    for v in THREAD_VARS:
        env[v] = str(args.threads)
    ours_src = Path(args.ours_src).resolve() if args.ours_src else REPO / "src"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ours_src)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = Path(args.out)
    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    log(f"threads pinned: {', '.join(f'{v}={args.threads}' for v in THREAD_VARS)}")

    sys.path.insert(0, str(HERE))
    import run as suite   # the main suite's helpers: machine description, building ours

    tasks = [t for t in TASKS if not args.tasks or any(p in t for p in args.tasks)]
    libs = []
    for t in tasks:
        libs += [x for x in TASKS[t]["libs"] if x not in libs]
    suite.ensure_ours(ours_src)
    gone = ensure_r(libs)
    libs = [x for x in libs if x not in gone]

    clk = os.sysconf("SC_CLK_TCK")
    results = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python", "benchmarks/inference.py"] + sys.argv[1:]),
               "machine": suite.machine_info(args.threads, ours_src), "repeats": args.repeats,
               "boot_n": args.boot_n, "warmup_boot_n": args.warmup_boot_n,
               "clock_ticks_per_s": clk, "thread_vars": {v: str(args.threads) for v in THREAD_VARS},
               "mixedmodels_jl": MIXEDMODELS_JL, "libraries": {}, "tasks": {}}

    workers = {}
    for lib in libs:
        try:
            w = Worker(lib, env, tmp)
        except (TimeoutError, WorkerDied) as e:
            results["libraries"][lib] = {"ok": False, "error": str(e)}
            log(f"  {lib}: unavailable: {e}")
            continue
        results["libraries"][lib] = w.hello
        if not w.hello.get("ok"):
            log(f"  {lib}: unavailable: {w.hello.get('error')}")
            w.kill()
            continue
        workers[lib] = w
        log(f"  {lib} {w.hello.get('version')} (pid {w.hello.get('pid')})")

    for task in tasks:
        spec = TASKS[task]
        log(f"\n== {task}")
        rec = results["tasks"][task] = {"what": spec["what"], "calls": spec["calls"],
                                        "loadavg": os.getloadavg(), "libs": {}}
        active = []
        n = args.boot_n if task.startswith("bootstrap") else None
        for lib in spec["libs"]:
            r = rec["libs"][lib] = {"runs": []}
            if lib not in workers:
                r["status"] = "unavailable"
                continue
            try:
                msg = workers[lib].request(args.timeout, op="prepare", task=task,
                                           data_dir=str(DATA_DIR), n=n)
            except (TimeoutError, WorkerDied) as e:
                msg = {"ok": False, "error": str(e)}
            if not msg.get("ok"):
                r.update(status="error", error=msg.get("error"))
                log(f"  {lib:12s} prepare failed: {msg.get('error')}")
                continue
            active.append(lib)
        # warm-up (not counted); the bootstrap warms up on fewer replicates
        for lib in list(active):
            wn = args.warmup_boot_n if n else None
            msg = _run(workers, lib, args.timeout, seed=SEED - 1, n=wn)
            rec["libs"][lib]["warmup"] = {k: v for k, v in msg.items() if k not in ("ticks_before", "ticks_after")}
            if not msg.get("ok"):
                rec["libs"][lib].update(status="error", error=msg.get("error"))
                log(f"  {lib:12s} warm-up failed: {msg.get('error')}")
                active.remove(lib)
        for i in range(args.repeats):
            k = i % len(active) if active else 0
            for lib in active[k:] + active[:k]:
                msg = _run(workers, lib, args.timeout, seed=SEED + i, n=n)
                if not msg.get("ok"):
                    rec["libs"][lib].update(status="error", error=msg.get("error"))
                    log(f"  {lib:12s} run {i} failed: {msg.get('error')}")
                    continue
                msg["order"] = i
                rec["libs"][lib]["runs"].append(msg)
        for lib in active:
            r = rec["libs"][lib]
            if r["runs"]:
                r["status"] = "ok"
                r.update(run_stats(r["runs"], clk))
                r["result"] = r["runs"][-1]["result"]
                extra = [x["time_derivatives"] for x in r["runs"] if "time_derivatives" in x]
                if extra:
                    r["median_derivatives"] = statistics.median(extra)
                    r["median_with_derivatives"] = statistics.median(
                        [x["time"] + x["time_derivatives"] for x in r["runs"]])
                    r["median_cpu_with_derivatives"] = statistics.median(
                        [x["cpu"] + x["cpu_derivatives"] for x in r["runs"]])
                log(f"  {lib:12s} {_fmt(r['median']):>9s}  (n={r['n']}, cpu/wall "
                    f"{r['cpu_over_wall']:.2f}, other threads {r['cpu_other_threads_s']:.2f} s)")
        save(results, out)

    for w in workers.values():
        w.close()
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["machine"]["loadavg_end"] = os.getloadavg()
    save(results, out)
    (out / "inference.md").write_text(report(results))
    log(f"\nwrote {out / 'inference.json'} and {out / 'inference.md'}")


def _run(workers, lib, timeout, **kw):
    w = workers.get(lib)
    if w is None:
        return {"ok": False, "error": "worker gone"}
    try:
        return w.request(timeout, op="run", **kw)
    except (TimeoutError, WorkerDied) as e:
        workers.pop(lib, None)
        return {"ok": False, "error": str(e)}


def save(results, out):
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "inference.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "inference.json")


# ----------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------

def _fmt(t):
    if t is None:
        return "–"
    if t >= 10:
        return f"{t:.1f} s"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 0.1:
        return f"{t * 1e3:.0f} ms"
    if t >= 0.01:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e3:.2f} ms"


def _ratio(a, b):
    return a / b if a and b else None


def report(res):
    clk = res.get("clock_ticks_per_s", 100)
    for rec in res["tasks"].values():   # the statistics, from the runs themselves
        for r in rec["libs"].values():
            if r.get("runs"):
                r.update(run_stats(r["runs"], clk))
    m = res["machine"]
    L = res["libraries"]
    ours = L.get("mixedmodels", {})
    rv = next((x.get("versions", {}) for k, x in L.items() if k != "mixedmodels" and x.get("ok")), {})
    lines = ["# Inference benchmark", "",
             f"Command: `{res['command']}`  ",
             f"Started {res['started']}, finished {res.get('finished', '?')}.  ",
             f"Machine: {m['cpu']}, {m['nproc']} cores, {m['memory']}; {m['platform']}.  ",
             f"Threads pinned for every process: {', '.join(f'{k}={v}' for k, v in res['thread_vars'].items())} "
             "(checked: see the last table).  ",
             f"System BLAS (libblas.so.3: CHOLMOD and R): `{m.get('system_blas')}`.  ",
             f"mixedmodels {ours.get('version')} at commit {m['git'].get('head')}"
             f"{' (src/ modified)' if m['git'].get('src_dirty') else ''}, from `{m['git'].get('ours_src')}`; "
             f"Python {m['python']}, numpy {ours.get('versions', {}).get('numpy')}, "
             f"pandas {ours.get('versions', {}).get('pandas')}, scipy {ours.get('versions', {}).get('scipy')}.  ",
             f"{rv.get('R', 'R ?')}: lme4 {rv.get('lme4')}, Matrix {rv.get('Matrix')}, "
             f"lmerTest {L.get('lmerTest', {}).get('version')}, glmmTMB {L.get('glmmTMB', {}).get('version')} "
             f"(TMB {L.get('glmmTMB', {}).get('versions', {}).get('TMB')}); R packages from Debian, "
             "called with their default settings.  ",
             f"Load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in m['loadavg_start'])}, "
             f"at end {'/'.join(f'{x:.1f}' for x in m.get('loadavg_end', m['loadavg_start']))} "
             "(the machine is shared; compare ratios within this run, not times across runs).  ",
             f"Each cell: median of {res['repeats']} timed runs after one warm-up run (the "
             f"bootstrap's warm-up: {res['warmup_boot_n']} replicates), libraries in alternation, each "
             "run in a persistent worker process; before each run a fresh fit is made, not timed "
             "(except for the negative binomial, where the fit is what is timed).", ""]

    T = res["tasks"]
    lines += ["## Tasks", ""]
    for task in T:
        calls = "; ".join(f"{lib} `{c}`" for lib, c in TASKS[task]["calls"].items())
        lines.append(f"- `{task}`: {TASKS[task]['what']}. Timed: {calls}.")
    lines += [""]

    def cell(task, lib, key="median"):
        return T.get(task, {}).get("libs", {}).get(lib, {}).get(key)

    lines += ["## Times", "",
              "Median wall time of the timed call; ratio = ours / theirs in this run (below 1: "
              "ours is faster); speed-up = theirs / ours. The last speed-up divides median CPU "
              "times instead (process CPU, user + system), which waiting for a busy core does "
              "not inflate.", "",
              "| task | mixedmodels | compared with | its time | ratio | speed-up | speed-up, CPU time | target |",
              "|---|---:|---|---:|---:|---:|---:|---|"]
    rows = []
    for task in T:
        spec = TASKS[task]
        ours_t, ours_c = cell(task, "mixedmodels"), cell(task, "mixedmodels", "median_cpu")
        for lib in [x for x in spec["libs"] if x != "mixedmodels"]:
            target = spec["target"] if lib == spec["ref"] else None
            if task.startswith("negbin") and lib == "glmmTMB":
                target = ("faster", None)
            rows.append((task, ours_t, ours_c, f"{lib}: `{spec['calls'][lib]}`", cell(task, lib),
                         cell(task, lib, "median_cpu"), target))
            if cell(task, lib, "median_with_derivatives"):
                rows.append((task, ours_t, ours_c,
                             f"{lib}: `as_lmerModLmerTest(m)` + `summary(...)` (its derivatives, "
                             "computed inside `lmerTest::lmer`, plus the summary)",
                             cell(task, lib, "median_with_derivatives"),
                             cell(task, lib, "median_cpu_with_derivatives"), None))
    for task, ours_t, ours_c, label, theirs, theirs_c, target in rows:
        ratio, speed, speed_c = _ratio(ours_t, theirs), _ratio(theirs, ours_t), _ratio(theirs_c, ours_c)
        tgt = ""
        if target and target[0] == "faster":
            tgt = "faster: " + ("met" if speed and speed > 1 else "NOT met")
        elif target and target[0] == "speedup":
            tgt = f"≥ {target[1]:g}× faster: " + ("met" if speed and speed >= target[1] else "NOT met")
        elif target and target[0] == "seconds":
            tgt = f"ours < {target[1]:g} s: " + ("met" if ours_t and ours_t < target[1] else "NOT met")
        f3 = lambda x: "–" if x is None else f"{x:.3g}×"
        lines.append(f"| `{task}` | {_fmt(ours_t)} | {label} | {_fmt(theirs)} | {f3(ratio)} | "
                     f"{f3(speed)} | {f3(speed_c)} | {tgt} |")
    lines += [""]
    jl = res.get("mixedmodels_jl", MIXEDMODELS_JL)
    if "bootstrap/sleepstudy" in T:
        lines += [f"For comparison, not measured here: MixedModels.jl's documentation "
                  f"([{jl['section']}]({jl['page']}), {jl['version']}) prints "
                  f"{jl['seconds']:.3f} s for `{jl['call']}` (`t.time`) on the same sleepstudy "
                  f"model (ML), and {jl['seconds_ftol_rel_1e-8']:.3f} s with "
                  "`optsum_overrides = (; ftol_rel=1e-8)`: another machine, after a 10,000-replicate "
                  "run in the same session (so compiled and warm).", ""]

    # agreement
    lines += ["## Do the answers agree?", ""]
    for task in T:
        lines += _agreement(task, T[task])
    lines += [""]

    # single-threading
    lines += ["## One thread each", "",
              "Over the timed runs of each cell: process CPU time (user + system, all threads) "
              "divided by wall time, the CPU time of the process's threads other than the main "
              "one (from `/proc/self/task/*/stat`, 1/100 s ticks), and the most threads the "
              "process had. A second thread doing work would show as CPU / wall above 1 and as "
              "CPU time outside the main thread.", "",
              "| task | library | runs | CPU / wall | CPU in other threads | threads |",
              "|---|---|---:|---:|---:|---:|"]
    for task in T:
        for lib, r in T[task]["libs"].items():
            if r.get("status") != "ok":
                lines.append(f"| `{task}` | {lib} | {r.get('status')}: {r.get('error')} | | | |")
                continue
            lines.append(f"| `{task}` | {lib} | {r['n']} | {r['cpu_over_wall']:.2f} | "
                         f"{r['cpu_other_threads_s']:.2f} s of {r['cpu_main_thread_s'] + r['cpu_other_threads_s']:.1f} s | "
                         f"{r['max_threads']} |")
    lines += [""]
    notes = res.get("notes")
    if notes:
        lines += ["## Notes", ""] + [f"- {x}" for x in notes] + [""]
    return "\n".join(lines)


def _agreement(task, rec):
    libs = rec["libs"]
    ours = libs.get("mixedmodels", {}).get("result")
    out = []
    if task.startswith("profile/"):
        theirs = libs.get("lme4", {}).get("result")
        if ours and theirs:
            diffs = []
            for j, name in enumerate(ours["names"]):
                for end in ("lower", "upper"):
                    a, b = ours[end][j], theirs[end][j]
                    diffs.append(abs(a - b) / max(abs(b), 1e-8))
            out.append(f"- `{task}`: the {len(ours['names'])} intervals (lme4's in its order: "
                       f"{', '.join(theirs['names'])}) agree to a relative difference of at most "
                       f"{max(diffs):.1e} per endpoint.")
    elif task.startswith("bootstrap/"):
        theirs = libs.get("lme4", {}).get("result")
        if ours and theirs:
            out.append(f"- `{task}`: {ours['n']} replicates each; failed refits: ours "
                       f"{ours['n_failed']} (with warnings: {ours['n_warned']}), lme4 "
                       f"{theirs['n_failed']}. Replicate means, ours / lme4: " + ", ".join(
                           f"{c} {a:.4g} / {b:.4g}" for c, a, b in
                           zip(ours["columns"], ours["mean"], theirs["mean"])) +
                       " (different random numbers: they agree within Monte Carlo error, "
                       "which `tests/test_inference_bootstrap.py` checks at 10,000 replicates).")
    elif task.startswith("satterthwaite/"):
        theirs = libs.get("lmerTest", {}).get("result")
        if ours and theirs:
            out.append(f"- `{task}`: denominator df, ours / lmerTest: " + ", ".join(
                f"{n} {a:.6g} / {b:.6g}" for n, a, b in zip(ours["names"], ours["df"], theirs["df"])) +
                "; t, ours / lmerTest: " + ", ".join(
                f"{a:.6g} / {b:.6g}" for a, b in zip(ours["t"], theirs["t"])) + ".")
    elif task.startswith("negbin/"):
        parts = []
        for lib in ("mixedmodels", "lme4", "glmmTMB"):
            r = libs.get(lib, {}).get("result")
            if r:
                parts.append(f"{lib} {r['objective']:.4f} (θ_nb {r['nb_theta']:.4f})")
        if parts:
            out.append(f"- `{task}`: -2 log L at each library's optimum: " + "; ".join(parts) +
                       " (lower is a better optimum).")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks", nargs="*", help=f"substrings of task ids (default: all of {', '.join(TASKS)})")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per task and library (default 5)")
    ap.add_argument("--boot-n", type=int, default=1000, help="bootstrap replicates (default 1000)")
    ap.add_argument("--warmup-boot-n", type=int, default=50,
                    help="bootstrap replicates of the warm-up run (default 50)")
    ap.add_argument("--threads", type=int, default=1, choices=[1, 2],
                    help="OMP/OPENBLAS/MKL/RAYON/VECLIB/NUMEXPR threads for every process (default 1; "
                         "2 only to see that the single-thread check notices a second thread)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before a request is abandoned")
    ap.add_argument("--ours-src", default=None,
                    help="the src/ directory mixedmodels is imported from (default: this tree's src/)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory (default benchmarks/results)")
    ap.add_argument("--report", action="store_true", help="rewrite inference.md from inference.json and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main()
        return
    if args.report:
        out = Path(args.out)
        res = json.loads((out / "inference.json").read_text())
        (out / "inference.md").write_text(report(res))
        return
    run(args)


if __name__ == "__main__":
    main()

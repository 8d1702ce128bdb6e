"""Gate of the one-term GLMM search (glmm.py's _fit_with_gradient, _glmm_search.py):
does the search end at the optimum on simulated data?

For responses simulated from the fit of each real data set (fit.simulate: new random
effects, then the family's draw; same design, weights and offset), compare
  (a) ``minimize_one_term`` (today: the compiled trust region) from x0 = [beta0, theta0];
  (b) the trust-region search (the Python twin by default, ``--tr compiled`` the
      kernel) for each ftol;
  (c) the best of (a), (b) and a full default fit's optsum.fmin (with the check's
      Newton polish), and a restart at ftol 1e-15 from the full fit.
It prints the evaluations and the largest excess over the best per model and method.
The simulated responses are cached (``--cache``) so that runs against other builds
refit the very same data.

Usage (about 20 s):
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=src \
      python benchmarks/gate_glmm_search.py [--nsim 100] [--seeds 1 2] [--ftols 1e-12]
      [--models cbpp ...] [--tr python|compiled] [--out results.json]
"""
import argparse
import json
import math
import sys
import time
import warnings

import numpy as np

import mixedmodels as mm
from mixedmodels._glmm_search import minimize_one_term
from mixedmodels._optimize import OptSummary
from mixedmodels._trust_region import trust_region_search

TOL = 1e-6   # absolute excess over the best counted as a miss

MODELS = {
    "cbpp": lambda: mm.GeneralizedLinearMixedModel(
        "incid / hsz ~ 1 + period + (1 | herd)", mm.dataset("cbpp"), mm.Binomial(),
        weights="hsz"),
    "contra": lambda: mm.GeneralizedLinearMixedModel(
        "use ~ 1 + age + abs2(age) + urban + livch + (1 | urban & dist)",
        mm.dataset("contra"), mm.Bernoulli()),
    "contra_vec": lambda: mm.GeneralizedLinearMixedModel(
        "use ~ 1 + age + urban + (1 + urban | dist)", mm.dataset("contra"), mm.Bernoulli()),
    "grouse_brood": lambda: mm.GeneralizedLinearMixedModel(
        "ticks ~ 1 + year + (1 | brood)", mm.dataset("grouseticks"), mm.Poisson()),
    "grouse_location": lambda: mm.GeneralizedLinearMixedModel(
        "ticks ~ 1 + year + (1 | location)", mm.dataset("grouseticks"), mm.Poisson()),
}


def tr_python(value_and_grad, model, x0, lower, radius, ftol):
    return trust_region_search(value_and_grad, x0, lower, radius=radius, ftol=ftol)


def tr_compiled(value_and_grad, model, x0, lower, radius, ftol):
    """The compiled one-term search, ``PirlsKernel.trust_region`` (the working tree's
    _kernels/_glm.pyx as of 2026-12-02 15:37; adapt if its signature changes). The
    value_and_grad argument is unused: the kernel evaluates the Laplace deviance itself,
    from zero modes as a fresh fit does."""
    from mixedmodels._gradient import _PIRLS_MAXITER
    from mixedmodels._pirls import STEP_TOL, row_kernel
    kernel = row_kernel(model)
    if not hasattr(kernel, "trust_region"):
        raise RuntimeError("this build has no PirlsKernel.trust_region")
    fam = model.family
    u = np.zeros(model.workspace.q)
    xs, fs, code, best, exhausted = kernel.trust_region(
        fam.code, fam.link.code, fam.param, model.prior_w, np.asarray(x0, float),
        np.asarray(lower, float), u, radius, ftol, 100_000, tol=1e-13,
        maxiter=_PIRLS_MAXITER, max_halving=30, step_tol=STEP_TOL)
    return xs, fs, code


TR_VARIANTS = {"python": tr_python, "compiled": tr_compiled}


def start(model):
    x0 = np.array(model.beta0.tolist() + model.layout.initial().tolist(), dtype=float)
    lower = np.array([-math.inf] * model.p + model.layout.lower.tolist(), dtype=float)
    return x0, lower


def run_one_term(model):
    """(a): the library's one-term search, minimize_one_term."""
    model._u = None
    x0, lower = start(model)
    opt = OptSummary(initial=x0, lowerbd=lower)
    minimize_one_term(model, opt)
    return float(opt.fmin), int(opt.feval), f"{opt.optimizer}:{opt.returnvalue}"


def run_tr(model, ftol, tr, radius=0.75):
    model._u = None
    x0, lower = start(model)
    xs, fs, code = tr(model._joint_value_and_grad, model, x0, lower, radius, ftol)
    fs = np.asarray(fs, dtype=float)
    return float(fs.min()), int(len(fs)), int(code)


def run_full(model):
    fit = model.fit()
    return (float(fit.optsum.fmin), int(fit.optsum.feval), fit.optsum.final.copy(),
            fit.optsum.optimizer)


def run_ref(model, x, tr):
    """Diagnostic only (not part of 'best'): a trust-region restart with ftol=1e-15 from
    the full fit's optimum, to see how tight 'best' is."""
    model._u = None
    lower = start(model)[1]
    xs, fs, code = tr(model._joint_value_and_grad, model, np.asarray(x, float), lower,
                      0.01, 1e-15)
    return float(np.min(fs))


def guarded(fn, *args):
    """(result, error string or None, [warning strings])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out, err = fn(*args), None
        except Exception as exc:  # noqa: BLE001
            out, err = None, f"{type(exc).__name__}: {exc}"
    return out, err, [f"{w.category.__name__}: {w.message}" for w in caught]


def simulated(name, base_fit, seed, nsim, cache_dir):
    """fit.simulate(n=nsim, seed=seed), saved under cache_dir (so that runs against
    other builds refit the very same responses, whatever their base fit's last digits)."""
    import os
    if cache_dir is None:
        return base_fit.simulate(n=nsim, seed=seed)
    path = os.path.join(cache_dir, f"ys_{name}_seed{seed}_n{nsim}.npy")
    if os.path.exists(path):
        return np.load(path)
    ys = base_fit.simulate(n=nsim, seed=seed)
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, ys)
    return ys


def run(models=tuple(MODELS), seeds=(1,), nsim=100, ftols=(1e-10, 1e-12), tr=tr_python,
        log=sys.stdout, cache_dir=None):
    records = []
    for name in models:
        base_model = MODELS[name]()
        assert base_model._one_term_laplace(), f"{name}: not the one-term path"
        base_fit = base_model.fit()
        print(f"# mixedmodels from {mm.__file__}; (a) = minimize_one_term, optimizer "
              f"{base_fit.optsum.optimizer!r} in the default fit; tr = {tr.__name__}",
              file=log, flush=True)
        print(f"# {name}: p={base_model.p} ntheta={base_model.layout.ntheta} "
              f"fmin(real)={base_fit.optsum.fmin:.6f} theta={np.round(base_fit.theta, 4)}",
              file=log, flush=True)
        for seed in seeds:
            ys = simulated(name, base_fit, seed, nsim, cache_dir)
            t0 = time.perf_counter()
            for i in range(nsim):
                rec = {"model": name, "seed": seed, "sim": i, "errors": {}, "warnings": {}}

                def fresh():
                    m = base_model.with_response(ys[i])
                    assert m._one_term_laplace()
                    return m

                out, err, w = guarded(lambda: run_one_term(fresh()))
                if out is not None:
                    rec["a_fmin"], rec["a_feval"], rec["a_ret"] = out
                if err:
                    rec["errors"]["a"] = err
                if w:
                    rec["warnings"]["a"] = w
                for ftol in ftols:
                    key = f"b{ftol:g}"
                    out, err, w = guarded(lambda: run_tr(fresh(), ftol, tr))
                    if out is not None:
                        rec[key + "_fmin"], rec[key + "_feval"], rec[key + "_code"] = out
                    if err:
                        rec["errors"][key] = err
                    if w:
                        rec["warnings"][key] = w
                out, err, w = guarded(lambda: run_full(fresh()))
                if out is not None:
                    rec["full_fmin"], rec["full_feval"], xfull, rec["full_opt"] = out
                    ref, err2, _ = guarded(lambda: run_ref(fresh(), xfull, tr))
                    if ref is not None:
                        rec["ref_polish"] = ref
                if err:
                    rec["errors"]["full"] = err
                if w:
                    rec["warnings"]["full"] = w
                cands = [v for k, v in rec.items() if k.endswith("_fmin") and math.isfinite(v)]
                rec["best"] = min(cands) if cands else math.nan
                if "ref_polish" in rec:
                    rec["best_minus_polish"] = rec["best"] - rec["ref_polish"]
                records.append(rec)
            print(f"#   seed {seed}: {nsim} sims in {time.perf_counter() - t0:.1f}s",
                  file=log, flush=True)
    return records


def summarize(records, ftols, tol=TOL, log=sys.stdout):
    models = list(dict.fromkeys(r["model"] for r in records))
    hdr = (f"{'model':16s} {'method':10s} {'n':>4s} {'mean ev':>8s} {'max ev':>6s} "
           f"{'max excess':>11s} {'#>1e-6':>6s} {'#code!=0':>8s} {'#err':>4s} {'#warn':>5s}")
    print(hdr, file=log)
    for name in models:
        rs = [r for r in records if r["model"] == name]
        a_name = next((r["a_ret"].split(":")[0] for r in rs if "a_ret" in r), "?")
        a_name = {"L-BFGS-B": "lbfgsb", "TRUST_REGION_BFGS": "(a) TR"}.get(a_name, a_name)
        for key, label in [("a", a_name)] + [(f"b{f:g}", f"tr {f:g}") for f in ftols] + \
                          [("full", "full fit")]:
            ok = [r for r in rs if f"{key}_fmin" in r and math.isfinite(r["best"])]
            ev = np.array([r[f"{key}_feval"] for r in ok]) if ok else np.array([np.nan])
            exc = np.array([r[f"{key}_fmin"] - r["best"] for r in ok]) if ok else np.array([np.nan])
            nbad = int(np.sum(exc > tol))
            ncode = sum(1 for r in ok if r.get(f"{key}_code", 0) != 0)
            nerr = sum(1 for r in rs if key in r["errors"])
            nwarn = sum(1 for r in rs if key in r["warnings"])
            print(f"{name:16s} {label:10s} {len(ok):4d} {np.mean(ev):8.1f} {np.max(ev):6.0f} "
                  f"{np.max(exc):11.3e} {nbad:6d} {ncode:8d} {nerr:4d} {nwarn:5d}", file=log)
    for name in models:
        d = [r["best_minus_polish"] for r in records
             if r["model"] == name and "best_minus_polish" in r]
        if d:
            print(f"{name:16s} best - (1e-15 TR restart from full fit): max {max(d):.2e} "
                  f"min {min(d):.2e}", file=log)
    print("\nworst cases (excess over best > 1e-8, or code != 0, or errors):", file=log)
    for r in records:
        keys = ["a"] + [f"b{f:g}" for f in ftols] + ["full"]
        exc = {k: r[f"{k}_fmin"] - r["best"] for k in keys if f"{k}_fmin" in r}
        bad = {k: v for k, v in exc.items() if v > 1e-8}
        codes = {k: r[f"{k}_code"] for k in keys if r.get(f"{k}_code", 0) != 0}
        if bad or codes or r["errors"]:
            ev = {k: r.get(f"{k}_feval") for k in keys}
            print(f"  {r['model']} seed={r['seed']} sim={r['sim']} best={r['best']:.10f} "
                  f"excess={ {k: f'{v:.2e}' for k, v in exc.items()} } evals={ev} "
                  f"codes={codes} errors={r['errors']}", file=log)
    nw = [(r["model"], r["seed"], r["sim"], r["warnings"]) for r in records if r["warnings"]]
    if nw:
        print("\nwarnings:", file=log)
        for m, s, i, w in nw:
            print(f"  {m} seed={s} sim={i}: {w}", file=log)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsim", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--ftols", type=float, nargs="+", default=[1e-10, 1e-12])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--tr", default="python", choices=list(TR_VARIANTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=None, help="directory for the simulated responses")
    a = ap.parse_args()
    recs = run(a.models, a.seeds, a.nsim, a.ftols, TR_VARIANTS[a.tr], cache_dir=a.cache)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(recs, fh, indent=0)
    summarize(recs, a.ftols)


if __name__ == "__main__":
    main()

"""Out-of-core fitting at scale: a crossed LMM from Parquet with a Dask LocalCluster.

    python benchmarks/scale_dask.py --rows 1e8            # generate (once) and fit
    python benchmarks/scale_dask.py --rows 1e6 --compare  # also fit in memory and compare

The data: y = 1 + 0.5 x + u_subj + v_item + e, with 10^5 subjects (σ_u = 1) and 10^3
items (σ_v = 0.7), σ = 1. Rows are stored by subject (subjects are spread evenly over the
partitions, as data written subject by subject are); each subject answers a random
"form" of 40 items, repeatedly, so each subject pairs with 40 items: Z'Z between the two
terms has subjects × 40 blocks. Generated partition by partition on the workers
(1e6 rows a partition), never in memory at once, under --data (default /tmp, outside
the repository).

Reported: wall time of each pass and of the fit, the per-evaluation time of the
objective, peak memory (RSS) of each worker process and of the client, and the cost of
one pass of a Bernoulli model's family evaluation over the same rows (what each PIRLS
iteration of an out-of-core GLMM would cost). Results are appended to
benchmarks/results/scale_dask.md by hand from the printed table.
"""
import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SUBJECTS_PER_1E8 = 100_000
ITEMS = 1_000
FORM = 40
ROWS_PER_PART = 1_000_000


def _rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_now_mib():
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def generate_partition(path, part, nparts, rows, subjects, seed):
    """Write partition ``part``: the subjects part*S/nparts ... (part+1)*S/nparts - 1."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, part])
    # subject and item effects from their own streams, so every partition agrees
    u = np.random.default_rng([seed, 10**9]).normal(size=subjects)
    v = 0.7 * np.random.default_rng([seed, 10**9 + 1]).normal(size=ITEMS)
    s0, s1 = part * subjects // nparts, (part + 1) * subjects // nparts
    subj = np.sort(rng.integers(s0, s1, rows)).astype(np.int32)
    forms = np.random.default_rng([seed, 10**9 + 2]).integers(0, ITEMS, (subjects, FORM))
    item = forms[subj, rng.integers(0, FORM, rows)].astype(np.int32)
    x = rng.normal(size=rows)
    y = 1.0 + 0.5 * x + u[subj] + v[item] + rng.normal(size=rows)
    table = pa.Table.from_pandas(pd.DataFrame({"y": y, "x": x, "subj": subj, "item": item}),
                                 preserve_index=False)
    pq.write_table(table, os.path.join(path, f"part-{part:05d}.parquet"))
    return rows


def generate(client, path, nrows, seed=2026):
    nparts = max(1, int(math.ceil(nrows / ROWS_PER_PART)))
    subjects = max(10, int(round(SUBJECTS_PER_1E8 * nrows / 1e8)))
    path.mkdir(parents=True, exist_ok=True)
    rows = [ROWS_PER_PART] * (nparts - 1) + [nrows - ROWS_PER_PART * (nparts - 1)]
    futures = client.map(generate_partition, [str(path)] * nparts, range(nparts),
                         [nparts] * nparts, rows, [subjects] * nparts, [seed] * nparts,
                         pure=False)
    total = sum(client.gather(futures))
    (path / "_meta.json").write_text(json.dumps({"rows": total, "subjects": subjects,
                                                 "items": ITEMS, "form": FORM}))
    return total


def _worker_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _bernoulli_pass(frame, schema, basis, structure, beta_w, blocks, with_products):
    """One PIRLS iteration's row work for a Bernoulli GLMM on a chunk: η, μ, working
    weights and response, the deviance, and (optionally) the weighted cross-products."""
    rows = schema.rows(frame)
    yb = (rows.y > 1.0).astype(np.float64)        # a binary response from the same rows
    xw = rows.X[:, basis.keep] @ basis.Rinv
    eta = xw @ beta_w
    for i, blk in enumerate(blocks):
        eta += np.einsum("ij,ij->i", rows.z[i], blk[rows.codes[i]])
    mu = 1.0 / (1.0 + np.exp(-eta))
    w = mu * (1.0 - mu)
    dev = -2.0 * float(np.sum(yb * np.log(mu) + (1.0 - yb) * np.log1p(-mu)))
    if not with_products:
        return dev
    work = eta + (yb - mu) / w
    rows.y, rows.offset, rows.w = work, None, w
    _products_of(rows, schema, structure, basis)
    return dev


def _products_of(rows, schema, structure, basis):
    from mixedmodels._linalg import _blocked
    from mixedmodels.scale._stats import Products

    order = schema.order
    codes = np.ascontiguousarray(np.vstack([rows.codes[i] for i in order]), dtype=np.int32)
    zcat = np.ascontiguousarray(np.hstack([rows.z[i] for i in order]))
    xy = np.ascontiguousarray(np.column_stack([rows.X[:, basis.keep] @ basis.Rinv, rows.y]))
    m = xy.shape[1]
    avals = np.zeros(structure.nvals)
    ztxy = np.zeros((structure.q, m), order="F")
    xtxy = np.zeros((m, m))
    rowoff = structure.row_offsets(codes)
    _blocked.accumulate_blocks(zcat, rowoff, structure.pair_tr, structure.pair_tc,
                               structure.zoff, structure.kk, rows.w, avals)
    _blocked.accumulate_zt(zcat, codes, structure.uoff, structure.zoff, structure.kk, rows.w,
                           xy, ztxy)
    _blocked.weighted_crossprod(xy, rows.w, xtxy)
    return Products(avals=avals, ztxy=ztxy, xtxy=xtxy, start=[], n=len(rows.y), logw=0.0)


def glmm_pass(fit, ddf, with_products):
    import dask
    from dask import delayed

    from mixedmodels.scale.dask import _tree

    model = fit.model
    schema, basis, structure = model._schema, model._basis, model.structure
    beta_w = model.fixed.to_working(fit.coef)
    blocks = [None] * len(schema.reterms)
    off = 0
    for i in schema.order:
        t = schema.reterms[i]
        blocks[i] = np.asarray(fit.b[off:off + t.ncols * t.nlevels]).reshape(t.nlevels, t.ncols)
        off += t.ncols * t.nlevels
    shared = [delayed(a, pure=True) for a in (schema, basis, structure.for_rows(), beta_w,
                                               blocks)]
    parts = ddf[schema.plan.columns].to_delayed()
    tasks = [delayed(_bernoulli_pass)(p, *shared, with_products) for p in parts]
    t0 = time.perf_counter()
    dask.compute(_tree(tasks, lambda xs: sum(xs), 8))
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=float, default=1e7)
    ap.add_argument("--data", default="/tmp/mm_scale_dask")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="8GiB")
    ap.add_argument("--compare", action="store_true", help="also fit in memory and compare")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--glmm-pass", action="store_true", default=True)
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    args = ap.parse_args()

    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    import mixedmodels as mm

    nrows = int(args.rows)
    path = Path(args.data) / f"rows_{nrows}"
    out = {"rows": nrows, "workers": args.workers}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      memory_limit=args.memory_limit, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(mm.set_num_threads, 1)
        if args.regenerate and path.exists():
            shutil.rmtree(path)
        if not (path / "_meta.json").exists():
            t0 = time.perf_counter()
            generate(client, path, nrows)
            out["generate_seconds"] = time.perf_counter() - t0
            print(f"generated {nrows} rows in {out['generate_seconds']:.1f} s -> {path}",
                  flush=True)
        meta = json.loads((path / "_meta.json").read_text())
        out.update(meta)
        out["disk_bytes"] = sum(f.stat().st_size for f in path.glob("*.parquet"))
        # worker peaks from here on: restart them so generation does not count
        client.restart()
        client.run(mm.set_num_threads, 1)
        ddf = dd.read_parquet(str(path), split_row_groups=False)
        out["partitions"] = ddf.npartitions
        formula = "y ~ 1 + x + (1 | subj) + (1 | item)"
        rss0 = _rss_now_mib()
        t0 = time.perf_counter()
        fit = mm.fit(formula, ddf)
        out["wall_seconds"] = time.perf_counter() - t0
        out["pass_seconds"] = fit.model.pass_seconds
        out["feval"] = fit.optsum.feval
        # per-evaluation time of the objective, in the client, warm
        theta = np.asarray(fit.theta)
        fit.model.objective(theta)
        t1 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            fit.model.objective(theta)
        out["seconds_per_evaluation"] = (time.perf_counter() - t1) / reps
        out["describe"] = fit.model.describe()
        out["worker_peak_mib"] = sorted(client.run(_worker_peak).values())
        out["client_peak_mib"] = _rss_peak_mib()
        out["client_rss_before_fit_mib"] = rss0
        out["theta"] = fit.theta.tolist()
        out["coef"] = fit.coef.tolist()
        out["sigma"] = fit.sigma
        out["objective"] = fit.objective
        print(fit, flush=True)
        if args.glmm_pass:
            out["bernoulli_family_pass_seconds"] = glmm_pass(fit, ddf, with_products=False)
            out["bernoulli_pirls_pass_seconds"] = glmm_pass(fit, ddf, with_products=True)
        if args.compare:
            pdf = ddf.compute()
            t2 = time.perf_counter()
            m0 = mm.fit(formula, pdf)
            out["in_memory_seconds"] = time.perf_counter() - t2
            rel = {}
            for name in ("objective", "coef", "theta", "sigma", "stderror"):
                a = np.atleast_1d(np.asarray(getattr(m0, name), float))
                b = np.atleast_1d(np.asarray(getattr(fit, name), float))
                rel[name] = float(np.max(np.abs(a - b) / np.abs(a)))
            out["relative_difference"] = rel
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())

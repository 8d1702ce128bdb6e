"""The registry of benchmark problems.

A problem is one model fitted to one data set, named by an id such as
``lmm/sleepstudy:ml``.  It carries everything a runner needs to express the model:
the formula in our syntax (``formula``) and in lme4's (``r_formula``), the family,
nAGQ, REML, weights, contrasts, and the name of a data preparation (``prep``) that
each runner applies *before* timing starts (the R worker has an R twin of every
preparation, keyed by the same name, in ``r_worker.R``).

The fixed problems are the models of ``/work/shared/reference/lme4_public.json``
(``ref`` names the entry whose tight-tolerance lme4 objective is shown beside the
measured ones).  The generated problems (``scale/...``) are the scaling series:

* ``scale/crossed:N``  ``y ~ 1 + x + (1 + x | a) + (1 | b)``: two crossed factors
  with a fixed number of levels (1,000 and 500) and a random slope on the first;
  the rows grow, the levels do not (the fill-in of the sparse Cholesky factor is fixed
  by the 1,000 x 500 crossing; the per-evaluation work that grows is the update of
  Z'Z-shaped blocks from the rows, or nothing if they are accumulated once).
* ``scale/nested:N``   ``y ~ 1 + x + (1 | g/h)``: ``g`` has N/50 levels, each with
  5 levels of ``h`` (10 rows each); rows and levels grow together.

Generated data are written once, as raw little-endian column files that both Python
(``numpy.fromfile``) and R (``readBin``) read without a parser, under
``benchmarks/results/tmp/`` (ignored by git).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA_DIR = REPO / "src" / "mixedmodels" / "datasets" / "data"
TMP_DIR = HERE / "results" / "tmp"
REFERENCE = Path("/work/shared/reference/lme4_public.json")



@dataclass
class Problem:
    id: str
    data: str                       # bundled data set name, or "generated"
    formula: str                    # our syntax
    r_formula: str                  # lme4 syntax (also the peers' starting point)
    family: str = "gaussian"        # gaussian | bernoulli | binomial | poisson
    nAGQ: int = 1
    fast: bool = False              # nAGQ = 0 in lme4
    REML: bool = False
    weights: str | None = None      # column name
    contrasts: dict = field(default_factory=dict)   # column -> "helmert" | "dummy" | "effects"
    prep: str | None = None         # named data preparation (Python below, R in r_worker.R)
    response01: str | None = None   # Bernoulli response column with "N"/"Y" labels
    ref: str | None = None          # entry of lme4_public.json
    gen: dict | None = None         # parameters of a generated data set
    groups: list = field(default_factory=list)   # grouping factors, in formula order
    nested: bool = False            # groups nested (second within first)
    slopes: dict = field(default_factory=dict)   # grouping factor -> random slope column
    note: str = ""
    default: bool = True            # in the default suite
    tags: tuple = ()

    @property
    def glmm(self):
        return self.family != "gaussian"

    def to_json(self):
        return asdict(self)


def _p(**kw):
    return Problem(**kw)


FIXED = [
    _p(id="lmm/sleepstudy:ml", data="sleepstudy", ref="sleepstudy_ml",
       formula="reaction ~ 1 + days + (1 + days | subj)",
       r_formula="reaction ~ 1 + days + (1 + days | subj)",
       groups=["subj"], slopes={"subj": "days"}),
    _p(id="lmm/sleepstudy:reml", data="sleepstudy", ref="sleepstudy_reml", REML=True,
       formula="reaction ~ 1 + days + (1 + days | subj)",
       r_formula="reaction ~ 1 + days + (1 + days | subj)",
       groups=["subj"], slopes={"subj": "days"}),
    _p(id="lmm/penicillin", data="penicillin", ref="penicillin_crossed",
       formula="diameter ~ 1 + (1 | plate) + (1 | sample)",
       r_formula="diameter ~ 1 + (1 | plate) + (1 | sample)",
       groups=["plate", "sample"]),
    _p(id="lmm/pastes", data="pastes", ref="pastes_nested",
       formula="strength ~ 1 + (1 | batch/cask)",
       r_formula="strength ~ 1 + (1 | batch/cask)",
       groups=["batch", "cask"], nested=True),
    _p(id="lmm/insteval", data="insteval", ref="insteval_crossed",
       formula="y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)",
       r_formula="y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)",
       groups=["s", "d", "dept"], tags=("large",)),
    _p(id="glmm/contra:gm1-agq9", data="contra", ref="contra_gm1_agq9",
       family="bernoulli", nAGQ=9, response01="use",
       formula="use ~ 1 + age + abs2(age) + urban + livch + (1 | dist)",
       r_formula="use ~ 1 + age + I(age^2) + urban + livch + (1 | dist)",
       contrasts={"urban": "helmert", "livch": "dummy"}, groups=["dist"],
       note="the tutorial's gm1; urban Helmert-coded (N=-1, Y=+1)"),
    _p(id="glmm/contra:urbandist-laplace", data="contra", ref="contra_urbandist_laplace",
       family="bernoulli", nAGQ=1, response01="use",
       formula="use ~ 1 + age + abs2(age) + urban + livch + (1 | urban & dist)",
       r_formula="use ~ 1 + age + I(age^2) + urban + livch + (1 | urban:dist)",
       contrasts={"urban": "helmert", "livch": "dummy"}, groups=["urban:dist"]),
    _p(id="glmm/cbpp", data="cbpp", ref="cbpp_binomial", family="binomial",
       weights="hsz", prep="cbpp",
       formula="incid / hsz ~ 1 + period + (1 | herd)",
       r_formula="prop ~ 1 + period + (1 | herd)", groups=["herd"],
       note="proportions incid/hsz with weights hsz"),
    _p(id="glmm/grouseticks", data="grouseticks", ref="grouseticks_poisson",
       family="poisson", prep="grouseticks",
       formula="ticks ~ 1 + year + ch + (1 | index) + (1 | brood) + (1 | location)",
       r_formula="ticks ~ 1 + year + ch + (1 | index) + (1 | brood) + (1 | location)",
       groups=["index", "brood", "location"], note="ch = height - mean(height)"),
    _p(id="glmm/verbagg:laplace", data="verbagg", ref="verbagg_bernoulli",
       family="bernoulli", nAGQ=1, response01="r2",
       formula="r2 ~ 1 + anger + gender + btype + situ + (1 | subj) + (1 | item)",
       r_formula="r2 ~ 1 + anger + gender + btype + situ + (1 | subj) + (1 | item)",
       groups=["subj", "item"]),
    _p(id="glmm/verbagg:fast", data="verbagg", family="bernoulli", nAGQ=0, fast=True,
       response01="r2",
       formula="r2 ~ 1 + anger + gender + btype + situ + (1 | subj) + (1 | item)",
       r_formula="r2 ~ 1 + anger + gender + btype + situ + (1 | subj) + (1 | item)",
       groups=["subj", "item"],
       note="fast = lme4's nAGQ=0 (beta from PIRLS); objective is the Laplace -2 loglik there"),
]

# Scaling series: rows per point.  The default suite runs the small points (lme4 alone
# takes ~90 s per fit of the crossed model at 3e5 rows); --scaling large adds 3e5 and 1e6
# rows, --scaling huge adds 1e7 (crossed only).
SCALE_DEFAULT = [10_000, 30_000, 100_000]
SCALE_LARGE = [300_000, 1_000_000]
SCALE_HUGE = [10_000_000]


def _fmt_n(n):
    e = int(round(np.log10(n)))
    if 10 ** e == n:
        return f"1e{e}"
    if 3 * 10 ** (e - 1) == n or 3 * 10 ** e == n:
        e = int(np.floor(np.log10(n)))
        return f"3e{e}"
    return str(n)


def scaling_problems(sizes):
    out = []
    for n in sizes:
        tag = _fmt_n(n)
        default = n in SCALE_DEFAULT
        out.append(_p(
            id=f"scale/crossed:{tag}", data="generated",
            gen={"kind": "crossed", "n": n, "na": 1000, "nb": 500, "seed": 1},
            formula="y ~ 1 + x + (1 + x | a) + (1 | b)",
            r_formula="y ~ 1 + x + (1 + x | a) + (1 | b)",
            groups=["a", "b"], slopes={"a": "x"}, default=default, tags=("scaling",)))
        out.append(_p(
            id=f"scale/nested:{tag}", data="generated",
            gen={"kind": "nested", "n": n, "rows_per_h": 10, "h_per_g": 5, "seed": 2},
            formula="y ~ 1 + x + (1 | g/h)",
            r_formula="y ~ 1 + x + (1 | g/h)",
            groups=["g", "h"], nested=True, default=default, tags=("scaling",)))
    return out


def registry(scaling="default"):
    """All problems, in suite order. ``scaling`` is "none", "default", "large" or "huge"."""
    sizes = {"none": [], "default": SCALE_DEFAULT,
             "large": SCALE_DEFAULT + SCALE_LARGE,
             "huge": SCALE_DEFAULT + SCALE_LARGE + SCALE_HUGE}[scaling]
    probs = FIXED + scaling_problems(sizes)
    if scaling == "huge":
        # 1e7 rows of the nested series means 200,000 x 1,000,000 levels: skip, the
        # crossed series is the one the issue asks for at that size.
        probs = [p for p in probs if p.id != "scale/nested:1e7"]
    for p in probs:
        if scaling in ("large", "huge") and p.tags == ("scaling",):
            p.default = True
    return probs


def by_id(pid):
    for p in registry("huge"):
        if p.id == pid:
            return p
    raise KeyError(pid)


def reference_objectives():
    try:
        entries = json.loads(REFERENCE.read_text())
    except OSError:
        return {}
    return {e["name"]: e["lme4"]["objective"] for e in entries}


# ----------------------------------------------------------------------------------
# Data: loading, preparation, generation (never timed)
# ----------------------------------------------------------------------------------

def load_bundled(name):
    # the same reader every library's runner uses: categorical columns stay strings
    from mixedmodels.datasets import dataset

    return dataset(name)


def prepare(problem, df):
    """The named preparation of ``problem`` (the R twin lives in r_worker.R)."""
    if problem.prep == "cbpp":
        df["prop"] = df["incid"] / df["hsz"]
    elif problem.prep == "grouseticks":
        df["ch"] = df["height"] - df["height"].mean()
    return df


def gen_dir(problem):
    g = problem.gen
    return TMP_DIR / f"{g['kind']}_{g['n']}_s{g['seed']}"


def generate(problem):
    """Write the generated data set of ``problem`` (once) and return its directory.

    Layout: one raw file per column (``y.f64``, ``x.f64``, ``a.i32`` ...; factor codes are
    1-based int32) and ``meta.txt`` with ``n`` and each factor's number of levels.
    """
    g = problem.gen
    d = gen_dir(problem)
    if (d / "meta.txt").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(g["seed"])
    n = g["n"]
    x = rng.standard_normal(n)
    cols = {}
    if g["kind"] == "crossed":
        na, nb = g["na"], g["nb"]
        # every level used: a balanced cycle, then shuffled
        a = rng.permutation(np.arange(n) % na).astype(np.int32)
        b = rng.permutation(np.arange(n) % nb).astype(np.int32)
        ua = rng.standard_normal(na) * 0.8
        sa = rng.standard_normal(na) * 0.3
        ub = rng.standard_normal(nb) * 0.5
        y = 1.0 + 0.5 * x + ua[a] + sa[a] * x + ub[b] + rng.standard_normal(n)
        cols = {"a": (a + 1, na), "b": (b + 1, nb)}
    elif g["kind"] == "nested":
        rows_h, h_g = g["rows_per_h"], g["h_per_g"]
        nh = n // rows_h
        ng = nh // h_g
        h = np.repeat(np.arange(nh), rows_h)[:n]
        gg = h // h_g
        ug = rng.standard_normal(ng) * 0.7
        uh = rng.standard_normal(nh) * 0.4
        y = 1.0 + 0.5 * x + ug[gg] + uh[h] + rng.standard_normal(n)
        perm = rng.permutation(n)   # rows in random order, like real data
        x, y, gg, h = x[perm], y[perm], gg[perm], h[perm]
        # h labels repeat within g (1..5), as in pastes: the factor is g/h
        hh = (h % h_g).astype(np.int32)
        cols = {"g": (gg.astype(np.int32) + 1, ng), "h": (hh + 1, h_g)}
    else:
        raise ValueError(g["kind"])
    y.astype("<f8").tofile(d / "y.f64")
    x.astype("<f8").tofile(d / "x.f64")
    meta = [f"n {n}"]
    for name, (codes, nlev) in cols.items():
        codes.astype("<i4").tofile(d / f"{name}.i32")
        meta.append(f"factor {name} {nlev}")
    (d / "meta.txt").write_text("\n".join(meta) + "\n")
    return d


def load_generated(problem, factor_as="category"):
    """Read a generated data set into a DataFrame; factors as pandas categoricals
    (``factor_as="category"``) or as string labels (``"str"``)."""
    import pandas as pd
    d = generate(problem)
    meta = (d / "meta.txt").read_text().split("\n")
    n = int(meta[0].split()[1])
    data = {"y": np.fromfile(d / "y.f64", dtype="<f8", count=n),
            "x": np.fromfile(d / "x.f64", dtype="<f8", count=n)}
    for line in meta[1:]:
        if not line.startswith("factor"):
            continue
        _, name, nlev = line.split()
        codes = np.fromfile(d / f"{name}.i32", dtype="<i4", count=n) - 1
        labels = np.array([f"{name}{i + 1}" for i in range(int(nlev))], dtype=object)
        if factor_as == "category":
            data[name] = pd.Categorical.from_codes(codes, categories=labels)
        else:
            data[name] = labels[codes]
    return pd.DataFrame(data)


def load(problem, factor_as="category"):
    if problem.data == "generated":
        return load_generated(problem, factor_as=factor_as)
    return prepare(problem, load_bundled(problem.data))


if __name__ == "__main__":
    for p in registry("huge"):
        print(f"{p.id:34s} {p.family:9s} nAGQ={p.nAGQ} REML={p.REML!s:5s} {p.formula}")

"""Out-of-core fits of a Dask DataFrame (mixedmodels.scale) against the in-memory fit.

Tiers. At a fixed θ the objective, log-determinants, penalized RSS, β(θ) and
(RX'RX)⁻¹ (so σ(θ) and the standard errors) are the in-memory ones to FIXED_THETA (1e-8
relative; measured ~1e-13: only the order in which the sums are added differs), and so
is everything at the optimum (EXACT). BOBYQA's end points differ by ~1e-6 in θ when the
sums differ in their last bits; the exact gradient's Newton steps (_lmm_gradient.py)
then land both fits on the same stationary point to ~1e-12
(``test_optimum_agrees_as_the_in_memory_fit_agrees_with_itself``).
"""
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

# the test extra installs Dask: a missing install must fail, not skip
import dask  # noqa: E402
import dask.dataframe as dd  # noqa: E402
import distributed  # noqa: E402

import mixedmodels as mm  # noqa: E402
from mixedmodels._linalg._pattern import build_pattern, build_structure, pair_keys_of  # noqa: E402
from mixedmodels._linalg.system import BlockedSystem  # noqa: E402
from mixedmodels.scale import OutOfCoreError  # noqa: E402
from mixedmodels.scale._model import OutOfCoreLinearMixedModelFit  # noqa: E402

from conftest import FIXED_THETA  # noqa: E402

EXACT = 1e-8       # the criterion: every number at the optimum and at a fixed θ


def _rel(a, b):
    a = np.atleast_1d(np.asarray(a, dtype=float))
    b = np.atleast_1d(np.asarray(b, dtype=float))
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-300))) if a.size else 0.0


def _crossed(n, n1, n2, seed=0):
    rng = np.random.default_rng(seed)
    g1 = rng.integers(0, n1, n)
    g2 = rng.integers(0, n2, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=n1)[g1] + 0.7 * rng.normal(size=n2)[g2] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g1": [f"s{v}" for v in g1], "g2": g2})


@pytest.fixture(scope="module")
def sync():
    with dask.config.set(scheduler="sync"):
        yield


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _both(formula, df, nparts=4, **kw):
    with warnings.catch_warnings(record=True) as w0:
        warnings.simplefilter("always")
        m0 = mm.fit(formula, df, **kw)
    with warnings.catch_warnings(record=True) as w1:
        warnings.simplefilter("always")
        m1 = mm.fit(formula, dd.from_pandas(df, npartitions=nparts), **kw)
    return m0, m1, [str(w.message) for w in w0], [str(w.message) for w in w1]


def _assert_optimum_equal(m0, m1, tol):
    assert isinstance(m1, OutOfCoreLinearMixedModelFit)
    assert isinstance(m1, mm.LinearMixedModelFit)
    assert _rel(m0.objective, m1.objective) < EXACT
    for name in ("coef", "theta", "sigma", "stderror"):
        assert _rel(getattr(m0, name), getattr(m1, name)) < tol, name


def _assert_fixed_theta_equal(m0, m1, theta):
    assert _rel(m0.model.objective(theta), m1.model.objective(theta)) < FIXED_THETA
    p0, p1 = m0.model.profiled_parts(theta), m1.model.profiled_parts(theta)
    for key in ("logdet_l", "logdet_rx", "pwrss", "beta", "rx_inverse_crossprod"):
        assert _rel(p0[key], p1[key]) < FIXED_THETA, key


# -- the level-only structure ----------------------------------------------------------------
def test_structure_from_level_pairs_is_the_in_memory_pattern():
    rng = np.random.default_rng(1)
    n, kk, nl = 2000, [2, 1, 1], [40, 9, 3]
    codes = [rng.integers(0, m, n) for m in nl]
    z = [rng.normal(size=(n, k)) for k in kk]
    pat = build_pattern(codes, z, nl)
    halves = [pair_keys_of(np.vstack(codes)[:, s], nl) for s in (slice(0, 700), slice(700, n))]
    keys = {k: np.union1d(halves[0][k], halves[1][k]) for k in halves[0]}
    st = build_structure(kk, nl, keys)
    for f in ("kk", "nlev", "uoff", "zoff", "pair_tr", "pair_tc", "blk_off", "blk_tr", "blk_tc",
              "blk_diag", "indptr", "indices", "pos"):
        assert np.array_equal(getattr(pat, f), getattr(st, f)), f
    assert st.nvals == pat.nvals and st.q == pat.q
    assert np.array_equal(st.row_offsets(np.vstack(codes)), pat.rowoff)
    with pytest.raises(ValueError, match="no block"):
        st.row_offsets(_unseen_pair(codes, nl))


def _unseen_pair(codes, nl):
    seen = set(zip(codes[0].tolist(), codes[1].tolist()))
    for a in range(nl[0]):
        for b in range(nl[1]):
            if (a, b) not in seen:
                return np.array([[a], [b], [0]])
    pytest.skip("every pair seen")


def test_workspace_from_crossproducts_matches_rows():
    df = _crossed(3000, 50, 12, seed=2)
    m = mm.LinearMixedModel("y ~ 1 + x + (1 | g1) + (1 | g2)", df)
    ws = m.workspace
    st = build_structure(ws.pattern.kk, ws.pattern.nlev, pair_keys_of(ws.pattern.codes,
                                                                      ws.pattern.nlev))
    ws2 = BlockedSystem.from_structure(st, [False, False])
    ws2.set_crossproducts(ws.avals, ws.ztxy, ws.xtxy)
    theta = np.array([0.8, 0.4])
    l1, r1 = ws.factorize(theta)
    r1 = r1.copy()
    l2, r2 = ws2.factorize(theta)
    assert abs(l1 - l2) == 0.0 and np.array_equal(r1, r2)
    with pytest.raises(ValueError, match="set_crossproducts"):
        ws2.set_products(np.zeros((3, 2)))


# -- fits: the in-memory numbers -----------------------------------------------------------
def test_crossed_fit_on_a_local_cluster_equals_in_memory(client):
    df = _crossed(30_000, 400, 60)
    m0, m1, w0, w1 = _both("y ~ 1 + x + (1 | g1) + (1 | g2)", df, nparts=6)
    _assert_optimum_equal(m0, m1, EXACT)
    _assert_fixed_theta_equal(m0, m1, m0.theta)
    _assert_fixed_theta_equal(m0, m1, m1.theta * 1.1)
    assert w1 == w0
    assert m1.nobs == m0.nobs and m1.coef_names == m0.coef_names
    assert m1.model.path == m0.model.path == "dense-tail"
    assert set(m1.model.pass_seconds) >= {"levels", "structure", "products", "fit"}
    # levels in the in-memory order (strings sorted as strings), ranef and VarCorr
    r0, r1 = m0.ranef(), m1.ranef()
    for g in r0:
        assert list(r1[g].index) == list(r0[g].index)
        assert _rel(r0[g].to_numpy(), r1[g].to_numpy()) < EXACT
    v0, v1 = m0.varcorr.to_frame(), m1.varcorr.to_frame()
    assert list(v0.index) == list(v1.index)
    assert _rel(v0.select_dtypes('number').to_numpy(), v1.select_dtypes('number').to_numpy()) < EXACT
    assert _rel(m0.aic, m1.aic) < EXACT and _rel(m0.bic, m1.bic) < EXACT


@pytest.mark.parametrize("kw", [dict(), dict(REML=True)])
def test_random_slopes_weights_offset_categorical_missing(sync, kw):
    rng = np.random.default_rng(3)
    n = 4000
    df = pd.DataFrame(dict(
        x=rng.normal(size=n), g=rng.integers(0, 60, n), h=[f"h{v}" for v in rng.integers(0, 9, n)],
        c=pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi"]),
        b=rng.random(n) > 0.5, w=rng.uniform(0.5, 2, n), o=rng.normal(size=n)))
    df["y"] = (1 + df.x + rng.normal(size=60)[df.g] + 0.3 * rng.normal(size=60)[df.g] * df.x
               + rng.normal(size=n))
    df.loc[5, "x"] = np.nan
    df.loc[17, "h"] = None
    df.loc[30, "w"] = 0.0
    df.loc[31, "w"] = np.nan
    df.loc[44, "y"] = np.inf
    f = "y ~ 1 + x + c + b + (1 + x | g) + (1 | h)"
    m0, m1, w0, w1 = _both(f, df, weights="w", offset="o", **kw,
                           contrasts={"b": mm.EffectsCoding()})
    assert w1 == w0 and any("missing" in w for w in w0) and any("zero weight" in w for w in w0)
    assert m1.coef_names == m0.coef_names        # the Categorical's declared order
    _assert_fixed_theta_equal(m0, m1, m0.theta)
    _assert_optimum_equal(m0, m1, EXACT)
    assert m1.nobs == m0.nobs == n - 5


@pytest.mark.parametrize("formula,data", [
    ("strength ~ 1 + (1 | batch/cask)", "pastes"),
    ("strength ~ 1 + (1 | batch & cask) + (1 | batch)", "pastes"),
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin"),
    ("reaction ~ 1 + days + (1 + days || subj)", "sleepstudy"),
])
def test_nested_interaction_and_uncorrelated_terms(sync, formula, data):
    df = mm.dataset(data)
    m0, m1, w0, w1 = _both(formula, df, nparts=3)
    assert w1 == w0
    _assert_fixed_theta_equal(m0, m1, m0.theta)
    _assert_optimum_equal(m0, m1, EXACT)
    assert [t.levels for t in m1.model.reterms] == [t.levels for t in m0.model.reterms]


def test_optimum_agrees_as_the_in_memory_fit_agrees_with_itself(sync):
    """sleepstudy by REML: the out-of-core θ is the in-memory one to 1e-8, as is the
    in-memory fit of the same rows in another order (BOBYQA alone left both ~1e-6 apart)."""
    df = mm.dataset("sleepstudy")
    f = "reaction ~ 1 + days + (1 + days | subj)"
    m0, m1, _, _ = _both(f, df, nparts=5, REML=True)
    shuffled = df.iloc[np.random.default_rng(0).permutation(len(df))].reset_index(drop=True)
    m2 = mm.fit(f, shuffled, REML=True)
    assert _rel(m0.theta, m2.theta) < EXACT
    assert _rel(m0.theta, m1.theta) < EXACT
    assert _rel(m0.objective, m1.objective) < EXACT
    _assert_fixed_theta_equal(m0, m1, m0.theta)


def test_expression_response_offset_terms_and_aliasing(sync):
    df = _crossed(3000, 40, 10, seed=5)
    df["x2"] = 2 * df.x
    df["o"] = 0.1 * df.x
    m0, m1, w0, w1 = _both("log(abs(y) + 1) ~ 1 + x + x2 + offset(o) + (1 | g1:g2)", df)
    assert w1 == w0 and any("aliased" in w for w in w0)
    assert m1.dropped_coefs == m0.dropped_coefs == ["x2"]
    _assert_fixed_theta_equal(m0, m1, m0.theta)
    _assert_optimum_equal(m0, m1, EXACT)


# -- the fit record: pickling, lazy rows, inference ------------------------------------------
@pytest.fixture(scope="module")
def pair(client):
    df = _crossed(8000, 120, 30, seed=7)
    df["w"] = np.random.default_rng(1).uniform(0.5, 2.0, len(df))
    ddf = dd.from_pandas(df, npartitions=4)
    f = "y ~ 1 + x + (1 | g1) + (1 | g2)"
    return df, ddf, mm.fit(f, df, weights="w"), mm.fit(f, ddf, weights="w")


def test_pickled_fit_keeps_its_numbers_and_refactors(pair):
    df, ddf, m0, m1 = pair
    m2 = pickle.loads(pickle.dumps(m1))
    for name in ("objective", "coef", "theta", "sigma", "stderror", "b"):
        assert np.array_equal(np.asarray(getattr(m1, name)), np.asarray(getattr(m2, name)))
    assert m2.model.objective(m1.theta) == pytest.approx(m1.objective, rel=1e-12)
    assert str(m2) == str(m1)
    with pytest.raises(OutOfCoreError, match="attach"):
        m2.fitted()
    m2.model.attach(ddf)
    scale = np.max(np.abs(m0.y))
    assert np.max(np.abs(np.asarray(m0.fitted()) - m2.fitted().compute())) < EXACT * scale


def test_rows_are_lazy_dask_arrays(pair):
    df, ddf, m0, m1 = pair
    import dask.array as da

    for kind in ("response", "pearson", "deviance", "working"):
        r = m1.residuals(kind)
        assert isinstance(r, da.Array)
        assert np.max(np.abs(m0.residuals(kind) - r.compute())) < EXACT * np.max(np.abs(m0.y))
    assert isinstance(m1.y, da.Array)
    assert np.array_equal(m1.y.compute(), m0.y)
    assert np.allclose(m1.X.compute(), m0.X, rtol=0, atol=0)
    assert np.max(np.abs(m1.predict().compute() - m0.predict())) < EXACT * np.max(np.abs(m0.y))
    new = df.iloc[:50]
    assert np.max(np.abs(m1.predict(new) - m0.predict(new))) < EXACT * np.max(np.abs(m0.y))


def test_inference_from_crossproducts(pair):
    df, ddf, m0, m1 = pair
    assert _rel(m0.condvar()["g1"], m1.condvar()["g1"]) < 1e-6
    c0, c1 = m0.confint(method="profile"), m1.confint(method="profile")
    assert np.allclose(c0.to_numpy(), c1.to_numpy(), rtol=1e-5)
    # likelihood-ratio test of two out-of-core fits (its same-data checks read the rows)
    f_small = "y ~ 1 + x + (1 | g1)"
    s0, s1 = mm.fit(f_small, df, weights="w"), mm.fit(f_small, ddf, weights="w")
    t0, t1 = mm.lrtest(s0, m0).to_frame(), mm.lrtest(s1, m1).to_frame()
    assert np.allclose(t0.to_numpy(dtype=float), t1.to_numpy(dtype=float), rtol=1e-7,
                       equal_nan=True)


def test_what_needs_every_row_raises(pair):
    df, ddf, m0, m1 = pair
    assert mm.scale.OutOfCoreError is OutOfCoreError
    with pytest.raises(OutOfCoreError):
        m1.simulate(1)
    with pytest.raises(OutOfCoreError):
        mm.bootstrap(m1, 2, seed=1)
    with pytest.raises(OutOfCoreError):
        m1.Z
    with pytest.raises(OutOfCoreError):
        m1.model.replace_response(np.zeros(m1.nobs))


def test_clear_errors(sync):
    ddf = dd.from_pandas(_crossed(500, 20, 5), npartitions=2)
    with pytest.raises(NotImplementedError, match="PIRLS"):
        mm.fit("y ~ 1 + (1 | g1)", ddf, family=mm.Poisson())
    with pytest.raises(TypeError, match="column name"):
        mm.fit("y ~ 1 + (1 | g1)", ddf, weights=np.ones(500))
    with pytest.raises(ValueError, match="learns from the rows"):
        mm.fit("y ~ 1 + center(x) + (1 | g1)", ddf)
    with pytest.raises(ValueError, match="single level"):
        mm.fit("y ~ 1 + (1 | k)", ddf.assign(k=1))
    with pytest.raises(ValueError, match="constant"):
        mm.fit("k ~ 1 + (1 | g1)", ddf.assign(k=2.0))


def test_dask_is_not_imported_with_the_package():
    code = "import sys, mixedmodels; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the bootstrap on Dask workers -----------------------------------------------------------
def test_bootstrap_on_a_client_equals_the_local_run(client):
    m = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
    local = mm.bootstrap(m, 24, seed=11)
    remote = mm.bootstrap(m, 24, seed=11, client=client)
    assert np.array_equal(local.values, remote.values, equal_nan=True)
    assert list(local.columns) == list(remote.columns)
    with pytest.raises(ValueError, match="not both"):
        mm.bootstrap(m, 4, seed=1, n_jobs=2, client=client)


# -- larger, with the distributed scheduler --------------------------------------------------
def test_million_rows_on_a_local_cluster_equals_in_memory(client):
    df = _crossed(1_000_000, 2000, 300, seed=9)
    m0, m1, w0, w1 = _both("y ~ 1 + x + (1 | g1) + (1 | g2)", df, nparts=8)
    _assert_optimum_equal(m0, m1, EXACT)
    _assert_fixed_theta_equal(m0, m1, m0.theta)


def test_empty_partition_declared_levels_and_unknown_categories(sync):
    rng = np.random.default_rng(0)
    n = 2000
    df = pd.DataFrame(dict(y=rng.normal(size=n), x=rng.normal(size=n),
                           g=pd.Categorical(rng.choice(list("edcba"), n), categories=list("edcba")),
                           h=rng.integers(0, 30, n)))
    df.loc[:499, "y"] = np.nan                 # every row of the first partition is dropped
    ddf = dd.from_pandas(df, npartitions=4)
    f = "y ~ 1 + x + (1 | g) + (1 | h)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m0, m1 = mm.fit(f, df), mm.fit(f, ddf)
    assert m1.model.rows_per_chunk == [0, 500, 500, 500]
    assert list(m1.ranef()["g"].index) == list(m0.ranef()["g"].index) == list("edcba")
    _assert_fixed_theta_equal(m0, m1, m0.theta)
    unknown = ddf.assign(g=ddf.g.astype(str).astype("category").cat.as_unknown())
    with pytest.raises(ValueError, match="unknown categories"):
        mm.fit(f, unknown)

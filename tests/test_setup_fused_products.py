"""The fourth round of set-up shortcuts against the code they stand for, NumPy or algebra.

The cross-products of [Z X y] in one compiled call (``accumulate_products`` and the
workspace's ``ThetaFactorizer.accumulate``) against the three kernels and the dense
products; the dense tail's compiled set-up (``_tail_fill``) against its NumPy twin
``_tail_columns``; the bound that skips the dense tail's flop count; the one-term pattern
whose per-block arrays are made on first use; the QR's floating-point state made once;
the unit-vector solves of R̃⁻¹; the array R̃ of three and more columns; the column cache's
missing rows; the columns the missing-row check reads.
"""
import pickle
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import mixedmodels
from mixedmodels._fixed import (FixedEffectsBasis, _upper_solve_inverse, householder_qr,
                                numpy_qr)
from mixedmodels._linalg import _blocked, _densetail, _twins
from mixedmodels._linalg._blocked import upper_solve
from mixedmodels._linalg._pattern import _OneTermPattern, build_pattern
from mixedmodels._linalg.system import (BlockedSystem, _DENSE_TAIL_FREE, _dense_tail_flops,
                                        _dense_tail_surely_free, faster_factor)
from mixedmodels._linalg._densetail import DenseTailFactor
from mixedmodels.formula._columns import ColumnCache


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _problem(seed, nlevels, kk, n=150, sort=False):
    rng = np.random.default_rng(seed)
    codes, z = [], []
    for nl, k in zip(nlevels, kk):
        c = rng.integers(0, nl, n).astype(np.int32)
        c[:nl] = rng.permutation(nl)            # every level present
        codes.append(c)
        z.append(np.column_stack([np.ones(n)] + [rng.standard_normal(n) for _ in range(k - 1)]))
    if sort:                                     # rows grouped by the first term, as small data sets come
        order = np.argsort(codes[0], kind="stable")
        codes = [c[order] for c in codes]
        z = [np.ascontiguousarray(zi[order]) for zi in z]
    return rng, codes, z


PATTERNS = [([9], [1]), ([9], [2]), ([6], [3]), ([11, 5], [1, 1]), ([10, 6, 3], [2, 1, 2]),
            ([8, 4], [1, 3])]


# -- the cross-products in one call ------------------------------------------------------

def _three_kernels(pat, xy, w):
    avals = np.zeros(pat.nvals)
    ztxy = np.zeros((pat.q, xy.shape[1]), order="F")
    xtxy = np.zeros((xy.shape[1], xy.shape[1]))
    _blocked.accumulate_blocks(pat.zcat, pat.rowoff, pat.pair_tr, pat.pair_tc, pat.zoff,
                               pat.kk, w, avals)
    _blocked.accumulate_zt(pat.zcat, pat.codes, pat.uoff, pat.zoff, pat.kk, w, xy, ztxy)
    _blocked.weighted_crossprod(xy, w, xtxy)
    return avals, ztxy, xtxy


@pytest.mark.parametrize("nlevels,kk", PATTERNS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sort", [False, True])
def test_accumulate_products_is_the_three_kernels(nlevels, kk, weighted, sort):
    rng, codes, z = _problem(3, nlevels, kk, sort=sort)
    pat = build_pattern(codes, z, nlevels)
    n = len(codes[0])
    xy = rng.standard_normal((n, 4))
    w = rng.uniform(0.5, 2.0, n) if weighted else np.zeros(0)
    want = _three_kernels(pat, xy, w)
    got = (np.full(pat.nvals, np.nan), np.full((pat.q, 4), np.nan, order="F"),
           np.full((4, 4), np.nan))
    rowoff = None if len(kk) == 1 else pat.rowoff
    _blocked.accumulate_products(pat.zcat, pat.codes, rowoff, pat.pair_tr, pat.pair_tc,
                                 pat.uoff, pat.zoff, pat.kk, w, xy, *got)
    for a, b in zip(got, want):
        assert _same(a, b)
    # and the dense products (the kernels' NumPy twin)
    wv = w if weighted else None
    np.testing.assert_allclose(got[0], _twins.accumulate_blocks(pat, wv), rtol=1e-12, atol=1e-12)
    wxy = xy * (w[:, None] if weighted else 1.0)
    np.testing.assert_allclose(got[1], _twins.dense_z(pat).T @ wxy, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[2], xy.T @ wxy, rtol=1e-12, atol=1e-12)


def test_accumulate_products_refuses_what_it_cannot_read():
    rng, codes, z = _problem(4, [11, 5], [1, 1])
    pat = build_pattern(codes, z, [11, 5])
    n = len(codes[0])
    xy = rng.standard_normal((n, 2))
    out = (np.zeros(pat.nvals), np.zeros((pat.q, 2), order="F"), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="one term"):
        _blocked.accumulate_products(pat.zcat, pat.codes, None, pat.pair_tr, pat.pair_tc,
                                     pat.uoff, pat.zoff, pat.kk, np.zeros(0), xy, *out)
    with pytest.raises(ValueError, match="same rows"):
        _blocked.accumulate_products(pat.zcat, pat.codes, pat.rowoff, pat.pair_tr,
                                     pat.pair_tc, pat.uoff, pat.zoff, pat.kk, np.zeros(0),
                                     xy[:-1], *out)
    with pytest.raises(ValueError, match="m columns"):
        _blocked.accumulate_products(pat.zcat, pat.codes, pat.rowoff, pat.pair_tr,
                                     pat.pair_tc, pat.uoff, pat.zoff, pat.kk, np.zeros(0),
                                     rng.standard_normal((n, 3)), *out)


@pytest.mark.parametrize("nlevels,kk", PATTERNS)
def test_workspace_products_are_made_once_and_bound(nlevels, kk):
    rng, codes, z = _problem(5, nlevels, kk)
    n = len(codes[0])
    system = BlockedSystem(codes, z, nlevels, [False] * len(kk))
    xy = np.column_stack([np.ones(n), rng.standard_normal((n, 2))])
    w = rng.uniform(0.5, 2.0, n)
    system.set_products(xy, w)
    arrays = (system.ztxy, system.rzxy, system.xtxy, system._r)
    for a, b in zip((system.avals, system.ztxy, system.xtxy), _three_kernels(system.pattern, xy, w)):
        assert _same(a, b)
    # the same width again: the same arrays, written in place
    xy2 = np.column_stack([np.ones(n), rng.standard_normal((n, 2))])
    system.set_products(xy2, None)
    assert all(a is b for a, b in zip(arrays, (system.ztxy, system.rzxy, system.xtxy, system._r)))
    for a, b in zip((system.avals, system.ztxy, system.xtxy),
                    _three_kernels(system.pattern, xy2, np.zeros(0))):
        assert _same(a, b)
    # the factorizer reads them: the factorization is the dense one
    theta = system.layout.initial() * 0.8
    logdet, r = system.factorize(theta)
    want_logdet, want_r = _twins.factorize(system.pattern, system.layout.templates(theta), xy2)
    assert logdet == pytest.approx(want_logdet, rel=1e-10)
    np.testing.assert_allclose(r, want_r, rtol=1e-9, atol=1e-10)
    # another width: new arrays of that width, bound in turn
    xy3 = np.ones((n, 1))
    system.set_products(xy3, None)
    assert system.ztxy.shape == (system.q, 1) and system._r.shape == (1, 1)
    assert system.ztxy is not arrays[0]
    system.factorize(theta)
    assert system.ztxy.flags.f_contiguous and system.rzxy.flags.f_contiguous


def test_new_products_are_zeroed_arrays_of_the_layouts_asked():
    rng, codes, z = _problem(6, [7], [2])
    system = BlockedSystem(codes, z, [7], [False])
    ztxy, rzxy, xtxy, r = system.factorizer.new_products(system.q, 3)
    for a, shape, fortran in ((ztxy, (14, 3), True), (rzxy, (14, 3), True),
                              (xtxy, (3, 3), False), (r, (3, 3), False)):
        assert a.shape == shape and a.dtype == np.float64 and not a.any()
        assert (a.flags.f_contiguous if fortran else a.flags.c_contiguous)


# -- the dense tail's set-up -------------------------------------------------------------

def _first_rest_numpy(indptr, k0, q0):
    """first[j]: the first slot of column j below its level's own rows (j < q0)."""
    return np.array([indptr[j] + (k0 - j % k0) for j in range(q0)], dtype=np.int32)


@pytest.mark.parametrize("seed", range(40))
def test_tail_fill_is_the_numpy_twin(seed):
    rng = np.random.default_rng(seed)
    nterm = int(rng.integers(2, 4))
    nlevels = sorted((int(x) for x in rng.integers(2, 30, nterm)), reverse=True)
    kk = [int(x) for x in rng.integers(1, 3, nterm)]
    _, codes, z = _problem(seed, nlevels, kk, n=int(rng.integers(60, 300)))
    pat = build_pattern(codes, z, nlevels)
    k0, q0 = kk[0], int(pat.uoff[1])
    got = _densetail._tail_columns_compiled(pat.indptr, pat.indices, k0, q0)
    want = _densetail._tail_columns(pat.indptr, pat.indices,
                                    _first_rest_numpy(pat.indptr, k0, q0), k0, q0, pat.q - q0)
    for a, b in zip(got, want):
        assert _same(a, b)


def test_dense_tail_set_up_refuses_another_pattern():
    rng, codes, z = _problem(7, [11, 5], [1, 1])
    pat = build_pattern(codes, z, [11, 5])
    with pytest.raises(ValueError, match="first term"):
        DenseTailFactor(pat.indptr, pat.indices, np.zeros(len(pat.indices)), 2, 10)


def test_dense_tail_surely_free_bounds_the_count():
    rng = np.random.default_rng(9)
    seen = {True: 0, False: 0}
    for seed in range(60):
        nlevels = sorted((int(x) for x in rng.integers(2, 60, 2)), reverse=True)
        kk = [int(x) for x in rng.integers(1, 4, 2)]
        _, codes, z = _problem(seed, nlevels, kk, n=int(rng.integers(100, 400)))
        pat = build_pattern(codes, z, nlevels)
        k0, q0 = kk[0], int(pat.uoff[1])
        free = _dense_tail_surely_free(pat.q, k0, q0)
        seen[free] += 1
        if free:
            assert _dense_tail_flops(pat.indptr, k0, q0) <= _DENSE_TAIL_FREE
            mx = np.zeros(len(pat.indices))
            assert isinstance(faster_factor(pat.indptr, pat.indices, mx, k0, q0), DenseTailFactor)
    assert seen[True] and seen[False]
    assert not _dense_tail_surely_free(10, 1, 0)         # no first term: no dense tail


# -- the one-term pattern ----------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_one_term_pattern_makes_its_block_arrays_on_first_use(k):
    _, codes, z = _problem(10, [8], [k])
    fast = build_pattern(codes, z, [8])
    general = build_pattern(codes, z, [8], general=True)
    assert isinstance(fast, _OneTermPattern)
    lazy = ("pair_tr", "pair_tc", "rowoff", "blk_off", "blk_tr", "blk_tc", "blk_diag")
    assert not any(name in fast.__dict__ for name in lazy)
    # a workspace on it builds, accumulates and factors without them
    system = BlockedSystem(codes, z, [8], [False])
    system.set_products(np.ones((len(codes[0]), 1)), None)
    system.factorize(system.layout.initial())
    assert not any(name in system.pattern.__dict__ for name in lazy)
    back = pickle.loads(pickle.dumps(fast))
    for name in lazy:
        assert _same(getattr(fast, name), getattr(general, name)), name
        assert _same(getattr(back, name), getattr(general, name)), name


# -- the fixed-effects basis -------------------------------------------------------------

def test_qr_leaves_the_floating_point_state_as_it_was():
    X = np.column_stack([np.ones(30), np.arange(30.0)])
    for state in ({}, {"all": "raise"}, {"all": "ignore"}):
        for qr in (householder_qr, numpy_qr):
            with np.errstate(**state):
                before = np.geterr(), np.geterrcall()
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    q, r = qr(X)
                assert (np.geterr(), np.geterrcall()) == before
            q0, r0 = np.linalg.qr(X)
            if qr is numpy_qr:
                assert _same(q, q0) and _same(r, r0)
            else:
                # compiled: to rounding (was bit for bit while it was the LAPACK path)
                np.testing.assert_allclose(q, q0, rtol=0, atol=1e-14)
                np.testing.assert_allclose(r, r0, rtol=0, atol=1e-13 * np.abs(r0).max())


def test_upper_solve_inverse_is_the_unit_vector_solves():
    rng = np.random.default_rng(13)
    for p in range(1, 9):
        R = np.triu(rng.standard_normal((p, p))) + p * np.eye(p)
        cols = []
        for j in range(p):
            e = np.zeros(p)
            e[j] = 1.0
            upper_solve(R, e)
            cols.append(e)
        got = _upper_solve_inverse(R)
        assert _same(got, np.ascontiguousarray(np.array(cols).T)) and got.flags.c_contiguous
        np.testing.assert_allclose(got @ R, np.eye(p), atol=1e-12)


@pytest.mark.parametrize("p", [3, 4, 6])
def test_fixed_basis_of_several_columns_is_the_numpy_expressions(p):
    rng = np.random.default_rng(p)
    X = np.column_stack([np.ones(80)] + [rng.standard_normal(80) * 10.0 ** j
                                         for j in range(p - 1)])
    fb = FixedEffectsBasis(X)
    # the basis's arithmetic, bit for bit, from the QR it takes (numpy.linalg.qr's to
    # rounding: tests/test_dense_kernels.py)
    q, r = householder_qr(X)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    scale = np.sqrt(80)
    R = (r * signs[:, None]) / scale
    assert _same(fb.X, np.ascontiguousarray(q * (signs * scale))) and _same(fb.R, R)
    assert fb.logabsdet == float(np.sum(np.log(np.abs(np.diag(R)))))
    assert _same(fb.Rinv, _upper_solve_inverse(R))


# -- missing rows ------------------------------------------------------------------------

def test_column_cache_missing_rows_by_kind():
    frame = pd.DataFrame({
        "f": np.array([1.0, np.nan, 3.0, np.inf]),
        "i": np.array([1, 2, 3, 4]),
        "s": pd.array(["a", "b", "a", "c"], dtype=pd.StringDtype("pyarrow")),
        "sn": pd.array(["a", None, "a", "c"], dtype=pd.StringDtype("pyarrow")),
        "o": np.array(["a", None, "b", "b"], dtype=object),
        "b": np.array([True, False, True, True]),
    })
    cache = ColumnCache(frame)
    assert cache.missing("f").tolist() == [False, True, False, True]
    assert cache.missing("i") is None and cache.is_numeric("i")
    assert cache.missing("s") is None and cache.arrow_strings("s") is not None
    assert not cache.is_numeric("s")
    assert cache.arrow_strings("sn") is None and cache.missing("sn").tolist() == [
        False, True, False, False]
    assert cache.missing("o").tolist() == [False, True, False, False]
    assert cache.missing("b").tolist() == [False] * 4 and not cache.is_numeric("b")
    assert cache.n == 4
    cache.keep(None)
    codes, levels = cache.factor("s")
    assert levels == ["a", "b", "c"] and codes.tolist() == [0, 1, 0, 2]


def test_missing_rows_reported_by_column_as_before():
    df = mixedmodels.dataset("sleepstudy").assign(w=1.0)
    df.loc[[3, 4], "reaction"] = np.nan
    df.loc[[4, 7], "w"] = np.nan
    df["subj"] = df["subj"].astype(object)
    df.loc[9, "subj"] = None
    with pytest.warns(UserWarning, match=r"dropped 4 of 180 row.*\['reaction', 'subj', 'w'\]"):
        model = mixedmodels.LinearMixedModel("reaction ~ 1 + days + (1 | subj)", df, weights="w")
    assert model.design.rows_used.tolist() == [i for i in range(180) if i not in (3, 4, 7, 9)]

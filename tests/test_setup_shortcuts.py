"""The set-up shortcuts against what they stand for, bit for bit.

Building a model from a data frame takes shortcuts on small problems: columns read as
the arrays the frame stores, Arrow strings factorized by ``dictionary_encode``, QR and
eigenvalues through NumPy's gufuncs without the wrappers, p-by-p arithmetic in Python
floats, a remembered model-matrix structure and θ layout, a leaner block pattern. Each
must give exactly what the general code gives: the same bytes, dtypes, names, levels.
"""
import pickle
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import mixedmodels
from mixedmodels._fixed import FixedEffectsBasis, householder_qr, numpy_qr
from mixedmodels._linalg._pattern import _unique_inverse, build_pattern
from mixedmodels._linalg.system import ThetaLayout
from mixedmodels.formula import DummyCoding, build_design
from mixedmodels.formula._columns import (ColumnCache, _arrow_string_raw, column_values,
                                          levels_from_raw, raw_factorize)
from mixedmodels.formula._design import _clearly_full_rank, _eigvalsh


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape", [(180, 1), (180, 2), (56, 4), (30, 7), (5, 5)])
def test_householder_qr_is_numpy_qr(shape):
    rng = np.random.default_rng(sum(shape))
    X = rng.standard_normal(shape) * np.logspace(0, 6, shape[1])
    X[:, 0] = 1.0
    q0, r0 = np.linalg.qr(X)
    # the LAPACK path, bit for bit
    assert all(map(_same, numpy_qr(X), (q0, r0)))
    # the compiled one (the same Householder algorithm), to rounding: it was asserted bit
    # for bit while householder_qr was NumPy's LAPACK path
    q, r = householder_qr(X)
    assert q.shape == q0.shape and r.shape == r0.shape and q.flags.c_contiguous
    assert np.abs(q - q0).max() < 1e-13
    assert (np.abs(r - r0).max(axis=0) < 1e-13 * np.linalg.norm(X, axis=0)).all()


def test_eigvalsh_is_numpy_eigvalsh():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((40, 5))
    C = np.corrcoef(A.T)
    assert _same(_eigvalsh(C), np.linalg.eigvalsh(C))


@pytest.mark.parametrize("p", [1, 2])
def test_clearly_full_rank_small_p(p):
    # the Python-float branch of p <= 2 against the NumPy branch it replaces
    rng = np.random.default_rng(p)
    for scale in (1.0, 1e-9, 1e9):
        X = rng.standard_normal((50, p)) * scale
        if p == 2:
            X[:, 1] = X[:, 0] * 2 + 1e-7 * rng.standard_normal(50)
        G = X.T @ X
        d = np.diag(G)
        ok = bool(np.all(d > 0) and np.all(np.isfinite(G)))
        if ok and p == 2:
            ok = bool(1.0 - abs(G[0, 1]) / np.sqrt(d[0] * d[1]) > 1e-6)
        assert _clearly_full_rank(G) == ok
    assert not _clearly_full_rank(np.array([[np.nan]]))
    assert not _clearly_full_rank(np.zeros((2, 2)))


def _basis_reference(X):
    """FixedEffectsBasis as it was written with NumPy expressions (from the same QR:
    that of householder_qr, numpy.linalg.qr's to rounding)."""
    n, p = X.shape
    q, r = householder_qr(X)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    scale = np.sqrt(max(n, 1))
    Xw = np.ascontiguousarray(q * (signs * scale))
    R = (r * signs[:, None]) / scale
    return Xw, R, float(np.sum(np.log(np.abs(np.diag(R)))))


@pytest.mark.parametrize("shift", [0.0, 1e3, 1e8])
def test_fixed_basis_is_the_numpy_expressions(shift):
    rng = np.random.default_rng(7)
    X = np.column_stack([np.ones(100), rng.standard_normal(100) + shift,
                         rng.integers(0, 2, 100)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fb = FixedEffectsBasis(X, ["a", "b", "c"])
    Xw, R, logabsdet = _basis_reference(X)
    assert _same(fb.X, Xw) and _same(fb.R, R) and fb.logabsdet == logabsdet
    assert fb.X.flags.c_contiguous and fb.Rinv.flags.c_contiguous
    np.testing.assert_allclose(fb.Rinv @ fb.R, np.eye(3), atol=1e-8)
    # the near-alias warning only for the column shifted by 1e8
    messages = [str(w.message) for w in caught]
    if shift == 1e8:
        assert len(messages) == 1 and messages[0].startswith("fixed-effects column(s) ['b']")
    else:
        assert messages == []


def _arrow_strings(values, chunks=1):
    if chunks == 1:
        return pd.array(values, dtype="str" if pd.__version__ >= "3" else "string[pyarrow]")
    step = len(values) // chunks
    parts = [values[i * step:(i + 1) * step] for i in range(chunks - 1)]
    parts.append(values[(chunks - 1) * step:])
    return pd.array(pa.chunked_array(parts, type=pa.large_string()),
                    dtype=pd.ArrowDtype(pa.large_string()))


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("with_null", [False, True])
def test_arrow_string_factorize_is_pandas(chunks, with_null):
    values = ["b", "a", "c", "a", "b", "ä", "B"] * 3
    if with_null:
        values[4] = None
    arr = _arrow_strings(values, chunks)
    raw, uniques, declared = _arrow_string_raw(arr)
    raw0, uniques0, declared0 = raw_factorize(pd.Series(arr))
    assert _same(raw, raw0) and uniques == uniques0 and declared == declared0
    assert all(type(u) is str for u in uniques)


def test_levels_fast_path_is_the_general_one():
    rng = np.random.default_rng(5)
    uniques = ["S309", "S308", "a b", "Z", "ä", "10", "9"]
    raw = rng.integers(-1, len(uniques), 200)
    raw[:len(uniques)] = np.arange(len(uniques))    # every value occurs
    fast = levels_from_raw(raw, uniques, False, complete=True)
    general = levels_from_raw(raw, uniques, False)
    assert _same(fast[0], general[0]) and fast[1] == general[1]
    in_order = np.arange(len(uniques))[rng.permutation(len(uniques))]
    sorted_uniques = sorted(uniques)
    fast = levels_from_raw(in_order, sorted_uniques, False, complete=True)
    general = levels_from_raw(in_order, sorted_uniques, False)
    assert fast[0] is in_order and general[0] is in_order and fast[1] == general[1]


def test_column_values_are_read_only_views():
    df = pd.DataFrame({"x": np.arange(5.0), "g": list("abcab")})
    x = column_values(df, "x")
    assert not x.flags.writeable and np.shares_memory(x, df["x"].to_numpy())
    with pytest.raises(ValueError, match="not found"):
        column_values(df, "y")
    twice = pd.concat([df, df[["x"]]], axis=1)
    with pytest.raises(ValueError, match="appears 2 times"):
        column_values(twice, "x")
    cache = ColumnCache(df)
    assert cache.missing("g") is None and cache.missing("x") is None


def test_design_does_not_alias_the_data():
    data = mixedmodels.dataset("sleepstudy")
    d = build_design("reaction ~ 1 + days + (1 + days | subj)", data)
    assert not np.shares_memory(d.y, data["reaction"].to_numpy())
    assert d.y.flags.writeable


def test_remembered_structure_keeps_codings_apart():
    # DummyCoding(base=True) and DummyCoding(base=1) are equal as objects but name
    # different levels ("true" and "1"): the remembered structures must not mix them
    rng = np.random.default_rng(2)
    data = pd.DataFrame({"y": rng.standard_normal(40), "g": np.repeat(list("abcd"), 10),
                         "f": np.tile([1, 2, 3, 4], 10).astype(str)})
    data["b"] = np.tile(["1", "true", "x", "y"], 10)
    first = build_design("y ~ 1 + b + (1 | g)", data, contrasts={"b": DummyCoding(base="1")})
    second = build_design("y ~ 1 + b + (1 | g)", data,
                          contrasts={"b": DummyCoding(base="true")})
    assert first.coef_names == ["(Intercept)", "b: true", "b: x", "b: y"]
    assert second.coef_names == ["(Intercept)", "b: 1", "b: x", "b: y"]
    again = build_design("y ~ 1 + b + (1 | g)", data, contrasts={"b": DummyCoding(base="1")})
    assert _same(again.X, first.X) and again.coef_names == first.coef_names
    # a pickled design rebuilds its matrices for new data
    back = pickle.loads(pickle.dumps(again))
    assert _same(back.fixed_matrix(data), again.X)


def test_theta_layouts_own_their_arrays():
    a = ThetaLayout([2, 1], [False, False])
    b = ThetaLayout([2, 1], [False, False])
    assert a.entries == b.entries and a.entries is not b.entries
    for name in ("index", "lower", "lam_off", "term_of"):
        assert _same(getattr(a, name), getattr(b, name))
        assert not np.shares_memory(getattr(a, name), getattr(b, name))
    a.lower[0] = 5.0
    assert b.lower[0] == 0.0


def test_unique_inverse_is_numpy_unique():
    rng = np.random.default_rng(11)
    for size, n in ((30, 200), (10**7, 50)):     # presence table, then numpy.unique
        key = rng.integers(0, size, n).astype(np.int64)
        uniq, inverse = _unique_inverse(key, size)
        uniq0, inverse0 = np.unique(key, return_inverse=True)
        assert _same(uniq, uniq0) and _same(inverse, inverse0.reshape(-1))


def test_pattern_csc_is_sorted_and_complete():
    rng = np.random.default_rng(4)
    n = 150
    codes = [rng.integers(0, 12, n).astype(np.int32), rng.integers(0, 5, n).astype(np.int32),
             rng.integers(0, 3, n).astype(np.int32)]
    for c, m in zip(codes, (12, 5, 3)):
        c[:m] = np.arange(m)
    for kk in ([1, 1, 1], [2, 1, 3]):
        z = [np.column_stack([np.ones(n)] + [rng.standard_normal(n) for _ in range(k - 1)])
             for k in kk]
        pat = build_pattern(codes, z, [12, 5, 3])
        q = pat.q
        assert pat.indptr[0] == 0 and pat.indptr[-1] == len(pat.indices) and len(pat.indptr) == q + 1
        for j in range(q):
            col = pat.indices[pat.indptr[j]:pat.indptr[j + 1]]
            assert col[0] == j and np.all(np.diff(col) > 0)   # diagonal first, sorted
        kept = pat.pos[pat.pos >= 0]
        assert _same(np.sort(kept), np.arange(len(pat.indices), dtype=np.int64))

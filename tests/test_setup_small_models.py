"""The third round of set-up shortcuts (small models) against the general code or algebra.

Each shortcut must give exactly what it stands for: the remembered plan of a formula
over a column Index, the model matrix shared by parts with the same terms, the sorted
factorization of short Arrow string columns and the Arrow list of a categorical's
string categories, the level codes of a categorical whose levels all occur, R̃⁻¹ of a
1-by-1 or 2-by-2 R̃ in Python floats, the remembered basis of an intercept alone, the
two-pass weight check, and the exact flop count of the dense tail.
"""
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import mixedmodels
from mixedmodels._fixed import (FixedEffectsBasis, _upper_inverse, _upper_solve_inverse,
                                householder_qr)
from mixedmodels._linalg.system import _dense_tail_flops
from mixedmodels.formula import build_design
from mixedmodels.formula import _columns
from mixedmodels.formula._design import _plan


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- the plan of a formula ---------------------------------------------------------------

def test_plan_is_remembered_per_column_index():
    df = mixedmodels.dataset("sleepstudy")
    formula = "reaction ~ 1 + days + (1 + days | subj)"
    first = _plan(formula, df.columns, True)
    assert _plan(formula, df.columns, True) is first
    # the same names in another Index: a plan of its own, equal in what it says
    other = _plan(formula, pd.Index(list(df.columns)), True)
    assert other is not first
    assert (other.matrix_cols, other.group_cols, other.resp_col) == \
        (first.matrix_cols, first.group_cols, first.resp_col)
    # each design keeps its own parsed formula
    d1, d2 = build_design(formula, df), build_design(formula, df)
    assert d1.parsed is not d2.parsed and d1.parsed.random is not d2.parsed.random
    assert d1.parsed == d2.parsed


def test_plan_follows_the_column_names():
    # whether `days.n` is one column or an error depends on the frame's names alone
    df = mixedmodels.dataset("sleepstudy").rename(columns={"days": "days.n"})
    formula = "reaction ~ 1 + days.n + (1 | subj)"
    d = build_design(formula, df)
    assert d.coef_names == ["(Intercept)", "days.n"]
    renamed = df.rename(columns={"days.n": "other"})
    with pytest.raises(ValueError, match="days"):
        build_design(formula, renamed)
    assert build_design(formula, df).coef_names == d.coef_names


def test_grouping_coding_is_refused_with_a_remembered_plan():
    df = mixedmodels.dataset("sleepstudy")
    formula = "reaction ~ 1 + subj + (1 | subj)"
    build_design("reaction ~ 1 + days + (1 | subj)", df)
    with pytest.raises(ValueError, match="Grouping"):
        build_design(formula, df, contrasts={"subj": mixedmodels.Grouping()})


# -- model matrices shared by parts with the same terms ---------------------------------

def test_random_term_with_the_fixed_terms_has_its_own_copy():
    df = mixedmodels.dataset("sleepstudy")
    d = build_design("reaction ~ 1 + days + (1 + days | subj)", df)
    (term,) = d.reterms
    assert _same(term.z, d.X) and not np.shares_memory(term.z, d.X)
    assert term.cnames == d.coef_names and term.cnames is not d.coef_names
    assert term._matrix is not d._fixed and term._matrix.what != d._fixed.what
    assert _same(term._matrix.build(df.iloc[:7]), d.X[:7])
    pen = mixedmodels.dataset("penicillin")
    d = build_design("diameter ~ 1 + (1 | plate) + (1 | sample)", pen)
    a, b = d.reterms
    assert _same(a.z, np.ones((len(pen), 1))) and _same(b.z, a.z)
    assert not np.shares_memory(a.z, b.z)


# -- factorizations ----------------------------------------------------------------------

def _arrow(values, large=False, chunks=1):
    """A pandas string column stored by Arrow, in ``chunks`` pieces."""
    kind = pa.large_string() if large else pa.string()
    step = max(1, len(values) // chunks)
    parts = [values[i:i + step] for i in range(0, len(values), step)] or [[]]
    return pd.arrays.ArrowStringArray(pa.chunked_array(parts, type=kind))


@pytest.mark.parametrize("n", [2, 7, 180, _columns._PY_FACTORIZE_MAX_ROWS])
@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("chunks", [1, 3])
def test_short_strings_factor_is_the_general_one(n, large, chunks):
    rng = np.random.default_rng(n)
    labels = np.array(["S309", "a b", "ä", "", "B", "b", "10", "9", "ß", "z"])
    values = labels[rng.integers(0, len(labels), n)].tolist()
    arr = _arrow(values, large, chunks)
    codes, levels = _columns._short_strings_factor(arr)
    raw, uniques, declared = _columns._arrow_string_raw(arr)
    general_codes, general_levels = _columns.levels_from_raw(raw, uniques, declared)
    assert levels == general_levels == sorted(set(values))
    assert np.array_equal(codes, general_codes) and codes.dtype == np.int32
    assert [levels[c] for c in codes] == values


def test_short_strings_factor_with_many_levels_and_declined_columns():
    values = [f"g{i:04d}" for i in range(300)][::-1]           # more codes than a byte
    values += values[:_columns._PY_FACTORIZE_MAX_ROWS - 300]
    codes, levels = _columns._short_strings_factor(_arrow(values))
    assert levels == sorted(set(values)) and [levels[c] for c in codes] == values
    assert _columns._short_strings_factor(_arrow(["a"])) is None                 # one row
    assert _columns._short_strings_factor(_arrow(["a", None, "b"])) is None      # a null
    long = ["x", "y"] * (_columns._PY_FACTORIZE_MAX_ROWS // 2 + 1)
    assert _columns._short_strings_factor(_arrow(long)) is None
    assert _columns._short_strings_factor(np.array(["a", "b"], dtype=object)) is None
    arrow_dtype = pd.array(["a", "b"], dtype=pd.ArrowDtype(pa.string()))
    assert _columns._short_strings_factor(arrow_dtype) is None     # not a string dtype


def test_string_grouping_after_dropped_rows_uses_the_rows_kept():
    df = mixedmodels.dataset("sleepstudy").copy()
    df.loc[df.subj == "S308", "reaction"] = np.nan      # a whole level goes
    with pytest.warns(UserWarning, match="dropped"):
        d = build_design("reaction ~ 1 + days + (1 | subj)", df)
    kept = df.subj.to_numpy()[d.rows_used].tolist()
    (term,) = d.reterms
    assert term.levels == sorted(set(kept)) and "S308" not in term.levels
    assert [term.levels[c] for c in term.codes] == kept


@pytest.mark.parametrize("make", [
    lambda v: pd.Categorical(v),
    lambda v: pd.Categorical(v, categories=sorted(set(v), reverse=True)),
    lambda v: pd.Categorical(v, categories=sorted(set(v)) + ["unused"]),
    lambda v: pd.Categorical([len(x) for x in v]),
    lambda v: pd.Categorical(v).astype(pd.CategoricalDtype(
        pd.Index(sorted(set(v)), dtype=object))),
])
def test_categorical_levels_are_its_categories_in_order(make):
    values = ["b", "a", "cc", "a", "b", "dd", "cc"] * 3
    cat = make(values)
    codes, levels = _columns.factorize(pd.Series(cat))
    used = [c for c in cat.categories if c in set(cat)]
    assert levels == [str(c) for c in used]
    assert [levels[c] for c in codes] == [str(x) for x in cat]


def test_arrow_string_categories_are_listed_as_numpy_lists_them():
    cat = pd.Categorical(["x", "y", "x"], categories=pd.Index(["y", "x"], dtype="str"))
    raw, uniques, declared = _columns._categorical_raw(cat)
    assert uniques == cat.categories.to_numpy().tolist() == ["y", "x"]
    assert all(type(u) is str for u in uniques) and declared
    assert np.array_equal(raw, cat.codes)


# -- the fixed-effects basis -------------------------------------------------------------

@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_small_upper_inverse_is_upper_solve(p, seed):
    rng = np.random.default_rng(seed)
    R = np.triu(rng.standard_normal((p, p)) * 10.0 ** rng.integers(-8, 8, (p, p)))
    if seed % 2:
        R[np.diag_indices(p)] = np.abs(R.diagonal())
    Rinv = _upper_inverse(R.tolist(), R)
    assert _same(Rinv, _upper_solve_inverse(R))
    # and it is the inverse: [[1/a, -b/(ad)], [0, 1/d]] of [[a, b], [0, d]]
    a, d = R[0, 0], R[-1, -1]
    inverse = np.array([[1 / a]]) if p == 1 else np.array([[1 / a, -R[0, 1] / (a * d)],
                                                         [0.0, 1 / d]])
    assert np.allclose(Rinv, inverse, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("p", range(1, 10))
@pytest.mark.parametrize("seed", range(4))
def test_upper_inverse_in_floats_is_upper_solve_bit_for_bit(p, seed):
    # up to _FLOAT_BASIS_MAX columns the Python floats, beyond it upper_solve itself
    rng = np.random.default_rng(100 + seed)
    R = np.triu(rng.standard_normal((p, p)) * 10.0 ** rng.integers(-6, 6, (p, p)))
    assert _same(_upper_inverse(R.tolist(), R), _upper_solve_inverse(R))


def test_upper_inverse_with_a_zero_diagonal_is_upper_solve():
    R = np.array([[2.0, 1.0], [0.0, 0.0]])
    with np.errstate(divide="ignore", invalid="ignore"):
        assert _same(_upper_inverse(R.tolist(), R), _upper_solve_inverse(R))


@pytest.mark.parametrize("n", [1, 5, 144, 180])
def test_intercept_basis_is_the_general_one(n):
    ones = np.ones((n, 1))
    fast = FixedEffectsBasis(ones)
    general = object.__new__(FixedEffectsBasis)
    general.p = 1
    general._from_qr(ones, householder_qr(ones), None, True)
    for name in ("X", "R", "Rinv"):
        a, b = getattr(fast, name), getattr(general, name)
        assert _same(a, b) and a.flags.writeable and a.flags.c_contiguous, name
    assert fast.logabsdet == general.logabsdet
    # each basis owns its arrays
    fast.X[0, 0] = 7.0
    assert FixedEffectsBasis(ones).X[0, 0] != 7.0


def test_near_collinear_warning_names_the_caller():
    df = mixedmodels.dataset("sleepstudy").copy()
    df["shifted"] = df.days + 1e7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixedmodels.LinearMixedModel("reaction ~ 1 + shifted + (1 | subj)", df)
    near = [w for w in caught if "nearly collinear" in str(w.message)]
    assert near and near[0].filename == __file__


# -- weights and offsets -----------------------------------------------------------------

def test_weights_are_checked_as_before():
    df = mixedmodels.dataset("sleepstudy").copy()
    formula = "reaction ~ 1 + days + (1 | subj)"
    df["w"] = 1e308                    # finite, though their sum is not
    assert _same(build_design(formula, df, weights="w").weights, np.full(180, 1e308))
    for bad, what in [(-1.0, "non-negative"), (np.inf, "non-negative")]:
        df["w"] = 1.0
        df.loc[3, "w"] = bad
        with pytest.raises(ValueError, match=what):
            build_design(formula, df, weights="w")
    df["w"] = 1.0
    df.loc[[3, 9], "w"] = np.nan       # missing: the rows go
    with pytest.warns(UserWarning, match="dropped 2"):
        d = build_design(formula, df, weights="w")
    assert d.n == 178 and 3 not in d.rows_used


def test_nonfinite_offsets_drop_their_rows():
    df = mixedmodels.dataset("sleepstudy").copy()
    off = np.zeros(180)
    off[[4, 5]] = [np.inf, -np.inf]
    with pytest.warns(UserWarning, match="dropped 2"):
        d = build_design("reaction ~ 1 + days + (1 | subj)", df, offset=off)
    assert d.n == 178 and np.isfinite(d.offset).all()


# -- the dense tail's flop count ---------------------------------------------------------

def test_dense_tail_flops_is_the_sum_of_squares():
    rng = np.random.default_rng(3)
    k0, nlev = 2, 50
    q0 = k0 * nlev
    met = rng.integers(0, 40, nlev)
    # columns of a level: its own rows below the diagonal, then the rows it meets
    counts = np.repeat(met, k0) + np.tile(np.arange(k0, 0, -1), nlev)
    indptr = np.concatenate([[0], np.cumsum(counts), [0] * 7])
    indptr[q0 + 1:] = indptr[q0] + np.arange(1, 8)
    r = len(indptr) - 1 - q0
    expected = r ** 3 / 3.0 + float(np.sum(met.astype(float) ** 2)) * k0 + q0 * k0 * k0
    assert _dense_tail_flops(indptr.astype(np.int32), k0, q0) == expected

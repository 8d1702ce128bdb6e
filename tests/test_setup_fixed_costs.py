"""The second round of set-up shortcuts against the general code they stand for.

Each shortcut must give exactly what the code it replaces gives (the same bytes, dtypes,
names, decisions and messages): the direct ``lstsq`` gufunc of the GLM start, the QR
that the formula layer's rank test hands to the fixed-effects basis (remembered for an
intercept alone), the block patterns of one term and of scalar terms, the Python
factorization of short Arrow string columns, the canonical-spelling shortcut, the
frozen records made without their ``__init__``, and the range test of a degenerate
GLMM response.
"""
import dataclasses
import pickle
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import mixedmodels
from mixedmodels._fixed import FixedEffectsBasis, householder_qr, least_squares
from mixedmodels._linalg._pattern import build_pattern
from mixedmodels.formula import build_design
from mixedmodels.formula import _columns
from mixedmodels.formula._design import (RANK_RTOL, Design, ReTerm, _aliased_columns,
                                         _qr_if_clearly_not_aliased)
from mixedmodels.formula._rsyntax import canonical


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- the GLM start's least squares -------------------------------------------------------

@pytest.mark.parametrize("shape", [(56, 4), (180, 1), (30, 7), (7, 7), (5, 8)])
def test_least_squares_is_numpy_lstsq(shape):
    rng = np.random.default_rng(sum(shape))
    A = rng.standard_normal(shape) * np.logspace(0, 5, shape[1])
    b = rng.standard_normal(shape[0])
    x = least_squares(A, b)
    assert _same(x, np.linalg.lstsq(A, b, rcond=None)[0])
    assert x.flags.c_contiguous and x.flags.writeable


def test_least_squares_rank_deficient_and_other_inputs():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((40, 3))
    A[:, 2] = A[:, 0] + A[:, 1]          # rank 2: the minimum-norm solution
    b = rng.standard_normal(40)
    assert _same(least_squares(A, b), np.linalg.lstsq(A, b, rcond=None)[0])
    A32 = A.astype(np.float32)           # other dtypes take the wrapper itself
    assert _same(least_squares(A32, b), np.linalg.lstsq(A32, b, rcond=None)[0])
    assert _same(least_squares(np.zeros((6, 0)), b[:6]),
                 np.linalg.lstsq(np.zeros((6, 0)), b[:6], rcond=None)[0])


def _glm_start_reference(model):
    """The GLM start as written before (numpy.linalg.lstsq, out-of-place arithmetic)."""
    X, y, w, off, fam = model.X, model.y, model.prior_w, model.offset_or_zero, model.family
    if model.estimates_family_param:
        fam = fam.with_param(1e8)
    eta = fam.link.link(fam.starting_mu(y, w))
    st = model.state
    beta = np.zeros(X.shape[1])
    dev_old = np.inf
    for _ in range(50):
        dev = st.evaluate(fam, y, w, eta)
        if abs(dev_old - dev) <= 1e-10 * (abs(dev) + 1e-10):
            break
        dev_old = dev
        sw = np.sqrt(st.wrkwt)
        beta = np.linalg.lstsq(X * sw[:, None], (eta - off + st.wrkresid) * sw, rcond=None)[0]
        eta = X @ beta + off
    return beta


def _glmms():
    cbpp = mixedmodels.dataset("cbpp")
    ticks = mixedmodels.dataset("grouseticks")
    ticks = ticks.assign(o=0.1 * np.cos(np.arange(len(ticks))))
    contra = mixedmodels.dataset("contra")
    return [
        ("cbind(incid, hsz - incid) ~ 1 + period + (1 | herd)", cbpp,
         mixedmodels.Binomial(), {}),
        ("ticks ~ 1 + year + (1 | brood)", ticks, mixedmodels.Poisson(), {}),
        ("ticks ~ 1 + year + (1 | brood)", ticks, mixedmodels.Poisson(), {"offset": "o"}),
        ("use ~ 1 + age + urban + (1 | dist)", contra, mixedmodels.Bernoulli(), {}),
    ]


@pytest.mark.parametrize("case", range(4))
def test_glm_start_is_the_lstsq_irls(case):
    formula, data, family, kw = _glmms()[case]
    model = mixedmodels.GeneralizedLinearMixedModel(formula, data, family, **kw)
    reference = _glm_start_reference(model)
    # the NumPy loop reproduces it bit for bit; the compiled IRLS (its own Householder QR,
    # not LAPACK's dgelsd) to the rounding of the solves
    assert _same(model._glm_start(compiled=False)[0], reference)
    np.testing.assert_allclose(model.beta0, reference, rtol=1e-12, atol=1e-14)


# -- the fixed-effects basis -------------------------------------------------------------

def test_fixed_basis_with_the_callers_qr_is_the_same():
    rng = np.random.default_rng(8)
    X = np.column_stack([np.ones(60), rng.standard_normal(60) + 50.0,
                         rng.integers(0, 3, 60).astype(float)])
    own = FixedEffectsBasis(X, ["a", "b", "c"])
    given = FixedEffectsBasis(X, ["a", "b", "c"], qr=householder_qr(X))
    for name in ("X", "R", "Rinv"):
        assert _same(getattr(own, name), getattr(given, name))
    assert own.logabsdet == given.logabsdet


# -- the rank test's QR ------------------------------------------------------------------

def _designs_near_the_threshold():
    rng = np.random.default_rng(12)
    n = 50
    out = []
    for eps in (1.0, 1e-3, 1e-5, 1e-6, 2e-7, 1e-7, 1e-8, 1e-9, 1e-12, 0.0):
        a = rng.standard_normal(n)
        X = np.column_stack([np.ones(n), a, a + eps * rng.standard_normal(n)])
        out.append(X)
        out.append(np.column_stack([np.ones(n), 1e8 + a, 1e8 + a * (1 + eps)]))
    out.append(np.zeros((n, 1)))
    out.append(np.column_stack([np.ones(n), np.zeros(n), rng.standard_normal(n)]))
    out.append(rng.standard_normal((3, 5)))            # wider than tall: not taken
    return out


def test_qr_shortcut_only_where_no_column_is_aliased():
    taken = 0
    for X in _designs_near_the_threshold():
        qr = _qr_if_clearly_not_aliased(X)
        if qr is None:
            continue
        taken += 1
        assert _aliased_columns(X) == []
        q, r = householder_qr(X)
        assert _same(qr[0], q) and _same(qr[1], r)
        # the margin of the test: every column's R diagonal well above RANK_RTOL
        norms = np.sqrt((r * r).sum(axis=0))
        assert np.all(np.abs(np.diag(r)) > 10 * RANK_RTOL * norms)
    assert taken >= 3
    # a column within 1e-7 of the span of the ones before it is left to the QR test
    rng = np.random.default_rng(3)
    a = rng.standard_normal(40)
    near = np.column_stack([np.ones(40), a, a + 1e-8 * rng.standard_normal(40)])
    assert _qr_if_clearly_not_aliased(near) is None


@pytest.mark.parametrize("n", [1, 5, 144, 3000])
def test_remembered_intercept_qr_is_householder_qr(n):
    X = np.ones((n, 1))
    for _ in range(2):                   # computed, then remembered
        q, r = _qr_if_clearly_not_aliased(X)
        q0, r0 = householder_qr(X)
        assert _same(q, q0) and _same(r, r0)
        assert q.flags.writeable and q.flags.c_contiguous
        q[:] = 0.0                       # the caller's copy: the memo is untouched


def test_design_and_model_drop_aliased_columns_as_before():
    data = mixedmodels.dataset("sleepstudy").assign(
        twice=lambda d: 2.0 * d["days"], near=lambda d: d["days"] * (1 + 1e-12))
    for formula in ("reaction ~ 1 + days + twice + (1 | subj)",
                    "reaction ~ 1 + days + near + (1 | subj)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = build_design(formula, data)
            m = mixedmodels.LinearMixedModel(formula, data)
        assert d.dropped == [formula.split(" + ")[2]]
        assert _same(m.fixed.X, FixedEffectsBasis(d.X, d.coef_names).X)


# -- block patterns ----------------------------------------------------------------------

def _pattern_cases():
    rng = np.random.default_rng(21)
    cases = []
    n = 160
    for nl in ([24, 6], [30, 10], [12, 5, 3], [7, 7, 7, 2]):
        codes = [rng.integers(0, m, n).astype(np.int32) for m in nl]
        for c, m in zip(codes, nl):
            c[:m] = np.arange(m)
        cases.append((codes, [np.ones((n, 1)) for _ in nl], nl))
    # nested (every level of the inner term in one outer level)
    inner = np.arange(n, dtype=np.int32) % 40
    cases.append(([inner, inner // 4], [np.ones((n, 1))] * 2, [40, 10]))
    # level products too large for the presence table
    big = [rng.integers(0, 3000, 500).astype(np.int32), rng.integers(0, 3000, 500).astype(np.int32)]
    for c in big:
        c[:] = np.unique(c, return_inverse=True)[1]
    cases.append((big, [np.ones((500, 1))] * 2, [int(big[0].max()) + 1, int(big[1].max()) + 1]))
    # one term of 1, 2 and 3 columns
    for k in (1, 2, 3):
        codes = [rng.integers(0, 9, n).astype(np.int32)]
        codes[0][:9] = np.arange(9)
        cases.append((codes, [rng.standard_normal((n, k))], [9]))
    return cases


@pytest.mark.parametrize("case", range(9))
def test_pattern_shortcuts_are_the_general_code(case):
    codes, z, nl = _pattern_cases()[case]
    fast = build_pattern(codes, z, nl)
    general = build_pattern(codes, z, nl, general=True)
    for field in dataclasses.fields(fast):
        a, b = getattr(fast, field.name), getattr(general, field.name)
        if isinstance(b, np.ndarray):
            assert _same(a, b) and a.flags.c_contiguous == b.flags.c_contiguous, field.name
        else:
            assert a == b and type(a) is type(b), field.name
    # the record made without the dataclass's __init__ behaves as one
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.nvals = 0
    back = pickle.loads(pickle.dumps(fast))
    assert _same(back.rowoff, fast.rowoff) and back.nvals == fast.nvals


# -- Arrow string columns ----------------------------------------------------------------

@pytest.mark.parametrize("n", [5, 144, _columns._PY_FACTORIZE_MAX_ROWS,
                               _columns._PY_FACTORIZE_MAX_ROWS + 1, 3000])
@pytest.mark.parametrize("chunks", [1, 3])
def test_short_string_columns_factorize_as_arrow_does(n, chunks):
    rng = np.random.default_rng(n + chunks)
    labels = np.array(["S309", "a b", "ä", "", "B", "b", "10", "9"])
    values = labels[rng.integers(0, len(labels), n)].tolist()
    step = max(1, n // chunks)
    parts = [values[i:i + step] for i in range(0, n, step)]
    arr = pd.array(pa.chunked_array(parts, type=pa.large_string()),
                   dtype=pd.ArrowDtype(pa.large_string()))
    raw, uniques, declared = _columns._arrow_string_raw(arr)
    encoded = arr._pa_array.dictionary_encode().combine_chunks()
    assert _same(raw, encoded.indices.to_numpy().astype(np.int64))
    assert uniques == encoded.dictionary.to_pylist() and declared is False
    assert all(type(u) is str for u in uniques)


# -- canonical spelling ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["1 + days + (1 | subj)", "incid / hsz", "y", " 0 + x:z ",
                                  "log(y)", "'a.b' + x", "`x y` + z", "x^2 + I(y^2)",
                                  "days.n + y", "größe + x", "np.log(x)", "1"])
def test_canonical_shortcut_is_the_token_loop(text):
    columns = pd.Index(["days", "subj", "incid", "hsz", "x", "y", "z", "x y", "days.n",
                        "größe"])
    known = lambda name: name in ("np", "log", "I")     # noqa: E731
    # a non-ASCII name appended (no column, left as it is) forces the token loop
    general = canonical(text + " + ä_", columns, known)[:-len(" + ä_")]
    assert canonical(text, columns, known) == general


# -- frozen records made without __init__ ------------------------------------------------

def test_design_records_are_their_dataclasses():
    data = mixedmodels.dataset("sleepstudy")
    d = build_design("reaction ~ 1 + days + (1 + days | subj)", data)
    assert type(d) is Design and type(d.reterms[0]) is ReTerm
    rebuilt = Design(**{f.name: getattr(d, f.name) for f in dataclasses.fields(Design)})
    assert repr(rebuilt) == repr(d)
    t = d.reterms[0]
    assert repr(ReTerm(**{f.name: getattr(t, f.name) for f in dataclasses.fields(ReTerm)})) \
        == repr(t)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.n = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.zerocorr = True
    back = pickle.loads(pickle.dumps(d))
    assert _same(back.X, d.X) and back.reterms[0].levels == t.levels
    assert dataclasses.replace(d, y=d.y + 1.0).n == d.n


# -- degenerate GLMM responses -----------------------------------------------------------

def _refusal(y, w, family):
    """The message the test on every value gave (the code before the range test)."""
    used = w > 0
    if family in ("Bernoulli", "Binomial"):
        if np.all(y[used] == 0) or np.all(y[used] == 1):
            return "successes" if np.all(y[used] == 1) else "failures"
    elif family == "Poisson":
        if np.all(y[used] == 0):
            return "all zeros"
    return None


@pytest.mark.parametrize("family", ["Binomial", "Poisson"])
def test_degenerate_response_refused_as_before(family):
    data = mixedmodels.dataset("cbpp").copy()
    n = len(data)
    cases = [np.zeros(n), np.ones(n), np.r_[np.zeros(n - 1), 1.0]]
    weights = [np.full(n, 3.0), np.r_[np.zeros(n - 1), 2.0], np.r_[2.0, np.zeros(n - 1)]]
    fam = getattr(mixedmodels, family)()
    for y in cases:
        for w in weights:
            if family == "Poisson":
                y = y * 2.0
            data["yy"], data["ww"] = y, w
            expected = _refusal(y, w, family)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if expected is None:
                    mixedmodels.GeneralizedLinearMixedModel("yy ~ 1 + (1 | herd)", data, fam,
                                                            weights="ww")
                    continue
                with pytest.raises(ValueError, match=expected):
                    mixedmodels.GeneralizedLinearMixedModel("yy ~ 1 + (1 | herd)", data, fam,
                                                            weights="ww")


# -- reductions in Python floats on a small fit's path ----------------------------------

@pytest.mark.parametrize("p", range(1, 12))
def test_basis_log_determinant_is_numpy_add_reduce(p):
    """FixedEffectsBasis sums log|R̃_ii| in Python floats up to 7 columns, in
    np.add.reduce's order: the same bits."""
    rng = np.random.default_rng(p)
    for _ in range(20):
        X = rng.normal(size=(40, p)) * np.exp(rng.normal(scale=3, size=p))
        basis = FixedEffectsBasis(X, [f"x{j}" for j in range(p)])
        want = float(np.add.reduce(np.log(np.abs(np.diag(basis.R)))))
        assert basis.logabsdet == want


@pytest.mark.parametrize("n", [1, 2, 7, 180, 1000, 1001, 5000])
def test_nonfinite_rows_as_numpy_finds_them(n):
    """_nonfinite's sum, in Python floats up to 1,000 rows, decides as NumPy's does:
    None where every value is finite, else the rows that are not."""
    rng = np.random.default_rng(n)
    values = rng.normal(size=n) * 1e300
    for bad in (None, np.nan, np.inf, -np.inf):
        v = values.copy()
        if bad is not None:
            v[n // 2] = bad
        with np.errstate(over="ignore"):
            got = _columns._nonfinite(v)
            finite_sum = np.isfinite(np.add.reduce(v))
        if bad is None and finite_sum:
            assert got is None
        else:
            want = ~np.isfinite(v)
            np.testing.assert_array_equal(got, want)
    # an overflowing sum of finite values: rows flagged by neither (every value finite)
    big = np.full(n, 1e308)
    with np.errstate(over="ignore"):
        got = _columns._nonfinite(big)
    assert got is None if n == 1 else not got.any()

"""lme4's formula syntax in the formula layer, other data frames, and pickling.

* ``cbind(successes, failures)`` responses, ``offset()`` terms, ``^`` as R reads it,
  backtick-quoted and dotted names;
* duplicate column names; polars and pyarrow tables as data;
* designs and their matrix builders through pickle and deepcopy.

Expected numbers come from NumPy on the data columns, never from the code under test.
Where a formula can take both the NumPy fast path and patsy, both are built and must
agree bit for bit, as in ``test_formula_fastpath.py``.
"""
import copy
import pickle
import warnings

import numpy as np
import pandas as pd
import patsy
import pytest

import mixedmodels
from mixedmodels.formula import (
    EffectsCoding,
    HelmertCoding,
    build_design,
    parse_formula,
)
from mixedmodels.formula._design import _build_design, _ModelMatrix
from mixedmodels.formula._fast import FastMatrix


@pytest.fixture(scope="module")
def cbpp():
    return mixedmodels.dataset("cbpp")


@pytest.fixture(scope="module")
def sleepstudy():
    return mixedmodels.dataset("sleepstudy")


@pytest.fixture(scope="module")
def contra():
    return mixedmodels.dataset("contra")


def _same(a, b, what=""):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), what


def _same_design(d1, d2, newdata=None):
    """Every observable part of two designs is identical (new-data matrices too)."""
    assert d1.coef_names == d2.coef_names and d1.dropped == d2.dropped
    assert (d1.y_levels, d1.n, d1.binomial_counts) == (d2.y_levels, d2.n, d2.binomial_counts)
    for name in ("y", "X", "weights", "offset", "rows_used"):
        _same(getattr(d1, name), getattr(d2, name), name)
    assert len(d1.reterms) == len(d2.reterms)
    for t1, t2 in zip(d1.reterms, d2.reterms):
        assert (t1.group_name, t1.levels, t1.cnames, t1.zerocorr) == (
            t2.group_name, t2.levels, t2.cnames, t2.zerocorr)
        _same(t1.codes, t2.codes, "codes")
        _same(t1.z, t2.z, "z")
    if newdata is not None:
        _same(d1.fixed_matrix(newdata), d2.fixed_matrix(newdata), "fixed_matrix")
        _same(d1.offset_for(newdata), d2.offset_for(newdata), "offset_for")
        for t1, t2 in zip(d1.reterms, d2.reterms):
            for a, b in zip(t1.new_codes(newdata), t2.new_codes(newdata)):
                _same(a, b, "new_codes")


def _both(formula, data, **kwargs):
    """The design through the fast path where it can, and through patsy only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (_build_design(formula, data, fast=True, **kwargs),
                _build_design(formula, data, fast=False, **kwargs))


# --- cbind(successes, failures) --------------------------------------------------------

def test_cbind_gives_proportion_and_trials(cbpp):
    d = build_design("cbind(incid, hsz - incid) ~ 1 + period + (1 | herd)", cbpp)
    incid, hsz = cbpp["incid"].to_numpy(float), cbpp["hsz"].to_numpy(float)
    assert d.binomial_counts and d.y_levels is None
    assert d.response_name == "cbind(incid, hsz - incid)"
    np.testing.assert_array_equal(d.y, incid / hsz)
    np.testing.assert_array_equal(d.weights, hsz)
    assert d.y.dtype == d.weights.dtype == np.float64
    assert d.coef_names == ["(Intercept)", "period: 2", "period: 3", "period: 4"]
    # the same X and terms as the proportion written out with its weights
    ref = build_design("incid / hsz ~ 1 + period + (1 | herd)", cbpp, weights="hsz")
    _same(d.X, ref.X)
    _same(d.reterms[0].codes, ref.reterms[0].codes)
    assert not ref.binomial_counts


def test_cbind_arguments_are_any_expressions_and_names(cbpp):
    data = cbpp.assign(fails=cbpp["hsz"] - cbpp["incid"])
    data = data.rename(columns={"incid": "n.sick", "fails": "not sick"})
    d = build_design("cbind(n.sick, `not sick`) ~ 1 + period + (1 | herd)", data)
    sick, well = data["n.sick"].to_numpy(float), data["not sick"].to_numpy(float)
    np.testing.assert_array_equal(d.y, sick / (sick + well))
    np.testing.assert_array_equal(d.weights, sick + well)
    d2 = build_design("cbind(2 * n.sick, 2 * `not sick`) ~ 1 + (1 | herd)", data)
    np.testing.assert_array_equal(d2.weights, 2 * (sick + well))


def test_cbind_with_weights_is_an_error(cbpp):
    with pytest.raises(ValueError, match=r"weights cannot be given with the response "
                                         r"'cbind\(incid, hsz - incid\)'"):
        build_design("cbind(incid, hsz - incid) ~ 1 + (1 | herd)", cbpp, weights="hsz")


def test_cbind_rows_without_trials_are_kept_with_zero_weight(cbpp):
    data = cbpp.copy()
    data.loc[[2, 7], ["incid", "hsz"]] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division-by-zero warning, no dropped rows
        d = build_design("cbind(incid, hsz - incid) ~ 1 + period + (1 | herd)", data)
    assert d.n == len(data)
    assert d.y[2] == d.y[7] == 0.0 and d.weights[2] == d.weights[7] == 0.0
    assert np.isfinite(d.y).all()
    rest = np.setdiff1d(np.arange(len(data)), [2, 7])
    np.testing.assert_array_equal(d.y[rest], (data["incid"] / data["hsz"]).to_numpy()[rest])


def test_cbind_negative_counts_name_the_response(cbpp):
    with pytest.raises(ValueError, match=r"response 'cbind\(incid, incid - hsz\)' has "
                                         r"\d+ row\(s\) with negative counts"):
        build_design("cbind(incid, incid - hsz) ~ 1 + (1 | herd)", cbpp)


def test_cbind_missing_counts_drop_rows(cbpp):
    data = cbpp.assign(incid=cbpp["incid"].astype(float))
    data.loc[4, "incid"] = np.nan
    with pytest.warns(UserWarning, match=r"dropped 1 of 56 .*\['incid'\]"):
        d = build_design("cbind(incid, hsz - incid) ~ 1 + (1 | herd)", data)
    assert 4 not in d.rows_used and d.n == 55


@pytest.mark.parametrize("lhs", ["cbind(incid)", "cbind(incid, hsz, hsz)", "cbind(incid, )"])
def test_cbind_needs_two_arguments(cbpp, lhs):
    with pytest.raises(ValueError, match="^cannot parse formula.*cbind"):
        build_design(f"{lhs} ~ 1 + (1 | herd)", cbpp)


def test_cbind_non_numeric_counts(cbpp):
    with pytest.raises(ValueError, match="'period' of the response .* not numeric"):
        build_design("cbind(period, hsz) ~ 1 + (1 | herd)", cbpp)


def test_cbind_alike_on_both_paths(cbpp):
    fast, slow = _both("cbind(incid, hsz - incid) ~ 1 + period + (1 | herd)", cbpp)
    _same_design(fast, slow, cbpp.iloc[::5])
    assert isinstance(fast._fixed, FastMatrix) and isinstance(slow._fixed, _ModelMatrix)


# --- offset() terms ----------------------------------------------------------------------

def test_offset_terms_sum_with_the_argument(cbpp):
    extra = np.linspace(-1.0, 1.0, len(cbpp))
    d = build_design("incid ~ 1 + period + offset(log(hsz)) + offset(hsz / 10) + (1 | herd)",
                     cbpp, offset=extra)
    hsz = cbpp["hsz"].to_numpy(float)
    # R's model.offset: the argument, then each term in turn
    np.testing.assert_array_equal(d.offset, extra + np.log(hsz) + hsz / 10)
    assert d.coef_names == ["(Intercept)", "period: 2", "period: 3", "period: 4"]
    plain = build_design("incid ~ 1 + period + (1 | herd)", cbpp)
    _same(d.X, plain.X)
    assert plain.offset is None and plain.offset_for(cbpp) is None


def test_offset_term_alone(cbpp):
    d = build_design("incid ~ offset(log(hsz)) + (1 | herd)", cbpp)
    assert d.coef_names == ["(Intercept)"]           # the intercept stays, as in R
    np.testing.assert_array_equal(d.offset, np.log(cbpp["hsz"].to_numpy(float)))
    d = build_design("incid ~ offset(hsz) - 1 + period + (1 | herd)", cbpp)
    assert d.coef_names == ["period: 1", "period: 2", "period: 3", "period: 4"]
    np.testing.assert_array_equal(d.offset, cbpp["hsz"].to_numpy(float))


def test_offset_for_new_data(cbpp):
    d = build_design("incid ~ 1 + period + offset(log(hsz)) + offset(`hsz`) + (1 | herd)",
                     cbpp, offset=np.ones(len(cbpp)))
    new = pd.DataFrame({"period": ["2", "1"], "hsz": [4, 20], "herd": ["1", "99"]})
    # the formula's terms only: the argument's values for new rows are the caller's
    np.testing.assert_array_equal(d.offset_for(new), np.log([4.0, 20.0]) + [4.0, 20.0])
    np.testing.assert_array_equal(d.fixed_matrix(new), [[1, 1, 0, 0], [1, 0, 0, 0]])


def test_offset_columns_drop_incomplete_rows(cbpp):
    data = cbpp.assign(expo=cbpp["hsz"].astype(float))
    data.loc[[1, 9], "expo"] = np.nan
    with pytest.warns(UserWarning, match=r"dropped 2 of 56 .*\['expo'\]"):
        d = build_design("incid ~ 1 + offset(log(expo)) + (1 | herd)", data)
    expected = np.setdiff1d(np.arange(56), [1, 9])
    np.testing.assert_array_equal(d.rows_used, expected)
    np.testing.assert_array_equal(d.offset, np.log(data["expo"].to_numpy()[expected]))
    with pytest.raises(ValueError, match=r"2 row\(s\).*\['expo'\]"):
        build_design("incid ~ 1 + offset(expo) + (1 | herd)", data, na_action="raise")


def test_offset_must_be_numeric(cbpp):
    with pytest.raises(ValueError, match=r"offset\(period\) is not numeric"):
        build_design("incid ~ 1 + offset(period) + (1 | herd)", cbpp)


@pytest.mark.parametrize("formula", [
    "incid ~ 1 + period:offset(hsz) + (1 | herd)",
    "incid ~ 1 + period - offset(hsz) + (1 | herd)",
    "incid ~ 1 + (1 + offset(hsz) | herd)",
    "incid ~ 1 + offset() + (1 | herd)",
])
def test_misplaced_offset_is_a_parse_error(cbpp, formula):
    with pytest.raises(ValueError, match="^cannot parse formula.*offset"):
        build_design(formula, cbpp)


def test_offset_alike_on_both_paths(cbpp):
    for formula in ("incid ~ 1 + period + offset(hsz) + (1 | herd)",
                    "incid ~ 1 + period + offset(np.log(hsz)) + offset(hsz) + (1 | herd)"):
        fast, slow = _both(formula, cbpp, offset="hsz")
        _same_design(fast, slow, cbpp.iloc[::3])


def test_parse_keeps_offsets_and_counts_apart():
    p = parse_formula("cbind(k, n - k) ~ x + offset(log(t)) + offset(u) + (1 | g)")
    assert p.fixed == "x" and p.offsets == ("log(t)", "u") and p.counts == ("k", "n - k")
    p = parse_formula("y ~ x + (1 | g)")
    assert p.offsets == () and p.counts is None


# --- ^ as R reads it -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_power_inside_calls(sleepstudy, dtype):
    data = sleepstudy.assign(days=sleepstudy["days"].astype(dtype))
    days = data["days"].to_numpy(np.float64)
    fast, slow = _both("reaction ~ 1 + I(days^2) + np.log(days^2 + 1) + (1 + I(days^2) | subj)",
                       data)
    _same_design(fast, slow, data.iloc[::7])
    np.testing.assert_array_equal(fast.X[:, 1], days ** 2)
    np.testing.assert_allclose(fast.X[:, 2], np.log(days ** 2 + 1), rtol=1e-15)
    np.testing.assert_array_equal(fast.reterms[0].z[:, 1], days ** 2)


def test_power_of_terms_is_crossing(contra):
    fast, slow = _both("use ~ (age + urban + livch)^2 + (1 | dist)", contra)
    _same_design(fast, slow, contra.iloc[::50])
    ref = build_design("use ~ age + urban + livch + age:urban + age:livch + urban:livch "
                       "+ (1 | dist)", contra)
    assert fast.coef_names == ref.coef_names
    _same(fast.X, ref.X)


def test_power_in_the_response(sleepstudy):
    d = build_design("reaction^2 ~ 1 + days + (1 | subj)", sleepstudy)
    np.testing.assert_array_equal(d.y, sleepstudy["reaction"].to_numpy() ** 2)


# --- backticks and dotted names ----------------------------------------------------------

@pytest.fixture(scope="module")
def renamed(sleepstudy):
    data = sleepstudy.rename(columns={"reaction": "my y", "days": "days.n",
                                      "subj": "subject id"})
    data["größe"] = sleepstudy["days"] * 1.5
    data["subj.id"] = sleepstudy["subj"]
    data["late day"] = np.where(sleepstudy["days"] > 4, "late", "early")
    return data


def test_backtick_names_everywhere(sleepstudy, renamed):
    ref = build_design("reaction ~ 1 + days + (1 + days | subj)", sleepstudy)
    for formula in ("`my y` ~ 1 + `days.n` + (1 + `days.n` | `subject id`)",
                    "`my y` ~ 1 + days.n + (1 + days.n | `subject id`)"):
        fast, slow = _both(formula, renamed)
        _same_design(fast, slow, renamed.iloc[::11])
        assert isinstance(fast._fixed, FastMatrix)
        assert isinstance(fast.reterms[0]._matrix, FastMatrix)
        assert fast.coef_names == ["(Intercept)", "days.n"]
        assert fast.response_name == "my y"
        (term,) = fast.reterms
        assert term.group_name == "subject id" and term.cnames == ["(Intercept)", "days.n"]
        for name in ("X", "y"):
            _same(getattr(fast, name), getattr(ref, name))
        _same(term.codes, ref.reterms[0].codes)
        _same(term.z, ref.reterms[0].z)
        assert term.levels == ref.reterms[0].levels


def test_dotted_and_non_ascii_names_without_backticks(sleepstudy, renamed):
    fast, slow = _both("`my y` ~ 1 + größe * `late day` + (1 | subj.id)", renamed)
    _same_design(fast, slow, renamed.iloc[::13])
    assert isinstance(fast._fixed, FastMatrix)
    assert fast.coef_names == ["(Intercept)", "größe", "late day: late",
                               "größe & late day: late"]
    late = (sleepstudy["days"] > 4).to_numpy(float)
    np.testing.assert_array_equal(fast.X[:, 3], sleepstudy["days"].to_numpy() * 1.5 * late)
    assert fast.reterms[0].group_name == "subj.id"
    new = pd.DataFrame({"größe": [3.0], "late day": ["late"], "subj.id": ["S308"]})
    np.testing.assert_array_equal(fast.fixed_matrix(new), [[1.0, 3.0, 1.0, 3.0]])
    assert fast.reterms[0].new_codes(new)[0].tolist() == [fast.reterms[0].levels.index("S308")]


def test_backticks_in_expressions_and_grouping(sleepstudy, renamed):
    fast, slow = _both("`my y` ~ 1 + np.log(`days.n` + 1) + abs2(`größe`) "
                       "+ (1 + abs2(days.n) | `subject id` & `late day`) "
                       "+ (1 | `late day`/`subject id`)", renamed)
    _same_design(fast, slow, renamed.iloc[::9])
    assert fast.coef_names == ["(Intercept)", "np.log(days.n + 1)", "abs2(größe)"]
    assert fast.reterms[0].cnames == ["(Intercept)", "abs2(days.n)"]
    days = sleepstudy["days"].to_numpy(float)
    np.testing.assert_allclose(fast.X[:, 1:], np.column_stack(
        [np.log(days + 1), (1.5 * days) ** 2]), rtol=1e-15)
    np.testing.assert_array_equal(fast.reterms[0].z[:, 1], days ** 2)
    assert [t.group_name for t in fast.reterms] == [
        "subject id & late day", "late day", "late day & subject id"]
    assert fast.reterms[0].nlevels == renamed.groupby(["subject id", "late day"]).ngroups


def test_non_syntactic_names_in_expressions_show_in_backticks(renamed):
    d = build_design("`my y` ~ 1 + abs2(`late day` == 'late') + (1 | subj.id)", renamed)
    assert d.coef_names[1].startswith("abs2(`late day` == 'late')")


def test_unknown_dotted_name_is_named_whole(sleepstudy, renamed):
    with pytest.raises(ValueError, match="column 'days.x' not found in data"):
        build_design("`my y` ~ 1 + days.x + (1 | subj.id)", renamed)
    with pytest.raises(ValueError, match="column 'no such' not found in data"):
        build_design("`my y` ~ 1 + (1 | `no such`)", renamed)
    # a dotted name is one name in R, even where its first part is a column ...
    for formula in ("reaction ~ 1 + days.n + (1 | subj)", "reaction.n ~ 1 + (1 | subj)",
                    "reaction ~ 1 + I(days^2 + days.n) + (1 | subj)"):
        with pytest.raises(ValueError, match=r"column '(days|reaction)\.n' not found in data"):
            build_design(formula, sleepstudy)
    # ... while np.log and a method call on a column keep Python's meaning
    d = build_design("reaction ~ 1 + np.log(days.clip(1)) + (1 | subj)", sleepstudy)
    np.testing.assert_array_equal(d.X[:, 1], np.log(np.maximum(sleepstudy["days"], 1)))


def test_unterminated_backtick_is_a_parse_error(renamed):
    with pytest.raises(ValueError, match="^cannot parse formula.*backtick"):
        build_design("`my y ~ 1 + (1 | subj.id)", renamed)


# --- duplicate column names -----------------------------------------------------------------

def test_duplicate_columns_named(sleepstudy):
    data = pd.concat([sleepstudy.assign(g=sleepstudy["subj"]),
                      sleepstudy[["days", "subj"]]], axis=1)
    for formula, kwargs in [("reaction ~ 1 + days + (1 | g)", {}),
                            ("reaction ~ 1 + np.log(days + 1) + (1 | g)", {}),
                            ("reaction ~ 1 + offset(days) + (1 | g)", {}),
                            ("days ~ 1 + (1 | g)", {}),
                            ("reaction ~ 1 + (1 | g)", {"weights": "days"}),
                            ("reaction ~ 1 + (1 | subj)", {})]:
        with pytest.raises(ValueError, match=r"column '(days|subj)' appears 2 times in data"):
            build_design(formula, data, **kwargs)
    # a repeated column the model does not read is no obstacle
    assert build_design("reaction ~ 1 + (1 | g)", data).n == 180
    fit = build_design("reaction ~ 1 + days + (1 | subj)", sleepstudy)
    with pytest.raises(ValueError, match="column 'days' appears 2 times"):
        fit.fixed_matrix(data)
    with pytest.raises(ValueError, match="column 'subj' appears 2 times"):
        fit.reterms[0].new_codes(data)


# --- polars, pyarrow and other frames -----------------------------------------------------

def _frame(n=120, seed=4):
    rng = np.random.default_rng(seed)
    g = rng.choice(["b", "a", "c"], n)
    return pd.DataFrame({
        "y": rng.standard_normal(n), "x": rng.standard_normal(n),
        "k": rng.integers(0, 9, n), "s": g, "flag": rng.random(n) < 0.4,
        "grp": rng.choice([f"g{i:02d}" for i in range(11)], n),
        "h": rng.choice(["u", "v", "w"], n), "t": rng.integers(1, 5, n),
    })


FRAME_FORMULA = "y ~ 1 + x * s + flag + k + offset(log(t)) + (1 + x | grp) + (1 | grp & h)"


def _converter(kind):
    if kind == "pyarrow":
        import pyarrow as pa
        return lambda d: pa.Table.from_pandas(d, preserve_index=False)
    import polars as pl
    if kind == "polars-lazy":
        return lambda d: pl.from_pandas(d).lazy()
    return pl.from_pandas


@pytest.mark.parametrize("kind", ["polars", "polars-lazy", "pyarrow"])
def test_polars_and_pyarrow_frames_match_pandas(kind):
    convert = _converter(kind)
    data = _frame()
    ref = build_design(FRAME_FORMULA, data, contrasts={"s": EffectsCoding()})
    d = build_design(FRAME_FORMULA, convert(data), contrasts={"s": EffectsCoding()})
    new = data.iloc[3:17].reset_index(drop=True)
    _same_design(ref, d, new)
    for other in (convert(new), dict(new)):
        _same(d.fixed_matrix(other), ref.fixed_matrix(new))
        _same(d.offset_for(other), np.log(new["t"].to_numpy(float)))
        for t, tr in zip(d.reterms, ref.reterms):
            for a, b in zip(t.new_codes(other), tr.new_codes(new)):
                _same(a, b)


def test_polars_levels():
    import polars as pl
    g = ["b", "a", "c", "a", "b", "c", "a", "b"]
    data = pl.DataFrame({"y": np.arange(8.0), "x": np.arange(8.0) ** 2, "grp": list("pqpqpqpq"),
                         "s": g, "cat": pl.Series(g, dtype=pl.Categorical),
                         "enum": pl.Series(g, dtype=pl.Enum(["c", "b", "a"])),
                         "flag": [True, False] * 4})
    assert build_design("y ~ 1 + s + (1 | grp)", data).coef_names[1:] == ["s: b", "s: c"]
    # polars sorts a Categorical as strings; an Enum keeps its declared order
    assert build_design("y ~ 1 + cat + (1 | grp)", data).coef_names[1:] == ["cat: b", "cat: c"]
    d = build_design("y ~ 1 + enum + (1 | enum)", data)
    assert d.coef_names[1:] == ["enum: b", "enum: a"] and d.reterms[0].levels == ["c", "b", "a"]
    np.testing.assert_array_equal(d.X[:, 2], [c == "a" for c in g])
    d = build_design("y ~ 1 + flag + (1 | grp)", data)
    assert d.coef_names[1:] == ["flag: true"]
    np.testing.assert_array_equal(d.X[:, 1], [1, 0] * 4)


def test_polars_nulls_drop_rows_as_pandas_missing_values():
    data = _frame()
    data["x"] = data["x"].where(data.index != 5)
    data["s"] = data["s"].where(data.index != 8)
    polars = _converter("polars")(data)
    assert polars["x"].null_count() + polars["x"].is_nan().sum() >= 1
    with pytest.warns(UserWarning, match=r"dropped 2 of 120 .*\['x', 's'\]"):
        d = build_design("y ~ 1 + x + s + (1 | grp)", polars)
    np.testing.assert_array_equal(d.rows_used, np.setdiff1d(np.arange(120), [5, 8]))


@pytest.mark.parametrize("data", [np.zeros((3, 2)), [[1, 2]], pd.Series([1.0, 2.0]), "y"])
def test_other_data_is_a_type_error(data):
    with pytest.raises(TypeError, match=type(data).__name__):
        build_design("y ~ 1 + (1 | g)", data)


def test_dict_of_columns_still_works():
    data = _frame()
    _same_design(build_design("y ~ 1 + x + (1 | grp)", dict(data)),
                 build_design("y ~ 1 + x + (1 | grp)", data))


# --- pickling ---------------------------------------------------------------------------------

PICKLE_CASES = [
    ("use ~ 1 + age * urban + livch + (1 + age | dist)", {}, FastMatrix),
    ("use ~ 1 + np.log(age + 40) + I(age**2) + center(age) + C(urban, Sum) + livch "
     "+ (1 + center(age) | dist) + offset(np.sqrt(age + 40))", {}, _ModelMatrix),
    ("use ~ 1 + age * urban + livch + (1 + urban | dist)",
     {"contrasts": {"urban": patsy.Sum(), "livch": patsy.Treatment(reference="2")}},
     _ModelMatrix),
    ("use ~ 1 + age + urban + (1 | dist)",
     {"contrasts": {"urban": patsy.ContrastMatrix(np.array([[1.0], [-1.0]]), ["x"])}},
     _ModelMatrix),
    ("use ~ 1 + age + urban + livch + (1 | dist)",
     {"contrasts": {"urban": HelmertCoding(), "livch": EffectsCoding(base="2")}}, FastMatrix),
]


@pytest.mark.parametrize("case", range(len(PICKLE_CASES)))
def test_pickle_and_deepcopy_rebuild_the_same_matrices(contra, case):
    formula, kwargs, kind = PICKLE_CASES[case]
    d = build_design(formula, contra, **kwargs)
    assert isinstance(d._fixed, kind)
    new = contra.iloc[::37].reset_index(drop=True)
    for other in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
        assert type(other._fixed) is type(d._fixed)
        _same_design(d, other, new)
        for term in other.reterms:
            # a ReTerm on its own travels too
            back = pickle.loads(pickle.dumps(term))
            for a, b in zip(back.new_codes(new), term.new_codes(new)):
                _same(a, b)


def test_unpickled_center_keeps_the_fitting_mean(sleepstudy):
    d = pickle.loads(pickle.dumps(build_design("reaction ~ 1 + center(days) + (1 | subj)",
                                               sleepstudy)))
    new = pd.DataFrame({"days": [0, 9], "subj": ["S308", "S308"]})
    mean = sleepstudy["days"].to_numpy(float).mean()
    np.testing.assert_allclose(d.fixed_matrix(new)[:, 1], [0 - mean, 9 - mean], rtol=1e-15)


def test_pickled_design_with_binomial_counts(cbpp):
    d = build_design("cbind(incid, hsz - incid) ~ 1 + period + offset(log(hsz)) + (1 | herd)",
                     cbpp)
    back = pickle.loads(pickle.dumps(d))
    assert back.binomial_counts
    _same_design(d, back, cbpp.iloc[::4])

"""Formula layer: parsing, the response, X, random-effects terms, missing data, errors.

Expected numbers come from pandas or from algebra on the data columns, never from the
code under test.
"""
import json
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest

import mixedmodels
from mixedmodels.formula import (
    DummyCoding,
    EffectsCoding,
    HelmertCoding,
    build_design,
    parse_formula,
)

REFERENCE = pathlib.Path(__file__).resolve().parent / "reference" / "lme4_public.json"


@pytest.fixture(scope="module")
def sleepstudy():
    return mixedmodels.dataset("sleepstudy")


@pytest.fixture(scope="module")
def contra():
    data = mixedmodels.dataset("contra")
    data["children"] = data["livch"] != "0"
    return data


GM2 = "use ~ 1 + age * children + abs2(age) + children + urban + (1 | dist)"
GM2_CONTRASTS = {"urban": HelmertCoding(), "children": EffectsCoding()}


# --- parse_formula ---------------------------------------------------------------

def test_parse_splits_fixed_and_random():
    p = parse_formula("reaction ~ 1 + days + (1 + days | subj)")
    assert p.response == "reaction"
    assert p.fixed == "1 + days"
    assert [(t.expr, t.grouping, t.zerocorr) for t in p.random] == [
        ("1 + days", ("subj",), False)]


def test_parse_random_terms_anywhere_and_intercept_only_fixed():
    p = parse_formula("y ~ (1 | g) + x + (0 + x || h)")
    assert p.fixed == "x"
    assert [(t.expr, t.group_name, t.zerocorr) for t in p.random] == [
        ("1", "g", False), ("0 + x", "h", True)]
    assert parse_formula("y ~ (1 | g)").fixed == "1"


def test_parse_nesting_and_interaction():
    p = parse_formula("y ~ 1 + (1 | a/b) + (1 | c:d) + (1 | c & d)")
    assert [t.group_name for t in p.random] == ["a", "a & b", "c & d", "c & d"]


@pytest.mark.parametrize("formula", [
    "reaction days",                     # no ~
    "reaction ~ 1 + (1 | subj",          # unbalanced
    "reaction ~ 1 + (1 | subj))",
    "reaction ~ 1 + ( | subj)",          # empty term
    "reaction ~ 1 + (1 | )",             # no grouping expression
    "reaction ~ days | subj",            # bar outside a term
    "reaction ~ 1 + (1 | subj days)",    # garbage grouping
    "reaction ~ 1 + + days",
    "~ days",
    "reaction ~ ",
])
def test_parse_errors(formula, sleepstudy):
    with pytest.raises(ValueError, match="^cannot parse formula"):
        parse_formula(formula)
    with pytest.raises(ValueError, match="^cannot parse formula"):
        build_design(formula, sleepstudy)


def test_patsy_syntax_error_is_a_parse_error(sleepstudy):
    with pytest.raises(ValueError, match="^cannot parse formula"):
        build_design("reaction ~ days +* days + (1 | subj)", sleepstudy)


# --- sleepstudy: shapes, codes, Z ---------------------------------------------------

def test_sleepstudy_shapes_and_names(sleepstudy):
    d = build_design("reaction ~ 1 + days + (1 + days | subj)", sleepstudy)
    assert d.X.shape == (180, 2) and d.X.dtype == np.float64 and d.X.flags.c_contiguous
    assert d.coef_names == ["(Intercept)", "days"]
    assert d.dropped == [] and d.y_levels is None and d.n == 180
    np.testing.assert_array_equal(d.X[:, 1], sleepstudy["days"].to_numpy(float))
    np.testing.assert_array_equal(d.y, sleepstudy["reaction"].to_numpy())
    (term,) = d.reterms
    assert term.group_name == "subj" and term.nlevels == 18 and term.ncols == 2
    assert term.z.shape == (180, 2) and term.z.flags.c_contiguous
    assert term.cnames == ["(Intercept)", "days"] and not term.zerocorr
    assert term.levels == sorted(sleepstudy["subj"].unique())
    assert term.codes.dtype == np.int32
    assert [term.levels[c] for c in term.codes] == sleepstudy["subj"].tolist()
    np.testing.assert_array_equal(term.z[:, 0], 1.0)
    np.testing.assert_array_equal(term.z[:, 1], sleepstudy["days"].to_numpy(float))
    np.testing.assert_array_equal(d.rows_used, np.arange(180))
    assert d.rows_used.dtype == np.int64
    assert d.weights is None and d.offset is None


def test_terms_on_one_factor_stay_separate(sleepstudy):
    d = build_design("reaction ~ 1 + days + (1 | subj) + (0 + days | subj)", sleepstudy)
    assert [(t.group_name, t.cnames) for t in d.reterms] == [
        ("subj", ["(Intercept)"]), ("subj", ["days"])]


def test_double_bar_is_one_uncorrelated_term(sleepstudy):
    d = build_design("reaction ~ 1 + days + (1 + days || subj)", sleepstudy)
    (term,) = d.reterms
    assert term.zerocorr and term.cnames == ["(Intercept)", "days"]


@pytest.mark.parametrize("expr, cnames", [
    ("days", ["(Intercept)", "days"]),       # intercept implied, as in lme4
    ("0 + days", ["days"]),
    ("-1 + days", ["days"]),
    ("1", ["(Intercept)"]),
])
def test_random_term_intercepts(sleepstudy, expr, cnames):
    d = build_design(f"reaction ~ 1 + days + ({expr} | subj)", sleepstudy)
    assert d.reterms[0].cnames == cnames


@pytest.mark.parametrize("convert", [
    lambda s: s.str[1:].astype(int),            # int
    lambda s: s.str[1:].astype(float),          # float
])
def test_numeric_grouping_is_categorical(sleepstudy, convert):
    data = sleepstudy.assign(subj=convert(sleepstudy["subj"]))
    d = build_design("reaction ~ 1 + days + (1 | subj)", data)
    assert d.reterms[0].nlevels == 18
    assert d.reterms[0].levels == [str(v) for v in sorted(data["subj"].astype(int).unique())]


def test_bool_grouping(sleepstudy):
    data = sleepstudy.assign(late=sleepstudy["days"] > 4)
    d = build_design("reaction ~ 1 + (1 | late)", data)
    assert d.reterms[0].levels == ["false", "true"]
    np.testing.assert_array_equal(d.reterms[0].codes, (data["days"] > 4).astype(int))


# --- contra: the tutorial models -----------------------------------------------------

def test_gm1_matrix(contra):
    d = build_design("use ~ 1 + age + abs2(age) + urban + livch + (1 | dist)", contra,
                     contrasts={"urban": HelmertCoding(), "livch": DummyCoding()})
    assert d.X.shape == (1934, 7)
    assert d.coef_names == ["(Intercept)", "age", "abs2(age)", "urban: Y",
                            "livch: 1", "livch: 2", "livch: 3+"]
    age = contra["age"].to_numpy()
    np.testing.assert_allclose(d.X[:, 2], age ** 2)
    np.testing.assert_array_equal(d.X[:, 3], np.where(contra["urban"] == "Y", 1.0, -1.0))
    for j, level in zip((4, 5, 6), ("1", "2", "3+")):
        np.testing.assert_array_equal(d.X[:, j], (contra["livch"] == level).astype(float))


def test_gm2_names_in_tutorial_order(contra):
    d = build_design(GM2, contra, contrasts=GM2_CONTRASTS)
    assert d.coef_names == ["(Intercept)", "age", "children: true", "abs2(age)",
                            "urban: Y", "age & children: true"]
    children = np.where(contra["children"], 1.0, -1.0)
    np.testing.assert_array_equal(d.X[:, 2], children)
    np.testing.assert_allclose(d.X[:, 5], contra["age"].to_numpy() * children)


def test_bernoulli_response(contra):
    d = build_design(GM2, contra, contrasts=GM2_CONTRASTS)
    assert d.y_levels == ("N", "Y") and d.response_name == "use"
    np.testing.assert_array_equal(d.y, (contra["use"] == "Y").astype(float))


def test_bool_response(contra):
    d = build_design("children ~ 1 + age + (1 | dist)", contra)
    assert d.y_levels == ("false", "true")
    np.testing.assert_array_equal(d.y, contra["children"].astype(float))


def test_response_with_three_levels_is_an_error(contra):
    with pytest.raises(ValueError, match="'livch'.*4 level"):
        build_design("livch ~ 1 + age + (1 | dist)", contra)


def test_interaction_grouping(contra):
    expected = contra.groupby(["urban", "dist"]).ngroups
    for group in ("urban & dist", "urban:dist"):
        d = build_design(f"use ~ 1 + age + (1 | {group})", contra)
        (term,) = d.reterms
        assert term.group_name == "urban & dist" and term.nlevels == expected == 102
        labels = (contra["urban"] + " & " + contra["dist"]).tolist()
        assert [term.levels[c] for c in term.codes] == labels
        assert term.levels == sorted(set(labels))


def test_categorical_in_random_term(contra):
    d = build_design("use ~ 1 + age + (1 + urban | dist) + (0 + livch | dist)", contra)
    with_int, full = d.reterms
    assert with_int.cnames == ["(Intercept)", "urban: Y"]
    np.testing.assert_array_equal(with_int.z[:, 1], (contra["urban"] == "Y").astype(float))
    assert full.cnames == ["livch: 0", "livch: 1", "livch: 2", "livch: 3+"]
    np.testing.assert_array_equal(full.z.sum(axis=1), 1.0)
    np.testing.assert_array_equal(full.z[:, 3], (contra["livch"] == "3+").astype(float))


# --- other data sets ---------------------------------------------------------------

def test_pastes_nested():
    pastes = mixedmodels.dataset("pastes")
    d = build_design("strength ~ 1 + (1 | batch/cask)", pastes)
    assert [t.group_name for t in d.reterms] == ["batch", "batch & cask"]
    assert [t.nlevels for t in d.reterms] == [
        pastes["batch"].nunique(), pastes.groupby(["batch", "cask"]).ngroups] == [10, 30]


def test_penicillin_crossed():
    pen = mixedmodels.dataset("penicillin")
    d = build_design("diameter ~ 1 + (1 | plate) + (1 | sample)", pen)
    assert [(t.group_name, t.nlevels) for t in d.reterms] == [
        ("plate", pen["plate"].nunique()), ("sample", pen["sample"].nunique())]
    assert d.X.shape == (144, 1)


def test_cbpp_proportion_and_weights():
    cbpp = mixedmodels.dataset("cbpp")
    d = build_design("incid / hsz ~ 1 + period + (1 | herd)", cbpp, weights="hsz")
    assert d.response_name == "incid / hsz"
    np.testing.assert_allclose(d.y, cbpp["incid"] / cbpp["hsz"])
    np.testing.assert_array_equal(d.weights, cbpp["hsz"].to_numpy(float))
    assert d.coef_names == ["(Intercept)", "period: 2", "period: 3", "period: 4"]


def test_keyword_column_name():
    dyes = mixedmodels.dataset("dyestuff")
    d = build_design("yield ~ 1 + (1 | batch)", dyes)
    np.testing.assert_array_equal(d.y, dyes["yield"].to_numpy(float))
    d = build_design("np.log(yield) ~ 1 + (1 | batch)", dyes)
    np.testing.assert_allclose(d.y, np.log(dyes["yield"].to_numpy(float)))


def test_insteval_crossed_levels():
    ie = mixedmodels.dataset("insteval")
    d = build_design("y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)", ie)
    assert d.X.shape == (len(ie), 2) and d.coef_names == ["(Intercept)", "service: Y"]
    assert [t.nlevels for t in d.reterms] == [ie[c].nunique() for c in ("s", "d", "dept")]


def test_offset_array_and_column(sleepstudy):
    off = np.linspace(0, 1, 180)
    d = build_design("reaction ~ 1 + days + (1 | subj)", sleepstudy, offset=off)
    np.testing.assert_array_equal(d.offset, off)
    d = build_design("reaction ~ 1 + (1 | subj)", sleepstudy, offset="days")
    np.testing.assert_array_equal(d.offset, sleepstudy["days"].to_numpy(float))


def test_numeric_transforms(sleepstudy):
    d = build_design("reaction ~ 1 + np.log(days + 1) + abs2(days) + (1 | subj)", sleepstudy)
    days = sleepstudy["days"].to_numpy(float)
    assert d.coef_names == ["(Intercept)", "np.log(days + 1)", "abs2(days)"]
    np.testing.assert_allclose(d.X[:, 1:], np.column_stack([np.log(days + 1), days ** 2]))


def test_term_order_is_by_degree_like_r(contra):
    # patsy alone would put the categorical `urban` before `age`.
    d = build_design("use ~ 1 + age + urban + age:urban + (1 | dist)", contra)
    assert d.coef_names == ["(Intercept)", "age", "urban: Y", "age & urban: Y"]


def _r_name(name, contrasts):
    parts = []
    for part in name.split(" & "):
        if part.startswith("abs2("):
            parts.append(f"I({part[5:-1]}^2)")
        elif ": " in part:
            factor, level = part.split(": ", 1)
            # R names Helmert/sum-coded columns by number; these factors have 2 levels.
            dummy = contrasts.get(factor, "DummyCoding") == "DummyCoding"
            parts.append(factor + (level if dummy else "1"))
        else:
            parts.append(part)
    return ":".join(parts)


def test_column_order_matches_lme4():
    codings = {"HelmertCoding": HelmertCoding(), "EffectsCoding": EffectsCoding(),
               "DummyCoding": DummyCoding()}
    for model in json.loads(REFERENCE.read_text()):
        if model["data"] == "insteval":
            continue  # big; its order is covered by test_insteval_crossed_levels
        data = mixedmodels.dataset(model["data"])
        if model["data"] == "contra":
            data["children"] = data["livch"] != "0"
        if model["data"] == "grouseticks":
            data["ch"] = data["height"] - data["height"].mean()
        contrasts = model["contrasts_py"] or {}
        d = build_design(model["formula"], data,
                         contrasts={k: codings[v] for k, v in contrasts.items()},
                         weights=model["weights"])
        expected = model["lme4"]["coef_names"]
        expected = [expected] if isinstance(expected, str) else expected
        assert [_r_name(n, contrasts) for n in d.coef_names] == expected, model["name"]
        per_group = {t.group_name: t.nlevels for t in d.reterms}
        assert sorted(per_group.values()) == sorted(
            model["lme4"]["ngroups"].values()), model["name"]


# --- new data ------------------------------------------------------------------------

def test_fixed_matrix_on_subset_with_some_levels(contra):
    d = build_design(GM2, contra, contrasts=GM2_CONTRASTS)
    rows = np.flatnonzero((contra["urban"] == "Y") & contra["children"])[:7]
    new = contra.iloc[rows].reset_index(drop=True)
    np.testing.assert_array_equal(d.fixed_matrix(new), d.X[rows])


def test_fixed_matrix_unseen_level_is_an_error(contra):
    d = build_design("use ~ 1 + urban + (1 | dist)", contra)
    new = contra.iloc[:2].assign(urban=["Y", "Q"])
    with pytest.raises(ValueError, match="'urban'.*not seen"):
        d.fixed_matrix(new)


def test_new_codes(contra):
    d = build_design("use ~ 1 + age + (1 + age | dist) + (1 | urban & dist)", contra)
    new = pd.DataFrame({"dist": ["D01", "D99", "D03"], "urban": ["Y", "N", "Y"],
                        "age": [1.0, 2.0, 3.0]})
    codes, z = d.reterms[0].new_codes(new)
    assert codes.tolist() == [d.reterms[0].levels.index("D01"), -1,
                              d.reterms[0].levels.index("D03")]
    np.testing.assert_array_equal(z, [[1, 1], [1, 2], [1, 3]])
    seen = set(contra["urban"] + " & " + contra["dist"])
    codes, _ = d.reterms[1].new_codes(new)
    expected = [d.reterms[1].levels.index(f"{u} & {g}") if f"{u} & {g}" in seen else -1
                for u, g in zip(new["urban"], new["dist"])]
    assert codes.tolist() == expected and -1 in expected


# --- rank deficiency -------------------------------------------------------------------

def test_rank_deficient_columns_dropped(sleepstudy):
    data = sleepstudy.assign(x2=2 * sleepstudy["days"] + 1)
    with pytest.warns(UserWarning, match=r"rank deficient; dropping aliased columns: \['x2'\]"):
        d = build_design("reaction ~ 1 + days + x2 + (1 | subj)", data)
    assert d.coef_names == ["(Intercept)", "days"] and d.dropped == ["x2"]
    assert d.X.shape == (180, 2)
    np.testing.assert_array_equal(d.fixed_matrix(data.iloc[:3]), d.X[:3])


def test_all_zero_column_is_aliased(sleepstudy):
    data = sleepstudy.assign(z=0.0)
    with pytest.warns(UserWarning, match="'z'"):
        d = build_design("reaction ~ 1 + z + days + (1 | subj)", data)
    assert d.dropped == ["z"]


# --- missing data ---------------------------------------------------------------------

@pytest.fixture()
def holey(sleepstudy):
    data = sleepstudy.copy()
    data.loc[[3, 7], "days"] = np.nan
    data.loc[10, "subj"] = None
    data.loc[11, "reaction"] = np.inf
    return data


def test_missing_rows_dropped_with_warning(holey):
    with pytest.warns(UserWarning, match=r"dropped 4 .*\['reaction', 'days', 'subj'\]"):
        d = build_design("reaction ~ 1 + days + (1 + days | subj)", holey)
    expected = np.setdiff1d(np.arange(180), [3, 7, 10, 11])
    np.testing.assert_array_equal(d.rows_used, expected)
    assert d.n == 176 and d.X.shape == (176, 2) and d.reterms[0].z.shape == (176, 2)
    np.testing.assert_array_equal(d.y, holey["reaction"].to_numpy()[expected])


def test_missing_rows_raise(holey):
    with pytest.raises(ValueError, match=r"4 row.*\['reaction', 'days', 'subj'\]"):
        build_design("reaction ~ 1 + days + (1 | subj)", holey, na_action="raise")


def test_unused_columns_do_not_drop_rows(sleepstudy):
    data = sleepstudy.assign(other=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = build_design("reaction ~ 1 + days + (1 | subj)", data)
    assert d.n == 180


def test_missing_weights_and_offset_drop_rows(sleepstudy):
    w = np.ones(180)
    w[5] = np.nan
    off = np.zeros(180)
    off[6] = np.inf
    with pytest.warns(UserWarning, match=r"dropped 2 .*\['weights', 'offset'\]"):
        d = build_design("reaction ~ 1 + days + (1 | subj)", sleepstudy, weights=w, offset=off)
    assert 5 not in d.rows_used and 6 not in d.rows_used and d.n == 178


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("formula, kwargs", [
    ("reaction ~ 1 + foo + (1 | subj)", {}),
    ("reaction ~ 1 + np.log(foo) + (1 | subj)", {}),
    ("reaction ~ 1 + (1 + foo | subj)", {}),
    ("reaction ~ 1 + (1 | foo)", {}),
    ("reaction ~ 1 + (1 | subj/foo)", {}),
    ("foo ~ 1 + (1 | subj)", {}),
    ("reaction ~ 1 + (1 | subj)", {"weights": "foo"}),
    ("reaction ~ 1 + (1 | subj)", {"offset": "foo"}),
])
def test_missing_column(sleepstudy, formula, kwargs):
    with pytest.raises(ValueError, match="column 'foo' not found in data"):
        build_design(formula, sleepstudy, **kwargs)


def test_single_level_grouping(sleepstudy):
    data = sleepstudy.assign(g="only")
    with pytest.raises(ValueError, match="grouping factor 'g' has a single level"):
        build_design("reaction ~ 1 + days + (1 | g)", data)


@pytest.mark.parametrize("bad", [-1.0, np.inf])
def test_bad_weights(sleepstudy, bad):
    w = np.ones(180)
    w[[4, 9]] = bad
    with pytest.raises(ValueError, match=r"weights must be finite and non-negative; 2 .*rows \[4, 9\]"):
        build_design("reaction ~ 1 + days + (1 | subj)", sleepstudy, weights=w)


def test_bad_weights_column_named(sleepstudy):
    data = sleepstudy.assign(w=-sleepstudy["days"] - 1)
    with pytest.raises(ValueError, match="weights column 'w'"):
        build_design("reaction ~ 1 + days + (1 | subj)", data, weights="w")


def test_weights_wrong_length(sleepstudy):
    with pytest.raises(ValueError, match="weights must have one value per row"):
        build_design("reaction ~ 1 + (1 | subj)", sleepstudy, weights=np.ones(3))


def test_bad_na_action(sleepstudy):
    with pytest.raises(ValueError, match="na_action"):
        build_design("reaction ~ 1 + (1 | subj)", sleepstudy, na_action="omit")


@pytest.mark.filterwarnings("ignore:divide by zero")
def test_non_finite_transform_named(sleepstudy):
    with pytest.raises(ValueError, match=r"non-finite values in column\(s\) \['np.log\(days\)'\]"):
        build_design("reaction ~ 1 + np.log(days) + (1 | subj)", sleepstudy)

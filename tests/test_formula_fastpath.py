"""The NumPy fast path of the formula layer against its patsy path, bit for bit.

``build_design`` builds X and the random-term columns directly with NumPy when a
formula part is in the fast path's grammar, and with patsy otherwise.  The private
``_build_design(..., fast=False)`` forces patsy everywhere; every design here is
built both ways and must agree exactly: the same bytes in y, X, Z, weights and
offset, the same names, levels, codes, dropped columns and rows, and the same
matrices and codes for new data.
"""
import itertools
import random
import warnings

import numpy as np
import pandas as pd
import patsy
import pytest

import mixedmodels
from mixedmodels.formula import DummyCoding, EffectsCoding, HelmertCoding, build_design
from mixedmodels.formula._design import _build_design
from mixedmodels.formula._fast import FastMatrix, fast_terms

CODINGS = {"HelmertCoding": HelmertCoding(), "EffectsCoding": EffectsCoding(),
           "DummyCoding": DummyCoding()}


def _data(name):
    data = mixedmodels.dataset(name)
    if name == "contra":
        data["children"] = data["livch"] != "0"
    if name == "grouseticks":
        data["ch"] = data["height"] - data["height"].mean()
    return data


@pytest.fixture(scope="module")
def contra():
    return _data("contra")


@pytest.fixture(scope="module")
def sleepstudy():
    return _data("sleepstudy")


def _same_array(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), what


def _both(formula, data, **kwargs):
    with warnings.catch_warnings(record=True) as fast_warnings:
        warnings.simplefilter("always")
        fast = _build_design(formula, data, fast=True, **kwargs)
    with warnings.catch_warnings(record=True) as slow_warnings:
        warnings.simplefilter("always")
        slow = _build_design(formula, data, fast=False, **kwargs)
    assert [str(w.message) for w in fast_warnings] == [str(w.message) for w in slow_warnings]
    return fast, slow


def assert_same_design(fast, slow, newdata=None):
    """Every observable part of two designs is identical."""
    assert fast.coef_names == slow.coef_names
    assert fast.dropped == slow.dropped
    assert fast.y_levels == slow.y_levels and fast.n == slow.n
    for name in ("y", "X", "weights", "offset", "rows_used"):
        _same_array(getattr(fast, name), getattr(slow, name), name)
    assert fast.X.flags.c_contiguous
    assert len(fast.reterms) == len(slow.reterms)
    for tf, ts in zip(fast.reterms, slow.reterms):
        assert (tf.group_name, tf.levels, tf.cnames, tf.zerocorr) == (
            ts.group_name, ts.levels, ts.cnames, ts.zerocorr)
        _same_array(tf.codes, ts.codes, f"codes of {tf.group_name}")
        _same_array(tf.z, ts.z, f"z of {tf.group_name}")
        assert tf.z.flags.c_contiguous
    if newdata is not None:
        _same_array(fast.fixed_matrix(newdata), slow.fixed_matrix(newdata), "fixed_matrix")
        for tf, ts in zip(fast.reterms, slow.reterms):
            cf, zf = tf.new_codes(newdata)
            cs, zs = ts.new_codes(newdata)
            _same_array(cf, cs, "new codes")
            _same_array(zf, zs, "new z")


def _uses_fast_path(design):
    return isinstance(design._fixed, FastMatrix)


# --- every reference model -----------------------------------------------------------

def test_every_reference_model(lme4_ref):
    for model in lme4_ref.values():
        data = _data(model["data"])
        contrasts = {k: CODINGS[v] for k, v in (model["contrasts_py"] or {}).items()}
        fast, slow = _both(model["formula"], data, contrasts=contrasts,
                           weights=model["weights"])
        rows = np.arange(0, len(data), max(1, len(data) // 40))
        assert_same_design(fast, slow, data.iloc[rows].reset_index(drop=True))
        assert _uses_fast_path(fast), model["name"]
        assert all(isinstance(t._matrix, FastMatrix) for t in fast.reterms), model["name"]
        assert not _uses_fast_path(slow)


# --- more formulas ----------------------------------------------------------------------

CONTRA_FORMULAS = [
    "use ~ 1 + age * urban + (1 | dist)",
    "use ~ 1 + urban * age + (1 | dist)",
    "use ~ 1 + age + age:livch + (1 | dist)",                # numeric x factor, no main effect
    "use ~ 0 + livch + age + (1 | dist)",
    "use ~ livch - 1 + (1 | dist)",
    "use ~ -1 + livch:urban + (1 | dist)",
    "use ~ 0 + livch:urban + age + (1 | dist)",
    "use ~ 1 + livch * urban + (1 | dist)",
    "use ~ 1 + livch:urban + (1 | dist)",                    # factor x factor, no margins
    "use ~ 1 + urban + livch:urban + (1 | dist)",
    "use ~ 1 + livch * urban * children + (1 | dist)",
    "use ~ 1 + age * livch * urban + (1 | dist)",
    "use ~ 1 + abs2(age) * urban + age:abs2(age) + (1 | dist)",
    "use ~ 1 + urban:livch + livch:urban + livch + (1 | dist)",  # a repeated term
    "use ~ age + 1 + urban + 0 + 1 + (1 | dist)",            # intercept switched off and on
    "use ~ 1 + age * children + abs2(age) + children + urban + (1 | urban & dist)",
    "use ~ 1 + age + (1 + urban | dist) + (0 + livch | dist)",
    "use ~ 1 + age + (1 + age * urban || dist) + (livch | urban)",
    "use ~ 1 + age + (0 + urban:livch | dist)",
    "use ~ 1 + age + (1 + age + abs2(age) | dist/urban)",
    "children ~ 1 + age * livch + (1 | dist)",
]

CONTRA_CODINGS = [
    {},
    {"urban": HelmertCoding(), "livch": DummyCoding()},
    {"urban": EffectsCoding(base="Y"), "livch": HelmertCoding(base="2"),
     "children": EffectsCoding()},
    {"livch": EffectsCoding(), "urban": DummyCoding(base="Y")},
    {"livch": DummyCoding(levels=["3+", "2", "1", "0"]), "children": HelmertCoding()},
]


@pytest.mark.parametrize("formula", CONTRA_FORMULAS)
@pytest.mark.parametrize("coding", range(len(CONTRA_CODINGS)))
def test_contra_formulas(contra, formula, coding):
    fast, slow = _both(formula, contra, contrasts=CONTRA_CODINGS[coding])
    assert_same_design(fast, slow, contra.iloc[::97].reset_index(drop=True))
    assert _uses_fast_path(fast)


def _mixed_frame(n=300, seed=7):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "y": rng.standard_normal(n),
        "x": rng.standard_normal(n) * 3.7,
        "k": rng.integers(-5, 6, n),                       # int column
        "f32": rng.standard_normal(n).astype(np.float32),
        "big": rng.standard_normal(n) * 1e5,
        "a": rng.choice(["p", "q", "r"], n),
        "b": pd.Categorical(rng.choice(["z", "m", "a", "k"], n),
                            categories=["z", "m", "a", "k", "unused"]),
        "flag": rng.random(n) < 0.4,
        "num_g": rng.integers(1, 9, n),
        "g": rng.choice([f"g{i}" for i in range(12)], n),
        "h": rng.choice([f"h{i}" for i in range(5)], n),
        "w": rng.random(n) + 0.5,
    })


MIXED_FORMULAS = [
    "y ~ 1 + x + k + f32 + (1 | g)",
    "y ~ 1 + x * k * f32 + (1 | g)",                         # products of three numerics
    "y ~ 1 + abs2(k) + abs2(f32) + abs2(big) + x:big + (1 | g)",
    "y ~ 1 + a * b * flag + (1 | g)",
    "y ~ 1 + x:a:b + (1 | g)",
    "y ~ 1 + b:x:a + a + (1 | g)",
    "y ~ 1 + a * x + b * k + (1 + x | g) + (1 | h)",
    "y ~ 0 + a:b + flag:x + (1 | g & h)",
    "y ~ 1 + num_g * x + (1 | g)",                            # numeric made categorical below
    "y ~ 1 + flag * abs2(x) + (0 + a | g) + (1 | h/g)",
]

MIXED_CODINGS = [
    {},
    {"num_g": EffectsCoding(), "a": HelmertCoding(base="q"), "b": EffectsCoding(base="k")},
    {"flag": HelmertCoding(), "b": DummyCoding(base="a")},
]


@pytest.mark.parametrize("formula", MIXED_FORMULAS)
@pytest.mark.parametrize("coding", range(len(MIXED_CODINGS)))
def test_mixed_column_types(formula, coding):
    data = _mixed_frame()
    fast, slow = _both(formula, data, contrasts=MIXED_CODINGS[coding], weights="w")
    assert_same_design(fast, slow, data.iloc[5:40].reset_index(drop=True))
    assert _uses_fast_path(fast)


def test_numeric_column_with_a_coding_is_categorical():
    data = _mixed_frame()
    fast, slow = _both("y ~ 1 + num_g * x + (1 | g)", data, contrasts={"num_g": DummyCoding()})
    assert_same_design(fast, slow)
    assert fast.coef_names[1:3] == ["num_g: 2", "num_g: 3"]


def test_tall_design_uses_cell_sums_and_agrees():
    # more rows than the threshold at which X'X comes from per-cell sums
    data = pd.concat([_mixed_frame(seed=s) for s in range(80)], ignore_index=True)
    for formula in ("y ~ 1 + a * b + x * flag + abs2(x) + (1 | g)",
                    "y ~ 1 + x + (1 + x | g) + (1 | h)"):
        fast, slow = _both(formula, data)
        assert fast.n >= 20000
        assert_same_design(fast, slow)


def test_aliased_columns_dropped_alike(sleepstudy):
    data = sleepstudy.assign(x2=2 * sleepstudy["days"] + 1, zero=0.0,
                             half=(sleepstudy["days"] > 4).map({True: "hi", False: "lo"}))
    for formula in ("reaction ~ 1 + days + x2 + (1 | subj)",
                    "reaction ~ 1 + zero + days + (1 | subj)",
                    "reaction ~ 1 + subj + half + (1 | subj)"):
        fast, slow = _both(formula, data)
        assert_same_design(fast, slow, data.iloc[:7])
    fast, _ = _both("reaction ~ 1 + days + x2 + (1 | subj)", data)
    assert fast.dropped == ["x2"]


def test_nested_aliasing_in_a_tall_design():
    data = pd.concat([_mixed_frame(seed=s) for s in range(80)], ignore_index=True)
    data["a2"] = data["a"]                      # a copy of a: all its columns alias
    fast, slow = _both("y ~ 1 + a + a2 + x + (1 | g)", data)
    assert_same_design(fast, slow)
    assert fast.dropped == ["a2: q", "a2: r"]


# --- missing values, errors, fallbacks -------------------------------------------------

def test_missing_values_dropped_alike(contra):
    data = contra.copy()
    data.loc[[3, 50], "age"] = np.nan
    data.loc[7, "urban"] = None
    data.loc[9, "livch"] = np.nan
    data.loc[11, "dist"] = None
    data.loc[13, "age"] = np.inf
    fast, slow = _both("use ~ 1 + age * urban + livch + (1 | dist)", data,
                       contrasts={"urban": HelmertCoding()})
    assert fast.n == len(data) - 6
    assert_same_design(fast, slow)
    with pytest.raises(ValueError, match=r"6 row\(s\).*\['age', 'urban', 'livch', 'dist'\]"):
        build_design("use ~ 1 + age * urban + livch + (1 | dist)", data, na_action="raise")


def test_dropping_rows_drops_unused_levels_alike(contra):
    data = contra.copy()
    data.loc[data["livch"] == "2", "age"] = np.nan
    fast, slow = _both("use ~ 1 + age + livch + (1 | dist)", data)
    assert "livch: 2" not in fast.coef_names
    assert_same_design(fast, slow)


@pytest.mark.parametrize("fast", [True, False])
def test_new_data_errors(contra, fast):
    d = _build_design("use ~ 1 + urban * age + (1 + urban | dist)", contra, fast=fast)
    with pytest.raises(ValueError, match="'urban'.*not seen in fitting: \\['Q'\\]"):
        d.fixed_matrix(contra.iloc[:2].assign(urban=["Y", "Q"]))
    with pytest.raises(ValueError, match="'age'.*1 missing or non-finite"):
        d.fixed_matrix(contra.iloc[:2].assign(age=[1.0, np.nan]))
    with pytest.raises(ValueError, match="column 'age' not found"):
        d.fixed_matrix(contra.iloc[:2].drop(columns="age"))
    with pytest.raises(ValueError, match="'urban'.*not seen in fitting"):
        d.reterms[0].new_codes(contra.iloc[:2].assign(urban=["Y", "Q"]))


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("fast", [True, False])
def test_overflowing_square_is_named(sleepstudy, fast):
    data = sleepstudy.assign(huge=sleepstudy["days"] * 1e200)
    with pytest.raises(ValueError, match=r"non-finite values in column\(s\) \['abs2\(huge\)'\]"):
        _build_design("reaction ~ 1 + abs2(huge) + (1 | subj)", data, fast=fast)
    data = data.assign(huge=(sleepstudy["days"] + 1) * 1e200, huge2=1e200)
    with pytest.raises(ValueError, match=r"non-finite values in column\(s\) \['huge & huge2'\]"):
        _build_design("reaction ~ 1 + huge:huge2 + days + (1 | subj)", data, fast=fast)


@pytest.mark.parametrize("formula", [
    "reaction ~ 1 + np.log(days + 1) + (1 | subj)",
    "reaction ~ 1 + I(days ** 2) + (1 | subj)",
    "reaction ~ 1 + C(days) + (1 | subj)",
    "reaction ~ 1 + (days + subj):days + (1 | subj)",
    "reaction ~ 1 + days + subj - subj + (1 | subj)",
    "reaction ~ 1 + days + (1 + np.sqrt(days) | subj)",
])
def test_patsy_only_syntax_falls_back(sleepstudy, formula):
    fast, slow = _both(formula, sleepstudy)
    assert_same_design(fast, slow, sleepstudy.iloc[::9])


def test_patsy_contrast_objects_fall_back(contra):
    for coding in (patsy.Sum, patsy.Treatment(reference="Y"), np.array([[1.0], [-1.0]])):
        fast, slow = _both("use ~ 1 + age * urban + (1 | dist)", contra,
                           contrasts={"urban": coding})
        assert not _uses_fast_path(fast)
        assert_same_design(fast, slow)


def test_column_named_like_abs2_falls_back(sleepstudy):
    data = sleepstudy.assign(abs2=1.0)
    with pytest.raises(ValueError):
        build_design("reaction ~ 1 + abs2(days) + (1 | subj)", data)


def test_unknown_names_keep_their_messages(sleepstudy):
    with pytest.raises(ValueError, match="column 'foo' not found in data"):
        build_design("reaction ~ 1 + days * foo + (1 | subj)", sleepstudy)
    with pytest.raises(ValueError, match="column 'foo' not found in data"):
        build_design("reaction ~ 1 + days + (1 + abs2(foo) | subj)", sleepstudy)


def test_keyword_column(sleepstudy):
    data = sleepstudy.rename(columns={"days": "yield"})
    fast, slow = _both("reaction ~ 1 + yield + (1 + yield | subj)", data)
    assert fast.coef_names == ["(Intercept)", "yield"]
    assert_same_design(fast, slow, data.iloc[:4])


def test_large_grouping_interaction_codes():
    # more combinations than 4n + 1024 exercises np.unique; fewer the presence table
    rng = np.random.default_rng(3)
    n = 500
    data = pd.DataFrame({"y": rng.standard_normal(n),
                         "a": rng.integers(0, 300, n).astype(str),
                         "b": rng.integers(0, 300, n).astype(str),
                         "c": rng.choice(["u", "v"], n)})
    for group in ("a & b", "a & c", "c & a", "a / b"):
        d = build_design(f"y ~ 1 + (1 | {group})", data)
        term = d.reterms[-1]
        cols = [c.strip() for c in group.replace("/", "&").split("&")]
        labels = data[cols].astype(str).agg(" & ".join, axis=1)
        assert term.levels == sorted(set(labels), key=lambda s: [
            sorted(data[c].unique()).index(p) for c, p in zip(cols, s.split(" & "))])
        assert [term.levels[i] for i in term.codes] == labels.tolist()


# --- the term grammar against patsy's own parser ----------------------------------------

def _patsy_terms(text):
    desc = patsy.ModelDesc.from_formula(text)
    out = []
    for term in desc.rhs_termlist:
        out.append(tuple(("abs2", f.code[5:-1]) if f.code.startswith("abs2(") else ("col", f.code)
                         for f in term.factors))
    return tuple(out)


@pytest.mark.parametrize("text", [
    "1", "0", "-1", "1 + x", "x", "0 + x", "x + 0", "x - 1", "-1 + x", "x + 1", "1 + x - 1",
    "x - 1 + 1", "0 + 1 + x", "1 + 0 + x", "x * y", "x:y", "y:x + x:y", "x * y * z",
    "x:y * z", "x * y:z", "x + y + x:y:x", "abs2(x) * y", "abs2( x ) + abs2(x)",
    "x*y - 1", "a * b + b * a + a:b:c", "x:x", "x * x",
])
def test_grammar_matches_patsy(text):
    assert fast_terms(text) == _patsy_terms(text)


def test_random_formulas_match_patsy():
    rng = random.Random(11)
    atoms = ["a", "b", "c", "d", "abs2(a)", "abs2(c)"]
    for _ in range(400):
        pieces = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.2:
                pieces.append(rng.choice(["1", "0"]))
            else:
                k = rng.randint(1, 3)
                pieces.append(rng.choice([":", " * ", "*"]).join(rng.choice(atoms)
                                                                 for _ in range(k)))
        text = pieces[0]
        for piece in pieces[1:]:
            text += rng.choice([" + ", "+"]) + piece
        if rng.random() < 0.2:
            text = rng.choice(["-1 + ", "0 + ", "1 + "]) + text
        if rng.random() < 0.1:
            text += " - 1"
        assert fast_terms(text) == _patsy_terms(text), text


@pytest.mark.parametrize("text", [
    "np.log(x)", "I(x)", "x ** 2", "(a + b):c", "a / b", "x - y", "x + -1", "C(a)",
    "Q('x')", "x.y", "2", "1:x", "x:1", "x - 0", "abs2(x + 1)", "f(x)", "x[0]", "",
])
def test_grammar_leaves_the_rest_to_patsy(text):
    assert fast_terms(text) is None


def test_all_codings_in_interactions_match(contra):
    livch = [None, DummyCoding(), DummyCoding(base="2"), EffectsCoding(),
             EffectsCoding(base="3+"), HelmertCoding(), HelmertCoding(base="1")]
    urban = [None, DummyCoding(base="Y"), EffectsCoding(), HelmertCoding(base="Y")]
    for c1, c2 in itertools.product(livch, urban):
        contrasts = {k: v for k, v in (("livch", c1), ("urban", c2)) if v is not None}
        fast, slow = _both("use ~ 1 + age * livch * urban + (1 | dist)", contra,
                           contrasts=contrasts)
        assert_same_design(fast, slow)

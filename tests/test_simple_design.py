"""The design of a small, clean model without the column cache (formula/_simple.py)
against the general path (_design._build_design with the simple one turned off): the
same Design, field for field and bit for bit, where it applies; and where it does not,
the general path's answer, warnings and errors."""
import warnings

import numpy as np
import pandas as pd
import pytest

import mixedmodels as mm
from mixedmodels.formula import _design, _simple


def _general(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(_design, "simple_design", lambda *a: None)
        qr = []
        return _design._design_and_qr(*args, qr_out=qr, **kwargs), qr


def _simple_path(*args, **kwargs):
    qr = []
    return _design._design_and_qr(*args, qr_out=qr, **kwargs), qr


def _arrays_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        assert a.flags.c_contiguous == b.flags.c_contiguous
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _arrays_same(x, y)
    else:
        assert a == b


def _matrices_same(a, b, newdata):
    assert type(a) is type(b)
    assert a.names == b.names and a.what == b.what and a.specs == b.specs
    assert a.subterms == b.subterms
    _arrays_same(a.matrix, b.matrix)
    _arrays_same(a.build(newdata), b.build(newdata))


def _same_design(got, want, newdata):
    for name in ("formula", "response_name", "y", "y_levels", "X", "coef_names", "dropped",
                 "weights", "offset", "n", "rows_used", "binomial_counts", "_keep"):
        _arrays_same(getattr(got, name), getattr(want, name))
    assert len(got._offsets) == len(want._offsets)
    for a, b in zip(got._offsets, want._offsets):
        _matrices_same(a, b, newdata)
    assert vars(got.parsed) == vars(want.parsed)
    assert got.parsed.random is not want.parsed.random
    _matrices_same(got._fixed, want._fixed, newdata)
    assert len(got.reterms) == len(want.reterms)
    for a, b in zip(got.reterms, want.reterms):
        for name in ("group_name", "codes", "levels", "cnames", "z", "zerocorr", "_grouping",
                     "_components", "_steps"):
            _arrays_same(getattr(a, name), getattr(b, name))
        _matrices_same(a._matrix, b._matrix, newdata)
    np.testing.assert_array_equal(got.fixed_matrix(newdata), want.fixed_matrix(newdata))


def _sleep():
    d = mm.dataset("sleepstudy")
    return d.assign(x=np.cos(np.arange(len(d))), n=np.arange(len(d)) % 7,
                    x2=1.0 + np.sin(np.arange(len(d))) ** 2)


def _sleep_g():
    d = mm.dataset("sleepstudy")
    return d.assign(g=pd.array(np.where(np.arange(len(d)) % 3 == 0, "b", "a"),
                               dtype=d["subj"].dtype))


SIMPLE = {
    "penicillin": ("diameter ~ 1 + (1 | plate) + (1 | sample)", mm.dataset("penicillin")),
    "sleepstudy": ("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy")),
    "zerocorr": ("reaction ~ 1 + days + (1 + days || subj)", mm.dataset("sleepstudy")),
    "no_intercept_z": ("reaction ~ 1 + days + (0 + days | subj) + (1 | subj)", _sleep()),
    "powers_ints": ("reaction ~ 1 + abs2(days) + x + n + (1 + x | subj)", _sleep()),
    "no_intercept_x": ("reaction ~ 0 + days + x + (1 | subj)", _sleep()),
    "dyestuff": ("yield ~ 1 + (1 | batch)", mm.dataset("dyestuff")),
    "cbpp": ("incid / hsz ~ 1 + period + (1 | herd)", mm.dataset("cbpp"), {"weights": "hsz"}),
    "factor_and_number": ("reaction ~ 1 + days + g + (1 | subj)", _sleep_g()),
    "expression": ("reaction / 10 ~ 1 + days + (1 | subj)", mm.dataset("sleepstudy")),
    "factor_in_z": ("reaction ~ 1 + days + (1 + g | subj)", _sleep_g()),
    "weights_and_log": ("log(reaction) ~ 1 + days + (1 | subj)", _sleep(), {"weights": "x2"}),
    "zero_weights": ("reaction ~ 1 + days + (1 | subj)", mm.dataset("sleepstudy"),
                     {"weights": "days"}),
}


@pytest.mark.parametrize("name", list(SIMPLE))
def test_the_simple_design_is_the_general_one(name, monkeypatch):
    formula, data, *kw = SIMPLE[name]
    weights = kw[0]["weights"] if kw else None
    plan = _design._plan(formula, data.columns, True)
    assert _simple.simple_design(formula, data, plan, [], weights) is not None
    got, qr_got = _simple_path(formula, data, None, weights, None, "drop")
    want, qr_want = _general(monkeypatch, formula, data, None, weights, None, "drop")
    _same_design(got, want, data.iloc[::3])
    assert len(qr_got) == len(qr_want)
    for a, b in zip(qr_got, qr_want):
        for x, y in zip(a, b):
            _arrays_same(x, y)


def test_fits_through_either_path_are_the_same(monkeypatch):
    formula, data = SIMPLE["sleepstudy"]
    got = mm.fit(formula, data)
    monkeypatch.setattr(_design, "simple_design", lambda *a: None)
    want = mm.fit(formula, data)
    assert got.objective == want.objective
    np.testing.assert_array_equal(got.theta, want.theta)
    np.testing.assert_array_equal(got.coef, want.coef)
    np.testing.assert_array_equal(got.stderror, want.stderror)


def _declined():
    sleep = mm.dataset("sleepstudy")
    nan_y = sleep.assign(reaction=sleep["reaction"].where(sleep.index != 5))
    inf_x = sleep.assign(days=sleep["days"].astype(float).where(sleep.index != 7, np.inf))
    one = sleep.assign(g="a")
    cat = sleep.assign(subj=sleep["subj"].astype("category"))
    obj = sleep.assign(subj=sleep["subj"].astype(object))
    long = pd.concat([sleep] * 3, ignore_index=True)
    aliased = sleep.assign(d2=2.0 * sleep["days"])
    return {
        "missing_response": ("reaction ~ 1 + days + (1 | subj)", nan_y, {}),
        "infinite_predictor": ("reaction ~ 1 + days + (1 | subj)", inf_x, {}),
        "factor_predictor": ("reaction ~ 1 + subj + (1 | days)", sleep, {}),
        "single_level": ("reaction ~ 1 + days + (1 | g)", one, {}),
        "categorical_group": ("reaction ~ 1 + days + (1 | subj)", cat, {}),
        "object_group": ("reaction ~ 1 + days + (1 | subj)", obj, {}),
        "many_rows": ("reaction ~ 1 + days + (1 | subj)", long, {}),
        "aliased": ("reaction ~ 1 + days + d2 + (1 | subj)", aliased, {}),
        "not_clearly_full_rank": ("reaction ~ 1 + subj + (1 | subj)", sleep, {}),
        "string_response": ("use ~ 1 + age + (1 | dist)", mm.dataset("contra").iloc[:400], {}),
        "zero_division": ("reaction / (days - 3) ~ 1 + (1 | subj)", sleep, {}),
        "negative_weights": ("reaction ~ 1 + days + (1 | subj)", sleep.assign(w=sleep["days"] - 1.0),
                             {"weights": "w"}),
        "weights_array": ("reaction ~ 1 + days + (1 | subj)", sleep, {"weights": np.ones(180)}),
        "no_weights_column": ("reaction ~ 1 + days + (1 | subj)", sleep, {"weights": "nope"}),
        "string_weights": ("reaction ~ 1 + days + (1 | subj)", sleep, {"weights": "subj"}),
        "bad_expression": ("reaction / nope ~ 1 + (1 | subj)", sleep, {}),
        "abs2_of_strings": ("reaction ~ 1 + abs2(g) + (1 | subj)",
                            sleep.assign(g=sleep["subj"]), {}),
        "abs2_of_strings_in_z": ("reaction ~ 1 + days + (1 + abs2(g) | subj)",
                                 sleep.assign(g=sleep["subj"]), {}),
        "nested": ("reaction ~ 1 + days + (1 | subj / days)", sleep, {}),
        "offset_term": ("reaction ~ 1 + offset(days) + (1 | subj)", sleep, {}),
        "numeric_group": ("reaction ~ 1 + (1 | days)", sleep, {}),
    }


@pytest.mark.parametrize("name", list(_declined()))
def test_what_the_simple_design_declines_takes_the_general_path(name, monkeypatch):
    formula, data, kw = _declined()[name]
    plan = _design._plan(formula, data.columns, True)
    weights = kw.get("weights")
    if (isinstance(weights, str) or weights is None) and name not in (
            "no_weights_column", "bad_expression"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # (the expression's own, seen below)
            assert _simple.simple_design(formula, data, plan, [], weights) is None
    outcomes = []
    for general in (False, True):
        with monkeypatch.context() as m:
            if general:
                m.setattr(_design, "simple_design", lambda *a: None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    design = _design.build_design(formula, data, **kw)
                except ValueError as err:
                    outcomes.append(("error", str(err), None))
                    continue
            outcomes.append(("design", [str(w.message) for w in caught], design))
    (kind_a, msg_a, got), (kind_b, msg_b, want) = outcomes
    assert kind_a == kind_b and msg_a == msg_b
    if got is not None:
        _same_design(got, want, data.iloc[::3])

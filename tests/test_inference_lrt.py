"""Likelihood-ratio tests (inference/lrt.py) against lme4's ``anova(m0, m1, refit = FALSE)``.

Every entry of ``comparisons`` in lme4_inference.json is refitted from its ``models``
entries and compared: χ² to 1e-3 absolute and p to 1e-3 relative (issue 8), npar
exactly, and -2 log L, AIC and BIC to OBJECTIVE_ABS (they differ from lme4's only by the
objectives at the two optima; log L by half that).
"""
import json
import pickle

import numpy as np
import pandas as pd
import pytest
from conftest import OBJECTIVE_ABS, _reference_dir, fit_inference_model

import mixedmodels as mm
from mixedmodels.inference.lrt import LikelihoodRatioTest, format_pvalue, lrtest

CHISQ_ABS = 1e-3
P_REL = 1e-3

INFERENCE = json.loads((_reference_dir() / "lme4_inference.json").read_text())
MODELS = {m["name"]: m for m in INFERENCE["models"]}
COMPARISONS = {c["name"]: c for c in INFERENCE["comparisons"]}




def fit_reference(name):
    return fit_inference_model(name)


def _as_list(x):
    return x if isinstance(x, list) else [x]


# -- the reference comparisons --------------------------------------------------------

@pytest.mark.parametrize("name", list(COMPARISONS))
def test_matches_lme4_anova(name):
    ref = COMPARISONS[name]
    m0, m1 = fit_reference(ref["m0"]), fit_reference(ref["m1"])
    # given larger first: the table is sorted by the number of parameters, as lme4's is
    table = lrtest(m1, m0).to_frame()
    assert list(table.columns) == ["npar", "loglik", "deviance", "aic", "bic", "chisq", "df", "p"]
    assert table["npar"].tolist() == ref["npar"]
    np.testing.assert_allclose(table["deviance"], ref["deviance"], rtol=0, atol=OBJECTIVE_ABS)
    np.testing.assert_allclose(table["loglik"], ref["loglik"], rtol=0, atol=OBJECTIVE_ABS / 2)
    np.testing.assert_allclose(table["aic"], ref["aic"], rtol=0, atol=OBJECTIVE_ABS)
    np.testing.assert_allclose(table["bic"], ref["bic"], rtol=0, atol=OBJECTIVE_ABS)
    assert table["df"].iloc[1] == ref["df"]
    assert abs(table["chisq"].iloc[1] - ref["chisq"]) <= CHISQ_ABS
    assert abs(table["p"].iloc[1] - ref["p"]) <= P_REL * ref["p"]
    assert table[["chisq", "df", "p"]].iloc[0].isna().all()


def test_boundary_note_only_where_a_variance_component_is_tested():
    boundary = {"sleepstudy_slope", "penicillin_sample"}   # the smaller lacks an sd
    for name, ref in COMPARISONS.items():
        result = lrtest(fit_reference(ref["m0"]), fit_reference(ref["m1"]))
        has_note = any("boundary" in n for n in result.notes)
        assert has_note == (name in boundary), name
        assert ("boundary" in str(result)) == (name in boundary), name


def test_printed_like_mixedmodels_jl():
    result = lrtest(fit_reference("sleepstudy_intercept_ml"), fit_reference("sleepstudy_ml"))
    rule = "─" * 50
    expected = [
        "Model Formulae",
        "1: reaction ~ 1 + days + (1 | subj)",
        "2: reaction ~ 1 + days + (1 + days | subj)",
        rule,
        "     model-dof  -2 logLik       χ²  χ²-dof  P(>χ²)",
        rule,
        "[1]          4  1794.0786                         ",
        "[2]          6  1751.9393  42.1393       2  <1e-09",
        rule,
    ]
    lines = str(result).splitlines()
    assert lines[:len(expected)] == expected
    assert lines[len(expected)].startswith("Note: [1] vs [2] tests 1 variance component")
    assert repr(result) == str(result)


def test_three_models_are_tested_in_sequence():
    ref_slope, ref_corr = COMPARISONS["sleepstudy_slope"], COMPARISONS["sleepstudy_corr"]
    fits = [fit_reference(n) for n in ("sleepstudy_ml", "sleepstudy_intercept_ml",
                                        "sleepstudy_zerocorr_ml")]
    result = lrtest(*fits)
    assert result.npar.tolist() == [4, 5, 6]
    # [3] vs [2] is lme4's sleepstudy_corr; [2] vs [1] follows from the logliks of both
    assert abs(result.chisq[1] - ref_corr["chisq"]) <= CHISQ_ABS
    expected = 2 * (ref_corr["loglik"][0] - ref_slope["loglik"][0])
    assert abs(result.chisq[0] - expected) <= CHISQ_ABS
    assert len(result.notes) == 1 and result.notes[0].startswith("[1] vs [2]")


def test_reml_fits_with_the_same_fixed_effects():
    sleep = mm.dataset("sleepstudy")
    m0 = mm.fit("reaction ~ 1 + days + (1 | subj)", sleep, REML=True)
    m1 = fit_reference("sleepstudy_reml")
    result = lrtest(m0, m1)
    assert result.REML
    assert "REML crit" in str(result)
    np.testing.assert_allclose(result.chisq[0], m0.objective - m1.objective, rtol=1e-12)


def test_fits_survive_pickling():
    m0, m1 = fit_reference("cbpp_binomial_null"), fit_reference("cbpp_binomial")
    back = [pickle.loads(pickle.dumps(f)) for f in (m0, m1)]
    pd.testing.assert_frame_equal(lrtest(*back).to_frame(), lrtest(m0, m1).to_frame())
    ref = COMPARISONS["cbpp_period"]
    assert abs(lrtest(*back).chisq[0] - ref["chisq"]) <= CHISQ_ABS


def test_a_larger_fit_below_the_smaller_is_clamped_and_noted():
    m0 = fit_reference("sleepstudy_intercept_ml")
    model = fit_reference("sleepstudy_ml").model
    # the larger model at a θ far from its optimum: near no random effects at all
    stuck = mm.LinearMixedModelFit(model, model._optimum(np.array([0.05, 0.0, 0.01])))
    assert stuck.loglik < m0.loglik
    result = lrtest(m0, stuck)
    assert result.chisq[0] == 0.0 and result.pvalues[0] == 1.0
    assert any("stopped short" in n for n in result.notes)


@pytest.mark.parametrize("p, text", [
    (0.80041843197715, "0.8004"), (1e-4, "0.0001"), (7.07241254718902e-10, "<1e-09"),
    (1.15093669430888e-05, "<1e-04"), (9.93957446656001e-63, "<1e-62"), (1e-5, "<1e-04"),
    (0.0, "<1e-99"), (1e-150, "<1e-99"), (float("nan"), "NaN"),
])
def test_pvalue_format(p, text):
    # StatsBase.PValue: four decimals down to 1e-4, then the next power of ten above
    assert format_pvalue(p) == text


# -- refusals ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sleep():
    return mm.dataset("sleepstudy")


def test_needs_two_fits():
    with pytest.raises(ValueError, match="two or more fits; got 1"):
        lrtest(fit_reference("sleepstudy_ml"))
    with pytest.raises(TypeError, match="not a fitted mixed model"):
        lrtest(fit_reference("sleepstudy_ml"), "m0")


def test_refuses_different_data(sleep):
    m1 = fit_reference("sleepstudy_ml")
    fewer = mm.fit("reaction ~ 1 + days + (1 | subj)", sleep.iloc[10:])
    with pytest.raises(ValueError, match="180 observations in fit 1 and 170 in fit 2"):
        lrtest(m1, fewer)
    other = sleep.assign(reaction=np.log(sleep["reaction"]))
    with pytest.raises(ValueError, match="another response"):
        lrtest(m1, mm.fit("reaction ~ 1 + days + (1 | subj)", other))
    weighted = mm.fit("reaction ~ 1 + days + (1 | subj)", sleep, weights=np.full(180, 2.0))
    with pytest.raises(ValueError, match="different weights"):
        lrtest(m1, weighted)


def test_refuses_non_nested(sleep):
    m0 = fit_reference("sleepstudy_intercept_ml")
    sqrt_days = mm.fit("reaction ~ 1 + np.sqrt(days) + (1 | subj)", sleep)
    with pytest.raises(ValueError, match="same number of parameters"):
        lrtest(m0, sqrt_days)
    with pytest.raises(ValueError, match=r"fixed-effect column\(s\) \['np.sqrt\(days\)'\]"):
        lrtest(sqrt_days, fit_reference("sleepstudy_ml"))
    by_day = sleep.assign(day=sleep["days"].astype(str))
    with pytest.raises(ValueError, match="grouping factor 'day'"):
        lrtest(mm.fit("reaction ~ 1 + days + (1 | day)", by_day),
               mm.fit("reaction ~ 1 + days + (1 + days | subj)", by_day))
    with pytest.raises(ValueError, match=r"random effect\(s\) \['days'\] on 'subj'"):
        lrtest(mm.fit("reaction ~ 1 + (0 + days | subj)", sleep),
               mm.fit("reaction ~ 1 + days + (1 | subj)", sleep))


def test_refuses_reml_with_ml_and_reml_with_other_fixed_effects(sleep):
    with pytest.raises(ValueError, match="REML and ML"):
        lrtest(fit_reference("sleepstudy_intercept_ml"), fit_reference("sleepstudy_reml"))
    with pytest.raises(ValueError, match="REML fits compare only when their fixed effects"):
        lrtest(mm.fit("reaction ~ 1 + (1 | subj)", sleep, REML=True),
               fit_reference("sleepstudy_reml"))


def test_refuses_lmm_with_glmm_and_mixed_families(sleep):
    gamma = mm.fit("reaction ~ 1 + days + (1 | subj)", sleep, family=mm.Gamma(link="log"))
    with pytest.raises(ValueError, match="linear mixed model .* with a Gamma GLMM"):
        lrtest(fit_reference("sleepstudy_ml"), gamma)
    cbpp = mm.dataset("cbpp")
    probit = mm.fit("incid / hsz ~ 1 + (1 | herd)", cbpp, family=mm.Binomial(link="probit"),
                    weights="hsz")
    with pytest.raises(ValueError, match="one family and link"):
        lrtest(probit, fit_reference("cbpp_binomial"))
    agq = mm.fit("incid / hsz ~ 1 + (1 | herd)", cbpp, family=mm.Binomial(), weights="hsz",
                 nAGQ=5)
    with pytest.raises(ValueError, match="same nAGQ"):
        lrtest(agq, fit_reference("cbpp_binomial"))


def test_result_type():
    result = lrtest(fit_reference("penicillin_plate_ml"), fit_reference("penicillin_ml"))
    assert isinstance(result, LikelihoodRatioTest)
    assert result.formulas == [MODELS["penicillin_plate_ml"]["formula"],
                               MODELS["penicillin_ml"]["formula"]]
    assert result.df.tolist() == [1]

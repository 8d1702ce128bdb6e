"""The output layer: VarCorr, coefficient tables and the model display.

Fake fitted models (``types.SimpleNamespace``) carry reference numbers, so these tests
need no fitting.  Two kinds of expectations:

* the reference fits (lme4_public.json, mixedmodels_jl.json) fed through our
  formatting, checked cell by cell;
* MixedModels.jl's own printed output (the seed tutorial and its documentation),
  reproduced line by line.  Those outputs come from MixedModels.jl's optimum, which
  differs from lme4's in the 5th-6th significant digit, so for these the fake
  model carries the digits MixedModels.jl printed.
"""
import math
import types

import numpy as np
import pytest

from mixedmodels._summary import (
    coeftable,
    compact_table,
    format_coeftable,
    format_compact_table,
    format_model,
    format_pvalue,
)
from mixedmodels._varcorr import VarCorr, compact, print_digits

RULE = "\u2500"


# ------------------------------------------------------------------------------------
# fake models
# ------------------------------------------------------------------------------------
def _cov(sd, corr=None):
    sd = np.asarray(sd, dtype=float)
    cor = np.eye(len(sd)) if corr is None else np.asarray(corr, dtype=float)
    return cor * np.outer(sd, sd)


def _lmm(coef, se, names, groups, sigma, ngroups, formula, REML=False, objective=0.0,
         loglik=0.0, dropped=(), singular=False):
    vc = VarCorr(groups, sigma)
    return types.SimpleNamespace(
        coef=np.asarray(coef, float), stderror=np.asarray(se, float), coef_names=list(names),
        dropped_coefs=list(dropped), varcorr=vc,
        reterm_names=[g[0] for g in groups], reterm_cnames=[list(g[1]) for g in groups],
        reterm_sds=[np.sqrt(np.diag(np.atleast_2d(g[2]))) for g in groups],
        ngroups=list(ngroups), nobs=180, objective=objective, loglik=loglik,
        deviance=objective, aic=objective + 12, aicc=objective + 12.49,
        bic=objective + 31.16, dof=6, formula=formula, REML=REML, is_glmm=False,
        family=None, nAGQ=1, sigma=sigma, singular=singular)


@pytest.fixture
def sleep_ml(lme4_ref, jl_ref):
    """sleepstudy ML: β, SE from MixedModels.jl; variance components from lme4."""
    jl = jl_ref["sleepstudy_ml"]
    vc = {(r["group"], r["var1"], r["var2"]): r for r in lme4_ref["sleepstudy_ml"]["lme4"]["varcorr"]}
    sd = [vc[("subj", "(Intercept)", "")]["sdcor"], vc[("subj", "days", "")]["sdcor"]]
    rho = vc[("subj", "(Intercept)", "days")]["sdcor"]
    sigma = vc[("Residual", "", "")]["sdcor"]
    return _lmm(jl["coef"], jl["stderror"], ["(Intercept)", "days"],
                [("subj", ["(Intercept)", "days"], _cov(sd, [[1, rho], [rho, 1]]), False)],
                sigma, [18], jl["formula"], objective=jl["objective"], loglik=jl["loglik"])


@pytest.fixture
def sleep_seed():
    """sleepstudy with the digits MixedModels.jl printed in the seed tutorial."""
    sd = [math.sqrt(565.51067), math.sqrt(32.68212)]
    return _lmm([251.405104848, 10.467285960], [6.63226, 1.50224], ["(Intercept)", "days"],
                [("subj", ["(Intercept)", "days"], _cov(sd, [[1, 0.0813], [0.0813, 1]]), False)],
                math.sqrt(654.94145), [18], "reaction ~ 1 + days + (1 + days | subj)",
                objective=1751.9393444636682, loglik=-875.9696722318341)


GM1_NAMES = ["(Intercept)", "age", "abs2(age)", "urban: Y", "livch: 1", "livch: 2", "livch: 3+"]


@pytest.fixture
def gm1(lme4_ref):
    """The tutorial's gm1 (contra, Bernoulli, nAGQ = 9) with lme4's estimates."""
    r = lme4_ref["contra_gm1_agq9"]["lme4"]
    var = r["varcorr"][0]["vcov"]
    fam = types.SimpleNamespace(name="Bernoulli", link=types.SimpleNamespace(name="logit"))
    return types.SimpleNamespace(
        coef=np.array(r["coef"]), stderror=np.array(r["stderror"]), coef_names=GM1_NAMES,
        dropped_coefs=[], varcorr=VarCorr([("dist", ["(Intercept)"], [[var]], False)], None),
        reterm_names=["dist"], reterm_cnames=[["(Intercept)"]],
        reterm_sds=[np.array([r["varcorr"][0]["sdcor"]])], ngroups=[60], nobs=r["nobs"],
        objective=r["objective"], loglik=r["loglik"], deviance=r["objective"],
        aic=r["objective"] + 16, aicc=r["objective"] + 16.07, bic=r["objective"] + 60.5,
        dof=8, formula=lme4_ref["contra_gm1_agq9"]["formula"], REML=False, is_glmm=True,
        family=fam, nAGQ=9, sigma=None, singular=False)


def _row(text, name):
    """The line of ``text`` whose first field is ``name``."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line == name:
            return line
    raise AssertionError(f"no row {name!r} in\n{text}")


def _cells(text, name):
    """The fields after ``name`` on its row (names may contain spaces)."""
    return _row(text, name)[len(name):].split()


# ------------------------------------------------------------------------------------
# p-values and Julia-style numbers
# ------------------------------------------------------------------------------------
def test_pvalue_fixed_notation_from_1e_4():
    assert format_pvalue(0.70219) == "0.7022"
    assert format_pvalue(1.0) == "1.0000"
    assert format_pvalue(1e-4) == "0.0001"
    assert format_pvalue(0.00464) == "0.0046"


def test_pvalue_bound_is_smallest_power_of_ten_above():
    assert format_pvalue(4.5e-5) == "<1e-04"
    assert format_pvalue(3e-12) == "<1e-11"
    assert format_pvalue(0.0) == "<1e-99"
    assert format_pvalue(1e-300) == "<1e-99"
    # an exact power of ten is not below itself: the bound moves up one decade
    for k in range(5, 99):
        assert format_pvalue(10.0 ** -k) == f"<1e-{k - 1:02d}"
    # just above 10^-k the bound is 10^-(k-1); just below it is 10^-k
    for k in range(5, 99):
        lo = 0.5 * 10.0 ** -k
        assert format_pvalue(lo) == f"<1e-{k:02d}"
        assert len(format_pvalue(lo)) == 6


def test_pvalue_rejects_out_of_range_and_passes_nan():
    with pytest.raises(ValueError):
        format_pvalue(1.5)
    with pytest.raises(ValueError):
        format_pvalue(-0.1)
    assert format_pvalue(float("nan")) == "NaN"


@pytest.mark.parametrize("x, text", [
    (251.40510484848454, "251.405"), (10.467285959596126, "10.4673"),
    (6.632295312722272, "6.6323"), (0.000722797, "0.000722797"), (-0.0044865, "-0.0044865"),
    (1e-5, "1.0e-5"), (123456.7, "1.23457e5"), (1234567.0, "1.23457e6"),
    (100000.0, "100000.0"), (0.0, "0.0"), (-1.0165, "-1.0165"), (float("nan"), "NaN"),
])
def test_compact_matches_julia(x, text):
    assert compact(x) == text


def test_varcorr_digits_follow_the_widest_stddev():
    assert print_digits([23.78047, 5.716828, 25.591824]) == 5    # 5.71683
    assert print_digits([0.478636461]) == 6                      # 0.478636
    assert print_digits([37.26034, 49.5101]) == 4


# ------------------------------------------------------------------------------------
# VarCorr
# ------------------------------------------------------------------------------------
def test_varcorr_reproduces_seed_block(sleep_seed):
    assert str(sleep_seed.varcorr).splitlines() == [
        "Variance components:",
        "            Column    Variance Std.Dev.   Corr.",
        "subj     (Intercept)  565.51067 23.78047",
        "         days          32.68212  5.71683 +0.08",
        "Residual              654.94145 25.59182",
    ]


def test_varcorr_from_lme4_sleepstudy(sleep_ml, lme4_ref):
    vc = sleep_ml.varcorr
    text = repr(vc)
    subj = _row(text, "subj")
    assert subj.split()[1:] == ["(Intercept)", "565.51527", "23.78056"]
    assert subj.split()[2].startswith("565.5")
    assert text.splitlines()[3].split() == ["days", "32.68220", "5.71683", "+0.08"]
    assert _row(text, "Residual").split() == ["Residual", "654.94104", "25.59182"]
    ref = {(r["group"], r["var1"], r["var2"]): r for r in lme4_ref["sleepstudy_ml"]["lme4"]["varcorr"]}
    np.testing.assert_allclose(vc.variances["subj"],
                               [ref[("subj", "(Intercept)", "")]["vcov"], ref[("subj", "days", "")]["vcov"]],
                               rtol=1e-12)
    np.testing.assert_allclose(vc.correlations["subj"][1, 0],
                               ref[("subj", "(Intercept)", "days")]["sdcor"], rtol=1e-12)
    np.testing.assert_allclose(vc.residual_sigma, ref[("Residual", "", "")]["sdcor"], rtol=1e-15)
    assert vc.groups == ("subj",)


def test_varcorr_to_frame(sleep_ml):
    df = sleep_ml.varcorr.to_frame()
    assert list(df.columns) == ["group", "column", "variance", "stddev",
                                "corr_(Intercept)", "corr_days"]
    assert list(df["group"]) == ["subj", "subj", "Residual"]
    assert list(df["column"]) == ["(Intercept)", "days", ""]
    np.testing.assert_allclose(df["stddev"] ** 2, df["variance"], rtol=1e-14)
    assert df.loc[1, "corr_(Intercept)"] == pytest.approx(0.0813199745870965, rel=1e-12)
    assert df.loc[0, "corr_days"] == pytest.approx(0.0813199745870965, rel=1e-12)
    assert np.isnan(df.loc[0, "corr_(Intercept)"]) and np.isnan(df.loc[2, "corr_days"])
    assert df.loc[2, "stddev"] == pytest.approx(25.5918158320228, rel=1e-14)


def test_varcorr_without_residual_is_the_tutorial_gm1_block(gm1):
    lines = str(gm1.varcorr).splitlines()
    assert lines[1] == "        Column   Variance Std.Dev."     # no Corr. for a scalar term
    # six decimals, because compact(0.478636...) has six; the seed's 0.229094 0.478637
    # are MixedModels.jl's optimum, lme4's is 0.2290929 0.4786365
    assert lines[2] == "dist (Intercept)  0.229093 0.478636"
    assert len(lines) == 3 and "Residual" not in str(gm1.varcorr)
    df = gm1.varcorr.to_frame()
    assert list(df.columns) == ["group", "column", "variance", "stddev"]
    assert len(df) == 1


def test_varcorr_terms_sharing_a_group_stay_separate(lme4_ref):
    r = lme4_ref["sleepstudy_zerocorr"]["lme4"]
    v = [row["vcov"] for row in r["varcorr"]]
    vc = VarCorr([("subj", ["(Intercept)"], [[v[0]]], False),
                  ("subj", ["days"], [[v[1]]], False)], r["sigma"])
    lines = str(vc).splitlines()
    assert "Corr." not in lines[1]
    assert [ln.split()[0] for ln in lines[2:]] == ["subj", "subj", "Residual"]
    assert lines[2].split()[1:] == ["(Intercept)", "584.25013", "24.17127"]
    assert lines[3].split()[1:] == ["days", "33.63314", "5.79941"]
    assert len(vc.terms) == 2 and vc.groups == ("subj",)
    np.testing.assert_allclose(vc.variances["subj"], v[:2], rtol=1e-14)
    np.testing.assert_array_equal(vc.correlations["subj"], np.eye(2))
    assert vc.cnames["subj"] == ["(Intercept)", "days"]


def test_varcorr_zerocorr_term_prints_dots(jl_ref):
    m = jl_ref["sleepstudy_zerocorr"]
    sd = m["sd"]["subj"]
    vc = VarCorr([("subj", ["(Intercept)", "days"], _cov(sd), True)], m["sigma"])
    lines = str(vc).splitlines()
    assert lines[1].endswith("Corr.")
    # 4 decimals: the widest compact σ is 24.1713 / 5.7994 / 25.5561
    assert lines[2].split() == ["subj", "(Intercept)", "584.2503", "24.1713"]
    assert lines[3].split() == ["days", "33.6330", "5.7994", "."]
    assert lines[3].endswith("5.7994   .")
    assert list(vc.to_frame().columns) == ["group", "column", "variance", "stddev"]


def test_varcorr_three_columns_lower_triangle():
    rho = np.array([[1, 0.5, -0.25], [0.5, 1, 0.125], [-0.25, 0.125, 1]])
    vc = VarCorr([("g", ["(Intercept)", "a", "b"], _cov([1.5, 2.5, 0.5], rho), False)], 1.25)
    lines = str(vc).splitlines()
    assert lines[2].split() == ["g", "(Intercept)", "2.25", "1.50"]
    assert lines[3].split() == ["a", "6.25", "2.50", "+0.50"]
    assert lines[4].split() == ["b", "0.25", "0.50", "-0.25", "+0.12"]   # 0.125: ties to even
    df = vc.to_frame()
    assert df.loc[2, "corr_a"] == pytest.approx(0.125) and df.loc[0, "corr_b"] == pytest.approx(-0.25)


def test_varcorr_checks_shapes():
    with pytest.raises(ValueError, match="2 column names"):
        VarCorr([("g", ["(Intercept)", "x"], np.eye(3), False)], 1.0)


# ------------------------------------------------------------------------------------
# coefficient table
# ------------------------------------------------------------------------------------
def test_coeftable_values(sleep_ml, jl_ref):
    ct = coeftable(sleep_ml)
    assert list(ct.columns) == ["Coef.", "Std. Error", "z", "Pr(>|z|)"]
    assert list(ct.index) == ["(Intercept)", "days"]
    jl = jl_ref["sleepstudy_ml"]
    np.testing.assert_allclose(ct["z"], np.array(jl["coef"]) / np.array(jl["stderror"]), rtol=1e-15)
    # two-sided normal tail: the days z of 6.9678 has p = 3.2e-12
    assert ct.loc["days", "Pr(>|z|)"] == pytest.approx(3.2197e-12, rel=1e-3)
    assert ct.loc["(Intercept)", "Pr(>|z|)"] < 1e-300


def test_coeftable_appends_dropped_as_nan(sleep_ml):
    sleep_ml.dropped_coefs = ["days2"]
    ct = coeftable(sleep_ml)
    assert list(ct.index) == ["(Intercept)", "days", "days2"]
    assert ct.loc["days2"].isna().all() and not ct.loc["days"].isna().any()


def test_format_coeftable_reproduces_seed(sleep_seed):
    assert format_coeftable(sleep_seed).splitlines() == [
        RULE * 50,
        "                Coef.  Std. Error      z  Pr(>|z|)",
        RULE * 50,
        "(Intercept)  251.405      6.63226  37.91    <1e-99",
        "days          10.4673     1.50224   6.97    <1e-11",
        RULE * 50,
    ]


def test_format_coeftable_aligns_on_the_decimal_point():
    # MixedModels.jl documentation, verbagg fit (first rows of its table)
    m = types.SimpleNamespace(
        coef=[0.208273, 0.0543791, 0.304089, -1.0165, -2.0218],
        stderror=[0.405425, 0.0167533, 0.191223, 0.257531, 0.259235],
        coef_names=["(Intercept)", "anger", "gender: M", "btype: scold", "btype: shout"],
        dropped_coefs=[])
    assert format_coeftable(m).splitlines() == [
        RULE * 53,
        "                   Coef.  Std. Error      z  Pr(>|z|)",
        RULE * 53,
        "(Intercept)    0.208273    0.405425    0.51    0.6075",
        "anger          0.0543791   0.0167533   3.25    0.0012",
        "gender: M      0.304089    0.191223    1.59    0.1118",
        "btype: scold  -1.0165      0.257531   -3.95    <1e-04",
        "btype: shout  -2.0218      0.259235   -7.80    <1e-14",
        RULE * 53,
    ]


def test_format_coeftable_gm1_cells(gm1):
    text = format_coeftable(gm1)
    assert _row(text, "(Intercept)").split() == ["(Intercept)", "-0.687067", "0.168594", "-4.08", "<1e-04"]
    assert _row(text, "abs2(age)").split()[-2:] == ["-6.29", "<1e-09"]
    assert _cells(text, "livch: 3+")[-2:] == ["4.93", "<1e-06"]


# ------------------------------------------------------------------------------------
# compact table
# ------------------------------------------------------------------------------------
def test_compact_table_gm1_matches_tutorial(gm1):
    text = format_compact_table(gm1)
    lines = text.splitlines()
    assert lines[0].split() == ["Est.", "SE", "z", "p", "σ_dist"]
    assert _row(text, "(Intercept)").split() == ["(Intercept)", "-0.6871", "0.1686", "-4.08", "<1e-04", "0.4786"]
    # tutorial: 0.0035 0.0092 0.38 0.7022 (MixedModels.jl's SE gives p 0.7022, lme4's 0.7020)
    assert _row(text, "age").split()[:5] == ["age", "0.0035", "0.0092", "0.38", "0.7020"]
    assert _row(text, "abs2(age)").split()[1:] == ["-0.0046", "0.0007", "-6.29", "<1e-09"]
    assert _cells(text, "urban: Y") == ["0.3484", "0.0600", "5.81", "<1e-08"]
    assert _cells(text, "livch: 1") == ["0.8151", "0.1622", "5.02", "<1e-06"]
    assert _cells(text, "livch: 2") == ["0.9165", "0.1851", "4.95", "<1e-06"]
    assert _cells(text, "livch: 3+") == ["0.9154", "0.1858", "4.93", "<1e-06"]
    assert len(lines) == 1 + len(GM1_NAMES)          # no Residual row for Bernoulli
    # σ sits in the σ_dist column, right-aligned under its header
    assert lines[1].index("0.4786") + len("0.4786") == lines[0].index("σ_dist") + len("σ_dist")


def test_compact_table_sleepstudy_matches_mixedmodels_jl(sleep_seed, jl_ref):
    # mixedmodels_jl.json summary_table:
    # | (Intercept) | 251.4051 | 6.6323 | 37.91 | <1e-99 | 23.7805 |
    # | days | 10.4673 | 1.5022 | 6.97 | <1e-11 | 5.7168 |
    # | Residual | 25.5918 | | | | |
    expected = [[c.strip() for c in ln.strip().strip("|").split("|")]
                for ln in jl_ref["sleepstudy_ml"]["summary_table"].splitlines()]
    text = format_compact_table(sleep_seed)
    lines = text.splitlines()
    assert lines[0].split() == [c for c in expected[0] if c]
    for row in expected[1:]:
        assert _row(text, row[0]).split() == [c for c in row if c]


def test_compact_table_frame_and_re_only_columns(sleep_ml):
    # (1 + days | subj) with only an intercept in the fixed effects: the days σ gets a row
    sleep_ml.coef, sleep_ml.stderror, sleep_ml.coef_names = [251.4], [9.5], ["(Intercept)"]
    tab = compact_table(sleep_ml)
    assert list(tab.columns) == ["Est.", "SE", "z", "p", "σ_subj"]
    assert list(tab.index) == ["(Intercept)", "days", "Residual"]
    assert tab.loc["days", "σ_subj"] == pytest.approx(5.71683457988983, rel=1e-12)
    assert tab.loc["days", ["Est.", "SE", "z", "p"]].isna().all()
    assert tab.loc["Residual", "Est."] == pytest.approx(25.5918158320228, rel=1e-14)
    assert np.isnan(tab.loc["Residual", "σ_subj"])
    assert _row(format_compact_table(sleep_ml), "days").split() == ["days", "5.7168"]


def test_compact_table_one_sigma_column_per_factor(lme4_ref):
    r = lme4_ref["penicillin_crossed"]["lme4"]
    sd = {row["group"]: row["sdcor"] for row in r["varcorr"]}
    m = _lmm([r["coef"]], [r["stderror"]], ["(Intercept)"],
             [("plate", ["(Intercept)"], [[sd["plate"] ** 2]], False),
              ("sample", ["(Intercept)"], [[sd["sample"] ** 2]], False)],
             r["sigma"], [24, 6], "diameter ~ 1 + (1 | plate) + (1 | sample)")
    text = format_compact_table(m)
    assert text.splitlines()[0].split() == ["Est.", "SE", "z", "p", "σ_plate", "σ_sample"]
    assert _row(text, "(Intercept)").split() == ["(Intercept)", "22.9722", "0.7446", "30.85", "<1e-99", "0.8456", "1.7706"]
    assert _row(text, "Residual").split() == ["Residual", "0.5499"]
    assert "levels of grouping factors: 24, 6" in format_model(m)


# ------------------------------------------------------------------------------------
# the full display
# ------------------------------------------------------------------------------------
def test_format_model_lmm_ml(sleep_seed):
    lines = format_model(sleep_seed).splitlines()
    assert lines[0] == "Linear mixed model fit by maximum likelihood"
    assert lines[1] == " reaction ~ 1 + days + (1 + days | subj)"
    assert lines[2].split() == ["logLik", "-2", "logLik", "AIC", "AICc", "BIC"]
    assert lines[3].split()[:2] == ["-875.9697", "1751.9393"]
    assert lines[4] == ""
    assert lines[5] == "Variance components:"
    assert lines[8] == "         days          32.68212  5.71683 +0.08"
    assert lines[10] == " Number of obs: 180; levels of grouping factors: 18"
    assert lines[11] == "" and lines[12] == "  Fixed-effects parameters:"
    assert lines[13:] == format_coeftable(sleep_seed).splitlines()
    assert "singular" not in format_model(sleep_seed)


def test_format_model_reml(lme4_ref):
    r = lme4_ref["sleepstudy_reml"]["lme4"]
    vc = {(x["group"], x["var1"], x["var2"]): x for x in r["varcorr"]}
    rho = vc[("subj", "(Intercept)", "days")]["sdcor"]
    sd = [vc[("subj", "(Intercept)", "")]["sdcor"], vc[("subj", "days", "")]["sdcor"]]
    m = _lmm(r["coef"], r["stderror"], ["(Intercept)", "days"],
             [("subj", ["(Intercept)", "days"], _cov(sd, [[1, rho], [rho, 1]]), False)],
             r["sigma"], [18], "reaction ~ 1 + days + (1 + days | subj)", REML=True,
             objective=r["objective"], loglik=r["loglik"])
    text = format_model(m)
    assert text.splitlines()[0] == "Linear mixed model fit by REML"
    assert text.splitlines()[2] == f" REML criterion at convergence: {r['objective']!r}"
    assert "AICc" not in text
    assert _row(text, "subj").split()[2:] == ["612.08975", "24.74045"]


def test_format_model_glmm(gm1):
    text = format_model(gm1)
    lines = text.splitlines()
    assert lines[0] == "Generalized linear mixed model fit by maximum likelihood (nAGQ = 9)"
    assert lines[1] == "  use ~ 1 + age + abs2(age) + urban + livch + (1 | dist)"
    assert lines[2] == "  Family: Bernoulli, link: logit"
    assert lines[4].split() == ["logLik", "deviance", "AIC", "AICc", "BIC"]
    assert lines[5].split()[:2] == ["-1186.2294", "2372.4589"]
    i = lines.index("Variance components:")
    assert lines[i + 2] == "dist (Intercept)  0.229093 0.478636"
    assert lines[i + 3] == ""                        # no Residual row: a blank line
    assert lines[i + 4] == " Number of obs: 1934; levels of grouping factors: 60"
    assert "Fixed-effects parameters:" in lines
    assert _cells(text, "urban: Y")[-2:] == ["5.81", "<1e-08"]


def test_format_model_notes_singular_and_dropped(lme4_ref):
    r = lme4_ref["dyestuff2_singular"]["lme4"]
    m = _lmm([r["coef"]], [r["stderror"]], ["(Intercept)"],
             [("batch", ["(Intercept)"], [[0.0]], False)], r["sigma"], [6],
             "yield ~ 1 + (1 | batch)", objective=r["objective"], loglik=r["loglik"],
             singular=True, dropped=["x2"])
    text = format_model(m)
    assert "singular" in text
    assert text.splitlines()[-1].endswith("x2")
    assert _row(text, "batch").split()[1:] == ["(Intercept)", "0.00000", "0.00000"]
    assert _row(text, "Residual").split()[1:] == ["13.34610", "3.65323"]
    assert _row(text, "x2").strip() == "x2"          # the dropped row is left blank

"""Bad input through the public entry point: clear errors or warned, documented fixes."""
import numpy as np
import pandas as pd
import pytest

import mixedmodels as mm


@pytest.fixture
def sleep():
    return mm.dataset("sleepstudy")


def test_missing_column_is_named(sleep):
    with pytest.raises(ValueError, match="column 'dayz' not found"):
        mm.fit("reaction ~ 1 + dayz + (1 | subj)", sleep)
    with pytest.raises(ValueError, match="column 'subject' not found"):
        mm.fit("reaction ~ 1 + days + (1 | subject)", sleep)


def test_nan_rows_are_dropped_with_a_warning_or_raise(sleep):
    sleep["days"] = sleep["days"].astype(float)
    sleep.loc[[3, 7, 11], "reaction"] = np.nan
    sleep.loc[20, "days"] = np.inf
    with pytest.warns(UserWarning, match=r"dropped 4 of 180 row.*\[.reaction., .days.\]"):
        m = mm.fit("reaction ~ 1 + days + (1 | subj)", sleep)
    assert m.nobs == 176
    with pytest.raises(ValueError, match="reaction"):
        mm.fit("reaction ~ 1 + days + (1 | subj)", sleep, na_action="raise")


def test_non_numeric_response_for_an_lmm(sleep):
    contra = mm.dataset("contra")
    with pytest.raises(ValueError, match="response 'use' is not numeric"):
        mm.fit("use ~ 1 + age + (1 | dist)", contra)


def test_grouping_factor_with_one_level(sleep):
    sleep["one"] = "a"
    with pytest.raises(ValueError, match="grouping factor 'one' has a single level"):
        mm.fit("reaction ~ 1 + days + (1 | one)", sleep)


def test_more_random_effects_than_observations():
    data = pd.DataFrame({"y": np.arange(6.0), "x": np.arange(6.0) ** 2, "g": list("aabbcc")})
    with pytest.raises(ValueError, match="6 random effects for 6 observations"):
        mm.fit("y ~ 1 + (1 + x | g)", data)
    data["id"] = [str(i) for i in range(6)]
    with pytest.raises(ValueError, match="not identifiable"):
        mm.fit("y ~ 1 + (1 | id)", data)


@pytest.mark.parametrize("formula", ["reaction 1 + days", "reaction ~ 1 + days + (1 | subj",
                                     "reaction ~ 1 + ( | subj)", "reaction ~ (1 | )"])
def test_unparseable_formula(formula, sleep):
    with pytest.raises(ValueError, match="cannot parse formula"):
        mm.fit(formula, sleep)


def test_constant_response(sleep):
    sleep["reaction"] = 250.0
    with pytest.raises(ValueError, match="response 'reaction' is constant"):
        mm.fit("reaction ~ 1 + days + (1 | subj)", sleep)


def test_no_random_effects_term(sleep):
    with pytest.raises(ValueError, match="no random-effects term"):
        mm.fit("reaction ~ 1 + days", sleep)


def test_rank_deficient_x_drops_and_reports_the_aliased_column(sleep):
    sleep["days2"] = 2.0 * sleep["days"]
    with pytest.warns(UserWarning, match="days2"):
        m = mm.fit("reaction ~ 1 + days + days2 + (1 | subj)", sleep)
    assert m.coef_names == ["(Intercept)", "days"]
    assert m.dropped_coefs == ["days2"]
    table = m.coeftable()
    assert "days2" in table.index and np.isnan(table.loc["days2", "Coef."])
    ref = mm.fit("reaction ~ 1 + days + (1 | subj)", mm.dataset("sleepstudy"))
    np.testing.assert_allclose(m.coef, ref.coef, rtol=1e-10)


def test_bernoulli_needs_a_binary_response():
    cbpp = mm.dataset("cbpp")
    with pytest.raises(ValueError, match="response 'incid' must be binary"):
        mm.fit("incid ~ 1 + period + (1 | herd)", cbpp, family=mm.Bernoulli())
    verbagg = mm.dataset("verbagg")
    with pytest.raises(ValueError, match="resp"):
        mm.fit("resp ~ 1 + anger + (1 | item)", verbagg, family=mm.Bernoulli())


def test_two_level_response_counts_the_second_level():
    contra = mm.dataset("contra")
    m = mm.fit("use ~ 1 + age + (1 | dist)", contra, family="bernoulli", fast=True)
    assert m.success_level == "Y"
    np.testing.assert_array_equal(m.y, (contra.use == "Y").to_numpy(float))


def test_binomial_proportion_outside_unit_interval():
    cbpp = mm.dataset("cbpp")
    with pytest.raises(ValueError, match="incid"):
        mm.fit("incid ~ 1 + period + (1 | herd)", cbpp, family=mm.Binomial(), weights="hsz")


def test_poisson_negative_or_fractional_counts():
    ticks = mm.dataset("grouseticks")
    ticks["ticks"] = ticks["ticks"].astype(float)
    ticks.loc[0, "ticks"] = -1
    with pytest.raises(ValueError, match="ticks"):
        mm.fit("ticks ~ 1 + year + (1 | brood)", ticks, family=mm.Poisson())
    ticks.loc[0, "ticks"] = 2.5
    with pytest.raises(ValueError, match="ticks"):
        mm.fit("ticks ~ 1 + year + (1 | brood)", ticks, family=mm.Poisson())


def test_lmm_only_options_are_rejected_for_glmm_and_back(sleep):
    with pytest.raises(ValueError, match="REML applies to linear mixed models"):
        mm.fit("use ~ 1 + age + (1 | dist)", mm.dataset("contra"), family=mm.Bernoulli(), REML=True)
    with pytest.raises(ValueError, match="apply to generalized linear mixed models"):
        mm.fit("reaction ~ 1 + days + (1 | subj)", sleep, nAGQ=5)


def test_objective_rejects_a_theta_of_the_wrong_length(sleep):
    model = mm.LinearMixedModel("reaction ~ 1 + days + (1 + days | subj)", sleep)
    with pytest.raises(ValueError, match="theta has 2 values; this model has 3"):
        model.objective([1.0, 0.5])


def test_predict_with_unseen_levels(sleep):
    m = mm.fit("reaction ~ 1 + days + (1 + days | subj)", sleep)
    new = pd.DataFrame({"days": [0.0, 5.0], "subj": ["S308", "S999"]})
    pred = m.predict(new, new_levels="population")
    assert pred[1] == pytest.approx(m.coef[0] + 5 * m.coef[1], rel=1e-12)
    re = m.ranef()["subj"].loc["S308"]
    assert pred[0] == pytest.approx(m.coef[0] + re["(Intercept)"], rel=1e-12)
    with pytest.raises(ValueError, match="levels not seen in fitting"):
        m.predict(new, new_levels="error")

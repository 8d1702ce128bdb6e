"""Negative binomial GLMMs with θ_nb estimated jointly: grouseticks against glmmTMB and
lme4's glmer.nb (lme4_inference.json)."""
import json
import pickle

import numpy as np
import pandas as pd
import pytest

import mixedmodels as mm

from conftest import LOCAL_REFERENCE, OBJECTIVE_ABS

REF = {m["name"]: m for m in json.loads(
    (LOCAL_REFERENCE / "lme4_inference.json").read_text())["models"]}["grouseticks_negbin"]


@pytest.fixture(scope="module")
def grouse():
    g = mm.dataset("grouseticks")
    g["ch"] = g["height"] - g["height"].mean()
    return g


@pytest.fixture(scope="module")
def nbfit(grouse):
    return mm.fit(REF["formula"], grouse, family=mm.NegativeBinomial())


def test_grouseticks_is_no_worse_than_the_better_reference(nbfit):
    tmb, nb = REF["glmmTMB"], REF["lme4_glmer_nb"]
    best = min(tmb["objective"], nb["objective"])
    assert nbfit.objective <= best + OBJECTIVE_ABS
    # the better optimum is glmer.nb's (the Laplace curvature of PIRLS's expected
    # information, which ours uses for this family too): agree with its estimates
    np.testing.assert_allclose(nbfit.coef, nb["coef"], rtol=1e-3)
    assert nbfit.nb_theta == pytest.approx(nb["nb_size"], rel=1e-2)
    assert nbfit.loglik == pytest.approx(-0.5 * nbfit.objective, rel=1e-14)
    assert nbfit.dof == 4 + 2 + 1


def test_sds_agree_with_glmmtmb_to_the_issue_tolerance(nbfit):
    # glmmTMB's optimum is a slightly different approximation; its sds are within 1e-2
    # relative of glmer.nb's, and so within 2e-2 of ours
    sds = [s[0] for s in nbfit.reterm_sds]
    np.testing.assert_allclose(sds, [REF["glmmTMB"]["re_sd"]["brood"],
                                     REF["glmmTMB"]["re_sd"]["location"]], rtol=3e-2)


def test_fixed_theta_fits_at_that_theta(grouse, nbfit):
    fixed = mm.fit(REF["formula"], grouse, family=mm.NegativeBinomial(theta=nbfit.nb_theta))
    assert fixed.nb_theta == nbfit.nb_theta and fixed.nb_theta_stderror is None
    # at the joint optimum's θ_nb, profiling it out changes nothing (algebra)
    assert fixed.objective == pytest.approx(nbfit.objective, abs=1e-6)
    assert fixed.dof == nbfit.dof - 1


def test_nb_theta_has_a_standard_error_and_the_summary_shows_it(nbfit):
    assert 0 < nbfit.nb_theta_stderror < nbfit.nb_theta
    assert "Negative binomial θ" in str(nbfit)
    np.testing.assert_allclose(nbfit.stderror_hessian, REF["glmmTMB"]["stderror"], rtol=5e-2)


def test_negative_binomial_fits_pickle_and_simulate(nbfit):
    back = pickle.loads(pickle.dumps(nbfit))
    assert str(back) == str(nbfit)
    sims = nbfit.simulate(n=2000, seed=1)
    # E y = μ and Var y = μ + μ²/θ over the random effects too: check the population
    # mean of the counts against the fitted model's marginal mean by simulation (algebra:
    # E exp(b) = exp(σ²/2) for each normal random effect)
    assert np.all(sims >= 0) and np.all(sims == np.round(sims))
    eta_fixed = nbfit.xbeta
    sd2 = sum(s[0] ** 2 for s in nbfit.reterm_sds)
    expected = np.exp(eta_fixed + sd2 / 2).mean()
    assert sims.mean() == pytest.approx(expected, rel=0.05)


def test_offsets_and_weights_work_as_the_likelihood_says(grouse, nbfit):
    # a constant offset c moves only the intercept, by -c (algebra)
    shifted = mm.fit(REF["formula"], grouse, family=mm.NegativeBinomial(),
                     offset=np.full(len(grouse), 0.7))
    assert shifted.objective == pytest.approx(nbfit.objective, abs=1e-6)
    assert shifted.coef[0] == pytest.approx(nbfit.coef[0] - 0.7, abs=1e-5)
    np.testing.assert_allclose(shifted.coef[1:], nbfit.coef[1:], rtol=1e-5)
    # prior weight 2 on every row is each row counted twice in the log-likelihood:
    # the same fit as the data with every row duplicated (same groups)
    doubled = mm.fit(REF["formula"], grouse, family=mm.NegativeBinomial(),
                     weights=np.full(len(grouse), 2.0))
    twice = mm.fit(REF["formula"], pd.concat([grouse, grouse], ignore_index=True),
                   family=mm.NegativeBinomial())
    assert doubled.objective == pytest.approx(twice.objective, rel=1e-9)
    np.testing.assert_allclose(doubled.coef, twice.coef, rtol=1e-5)

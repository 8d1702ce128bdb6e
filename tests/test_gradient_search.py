"""The trust-region search with the exact gradient (_trust_region.trust_region_search and its
compiled twin _kernels/_search.pyx: trust_region), the default search of LMMs with a
compiled gradient.

The compiled search is held to its Python twin iterate by iterate; the fits it gives to
the optimum BOBYQA's tight search finds (the lme4 reference tests run the default path).
"""
import warnings

import numpy as np
import pytest

import mixedmodels as mm
from mixedmodels._kernels import _search
from mixedmodels._lmm_gradient import compiled_objective
from mixedmodels._optimize import OptSummary, minimize
from mixedmodels._trust_region import TRUST_FTOL, TRUST_RADIUS, trust_region_search


def _models():
    sleep = mm.dataset("sleepstudy")
    return {
        "sleep-ml": mm.LinearMixedModel("reaction ~ 1 + days + (1 + days | subj)", sleep),
        "sleep-reml": mm.LinearMixedModel("reaction ~ 1 + days + (1 + days | subj)", sleep,
                                          REML=True),
        "penicillin": mm.LinearMixedModel("diameter ~ 1 + (1 | plate) + (1 | sample)",
                                          mm.dataset("penicillin")),
        "pastes": mm.LinearMixedModel("strength ~ 1 + (1 | batch/cask)", mm.dataset("pastes")),
        "dyestuff": mm.LinearMixedModel("yield ~ 1 + (1 | batch)", mm.dataset("dyestuff")),
        "chickweight": mm.LinearMixedModel("weight ~ 1 + time + (1 + time | chick)",
                                           mm.dataset("chickweight")),
    }


MODELS = _models()


def _tight_bobyqa(model, start):
    # the reference optimum: BOBYQA at its tight tolerances from where the fit ended
    optsum = OptSummary(initial=np.array(start, dtype=float), lowerbd=model.layout.lower,
                        initial_step=np.full(model.layout.ntheta, 0.75))
    minimize(compiled_objective(model), optsum)
    return optsum.fmin


def _starts(model):
    lower = model.layout.lower
    yield model.layout.initial()
    # beside a bound: the search's moves onto and off the bound
    yield np.where(np.isfinite(lower), 0.004, 0.1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_search_takes_its_twins_iterates(name):
    model = MODELS[name]
    kernel = compiled_objective(model)
    lower = model.layout.lower
    for x0 in _starts(model):
        xs, fs, code = _search.trust_region(kernel, x0, lower, TRUST_RADIUS, TRUST_FTOL, 10_000)
        txs, tfs, tcode = trust_region_search(kernel.value_and_gradient, x0, lower)
        assert code == tcode
        assert xs.shape == txs.shape
        np.testing.assert_allclose(xs, txs, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(fs, tfs, rtol=1e-13)


def test_search_stays_within_the_bounds_and_its_first_steps_within_the_radius():
    model = MODELS["sleep-ml"]
    kernel = compiled_objective(model)
    lower = model.layout.lower
    x0 = model.layout.initial()
    xs, fs, code = _search.trust_region(kernel, x0, lower, TRUST_RADIUS, TRUST_FTOL, 10_000)
    assert np.all(xs >= lower)
    # the first step is inside the box of the first radius: what keeps the search off
    # the far bound θ₁₁ = 0 that a unit line-search step reaches
    assert np.max(np.abs(xs[1] - x0)) <= TRUST_RADIUS + 1e-15
    assert fs[np.argmin(fs)] < fs[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_fit_uses_the_search_and_reaches_bobyqas_optimum(name):
    model = MODELS[name]
    fit = model.fit()
    assert fit.optsum.optimizer.startswith("TRUST_REGION_BFGS")
    assert fit.optsum.feval == len(fit.optsum.fitlog)
    assert fit.optsum.returnvalue in ("FTOL_REACHED", "SUCCESS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _tight_bobyqa(model, fit.theta)
    assert fit.objective <= reference + 1e-8 * abs(reference)
    by_bobyqa = model.fit(optimizer="bobyqa")
    assert by_bobyqa.optsum.optimizer.startswith("LN_BOBYQA")
    np.testing.assert_allclose(fit.theta, by_bobyqa.theta, rtol=1e-5, atol=1e-6)


def test_progress_runs_the_twin_to_the_same_fit():
    model = MODELS["sleep-ml"]
    quiet = model.fit()
    shown = model.fit(progress=True)
    assert shown.optsum.optimizer == quiet.optsum.optimizer
    assert shown.objective == pytest.approx(quiet.objective, rel=1e-13)
    np.testing.assert_allclose(shown.theta, quiet.theta, rtol=1e-10, atol=1e-12)


def test_simulated_sleepstudy_fits_end_at_the_optimum():
    # the failure to avoid (lmm.fit's docstring): an end on the far bound θ₁₁ = 0, above
    # the interior optimum; 20 of the 100 responses of the measurement
    model = MODELS["sleep-ml"]
    ys = model.fit(optimizer="bobyqa").simulate(20, seed=20261202)
    for y in ys:
        m = model.with_response(y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = m.fit()
            reference = _tight_bobyqa(m, fit.theta)
        assert fit.objective <= reference + 1e-6


def test_search_lands_on_a_boundary_optimum():
    # simulated pastes responses whose cask term's optimum is on its bound (tight BOBYQA
    # ends at θ₂ = 0): the search creeps towards it (the derivative vanishes there),
    # then steps onto it and holds it, so the check sees a bound parameter, not a
    # scaled gradient of 1e-6 at θ₂ ~ 1e-4 that sent such fits on to BOBYQA
    model = MODELS["pastes"]
    ys = model.fit(optimizer="bobyqa").simulate(28, seed=20261202)
    for i in (9, 27):
        m = model.with_response(ys[i])
        kernel = compiled_objective(m)
        x0, lower = m.layout.initial(), m.layout.lower
        xs, fs, code = _search.trust_region(kernel, x0, lower, TRUST_RADIUS, TRUST_FTOL, 10_000)
        txs, tfs, tcode = trust_region_search(kernel.value_and_gradient, x0, lower)
        assert code == tcode and xs.shape == txs.shape
        np.testing.assert_allclose(xs, txs, rtol=1e-13, atol=1e-15)
        assert xs[np.argmin(fs)][1] == 0.0
        fit = m.fit()
        assert fit.optsum.optimizer == "TRUST_REGION_BFGS"
        assert fit.theta[1] == 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = _tight_bobyqa(m, fit.theta)
        assert fit.objective <= reference + 1e-8

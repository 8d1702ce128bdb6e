"""The compiled LMM objective and search (_kernels/_lmm_gradient.pyx, _kernels/_search.pyx).

``LmmObjective`` is held to its NumPy twin, ``LinearMixedModel._objective_unchecked``, on
every factor path (block diagonal, dense tail, CHOLMOD), for ML, REML and weights, and
at singular points; ``OneTermGradient`` to the dense NumPy gradient of test_lmm_gradient
and to its per-level twin; ``bobyqa`` to ``_optimize.minimize`` driving NLopt from Python
with the same objective, evaluation by evaluation.
"""
import numpy as np
import pandas as pd
import pytest

import mixedmodels as mm
from mixedmodels._kernels import _search
from mixedmodels._kernels._lmm_gradient import LmmObjective, OneTermGradient
from mixedmodels._lmm_gradient import compiled_objective, one_term_sums_numpy
from mixedmodels._optimize import OptSummary, minimize

from test_lmm_gradient import _dense_gradient



def test_nlopt_c_api_is_found():
    # the nlopt wheel exports it; if a release stops doing so, fits fall back to the
    # Python route (tested below) and this says why they got slower
    assert _search.available()


def _models():
    sleep = mm.dataset("sleepstudy")
    pen = mm.dataset("penicillin")
    rng = np.random.default_rng(3)
    sleep_w = sleep.assign(w=rng.uniform(0.5, 2.0, len(sleep)))
    crossed = pd.DataFrame({"a": rng.integers(0, 60, 900).astype(str),
                            "b": rng.integers(0, 70, 900).astype(str),
                            "x": rng.normal(size=900)})
    crossed["y"] = crossed.x + rng.normal(size=900)
    return {
        "sleep-ml": mm.LinearMixedModel("reaction ~ 1 + days + (1 + days | subj)", sleep),
        "sleep-reml": mm.LinearMixedModel("reaction ~ 1 + days + (1 + days | subj)", sleep,
                                          REML=True),
        "sleep-zerocorr-weights": mm.LinearMixedModel(
            "reaction ~ 1 + days + (1 + days || subj)", sleep_w, weights="w", REML=True),
        "penicillin": mm.LinearMixedModel("diameter ~ 1 + (1 | plate) + (1 | sample)", pen,
                                          REML=True),
        "crossed": mm.LinearMixedModel("y ~ 1 + x + (1 + x | a) + (1 | b)", crossed),
    }


MODELS = _models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_objective_matches_its_python_twin(name):
    model = MODELS[name]
    kernel = compiled_objective(model)
    rng = np.random.default_rng(11)
    lower = model.layout.lower
    for _ in range(5):
        theta = np.where(np.isfinite(lower), rng.uniform(0.0, 2.0, lower.size),
                         rng.normal(0.0, 0.5, lower.size))
        assert kernel(theta) == pytest.approx(model._objective_unchecked(theta), rel=1e-13)
    zero = np.zeros(lower.size)         # Λ = 0: the linear model, no singularity
    assert kernel(zero) == pytest.approx(model._objective_unchecked(zero), rel=1e-13)


def test_objective_is_infinite_where_the_fixed_effects_are_collinear():
    df = mm.dataset("sleepstudy").assign(d2=lambda d: 2.0 * d.days)
    model = mm.LinearMixedModel("reaction ~ 1 + days + (1 | subj)", df)
    kernel = compiled_objective(model)
    ws = model.workspace
    # the product X'X of a collinear pair (written past the model's own rank check)
    x = np.column_stack([np.ones(len(df)), df.days, df.d2, df.reaction])
    ws.set_products(x, None)
    theta = np.array([0.8])
    assert kernel(theta) == np.inf
    assert model._objective_unchecked(theta) == np.inf


@pytest.mark.parametrize("name", ["sleep-ml", "sleep-reml", "sleep-zerocorr-weights"])
def test_one_term_gradient_matches_the_dense_reference(name):
    model = MODELS[name]
    kernel = compiled_objective(model)
    assert isinstance(kernel, OneTermGradient)
    for theta in (np.array([0.9, 0.02, 0.22])[:model.layout.ntheta],
                  np.array([1.7, -0.4, 0.6])[:model.layout.ntheta]):
        if model.layout.ntheta == 2:
            theta = np.abs(theta[:2])
        val, grad = kernel.value_and_gradient(theta)
        assert val == pytest.approx(model.objective(theta), rel=1e-13)
        np.testing.assert_allclose(grad, _dense_gradient(model, theta), rtol=1e-8, atol=1e-8)


def test_one_term_sums_match_the_per_level_twin():
    model = MODELS["sleep-reml"]
    theta = np.array([1.1, -0.3, 0.4])
    ktrace, rss, schur = one_term_sums_numpy(model, theta)
    pwrss = model._evaluate(theta)[3]
    g = 2.0 * (ktrace - model._dfr / pwrss * rss - schur)
    want = np.array([g[e, a] for _, e, a in model.layout.entries])
    np.testing.assert_allclose(compiled_objective(model).value_and_gradient(theta)[1], want,
                               rtol=1e-11, atol=1e-9)


def test_one_term_gradient_is_nan_where_singular():
    df = mm.dataset("sleepstudy").assign(d2=lambda d: 2.0 * d.days)
    model = mm.LinearMixedModel("reaction ~ 1 + days + (1 | subj)", df)
    kernel = compiled_objective(model)
    x = np.column_stack([np.ones(len(df)), df.days, df.d2, df.reaction])
    model.workspace.set_products(x, None)
    val, grad = kernel.value_and_gradient(np.array([0.8]))
    assert val == np.inf and np.isnan(grad).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bobyqa_takes_the_python_searchs_steps(name):
    model = MODELS[name]
    x0 = model.layout.initial()
    step = np.full(x0.size, 0.75)

    def search(objective):
        optsum = OptSummary(initial=x0, lowerbd=model.layout.lower, initial_step=step,
                            ftol_rel=1e-10)
        return minimize(objective, optsum)

    compiled = search(compiled_objective(model))
    python = search(model._objective_unchecked)
    assert compiled.feval == python.feval
    assert compiled.returnvalue == python.returnvalue
    for (xc, fc), (xp, fp) in zip(compiled.fitlog, python.fitlog):
        np.testing.assert_allclose(xc, xp, rtol=1e-12, atol=1e-14)
        assert fc == pytest.approx(fp, rel=1e-13)
    assert compiled.fmin == pytest.approx(python.fmin, rel=1e-13)
    np.testing.assert_allclose(compiled.final, python.final, rtol=1e-12, atol=1e-14)


def test_fit_without_the_c_api_is_the_same(monkeypatch):
    df = mm.dataset("sleepstudy")
    form = "reaction ~ 1 + days + (1 + days | subj)"
    fast = mm.fit(form, df)
    monkeypatch.setattr(_search, "available", lambda: False)
    slow = mm.fit(form, df)
    assert fast.objective == pytest.approx(slow.objective, rel=1e-13)
    np.testing.assert_allclose(fast.theta, slow.theta, rtol=1e-9)
    assert fast.optsum.feval == slow.optsum.feval


def test_an_error_inside_the_search_is_raised_after_it():
    model = MODELS["sleep-ml"]
    # three θ for a factorizer that takes three, declared as two: the factorizer refuses
    wrong = LmmObjective(model.workspace.factorizer, 2, float(model._dfr),
                         float(model._logw), False, 0.0)
    with pytest.raises(ValueError, match="wrong length"):
        _search.bobyqa(wrong, np.ones(2), np.zeros(2), None, 1e-8, 1e-8, 1e-10, 100)


def _searched(model, ftol_rel):
    optsum = OptSummary(initial=model.layout.initial(), lowerbd=model.layout.lower,
                        initial_step=np.full(model.layout.ntheta, 0.75), ftol_rel=ftol_rel)
    return minimize(model._objective_unchecked, optsum)


def _singular_model():
    # a slope variance at zero: θ₂₂ on its bound at the optimum
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(12), 8)
    x = np.tile(np.arange(8.0), 12)
    y = 1.0 + 0.3 * x + rng.normal(0, 0.8, 12)[g] + rng.normal(size=g.size)
    df = pd.DataFrame({"g": g.astype(str), "x": x, "y": y})
    return mm.LinearMixedModel("y ~ 1 + x + (1 + x | g)", df)


@pytest.mark.parametrize("name", sorted(MODELS) + ["singular"])
@pytest.mark.parametrize("ftol_rel", [1e-5, 1e-8])
def test_compiled_check_takes_the_python_checks_steps(name, ftol_rel):
    import copy

    from mixedmodels._optimize import check_with_exact_gradient, rectify
    model = _singular_model() if name == "singular" else MODELS[name]
    start = _searched(model, ftol_rel)
    rectify(model._objective_unchecked, start, np.flatnonzero(np.isfinite(model.layout.lower)))
    results = []
    for kernel in (compiled_objective(model), None):
        optsum = copy.copy(start)
        optsum.fitlog = list(start.fitlog)
        record = check_with_exact_gradient(
            lambda th: model._value_and_gradient(th), optsum, warn=False, max_steps=8,
            kernel=kernel)
        results.append((optsum, record))
    (oc, rc), (op, rp) = results
    assert len(oc.fitlog) == len(op.fitlog) and oc.polished == op.polished
    for (xc, fc), (xp, fp) in zip(oc.fitlog, op.fitlog):
        # the same steps to their rounding; each value the objective's at its own point
        # (near the optimum the objective wobbles by 1e-13 over changes of θ of 1e-12)
        np.testing.assert_allclose(xc, xp, rtol=1e-10, atol=1e-13)
        assert fc == pytest.approx(model._objective_unchecked(xc), rel=1e-14)
        assert fc == pytest.approx(fp, rel=1e-12)
    np.testing.assert_allclose(oc.final, op.final, rtol=1e-10, atol=1e-13)
    assert oc.fmin == pytest.approx(op.fmin, rel=1e-12)
    np.testing.assert_allclose(rc.hessian, rp.hessian, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(rc.gradient, rp.gradient, rtol=1e-8, atol=1e-9)
    assert rc.messages == rp.messages and rc.nfeval == rp.nfeval
    # both Hessians are forward differences of the exact gradient, and say so
    assert rc.stencil == rp.stencil == "forward"
    if name == "singular":
        assert oc.final[-1] == 0.0 and np.isnan(rc.scaled_gradient[-1])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_solution_matches_the_python_optimum(name):
    model = MODELS[name]
    theta = np.where(np.isfinite(model.layout.lower), 0.7, 0.1)
    compiled = model._optimum(theta, compiled_objective(model))
    python = model._optimum(theta)
    assert compiled.keys() == python.keys()
    for key, want in python.items():
        np.testing.assert_allclose(compiled[key], want, rtol=1e-11, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", ["sleep-reml", "penicillin", "crossed"])
def test_a_result_kept_is_not_reused_after_a_compiled_factorization(name):
    # _optimum reuses the factorization _evaluate kept when none was made since; the
    # compiled calls factor too, and the workspace's count must see them
    model = MODELS[name]
    kernel = compiled_objective(model)
    theta_a = np.where(np.isfinite(model.layout.lower), 0.6, 0.2)
    theta_b = np.where(np.isfinite(model.layout.lower), 1.3, -0.1)
    want = model._optimum(theta_a)
    for factor_elsewhere in (lambda: kernel(theta_b),
                             lambda: kernel.solution(theta_b),
                             lambda: _search.bobyqa(kernel, theta_b, model.layout.lower, None,
                                                    1e-3, 1e-3, 1e-6, 5)):
        model._evaluate(theta_a)
        factor_elsewhere()
        got = model._optimum(theta_a)
        for key in ("objective", "coef", "u", "vcov"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)

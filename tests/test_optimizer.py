"""The optimizers: the step-by-step L-BFGS-B loop against scipy's public one, the
boundary probe, and the LMM's choice of optimizer."""
import numpy as np
import pytest

import mixedmodels as mm
from mixedmodels._optimize import (OptSummary, _lbfgsb_public, lbfgsb, leave_the_bound,
                                   minimize_with_gradient)


def _rosenbrock_bounded(log):
    def f(x):
        log.append(np.array(x, dtype=float))
        a, b = x[0], x[1]
        val = (1 - a) ** 2 + 100 * (b - a * a) ** 2 + (x[2] - 0.3) ** 2
        grad = np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a),
                         2 * (x[2] - 0.3)])
        return val, grad
    return f


@pytest.mark.parametrize("lower", [[-np.inf, -np.inf, -np.inf], [-np.inf, 0.0, 0.5]])
def test_the_loop_takes_scipys_iterates(lower):
    """Driving the compiled routine directly changes nothing but the overhead: the same
    points, in the same order, as scipy.optimize.minimize(method="L-BFGS-B")."""
    ours, theirs = [], []
    x0 = np.array([-1.2, 1.0, 2.0])
    lower = np.array(lower)
    ok1, _ = lbfgsb(_rosenbrock_bounded(ours), x0, lower, maxfun=500, ftol=1e-14, gtol=1e-7)
    ok2, _ = _lbfgsb_public(_rosenbrock_bounded(theirs), x0, lower, maxfun=500, ftol=1e-14,
                            gtol=1e-7)
    assert ok1 and ok2
    assert len(ours) == len(theirs) > 10
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    # the bounded run ends on its bound for the last coordinate, the minimum of the
    # unbounded problem (x2 = 0.3) being below it
    if np.isfinite(lower[2]):
        assert ours[-1][2] == 0.5


def test_a_function_without_progress_is_reported_not_hidden():
    """A gradient that points the wrong way makes the line search fail: no success."""
    def wrong(x):
        return float(x @ x), -2 * x
    ok, message = lbfgsb(wrong, np.array([1.0, 2.0]), np.array([-np.inf, -np.inf]),
                         maxfun=50, ftol=1e-14, gtol=1e-7)
    assert not ok and message


def test_the_probe_leaves_a_bound_that_is_no_minimum():
    """f(t) = (t² - 1)², even in t: its derivative vanishes at t = 0, a maximum. From
    t = 0 a bounded search stays there; the probe at 0.01 sees the way down to t = 1."""
    def f(x):
        t = x[0]
        return (t * t - 1) ** 2, np.array([4 * t * (t * t - 1)])
    opt = OptSummary(initial=np.array([0.0]), lowerbd=np.array([0.0]))
    minimize_with_gradient(f, opt)
    assert opt.final[0] == 0.0
    leave_the_bound(f, opt, [0])
    assert opt.final[0] == pytest.approx(1.0, abs=1e-6)
    assert opt.fmin == pytest.approx(0.0, abs=1e-10)


def test_lmm_optimizers_reach_the_same_optimum():
    """penicillin (two crossed scalar terms): L-BFGS-B with the exact gradient, the default
    trust-region search and BOBYQA end at lme4's optimum; the record says which ran."""
    data = mm.dataset("penicillin")
    form = "diameter ~ 1 + (1 | plate) + (1 | sample)"
    auto = mm.LinearMixedModel(form, data).fit()
    lbfgs = mm.LinearMixedModel(form, data).fit(optimizer="lbfgs")
    bobyqa = mm.LinearMixedModel(form, data).fit(optimizer="bobyqa")
    assert auto.optsum.optimizer == "TRUST_REGION_BFGS"
    assert bobyqa.optsum.optimizer == "LN_BOBYQA"
    assert abs(bobyqa.objective - auto.objective) < 1e-9
    assert lbfgs.optsum.optimizer == "L-BFGS-B"
    # lme4 (tests/reference/lme4_inference.json, penicillin_ml): 332.188348668501
    assert lbfgs.objective <= 332.188348668501 + 1e-8
    assert lbfgs.objective == pytest.approx(332.188348668501, abs=1e-6)
    assert abs(lbfgs.objective - auto.objective) < 1e-9
    np.testing.assert_allclose(lbfgs.theta, auto.theta, rtol=1e-7)
    assert lbfgs.optsum.derivs.converged


def test_lmm_optimizer_argument_is_checked():
    m = mm.LinearMixedModel("yield ~ 1 + (1 | batch)", mm.dataset("dyestuff"))
    with pytest.raises(ValueError, match="optimizer"):
        m.fit(optimizer="newton")


def test_lmm_gradient_search_that_stops_short_is_continued(monkeypatch):
    """Where the check after L-BFGS-B fails (here: a search cut off after its first
    evaluation, at Λ = I; from 2 or 3 the BFGS-updated Newton steps of the check finish
    it), BOBYQA goes on from the best point and the fit ends at lme4's optimum."""
    import mixedmodels.lmm as lmm_module

    real = lmm_module.minimize_with_gradient

    def cut_short(value_and_grad, optsum, **kwargs):
        optsum.maxfeval = 1
        return real(value_and_grad, optsum, **kwargs)

    monkeypatch.setattr(lmm_module, "minimize_with_gradient", cut_short)
    data = mm.dataset("penicillin")
    fit = mm.LinearMixedModel("diameter ~ 1 + (1 | plate) + (1 | sample)",
                              data).fit(optimizer="lbfgs")
    assert fit.optsum.optimizer == "L-BFGS-B+LN_BOBYQA"
    assert fit.optsum.derivs.converged
    assert fit.objective == pytest.approx(332.188348668501, abs=1e-6)

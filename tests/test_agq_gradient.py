"""The exact gradient of the scalar AGQ deviance (_agq_gradient.py) against finite differences.

As in test_gradient.py, the finite differences are central, Richardson-extrapolated
differences of the function the optimizer minimizes (``model._joint_value``) over
(β̃, θ), one-sided at θ's bound. The gradient is held to GRADIENT_RTOL of the largest
component (or of 1 at an optimum, where the gradient vanishes and the deviance is of
order 10² to 10³). Measured: 1e-11 to 3e-9 relative away from the optimum, ~1e-8
absolute at it (the differences' own rounding: 1e-12 in the deviance over steps of
1e-4; 2e-7 for the slope of age, whose θ of 0.01 a step of 1e-4 resolves less well),
5e-10 to 2e-8 at θ = 0, where the differences are one-sided. The compiled kernel is
held to its NumPy twin, and nAGQ = 1 to the Laplace gradient of _gradient.py, at the
kernel tier. The last tests are of the one-stage search that uses the gradient.
"""
import warnings

import numpy as np
import pytest
from conftest import KERNEL, joint_optimum, OBJECTIVE_ABS

import mixedmodels as mm
from mixedmodels._agq_gradient import (
    _value_and_gradient_at_modes,
    agq_gradient,
    agq_value_and_gradient,
    supports_agq_gradient,
    value_and_gradient_numpy,
)
from mixedmodels._derivs import finite_difference_derivatives
from mixedmodels._gradient import laplace_gradient

# the brief of the issue: ~1e-6 relative against Richardson differences
GRADIENT_RTOL = 1e-6


def _contra(nagq):
    return mm.GeneralizedLinearMixedModel(
        "use ~ 1 + age + abs2(age) + urban + livch + (1 | dist)", mm.dataset("contra"),
        mm.Bernoulli(), nAGQ=nagq)


def _cbpp(nagq):
    return mm.GeneralizedLinearMixedModel(
        "incid / hsz ~ 1 + period + (1 | herd)", mm.dataset("cbpp"), mm.Binomial(),
        weights="hsz", nAGQ=nagq)


def _grouseticks(nagq):
    # one observation per level of index: the observation-level random effect
    return mm.GeneralizedLinearMixedModel(
        "ticks ~ 1 + year + (1 | index)", mm.dataset("grouseticks"), mm.Poisson(), nAGQ=nagq)


def _slope(nagq):
    # a scalar term whose column is not 1: z enters the gradient as z, z² and z³
    return mm.GeneralizedLinearMixedModel(
        "use ~ 1 + age + urban + (0 + age | dist)", mm.dataset("contra"), mm.Bernoulli(),
        nAGQ=nagq)


def _offset(nagq):
    g = mm.dataset("grouseticks")
    offset = 0.1 * (g.height.to_numpy() - g.height.mean()) / g.height.std()
    return mm.GeneralizedLinearMixedModel("ticks ~ 1 + year + (1 | brood)", g, mm.Poisson(),
                                          nAGQ=nagq, offset=offset)


CASES = {
    "contra_agq3": lambda: _contra(3),
    "contra_agq9": lambda: _contra(9),
    "contra_agq25": lambda: _contra(25),
    "cbpp_agq9": lambda: _cbpp(9),
    "grouseticks_agq9": lambda: _grouseticks(9),
    "contra_slope_agq7": lambda: _slope(7),
    "grouseticks_offset_agq5": lambda: _offset(5),
}

def fitted(name):
    """(model, its joint optimum [β̃, θ]), fitted once per session."""
    return joint_optimum(CASES, name)


def perturbed(model, x):
    """A point away from the optimum: ±0.05 on every β̃, θ times 1.3 (on its own scale,
    which for the slope of age is 0.01, and away from its bound)."""
    y = x + 0.05 * np.where(np.arange(x.size) % 2 == 0, 1.0, -1.0)
    y[model.p:] = 1.3 * x[model.p:]
    return y


def finite_differences(model, x):
    lower = np.concatenate([np.full(model.p, -np.inf), model.layout.lower])
    grad, _ = finite_difference_derivatives(model._joint_value, x, lower=lower,
                                            richardson=True)
    return grad


def assert_gradient(got, want, what):
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=0, atol=GRADIENT_RTOL * scale, err_msg=what)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("where", ["optimum", "perturbed", "large_theta"])
def test_gradient_matches_finite_differences(name, where):
    model, x = fitted(name)
    assert model.path == "block-diagonal"
    if where == "perturbed":
        x = perturbed(model, x)
    elif where == "large_theta":
        x = x.copy()
        x[model.p:] = 2.0
    p = model.p
    value, grad = agq_value_and_gradient(model, x[p:], x[:p])
    assert value == pytest.approx(model._joint_value(x), rel=1e-12)
    assert_gradient(grad, finite_differences(model, x), f"{name} at the {where}")
    if where == "optimum":
        # the fit stopped where the gradient vanishes, to the optimizer's tolerance
        assert np.max(np.abs(grad)) < 1e-2


@pytest.mark.parametrize("name", ["cbpp_agq9", "grouseticks_agq9"])
def test_gradient_on_the_boundary(name):
    # θ = 0: the nodes spread over u alone, every node weight is w_k; one-sided differences
    model, x = fitted(name)
    x = x.copy()
    x[model.p:] = 0.0
    grad = agq_gradient(model, x[model.p:], x[:model.p])
    assert_gradient(grad, finite_differences(model, x), f"{name} at θ = 0")


@pytest.mark.parametrize("name", ["contra_agq9", "cbpp_agq9", "grouseticks_agq9",
                                  "contra_slope_agq7"])
def test_one_node_is_the_laplace_gradient(name):
    model, x = fitted(name)
    x = perturbed(model, x)
    p = model.p
    one = agq_gradient(model, x[p:], x[:p], nAGQ=1)
    model.nAGQ, saved = 1, model.nAGQ
    try:
        laplace = laplace_gradient(model, x[p:], x[:p])
    finally:
        model.nAGQ = saved
    np.testing.assert_allclose(one, laplace, rtol=0, atol=KERNEL * np.max(np.abs(laplace)))


@pytest.mark.parametrize("name", ["contra_agq9", "cbpp_agq9", "grouseticks_agq9",
                                  "contra_slope_agq7", "grouseticks_offset_agq5"])
@pytest.mark.parametrize("nagq", [2, 7, 12])
@pytest.mark.parametrize("where", ["perturbed", "boundary"])
def test_kernel_matches_numpy_twin(name, nagq, where):
    model, x = fitted(name)
    x = perturbed(model, x)
    if where == "boundary":
        x[model.p:] = 0.0
    p = model.p
    theta, beta = x[p:], x[:p]
    _, u, _ = model._value(theta, beta, 1.0, nAGQ=1)        # the state at the modes
    v1, g1 = _value_and_gradient_at_modes(model, theta, u, nagq, model.family)
    v2, g2 = value_and_gradient_numpy(model, theta, u, nagq)
    assert v1 == pytest.approx(v2, rel=KERNEL)
    np.testing.assert_allclose(g1, g2, rtol=0, atol=KERNEL * max(1.0, np.max(np.abs(g2))))
    # the kernel's value is the one agq_deviance forms, to the last bit
    assert v1 == model._agq(theta, beta, u, nagq, model.family, model.prior_w)


def test_what_it_covers():
    contra = mm.dataset("contra")
    assert _contra(9).has_gradient and _cbpp(5).has_gradient and _grouseticks(3).has_gradient
    vector = mm.GeneralizedLinearMixedModel("use ~ 1 + age + (1 + urban | dist)", contra,
                                            mm.Bernoulli(), nAGQ=3)
    probit = mm.GeneralizedLinearMixedModel("use ~ 1 + age + (1 | dist)", contra,
                                            mm.Bernoulli(link="probit"), nAGQ=3)
    for model in (vector, probit):
        assert not supports_agq_gradient(model) and not model.has_gradient
        with pytest.raises(NotImplementedError, match="scalar random-effects term"):
            agq_gradient(model, [1.0] * model.layout.ntheta, model.beta0)
        with pytest.raises(ValueError, match="bobyqa"):
            model.fit(optimizer="lbfgs")


@pytest.mark.parametrize("make", [lambda: _contra(9), lambda: _cbpp(9)],
                         ids=["contra_agq9", "cbpp_agq9"])
def test_gradient_fit_is_the_derivative_free_optimum(make):
    """One L-BFGS-B stage reaches BOBYQA's two-stage optimum (or a lower one)."""
    lbfgs = make().fit()
    bobyqa = make().fit(optimizer="bobyqa")
    assert lbfgs.optsum.optimizer == "L-BFGS-B" and lbfgs.optsum_fast is None
    assert bobyqa.optsum.optimizer == "LN_BOBYQA" and bobyqa.optsum_fast is not None
    assert lbfgs.objective <= bobyqa.objective + 1e-9
    assert lbfgs.objective == pytest.approx(bobyqa.objective, abs=OBJECTIVE_ABS)
    np.testing.assert_allclose(lbfgs.theta, bobyqa.theta, rtol=1e-5)
    np.testing.assert_allclose(lbfgs.coef, bobyqa.coef, rtol=1e-5, atol=1e-7)
    # the convergence check took its Hessian from forward gradient differences in θ (the
    # β block from PIRLS's factor): one gradient for θ, and the gradient at the optimum
    assert lbfgs.optsum.derivs.converged and lbfgs.optsum.derivs.stencil == "forward+known"
    assert lbfgs.optsum.derivs.nfeval == 1 + 1


# -- the one-stage search's two safeguards (glmm.py, _fit_with_gradient) ----------------
def _simulated(seed, n, groups, sd):
    """Bernoulli and Poisson responses with one random intercept of standard deviation sd."""
    import pandas as pd
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, n)
    x = rng.normal(size=n)
    b = rng.normal(scale=sd, size=groups)
    return pd.DataFrame({
        "y": (rng.random(n) < 1.0 / (1.0 + np.exp(-(0.3 + 0.5 * x + b[g])))).astype(float),
        "c": rng.poisson(np.exp(0.5 + 0.3 * x + b[g])), "x": x, "g": g.astype(str)})


@pytest.mark.parametrize("nagq", [1, 5])
@pytest.mark.parametrize("response, family, seed", [("y", mm.Bernoulli, 10), ("c", mm.Poisson, 9)],
                         ids=["bernoulli", "poisson"])
def test_the_search_leaves_a_saddle_on_the_bound(nagq, response, family, seed):
    """The deviance is even in θ, so its derivative vanishes at θ = 0: on these data
    L-BFGS-B's line search put θ on the bound and stopped there, 0.6 (Bernoulli) and
    0.9 (Poisson) above the optimum, which BOBYQA finds. (With nAGQ = 1 the search is
    the compiled trust region of _glmm_search; its bound probe must find it too.)"""
    data = _simulated(seed, 600, 30, 0.0)
    formula = f"{response} ~ 1 + x + (1 | g)"
    lbfgs = mm.GeneralizedLinearMixedModel(formula, data, family(), nAGQ=nagq).fit()
    bobyqa = mm.GeneralizedLinearMixedModel(formula, data, family(),
                                            nAGQ=nagq).fit(optimizer="bobyqa")
    assert lbfgs.optsum.optimizer == ("TRUST_REGION_BFGS" if nagq == 1 else "L-BFGS-B")
    assert lbfgs.theta[0] > 0.05 and not lbfgs.singular
    assert lbfgs.objective <= bobyqa.objective + 1e-9
    np.testing.assert_allclose(lbfgs.theta, bobyqa.theta, rtol=1e-4)


def test_the_search_restarts_where_the_check_fails():
    """L-BFGS-B reported success 1.3e-4 above the optimum (a line search that met
    non-finite values came back with a step of zero); the failed convergence check
    restarts it."""
    data = _simulated(7, 400, 15, 0.3)
    formula = "c ~ 1 + x + (1 | g)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no convergence warning
        lbfgs = mm.GeneralizedLinearMixedModel(formula, data, mm.Poisson(), nAGQ=7).fit()
    bobyqa = mm.GeneralizedLinearMixedModel(formula, data, mm.Poisson(),
                                            nAGQ=7).fit(optimizer="bobyqa")
    assert lbfgs.optsum.optimizer == "L-BFGS-B" and lbfgs.optsum.derivs.converged
    assert lbfgs.objective <= bobyqa.objective + 1e-9
    np.testing.assert_allclose(lbfgs.theta, bobyqa.theta, rtol=1e-4)

"""The level-wise AGQ kernels of _kernels/_agq.pyx against their NumPy twin
(_agq_numpy.py), against each other (the product form of exp(η) against an exp per
pair) and against the generic kernel they replace for their families
(_kernels._glm.agq_deviance, which keeps every other family and link).

The kernels cover Bernoulli and Binomial with the logit link and Poisson with the log
link; the cases take each of their loops: equal prior weights and unequal ones, a
Binomial with trials, levels of one row (an observation-level effect), a term whose
column is not constant (no product form), rows not sorted by level, linear predictors
beyond the product form's bound and in the clamps' range, θ = 0.
"""
import numpy as np
import pytest
from conftest import KERNEL

import mixedmodels as mm
from mixedmodels import _agq_numpy
from mixedmodels._agq import (
    agq_deviance,
    agq_deviance_numpy,
    gauss_hermite_normal,
    kernel_kind,
    level_rows,
)
from mixedmodels._agq_gradient import _inputs as gradient_inputs
from mixedmodels._kernels import _agq, _glm

# the value is a sum of ~10³ terms of either sign: the kernels' own rearrangements of it
# (the product of 1 + e per block, the constants apart) move it by ~1e-14 relative
VALUE_RTOL = 1e-12


def _contra(weights=None, shuffle=False, formula="use ~ 1 + age + abs2(age) + urban + (1 | dist)"):
    data = mm.dataset("contra")
    if weights is not None:
        data = data.assign(w=weights(len(data)))
    if shuffle:
        data = data.sample(frac=1.0, random_state=3).reset_index(drop=True)
    return mm.GeneralizedLinearMixedModel(formula, data, mm.Bernoulli(),
                                          weights="w" if weights is not None else None)


def _cbpp():
    return mm.GeneralizedLinearMixedModel("incid / hsz ~ 1 + period + (1 | herd)",
                                          mm.dataset("cbpp"), mm.Binomial(), weights="hsz")


def _grouseticks(term):
    g = mm.dataset("grouseticks")
    offset = 0.1 * (g.height.to_numpy() - g.height.mean()) / g.height.std()
    return mm.GeneralizedLinearMixedModel(f"ticks ~ 1 + year + {term}", g, mm.Poisson(),
                                          offset=offset)


CASES = {
    "bernoulli": lambda: _contra(),
    "bernoulli_shuffled": lambda: _contra(shuffle=True),
    "bernoulli_equal_weights": lambda: _contra(weights=lambda n: np.full(n, 2.0)),
    "bernoulli_weights": lambda: _contra(weights=lambda n: 1.0 + (np.arange(n) % 3)),
    "bernoulli_slope": lambda: _contra(formula="use ~ 1 + age + urban + (0 + age | dist)"),
    "binomial_trials": _cbpp,
    "poisson_offset": lambda: _grouseticks("(1 | brood)"),
    "poisson_one_row_levels": lambda: _grouseticks("(1 | index)"),
}
THETA = {"bernoulli_slope": 0.03}
_MODELS = {}


def model_at_modes(name, theta=None, shift=0.0):
    """The case's model with PIRLS at a point away from the GLM's start (the state and
    factor at its modes), and that point (θ, β̃)."""
    if name not in _MODELS:
        _MODELS[name] = CASES[name]()
    model = _MODELS[name]
    theta = np.array([THETA.get(name, 0.8) if theta is None else theta])
    beta = model.beta0 + 0.05 * np.where(np.arange(model.p) % 2 == 0, 1.0, -1.0)
    beta[0] += shift
    model._u = None
    _, u, _ = model._value(theta, beta, 1.0, nAGQ=1)
    return model, theta, beta, u


def kernel_args(model, theta, u, nagq):
    """The kernels' arguments at the modes PIRLS has left."""
    fam = model.family
    kind = kernel_kind(fam)
    rows = level_rows(model, fam, model.prior_w)
    nodes, weights = gauss_hermite_normal(nagq)
    sd = 1.0 / model.workspace.blockdiag_diagonal()
    return (kind, model.state.fixed.copy(), float(theta[0]), rows.z, rows.y, rows.yb, rows.w,
            rows.wc, rows.order, rows.starts, np.array(u), sd, nodes, weights, rows.rowconst)


def value_gradient(module, args, model, **kw):
    r = np.empty(model.n)
    value, gtheta = module.agq_value_gradient(*args, model.state.wrkwt, model.state.mu, r, **kw)
    return value, np.concatenate([model.X.T @ r, [gtheta]])


def assert_gradient(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=KERNEL * max(1.0, np.max(np.abs(want))))


def test_the_cases_take_every_loop():
    shuffled = model_at_modes("bernoulli_shuffled")[0]
    assert np.any(np.diff(shuffled.reterms[0].codes) < 0)
    kinds = {name: kernel_kind(CASES[name]().family) for name in ("bernoulli", "binomial_trials",
                                                                  "poisson_offset")}
    assert kinds == {"bernoulli": _agq.KIND_LOGIT, "binomial_trials": _agq.KIND_LOGIT,
                     "poisson_offset": _agq.KIND_POISSON}
    weighting = [("bernoulli", True, 1.0), ("bernoulli_equal_weights", True, 2.0),
                 ("bernoulli_weights", False, None), ("binomial_trials", False, None)]
    for name, uniform, wc in weighting:
        model = model_at_modes(name)[0]
        rows = level_rows(model, model.family, model.prior_w)
        assert (rows.w.size == 0) == uniform and (wc is None or rows.wc == wc)
    one_row = model_at_modes("poisson_one_row_levels")[0]
    assert np.all(np.diff(level_rows(one_row, one_row.family, one_row.prior_w).starts) == 1)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("nagq", [1, 2, 7, 12])
def test_kernels_match_the_numpy_twin(name, nagq):
    model, theta, _beta, u = model_at_modes(name)
    args = kernel_args(model, theta, u, nagq)
    value = _agq.agq_deviance(*args)
    assert value == pytest.approx(_agq_numpy.agq_deviance(*args), rel=VALUE_RTOL)
    got_value, got = value_gradient(_agq, args, model)
    want_value, want = value_gradient(_agq_numpy, args, model)
    assert got_value == value                       # the same arithmetic, to the bit
    assert got_value == pytest.approx(want_value, rel=VALUE_RTOL)
    assert_gradient(got, want)


@pytest.mark.parametrize("name", ["bernoulli", "bernoulli_shuffled", "bernoulli_equal_weights",
                                  "poisson_offset"])
@pytest.mark.parametrize("nagq", [2, 9])
def test_the_product_form_is_the_exp_per_pair(name, nagq):
    model, theta, _beta, u = model_at_modes(name)
    args = kernel_args(model, theta, u, nagq)
    product, plain = _agq.agq_deviance(*args), _agq.agq_deviance(*args, product=False)
    assert product == pytest.approx(plain, rel=1e-14)
    got_value, got = value_gradient(_agq, args, model)
    plain_value, want = value_gradient(_agq, args, model, product=False)
    assert got_value == product and plain_value == plain
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.max(np.abs(want)))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("nagq", [1, 3, 9, 25])
def test_the_value_is_the_generic_kernels(name, nagq):
    """_kernels._glm.agq_deviance is what these kernels replace for their families: the
    same value, the rows' arithmetic rearranged."""
    model, theta, beta, u = model_at_modes(name)
    term, _z, zlam, sd, nodes, weights = gradient_inputs(model, theta, nagq)
    nlev, fam = term.nlevels, model.family
    generic = _glm.agq_deviance(fam.code, fam.link.code, model.state.fixed, zlam, term.codes,
                                model.y, model.prior_w, u, sd, nodes, weights, np.empty(nlev),
                                np.empty(nlev), np.empty(nlev), fam.param)
    assert agq_deviance(model, theta, beta, u, nagq, working=True) == pytest.approx(
        generic, rel=VALUE_RTOL)


# (PIRLS need not settle that far out: the kernels are held to the twin at its modes)
@pytest.mark.filterwarnings("ignore:PIRLS did not converge")
@pytest.mark.parametrize("name", ["bernoulli", "bernoulli_weights", "poisson_offset"])
@pytest.mark.parametrize("shift", [-45.0, 45.0, -720.0, 720.0])
def test_far_linear_predictors(name, shift):
    """η beyond the logit clamp (|η| > 36), and beyond the product form's bound (|η̂|
    of 665-722 at ±720), where exp(η) would overflow: the loops that take no product
    form, finite values."""
    if name == "poisson_offset" and shift > 0:
        shift = 3.0 if shift < 100 else 6.0            # exp(η) of counts stays finite
    model, theta, _beta, u = model_at_modes(name, shift=shift)
    for nagq in (2, 9):
        args = kernel_args(model, theta, u, nagq)
        value, got = value_gradient(_agq, args, model)
        want_value, want = value_gradient(_agq_numpy, args, model)
        assert np.isfinite(value) and np.all(np.isfinite(got))
        assert value == pytest.approx(want_value, rel=VALUE_RTOL)
        assert_gradient(got, want)
        assert value == pytest.approx(_agq.agq_deviance(*args, product=False), rel=1e-14)


@pytest.mark.parametrize("name", ["bernoulli", "binomial_trials", "poisson_offset"])
def test_no_theta_derivative_at_theta_zero(name):
    """The deviance is even in θ: its derivative at 0 is 0 exactly (not the rounding of
    a sum that cancels), on which glmm.py's search off the bound relies."""
    model, theta, _beta, u = model_at_modes(name, theta=0.0)
    args = kernel_args(model, theta, u, 7)
    _, grad = value_gradient(_agq, args, model)
    assert grad[-1] == 0.0
    _, twin = value_gradient(_agq_numpy, args, model)
    assert twin[-1] == 0.0
    assert_gradient(grad, twin)


def test_the_level_rows_follow_the_prior_weights():
    model, theta, beta, u = model_at_modes("bernoulli")
    rows = level_rows(model, model.family, model.prior_w)
    assert level_rows(model, model.family, model.prior_w) is rows
    doubled = 2.0 * model.prior_w
    other = level_rows(model, model.family, doubled)
    assert other is not rows and other.wc == 2.0
    # Bernoulli deviances are linear in the weights, constants included
    value = agq_deviance(model, theta, beta, u, 5, working=True)
    twice = agq_deviance(model, theta, beta, u, 5, working=True, prior_w=doubled)
    assert twice == pytest.approx(agq_deviance_numpy(model, theta, beta, u, 5, working=True,
                                                     prior_w=doubled), rel=VALUE_RTOL)
    assert twice != value


@pytest.mark.parametrize("family", [mm.Bernoulli(link="probit"), mm.Bernoulli(link="cloglog"),
                                    mm.Poisson(link="sqrt")])
def test_other_links_keep_the_generic_kernel(family):
    assert kernel_kind(family) is None
    model = mm.GeneralizedLinearMixedModel(
        "use ~ 1 + age + urban + (1 | dist)" if family.name == "Bernoulli"
        else "ticks ~ 1 + year + (1 | brood)",
        mm.dataset("contra" if family.name == "Bernoulli" else "grouseticks"), family)
    theta, beta = np.array([0.6]), model.beta0
    _, u, _ = model._value(theta, beta, 1.0, nAGQ=1)
    assert agq_deviance(model, theta, beta, u, 7, working=True) == pytest.approx(
        agq_deviance_numpy(model, theta, beta, u, 7, working=True), rel=KERNEL)


def test_bad_inputs_are_refused():
    model, theta, _beta, u = model_at_modes("bernoulli")
    args = list(kernel_args(model, theta, u, 5))

    def refused(i, value, match):
        bad = list(args)
        bad[i] = value
        with pytest.raises(ValueError, match=match):
            _agq.agq_deviance(*bad)
        with pytest.raises(ValueError, match=match):
            _agq.agq_value_gradient(*bad, model.state.wrkwt, model.state.mu, np.empty(model.n))

    refused(0, 7, "unknown AGQ kernel kind")
    refused(1, args[1][:-1], "per-observation")
    refused(6, np.ones(3), "per-observation")
    refused(8, np.full(model.n, model.n, dtype=np.int32), "out of range")
    starts = args[9].copy()
    starts[3], starts[4] = starts[4], starts[3]
    refused(9, starts, "must not decrease")
    refused(9, args[9][:-1], "per-level|run from 0")
    refused(11, args[11][:-1], "per-level")
    with pytest.raises(ValueError, match="length of fixed"):
        _agq.agq_value_gradient(*args, model.state.wrkwt[:-1], model.state.mu, np.empty(model.n))


def test_an_empty_level():
    """A level without rows contributes its prior alone: u² - 2 log s - 2 log Σ w_k
    exp((z_k² - v_k² + u²)/2), which at u = 0 and s = 1 is 0."""
    model, theta, _beta, u = model_at_modes("bernoulli")
    args = list(kernel_args(model, theta, u, 7))
    args[9] = np.concatenate([args[9], [model.n]]).astype(np.int32)
    args[10] = np.concatenate([args[10], [0.0]])
    args[11] = np.concatenate([args[11], [1.0]])
    assert _agq.agq_deviance(*args) == pytest.approx(_agq.agq_deviance(*kernel_args(
        model, theta, u, 7)), rel=1e-14, abs=0)
    assert _agq.agq_deviance(*args) == pytest.approx(_agq_numpy.agq_deviance(*args),
                                                     rel=VALUE_RTOL)

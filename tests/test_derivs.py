"""Finite-difference derivatives against algebra, and the convergence checks built on them."""
import math
import pickle
from dataclasses import FrozenInstanceError

import numpy as np
import pytest
from scipy.optimize import rosen, rosen_der, rosen_hess

from mixedmodels._derivs import (ConvergenceCheck, NonFiniteObjectiveError, assess_convergence,
                                 check_convergence, finite_difference_derivatives)

# Central differences with h = 1e-4 leave O(h^2) ~ 1e-8 relative truncation error and
# O(eps |f| / h^2) rounding in the Hessian: 1e-6 relative is the promised accuracy.
RTOL = 1e-6


def relerr(got, want):
    """Largest error relative to the largest exact entry (entries near zero included)."""
    got, want = np.asarray(got), np.asarray(want)
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


def hess_entry_err(got, want):
    """Largest error of an entry relative to its own scale sqrt(|H_ii H_jj|).

    The scale an off-diagonal entry is measured on (a correlation-like quantity), so that
    a badly scaled parameter's row is not hidden behind a large entry elsewhere.
    """
    d = np.sqrt(np.abs(np.diag(want)))
    return np.max(np.abs(got - want) / np.outer(d, d))


# -- test functions with known derivatives ------------------------------------------------

def quadratic(seed=0, n=4):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(n, n))
    A = M @ M.T + n * np.eye(n)
    b = rng.normal(size=n)

    def f(x):
        return 0.5 * x @ A @ x + b @ x + 3.0
    return f, A, b


def explog(x):
    a, b, c = x
    return math.exp(a * b) + math.log1p(c * c) + a * a * math.log(b) + math.cos(a * c)


def explog_grad(x):
    a, b, c = x
    e = math.exp(a * b)
    return np.array([b * e + 2 * a * math.log(b) - c * math.sin(a * c),
                     a * e + a * a / b,
                     2 * c / (1 + c * c) - a * math.sin(a * c)])


def explog_hess(x):
    a, b, c = x
    e = math.exp(a * b)
    s, co = math.sin(a * c), math.cos(a * c)
    aa = b * b * e + 2 * math.log(b) - c * c * co
    ab = e + a * b * e + 2 * a / b
    ac = -s - a * c * co
    bb = a * a * e - a * a / (b * b)
    cc = 2 * (1 - c * c) / (1 + c * c) ** 2 - a * a * co
    return np.array([[aa, ab, ac], [ab, bb, 0.0], [ac, 0.0, cc]])


def logistic_deviance(scale=1.0, beta_true=(0.5, 1.0, 0.01), seed=1, nobs=500):
    """-2 log-likelihood of a logistic regression, |f| ~ 1e3.

    The third predictor has standard deviation ``scale``; the deviance bends in its
    coefficient over about 1 / scale.
    """
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(nobs), rng.normal(size=nobs), scale * rng.normal(size=nobs)])
    y = (rng.random(nobs) < 1 / (1 + np.exp(-X @ np.array(beta_true)))).astype(float)

    def f(beta):
        eta = X @ beta
        return -2.0 * np.sum(y * eta - np.logaddexp(0.0, eta))

    def grad(beta):
        mu = 1 / (1 + np.exp(-X @ beta))
        return -2.0 * X.T @ (y - mu)

    def hess(beta):
        mu = 1 / (1 + np.exp(-X @ beta))
        return 2.0 * (X * (mu * (1 - mu))[:, None]).T @ X
    return f, grad, hess


def bounded(f, lower=None, upper=None, calls=None):
    """f, refusing any point outside the bounds (the test fails if one is asked for)."""
    def g(x):
        if lower is not None and np.any(x < lower):
            raise AssertionError(f"f evaluated below the lower bound at {x}")
        if upper is not None and np.any(x > upper):
            raise AssertionError(f"f evaluated above the upper bound at {x}")
        if calls is not None:
            calls.append(np.array(x))
        return f(x)
    return g


# -- derivatives -----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_is_exact(seed):
    f, A, b = quadratic(seed)
    x = np.random.default_rng(10 + seed).normal(size=4)
    g, H = finite_difference_derivatives(f, x)
    assert relerr(g, A @ x + b) < RTOL
    assert relerr(H, A) < RTOL
    assert np.array_equal(H, H.T)


@pytest.mark.parametrize("x", [[0.3, 1.2, -0.7], [1.1, 0.6, 0.4], [-0.5, 2.0, 1.5]])
def test_exp_log_combination(x):
    g, H = finite_difference_derivatives(explog, x)
    assert relerr(g, explog_grad(x)) < RTOL
    assert relerr(H, explog_hess(x)) < RTOL


@pytest.mark.parametrize("x", [[1.0, 1.0, 1.0, 1.0], [-1.2, 1.0, 0.5, 0.8], [0.3, -0.4, 2.0, 1.1]])
def test_rosenbrock(x):
    x = np.array(x)
    g, H = finite_difference_derivatives(rosen, x)
    H_exact = rosen_hess(x)
    assert relerr(H, H_exact) < RTOL
    if np.any(rosen_der(x)):
        assert relerr(g, rosen_der(x)) < RTOL
    else:   # the minimum: the gradient is zero, so hold it to an absolute scale
        assert np.max(np.abs(g)) < RTOL * np.max(np.abs(H_exact))


def test_deviance_with_small_parameters():
    """A deviance of order 1e3 with parameters of order 1 and 1e-2 (function scale 1)."""
    f, grad, hess = logistic_deviance(beta_true=(0.5, 1.0, 0.01))
    beta = np.array([0.4, 0.9, 0.012])
    assert abs(f(beta)) > 300
    g, H = finite_difference_derivatives(f, beta)
    assert relerr(g, grad(beta)) < RTOL
    assert relerr(H, hess(beta)) < RTOL
    # entry by entry, each to its own size
    assert np.max(np.abs(g - grad(beta)) / np.abs(grad(beta))) < RTOL
    assert hess_entry_err(H, hess(beta)) < RTOL


def test_richardson_for_a_badly_scaled_parameter():
    """Predictor of scale 100: the deviance bends over 0.01 in its coefficient.

    h = 1e-4 is then 1% of the scale and plain central differences keep only about
    four digits; the extrapolation cancels the h^2 term.
    """
    f, grad, hess = logistic_deviance(scale=100.0, beta_true=(0.5, 1.0, 0.01))
    beta = np.array([0.4, 0.9, 0.012])
    g, H = finite_difference_derivatives(f, beta)
    assert 1e-6 < relerr(g, grad(beta)) < 1e-3
    g, H, info = finite_difference_derivatives(f, beta, richardson=True, full_output=True)
    assert relerr(g, grad(beta)) < RTOL
    assert relerr(H, hess(beta)) < RTOL
    assert hess_entry_err(H, hess(beta)) < RTOL
    assert info.nfeval == 1 + 4 * 3 + 4 * 3      # axis ±h, ±2h; two points per pair and level


def test_evaluation_count():
    f, _, _ = quadratic(n=5)
    x = np.zeros(5) + 0.5
    calls = []
    g, H, info = finite_difference_derivatives(bounded(f, calls=calls), x, full_output=True)
    assert info.nfeval == len(calls) == 5 ** 2 + 5 + 1     # 1 + 2n + 2 per pair
    assert info.scheme == ("central",) * 5
    calls.clear()
    _, _, info = finite_difference_derivatives(bounded(f, calls=calls), x, fx=f(x),
                                               full_output=True)
    assert info.nfeval == len(calls) == 5 ** 2 + 5
    # a parameter on a lower bound: three points on its axis, and four for each of its
    # pairs (the product of first-derivative stencils)
    calls.clear()
    lower = np.array([-np.inf, 0.5, -np.inf, -np.inf, -np.inf])
    _, _, info = finite_difference_derivatives(bounded(f, lower, calls=calls), x, lower,
                                               full_output=True)
    assert info.nfeval == len(calls) == 1 + 2 * 4 + 3 + 4 * 3 + 4 * 4
    assert info.scheme[1] == "forward"


@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_richardson_evaluation_count(m):
    """With c central and m one-sided parameters and both step levels: 1 + 4c + 5m
    axis points, 4 per central pair, 8 per mixed pair, 7 per one-sided pair (one point
    shared between the levels); every point evaluated once."""
    f, A, b = quadratic(n=4)
    x = np.full(4, 0.25)
    lower = np.where(np.arange(4) < m, 0.25, -np.inf)
    calls = []
    g, H, info = finite_difference_derivatives(bounded(f, lower, calls=calls), x, lower,
                                               richardson=True, full_output=True)
    assert info.scheme.count("forward") == m
    c = 4 - m
    assert info.nfeval == len(calls) == (1 + 4 * c + 5 * m + 4 * (c * (c - 1) // 2)
                                         + 8 * m * c + 7 * (m * (m - 1) // 2))
    assert len({tuple(c) for c in calls}) == len(calls)
    assert relerr(g, A @ x + b) < RTOL and relerr(H, A) < RTOL


def test_default_step_and_explicit_steps():
    x = np.array([0.02, -3.0, 250.0])
    _, _, info = finite_difference_derivatives(lambda v: float(v @ v), x, full_output=True)
    assert np.allclose(info.step, [1e-4, 3e-4, 2.5e-2])
    f, A, b = quadratic(n=3)
    x = np.array([0.02, -3.0, 2.5])
    g, H, info = finite_difference_derivatives(f, x, step=[1e-3, 2e-3, 5e-3], full_output=True)
    assert np.allclose(info.step, [1e-3, 2e-3, 5e-3])
    assert relerr(g, A @ x + b) < RTOL and relerr(H, A) < RTOL
    with pytest.raises(ValueError, match="step"):
        finite_difference_derivatives(f, x, step=[1e-3, 0.0, 1e-3])
    with pytest.raises(ValueError, match="step"):
        finite_difference_derivatives(f, x, step=[1e-3, 1e-3])


# -- bounds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0.0, 0.3e-4, 0.99e-4])
def test_on_or_near_lower_bound_uses_forward_differences(offset):
    lower = np.array([-np.inf, 0.5, -np.inf])
    x = np.array([0.7, 0.5 + offset, -0.4])
    calls = []
    g, H, info = finite_difference_derivatives(bounded(explog, lower, calls=calls), x, lower,
                                               full_output=True)
    assert info.scheme == ("central", "forward", "central")
    assert min(c[1] for c in calls) >= 0.5
    assert relerr(g, explog_grad(x)) < RTOL
    assert relerr(H, explog_hess(x)) < RTOL


@pytest.mark.parametrize("richardson", [False, True])
def test_both_parameters_on_bounds(richardson):
    """Mixed partials with one-sided stencils in both directions, lower and upper."""
    lower = np.array([0.7, 0.5, -np.inf])
    upper = np.array([np.inf, np.inf, -0.4])
    x = np.array([0.7, 0.5, -0.4])
    g, H, info = finite_difference_derivatives(bounded(explog, lower, upper), x, lower, upper,
                                               richardson=richardson, full_output=True)
    assert info.scheme == ("forward", "forward", "backward")
    assert relerr(g, explog_grad(x)) < RTOL
    assert relerr(H, explog_hess(x)) < RTOL


def test_near_upper_bound_uses_backward_differences():
    f, A, b = quadratic(n=3)
    upper = np.array([1.0, np.inf, 2.0])
    x = np.array([1.0, 0.2, 2.0 - 0.5e-4])
    g, H, info = finite_difference_derivatives(bounded(f, upper=upper), x, upper=upper,
                                               full_output=True)
    assert info.scheme == ("backward", "central", "backward")
    assert relerr(g, A @ x + b) < RTOL and relerr(H, A) < RTOL


def test_narrow_interval_shrinks_the_step():
    f, A, b = quadratic(n=2)
    lower, upper = np.array([0.0, -np.inf]), np.array([2e-4, np.inf])
    for xi, scheme, h in [(0.5e-4, "central", 0.5e-4), (0.2e-4, "forward", 1.8e-4 / 3)]:
        x = np.array([xi, 0.3])
        g, H, info = finite_difference_derivatives(bounded(f, lower, upper), x, lower, upper,
                                                   full_output=True)
        assert info.scheme[0] == scheme
        assert info.step[0] == pytest.approx(h)
        assert relerr(g, A @ x + b) < RTOL and relerr(H, A) < RTOL


def test_bad_bounds_are_refused():
    f, _, _ = quadratic(n=2)
    with pytest.raises(ValueError, match="outside"):
        finite_difference_derivatives(f, [-1.0, 0.0], lower=[0.0, -np.inf])
    with pytest.raises(ValueError, match="cannot move"):
        finite_difference_derivatives(f, [1.0, 0.0], lower=[1.0, -np.inf], upper=[1.0, np.inf])


# -- non-finite values ---------------------------------------------------------------------------

def smooth_above_zero(x):
    """Smooth, but nan for x1 < 0: an implicit bound the caller did not declare."""
    if x[1] < 0:
        return math.nan
    return x[0] ** 2 + math.exp(x[1]) + x[0] * x[1]


def test_nonfinite_trial_point_falls_back_to_one_sided():
    x = np.array([0.3, 0.5e-4])
    g, H, info = finite_difference_derivatives(smooth_above_zero, x, full_output=True)
    assert info.scheme == ("central", "forward")
    # fx, 2 for x0, 2 tried + 2 more for x1, 4 for the pair: the failed call counts
    assert info.nfeval == 11
    assert relerr(g, [2 * x[0] + x[1], math.exp(x[1]) + x[0]]) < RTOL
    assert relerr(H, [[2.0, 1.0], [1.0, math.exp(x[1])]]) < RTOL
    g, H, info = finite_difference_derivatives(smooth_above_zero, x, richardson=True,
                                               full_output=True)
    assert info.scheme == ("central", "forward")
    assert relerr(g, [2 * x[0] + x[1], math.exp(x[1]) + x[0]]) < RTOL
    assert relerr(H, [[2.0, 1.0], [1.0, math.exp(x[1])]]) < RTOL


def test_unavoidable_nonfinite_values_raise():
    with pytest.raises(NonFiniteObjectiveError, match="x ="):
        finite_difference_derivatives(lambda v: math.inf, [1.0, 2.0])
    spike = lambda v: 1.0 if np.all(v == 1.0) else math.nan  # noqa: E731
    with pytest.raises(NonFiniteObjectiveError, match="parameter 0"):
        finite_difference_derivatives(spike, [1.0, 1.0])
    # finite on the axes, nan off them: the mixed partial cannot be formed
    axes_only = lambda v: float(v @ v) if np.count_nonzero(v - 1.0) <= 1 else math.nan  # noqa: E731
    with pytest.raises(NonFiniteObjectiveError) as err:
        finite_difference_derivatives(axes_only, [1.0, 1.0])
    assert np.count_nonzero(err.value.point - 1.0) == 2 and math.isnan(err.value.value)


# -- convergence checks ---------------------------------------------------------------------------

def test_true_minimum_of_convex_quadratic_passes():
    f, A, b = quadratic(seed=3)
    xmin = np.linalg.solve(A, -b)
    g, H = finite_difference_derivatives(f, xmin)
    assert check_convergence(g, H) == []
    rec = assess_convergence(f, xmin)
    assert rec.converged and rec.messages == () and rec.nfeval == 4 ** 2 + 4 + 1


def test_gradient_message_for_a_known_offset():
    H = np.diag([4.0, 1.0])
    delta = np.array([0.01, 0.0])
    g = H @ delta                       # the gradient of (x-x*)'H(x-x*)/2 at x* + delta
    # R = diag(2, 1): scaled gradient (0.02, 0); raw (0.04, 0); min per component 0.02
    msgs = check_convergence(g, H)
    assert msgs == ["failed to converge: max |scaled gradient| = 0.02 at parameter 0 "
                    "(tolerance 0.002)"]
    rec = ConvergenceCheck.from_derivatives(g, H)
    assert np.allclose(rec.scaled_gradient, [0.02, 0.0])
    # under the tolerance, and the tolerance itself is honoured
    assert check_convergence(H @ np.array([0.0005, 0.0]), H) == []
    assert check_convergence(g, H, grad_tol=0.05) == []


def test_scaled_gradient_is_lme4s_upper_factor_solve():
    H = np.array([[4.0, 1.0], [1.0, 3.0]])
    g = np.array([0.01, -0.02])
    R = np.linalg.cholesky(H).T          # H = R'R, R upper triangular (R's chol)
    rec = ConvergenceCheck.from_derivatives(g, H)
    assert np.allclose(rec.scaled_gradient, np.linalg.solve(R, g))
    # min(|scaled|, |raw|): a flat direction does not inflate a small raw gradient
    flat = np.diag([1e-4, 1.0])
    assert check_convergence([1e-3, 0.0], flat, hess_tol=1e-8) == []


def test_hessian_messages():
    indefinite = np.array([[2.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 3.0]])
    msgs = check_convergence(np.zeros(3), indefinite)
    assert msgs[0].startswith("gradient not scaled: the Hessian is not positive definite")
    assert msgs[1] == ("failed to converge: degenerate Hessian with 1 negative eigenvalue "
                       "(smallest eigenvalue -1, tolerance 1e-06)")
    two_negative = np.diag([-2.0, -1.0, 3.0])
    assert "with 2 negative eigenvalues" in check_convergence(np.zeros(3), two_negative)[-1]
    singular = np.diag([1.0, 0.0])
    assert "with 0 negative eigenvalues" in check_convergence(np.zeros(2), singular)[-1]
    ill = np.diag([1e7, 1.0])
    assert check_convergence(np.zeros(2), ill) == [
        "nearly unidentifiable: very large eigenvalue ratio 1e+07 (limit 1e+06); "
        "consider rescaling the predictors"]
    assert check_convergence(np.zeros(2), np.diag([1e5, 1.0])) == []
    # a zero tolerance switches the ratio test off instead of dividing by it
    assert check_convergence(np.zeros(2), ill, hess_tol=0.0) == []


def test_boundary_components_are_ignored():
    # parameter 1 is on its bound: large gradient, negative curvature seen from one side
    g = np.array([0.0, 5.0, 0.0])
    H = np.array([[2.0, 0.3, 0.0], [0.3, -1.0, 0.0], [0.0, 0.0, 1.0]])
    assert len(check_convergence(g, H)) == 2
    assert check_convergence(g, H, boundary=[False, True, False]) == []
    rec = ConvergenceCheck.from_derivatives(g, H, boundary=[False, True, False])
    assert np.isnan(rec.scaled_gradient[1]) and np.allclose(rec.scaled_gradient[[0, 2]], 0)
    # component indices in messages refer to the full vector
    g2 = np.array([0.0, 5.0, 0.1])
    assert "at parameter 2" in check_convergence(g2, H, boundary=[False, True, False])[0]
    assert check_convergence(g, H, boundary=[True, True, True]) == []


def test_nonfinite_derivatives_are_reported():
    msgs = check_convergence([0.0, np.nan], np.eye(2))
    assert msgs == ["convergence not checked: the derivatives are inf or nan for parameter(s) [1]"]
    assert check_convergence([0.0, np.nan], np.eye(2), boundary=[False, True]) == []


def test_singular_fit_on_a_bound():
    """A constrained minimum at x1 = 0: the gradient there is 2.1, not 0."""
    def f(x):
        return (x[0] - 1) ** 2 + (x[1] + 1) ** 2 + 0.1 * x[0] * x[1]
    lower = np.array([-np.inf, 0.0])
    x = np.array([1.0, 0.0])
    rec = assess_convergence(bounded(f, lower), x, lower)
    assert rec.converged
    assert rec.gradient == pytest.approx([0.0, 2.1], abs=1e-8)
    assert rec.hessian == pytest.approx(np.array([[2.0, 0.1], [0.1, 2.0]]), rel=1e-6)
    assert rec.nfeval == 2 * 2 ** 2 + 1 + 1
    loud = assess_convergence(bounded(f, lower), x, lower, boundary=[False, False])
    assert "at parameter 1" in loud.messages[0]


def test_record_is_frozen_and_pickles():
    f, A, b = quadratic(seed=4)
    rec = assess_convergence(f, np.linalg.solve(A, -b) + 0.01)
    assert not rec.converged
    with pytest.raises(FrozenInstanceError):
        rec.nfeval = 0
    back = pickle.loads(pickle.dumps(rec))
    assert back.messages == rec.messages and back.nfeval == rec.nfeval
    for name in ("gradient", "hessian", "scaled_gradient"):
        assert type(getattr(back, name)) is np.ndarray
        assert np.array_equal(getattr(back, name), getattr(rec, name))
    assert "failed to converge" in repr(rec)


def test_a_record_from_derivatives_has_every_field_and_pickles():
    import dataclasses
    rec = ConvergenceCheck.from_derivatives([1e-3, -2e-3], [[2.0, 0.1], [0.1, 1.0]],
                                            nfeval=5, stencil="forward", point=[1.0, 2.0],
                                            step=[1e-4, 1e-4])
    assert set(vars(rec)) == {f.name for f in dataclasses.fields(ConvergenceCheck)}
    # the same record as the dataclass's own constructor makes
    built = ConvergenceCheck(**{f.name: getattr(rec, f.name)
                                for f in dataclasses.fields(ConvergenceCheck)})
    for f in dataclasses.fields(ConvergenceCheck):
        np.testing.assert_array_equal(getattr(pickle.loads(pickle.dumps(rec)), f.name),
                                      getattr(built, f.name))
    with pytest.raises(FrozenInstanceError):
        rec.nfeval = 1

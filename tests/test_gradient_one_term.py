"""The one-term Laplace value and gradient in one compiled call (_glm.PirlsKernel.laplace).

Held to its twins: the Python PIRLS loop (``_pirls.pirls(compiled=False)``) from the
same start for the value and the modes, _gradient._gradient_at_modes_numpy at the modes
for the gradient, _glm_numpy.predicted_modes for the warm start it moves the last modes
by, and the modes themselves (from a cold start) for what that warm start predicts. A
whole fit through it against a fit through model._value and the gradient kernel on the
rows (the route before).
"""
import numpy as np
import pytest
from conftest import KERNEL, joint_optimum

import mixedmodels as mm
from mixedmodels import _gradient, _pirls
from mixedmodels import families as F
from mixedmodels._kernels import _glm
from mixedmodels._kernels import _glm_numpy as twin
from mixedmodels._kernels._gradient import laplace_blockdiag_gradient
from mixedmodels._linalg._blocked import matvec

CASES = {
    "contra": lambda: mm.GeneralizedLinearMixedModel(
        "use ~ 1 + age + abs2(age) + urban + livch + (1 | urban & dist)",
        mm.dataset("contra"), mm.Bernoulli()),
    "cbpp": lambda: mm.GeneralizedLinearMixedModel(
        "incid / hsz ~ 1 + period + (1 | herd)", mm.dataset("cbpp"), mm.Binomial(),
        weights="hsz"),
    "contra_vector": lambda: mm.GeneralizedLinearMixedModel(
        "use ~ 1 + age + abs2(age) + urban + livch + (1 + urban | dist)",
        mm.dataset("contra"), mm.Bernoulli()),
    "grouseticks": lambda: mm.GeneralizedLinearMixedModel(
        "ticks ~ 1 + year + (1 | brood)", mm.dataset("grouseticks"), mm.Poisson()),
}
SCALAR = ["contra", "cbpp", "grouseticks"]


def fitted(name):
    return joint_optimum(CASES, name)


def points(model, x):
    """The optimum and two points away from it (θ kept feasible)."""
    p = model.p
    out = []
    for shift in (0.0, 0.03, -0.08):
        y = x + shift * np.where(np.arange(x.size) % 2 == 0, 1.0, -0.5)
        y[p:] = np.where(np.isfinite(model.layout.lower), np.abs(y[p:]), y[p:])
        out.append(y)
    return out


@pytest.fixture
def no_prediction():
    old = _glm.max_predicted_step()
    _glm.max_predicted_step(0.0)
    yield
    _glm.max_predicted_step(old)


@pytest.mark.parametrize("name", list(CASES))
def test_value_and_gradient_equal_their_twins(name, no_prediction):
    """From the same start: the compiled call's value, modes and state against the
    Python PIRLS loop, and its gradient against the NumPy gradient at those modes."""
    model, x = fitted(name)
    p = model.p
    for point in points(model, x):
        beta, theta = point[:p], point[p:]
        start = model._u.copy()
        value, grad = _gradient.laplace_value_and_gradient(model, theta, beta)
        u = model._u.copy()
        logdet = model._last_logdet
        st = model.state
        mu = st.mu.copy()
        want_grad = _gradient._gradient_at_modes_numpy(model, theta, u, model.family)
        np.testing.assert_allclose(grad, want_grad, rtol=KERNEL,
                                   atol=KERNEL * max(1.0, np.abs(want_grad).max()))
        want_u, _, want_logdet, dev, _ = _pirls.pirls(model, theta, beta, start,
                                                      compiled=False)
        assert value == pytest.approx(dev + want_u @ want_u + 2.0 * want_logdet, rel=1e-13)
        assert logdet == pytest.approx(2.0 * want_logdet, rel=KERNEL)
        np.testing.assert_allclose(u, want_u, rtol=KERNEL, atol=KERNEL)
        np.testing.assert_allclose(mu, st.mu, rtol=KERNEL, atol=KERNEL)


@pytest.mark.parametrize("name", list(CASES))
def test_value_is_the_models_value(name):
    """What model._value returns at the modes the call leaves (PIRLS from there takes
    one confirming step), and a gradient that finite differences agree with."""
    from test_gradient import assert_gradient, finite_differences

    model, x = fitted(name)
    point = points(model, x)[1]
    value, grad = _gradient.laplace_value_and_gradient(model, point[model.p:], point[:model.p])
    assert value == pytest.approx(model._value(point[model.p:], point[:model.p])[0],
                                  rel=1e-12)
    fd = finite_differences(model._joint_value, model, point)
    assert_gradient(grad, fd, name)


@pytest.mark.parametrize("name", SCALAR)
def test_warm_start_is_the_first_order_change_of_the_modes(name):
    """With maxiter = 0 the call returns its start: the last modes moved by the twin's
    first-order change, whose error is of the second order in the step."""
    model, x = fitted(name)
    p = model.p
    st, pat = model.state, model.workspace.pattern
    kernel = _pirls.row_kernel(model)
    fam = model.family
    direction = np.where(np.arange(x.size) % 2 == 0, 1.0, -0.7)
    errors = []
    for h in (1e-2, 1e-3):
        x1 = x + h * direction
        _gradient.laplace_value_and_gradient(model, x[p:], x[:p])     # the last modes
        u0 = model._u.copy()
        lam0 = x[p]
        w, rho = st.wrkwt.copy(), st.wrkresid.copy()
        avals = model.workspace.avals.copy()
        fixed0 = model.X @ x[:p] + model.offset_or_zero
        start = u0.copy()
        grad = np.empty(x.size)
        # no iteration: no factorization, a NaN log-determinant and value
        value, *_, exhausted = kernel.laplace(fam.code, fam.link.code, fam.param,
                                              model.prior_w, x1[p:], x1[:p], start, grad,
                                              1e-13, 0, 30, _pirls.STEP_TOL)
        assert exhausted and np.isnan(value)
        dfixed = model.X @ x1[:p] + model.offset_or_zero - fixed0
        du = twin.predicted_modes(pat.codes[0], pat.zcat[:, 0], w, rho, avals, lam0, u0,
                                  dfixed, x1[p] - lam0)
        np.testing.assert_allclose(start - u0, du, rtol=1e-9, atol=1e-12)
        model._u = None
        _, u1, _ = model._value(x1[p:], x1[:p])                     # the modes at x1
        errors.append((np.abs(u1 - start).max(), np.abs(u1 - u0).max()))
        model._u = None
    for (err, step), h in zip(errors, (1e-2, 1e-3)):
        assert err < 0.05 * step
    assert errors[1][0] < 0.03 * errors[0][0]         # second order: ~1/100


@pytest.mark.parametrize("name", SCALAR)
def test_warm_start_leaves_the_results(name):
    """Along a walk of points the values and gradients with the predicted start are
    those from the last modes, to PIRLS's tolerance; fewer Newton steps in all."""
    model, x = fitted(name)
    p = model.p
    rng = np.random.default_rng(7)
    walk = [x + 0.02 * rng.standard_normal(x.size) / (1 + k) for k in range(12)]
    for y in walk:
        y[p:] = np.abs(y[p:])
    kernel = _pirls.row_kernel(model)
    fam = model.family

    def run(step):
        old = _glm.max_predicted_step(step)
        try:
            model._u = None
            out, iters = [], 0
            for y in walk:
                u = model._u.copy()
                grad = np.empty(y.size)
                value, _, _, it, converged, _ = kernel.laplace(
                    fam.code, fam.link.code, fam.param, model.prior_w, y[p:], y[:p], u,
                    grad, 1e-13, 100, 30, _pirls.STEP_TOL)
                model._u = u
                assert converged
                out.append((value, grad, u))
                iters += it
            return out, iters
        finally:
            _glm.max_predicted_step(old)

    got, got_iters = run(0.5)
    want, want_iters = run(0.0)
    for (v, g, u), (vw, gw, uw) in zip(got, want):
        assert v == pytest.approx(vw, rel=1e-12)
        np.testing.assert_allclose(g, gw, rtol=0, atol=1e-5 * max(1.0, np.abs(gw).max()))
        np.testing.assert_allclose(u, uw, rtol=0, atol=1e-5)
    assert got_iters < want_iters


def test_fixed_is_matvec_bit_for_bit():
    model, x = fitted("contra")
    p = model.p
    beta = x[:p] * 1.3 - 0.1
    model._value(x[p:], beta)
    want = np.empty(model.n)
    matvec(model.X, beta, model.offset_or_zero, want)
    np.testing.assert_array_equal(model.state.fixed, want)


def test_fits_agree_with_the_route_through_the_value(monkeypatch):
    """A whole fit through the compiled call against one through model._value and the
    gradient on the rows (laplace_blockdiag_gradient): the same optimum."""
    c = mm.dataset("contra")
    formula = "use ~ 1 + age + abs2(age) + urban + livch + (1 | dist)"
    got = mm.fit(formula, c, family=mm.Bernoulli())

    def through_value(model, theta, beta_w, fam):
        value, u, _ = model._value(theta, beta_w, 1.0)
        return value, _gradient._one_term_compiled(model, model.workspace, theta, u, fam)

    monkeypatch.setattr(_gradient, "_one_term_value_and_gradient", through_value)
    want = mm.fit(formula, c, family=mm.Bernoulli())
    assert got.objective == pytest.approx(want.objective, rel=1e-12)
    np.testing.assert_allclose(got.theta, want.theta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got.coef, want.coef, rtol=1e-6, atol=1e-8)


def test_laplace_refuses_what_it_does_not_cover():
    model, x = fitted("contra")
    p = model.p
    kernel = _pirls.row_kernel(model)
    u = np.zeros(model.workspace.q)
    args = (model.prior_w, x[p:], x[:p], u)
    with pytest.raises(ValueError, match="logit"):
        kernel.laplace(F.Bernoulli().code, F.ProbitLink().code, np.nan, *args, np.empty(x.size))
    with pytest.raises(ValueError, match="logit"):
        kernel.laplace(F.Gamma().code, F.LogLink().code, np.nan, *args, np.empty(x.size))
    fam = model.family
    with pytest.raises(ValueError, match="grad has"):
        kernel.laplace(fam.code, fam.link.code, fam.param, *args, np.empty(x.size + 1))
    with pytest.raises(ValueError, match="beta has"):
        kernel.laplace(fam.code, fam.link.code, fam.param, model.prior_w, x[p:], x[:p - 1],
                       u, np.empty(x.size))
    ws, st = model.workspace, model.state
    bare = _glm.PirlsKernel(ws.pattern, ws.layout.lam_off, ws.factorizer, ws.avals, ws.ztxy,
                            ws.xtxy, ws.rzxy, model.y, st.fixed, st.eta, st.mu, st.mu_eta,
                            st.wrkwt, st.wrkresid, st.devresid)
    with pytest.raises(ValueError, match="bound to X"):
        bare.laplace(fam.code, fam.link.code, fam.param, *args, np.empty(x.size))
    with pytest.raises(ValueError, match="without X"):
        bare.pirls(fam.code, fam.link.code, fam.param, model.prior_w, x[p:], u, beta=x[:p])
    with pytest.raises(ValueError, match="X and the offset"):
        _glm.PirlsKernel(ws.pattern, ws.layout.lam_off, ws.factorizer, ws.avals, ws.ztxy,
                         ws.xtxy, ws.rzxy, model.y, st.fixed, st.eta, st.mu, st.mu_eta,
                         st.wrkwt, st.wrkresid, st.devresid, x=model.X[:-1],
                         offset=model.offset_or_zero, lam_index=ws.layout.index)
    with pytest.raises(ValueError, match="theta index"):
        _glm.PirlsKernel(ws.pattern, ws.layout.lam_off, ws.factorizer, ws.avals, ws.ztxy,
                         ws.xtxy, ws.rzxy, model.y, st.fixed, st.eta, st.mu, st.mu_eta,
                         st.wrkwt, st.wrkresid, st.devresid, x=model.X,
                         offset=model.offset_or_zero, lam_index=ws.layout.index + 5)


def test_laplace_refuses_several_terms():
    g = mm.dataset("grouseticks")
    model = mm.GeneralizedLinearMixedModel("ticks ~ 1 + year + (1 | brood) + (1 | location)",
                                           g, mm.Poisson())
    kernel = _pirls.row_kernel(model)
    fam = model.family
    theta = model.layout.initial()
    with pytest.raises(ValueError, match="one random-effects term"):
        kernel.laplace(fam.code, fam.link.code, fam.param, model.prior_w, theta, model.beta0,
                       np.zeros(model.workspace.q), np.empty(model.p + theta.size))


def test_gradient_on_rows_refuses_bad_levels():
    n, nlev = 20, 4
    codes = np.arange(n, dtype=np.intc) % nlev
    codes[3] = nlev
    ones = np.ones(n)
    with pytest.raises(ValueError, match="level code"):
        laplace_blockdiag_gradient(codes, np.ones((n, 1)), np.ones(1), 1, ones, ones,
                                   0.5 * ones, True, np.zeros(nlev), np.ones((n, 2)),
                                   np.empty(2), np.empty((1, 1)))
    with pytest.raises(ValueError, match="differ in length"):
        laplace_blockdiag_gradient(codes % nlev, np.ones((n, 1)), np.ones(1), 1, ones[:-1],
                                   ones, 0.5 * ones, True, np.zeros(nlev), np.ones((n, 2)),
                                   np.empty(2), np.empty((1, 1)))

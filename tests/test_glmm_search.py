"""The compiled pieces of a small GLMM's fit against their twins.

- ``PirlsKernel.trust_region`` (the compiled trust-region search with the one-term
  Laplace evaluations in it) against its twin, ``trust_region_search`` over
  ``model._joint_value_and_grad``: the same log, bit for bit, and the model left in the
  same state;
- ``PirlsKernel.beta_covariance`` (the Schur complement of one term, level by level)
  against the workspace's factorization with the columns [X̃, working response];
- ``_glm.glm_irls`` (the GLM start, Householder QR) against the NumPy loop with LAPACK's
  least squares;
- ``_glm.response_check`` against the NumPy checks of ``Family.validate``;
- the convergence check of ``_glmm_search`` against ``check_optimum_with_gradient``.
"""
import warnings

import numpy as np
import pytest
from conftest import KERNEL

import mixedmodels as mm
from mixedmodels import _glmm_search
from mixedmodels import families as F
from mixedmodels._kernels import _glm
from mixedmodels._optimize import OptSummary, check_optimum_with_gradient, minimize_with_gradient
from mixedmodels._pirls import row_kernel


def _ticks():
    d = mm.dataset("grouseticks")
    return d.assign(o=0.1 * np.cos(np.arange(len(d))))


ONE_TERM = {
    "cbpp": lambda: mm.GeneralizedLinearMixedModel(
        "incid / hsz ~ 1 + period + (1 | herd)", mm.dataset("cbpp"), mm.Binomial(),
        weights="hsz"),
    "contra": lambda: mm.GeneralizedLinearMixedModel(
        "use ~ 1 + age + abs2(age) + urban + livch + (1 | urban & dist)",
        mm.dataset("contra"), mm.Bernoulli()),
    "contra_vector": lambda: mm.GeneralizedLinearMixedModel(
        "use ~ 1 + age + urban + (1 + urban | dist)", mm.dataset("contra"), mm.Bernoulli()),
    "grouseticks_offset": lambda: mm.GeneralizedLinearMixedModel(
        "ticks ~ 1 + year + (1 | brood)", _ticks(), mm.Poisson(), offset="o"),
}


def _start(model):
    lower = np.concatenate([np.full(model.p, -np.inf), model.layout.lower])
    return np.concatenate([model.beta0, model.layout.initial()]), lower


# -- the search -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ONE_TERM))
def test_compiled_search_is_its_twin_bit_for_bit(name):
    x0, lower = _start(ONE_TERM[name]())
    runs = []
    for compiled in (True, False):
        model = ONE_TERM[name]()
        assert model._one_term_laplace()
        opt = OptSummary(initial=x0.copy(), lowerbd=lower.copy())
        assert _glmm_search.minimize_one_term(model, opt, compiled=compiled) is opt
        runs.append((model, opt))
    (mc, oc), (mp, op) = runs
    assert oc.returnvalue == op.returnvalue == "SUCCESS"
    assert oc.optimizer == op.optimizer == "TRUST_REGION_BFGS" and oc.feval == op.feval > 5
    for (xc, vc), (xp, vp) in zip(oc.fitlog, op.fitlog):
        np.testing.assert_array_equal(xc, xp)
        assert vc == vp
    np.testing.assert_array_equal(oc.final, op.final)
    assert oc.fmin == op.fmin == min(v for _, v in oc.fitlog)
    # the model as the best evaluation left it: the modes, the log-determinant, the
    # record of that evaluation the check starts from
    np.testing.assert_array_equal(mc._u, mp._u)
    assert mc._last_logdet == mp._last_logdet
    lc, lp = mc._last_evaluation, mp._last_evaluation
    np.testing.assert_array_equal(lc[0], oc.final)
    np.testing.assert_array_equal(lc[0], lp[0])
    assert lc[1] == lp[1] == oc.fmin
    np.testing.assert_array_equal(lc[2], lp[2])
    assert lc[3] is mc._u


def test_the_best_evaluation_is_the_models_state():
    """The modes, log-determinant and gradient the search leaves are those of a fresh
    evaluation at its best point (to PIRLS's tolerance: that one starts from other
    modes)."""
    model = ONE_TERM["cbpp"]()
    x0, lower = _start(model)
    opt = OptSummary(initial=x0, lowerbd=lower)
    _glmm_search.minimize_one_term(model, opt)
    x, value, grad, modes = model._last_evaluation
    fresh = ONE_TERM["cbpp"]()
    fresh._u = np.zeros(len(modes))
    v2, g2 = fresh._joint_value_and_grad(np.array(x))
    assert value == pytest.approx(v2, rel=1e-12)
    np.testing.assert_allclose(grad, g2, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(modes, fresh._u, rtol=1e-8, atol=1e-10)
    assert model._last_logdet == pytest.approx(fresh._last_logdet, rel=1e-10)


def _ends_on_a_rejected_trial():
    """Poisson, one intercept of standard deviation 0 (θ ends on its bound), whose search's
    last evaluation is a trial it rejected (the probe off the bound)."""
    import pandas as pd
    rng = np.random.default_rng(7)
    g = rng.integers(0, 30, 600)
    x = rng.normal(size=600)
    data = pd.DataFrame({"c": rng.poisson(np.exp(0.5 + 0.3 * x)), "x": x,
                         "g": g.astype(str)})
    return mm.GeneralizedLinearMixedModel("c ~ 1 + x + (1 | g)", data, mm.Poisson())


def test_the_state_is_the_best_evaluations_after_a_rejected_last_trial():
    """Where the search's last evaluation is not its best, PIRLS runs again at the best
    point, so that what reads the state next (the check's β block) sees the best
    point's working weights; the twin does the same, bit for bit."""
    runs = []
    for compiled in (True, False):
        model = _ends_on_a_rejected_trial()
        x0, lower = _start(model)
        opt = OptSummary(initial=x0, lowerbd=lower)
        _glmm_search.minimize_one_term(model, opt, compiled=compiled)
        assert opt.fitlog[-1][0].tobytes() != opt.final.tobytes()
        assert opt.fmin == min(v for _, v in opt.fitlog)
        runs.append((model, opt))
    (mc, oc), (mp, op) = runs
    for (xc, vc), (xp, vp) in zip(oc.fitlog, op.fitlog):
        assert xc.tobytes() == xp.tobytes() and vc == vp
    np.testing.assert_array_equal(mc._u, mp._u)
    for a, b in zip(mc._last_evaluation[:3], mp._last_evaluation[:3]):
        np.testing.assert_array_equal(a, b)
    # the β block the check takes at the modes is PIRLS's at the best point
    model, opt = runs[0]
    beta, theta = opt.final[:model.p], opt.final[model.p:]
    at_modes, _ = model._beta_covariance(theta, beta, at_modes=True)
    fresh = _ends_on_a_rejected_trial()
    fresh._u = np.zeros(len(model._u))
    fresh._joint_value_and_grad(np.array(opt.final))
    want, _ = fresh._beta_covariance(theta, beta, at_modes=True)
    np.testing.assert_allclose(at_modes, want, rtol=1e-9)


def test_compiled_search_with_an_infeasible_block_stops_as_the_python_one():
    """Where the first evaluation fails (a block not positive definite) both routes stop
    with an infinite value and keep the modes of before."""
    x0, lower = _start(ONE_TERM["cbpp"]())
    bad = x0.copy()
    bad[-1] = np.nan                          # θ = NaN: the level blocks are not PD
    for compiled in (True, False):
        model = ONE_TERM["cbpp"]()
        model._u = np.zeros(model.workspace.q)
        opt = OptSummary(initial=bad, lowerbd=lower)
        _glmm_search.minimize_one_term(model, opt, compiled=compiled)
        assert [v for _, v in opt.fitlog] == [np.inf]
        assert opt.fmin == np.inf and opt.returnvalue != "SUCCESS"
        np.testing.assert_array_equal(model._u, 0.0)


@pytest.mark.parametrize("name", ["cbpp", "contra"])
def test_fits_through_either_route_agree(name, monkeypatch):
    got = ONE_TERM[name]().fit()
    monkeypatch.setattr("mixedmodels.glmm.minimize_one_term",
                        lambda model, opt: _glmm_search.minimize_one_term(model, opt, False))
    want = ONE_TERM[name]().fit()
    assert got.objective == want.objective
    np.testing.assert_array_equal(got.theta, want.theta)
    np.testing.assert_array_equal(got.coef, want.coef)
    np.testing.assert_allclose(got.stderror, want.stderror, rtol=1e-13)
    assert got.optsum.feval == want.optsum.feval


# a response simulated from the contra fit (1 + urban | dist), packed bits of its 1934 rows
_SADDLE_Y = (
    "YIx8j6hHHGQhAVSBwJ8VQgidSthmeUgI/1CJNRtioom5VCLPgIAQXCKiFBg3D6/3ycxJs8n8Sy5QiWDf"
    "gmtI3wQk0iJSkSJaJB7tkdsrViCgEA+34iBQFAHllCATPgTgevC7xAOEFypw8JAcgjDAgYdaKllCvKES"
    "ABADRkXTMoEhAKBbEYODhBWiojPFJTeJZtroUw0NvkqjfyJUIgpa78n3PIuCwS0Hc+EvFSXLflXr+kod"
    "isXBSREFJQEEQIAAkeG4qC0mpJA7AwIwYLyENIALtGLDGDW6SkM+ZnyIkDdAwApz8ygmhj4AEahozrEA"
    "4AA=")


def test_the_search_does_not_end_on_a_saddle_of_a_vector_term():
    """On this simulated response L-BFGS-B (the one-term search before the trust region)
    ended with θ₁ = 0 at 2585.66, a saddle where the check found a negative eigenvalue
    and warned; the optimum, which BOBYQA finds, is 2568.31."""
    import base64
    bits = np.frombuffer(base64.b64decode("".join(_SADDLE_Y)), dtype=np.uint8)
    y = np.unpackbits(bits)[:1934].astype(float)
    data = mm.dataset("contra").assign(use=y)
    formula = "use ~ 1 + age + urban + (1 + urban | dist)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = mm.GeneralizedLinearMixedModel(formula, data, mm.Bernoulli()).fit()
    bobyqa = mm.GeneralizedLinearMixedModel(formula, data, mm.Bernoulli()).fit(
        optimizer="bobyqa")
    assert fit.optsum.optimizer == "TRUST_REGION_BFGS" and fit.optsum.derivs.converged
    assert fit.objective <= bobyqa.objective + 1e-9
    assert fit.objective < 2570.0 and fit.theta[0] > 0.01
    np.testing.assert_allclose(fit.theta, bobyqa.theta, rtol=1e-4, atol=1e-6)


def test_models_the_compiled_search_does_not_cover_take_the_python_one():
    cbpp = mm.dataset("cbpp")
    agq = mm.GeneralizedLinearMixedModel("incid / hsz ~ 1 + period + (1 | herd)", cbpp,
                                         mm.Binomial(), weights="hsz", nAGQ=5)
    probit = mm.GeneralizedLinearMixedModel("incid / hsz ~ 1 + period + (1 | herd)", cbpp,
                                            mm.Binomial(link="probit"), weights="hsz")
    two = mm.GeneralizedLinearMixedModel(
        "ticks ~ 1 + year + (1 | brood) + (1 | location)", mm.dataset("grouseticks"),
        mm.Poisson())
    for model in (agq, probit, two):
        assert not model._one_term_laplace()
    assert agq.fit().optsum.optimizer == "L-BFGS-B"


# -- the covariance of β̃ given θ ------------------------------------------------------------

@pytest.mark.parametrize("name", list(ONE_TERM))
def test_beta_covariance_is_the_workspace_factorization(name):
    model = ONE_TERM[name]()
    fit = model.fit()
    x = np.concatenate([fit.beta_w, fit.theta])
    for shift in (0.0, 0.05):
        point = x + shift
        beta, theta = point[:model.p], point[model.p:]
        vcov, schur = model._beta_covariance(theta, beta)
        want = model._vcov_working(theta, beta, compiled=False)
        np.testing.assert_allclose(vcov, want, rtol=KERNEL, atol=0)
        np.testing.assert_allclose(schur @ want, np.eye(model.p), atol=KERNEL)
        # the state at the modes: the same without running PIRLS again
        np.testing.assert_allclose(model._vcov_working(theta, beta, at_modes=True), want,
                                   rtol=KERNEL)


def test_beta_covariance_of_a_dispersion_family():
    d = mm.dataset("grouseticks")
    model = mm.GeneralizedLinearMixedModel("ticks + 1 ~ 1 + year + (1 | brood)", d,
                                           mm.Gamma(link="log"))
    theta, beta, phi = np.array([0.7]), model.beta0, 0.8
    got = model._vcov_working(theta, beta, phi)
    want = model._vcov_working(theta, beta, phi, compiled=False)
    np.testing.assert_allclose(got, want, rtol=KERNEL, atol=0)


def test_beta_covariance_kernel_refuses_what_is_not_positive_definite():
    from mixedmodels._kernels._gradient import blockdiag_beta_covariance

    codes = np.array([0, 0, 1, 1], dtype=np.int32)
    z = np.ones((4, 1))
    x = np.column_stack([np.ones(4), np.ones(4)])      # collinear: S singular
    s, v = np.empty((2, 2)), np.empty((2, 2))
    with pytest.raises(np.linalg.LinAlgError, match="fixed-effects"):
        blockdiag_beta_covariance(codes, z, np.array([0.5]), 1, np.ones(4), x, s, v)
    with pytest.raises(np.linalg.LinAlgError, match="random-effects"):
        blockdiag_beta_covariance(codes, z, np.array([1.0]), 1, -np.ones(4) * 10,
                                  np.ones((4, 1)), np.empty((1, 1)), np.empty((1, 1)))


# -- the GLM start ----------------------------------------------------------------------------

def _glm_start_models():
    cbpp, contra = mm.dataset("cbpp"), mm.dataset("contra")
    ticks = _ticks()
    return {
        "binomial": ("incid / hsz ~ 1 + period + (1 | herd)", cbpp, mm.Binomial(),
                     {"weights": "hsz"}),
        "bernoulli": ("use ~ 1 + age + urban + (1 | dist)", contra, mm.Bernoulli(), {}),
        "poisson_offset": ("ticks ~ 1 + year + (1 | brood)", ticks, mm.Poisson(),
                           {"offset": "o"}),
        "probit": ("use ~ 1 + age + urban + (1 | dist)", contra,
                   mm.Bernoulli(link="probit"), {}),
        "gamma": ("ticks + 1 ~ 1 + year + (1 | brood)", ticks, mm.Gamma(link="log"), {}),
        "negbin": ("ticks ~ 1 + year + (1 | brood)", ticks, mm.NegativeBinomial(), {}),
    }


@pytest.mark.parametrize("name", list(_glm_start_models()))
def test_glm_start_is_its_numpy_twin(name):
    formula, data, family, kw = _glm_start_models()[name]
    model = mm.GeneralizedLinearMixedModel(formula, data, family, **kw)
    beta, extra = model._glm_start()
    mu = model.state.mu.copy()
    want_beta, want_extra = model._glm_start(compiled=False)
    np.testing.assert_allclose(beta, want_beta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(model.state.mu, mu, rtol=1e-12)
    assert extra == pytest.approx(want_extra, rel=1e-12)


def test_glm_start_hands_a_rank_deficient_weighted_x_to_the_numpy_loop():
    """A level whose rows all have weight zero: the weighted X loses a column, and the
    start is dgelsd's minimum-norm solution, as before."""
    d = mm.dataset("cbpp")
    w = d.hsz.to_numpy(dtype=float).copy()
    w[(d.period == "4").to_numpy()] = 0.0
    model = mm.GeneralizedLinearMixedModel("incid / hsz ~ 1 + period + (1 | herd)", d,
                                           mm.Binomial(), weights=w)
    st = model.state
    eta = model.family.link.link(model.family.starting_mu(model.y, model.prior_w))
    assert model._glm_irls_compiled(model.family, eta) is None
    beta, _ = model._glm_start()
    np.testing.assert_array_equal(beta, model._glm_start(compiled=False)[0])
    assert st.mu.shape == (model.n,)


def test_glm_irls_solves_least_squares():
    """One solve from a start that is already the weighted least-squares problem's: the
    Householder solution against numpy.linalg.lstsq (Gaussian family, identity link:
    working weights w, working response y)."""
    rng = np.random.default_rng(5)
    n, p = 40, 3
    x = np.ascontiguousarray(rng.standard_normal((n, p)))
    y = rng.standard_normal(n)
    w = rng.uniform(0.5, 2.0, n)
    fam = mm.Normal()
    st = [np.zeros(n) for _ in range(5)]
    eta = np.zeros(n)
    beta = np.empty(p)
    solves = _glm.glm_irls(fam.code, fam.link.code, fam.param, x, y, w, np.empty(0), eta,
                           *st, beta, 1)
    assert solves == 1
    sw = np.sqrt(w)
    want = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)[0]
    np.testing.assert_allclose(beta, want, rtol=1e-13)


# -- the response checks ----------------------------------------------------------------------

def _numpy_verdict(family, y, w):
    """Whether Family.validate's NumPy checks pass y and w without an error or a
    warning (the twin of response_check's first output)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            family._compiled_check = lambda *a: None
            family.validate(y, w, "y")
        except (ValueError, RuntimeWarning):
            return False
        finally:
            del family._compiled_check
    return True


FAMILIES = [F.Bernoulli(), F.Binomial(), F.Poisson(), F.Gamma(), F.InverseGaussian(),
            F.Normal(), F.NegativeBinomial()]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_response_check_is_validate(family):
    rng = np.random.default_rng(family.code)
    pools = [np.array([0.0, 1.0]), np.array([0.0, 0.25, 0.5, 1.0]), np.arange(6.0),
             np.array([0.5, 2.0, 3.5]), np.array([-1.0, 0.0, 1.0]),
             np.array([np.nan, 1.0]), np.array([np.inf, 2.0]), np.array([1.0, 1.1]),
             np.array([0.3, 1 / 3])]
    weights = [None, np.array([1.0, 3.0]), np.array([0.0, 4.0]), np.array([2.0, -1.0]),
               np.array([1.0, np.nan]), np.array([3.0, 6.0])]
    for pool in pools:
        for wpool in weights:
            for _ in range(4):
                y = rng.choice(pool, 12)
                w = None if wpool is None else rng.choice(wpool, 12)
                clean, lo, hi = _glm.response_check(family.code, y,
                                                    np.empty(0) if w is None else w)
                assert clean == _numpy_verdict(family, y, w), (y, w)
                if clean:
                    used = np.ones(12, bool) if w is None else w > 0
                    if used.any():
                        assert (lo, hi) == (y[used].min(), y[used].max())
                    else:
                        assert np.isnan(lo) and np.isnan(hi)


def test_validate_still_says_what_is_wrong():
    with pytest.raises(ValueError, match="proportion in"):
        F.Binomial().validate(np.array([0.5, 1.5]), np.ones(2), "p")
    with pytest.warns(RuntimeWarning, match="whole number"):
        F.Binomial().validate(np.array([0.5, 0.3]), np.array([2.0, 2.0]), "p")
    with pytest.raises(ValueError, match="non-negative"):
        F.Poisson().validate(np.array([1.0, 2.0]), np.array([1.0, -1.0]), "k")


# -- the check ----------------------------------------------------------------------------------

def test_the_check_at_the_optimum_is_check_optimum_with_gradients_and_skips_the_trial():
    model = ONE_TERM["cbpp"]()
    fit = model.fit()
    d = fit.optsum.derivs
    x = d.point
    # the Newton step from the search's end point would not lower the objective by
    # more than its rounding: no trial evaluation in the log
    assert not fit.optsum.polished
    assert len(fit.optsum.fitlog) == fit.optsum.feval
    opt = OptSummary(initial=x.copy(), lowerbd=fit.optsum.lowerbd.copy())
    opt.final, opt.fmin = x.copy(), fit.optsum.fmin
    want = check_optimum_with_gradient(model._joint_value_and_grad, opt, warn=False,
                                       step=d.step, stencil="forward",
                                       known=(model.p, d.hessian[:model.p, :model.p]))
    np.testing.assert_allclose(d.gradient, want.gradient, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(d.hessian, want.hessian, rtol=1e-8)
    assert d.nfeval == want.nfeval and d.converged and want.converged


def test_the_check_away_from_the_optimum_takes_the_newton_step():
    model = ONE_TERM["cbpp"]()
    fit = model.fit()
    d = fit.optsum.derivs
    x = d.point.copy()
    x[0] += 2e-3
    value, grad = model._joint_value_and_grad(x)
    opt = OptSummary(initial=x.copy(), lowerbd=fit.optsum.lowerbd.copy())
    opt.final, opt.fmin = x.copy(), float(value)
    record = check_optimum_with_gradient(model._joint_value_and_grad, opt, warn=False,
                                         step=d.step, grad=grad, stencil="forward")
    assert opt.polished and opt.fmin < value and len(opt.fitlog) == 1
    assert abs(opt.fmin - fit.optsum.fmin) < 1e-8
    # not converged at x: the gradient is taken again at the point the fit would report
    # (n + 1 gradients for the derivatives, one more there), and it passes
    assert record.nfeval == len(x) + 2 and record.converged
    assert abs(record.gradient).max() < abs(grad).max() / 10


# -- the Binomial-logit update four rows at a time -----------------------------------------

@pytest.mark.skipif(not _glm.simd_enabled(), reason="no AVX2/FMA on this machine or build")
@pytest.mark.parametrize("n", [4003, 4008])
def test_simd_binomial_logit_matches_the_scalar_loop(n):
    """The four-row loop against the scalar one (and, without the rows it hands back,
    the twin): proportions of 1 to 30 trials, 0 and 1 among them, eta over the whole
    range, and the rows the four-row loop leaves to the scalar one (eta infinite or NaN,
    y outside [0, 1] or NaN, y (1 + e) subnormal). The deviance residuals to the rounding
    of the two logarithms they are formed from (they cancel where y is close to mu)."""
    from mixedmodels._kernels import _glm_numpy as twin

    rng = np.random.default_rng(21)
    special_eta = [0.0, -0.0, 1e-300, 36.0, -36.0, 37.0, -37.0, 700.0, -700.0, 745.5,
                   -745.5, 746.0, -746.0, 1e308, -1e308, np.inf, -np.inf, np.nan, 30.0,
                   -30.0, 1e3, -1e3, 709.0, -709.0, 1e-17, -1e-17]
    eta = np.concatenate([rng.normal(0.0, 3.0, n - 400 - len(special_eta)),
                          rng.uniform(-800, 800, 400), special_eta])
    trials = rng.integers(1, 31, n).astype(float)
    y = np.minimum(rng.integers(0, 31, n), trials) / trials
    special_y = [1e-300, 1e-310, 1 - 1e-16, 2.0, -0.5, np.nan, 1e-200, 0.999999]
    y[:len(special_y)] = special_y
    fam = F.Binomial()
    outs = {}
    try:
        for simd in (True, False):
            _glm.simd_width(4 if simd else 0)
            out = [np.full(n, np.nan) for _ in range(5)]
            with np.errstate(all="ignore"):
                dev = _glm.update(fam.code, fam.link.code, eta, y, trials, *out)
            outs[simd] = (dev, out)
    finally:
        _glm.simd_enabled(True)
    (_, got), (_, want) = outs[True], outs[False]
    for a, b in zip(got[:4], want[:4]):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        ok = np.isfinite(b)
        np.testing.assert_array_equal(a[~ok & ~np.isnan(b)], b[~ok & ~np.isnan(b)])
        np.testing.assert_allclose(a[ok], b[ok], rtol=KERNEL, atol=0.0)
    a, b = got[4], want[4]
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    ok = np.isfinite(b)
    np.testing.assert_array_equal(a[~ok & ~np.isnan(b)], b[~ok & ~np.isnan(b)])
    # the size of the terms that cancel: 2 w (y |log y| + (1 - y) |log(1 - y)| + |eta|)
    with np.errstate(all="ignore"):
        scale = 2 * trials * (np.abs(np.nan_to_num(y * np.log(y))) +
                              np.abs(np.nan_to_num((1 - y) * np.log1p(-y))) +
                              np.abs(eta) + 1.0)
    np.testing.assert_array_less(np.abs(a[ok] - b[ok]), 1e-14 * scale[ok])
    # rows in the family's support with eta finite: the twin, and the deviance the sum
    keep = np.isfinite(eta) & (y >= 0) & (y <= 1) & (y * 2.0 > 1e-300)
    keep &= ~((y > 0) & (y < 1) & ((1 - y) < 1e-300))
    m = int(keep.sum())
    mine = [np.full(m, np.nan) for _ in range(5)]
    ref = [np.full(m, np.nan) for _ in range(5)]
    dev = _glm.update(fam.code, fam.link.code, eta[keep], y[keep], trials[keep], *mine)
    twin.update(fam.code, fam.link.code, eta[keep], y[keep], trials[keep], *ref)
    assert dev == pytest.approx(np.sum(mine[4]), rel=1e-13)
    for x, r in zip(mine[:4], ref[:4]):
        np.testing.assert_allclose(x, r, rtol=KERNEL, atol=1e-300)
    fin = np.isfinite(ref[4])
    np.testing.assert_array_equal(mine[4][~fin], ref[4][~fin])
    np.testing.assert_array_less(np.abs(mine[4][fin] - ref[4][fin]),
                                 1e-13 * scale[keep][fin] + 1e-300)


def test_lbfgs_asked_for_is_lbfgs_on_one_term():
    """optimizer="lbfgs" runs L-BFGS-B where "auto" takes the trust region; both reach
    the same optimum."""
    auto = ONE_TERM["cbpp"]().fit()
    lbfgs = ONE_TERM["cbpp"]().fit(optimizer="lbfgs")
    assert auto.optsum.optimizer == "TRUST_REGION_BFGS"
    assert lbfgs.optsum.optimizer == "L-BFGS-B"
    assert auto.objective == pytest.approx(lbfgs.objective, abs=1e-9)
    np.testing.assert_allclose(auto.theta, lbfgs.theta, rtol=1e-6)

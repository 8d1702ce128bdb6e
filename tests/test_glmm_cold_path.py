"""A small GLMM's cold path: the pieces rewritten without NumPy's small-array C paths,
held to their NumPy twins bit for bit.

- ``PirlsKernel`` bound by the arrays' data (the NumPy C API) instead of typed
  memoryviews: the same refusals of arrays it cannot bind;
- ``PirlsKernel.trust_region`` from a start off its bounds, which it moves onto them as
  its twin (``trust_region_search``) does: the same log;
- the forward-difference Hessian of ``gradient_hessian`` in Python floats (twin: the
  NumPy loop, written out here);
- ``hessian_steps`` in Python floats (twin: its NumPy formula, written out here);
- ``_newton_polish`` told the Hessian is symmetric (twin: symmetrizing it again);
- ``glm_irls``, ``response_check``, ``loglik`` and PirlsKernel's ``pirls``, ``laplace``,
  ``trust_region``, ``evaluate`` and ``beta_covariance`` bound by the NumPy C API too: the same
  refusals as their typed memoryviews, the same numbers;
- ``_glm.add_reduce`` (numpy's pairwise summation, twin: ``np.add.reduce``) and
  ``_glm.saturated_loglik`` (twin: ``Family.loglik`` and two ``np.add.reduce``), bit for
  bit;
- ``PirlsState``'s arrays in one call, ``work1`` made on first use.
"""
import numpy as np
import pytest

import mixedmodels as mm
from mixedmodels import _glmm_search, _pirls
from mixedmodels import families as F
from mixedmodels import _optimize
from mixedmodels._kernels import _glm
from mixedmodels._optimize import (OptSummary, gradient_hessian, hessian_steps,
                                   minimize_with_gradient)


def _cbpp():
    return mm.GeneralizedLinearMixedModel(
        "incid / hsz ~ 1 + period + (1 | herd)", mm.dataset("cbpp"), mm.Binomial(),
        weights="hsz")


def _ticks():
    return mm.GeneralizedLinearMixedModel("ticks ~ 1 + year + (1 | brood)",
                                          mm.dataset("grouseticks"), mm.Poisson())


# -- the kernel's binding ----------------------------------------------------------------

def _kernel_args(model):
    ws, st = model.workspace, model.state
    ws.bind_products(1)
    return dict(pattern=ws.pattern, lam_off=ws.layout.lam_off, factorizer=ws.factorizer,
                avals=ws.avals, ztxy=ws.ztxy, xtxy=ws.xtxy, rzxy=ws.rzxy, y=model.y,
                fixed=st.fixed, eta=st.eta, mu=st.mu, mu_eta=st.mu_eta, wrkwt=st.wrkwt,
                wrkresid=st.wrkresid, devresid=st.devresid, x=model.X,
                offset=model.offset_or_zero, lam_index=ws.layout.index)


def _make(args):
    a = dict(args)
    return _glm.PirlsKernel(a.pop("pattern"), a.pop("lam_off"), a.pop("factorizer"),
                            a.pop("avals"), a.pop("ztxy"), a.pop("xtxy"), a.pop("rzxy"),
                            a.pop("y"), a.pop("fixed"), a.pop("eta"), a.pop("mu"),
                            a.pop("mu_eta"), a.pop("wrkwt"), a.pop("wrkresid"),
                            a.pop("devresid"), **a)


def test_kernel_binds_what_a_memoryview_would_and_refuses_the_rest():
    model = _cbpp()
    args = _kernel_args(model)
    kernel = _make(args)
    assert kernel.bound_to(args["avals"], args["ztxy"], args["xtxy"], args["rzxy"],
                           args["y"], args["x"], args["offset"])
    bad = {
        "y": args["y"].astype(np.float32),                        # another dtype
        "mu": np.zeros(2 * model.n)[::2],                         # not contiguous
        "x": np.asfortranarray(np.column_stack([args["x"], args["x"][:, :1]])),
        "lam_index": args["lam_index"].astype(np.int32),          # 4-byte integers
        "wrkwt": np.zeros(model.n)[None, :],                      # 2-d
        "offset": [0.0] * model.n,                                # not an array
    }
    for name, value in bad.items():
        with pytest.raises((ValueError, TypeError)):
            _make({**args, name: value})
    readonly = args["eta"].copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _make({**args, "eta": readonly})
    # read-only arrays are fine where the kernel only reads
    y = args["y"].copy()
    y.flags.writeable = False
    _make({**args, "y": y})


# -- the search from a start below its bound; the Python L-BFGS-B's work arrays -----------

@pytest.mark.parametrize("make", [_cbpp, _ticks])
def test_search_from_a_start_below_its_bound_is_its_twin(make):
    # θ starts below its bound: both searches move it onto it (β away from the GLM's,
    # whose gradient at θ = 0 is zero)
    model = make()
    lower = np.concatenate([np.full(model.p, -np.inf), model.layout.lower])
    x0 = np.concatenate([model.beta0 + 0.25, model.layout.initial() - 1.3])
    assert (x0[model.p:] < lower[model.p:]).all()
    runs = []
    for compiled in (True, False):
        m = make()
        opt = OptSummary(initial=x0.copy(), lowerbd=lower.copy())
        assert _glmm_search.minimize_one_term(m, opt, compiled=compiled) is opt
        runs.append(opt)
    oc, op = runs
    assert oc.feval == op.feval > 3 and oc.returnvalue == op.returnvalue
    np.testing.assert_array_equal(oc.fitlog[0][0][model.p:], lower[model.p:])
    np.testing.assert_array_equal(oc.fitlog[0][0][:model.p], x0[:model.p])
    for (xc, vc), (xp, vp) in zip(oc.fitlog, op.fitlog):
        assert xc.tobytes() == xp.tobytes() and vc == vp
    assert oc.final.tobytes() == op.final.tobytes()


def test_setulb_arrays_project_the_start_as_numpy_maximum():
    x0 = np.array([-0.0, 0.3, -2.0, 5.0, np.nan])
    lower = np.array([0.0, 0.5, -np.inf, 5.0, 0.0])
    w = _optimize.setulb_arrays(x0, lower, 10, 1e-14)
    want = np.where(np.isfinite(lower), np.maximum(x0, np.where(np.isfinite(lower), lower,
                                                                 0.0)), x0)
    assert w.x.tobytes() == want.tobytes()
    np.testing.assert_array_equal(w.nbd, [1, 1, 0, 1, 1])


# -- the check's Hessian, steps and Newton step -------------------------------------------

def _forward_numpy(value_and_grad, x, step, grad, known):
    # gradient_hessian's NumPy loop (stencil "forward"), as it was written
    n = len(x)
    hess = np.empty((n, n))
    k = 0 if known is None else int(known[0])
    for i in range(k, n):
        e = np.zeros(n)
        e[i] = step[i]
        hess[:, i] = (np.asarray(value_and_grad(x + e)[1], dtype=float) - grad) / step[i]
    if k:
        hess[:k, :k] = known[1]
        hess[k:, :k] = hess[:k, k:].T
    return 0.5 * (hess + hess.T)


def _quadratic():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(5, 5))
    h = a @ a.T + 5 * np.eye(5)
    c = rng.normal(size=5)

    def value_and_grad(x):
        x = np.asarray(x, dtype=float)
        g = h @ x - c + 0.1 * np.sin(3 * x)
        return float(0.5 * x @ h @ x - c @ x), g
    return value_and_grad, h


@pytest.mark.parametrize("k", [0, 2, 5])
def test_forward_hessian_in_floats_is_the_numpy_loop(k):
    value_and_grad, h = _quadratic()
    x = np.array([0.3, -0.0, 1e-12, -2.5, 7.0])
    step = np.array([1e-3, 2e-3, 5e-5, 1e-3, 7e-3])
    grad = value_and_grad(x)[1]
    known = None if k == 0 else (k, h[:k, :k] * 1.01)
    want = _forward_numpy(value_and_grad, x, step, grad, known)
    got, spent = gradient_hessian(value_and_grad, x, step, np.full(5, -np.inf),
                                  stencil="forward", grad=grad, known=known)
    assert spent == 5 - k
    assert got.dtype == np.float64 and got.shape == (5, 5)
    assert got.tobytes() == want.tobytes()
    # the β block handed as a list of lists, as the GLMM check hands it
    if known is not None:
        listed = (k, known[1].tolist())
        again, _ = gradient_hessian(value_and_grad, x, step, np.full(5, -np.inf),
                                    stencil="forward", grad=grad, known=listed)
        assert again.tobytes() == want.tobytes()


def test_forward_hessian_with_a_zero_step_takes_the_numpy_loop():
    value_and_grad, _ = _quadratic()
    x = np.ones(5)
    step = np.array([1e-3, 0.0, 1e-3, 1e-3, 1e-3])
    grad = value_and_grad(x)[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        got, _ = gradient_hessian(value_and_grad, x, step, np.full(5, -np.inf),
                                  stencil="forward", grad=grad)
        want = _forward_numpy(value_and_grad, x, step, grad, None)
    assert got.tobytes() == want.tobytes()


def _steps_numpy(x, beta_se=None):
    x = np.asarray(x, dtype=float)
    step = 1e-3 * np.maximum(0.05, np.abs(x))
    if beta_se is not None:
        se = np.asarray(beta_se, dtype=float)
        p = len(se)
        with np.errstate(invalid="ignore"):
            step[:p] = np.where(np.isfinite(se) & (se > 0), 0.05 * se, step[:p])
    return step


@pytest.mark.parametrize("se", [None, [0.2, np.nan, -1.0, 0.0, np.inf, 3e-7],
                                np.array([0.5, 0.25])])
def test_hessian_steps_in_floats_are_the_numpy_formula(se):
    x = np.array([0.0, -0.0, 0.05, -0.049, 12.5, np.nan, -np.inf, 3e-300, 0.0500001])
    got = hessian_steps(x, se)
    want = _steps_numpy(x, se)
    assert got.dtype == np.float64
    assert got.tobytes() == want.tobytes()


def test_newton_polish_told_symmetric_is_the_symmetrized_one():
    from mixedmodels._derivs import ConvergenceCheck
    value_and_grad, h = _quadratic()
    x = np.array([0.1, 0.2, -0.3, 0.4, 0.5])
    g = value_and_grad(x)[1]
    hs = 0.5 * (h + h.T)
    results = []
    for symmetric in (True, False):
        opt = OptSummary(initial=x.copy(), lowerbd=np.full(5, -np.inf))
        opt.final, opt.fmin = x.copy(), value_and_grad(x)[0]
        record = ConvergenceCheck.from_derivatives(g, hs, boundary=np.zeros(5, bool))
        _optimize._newton_polish(lambda v: value_and_grad(v)[0], opt, record,
                                 np.zeros(5, bool), opt.lowerbd, symmetric=symmetric)
        results.append(opt)
    a, b = results
    assert a.polished and b.polished
    assert a.final.tobytes() == b.final.tobytes() and a.fmin == b.fmin


@pytest.mark.parametrize("make", [_cbpp, _ticks])
def test_fit_is_the_fit_with_the_numpy_check(make, monkeypatch):
    # the whole fit, with the check's steps and Hessian in Python floats, against the
    # same fit with their NumPy twins
    fits = []
    for floats in (True, False):
        if not floats:
            monkeypatch.setattr("mixedmodels.glmm.hessian_steps", _steps_numpy)
            monkeypatch.setattr(_optimize, "_forward_hessian_floats",
                                lambda *args: None)
        fits.append(make().fit())
    a, b = fits
    for name in ("step", "hessian", "gradient", "point"):
        assert getattr(a.optsum.derivs, name).tobytes() == getattr(b.optsum.derivs,
                                                                   name).tobytes()
    assert a.optsum.final.tobytes() == b.optsum.final.tobytes()
    assert a.objective == b.objective
    assert a.vcov.tobytes() == b.vcov.tobytes()


# -- the module functions and methods bound without memoryviews -----------------------------

def _readonly(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def test_glm_irls_binds_what_a_memoryview_would_and_refuses_the_rest():
    model = _cbpp()
    fam, n, p = model.family, model.n, model.p
    eta0 = fam.link.link(fam.starting_mu(model.y, model.prior_w))

    def run(**over):
        outs = dict(eta=eta0.copy(), mu=np.empty(n), mu_eta=np.empty(n), wrkwt=np.empty(n),
                    wrkresid=np.empty(n), devresid=np.empty(n), beta=np.empty(p))
        a = dict(x=model.X, y=model.y, prior_w=model.prior_w, offset=np.empty(0), **outs)
        a.update(over)
        solves = _glm.glm_irls(fam.code, fam.link.code, fam.param, a["x"], a["y"],
                               a["prior_w"], a["offset"], a["eta"], a["mu"], a["mu_eta"],
                               a["wrkwt"], a["wrkresid"], a["devresid"], a["beta"])
        return solves, a
    solves, a = run()
    # read-only inputs are fine; the result is the model's GLM start
    solves_ro, b = run(x=_readonly(model.X), y=_readonly(model.y),
                       prior_w=_readonly(model.prior_w))
    assert solves == solves_ro > 0
    assert a["beta"].tobytes() == b["beta"].tobytes() == model.beta0.tobytes()
    bad = {"x": np.asfortranarray(model.X), "y": model.y.astype(np.float32),
           "prior_w": list(model.prior_w), "mu": np.empty(2 * n)[::2],
           "beta": np.empty((p, 1)), "offset": np.zeros(n + 1)}
    for name, value in bad.items():
        with pytest.raises((ValueError, TypeError)):
            run(**{name: value})
    with pytest.raises(ValueError, match="writable"):
        run(devresid=_readonly(np.empty(n)))


def test_response_check_and_loglik_bind_as_memoryviews_did():
    model = _cbpp()
    fam, y, w = model.family, model.y, model.prior_w
    assert _glm.response_check(fam.code, _readonly(y), _readonly(w))[0]
    with pytest.raises(TypeError):
        _glm.response_check(fam.code, list(y), w)
    with pytest.raises(ValueError):
        _glm.response_check(fam.code, y.astype(np.float32), w)
    mu = np.full(model.n, 0.3)
    out = np.empty(model.n)
    total = _glm.loglik(fam.code, y, mu, w, 1.0, out, fam.param)
    assert total == pytest.approx(out.sum(), rel=1e-14)
    with pytest.raises(ValueError, match="writable"):
        _glm.loglik(fam.code, y, mu, w, 1.0, _readonly(out), fam.param)
    with pytest.raises(ValueError):
        _glm.loglik(fam.code, y, mu, w, 1.0, out, fam.param, fam.link.code,
                    np.zeros(2 * model.n)[::2])


def test_kernel_methods_refuse_what_memoryviews_would():
    model = _cbpp()
    model.fit()
    kernel = _pirls.row_kernel(model)
    fam, p, q = model.family, model.p, model.workspace.q
    theta, beta = np.array([0.6]), model.beta0.copy()
    u = np.zeros(q)
    grad = np.empty(p + 1)
    value = kernel.laplace(fam.code, fam.link.code, fam.param, model.prior_w, theta, beta,
                           u, grad)[0]
    u2 = np.zeros(q)
    again = kernel.laplace(fam.code, fam.link.code, fam.param, _readonly(model.prior_w),
                           _readonly(theta), _readonly(beta), u2, grad)[0]
    assert value == again and u.tobytes() == u2.tobytes()
    for args in [(model.prior_w, theta, beta, _readonly(u), grad),
                 (model.prior_w, theta, beta, u, _readonly(grad)),
                 (model.prior_w, [0.6], beta, u, grad),
                 (model.prior_w, theta, beta.astype(np.float32), u, grad),
                 (np.ones(model.n + 1), theta, beta, u, grad),
                 (model.prior_w, np.array([0.6, 0.1]), beta, u, grad)]:
        with pytest.raises((ValueError, TypeError)):
            kernel.laplace(fam.code, fam.link.code, fam.param, *args)
    with pytest.raises((ValueError, TypeError)):
        kernel.pirls(fam.code, fam.link.code, fam.param, model.prior_w, theta,
                     np.zeros(q + 1), beta=beta)
    with pytest.raises(ValueError, match="writable"):
        kernel.pirls(fam.code, fam.link.code, fam.param, model.prior_w, theta,
                     _readonly(np.zeros(q)), beta=beta)
    with pytest.raises(ValueError, match="theta"):
        kernel.evaluate(fam.code, fam.link.code, fam.param, model.prior_w, np.ones(2), u)


def test_beta_covariance_makes_its_arrays_or_fills_those_given():
    model = _cbpp()
    fit = model.fit()
    p = model.p
    kernel = _pirls.row_kernel(model)
    theta = np.asarray(fit.theta, dtype=float)
    model._u = None
    model._value(theta, fit.beta_w)
    schur, vcov = kernel.beta_covariance(theta)
    given = np.empty((p, p)), np.empty((p, p))
    assert kernel.beta_covariance(theta, *given)[0] is given[0]
    assert schur.tobytes() == given[0].tobytes() and vcov.tobytes() == given[1].tobytes()
    np.testing.assert_allclose(vcov @ schur, np.eye(p), atol=1e-10)
    with pytest.raises(ValueError):
        kernel.beta_covariance(theta, np.empty((p, p + 1)), np.empty((p, p)))
    with pytest.raises(ValueError, match="writable"):
        kernel.beta_covariance(theta, _readonly(np.empty((p, p))), np.empty((p, p)))


# -- numpy's summation, and the saturated log-likelihood --------------------------------------

@pytest.mark.parametrize("n", list(range(0, 40)) + [63, 64, 65, 127, 128, 129, 255, 256,
                                                     257, 1000, 1031, 4097, 10007])
def test_add_reduce_is_numpy_add_reduce_bit_for_bit(n):
    rng = np.random.default_rng(n)
    for scale in (rng.choice([1.0, 1e-9, 1e9], n), np.full(n, 1.0)):
        a = rng.standard_normal(n) * scale
        want = float(np.add.reduce(a))
        got = _glm.add_reduce(a)
        assert type(got) is float and repr(got) == repr(want)
    assert repr(_glm.add_reduce(np.full(n, -0.0))) == repr(float(np.add.reduce(np.full(n, -0.0))))


def _saturated_numpy(fam, y, mu, w, eta, devresid):
    return float(np.add.reduce(fam.loglik(y, mu, w, 1.0, eta=eta))
                 + 0.5 * np.add.reduce(devresid))


@pytest.mark.parametrize("fam", [F.Binomial(), F.Bernoulli(), F.Poisson(),
                                 F.Bernoulli(F.ProbitLink()), F.Binomial(F.CloglogLink()),
                                 F.Poisson(F.IdentityLink())])
def test_saturated_loglik_is_its_numpy_twin(fam):
    rng = np.random.default_rng(7)
    for n in (1, 7, 56, 130, 563):
        eta = rng.normal(0.0, 2.0, n)
        if fam.link.name == "identity":
            eta = np.abs(eta) + 0.1
        mu = fam.link.inverse(eta)
        if fam.name == "Poisson":
            y = rng.poisson(3.0, n).astype(float)
            w = np.empty(0)
        elif fam.name == "Bernoulli":
            y = (rng.random(n) < 0.4).astype(float)
            w = np.empty(0)
        else:
            w = rng.integers(1, 30, n).astype(float)
            w[::5] = 0.0                            # rows of weight zero add nothing
            y = rng.binomial(w.astype(int), 0.3) / np.maximum(w, 1.0)
        devresid = rng.random(n)
        want = _saturated_numpy(fam, y, mu, None if w.size == 0 else w, eta, devresid)
        got = _glm.saturated_loglik(fam.code, fam.link.code, fam.param, y, mu, w, eta,
                                    devresid)
        assert repr(got) == repr(want)
    with pytest.raises(ValueError):
        _glm.saturated_loglik(fam.code, fam.link.code, fam.param, y, mu[:-1], w, eta,
                              devresid)


def test_fit_objective_is_the_numpy_saturated_part():
    fit = _cbpp().fit()
    model = fit.model
    saturated = _saturated_numpy(model.family, model.y, np.asarray(fit.mu), model.prior_w,
                                 np.asarray(fit.eta), np.asarray(fit.devresid))
    assert fit.objective == -2.0 * (-0.5 * fit.deviance + saturated)


def test_pirls_state_arrays_are_distinct_zeros_and_work1_is_made_on_use():
    st = _pirls.PirlsState(5)
    arrays = [st.eta, st.mu, st.mu_eta, st.wrkwt, st.wrkresid, st.devresid, st.fixed]
    assert len({id(a) for a in arrays}) == 7
    for a in arrays:
        assert a.shape == (5,) and a.dtype == np.float64 and a.flags.c_contiguous
        assert a.flags.owndata and not a.any()
    assert st._work1 is None
    assert st.work1.shape == (5, 1) and not st.work1.any() and st.work1 is st.work1

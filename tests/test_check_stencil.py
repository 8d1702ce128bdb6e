"""The convergence check of the exact-gradient GLMM fits with a forward-difference Hessian.

``check_optimum_with_gradient`` takes the Hessian from differences of the exact gradient:
central (2n + 1 gradients, O(h²)) or forward (n + 1, O(h), ~1e-3 relative with the steps
of ``hessian_steps``). The fits use the forward stencil; these tests hold it to the
central one on the models of test_gradient.py and test_agq_gradient.py: the same verdict
and messages of the check, at the optimum and away from it, the same fit, and the same
``vcov_hessian``, which takes the central Hessian again at the check's point.
"""
import pickle

import numpy as np
import pytest
import test_agq_gradient as agq
import test_gradient as laplace

from mixedmodels._derivs import ConvergenceCheck
from mixedmodels._optimize import OptSummary, check_optimum_with_gradient, gradient_hessian

MODELS = {**laplace.CASES, **agq.CASES}
_fits = {}


def fits(name):
    """(forward-stencil fit, central-stencil fit) of one model, both with every column
    differenced, fitted once per session."""
    if name not in _fits:
        model = MODELS[name]()
        model._schur_beta_block = False
        forward = model.fit()
        model = MODELS[name]()
        model._check_stencil = "central"
        model._schur_beta_block = False
        _fits[name] = (forward, model.fit())
    return _fits[name]


_default_fits = {}


def default_fit(name):
    """The fit as users get it: forward differences in θ, the β block from PIRLS."""
    if name not in _default_fits:
        _default_fits[name] = MODELS[name]().fit()
    return _default_fits[name]


def kinds(messages):
    """What each message says, without its numbers."""
    return [m.split(":")[0] for m in messages]


def check_at(fit, x, stencil):
    """The check at x, on a copy of the fit's record (the fit is left alone)."""
    model = fit.model
    opt = OptSummary(initial=x.copy(), lowerbd=fit.optsum.lowerbd.copy())
    opt.final = x.copy()
    opt.fmin = float(model._joint_value_and_grad(x)[0])
    record = check_optimum_with_gradient(model._joint_value_and_grad, opt, warn=False,
                                         step=fit.optsum.derivs.step, stencil=stencil)
    model._u = None
    return record


@pytest.mark.parametrize("name", list(MODELS))
def test_the_forward_check_gives_the_central_verdict(name):
    forward, central = fits(name)
    df, dc = forward.optsum.derivs, central.optsum.derivs
    assert (df.stencil, dc.stencil) == ("forward", "central")
    n = len(df.gradient)
    assert (df.nfeval, dc.nfeval) == (n + 1, 2 * n + 1)
    # the search is the same up to the check, which is taken at the same point
    np.testing.assert_array_equal(df.point, dc.point)
    assert df.converged == dc.converged and kinds(df.messages) == kinds(dc.messages)
    # the forward Hessian's O(h) error: ~1e-3 of the central one
    err = np.linalg.norm(df.hessian - dc.hessian, 2) / np.linalg.norm(dc.hessian, 2)
    assert err < 2e-2
    # the Newton step from either Hessian lands on the same optimum
    assert forward.objective == pytest.approx(central.objective, abs=1e-9)
    np.testing.assert_allclose(forward.theta, central.theta, rtol=1e-6)
    np.testing.assert_allclose(forward.coef, central.coef, rtol=1e-6, atol=1e-9)
    # away from the optimum both stencils fail the check, and for the same reasons
    x = laplace.perturbed(forward.model, df.point)
    away_f, away_c = check_at(forward, x, "forward"), check_at(forward, x, "central")
    assert not away_f.converged and kinds(away_f.messages) == kinds(away_c.messages)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_beta_block_from_pirls_gives_the_central_verdict(name):
    """The default check differences the gradient in θ only; its β block is twice the
    inverse of X̃'s conditional covariance at the modes (RX'RX, algebra), and its
    verdict, messages and optimum are the central stencil's."""
    fit, (_, central) = default_fit(name), fits(name)
    d, dc = fit.optsum.derivs, central.optsum.derivs
    model = fit.model
    p, n = model.p, len(d.gradient)
    assert d.stencil == "forward+known"
    assert d.nfeval == (n - p) + 1
    beta_w, theta, phi, fam = model._split(d.point, True)
    np.testing.assert_allclose(d.hessian[:p, :p],
                               2 * np.linalg.inv(model._vcov_working(theta, beta_w, phi, fam)),
                               rtol=1e-10)
    model._u = None
    # the θ columns are the forward stencil's
    full = fits(name)[0].optsum.derivs
    np.testing.assert_array_equal(d.point, full.point)
    np.testing.assert_allclose(d.hessian[p:, p:], full.hessian[p:, p:], rtol=1e-6)
    # the curvature of log det M that the β block leaves out: a few per cent at most
    err = np.linalg.norm(d.hessian - dc.hessian, 2) / np.linalg.norm(dc.hessian, 2)
    assert err < 5e-2
    assert d.converged == dc.converged and kinds(d.messages) == kinds(dc.messages)
    assert fit.objective == pytest.approx(central.objective, abs=1e-9)
    np.testing.assert_allclose(fit.theta, central.theta, rtol=1e-6)
    np.testing.assert_allclose(fit.coef, central.coef, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit.vcov_hessian, central.vcov_hessian, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_vcov_hessian_is_the_central_one(name):
    """After a forward-stencil fit, vcov_hessian is what the central-stencil fit keeps
    from its own check (the numbers from before the forward stencil)."""
    forward, central = fits(name)
    np.testing.assert_allclose(forward.vcov_hessian, central.vcov_hessian, rtol=1e-8, atol=0)
    np.testing.assert_allclose(forward._hessian_covariance(), central._hessian_covariance(),
                               rtol=1e-8, atol=0)


def test_the_central_hessian_is_taken_again_once_and_only_on_demand():
    fit = MODELS["cbpp"]().fit()
    model = fit.model
    calls = []
    inner = model._joint_value_and_grad
    model._joint_value_and_grad = lambda x: calls.append(1) or inner(x)
    # printing the fit and its tables asks nothing of the Hessian
    str(fit), fit.to_html(), fit.to_markdown(), fit.coeftable(), fit.compact_table()
    assert not calls and "hessian_covariance" not in fit._cache
    n = len(fit.optsum.derivs.gradient)
    fit.stderror_hessian
    fit.coeftable(se="hessian")
    assert len(calls) == 2 * n        # no parameter on its bound: 2 gradients each
    derivs = fit.optsum.derivs
    hess, spent = gradient_hessian(inner, derivs.point, derivs.step, fit.optsum.lowerbd)
    assert spent == 2 * n


def test_the_record_pickles_and_old_records_read_as_central():
    fit = MODELS["cbpp"]().fit()
    back = pickle.loads(pickle.dumps(fit))
    assert back.optsum.derivs.stencil == "forward+known"
    np.testing.assert_array_equal(back.optsum.derivs.point, fit.optsum.derivs.point)
    np.testing.assert_allclose(back.vcov_hessian, fit.vcov_hessian, rtol=1e-10, atol=0)
    # a record pickled before the stencil was kept: its Hessian was central
    old = ConvergenceCheck.from_derivatives(np.zeros(2), np.eye(2))
    for name in ("stencil", "point", "step"):
        del old.__dict__[name]
    back = pickle.loads(pickle.dumps(old))
    assert back.stencil == "central" and back.point is None and back.step is None


def test_an_unknown_stencil_is_refused():
    fit = MODELS["cbpp"]().fit()
    with pytest.raises(ValueError, match="stencil"):
        gradient_hessian(fit.model._joint_value_and_grad, fit.optsum.derivs.point,
                         fit.optsum.derivs.step, fit.optsum.lowerbd, stencil="backward")

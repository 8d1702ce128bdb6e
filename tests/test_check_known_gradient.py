"""The convergence check of an LMM taking the trust-region search's last gradient (the
search ends at the point the check starts from, and has the exact gradient there) instead
of evaluating it again: the same check, the same fit, bit for bit, one evaluation fewer."""
import numpy as np
import pytest

import mixedmodels as mm
from mixedmodels import _optimize
from mixedmodels._kernels import _search
from mixedmodels._kernels._check import check_and_polish
from mixedmodels._lmm_gradient import compiled_objective

MODELS = {
    "sleepstudy": ("reaction ~ 1 + days + (1 + days | subj)", "sleepstudy", False),
    "sleepstudy_reml": ("reaction ~ 1 + days + (1 + days | subj)", "sleepstudy", True),
    "penicillin": ("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin", False),
    "pastes": ("strength ~ 1 + (1 | batch) + (1 | batch & cask)", "pastes", False),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_search_end_is_the_evaluation_there(name):
    formula, data, reml = MODELS[name]
    model = mm.LinearMixedModel(formula, mm.dataset(data), REML=reml)
    kernel = compiled_objective(model)
    x0, lower = model.layout.initial(), model.layout.lower
    end = np.empty((2, len(x0)))
    xs, fs, code = _search.trust_region(kernel, x0, lower, 0.75, 1e-8, 1000, end)
    best = int(np.argmin(fs))
    assert end[0].tobytes() == xs[best].tobytes()
    value, grad = model._value_and_gradient(end[0], kernel)
    assert value == fs[best]
    assert grad.tobytes() == end[1].tobytes()
    # and the check from there is the same with or without it
    outs = [check_and_polish(kernel, end[0], lower, float(fs[best]), 8, known)
            for known in (None, end[1])]
    for key in ("x", "grad", "hessian", "boundary", "trials", "trial_values"):
        assert np.asarray(outs[0][key]).tobytes() == np.asarray(outs[1][key]).tobytes()
    assert outs[0]["fmin"] == outs[1]["fmin"]


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_with_the_known_gradient_is_the_fit_without(name, monkeypatch):
    formula, data, reml = MODELS[name]
    got = mm.fit(formula, mm.dataset(data), REML=reml)
    real = _optimize._check_compiled
    monkeypatch.setattr(_optimize, "_check_compiled",
                        lambda kernel, optsum, warn, max_steps, known_grad=None:
                        real(kernel, optsum, warn, max_steps, None))
    want = mm.fit(formula, mm.dataset(data), REML=reml)
    assert got.objective == want.objective
    assert got.theta.tobytes() == want.theta.tobytes()
    assert got.coef.tobytes() == want.coef.tobytes()
    assert got.optsum.derivs.nfeval == want.optsum.derivs.nfeval - 1
    assert got.optsum.derivs.gradient.tobytes() == want.optsum.derivs.gradient.tobytes()
    assert got.optsum.derivs.hessian.tobytes() == want.optsum.derivs.hessian.tobytes()


def test_known_gradient_of_the_wrong_length_is_refused():
    model = mm.LinearMixedModel("reaction ~ 1 + days + (1 + days | subj)",
                                mm.dataset("sleepstudy"))
    kernel = compiled_objective(model)
    with pytest.raises(ValueError, match="known_grad"):
        check_and_polish(kernel, model.layout.initial(), model.layout.lower, 1.0, 3,
                         np.zeros(2))

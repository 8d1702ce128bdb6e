"""The dense-tail gradient pass on the shapes its fast paths take (issue 9).

A scalar first term with a tail of at most 64 rows has Y_l made level by level inside the
traces; a larger tail keeps the sweep by rows of S⁻¹. Both are held to the NumPy twin
(_lmm_gradient.dense_tail_sums_numpy), and a level block that is not positive definite
still gives an infinite objective.
"""
import warnings

import numpy as np
import pandas as pd
import pytest

import mixedmodels as mm
from mixedmodels._lmm_gradient import (_ROUTES, compiled_objective, dense_tail_sums_numpy,
                                       gradient_route, lmm_value_and_gradient)


def _frame(ng, nh, n=1500, seed=11):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(dict(x=rng.normal(size=n), g=rng.integers(0, ng, n),
                           h=rng.integers(0, nh, n), k=rng.integers(0, 5, n)))
    df["y"] = (df.x + rng.normal(size=ng)[df.g] + rng.normal(size=nh)[df.h]
               + rng.normal(size=5)[df.k] + rng.normal(size=n))
    return df


# (formula, levels of g, of h, keywords, the tail's rows)
CASES = [
    ("y ~ 1 + x + (1 | g) + (1 | h)", 120, 70, {}, 70),         # by rows
    ("y ~ 1 + x + (1 | g) + (1 | h)", 120, 70, {"REML": True}, 70),
    ("y ~ 1 + x + (1 | g) + (1 | h)", 40, 12, {}, 12),          # level by level
    ("y ~ 1 + x + (1 | g) + (1 | h) + (1 + x | k)", 60, 9, {"REML": True}, 19),
    ("y ~ 1 + x + (1 | g) + (1 + x | h)", 60, 40, {}, 80),      # by rows, a vector term
]


@pytest.mark.parametrize("formula,ng,nh,kw,rows", CASES)
def test_scalar_first_term_sums_equal_their_numpy_twin(formula, ng, nh, kw, rows):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mm.LinearMixedModel(formula, _frame(ng, nh), **kw)
    assert gradient_route(m.workspace) == "dense-tail"
    pat = m.workspace.pattern
    assert int(pat.kk[0]) == 1 and m.workspace.q - int(pat.uoff[1]) == rows
    rng = np.random.default_rng(5)
    finite = np.isfinite(m.layout.lower)
    for th in (np.where(finite, rng.uniform(0.1, 1.5, finite.size), 0.3),
               np.where(finite, rng.uniform(0.5, 3.0, finite.size), -0.6)):
        grad = lmm_value_and_gradient(m, th)[1]
        sums = _ROUTES[m.workspace].kernel.sums
        sums0, grad0 = dense_tail_sums_numpy(m, th)
        scale = max(1.0, np.abs(sums0).max())
        assert np.allclose(sums, sums0, rtol=1e-10, atol=1e-10 * scale)
        assert np.allclose(grad, grad0, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(grad0).max()))


def test_level_block_not_positive_definite_gives_inf():
    m = mm.LinearMixedModel("diameter ~ 1 + (1 | plate) + (1 | sample)",
                            mm.dataset("penicillin"))
    kernel = compiled_objective(m)
    val, grad = kernel.value_and_gradient(np.array([np.nan, 0.5]))
    assert val == np.inf and np.all(np.isnan(grad))
    val, grad = kernel.value_and_gradient(np.array([0.7, 0.5]))
    assert np.isfinite(val) and np.all(np.isfinite(grad))

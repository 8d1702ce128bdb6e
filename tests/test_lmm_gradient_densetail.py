"""The compiled dense-tail pass of the LMM gradient (_kernels/_lmm_gradient.pyx).

Held to its NumPy twin (_lmm_gradient.dense_tail_sums_numpy: the same blocks of M⁻¹ from
dense copies of M and C and NumPy's inverse of the Schur complement), sum by sum, and
checked to refuse what its unchecked loops could not take. The gradient it makes is held
to differences of the objective and to the dense formulas in test_lmm_gradient.py.
"""
import warnings

import numpy as np
import pandas as pd
import pytest

import mixedmodels as mm
from mixedmodels._kernels._lmm_gradient import DenseTailGradient, slot_values
from mixedmodels._lmm_gradient import (_ROUTES, aval_at, dense_tail_sums_numpy,
                                       gradient_route, lmm_value_and_gradient)


def _frame():
    rng = np.random.default_rng(7)
    n = 500
    df = pd.DataFrame(dict(x=rng.normal(size=n), g=rng.integers(0, 30, n),
                           h=rng.integers(0, 9, n), k=rng.integers(0, 4, n),
                           w=rng.uniform(0.5, 2.0, n)))
    df["y"] = (df.x + rng.normal(size=30)[df.g] * (1 + 0.4 * df.x) + rng.normal(size=9)[df.h]
               + rng.normal(size=n))
    return df


CASES = [
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin", {}),
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin", {"REML": True}),
    ("strength ~ 1 + (1 | batch/cask)", "pastes", {"REML": True}),
    ("y ~ 1 + x + (1 + x | g) + (1 | h) + (1 | k)", None, {"weights": "w"}),
    ("y ~ 1 + x + (1 + x | g) + (1 | h) + (1 | k)", None, {"REML": True, "weights": "w"}),
    ("y ~ 1 + x + (1 + x | g) + (1 + x | h)", None, {"REML": True}),
    ("y ~ 1 + x + (1 | g) + (1 + x || h)", None, {}),
    ("y ~ 0 + (1 | g) + (1 | h)", None, {}),
    ("y ~ 0 + (1 | g) + (1 | h)", None, {"REML": True}),
]


def _model(formula, data, kw):
    df = _frame() if data is None else mm.dataset(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mm.LinearMixedModel(formula, df, **kw)


@pytest.mark.parametrize("formula,data,kw", CASES)
def test_slot_values_are_their_numpy_twin(formula, data, kw):
    pat = _model(formula, data, kw).workspace.pattern
    out = slot_values(pat.pos, len(pat.indices))
    assert out.dtype == np.int64 and np.array_equal(out, aval_at(pat))
    # a slot no value reaches, and a value past the last slot, are refused as the twin's
    with pytest.raises(ValueError, match="no value of C"):
        slot_values(np.where(pat.pos == 0, -1, pat.pos), len(pat.indices))
    with pytest.raises(ValueError, match="no value of C"):
        slot_values(pat.pos, len(pat.indices) - 1)


@pytest.mark.parametrize("formula,data,kw", CASES)
def test_compiled_sums_equal_their_numpy_twin(formula, data, kw):
    m = _model(formula, data, kw)
    assert gradient_route(m.workspace) == "dense-tail"
    rng = np.random.default_rng(3)
    finite = np.isfinite(m.layout.lower)
    for th in (np.where(finite, 1.0, 0.0) + rng.uniform(0.1, 0.8, m.layout.ntheta),
               np.where(finite, 0.4, -0.3), np.where(finite, rng.uniform(0, 2, finite.size), 0.2)):
        grad = lmm_value_and_gradient(m, th)[1]
        sums = _ROUTES[m.workspace].kernel.sums
        sums0, grad0 = dense_tail_sums_numpy(m, th)
        scale = max(1.0, np.abs(sums0).max())
        assert np.allclose(sums, sums0, rtol=1e-10, atol=1e-10 * scale)
        assert np.allclose(grad, grad0, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(grad0).max()))
        if not (m.REML and m.p):
            assert np.all(sums[2] == 0.0)


def test_a_bound_component_and_a_zero_template():
    # θ on the bound: Λ singular, the sums need no Λ⁻¹
    m = _model("y ~ 1 + x + (1 + x | g) + (1 | h) + (1 | k)", None, {"REML": True})
    th = np.array([0.0, 0.0, 0.7, 0.0, 1.1])
    grad = lmm_value_and_gradient(m, th)[1]
    sums0, grad0 = dense_tail_sums_numpy(m, th)
    assert np.allclose(_ROUTES[m.workspace].kernel.sums, sums0, rtol=1e-10, atol=1e-10)
    assert np.allclose(grad, grad0, rtol=1e-10, atol=1e-10)


def _bound_arrays(m):
    ws = m.workspace
    pat, layout = ws.pattern, ws.layout
    return dict(indptr=pat.indptr, indices=pat.indices, mx=ws._mx, avals=ws.avals,
                aval_at=aval_at(pat), lam=ws._lam, lam_off=layout.lam_off,
                lam_index=layout.index, kk=pat.kk, uoff=pat.uoff)


def test_the_kernel_refuses_what_its_loops_cannot_take():
    m = _model("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin", {})
    ws = m.workspace
    arrays = _bound_arrays(m)
    bad = [
        dict(aval_at=arrays["aval_at"][:-1]),
        dict(aval_at=np.full_like(arrays["aval_at"], len(ws.avals))),
        dict(lam_index=arrays["lam_index"] + 100),
        dict(kk=np.array([1], dtype=np.int32), uoff=arrays["uoff"][:1],
             lam_off=arrays["lam_off"][:1]),
        dict(uoff=np.array([0, 25], dtype=np.int64)),          # not term 0's own levels
        dict(indices=np.roll(arrays["indices"], 1)),           # not a lower triangle
    ]
    for change in bad:
        with pytest.raises(ValueError):
            DenseTailGradient(**{**arrays, **change})
    # a level of term 0 that meets only part of a two-column level of the tail
    m2 = _model("y ~ 1 + x + (1 | g) + (1 + x | h)", None, {})
    a2 = _bound_arrays(m2)
    indices = a2["indices"].copy()
    first = int(a2["indptr"][0]) + 1          # level 0 of g: its first tail row
    indices[first] += 1
    with pytest.raises(ValueError):
        DenseTailGradient(**{**a2, "indices": indices})
    kernel = DenseTailGradient(**arrays)
    with pytest.raises(ValueError):
        kernel.gradient(np.zeros((6, 6), order="F"), False, 144.0)      # not bound
    with pytest.raises(ValueError):
        kernel.bind_products(np.zeros((5, 2), order="F"), np.zeros((2, 2)))
    kernel.bind_products(ws.ztxy, ws._r)
    with pytest.raises(ValueError):
        kernel.gradient(np.zeros((5, 5), order="F"), False, 144.0)
    with pytest.raises(ValueError):
        kernel.gradient(np.zeros((6, 6), dtype=np.float32, order="F"), False, 144.0)
    with pytest.raises(ValueError):
        kernel.gradient(np.zeros((6, 6, 1), order="F"), False, 144.0)
    with pytest.raises(TypeError):
        kernel.gradient(None, False, 144.0)


def test_a_not_positive_definite_level_block_raises():
    m = _model("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin", {})
    ws = m.workspace
    m._evaluate(np.array([1.0, 1.0]))
    kernel = DenseTailGradient(**{**_bound_arrays(m), "mx": -ws._mx})
    kernel.bind_products(ws.ztxy, ws._r)
    with pytest.raises(np.linalg.LinAlgError):
        kernel.gradient(np.eye(6, order="F"), False, 144.0)


@pytest.mark.parametrize("formula,data,kw", [CASES[1], CASES[4], CASES[5]])
def test_only_the_lower_triangle_of_the_tail_inverse_is_read(formula, data, kw):
    m = _model(formula, data, kw)
    ws = m.workspace
    th = m.layout.initial() * 0.8 + 0.15
    grad = lmm_value_and_gradient(m, th)[1]
    sinv = ws.factor.tail_inverse()
    sinv[np.triu_indices(sinv.shape[0], 1)] = np.nan
    assert np.array_equal(_ROUTES[ws].kernel.gradient(sinv, m.REML, float(m._dfr)), grad)

"""The selected inversions behind the multi-term Laplace gradient, and its compiled passes.

- ``selected_inverse`` of CHOLMOD's factor (simplicial and supernodal) and of the dense
  tail: M⁻¹ at the slots of M's lower pattern, held to the dense inverse and to their
  NumPy twins (Takahashi's recurrences on the exported unit factor; the dense tail's
  block formula on the dense M).
- ``laplace_leverage_pass`` and ``laplace_residual_pass`` (``_multi_term_compiled``)
  held to ``_gradient_at_modes_numpy`` on the same M⁻¹, and the gradient they make to
  central differences of the objective on random crossed and nested designs.
"""
import numpy as np
import pandas as pd
import pytest
from conftest import KERNEL, joint_optimum
from mixedmodels._kernels._gradient import laplace_leverage_pass
from mixedmodels._linalg._cholmod import CholmodError, SparseCholesky
from mixedmodels._linalg._densetail import DenseTailFactor
from test_gradient import assert_gradient, finite_differences, perturbed

import mixedmodels as mm
from mixedmodels._gradient import (
    _dense_tail_selected_inverse_numpy,
    _gradient_at_modes_numpy,
    _multi_term_compiled,
    _selected_inverse,
    _takahashi_numpy,
    laplace_gradient,
    laplace_gradient_reference,
    laplace_value_and_gradient,
)
from mixedmodels._linalg.system import BlockedSystem

# -- M from random designs -----------------------------------------------------------------
DESIGNS = {
    # (levels per term, in decreasing order; columns per term; rows)
    "crossed scalar": ([23, 7], [1, 1], 150),
    "three scalar terms": ([40, 12, 5], [1, 1, 1], 150),
    "vector first term": ([14, 6, 3], [2, 1, 2], 150),
    "vector later term": ([25, 9], [1, 3], 150),
    # every level of term 0 meets most of the others: a filled tail, wide supernodes
    "filled tail": ([30, 24, 4], [1, 2, 1], 900),
}


def random_m(name, seed=3):
    """A workspace with M = Λ'Z'WZΛ + I written into its values at a random θ and W, and
    the dense M."""
    nlevels, kk, n = DESIGNS[name]
    rng = np.random.default_rng(seed)
    codes, z = [], []
    for nl, k in zip(nlevels, kk):
        c = rng.integers(0, nl, n).astype(np.int32)
        c[:nl] = rng.permutation(nl)            # every level present
        codes.append(c)
        z.append(np.column_stack([np.ones(n)] + [rng.standard_normal(n) for _ in range(k - 1)]))
    ws = BlockedSystem(codes, z, nlevels, [False] * len(kk))
    theta = rng.uniform(0.3, 1.4, ws.layout.ntheta)
    off = ~np.isfinite(ws.layout.lower)
    theta[off] = rng.uniform(-0.6, 0.6, off.sum())
    ws.set_products(rng.standard_normal((n, 1)), rng.uniform(0.05, 0.25, n))
    ws.factorize(theta, schur=False)
    pat = ws.pattern
    cols = np.repeat(np.arange(ws.q), np.diff(pat.indptr))
    m = np.zeros((ws.q, ws.q))
    m[pat.indices, cols] = ws._mx
    return ws, np.tril(m) + np.tril(m, -1).T


def at_slots(ws, dense):
    pat = ws.pattern
    return dense[pat.indices, np.repeat(np.arange(ws.q), np.diff(pat.indptr))]


@pytest.mark.parametrize("name", list(DESIGNS))
@pytest.mark.parametrize("mode", ["simplicial", "supernodal"])
def test_cholmod_selected_inverse(name, mode):
    ws, m = random_m(name)
    pat = ws.pattern
    factor = SparseCholesky(pat.indptr, pat.indices, ws._mx.copy(), mode=mode)
    factor.factorize()
    got = np.full(len(pat.indices), np.nan)
    factor.selected_inverse(got)
    np.testing.assert_allclose(got, at_slots(ws, np.linalg.inv(m)), rtol=0, atol=KERNEL)
    indptr, indices, data, d = factor.unit_factor()
    twin = _takahashi_numpy(indptr, indices, data, d, factor.perm, pat.indptr, pat.indices)
    np.testing.assert_allclose(got, twin, rtol=0, atol=KERNEL)


@pytest.mark.parametrize("mode", ["simplicial", "supernodal"])
def test_unit_factor_is_the_factor(mode):
    # P M P' = U D U', U unit lower triangular, each column's diagonal first
    ws, m = random_m("three scalar terms")
    pat = ws.pattern
    factor = SparseCholesky(pat.indptr, pat.indices, ws._mx.copy(), mode=mode)
    factor.factorize()
    indptr, indices, data, d = factor.unit_factor()
    assert np.all(indices[indptr[:-1]] == np.arange(ws.q))
    assert np.all(data[indptr[:-1]] == 1.0)
    u = np.zeros((ws.q, ws.q))
    u[indices, np.repeat(np.arange(ws.q), np.diff(indptr))] = data
    assert np.allclose(np.triu(u, 1), 0.0)
    perm = factor.perm
    np.testing.assert_allclose(u @ np.diag(d) @ u.T, m[np.ix_(perm, perm)], rtol=0,
                               atol=KERNEL * np.abs(m).max())


@pytest.mark.parametrize("name", list(DESIGNS))
def test_dense_tail_selected_inverse(name):
    ws, m = random_m(name)
    pat = ws.pattern
    k0, q0 = int(pat.kk[0]), int(pat.uoff[1])
    factor = DenseTailFactor(pat.indptr, pat.indices, ws._mx, k0, q0)
    factor.factorize()
    got = np.full(len(pat.indices), np.nan)
    factor.selected_inverse(got)
    np.testing.assert_allclose(got, at_slots(ws, np.linalg.inv(m)), rtol=0, atol=KERNEL)
    twin = _dense_tail_selected_inverse_numpy(pat.indptr, pat.indices, ws._mx, k0, q0)
    np.testing.assert_allclose(got, twin, rtol=0, atol=KERNEL)


def test_dense_tail_selected_inverse_full_runs():
    # every level of term 0 meets every level after it (verbagg's subjects and items):
    # the tail rows of a level are one run, done by BLAS
    rng = np.random.default_rng(5)
    a, b = np.meshgrid(np.arange(12), np.arange(5), indexing="ij")
    codes = [a.ravel().astype(np.int32), b.ravel().astype(np.int32)]
    n = codes[0].size
    z = [np.column_stack([np.ones(n), rng.standard_normal(n)]), np.ones((n, 1))]
    ws = BlockedSystem(codes, z, [12, 5], [False, False])
    ws.set_products(rng.standard_normal((n, 1)), rng.uniform(0.5, 2.0, n))
    ws.factorize(np.array([0.9, 0.3, 0.7, 1.1]), schur=False)
    pat = ws.pattern
    factor = DenseTailFactor(pat.indptr, pat.indices, ws._mx, 2, int(pat.uoff[1]))
    factor.factorize()
    got = np.empty(len(pat.indices))
    factor.selected_inverse(got)
    twin = _dense_tail_selected_inverse_numpy(pat.indptr, pat.indices, ws._mx, 2,
                                              int(pat.uoff[1]))
    np.testing.assert_allclose(got, twin, rtol=0, atol=KERNEL)


def test_selected_inverse_refuses_what_it_cannot_do():
    ws, _ = random_m("crossed scalar")
    pat = ws.pattern
    chol = SparseCholesky(pat.indptr, pat.indices, ws._mx.copy())
    with pytest.raises(CholmodError):
        chol.selected_inverse(np.empty(len(pat.indices)))     # not factorized yet
    with pytest.raises(CholmodError):
        chol.unit_factor()
    chol.factorize()
    with pytest.raises(ValueError):
        chol.selected_inverse(np.empty(len(pat.indices) - 1))
    tail = DenseTailFactor(pat.indptr, pat.indices, ws._mx, 1, int(pat.uoff[1]))
    with pytest.raises(ValueError, match="no factorization"):
        tail.selected_inverse(np.empty(len(pat.indices)))
    tail.factorize()
    with pytest.raises(ValueError):
        tail.selected_inverse(np.empty(len(pat.indices) + 1))


# -- the compiled row passes against their twin ----------------------------------------------
def _grouseticks():
    g = mm.dataset("grouseticks")
    g["ch"] = g.height - g.height.mean()
    return g


def random_data(seed, n=400):
    """Crossed, partly nested grouping factors with a covariate, Bernoulli and Poisson
    responses."""
    rng = np.random.default_rng(seed)
    g1 = rng.integers(0, 60, n)
    g2 = rng.integers(0, 15, n)
    g3 = g2 // 3                                # g2 nested in g3
    x = rng.standard_normal(n)
    eta = 0.3 * x + 0.5 * rng.standard_normal(60)[g1] + 0.4 * rng.standard_normal(15)[g2]
    return pd.DataFrame({
        "yb": (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(float),
        "yp": rng.poisson(np.exp(0.5 + 0.5 * eta)).astype(float),
        "x": x, "g1": [f"a{i:02d}" for i in g1], "g2": [f"b{i:02d}" for i in g2],
        "g3": [f"c{i}" for i in g3]})


MODELS = {
    "verbagg": lambda: mm.GeneralizedLinearMixedModel(
        "r2 ~ 1 + anger + gender + btype + situ + (1 | subj) + (1 | item)",
        mm.dataset("verbagg"), mm.Bernoulli()),
    "verbagg vector": lambda: mm.GeneralizedLinearMixedModel(
        "r2 ~ 1 + anger + gender + (1 + situ | subj) + (1 + gender | item)",
        mm.dataset("verbagg"), mm.Bernoulli()),
    "grouseticks three terms": lambda: mm.GeneralizedLinearMixedModel(
        "ticks ~ 1 + year + ch + (1 | index) + (1 | brood) + (1 | location)",
        _grouseticks(), mm.Poisson()),
    "random bernoulli": lambda: mm.GeneralizedLinearMixedModel(
        "yb ~ 1 + x + (1 | g1) + (1 | g2) + (1 | g3)", random_data(1), mm.Bernoulli()),
    "random poisson vector": lambda: mm.GeneralizedLinearMixedModel(
        "yp ~ 1 + x + (1 + x | g1) + (1 | g2)", random_data(2), mm.Poisson()),
    "random poisson uncorrelated": lambda: mm.GeneralizedLinearMixedModel(
        "yp ~ 1 + x + (1 | g1) + (1 + x || g3)", random_data(3), mm.Poisson()),
}


def at_point(model):
    """(θ, β̃, û) at a point with every θ component in play."""
    theta = np.where(np.isfinite(model.layout.lower), 0.8, 0.15)
    beta = model.beta0 + 0.02
    _, u, _ = model._value(theta, beta, 1.0)
    return theta, beta, u


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dense_tail", [True, False])
def test_compiled_passes_equal_their_numpy_twin(name, dense_tail, monkeypatch):
    from mixedmodels._linalg import system
    monkeypatch.setattr(system, "DENSE_TAIL", dense_tail)
    monkeypatch.setattr(system, "_DENSE_TAIL_FLOPS", np.inf)   # the tail wherever it can
    model = MODELS[name]()
    assert model.path == ("dense-tail" if dense_tail else "cholmod")
    theta, _, u = at_point(model)
    ws = model.workspace
    minv = _selected_inverse(ws)
    got = _multi_term_compiled(model, ws, theta, u, model.family, minv)
    want = _gradient_at_modes_numpy(model, theta, u, model.family, minv)
    np.testing.assert_allclose(got, want, rtol=0, atol=KERNEL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", [m for m in MODELS if m.startswith("random")])
def test_gradient_on_random_designs(name):
    # the whole path (selected inversion and passes) against the plain matrices and the
    # differences of the objective
    model = MODELS[name]()
    theta, beta, _ = at_point(model)
    grad = laplace_gradient(model, theta, beta)
    _, ref = laplace_gradient_reference(model, theta, beta)
    np.testing.assert_allclose(grad, ref, rtol=0, atol=KERNEL * max(1.0, np.abs(ref).max()))
    x = np.concatenate([beta, theta])
    assert_gradient(grad, finite_differences(model._joint_value, model, x), name)


def test_leverage_pass_refuses_a_bad_block_offset():
    model = MODELS["random bernoulli"]()
    theta, _, _ = at_point(model)
    ws, pat, st = model.workspace, model.workspace.pattern, model.state
    rowoff = pat.rowoff.copy()
    rowoff[1, 7] = pat.nvals                    # one past M⁻¹'s blocks
    args = (pat.zcat, pat.zoff, pat.kk, pat.codes, pat.uoff, rowoff, pat.pair_tr,
            pat.pair_tc, np.zeros(pat.nvals), model.layout.lam(theta), model.layout.lam_off,
            st.wrkwt, st.mu, True, np.empty(model.n), np.empty(ws.q),
            np.empty(model.layout.nlam))
    with pytest.raises(ValueError, match="outside"):
        laplace_leverage_pass(*args)
    codes = pat.codes.copy()
    codes[0, 3] = 10 ** 6                       # a level past u
    with pytest.raises(ValueError, match="past u"):
        laplace_leverage_pass(*(args[:3] + (codes,) + args[4:5] + (pat.rowoff,) + args[6:]))


BENCHMARK = {
    # the benchmark's grouseticks, on CHOLMOD's (simplicial) factor
    "grouseticks3": MODELS["grouseticks three terms"],
}


@pytest.mark.parametrize("where", ["optimum", "perturbed"])
def test_gradient_through_cholmod_matches_finite_differences(where):
    model, x = joint_optimum(BENCHMARK, "grouseticks3")
    assert model.path == "cholmod"
    if where == "perturbed":
        x = perturbed(model, x)
    p = model.p
    value, grad = laplace_value_and_gradient(model, x[p:], x[:p])
    assert value == pytest.approx(model._joint_value(x), rel=1e-12)
    assert_gradient(grad, finite_differences(model._joint_value, model, x), where)
    _, ref = laplace_gradient_reference(model, x[p:], x[:p])
    np.testing.assert_allclose(grad, ref, rtol=0, atol=KERNEL * max(1.0, np.abs(ref).max()))
    if where == "optimum":
        assert np.max(np.abs(grad)) < 1e-2

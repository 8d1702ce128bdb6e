"""The exact gradient of the LMM objective over θ (_lmm_gradient.py).

Held to two independent references: Richardson-extrapolated central differences of the
objective, and the same formulas written with dense Z, X and y (not the cross-products'
block layout) in NumPy. The Newton polish it drives is checked by what it is for: θ that
no longer depends on the order of the rows.
"""
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.linalg as sla

import mixedmodels as mm
from mixedmodels._linalg._pattern import build_structure, pair_keys_of
from mixedmodels._linalg._twins import dense_lambda, dense_z
from mixedmodels._linalg.system import BlockedSystem
from mixedmodels._lmm_gradient import gradient_route, has_exact_gradient, lmm_value_and_gradient


def _richardson(f, x):
    g = np.empty(x.size)
    for j in range(x.size):
        h = 1e-3 * max(abs(x[j]), 0.1)
        e = np.zeros(x.size)
        e[j] = 1.0

        def d(s):
            return (f(x + s * e) - f(x - s * e)) / (2 * s)

        g[j] = (4 * d(h / 2) - d(h)) / 3
    return g


def _dense_gradient(model, theta):
    """objective = log det A + d log r², A = [ZΛ X]'W[ZΛ X] + diag(I, 0) (REML) or its
    ZΛ block (ML); d log det A = tr(A⁻¹ dA), d r² = -2 ε'W Z dΛ û, all with dense rows."""
    ws = model.workspace
    pat = ws.pattern
    z = dense_z(pat)
    x, y = model.X, model.y_fit
    w = np.ones(len(y)) if model.design.weights is None else model.design.weights
    lam = dense_lambda(pat, model.layout.templates(theta))
    q, p = z.shape[1], x.shape[1]
    zl = z @ lam
    big = np.hstack([zl, x])
    a = big.T @ (big * w[:, None])
    a[:q, :q] += np.eye(q)
    sol = np.linalg.solve(a, big.T @ (w * y))
    u, beta = sol[:q], sol[q:]
    eps = y - zl @ u - x @ beta
    r2 = float(eps @ (w * eps) + u @ u)
    ainv = np.linalg.inv(a) if model.REML else np.linalg.inv(a[:q, :q])
    grad = np.empty(model.layout.ntheta)
    for j in range(model.layout.ntheta):
        unit = np.zeros(model.layout.ntheta)
        unit[j] = 1.0
        dzl = z @ dense_lambda(pat, model.layout.templates(unit))
        if model.REML:
            dbig = np.hstack([dzl, np.zeros_like(x)])
            da = dbig.T @ (big * w[:, None]) + big.T @ (dbig * w[:, None])
        else:
            da = dzl.T @ (zl * w[:, None]) + zl.T @ (dzl * w[:, None])
        dr2 = -2.0 * float(eps @ (w * (dzl @ u)))
        grad[j] = np.trace(ainv @ da) + model._dfr * dr2 / r2
    return grad


def _models():
    ss, pen, pas = mm.dataset("sleepstudy"), mm.dataset("penicillin"), mm.dataset("pastes")
    ss["day"] = ss["days"].astype(str)
    rng = np.random.default_rng(4)
    n = 600
    df = pd.DataFrame(dict(x=rng.normal(size=n), g=rng.integers(0, 25, n),
                           h=rng.integers(0, 8, n), k=rng.integers(0, 5, n),
                           w=rng.uniform(0.5, 2.0, n), o=rng.normal(size=n)))
    df["y"] = (df.x + rng.normal(size=25)[df.g] * (1 + 0.5 * df.x) + rng.normal(size=8)[df.h]
               + rng.normal(size=n))
    return [
        ("reaction ~ 1 + days + (1 + days | subj)", ss, {}),
        ("reaction ~ 1 + days + (1 + days | subj)", ss, {"REML": True}),
        ("reaction ~ 1 + days + (1 + days || subj)", ss, {"REML": True}),
        ("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, {}),
        ("strength ~ 1 + (1 | batch/cask)", pas, {"REML": True}),
        ("y ~ 1 + x + (1 + x | g) + (1 | h) + (1 | k)", df, {"weights": "w", "offset": "o"}),
        ("y ~ 1 + x + (1 + x | g) + (1 | h) + (1 | k)", df, {"REML": True, "weights": "w"}),
        ("y ~ 0 + (1 | g)", df, {}),
        ("diameter ~ 1 + (1 | plate) + (1 | sample)", pen, {"REML": True}),
        # a vector-valued first term with a scalar second one; a vector-valued tail term
        ("y ~ 1 + x + (1 + x | g) + (1 | h)", df, {"REML": True, "weights": "w"}),
        ("y ~ 1 + x + (1 | g) + (1 + x | h)", df, {"REML": True}),
        ("reaction ~ 1 + days + (1 + days | subj) + (1 | day)", ss, {}),
        ("y ~ 0 + (1 | g) + (1 | h) + (1 | k)", df, {"weights": "w"}),
        ("y ~ 0 + (1 | g) + (1 | h)", df, {"REML": True}),
    ]


N_MODELS = len(_models())


@pytest.fixture(scope="module", params=range(N_MODELS), ids=lambda i: f"model{i}")
def model_and_thetas(request):
    f, df, kw = _models()[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mm.LinearMixedModel(f, df, **kw)
        fit = m.fit(check_convergence=False)
    th = np.asarray(fit.theta)
    return m, [th * 1.3 + 0.1, th * 0.6, np.where(np.isfinite(m.layout.lower), th, th - 0.2)]


def test_gradient_equals_richardson_differences(model_and_thetas):
    m, thetas = model_and_thetas
    assert has_exact_gradient(m.workspace)
    for th in thetas:
        val, grad = lmm_value_and_gradient(m, th)
        assert val == m.objective(th)
        ref = _richardson(m.objective, th)
        assert np.max(np.abs(grad - ref)) < 2e-6 * max(1.0, np.max(np.abs(ref)))


def test_gradient_equals_the_dense_formulas(model_and_thetas):
    m, thetas = model_and_thetas
    for th in thetas:
        grad = lmm_value_and_gradient(m, th)[1]
        ref = _dense_gradient(m, th)
        assert np.max(np.abs(grad - ref)) < 1e-9 * max(1.0, np.max(np.abs(ref)))


def test_gradient_on_a_bound():
    # a variance component at zero: Λ is singular there, the formulas need no Λ⁻¹. A
    # scalar term's objective is even in its θ, so that component's derivative is 0
    m = mm.LinearMixedModel("diameter ~ 1 + (1 | plate) + (1 | sample)", mm.dataset("penicillin"))
    th = np.array([0.0, 2.0])
    grad = lmm_value_and_gradient(m, th)[1]
    assert np.allclose(grad, _dense_gradient(m, th), rtol=1e-9, atol=1e-9)
    assert grad[0] == 0.0
    assert grad[1] == pytest.approx(_richardson(m.objective, th)[1], rel=1e-7)


def test_out_of_core_workspace_has_the_same_gradient():
    df = mm.dataset("penicillin")
    m = mm.LinearMixedModel("diameter ~ 1 + (1 | plate) + (1 | sample)", df)
    ws = m.workspace
    pat = ws.pattern
    st = build_structure(pat.kk, pat.nlev, pair_keys_of(pat.codes, pat.nlev))
    ws2 = BlockedSystem.from_structure(st, [False, False])
    ws2.set_crossproducts(ws.avals, ws.ztxy, ws.xtxy)
    th = np.array([1.2, 2.9])
    g1 = lmm_value_and_gradient(m, th)[1]
    m._workspace = ws2
    try:
        g2 = lmm_value_and_gradient(m, th)[1]
    finally:
        m._workspace = ws
    assert np.array_equal(g1, g2)


def test_large_crossed_models_take_the_dense_tail():
    # q = 1,630 (beyond the old dense M⁻¹'s 1,500): the dense tail's S⁻¹ is 30-square
    rng = np.random.default_rng(0)
    n = 20_000
    df = pd.DataFrame(dict(g=rng.integers(0, 1600, n), h=rng.integers(0, 30, n)))
    df["y"] = rng.normal(size=1600)[df.g] + rng.normal(size=n)
    m = mm.LinearMixedModel("y ~ 1 + (1 | g) + (1 | h)", df, REML=True)
    assert gradient_route(m.workspace) == "dense-tail"
    th = np.array([0.9, 0.3])
    val, grad = lmm_value_and_gradient(m, th)
    assert val == m.objective(th)
    ref = _richardson(m.objective, th)
    assert np.max(np.abs(grad - ref)) < 2e-6 * max(1.0, np.max(np.abs(ref)))


def test_cholmod_models_whose_tail_is_dear_fall_back_to_differences():
    # nested: CHOLMOD's factor has no fill, a dense tail of 1,500 would cost ~10⁴ times
    i = np.arange(6000)
    df = pd.DataFrame(dict(g=i // 2, h=i // 4))
    df["y"] = np.random.default_rng(0).normal(size=len(df)) + (df.h % 7) * 0.3
    m = mm.LinearMixedModel("y ~ 1 + (1 | g) + (1 | h)", df)
    assert m.path == "cholmod"
    assert not has_exact_gradient(m.workspace)
    assert lmm_value_and_gradient(m, np.array([1.0, 1.0])) is None


@pytest.mark.parametrize("reml", [False, True])
def test_cholmod_factored_models_take_a_dense_tail_beside(monkeypatch, reml):
    import mixedmodels._linalg.system as system

    f, df = "diameter ~ 1 + (1 | plate) + (1 | sample)", mm.dataset("penicillin")
    tail = mm.LinearMixedModel(f, df, REML=reml)
    monkeypatch.setattr(system, "DENSE_TAIL", False)
    chol = mm.LinearMixedModel(f, df, REML=reml)
    assert chol.path == "cholmod" and gradient_route(chol.workspace) == "side-tail"
    assert gradient_route(tail.workspace) == "dense-tail"
    for th in (np.array([1.5, 3.2]), np.array([0.2, 0.0]), np.array([2.0, 0.7])):
        v1, g1 = lmm_value_and_gradient(tail, th)
        v2, g2 = lmm_value_and_gradient(chol, th)
        assert v2 == pytest.approx(v1, rel=1e-12)     # two factorizations of one M
        assert np.allclose(g2, g1, rtol=1e-10, atol=1e-10)
        assert np.allclose(g2, _dense_gradient(chol, th), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reml", [False, True])
def test_polished_theta_does_not_depend_on_the_order_of_rows(reml):
    """BOBYQA's end point moves by ~1e-6 when the sums change in their last bits; the
    exact-gradient Newton steps put both fits on the same stationary point."""
    f = "diameter ~ 1 + (1 | plate) + (1 | sample)"
    df = mm.dataset("penicillin")
    shuffled = df.iloc[np.random.default_rng(1).permutation(len(df))].reset_index(drop=True)
    a, b = mm.fit(f, df, REML=reml), mm.fit(f, shuffled, REML=reml)
    assert np.max(np.abs(a.theta - b.theta) / np.abs(a.theta)) < 1e-10
    # the recorded gradient is the exact one at the reported θ, and it vanishes
    assert np.max(np.abs(a.optsum.derivs.gradient)) < 1e-8
    assert np.array_equal(a.optsum.derivs.gradient, lmm_value_and_gradient(a.model, a.theta)[1])


@pytest.mark.parametrize("formula,kw", [
    ("reaction ~ 1 + days + (1 + days | subj)", {}),
    ("reaction ~ 1 + days + (1 + days | subj)", {"REML": True}),
    ("reaction ~ 1 + days + (1 + days || subj)", {"REML": True, "weights": "w"}),
    ("reaction ~ 1 + (1 | subj)", {"REML": True}),
    ("reaction ~ 1 + days + (1 + days + d2 | subj)", {"REML": True}),
])
def test_compiled_one_term_sums_equal_their_numpy_twin(formula, kw):
    from mixedmodels._kernels._lmm_gradient import lmm_blockdiag_gradient
    from mixedmodels._lmm_gradient import one_term_sums_numpy

    df = mm.dataset("sleepstudy").copy()
    df["d2"] = (df["days"] - 4.5) ** 2 / 10
    df["w"] = np.linspace(0.5, 2.0, len(df))
    m = mm.LinearMixedModel(formula, df, **kw)
    ws = m.workspace
    th = np.linspace(0.3, 1.1, m.layout.ntheta) * np.where(np.isfinite(m.layout.lower), 1, 0.1)
    ktrace0, rss0, schur0 = one_term_sums_numpy(m, th)
    # the kernel's inputs at the same θ, as _lmm_gradient assembles them
    _, _, r, _ = m._evaluate(th)
    p, k = m.p, int(ws.pattern.kk[0])
    beta = np.linalg.solve(r[:p, :p], r[:p, p])
    u = ws.backward(np.asfortranarray((ws.rzxy[:, p] - ws.rzxy[:, :p] @ beta)[:, None]))[:, 0]
    sinv = np.linalg.inv(r[:p, :p].T @ r[:p, :p]) if m.REML else np.zeros((0, 0))
    out = [np.zeros((k, k)) for _ in range(3)]
    lmm_blockdiag_gradient(ws.avals, m.layout.lam(th), ws.blockdiag_diagonal(), k,
                           np.ascontiguousarray(u), ws.ztxy[:, :p], ws.ztxy[:, p], beta, sinv,
                           *out)
    for got, want in zip(out, (ktrace0, rss0, schur0)):
        assert np.allclose(got, want, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(want).max()))
    if not m.REML:
        assert np.all(out[2] == 0.0)

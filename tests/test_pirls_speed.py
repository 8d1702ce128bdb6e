"""The compiled PIRLS (_kernels._glm: PirlsKernel, pirls_blockdiag) against its twins.

Tier: kernels vs twins. The row pass of one evaluation (η, the family's update and the
cross-products at the new weights) against the dense NumPy twin ``_glm_numpy.row_pass``
at KERNEL; the whole compiled loop against the Python loop of ``_pirls.pirls``
(``compiled=False``, which computes the same quantities through set_products, factorize
and backward) on whole models, for several families and links (Poisson log, Bernoulli
logit, Binomial with prior weights, non-canonical links, the negative binomial), on the
dense-tail, CHOLMOD and block-diagonal paths, at KERNEL as well (the two do the same
arithmetic, so in practice they agree to the last bit).
"""
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import KERNEL

import mixedmodels as mm
from mixedmodels import _pirls
from mixedmodels import families as F
from mixedmodels._kernels import _glm
from mixedmodels._kernels import _glm_numpy as twin
from mixedmodels._linalg import system as system_mod
from mixedmodels._linalg.system import BlockedSystem

# (family, a linear predictor scale) for the row-pass and loop tests
FAMILIES = {
    "poisson-log": (lambda: F.Poisson(), 0.7),
    "bernoulli-logit": (lambda: F.Bernoulli(), 1.5),
    "binomial-logit-weights": (lambda: F.Binomial(), 1.0),
    "bernoulli-probit": (lambda: F.Bernoulli(link="probit"), 0.8),
    "bernoulli-cloglog": (lambda: F.Bernoulli(link="cloglog"), 0.8),
    "poisson-sqrt": (lambda: F.Poisson(link="sqrt"), 0.3),
    "gamma-log": (lambda: F.Gamma(link="log"), 0.5),
    "negbin-log": (lambda: F.NegativeBinomial(theta=2.5), 0.6),
}


def _response(family, rng, eta):
    """A response of the family at linear predictor eta, and prior weights."""
    n = len(eta)
    mu = family.link.inverse(eta)
    w = rng.uniform(0.5, 2.0, n)
    if family.name == "Bernoulli":
        return (rng.uniform(size=n) < mu).astype(float), w
    if family.name == "Binomial":
        trials = rng.integers(1, 12, n).astype(float)
        return rng.binomial(trials.astype(int), mu) / trials, trials
    if family.name == "Poisson":
        return rng.poisson(mu).astype(float), w
    if family.name == "NegativeBinomial":
        return rng.poisson(rng.gamma(2.5, mu / 2.5)).astype(float), w
    return rng.gamma(2.0, mu / 2.0), w          # Gamma


# ------------------------------------------------------------------ one row pass

PATTERNS = [
    ("one vector term", [9], [3]),
    ("crossed scalar", [11, 5], [1, 1]),
    ("nested scalar, three terms", [40, 8, 3], [1, 1, 1]),
    ("crossed vector", [10, 6, 3], [2, 1, 2]),
]


def _pattern_problem(seed, nlevels, kk, n=300):
    rng = np.random.default_rng(seed)
    codes, z = [], []
    for nl, k in zip(nlevels, kk):
        c = rng.integers(0, nl, n).astype(np.int32)
        c[:nl] = np.arange(nl)
        # runs of a level, as in data sorted by a grouping factor
        c = np.sort(c) if len(codes) == 0 else c
        codes.append(c)
        z.append(np.column_stack([np.ones(n)] + [rng.standard_normal(n) for _ in range(k - 1)]))
    return rng, codes, z


@pytest.mark.parametrize("fam_name", list(FAMILIES))
@pytest.mark.parametrize("label,nlevels,kk", PATTERNS)
def test_row_pass_matches_twin(fam_name, label, nlevels, kk):
    rng, codes, z = _pattern_problem(len(label) + len(fam_name), nlevels, kk)
    n = len(codes[0])
    make, scale = FAMILIES[fam_name]
    family = make()
    ws = BlockedSystem(codes, z, nlevels, [False] * len(kk))
    ws.bind_products(1)
    layout = ws.layout
    theta = rng.uniform(0.3, 1.2, layout.ntheta) * scale
    theta[~np.isfinite(layout.lower)] *= 0.3
    u = rng.standard_normal(ws.q)
    fixed = rng.normal(0.0, scale, n) + (1.0 if family.link.name == "sqrt" else 0.0)
    eta0 = fixed + twin.row_pass.__globals__["np"].zeros(n)
    y, w = _response(family, rng, np.clip(eta0, -3, 3) if family.link.name != "sqrt"
                     else np.abs(eta0) + 0.5)
    st = _pirls.PirlsState(n)
    st.fixed[:] = fixed
    kernel = _glm.PirlsKernel(ws.pattern, ws.layout.lam_off, ws.factorizer, ws.avals,
                              ws.ztxy, ws.xtxy, ws.rzxy, y, st.fixed, st.eta, st.mu,
                              st.mu_eta, st.wrkwt, st.wrkresid, st.devresid)
    dev = kernel.evaluate(family.code, family.link.code, family.param, w, theta, u)
    ref_out = [np.full(n, np.nan) for _ in range(5)]
    dev_n, eta_n, avals_n, ztr_n, xtx_n = twin.row_pass(
        ws.pattern, layout.templates(theta), u, fixed, y, w, family.code,
        family.link.code, ref_out, param=family.param)
    assert dev == pytest.approx(dev_n, rel=KERNEL)
    np.testing.assert_allclose(st.eta, eta_n, rtol=KERNEL, atol=KERNEL)
    for got, want in zip([st.mu, st.mu_eta, st.wrkwt, st.wrkresid, st.devresid], ref_out):
        np.testing.assert_allclose(got, want, rtol=KERNEL, atol=1e-12)
    np.testing.assert_allclose(ws.avals, avals_n, rtol=KERNEL, atol=KERNEL)
    np.testing.assert_allclose(ws.ztxy[:, 0], ztr_n, rtol=KERNEL, atol=KERNEL)
    assert ws.xtxy[0, 0] == pytest.approx(xtx_n, rel=KERNEL)
    # without accumulating, the cross-products are left alone
    avals = ws.avals.copy()
    kernel.evaluate(family.code, family.link.code, family.param, w, theta, 0.5 * u,
                    accumulate=False)
    np.testing.assert_array_equal(ws.avals, avals)


# ------------------------------------------------------------------ the whole loop


def _data(seed, family, terms, n=400):
    """A data frame with crossed or nested grouping factors and a response of the family."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x": rng.uniform(-1.0, 1.0, n)})
    eta = 0.2 + 0.4 * df.x.to_numpy()
    for name, nlev in terms.items():
        g = rng.integers(0, nlev, n)
        g[:nlev] = np.arange(nlev)
        df[name] = pd.Categorical([f"{name}{v}" for v in g])
        eta = eta + rng.normal(0.0, 0.5, nlev)[g]
    if family.link.name == "sqrt":
        eta = np.abs(eta) + 1.0
    y, w = _response(family, rng, eta)
    df["y"], df["w"] = y, w
    return df


def _model(df, family, formula, weights):
    return mm.GeneralizedLinearMixedModel(formula, df, family,
                                          weights="w" if weights else None)


def _state_arrays(m):
    st = m.state
    return [st.eta.copy(), st.mu.copy(), st.mu_eta.copy(), st.wrkwt.copy(),
            st.wrkresid.copy(), st.devresid.copy()]


def _compare_loops(m, theta, beta, u0, exhausted=False, **kw):
    """pirls compiled and in Python from the same start: modes, log det, deviance, the
    state arrays, the factor (a solve with it) and, with several terms, the workspace's
    products (pirls_blockdiag keeps its own). When the loop runs out of iterations
    (``exhausted``) the compiled loop's products are those of the last evaluation (at
    the modes it returns), the Python loop's those of the factorization before it."""
    ws = m.workspace

    def products():
        if ws.path == "block-diagonal" or exhausted:
            return []
        return [ws.avals.copy(), ws.ztxy.copy(), ws.rzxy.copy()]

    got = _pirls.pirls(m, theta, beta, u0, **kw)
    got_state = _state_arrays(m)
    got_products = products()
    probe = np.asfortranarray(np.linspace(-1.0, 1.0, ws.q)[:, None])
    got_solve = ws.backward(probe.copy())
    want = _pirls.pirls(m, theta, beta, u0, compiled=False, **kw)
    want_state = _state_arrays(m)
    want_products = products()
    want_solve = ws.backward(probe.copy())
    np.testing.assert_allclose(got[0], want[0], rtol=KERNEL, atol=KERNEL)
    assert got[2] == pytest.approx(want[2], rel=KERNEL)
    assert got[3] == pytest.approx(want[3], rel=KERNEL)
    assert got[4] == want[4]
    for a, b in zip(got_state + got_products + [got_solve],
                    want_state + want_products + [want_solve]):
        np.testing.assert_allclose(a, b, rtol=KERNEL, atol=KERNEL)
    return got


LOOP_CASES = [
    # label, grouping factors and levels, formula, dense tail allowed
    ("crossed, dense tail", {"g": 60, "h": 8}, "y ~ 1 + x + (1 | g) + (1 | h)", True),
    ("crossed, cholmod", {"g": 60, "h": 8}, "y ~ 1 + x + (1 | g) + (1 | h)", False),
    ("three terms, cholmod", {"g": 80, "h": 20, "k": 5},
     "y ~ 1 + x + (1 | g) + (1 | h) + (1 | k)", False),
    ("vector term crossed", {"g": 30, "h": 6}, "y ~ 1 + x + (1 + x | g) + (1 | h)", True),
    ("one scalar term", {"g": 25}, "y ~ 1 + x + (1 | g)", True),
    ("one vector term", {"g": 25}, "y ~ 1 + x + (1 + x | g)", True),
]


@pytest.mark.parametrize("fam_name", list(FAMILIES))
@pytest.mark.parametrize("label,terms,formula,dense_tail", LOOP_CASES)
def test_compiled_pirls_matches_python_loop(monkeypatch, fam_name, label, terms, formula,
                                            dense_tail):
    make, _ = FAMILIES[fam_name]
    family = make()
    monkeypatch.setattr(system_mod, "DENSE_TAIL", dense_tail)
    df = _data(len(label) * 7 + len(fam_name), family, terms)
    weights = fam_name in ("binomial-logit-weights", "poisson-log", "gamma-log")
    m = _model(df, family, formula, weights)
    rng = np.random.default_rng(3)
    theta = m.layout.initial() * rng.uniform(0.4, 1.2, m.layout.ntheta)
    beta = m.beta0.copy()
    # from zero and from a warm start
    u, *_ = _compare_loops(m, theta, beta, np.zeros(m.workspace.q))
    _compare_loops(m, theta * 1.05, beta + 0.01, u)


@pytest.mark.filterwarnings("ignore:PIRLS did not converge")
def test_compiled_pirls_takes_the_python_loops_exits():
    """Running out of iterations (the warning) and a step-halving limit of zero."""
    family = F.Bernoulli()
    df = _data(11, family, {"g": 50, "h": 7})
    m = _model(df, family, "y ~ 1 + x + (1 | g) + (1 | h)", False)
    theta = m.layout.initial()
    u0 = np.zeros(m.workspace.q)
    for kw in ({"maxiter": 1}, {"maxiter": 2}, {"max_halving": 0}, {"maxiter": 100}):
        with warnings.catch_warnings(record=True) as got_warn:
            warnings.simplefilter("always")
            _pirls.pirls(m, theta, m.beta0, u0, **kw)
        with warnings.catch_warnings(record=True) as want_warn:
            warnings.simplefilter("always")
            _pirls.pirls(m, theta, m.beta0, u0, compiled=False, **kw)
        assert len(got_warn) == len(want_warn)
        _compare_loops(m, theta, m.beta0, u0, exhausted=bool(want_warn), **kw)


def test_kernel_rebinds_after_the_products_change():
    """A β-and-u PIRLS reallocates the workspace's products (p + 1 columns); the u-only
    kernel made before must not write into the old arrays."""
    family = F.Poisson()
    df = _data(5, family, {"g": 40, "h": 6})
    m = _model(df, family, "y ~ 1 + x + (1 | g) + (1 | h)", False)
    theta = m.layout.initial()
    u0 = np.zeros(m.workspace.q)
    _pirls.pirls(m, theta, m.beta0, u0)
    first = m.state.kernel
    _pirls.pirls(m, theta, m.beta0, u0, vary_beta=True)
    _compare_loops(m, theta, m.beta0, u0)
    assert m.state.kernel is not first


def test_fits_agree_with_the_python_loop(monkeypatch):
    """A whole fit with the compiled loop and with the Python loop: the same optimum."""
    family = F.Bernoulli()
    df = _data(8, family, {"g": 60, "h": 9}, n=600)
    formula = "y ~ 1 + x + (1 | g) + (1 | h)"
    got = mm.fit(formula, df, family=family)
    real = _pirls.pirls
    monkeypatch.setattr(mm.glmm, "pirls", lambda *a, **k: real(*a, compiled=False, **k))
    want = mm.fit(formula, df, family=family)
    assert got.objective == pytest.approx(want.objective, rel=1e-12)
    np.testing.assert_allclose(got.theta, want.theta, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.coef, want.coef, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ bad input


def _kernel_inputs(nlevels=(6, 3), n=40):
    rng, codes, z = _pattern_problem(1, list(nlevels), [1] * len(nlevels), n)
    ws = BlockedSystem(codes, z, list(nlevels), [False] * len(nlevels))
    ws.bind_products(1)
    st = _pirls.PirlsState(n)
    y = (rng.uniform(size=n) < 0.5).astype(float)
    return ws, st, y


def _make_kernel(ws, st, y, pattern=None):
    return _glm.PirlsKernel(pattern or ws.pattern, ws.layout.lam_off, ws.factorizer,
                            ws.avals, ws.ztxy, ws.xtxy, ws.rzxy, y, st.fixed, st.eta,
                            st.mu, st.mu_eta, st.wrkwt, st.wrkresid, st.devresid)


def test_kernel_refuses_inconsistent_input():
    import dataclasses
    ws, st, y = _kernel_inputs()
    kernel = _make_kernel(ws, st, y)
    theta = ws.layout.initial()
    fam = F.Bernoulli()
    with pytest.raises(ValueError, match="prior_w"):
        kernel.pirls(fam.code, fam.link.code, fam.param, np.ones(3), theta, np.zeros(ws.q))
    with pytest.raises(ValueError, match="entries"):
        kernel.pirls(fam.code, fam.link.code, fam.param, np.empty(0), theta, np.zeros(2))
    with pytest.raises(ValueError, match="theta"):
        kernel.pirls(fam.code, fam.link.code, fam.param, np.empty(0), theta[:1],
                     np.zeros(ws.q))
    with pytest.raises(ValueError, match="family code"):
        kernel.pirls(17, 0, np.nan, np.empty(0), theta, np.zeros(ws.q))
    with pytest.raises(ValueError, match="theta must be"):
        kernel.pirls(F.NegativeBinomial().code, 3, np.nan, np.empty(0), theta,
                     np.zeros(ws.q))
    bad_codes = ws.pattern.codes.copy()
    bad_codes[1, 5] = 99
    with pytest.raises(ValueError, match="level code"):
        _make_kernel(ws, st, y, dataclasses.replace(ws.pattern, codes=bad_codes))
    bad_rowoff = ws.pattern.rowoff.copy()
    bad_rowoff[1, 0] = 10 ** 6
    with pytest.raises(ValueError, match="offset"):
        _make_kernel(ws, st, y, dataclasses.replace(ws.pattern, rowoff=bad_rowoff))
    with pytest.raises(ValueError, match="rows"):
        _make_kernel(ws, st, y[:-1])
    with pytest.raises(ValueError, match="inconsistent pattern"):
        _glm.PirlsKernel(ws.pattern, ws.layout.lam_off + 7, ws.factorizer, ws.avals,
                         ws.ztxy, ws.xtxy, ws.rzxy, y, st.fixed, st.eta, st.mu,
                         st.mu_eta, st.wrkwt, st.wrkresid, st.devresid)
    ws.bind_products(3)
    with pytest.raises(ValueError, match="one column"):
        _make_kernel(ws, st, y)


def test_pirls_blockdiag_refuses_bad_levels():
    n, nlev = 30, 5
    codes = np.arange(n, dtype=np.intc) % nlev
    codes[7] = nlev
    out = [np.zeros(n) for _ in range(6)]
    with pytest.raises(ValueError, match="level code"):
        _glm.pirls_blockdiag(0, 0, np.zeros(n), np.ones((n, 1)), codes, np.ones(n) * 0.0,
                             np.empty(0), np.ones(1), np.zeros(nlev), np.zeros(nlev), *out)
    with pytest.raises(ValueError, match="differ in length"):
        _glm.pirls_blockdiag(0, 0, np.zeros(n), np.ones((n, 1)), codes % nlev,
                             np.zeros(n - 1), np.empty(0), np.ones(1), np.zeros(nlev),
                             np.zeros(nlev), *out)


# ------------------------------------------------------------------ the simplicial factor


def _cholmod_workspace(seed=4, nlevels=(30, 12, 4), n=200):
    rng, codes, z = _pattern_problem(seed, list(nlevels), [1] * len(nlevels), n)
    ws = BlockedSystem(codes, z, list(nlevels), [False] * len(nlevels))
    return rng, ws


def test_simplicial_factor_is_the_dense_cholesky(monkeypatch):
    from mixedmodels._linalg import _blocked, _twins
    monkeypatch.setattr(system_mod, "DENSE_TAIL", False)
    rng, ws = _cholmod_workspace()
    assert ws.path == "cholmod"
    n = ws.pattern.codes.shape[1]
    w = rng.uniform(0.2, 3.0, n)
    ws.set_products(np.ones((n, 1)), w)
    theta = rng.uniform(0.3, 1.5, ws.layout.ntheta)
    ws.factorize(theta, schur=False)                  # CHOLMOD's symbolic pattern
    lp, li, _, _ = ws.factor.unit_factor()
    perm = ws.factor.perm
    sf = _blocked.SimplicialFactor(ws.pattern.indptr, ws.pattern.indices, perm, lp, li)
    sf.factorize(ws._mx)
    m_dense = _twins.m_lower_dense(ws.pattern, ws.layout.templates(theta), w)
    m_dense = m_dense + np.tril(m_dense, -1).T
    pm = m_dense[np.ix_(perm, perm)]
    chol = np.linalg.cholesky(pm)
    assert sf.logdet() == pytest.approx(np.sum(np.log(np.diag(chol))), rel=KERNEL)
    b = np.asfortranarray(rng.standard_normal((ws.q, 2)))
    fwd = sf.forward(b.copy(order="F"))
    np.testing.assert_allclose(fwd, np.linalg.solve(chol, b[perm]), rtol=KERNEL, atol=KERNEL)
    back = sf.backward(b.copy(order="F"))
    want = np.empty_like(b)
    want[perm] = np.linalg.solve(chol.T, b)
    np.testing.assert_allclose(back, want, rtol=KERNEL, atol=KERNEL)
    # not positive definite: refused, and the factor holds nothing
    with pytest.raises(np.linalg.LinAlgError):
        sf.factorize(-ws._mx)
    with pytest.raises(ValueError, match="no factorization"):
        sf.forward(b.copy(order="F"))
    # a pattern without M's entries is refused when made
    keep = np.r_[0, np.cumsum(np.ones(ws.q, dtype=np.int32))]
    with pytest.raises(ValueError):
        _blocked.SimplicialFactor(ws.pattern.indptr, ws.pattern.indices, perm, keep,
                                  np.arange(ws.q, dtype=np.int32))


def test_compiled_pirls_refactors_with_the_simplicial_factor(monkeypatch):
    """On a simplicial CHOLMOD path the loop's factorizations but the last are the
    SimplicialFactor's; the workspace's CHOLMOD factor is the one at the modes."""
    monkeypatch.setattr(system_mod, "DENSE_TAIL", False)
    family = F.Poisson()
    df = _data(9, family, {"g": 80, "h": 20, "k": 5})
    m = _model(df, family, "y ~ 1 + x + (1 | g) + (1 | h) + (1 | k)", False)
    ws = m.workspace
    assert ws.path == "cholmod" and not ws.factor.is_supernodal
    theta = m.layout.initial()
    u, *_ = _compare_loops(m, theta, m.beta0, np.zeros(ws.q))
    assert ws.factorizer.small is not None and not ws.factorizer.last_small
    _compare_loops(m, 0.7 * theta, m.beta0, u)


# ------------------------------------------------------------------ Bernoulli-logit SIMD


SIMD_WIDTHS = [w for w in (4, 8) if _glm.simd_width() >= w]


@pytest.mark.skipif(not _glm.simd_enabled(), reason="no AVX2/FMA on this machine or build")
@pytest.mark.parametrize("width", SIMD_WIDTHS)
@pytest.mark.parametrize("n", [4003, 4006])
def test_simd_bernoulli_logit_matches_the_scalar_loop(width, n):
    """The four-row AVX2 and eight-row AVX-512 loops against the scalar loop (and both
    against the twin), over the whole range of eta: the tails, the clamps, huge,
    infinite and NaN eta; n not a multiple of 4 (and 8), with and without a four-row
    step after the eight-row ones."""
    rng = np.random.default_rng(12)
    eta = np.concatenate([rng.normal(0.0, 3.0, n - 403), rng.uniform(-800, 800, 360),
                          [0.0, -0.0, 1e-300, -1e-300, 36.0, -36.0, 37.0, -37.0, 700.0,
                           -700.0, 745.5, -745.5, 746.0, -746.0, 1e308, -1e308, np.inf,
                           -np.inf, np.nan, 0.34657359, -0.34657359, 1e-17, -1e-17,
                           709.0, -709.0, 30.0, -30.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5,
                           1e3, -1e3, 5.0, -5.0, 20.0, -20.0, 0.1, -0.1, 3.0, -3.0]])
    y = (rng.uniform(size=n) < 0.5).astype(float)
    w = rng.uniform(0.2, 3.0, n)
    fam = F.Bernoulli()
    try:
        outs = {}
        for simd in (True, False):
            _glm.simd_width(width if simd else 0)
            out = [np.full(n, np.nan) for _ in range(5)]
            dev = _glm.update(fam.code, fam.link.code, eta, y, w, *out)
            outs[simd] = (dev, out)
        _glm.simd_width(width)
        ok = ~np.isnan(eta)
        m = int(ok.sum())
        got = [np.full(m, np.nan) for _ in range(5)]
        dev = _glm.update(fam.code, fam.link.code, eta[ok], y[ok], w[ok], *got)
    finally:
        _glm.simd_enabled(True)
    finite = np.isfinite(eta)
    for a, b in zip(outs[True][1], outs[False][1]):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a[finite], b[finite], rtol=KERNEL, atol=0.0)
        np.testing.assert_array_equal(a[~finite], b[~finite])
    assert np.isnan(outs[True][0]) and np.isnan(outs[False][0])
    # without the NaN row: the deviance is the sum of the residuals, and the twin's
    assert dev == pytest.approx(np.sum(got[4]), rel=1e-14)
    ref = [np.full(m, np.nan) for _ in range(5)]
    twin.update(fam.code, fam.link.code, eta[ok], y[ok], w[ok], *ref)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=KERNEL, atol=1e-300)


@pytest.mark.skipif(8 not in SIMD_WIDTHS, reason="no AVX-512 on this machine or build")
def test_simd_widths_give_the_same_rows():
    """Eight rows at a time do each row's arithmetic as four at a time do: the same
    per-row results, bit for bit (the deviance's sum differs in its last bits)."""
    rng = np.random.default_rng(5)
    n = 1003
    eta = np.concatenate([rng.normal(0.0, 4.0, n - 3), [40.0, -750.0, 1e-300]])
    y = (rng.uniform(size=n) < 0.5).astype(float)
    fam = F.Bernoulli()
    outs = {}
    try:
        for width in (4, 8):
            _glm.simd_width(width)
            out = [np.full(n, np.nan) for _ in range(5)]
            dev = _glm.update(fam.code, fam.link.code, eta, y, np.empty(0), *out)
            outs[width] = (dev, out)
    finally:
        _glm.simd_enabled(True)
    for a, b in zip(outs[4][1], outs[8][1]):
        np.testing.assert_array_equal(a, b)
    assert outs[8][0] == pytest.approx(outs[4][0], rel=1e-14)

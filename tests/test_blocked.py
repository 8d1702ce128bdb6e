"""The blocked kernels and the blocked factorization against their dense NumPy twins."""
import numpy as np
import pytest
from conftest import KERNEL

from mixedmodels._linalg import _blocked, _twins
from mixedmodels._linalg._pattern import build_pattern
from mixedmodels._linalg.system import BlockedSystem, ThetaLayout


def random_problem(seed, nlevels, kk, n=120, zerocorr=None):
    rng = np.random.default_rng(seed)
    codes, z = [], []
    for nl, k in zip(nlevels, kk):
        c = rng.integers(0, nl, n).astype(np.int32)
        c[:nl] = np.arange(nl)          # every level present
        codes.append(c)
        zi = np.column_stack([np.ones(n)] + [rng.standard_normal(n) for _ in range(k - 1)])
        z.append(zi)
    zerocorr = zerocorr or [False] * len(kk)
    return rng, codes, z, zerocorr


def random_theta(rng, layout):
    theta = rng.uniform(0.2, 1.5, layout.ntheta)
    off = ~np.isfinite(layout.lower)
    theta[off] = rng.uniform(-0.7, 0.7, off.sum())
    return theta


CASES = [
    ("one scalar term", [7], [1]),
    ("one vector term", [9], [3]),
    ("crossed scalar", [11, 5], [1, 1]),
    ("crossed vector", [10, 6, 3], [2, 1, 2]),
]


@pytest.mark.parametrize("label,nlevels,kk", CASES)
def test_accumulate_blocks_matches_dense(label, nlevels, kk):
    rng, codes, z, _ = random_problem(1, nlevels, kk)
    pat = build_pattern(codes, z, nlevels)
    w = rng.uniform(0.5, 2.0, len(codes[0]))
    out = np.zeros(pat.nvals)
    _blocked.accumulate_blocks(pat.zcat, pat.rowoff, pat.pair_tr, pat.pair_tc, pat.zoff,
                               pat.kk, w, out)
    np.testing.assert_allclose(out, _twins.accumulate_blocks(pat, w), rtol=KERNEL, atol=KERNEL)


@pytest.mark.parametrize("label,nlevels,kk", CASES)
def test_accumulate_zt_matches_dense(label, nlevels, kk):
    rng, codes, z, _ = random_problem(2, nlevels, kk)
    pat = build_pattern(codes, z, nlevels)
    n = len(codes[0])
    w = rng.uniform(0.5, 2.0, n)
    xy = rng.standard_normal((n, 4))
    out = np.zeros((pat.q, 4), order="F")
    _blocked.accumulate_zt(pat.zcat, pat.codes, pat.uoff, pat.zoff, pat.kk, w, xy, out)
    np.testing.assert_allclose(out, _twins.dense_z(pat).T @ (w[:, None] * xy), rtol=KERNEL, atol=KERNEL)


@pytest.mark.parametrize("label,nlevels,kk", [c for c in CASES if len(c[1]) > 1])
def test_scatter_lambda_matches_dense(label, nlevels, kk):
    rng, codes, z, zc = random_problem(3, nlevels, kk)
    pat = build_pattern(codes, z, nlevels)
    layout = ThetaLayout(pat.kk, zc)
    theta = random_theta(rng, layout)
    avals = _twins.accumulate_blocks(pat)
    mx = np.zeros(len(pat.indices))
    _blocked.scatter_lambda(avals, pat.blk_off, pat.blk_tr, pat.blk_tc, pat.blk_diag,
                            layout.lam(theta), layout.lam_off, pat.kk, pat.pos, mx)
    import scipy.sparse as sp
    got = sp.csc_matrix((mx, pat.indices, pat.indptr), shape=(pat.q, pat.q)).toarray()
    want = _twins.m_lower_dense(pat, layout.templates(theta))
    np.testing.assert_allclose(got, want, rtol=KERNEL, atol=KERNEL)


@pytest.mark.parametrize("label,nlevels,kk", CASES)
def test_lambda_products_match_dense(label, nlevels, kk):
    rng, codes, z, zc = random_problem(4, nlevels, kk)
    pat = build_pattern(codes, z, nlevels)
    layout = ThetaLayout(pat.kk, zc)
    theta = random_theta(rng, layout)
    lam = _twins.dense_lambda(pat, layout.templates(theta))
    src = np.asfortranarray(rng.standard_normal((pat.q, 3)))
    out = np.zeros_like(src, order="F")
    args = (pat.uoff, pat.kk, pat.nlev, layout.lam(theta), layout.lam_off)
    _blocked.lambda_apply(src, *args, True, out)
    np.testing.assert_allclose(out, lam.T @ src, rtol=KERNEL, atol=KERNEL)
    _blocked.lambda_apply(src, *args, False, out)
    np.testing.assert_allclose(out, lam @ src, rtol=KERNEL, atol=KERNEL)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_blockdiag_factor_and_solves_match_numpy(k):
    rng, codes, z, zc = random_problem(5, [8], [k])
    pat = build_pattern(codes, z, [8])
    layout = ThetaLayout(pat.kk, zc)
    theta = random_theta(rng, layout)
    avals = _twins.accumulate_blocks(pat)
    lblocks = np.zeros(pat.nvals)
    logdet = _blocked.blockdiag_factor(avals, layout.lam(theta), k, lblocks)
    m = _twins.m_lower_dense(pat, layout.templates(theta))
    m = m + np.tril(m, -1).T
    chol = np.linalg.cholesky(m)
    assert logdet == pytest.approx(np.sum(np.log(np.diag(chol))), rel=KERNEL)
    got = np.zeros((pat.q, pat.q))
    for l in range(8):
        got[l * k:(l + 1) * k, l * k:(l + 1) * k] = lblocks[l * k * k:(l + 1) * k * k].reshape(k, k, order="F")
    np.testing.assert_allclose(got, chol, rtol=KERNEL, atol=KERNEL)
    b = np.asfortranarray(rng.standard_normal((pat.q, 2)))
    fwd = b.copy(order="F")
    _blocked.blockdiag_forward(lblocks, k, fwd)
    np.testing.assert_allclose(fwd, np.linalg.solve(chol, b), rtol=KERNEL, atol=KERNEL)
    _blocked.blockdiag_backward(lblocks, k, fwd)
    np.testing.assert_allclose(fwd, np.linalg.solve(m, b), rtol=1e-9, atol=KERNEL)


@pytest.mark.parametrize("label,nlevels,kk", CASES + [("zerocorr", [9, 4], [3, 2])])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dense_tail", [True, False])
def test_blocked_system_matches_dense_cholesky(label, nlevels, kk, weighted, dense_tail,
                                               monkeypatch):
    """log det(L) and the Schur complement factor against numpy.linalg.cholesky of the
    dense Λ'Z'WZΛ + I, on every path (block-diagonal, CHOLMOD, dense tail)."""
    from mixedmodels._linalg import system as system_module
    monkeypatch.setattr(system_module, "DENSE_TAIL", dense_tail)
    zerocorr = [True, False] if label == "zerocorr" else None
    rng, codes, z, zc = random_problem(6, nlevels, kk, zerocorr=zerocorr)
    n = len(codes[0])
    w = rng.uniform(0.5, 2.0, n) if weighted else None
    xy = np.column_stack([np.ones(n), rng.standard_normal((n, 2))])
    system = BlockedSystem(codes, z, nlevels, zc)
    system.set_products(xy, w)
    theta = random_theta(rng, system.layout)
    logdet, r = system.factorize(theta)
    want_logdet, want_r = _twins.factorize(system.pattern, system.layout.templates(theta), xy, w)
    assert logdet == pytest.approx(want_logdet, rel=KERNEL)
    np.testing.assert_allclose(r, want_r, rtol=1e-9, atol=KERNEL)
    if len(kk) == 1:
        assert system.path == "block-diagonal"
    else:
        assert system.path in (("dense-tail", "cholmod") if dense_tail else ("cholmod",))


@pytest.mark.parametrize("nlevels,kk", [([11, 5], [1, 1]), ([10, 6, 3], [2, 1, 2]),
                                        ([9, 4], [3, 2]), ([40, 3], [1, 1])])
def test_dense_tail_factor_is_the_dense_cholesky(nlevels, kk):
    """With no permutation the dense-tail factor is numpy.linalg.cholesky of M itself (its
    twin): log det, L⁻¹b and L'⁻¹b, and a non-positive-definite M raises."""
    from mixedmodels._linalg._densetail import DenseTailFactor

    rng, codes, z, zc = random_problem(9, nlevels, kk)
    system = BlockedSystem(codes, z, nlevels, zc)
    system.set_products(np.ones((len(codes[0]), 1)))
    pat = system.pattern
    theta = random_theta(rng, system.layout)
    lam = _twins.dense_lambda(pat, system.layout.templates(theta))
    zd = _twins.dense_z(pat)
    m = lam.T @ zd.T @ zd @ lam + np.eye(pat.q)
    mx = np.zeros(len(pat.indices))
    for j in range(pat.q):
        rows = pat.indices[pat.indptr[j]:pat.indptr[j + 1]]
        mx[pat.indptr[j]:pat.indptr[j + 1]] = m[rows, j]
    factor = DenseTailFactor(pat.indptr, pat.indices, mx, int(pat.kk[0]), int(pat.uoff[1]))
    factor.factorize()
    chol = np.linalg.cholesky(m)
    assert factor.logdet() == pytest.approx(np.sum(np.log(np.diag(chol))), rel=KERNEL)
    b = np.asfortranarray(rng.standard_normal((pat.q, 3)))
    fwd = factor.forward(b.copy(order="F"))
    np.testing.assert_allclose(fwd, np.linalg.solve(chol, b), rtol=1e-9, atol=KERNEL)
    bwd = factor.backward(b.copy(order="F"))
    np.testing.assert_allclose(bwd, np.linalg.solve(chol.T, b), rtol=1e-9, atol=KERNEL)
    mx[pat.indptr[pat.q - 1]] = -1.0        # the last diagonal entry
    with pytest.raises(np.linalg.LinAlgError):
        factor.factorize()
    with pytest.raises(ValueError, match="no factorization"):
        factor.forward(b.copy(order="F"))


def test_dense_tail_inverse_blocks_are_the_dense_inverse():
    """S⁻¹ = M⁻¹'s trailing block, and G = M⁻¹'s term-0 rows at the trailing columns, one
    block per (level, column) asked for."""
    from mixedmodels._linalg._densetail import DenseTailFactor

    rng, codes, z, zc = random_problem(4, [10, 6, 3], [2, 1, 2])
    system = BlockedSystem(codes, z, [10, 6, 3], zc)
    pat = system.pattern
    theta = random_theta(rng, system.layout)
    lam = _twins.dense_lambda(pat, system.layout.templates(theta))
    zd = _twins.dense_z(pat)
    m = lam.T @ zd.T @ zd @ lam + np.eye(pat.q)
    mx = np.concatenate([m[pat.indices[pat.indptr[j]:pat.indptr[j + 1]], j]
                         for j in range(pat.q)])
    factor = DenseTailFactor(pat.indptr, pat.indices, mx, int(pat.kk[0]), int(pat.uoff[1]))
    factor.factorize()
    q0, k0 = int(pat.uoff[1]), int(pat.kk[0])
    minv = np.linalg.inv(m)
    sinv = factor.tail_inverse()
    np.testing.assert_allclose(sinv, minv[q0:, q0:], rtol=1e-9, atol=KERNEL)
    levels = np.array([0, 3, 9, 3], dtype=np.int32)
    cols = np.array([0, 2, 4, 10], dtype=np.int64)          # tail columns, 2 at a time (r = 12)
    blocks = factor.g_blocks(sinv, levels, cols, 2)
    for blk, lev, col in zip(blocks, levels, cols):
        want = minv[lev * k0:(lev + 1) * k0, q0 + col:q0 + col + 2]
        np.testing.assert_allclose(blk, want, rtol=1e-9, atol=KERNEL)

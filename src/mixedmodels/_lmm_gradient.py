"""The exact gradient of a linear mixed model's profiled objective over θ.

From the cross-products alone (C = Z'WZ, Z'W[X y], [X y]'W[X y]), so an out-of-core
workspace has it too. With M = Λ'CΛ + I, the solution (β̂, û) at θ, b = Λû, ε the
weighted residuals (Z'Wε = Z'Wy - Cb - Z'WXβ̂), r² the penalized RSS and d = n (ML) or
n - p (REML),

    objective = log det M [+ log det S] + d log r² + const,    S = X'WX - X'WZΛ M⁻¹Λ'Z'WX,

and for θ_j, entry (e, a) of term t's template T_t (Λ_j = ∂Λ/∂θ_j: T_t's unit entry on
every level of t):

    ∂ log det M / ∂θ_j = 2 tr(M⁻¹Λ'CΛ_j) = 2 Σ_l K_ll[e, a],       K = CΛM⁻¹,
    ∂ log det S / ∂θ_j = -2 Σ_l (V S⁻¹ Wₓ')_ll[a, e],  V = M⁻¹Λ'Z'WX, Wₓ = Z'WX - CΛV,
    ∂ r² / ∂θ_j        = -2 Σ_l (Z'Wε)_l[e] û_l[a]                 (β̂, û minimize r²),

where _ll is the k_t-by-k_t block of level l of term t. (log det M + log det S is the
log-determinant of the whole [Z X] block; its derivative is 2 tr(A⁻¹[Λ'C; X'WZ]Λ_j)
with A⁻¹'s random-effects rows M⁻¹ + V S⁻¹V' and -V S⁻¹.)

K's diagonal blocks need M⁻¹ on the block pattern of C. One term: M is block diagonal
and everything is per level. Several terms with q up to ``DENSE_MAX``: M⁻¹ densely.
Larger models have no gradient here (None): M⁻¹ on the pattern of C would take the dense
tail's [G; S⁻¹] (insteval: S⁻¹ and ~10⁸ flops for G, about six evaluations' worth, more
than the Richardson step it would replace) or a selected inversion of a sparse factor,
which the CHOLMOD shim does not expose.
"""
import weakref

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from scipy.linalg.lapack import dpotrf, dpotri

from ._kernels._gradient import lmm_blockdiag_gradient
from ._linalg._blocked import upper_solve

__all__ = ["DENSE_MAX", "has_exact_gradient", "lmm_value_and_gradient"]

# Above this q a dense M⁻¹ costs more than the evaluations a gradient saves.
DENSE_MAX = 1500


def has_exact_gradient(ws):
    """Whether :func:`lmm_value_and_gradient` is available (and cheap) for this workspace."""
    return ws.factor is None or ws.q <= DENSE_MAX


class _Crossproducts:
    """C = Z'WZ densely (several terms) or as its level blocks (one term), read from the
    workspace's block values, and where θ goes in a dense Λ; rebuilt when the values
    change."""

    def __init__(self, ws):
        pat, layout = ws.pattern, ws.layout
        self.avals = ws.avals.copy()
        if ws.factor is None:
            k, nlev = int(pat.kk[0]), int(pat.nlev[0])
            # each level's block is stored column-major; the upper triangle of a diagonal
            # block may be left unwritten, so mirror the lower one
            blocks = self.avals[:nlev * k * k].reshape(nlev, k, k).transpose(0, 2, 1)
            self.blocks = np.tril(blocks) + np.tril(blocks, -1).transpose(0, 2, 1)
            return
        q = ws.q
        keep = pat.pos >= 0
        data = np.zeros(len(pat.indices))
        data[pat.pos[keep]] = self.avals[keep]
        lower = sp.csc_matrix((data, pat.indices, pat.indptr), shape=(q, q)).toarray()
        self.dense = lower + np.tril(lower, -1).T
        # flat positions in a dense Λ of every θ component, level by level
        flat, counts = [], []
        for t, e, a in layout.entries:
            k, off = int(pat.kk[t]), int(pat.uoff[t])
            base = off + np.arange(int(pat.nlev[t])) * k
            flat.append((base + e) * q + base + a)
            counts.append(len(base))
        self.lam_flat = np.concatenate(flat)
        self.lam_counts = np.array(counts)
        self.upper = np.triu_indices(q, 1)
        self.idx = [int(pat.uoff[t]) + np.arange(int(pat.nlev[t]) * int(pat.kk[t])).reshape(
            int(pat.nlev[t]), int(pat.kk[t])) for t in range(pat.nterm)]

    def lam(self, theta):
        q = self.dense.shape[0]
        out = np.zeros(q * q)
        out[self.lam_flat] = np.repeat(theta, self.lam_counts)
        return out.reshape(q, q)


_CACHE = weakref.WeakKeyDictionary()


def _crossproducts(ws):
    c = _CACHE.get(ws)
    if c is None or not np.array_equal(c.avals, ws.avals):
        c = _CACHE[ws] = _Crossproducts(ws)
    return c


def lmm_value_and_gradient(model, theta):
    """The objective of a LinearMixedModel at θ and its exact gradient over θ.

    Returns
    -------
    (value, gradient) or None
        None when the workspace has no cheap exact gradient (:func:`has_exact_gradient`).
        value is ``model.objective(theta)``; it is ``inf`` (and the gradient NaN) where
        the system is singular.
    """
    ws = model.workspace
    if not has_exact_gradient(ws):
        return None
    theta = np.asarray(theta, dtype=float)
    try:
        val, _, r, pwrss = model._evaluate(theta)
    except np.linalg.LinAlgError:
        return np.inf, np.full(theta.size, np.nan)
    p, pat, layout = model.p, ws.pattern, ws.layout
    beta = r[:p, p].copy()
    upper_solve(r, beta)
    u = ws.backward(np.asfortranarray((ws.rzxy[:, p] - ws.rzxy[:, :p] @ beta)[:, None]))[:, 0]
    zx, zy = ws.ztxy[:, :p], ws.ztxy[:, p]
    if ws.factor is None:
        return float(val), _one_term_compiled(model, ws, theta, r, beta, u)
    cross = _crossproducts(ws)
    ktrace, cb, v, clv = _dense(cross, theta, u, zx)
    zres = zy - cb - zx @ beta                      # Z'Wε
    if model.REML and p:
        rx = r[:p, :p]
        vt = sla.solve_triangular(rx, v.T, trans="T", lower=False, check_finite=False).T
        wt = sla.solve_triangular(rx, (zx - clv).T, trans="T", lower=False,
                                  check_finite=False).T          # V RX⁻¹, Wₓ RX⁻¹
    scale = model._dfr / pwrss
    per_term = []
    for t in range(pat.nterm):
        k, nl, off = int(pat.kk[t]), int(pat.nlev[t]), int(pat.uoff[t])
        sl = slice(off, off + k * nl)
        # [e, a]: ∂/∂T_t[e, a] of log det M, plus d/r² times that of r²
        g = 2.0 * ktrace[t] - 2.0 * scale * (zres[sl].reshape(nl, k).T @ u[sl].reshape(nl, k))
        if model.REML and p:
            g -= 2.0 * np.einsum("laj,lej->ea", vt[sl].reshape(nl, k, p),
                                 wt[sl].reshape(nl, k, p))
        per_term.append(g)
    grad = np.array([per_term[t][e, a] for t, e, a in layout.entries])
    return float(val), grad


def _one_term_compiled(model, ws, theta, r, beta, u):
    """One term, in one compiled pass over the levels (``lmm_blockdiag_gradient``)."""
    p, layout = model.p, ws.layout
    k = int(ws.pattern.kk[0])
    if model.REML and p:
        rinv = np.eye(p)
        for j in range(p):
            col = np.ascontiguousarray(rinv[:, j])
            upper_solve(r, col)
            rinv[:, j] = col
        sinv = rinv @ rinv.T
    else:
        sinv = _NO_SCHUR
    ktrace, rss, schur = np.zeros((k, k)), np.zeros((k, k)), np.zeros((k, k))
    lmm_blockdiag_gradient(ws.avals, layout.lam(theta), ws.blockdiag_diagonal(), k,
                           np.ascontiguousarray(u), ws.ztxy[:, :p], ws.ztxy[:, p], beta, sinv,
                           ktrace, rss, schur)
    g = 2.0 * (ktrace - (model._dfr / float(r[-1, -1]) ** 2) * rss - schur)
    return np.array([g[e, a] for _, e, a in layout.entries])


_NO_SCHUR = np.zeros((0, 0))


def one_term_sums_numpy(model, theta):
    """NumPy twin of ``lmm_blockdiag_gradient``: (ktrace, rss, schur) at θ, each [e, a]."""
    ws = model.workspace
    val, _, r, pwrss = model._evaluate(np.asarray(theta, dtype=float))
    p = model.p
    beta = r[:p, p].copy()
    upper_solve(r, beta)
    u = ws.backward(np.asfortranarray((ws.rzxy[:, p] - ws.rzxy[:, :p] @ beta)[:, None]))[:, 0]
    zx, zy = ws.ztxy[:, :p], ws.ztxy[:, p]
    (ktrace,), cb, v, clv = _one_term(_crossproducts(ws).blocks, ws.layout.templates(theta)[0],
                                      u, zx)
    nl, k = ws.pattern.nlev[0], ws.pattern.kk[0]
    zres = zy - cb - zx @ beta
    rss = zres.reshape(nl, k).T @ u.reshape(nl, k)
    if model.REML and p:
        s = r[:p, :p].T @ r[:p, :p]
        schur = np.einsum("lej,laj->ea", (zx - clv).reshape(nl, k, p),
                          np.linalg.solve(s, v.T).T.reshape(nl, k, p))
    else:
        schur = np.zeros((k, k))
    return ktrace, rss, schur


def _one_term(blocks, tmpl, u, zx):
    """One term: M, C, Λ block diagonal by level. Returns Σ_l K_ll, Cb, V and CΛV."""
    nl, k = blocks.shape[0], blocks.shape[1]
    ct = blocks @ tmpl                               # C_l T
    m = np.einsum("ba,lbc->lac", tmpl, ct) + np.eye(k)
    minv = np.linalg.inv(m)
    ktrace = np.einsum("lab,lbc->ac", ct, minv)
    cb = np.einsum("lab,lb->la", ct, u.reshape(nl, k)).ravel()
    p = zx.shape[1]
    if p:
        ltz = np.einsum("ba,lbj->laj", tmpl, zx.reshape(nl, k, p))   # T'(Z'WX)_l
        v = np.einsum("lab,lbj->laj", minv, ltz)
        clv = np.einsum("lab,lbj->laj", ct, v).reshape(nl * k, p)
        v = v.reshape(nl * k, p)
    else:
        v = clv = np.zeros((nl * k, 0))
    return [ktrace], cb, v, clv


def _dense(cross, theta, u, zx):
    """Several terms, M⁻¹ dense. Returns per term Σ_l K_ll, Cb, V and CΛV."""
    lam = cross.lam(theta)
    cl = cross.dense @ lam                           # CΛ
    m = lam.T @ cl
    m.flat[::m.shape[0] + 1] += 1.0
    # LAPACK's Cholesky inverse: numpy.linalg.inv (LU) took 2.5 times as long
    chol, info = dpotrf(m, lower=1, clean=0, overwrite_a=1)
    if info == 0:
        minv, info = dpotri(chol, lower=1, overwrite_c=1)
    if info:
        raise np.linalg.LinAlgError("M is not positive definite")
    minv[cross.upper] = minv.T[cross.upper]          # dpotri fills the lower triangle
    k_full = cl @ minv
    ktrace = [k_full[idx[:, :, None], idx[:, None, :]].sum(axis=0) for idx in cross.idx]
    v = minv @ (lam.T @ zx)
    return ktrace, cl @ u, v, cl @ v

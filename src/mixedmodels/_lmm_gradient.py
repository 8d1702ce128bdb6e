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

K's diagonal blocks need M⁻¹ on the block pattern of C, by one of three routes
(:func:`gradient_route`, chosen once per workspace):

- "one-term": M is block diagonal, everything is per level: the value and the gradient
  in one compiled call (``OneTermGradient`` in _kernels/_lmm_gradient.pyx);
- "dense-tail": the workspace's factor eliminates term 0 level by level and holds the rest
  as one dense block S (_densetail.pyx). M⁻¹ on C's pattern is then S⁻¹ (LAPACK's dpotri
  on the tail's factor, 2r³/3 flops against the factorization's r³/3) and per level l of
  term 0 a k₀-by-n_l product with S⁻¹'s block at the n_l tail levels l meets (the flops
  of l's share of S): one compiled call (``DenseTailGradient``, _kernels/_lmm_gradient.pyx)
  after the objective's own factorization;
- "side-tail": the same with a dense-tail factor of the same M made beside CHOLMOD's, where
  CHOLMOD factors the model (its tail is sparser than S) but S is still cheap to factor
  and invert.

A CHOLMOD model takes the side tail only where that costs at most ``GRADIENT_BUDGET``
evaluations (by flop counts at the rates system.py measured); otherwise there is no
gradient here (None) and the fit uses differences of the objective. A selected inversion
of the sparse factor would cover those, but the CHOLMOD shim does not expose its columns.

Measured on one thread (CPU time, minima): penicillin value 5.7 µs, value and gradient
12.5 µs (S⁻¹ 1 µs, the compiled pass 3.6 µs, the rest Python); insteval (r = 1,142) value
19 ms, value and gradient 58 ms: S⁻¹ 32 ms (dpotri has twice the flops of the
factorization's dpotrf), the compiled pass 5.5 ms.
"""
import weakref

import numpy as np
import scipy.linalg as sla

from ._kernels._lmm_gradient import (DenseTailGradient, DenseTailValueGradient,
                                     LmmObjective, OneTermGradient, slot_values)
from ._linalg._blocked import upper_solve
from ._linalg._densetail import DenseTailFactor
from ._linalg.system import _dense_tail_flops

__all__ = ["GRADIENT_BUDGET", "compiled_objective", "gradient_route", "has_exact_gradient",
           "lmm_value_and_gradient"]

# A gradient is cheap while it costs at most this many evaluations of the objective.
GRADIENT_BUDGET = 4.0
# Seconds per flop and per call, from system.py's measurements: LAPACK's dense kernels
# ~20 GFlop/s on one thread, CHOLMOD's ~6.
_DENSE_RATE, _CHOLMOD_RATE = 2e10, 6e9
_CALL_SECONDS = 2e-5


def has_exact_gradient(ws):
    """Whether :func:`lmm_value_and_gradient` is available, and cheap, for this workspace."""
    return gradient_route(ws) is not None


_ROUTES = weakref.WeakKeyDictionary()


class _Route:
    """How a workspace's gradient is computed: ``kind`` and, on the tail routes, the
    dense-tail factor (the workspace's or one of its own) and the compiled pass bound to
    the workspace's arrays."""

    def __init__(self, kind, ws=None, tail=None):
        self.kind = kind
        self.tail = tail
        self.kernel = self.ztxy = None
        if tail is not None:
            pat, layout = ws.pattern, ws.layout
            self.kernel = DenseTailGradient(pat.indptr, pat.indices, ws._mx, ws.avals,
                                            slot_values(pat.pos, len(pat.indices)), ws._lam,
                                            layout.lam_off, layout.index, pat.kk, pat.uoff)

    def bind(self, ws):
        """The compiled pass, bound to the workspace's current product arrays (which it
        allocates anew when the number of columns of [X y] changes)."""
        if self.ztxy is not ws.ztxy:
            self.kernel.bind_products(ws.ztxy, ws._r)
            self.ztxy = ws.ztxy
        return self.kernel


def gradient_route(ws):
    """"one-term", "dense-tail", "side-tail" or None (module docstring)."""
    return _route(ws).kind


def _route(ws):
    route = _ROUTES.get(ws)
    if route is None:
        route = _ROUTES[ws] = _choose_route(ws)
    return route


def _choose_route(ws):
    if ws.factor is None:
        return _Route("one-term")
    if isinstance(ws.factor, DenseTailFactor):
        return _Route("dense-tail", ws, ws.factor)
    pat = ws.pattern
    q0, k0, r = int(pat.uoff[1]), int(pat.kk[0]), ws.q - int(pat.uoff[1])
    tail_flops = _dense_tail_flops(pat.indptr, k0, q0)     # None: too large to hold
    if tail_flops is None:
        return _Route(None)
    evaluation = ws.factor.flops / _CHOLMOD_RATE + _CALL_SECONDS
    gradient = (tail_flops + 2.0 * r ** 3 / 3.0) / _DENSE_RATE + _CALL_SECONDS
    if gradient > GRADIENT_BUDGET * evaluation:
        return _Route(None)
    return _Route("side-tail", ws, DenseTailFactor(pat.indptr, pat.indices, ws._mx, k0, q0))


def aval_at(pat):
    """For every CSC slot of M's lower triangle, the index in avals of C's value there
    (each slot has exactly one: the blocks' entries on or below the diagonal). The twin
    of the compiled ``slot_values(pat.pos, len(pat.indices))``."""
    keep = np.flatnonzero(pat.pos >= 0)
    out = np.full(len(pat.indices), -1, dtype=np.int64)
    out[pat.pos[keep]] = keep
    if np.any(out < 0):
        raise ValueError("a slot of M's pattern has no value of C")
    return out


def compiled_objective(model):
    """The model's objective as one compiled call (_kernels/_lmm_gradient.pyx), for the
    compiled search and the check: with its exact gradient (``value_and_gradient``,
    ``has_gradient``) on the routes that have one."""
    ws = model.workspace
    args = (ws.factorizer, ws.layout.ntheta, float(model._dfr), float(model._logw),
            bool(model.REML), float(model.fixed.logabsdet))
    route = _route(ws)
    if route.kind == "one-term":
        return OneTermGradient(ws.factorizer, ws.layout.index, int(ws.pattern.kk[0]),
                               *args[2:])
    if route.kind in ("dense-tail", "side-tail"):
        return DenseTailValueGradient(*args, route.tail, route.bind(ws),
                                      route.tail is not ws.factor)
    return LmmObjective(*args)


def lmm_value_and_gradient(model, theta, kernel=None):
    """The objective of a LinearMixedModel at θ and its exact gradient over θ.

    Returns
    -------
    (value, gradient) or None
        None when the workspace has no cheap exact gradient (:func:`has_exact_gradient`).
        value is ``model.objective(theta)``; it is ``inf`` (and the gradient NaN) where
        the system is singular.

    ``kernel``: the model's :func:`compiled_objective`, where the caller keeps one.
    """
    ws = model.workspace
    if _route(ws).kind is None:
        return None
    kernel = compiled_objective(model) if kernel is None else kernel
    return kernel.value_and_gradient(np.asarray(theta, dtype=float))


def _modes(ws, r, p):
    """β̂ and û = M⁻¹Λ'Z'W(y - Xβ̂), from the factorization's r and forward-solved products."""
    beta = r[:p, p].copy()
    upper_solve(r, beta)
    u = ws.backward(np.asfortranarray((ws.rzxy[:, p] - ws.rzxy[:, :p] @ beta)[:, None]))[:, 0]
    return beta, u


def one_term_sums_numpy(model, theta):
    """NumPy twin of ``one_term_sums`` (``OneTermGradient``): (ktrace, rss, schur) at
    θ, each [e, a]."""
    ws = model.workspace
    _, _, r, _ = model._evaluate(np.asarray(theta, dtype=float))
    p = model.p
    beta, u = _modes(ws, r, p)
    zx, zy = ws.ztxy[:, :p], ws.ztxy[:, p]
    (ktrace,), cb, v, clv = _one_term(_level_blocks(ws), ws.layout.templates(theta)[0],
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


def _level_blocks(ws):
    """A one-term workspace's level blocks of C = Z'WZ, (levels, k, k). Each is stored
    column-major, and the upper triangle of a diagonal block may be left unwritten, so
    the lower one is mirrored."""
    pat = ws.pattern
    k, nlev = int(pat.kk[0]), int(pat.nlev[0])
    blocks = ws.avals[:nlev * k * k].reshape(nlev, k, k).transpose(0, 2, 1)
    return np.tril(blocks) + np.tril(blocks, -1).transpose(0, 2, 1)


# -- the NumPy twin of the compiled dense-tail pass --------------------------------------
def dense_tail_sums_numpy(model, theta):
    """NumPy twin of ``DenseTailGradient``: its sums (3, len(lam): Σ K_mm, Σ (Z'Wε)_m û_m',
    Σ (Wₓ S⁻¹V')_mm per template entry, laid out as lam) and the gradient at θ, with the
    same blocks of M⁻¹ (module docstring of _kernels/_lmm_gradient.pyx) formed from dense
    copies of M and C, and S⁻¹ from NumPy's inverse of the Schur complement."""
    ws = model.workspace
    theta = np.asarray(theta, dtype=float)
    _, _, r, _ = model._evaluate(theta)
    pat, layout = ws.pattern, ws.layout
    q, q0, k0, m = ws.q, int(pat.uoff[1]), int(pat.kk[0]), ws.ztxy.shape[1]
    p = m - 1
    big_m = _symmetric(pat, ws._mx)
    big_c = _symmetric(pat, ws.avals[aval_at(pat)])
    lam = _dense_lambda(pat, layout.templates(theta))
    levels = []                                  # (own columns, tail rows R_l, L_l, W_l)
    schur = big_m[q0:, q0:].copy()
    for lev in range(q0 // k0):
        own = np.arange(lev * k0, (lev + 1) * k0)
        rows = pat.indices[pat.indptr[lev * k0] + k0:pat.indptr[lev * k0 + 1]].astype(int)
        chol = np.linalg.cholesky(big_m[np.ix_(own, own)])
        w = sla.solve_triangular(chol, big_m[np.ix_(rows, own)].T, lower=True)
        schur[np.ix_(rows - q0, rows - q0)] -= w.T @ w
        levels.append((own, rows, chol, w))
    sinv = np.linalg.inv(schur)
    # M⁻¹ on C's pattern
    minv = np.zeros((q, q))
    tail_pattern = _symmetric(pat, np.ones(len(pat.indices)))[q0:, q0:] != 0.0
    minv[q0:, q0:] = np.where(tail_pattern, sinv, 0.0)
    for own, rows, chol, w in levels:
        y = w @ sinv[np.ix_(rows - q0, rows - q0)]
        yt = sla.solve_triangular(chol, y, lower=True, trans="T")
        wt = sla.solve_triangular(chol, w, lower=True, trans="T")
        ainv = np.linalg.inv(chol @ chol.T)
        minv[np.ix_(own, own)] = ainv + yt @ wt.T
        minv[np.ix_(own, rows)] = -yt
        minv[np.ix_(rows, own)] = -yt.T
    k_full = big_c @ lam @ minv
    # [V, M⁻¹Λ'Z'Wy] through the same blocks
    xb = lam.T @ ws.ztxy
    for own, rows, chol, w in levels:
        xb[own] = sla.solve_triangular(chol, xb[own], lower=True)
        xb[rows] -= w.T @ xb[own]
    xb[q0:] = sinv @ xb[q0:]
    for own, rows, chol, w in levels:
        xb[own] = sla.solve_triangular(chol, xb[own] - w @ xb[rows], lower=True, trans="T")
    beta = sla.solve_triangular(r[:p, :p], r[:p, p], lower=False)
    v = xb[:, :p]
    u = xb[:, p] - v @ beta
    zres = ws.ztxy[:, p] - big_c @ lam @ u - ws.ztxy[:, :p] @ beta
    wx = ws.ztxy[:, :p] - big_c @ lam @ v
    reml = model.REML and p > 0
    if reml:
        vt = sla.solve_triangular(r[:p, :p], v.T, trans="T", lower=False).T    # V RX⁻¹
        wt = sla.solve_triangular(r[:p, :p], wx.T, trans="T", lower=False).T   # Wₓ RX⁻¹
    sums = np.zeros((3, layout.nlam))
    for t in range(pat.nterm):
        k, nl, off = int(pat.kk[t]), int(pat.nlev[t]), int(pat.uoff[t])
        idx = off + np.arange(nl * k).reshape(nl, k)
        blocks = [k_full[idx[:, :, None], idx[:, None, :]].sum(axis=0),
                  zres[idx].T @ u[idx],
                  np.einsum("lej,laj->ea", wt[idx], vt[idx]) if reml else np.zeros((k, k))]
        for row, block in zip(sums, blocks):
            row[layout.lam_off[t]:layout.lam_off[t] + k * k] = block.ravel(order="F")
    scale = model._dfr / float(r[-1, -1]) ** 2
    grad = 2.0 * (sums[0] - scale * sums[1] - sums[2])[layout.index]
    return sums, grad


def _symmetric(pat, values):
    """The dense symmetric matrix whose lower triangle is ``values`` in M's CSC layout."""
    q = len(pat.indptr) - 1
    lower = np.zeros((q, q))
    cols = np.repeat(np.arange(q), np.diff(pat.indptr))
    lower[pat.indices, cols] = values
    return lower + np.tril(lower, -1).T


def _dense_lambda(pat, templates):
    """Λ densely: T_t on every level of every term."""
    q = len(pat.indptr) - 1
    lam = np.zeros((q, q))
    for t, tmpl in enumerate(templates):
        k, off = int(pat.kk[t]), int(pat.uoff[t])
        for lev in range(int(pat.nlev[t])):
            sl = slice(off + lev * k, off + (lev + 1) * k)
            lam[sl, sl] = tmpl
    return lam

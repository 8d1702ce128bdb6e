"""NumPy twins of the kernels in _blocked.pyx and of the whole blocked factorization.

Slow, dense and obvious: tests/test_blocked.py holds the compiled kernels to these.
"""
import numpy as np
import scipy.linalg as sla


def dense_z(pattern):
    """Z as a dense n-by-q array."""
    n = pattern.codes.shape[1]
    z = np.zeros((n, pattern.q))
    for t in range(pattern.nterm):
        k = int(pattern.kk[t])
        base = pattern.uoff[t] + pattern.codes[t].astype(np.int64) * k
        for a in range(k):
            z[np.arange(n), base + a] = pattern.zcat[:, pattern.zoff[t] + a]
    return z


def dense_lambda(pattern, templates):
    """Λ as a dense q-by-q array: block diagonal, one copy of T_t per level of term t."""
    blocks = []
    for t, tmpl in enumerate(templates):
        blocks.extend([tmpl] * int(pattern.nlev[t]))
    return sla.block_diag(*blocks)


def accumulate_blocks(pattern, w=None):
    """The values array of Z'WZ's blocks, read off the dense product."""
    z = dense_z(pattern)
    ztz = z.T @ (z if w is None else z * w[:, None])
    out = np.zeros(pattern.nvals)
    for b in range(len(pattern.blk_off)):
        tr, tc = pattern.blk_tr[b], pattern.blk_tc[b]
        kr, kc = int(pattern.kk[tr]), int(pattern.kk[tc])
        off = pattern.blk_off[b]
        # which levels: find the rows of the first entry through rowoff
        pair = np.flatnonzero((pattern.pair_tr == tr) & (pattern.pair_tc == tc))[0]
        i = np.flatnonzero(pattern.rowoff[pair] == off)[0]
        r0 = pattern.uoff[tr] + pattern.codes[tr, i] * kr
        c0 = pattern.uoff[tc] + pattern.codes[tc, i] * kc
        out[off:off + kr * kc] = ztz[r0:r0 + kr, c0:c0 + kc].ravel(order="F")
    return out


def m_lower_dense(pattern, templates, w=None):
    """The dense lower triangle of M = Λ'Z'WZΛ + I."""
    z = dense_z(pattern)
    lam = dense_lambda(pattern, templates)
    zl = z @ lam
    m = zl.T @ (zl if w is None else zl * w[:, None]) + np.eye(pattern.q)
    return np.tril(m)


def factorize(pattern, templates, xy, w=None):
    """(log det L, upper Cholesky factor of the Schur complement) by dense algebra.

    Both are invariant to the fill-reducing permutation, so they can be compared
    directly with BlockedSystem.factorize.
    """
    z = dense_z(pattern)
    lam = dense_lambda(pattern, templates)
    zl = z @ lam
    wz = zl if w is None else zl * w[:, None]
    m = zl.T @ wz + np.eye(pattern.q)
    chol = np.linalg.cholesky(m)
    rzxy = sla.solve_triangular(chol, wz.T @ xy, lower=True)
    wxy = xy if w is None else xy * w[:, None]
    schur = xy.T @ wxy - rzxy.T @ rzxy
    return np.sum(np.log(np.diag(chol))), np.linalg.cholesky(schur).T

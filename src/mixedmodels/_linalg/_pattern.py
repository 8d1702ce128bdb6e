"""The block pattern of Z'WZ and of the lower triangle of M = Λ'Z'WZΛ + I.

Built once per model from the random-effects terms; the kernels in _blocked.pyx and the
CHOLMOD factor then only ever rewrite values. Terms are put in decreasing order of their
number of levels (as lme4 and MixedModels.jl do), so the term with the most levels comes
first in u and in θ.

Random effect (term t, level l, column a) sits at u index ``uoff[t] + l * k[t] + a``.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockPattern:
    """Where every row's contribution to Z'WZ lands, and where each block entry of M sits.

    Attributes
    ----------
    kk, nlev : int32 arrays, columns and levels per term
    uoff : int64 array, first u index of each term
    zoff : int32 array, first column of each term in ``zcat``
    zcat : (n, sum(kk)) float64, the terms' model columns side by side
    codes : (nterm, n) int32, the level of each row in each term
    pair_tr, pair_tc : int32, the term pairs (tr >= tc) that make blocks
    rowoff : (npair, n) int64, offset in ``avals`` of the block row i adds to, per pair
    blk_off, blk_tr, blk_tc, blk_diag : per block: value offset, terms, diagonal flag
    nvals : length of ``avals``
    indptr, indices : int32 CSC pattern of M's lower triangle (None when one term)
    pos : int64, for each value in ``avals`` its index in the CSC data, or -1
    """

    kk: np.ndarray
    nlev: np.ndarray
    uoff: np.ndarray
    zoff: np.ndarray
    zcat: np.ndarray
    codes: np.ndarray
    pair_tr: np.ndarray
    pair_tc: np.ndarray
    rowoff: np.ndarray
    blk_off: np.ndarray
    blk_tr: np.ndarray
    blk_tc: np.ndarray
    blk_diag: np.ndarray
    nvals: int
    indptr: np.ndarray | None
    indices: np.ndarray | None
    pos: np.ndarray | None

    @property
    def q(self):
        return int(self.uoff[-1] + self.kk[-1] * self.nlev[-1])

    @property
    def nterm(self):
        return len(self.kk)

    @property
    def blockdiagonal(self):
        """One term: M is block diagonal and needs no sparse factorization."""
        return self.nterm == 1


def term_order(nlevels):
    """Stable order of terms by decreasing number of levels."""
    return sorted(range(len(nlevels)), key=lambda t: -nlevels[t])


def build_pattern(codes, z, nlevels):
    """Build the block pattern.

    Parameters
    ----------
    codes : list of int arrays (n,), level index per row, one per term, already in term order
    z : list of float arrays (n, k_t), the terms' columns
    nlevels : list of int
    """
    nterm = len(codes)
    n = len(codes[0])
    kk = np.array([zi.shape[1] for zi in z], dtype=np.int32)
    nlev = np.asarray(nlevels, dtype=np.int32)
    uoff = np.concatenate([[0], np.cumsum(kk.astype(np.int64) * nlev)[:-1]]).astype(np.int64)
    zoff = np.concatenate([[0], np.cumsum(kk)[:-1]]).astype(np.int32)
    zcat = np.ascontiguousarray(np.hstack(z), dtype=np.float64)
    codes_arr = np.ascontiguousarray(np.vstack(codes), dtype=np.int32)

    pairs, rowoffs, blocks = [], [], []   # blocks: (tr, tc, lr, lc) arrays per pair
    nvals = 0
    for tr in range(nterm):
        for tc in range(tr + 1):
            if tr == tc:
                # a row has one level per term, so Z_t'Z_t is block diagonal by level
                lr = lc = np.arange(nlev[tr], dtype=np.int64)
                inverse = codes_arr[tr].astype(np.int64)
            else:
                key = codes_arr[tr].astype(np.int64) * nlev[tc] + codes_arr[tc]
                uniq, inverse = np.unique(key, return_inverse=True)
                lr, lc = uniq // nlev[tc], uniq % nlev[tc]
            size = int(kk[tr]) * int(kk[tc])
            offsets = nvals + np.arange(len(lr), dtype=np.int64) * size
            pairs.append((tr, tc))
            rowoffs.append(offsets[inverse])
            blocks.append((tr, tc, lr, lc, offsets))
            nvals += len(lr) * size

    blk_off = np.concatenate([b[4] for b in blocks])
    blk_tr = np.concatenate([np.full(len(b[2]), b[0], np.int32) for b in blocks])
    blk_tc = np.concatenate([np.full(len(b[2]), b[1], np.int32) for b in blocks])
    blk_diag = (blk_tr == blk_tc).astype(np.int8)

    indptr = indices = pos = None
    if nterm > 1:
        indptr, indices, pos = _csc_lower(blocks, kk, uoff, nvals)
    return BlockPattern(
        kk=kk, nlev=nlev, uoff=uoff, zoff=zoff, zcat=zcat, codes=codes_arr,
        pair_tr=np.array([p[0] for p in pairs], np.int32),
        pair_tc=np.array([p[1] for p in pairs], np.int32),
        rowoff=np.ascontiguousarray(np.vstack(rowoffs)),
        blk_off=blk_off, blk_tr=blk_tr, blk_tc=blk_tc, blk_diag=blk_diag,
        nvals=int(nvals), indptr=indptr, indices=indices, pos=pos,
    )


def _csc_lower(blocks, kk, uoff, nvals):
    """CSC pattern of M's lower triangle, and the map from block values to CSC slots."""
    rows = np.empty(nvals, np.int64)
    cols = np.empty(nvals, np.int64)
    for tr, tc, lr, lc, offsets in blocks:
        kr, kc = int(kk[tr]), int(kk[tc])
        a, d = np.meshgrid(np.arange(kr), np.arange(kc), indexing="ij")
        a, d = a.ravel(order="F"), d.ravel(order="F")   # block entry order: a + d*kr
        slots = offsets[:, None] + (a + d * kr)[None, :]
        rows[slots] = (uoff[tr] + lr * kr)[:, None] + a[None, :]
        cols[slots] = (uoff[tc] + lc * kc)[:, None] + d[None, :]
    keep = np.flatnonzero(rows >= cols)
    order = np.lexsort((rows[keep], cols[keep]))
    pos = np.full(nvals, -1, np.int64)
    pos[keep[order]] = np.arange(len(keep))
    q = int(max(rows.max(), cols.max())) + 1
    counts = np.bincount(cols[keep], minlength=q)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = rows[keep[order]].astype(np.int32)
    return indptr, indices, pos

"""The block pattern of Z'WZ and of the lower triangle of M = Λ'Z'WZΛ + I.

Built once per model from the random-effects terms; the kernels in _blocked.pyx and the
CHOLMOD factor then only ever rewrite values. Terms are put in decreasing order of their
number of levels (as lme4 and MixedModels.jl do), so the term with the most levels comes
first in u and in θ.

Random effect (term t, level l, column a) sits at u index ``uoff[t] + l * k[t] + a``.
"""
import functools
from dataclasses import dataclass

import numpy as np

from . import _blocked

# False: the NumPy construction (build_pattern_numpy) builds every pattern, for comparisons
COMPILED = True


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


def build_pattern(codes, z, nlevels, general=False):
    """Build the block pattern.

    Parameters
    ----------
    codes : list of int arrays (n,), level index per row, one per term, already in term order
    z : list of float arrays (n, k_t), the terms' columns
    nlevels : list of int
    general : bool
        Take the general NumPy code for one term and for scalar terms too (the tests hold
        the shortcuts to it).

    The arrays come from one compiled call (_blocked.pattern_fields) where it takes the
    terms: its NumPy twin, :func:`build_pattern_numpy`, is ~45 small NumPy calls, each of
    which runs cold in a fit that follows a pause (penicillin, in a fit: 60 µs back to
    back and 130 after a pause; the compiled call 10 and 30). The twin builds whatever
    the compiled call declines (see there).
    """
    if COMPILED and not general:
        fields = _blocked.pattern_fields(codes, z, nlevels)
        if fields is not None:
            pat = object.__new__(_OneTermPattern if len(codes) == 1 else BlockPattern)
            pat.__dict__.update(fields)
            return pat
    return build_pattern_numpy(codes, z, nlevels, general)


def build_pattern_numpy(codes, z, nlevels, general=False):
    """:func:`build_pattern` in NumPy: the twin of _blocked.pattern_fields, and the
    construction of the patterns that it declines (see there)."""
    nterm = len(codes)
    if nterm == 1 and not general:
        return _one_term_pattern(codes[0], z[0], int(nlevels[0]))
    n = len(codes[0])
    kl = [int(zi.shape[1]) for zi in z]
    nl = [int(x) for x in nlevels]
    kk = np.array(kl, dtype=np.int32)
    nlev = np.array(nl, dtype=np.int32)
    uoff = np.array(_offsets([k * m for k, m in zip(kl, nl)]), dtype=np.int64)
    zoff = np.array(_offsets(kl), dtype=np.int32)
    # a copy of the columns side by side, and of the codes one row per term
    zcat = np.concatenate(z, axis=1) if nterm > 1 else np.array(z[0], dtype=np.float64)
    zcat = np.ascontiguousarray(zcat, dtype=np.float64)
    codes_arr = np.array(codes, dtype=np.int32)
    pairs = [(tr, tc) for tr in range(nterm) for tc in range(tr + 1)]
    rowoff = np.empty((len(pairs), n), dtype=np.int64)
    pair_tr = np.array([p[0] for p in pairs], np.int32)
    pair_tc = np.array([p[1] for p in pairs], np.int32)
    fields = dict(kk=kk, nlev=nlev, uoff=uoff, zoff=zoff, zcat=zcat, codes=codes_arr,
                  pair_tr=pair_tr, pair_tc=pair_tc, rowoff=rowoff)
    if general:
        fields.update(_general_blocks(codes_arr, kl, nl, kk, uoff, pairs, pair_tr, pair_tc,
                                      rowoff))
    elif all(k == 1 for k in kl):
        fields.update(_scalar_blocks(codes_arr, nl, uoff.tolist(), pairs, pair_tr, pair_tc,
                                     rowoff))
    else:
        fields.update(_general_blocks(codes_arr, kl, nl, kk, uoff, pairs, pair_tr, pair_tc,
                                      rowoff))
    return _new_pattern(fields)


def _one_term_pattern(codes, z, nlev):
    """:func:`build_pattern` of one term (the same arrays as the general code, which the
    tests hold it to), in fewer NumPy calls: M is block diagonal, one k-by-k block per
    level, and there is no CSC pattern. The arrays the block-diagonal path does not read
    are made when first asked for (see :class:`_OneTermPattern`)."""
    n, k = z.shape
    pat = object.__new__(_OneTermPattern)
    pat.__dict__.update(
        kk=np.array([k], np.int32), nlev=np.array([nlev], np.int32),
        uoff=np.zeros(1, np.int64), zoff=np.zeros(1, np.int32),
        zcat=np.array(z, dtype=np.float64, order="C"),
        codes=np.array(codes, dtype=np.int32).reshape(1, n),
        nvals=nlev * k * k, indptr=None, indices=None, pos=None, q=nlev * k)
    return pat


class _OneTermPattern(BlockPattern):
    """The :class:`BlockPattern` of one term, whose term-pair and per-block arrays and row
    offsets are made on first use: the workspace factors such a model level by level from
    ``avals`` and finds a row's block from its code (ThetaFactorizer.accumulate), so a
    model that is only built and fitted never reads them. Its sizes are plain values.
    (Made by ``__getattr__``, which runs only for a missing attribute, rather than by
    ``functools.cached_property``, whose lock costs more than a GLMM's three arrays.)"""

    nterm = 1
    blockdiagonal = True

    def __getattr__(self, name):
        make = _ONE_TERM_LAZY.get(name)
        if make is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self.__dict__[name] = make(self)
        return value


def _one_term_rowoff(pat):
    # offset = k * k * level
    size = int(pat.kk[0]) ** 2
    rowoff = pat.codes.astype(np.int64)
    if size != 1:
        rowoff *= size
    return rowoff


_ONE_TERM_LAZY = {
    # set when the pattern is made; for a copy made without it
    "q": lambda pat: int(pat.kk[0]) * int(pat.nlev[0]),
    "pair_tr": lambda pat: np.zeros(1, np.int32),
    "pair_tc": lambda pat: np.zeros(1, np.int32),
    "rowoff": _one_term_rowoff,
    "blk_off": lambda pat: np.arange(0, pat.nvals, int(pat.kk[0]) ** 2, dtype=np.int64),
    "blk_tr": lambda pat: np.zeros(int(pat.nlev[0]), np.int32),
    "blk_tc": lambda pat: np.zeros(int(pat.nlev[0]), np.int32),
    "blk_diag": lambda pat: np.ones(int(pat.nlev[0]), np.int8),
}


def _new_pattern(fields):
    """``BlockPattern(**fields)`` without the frozen dataclass's per-field
    ``object.__setattr__`` (a few microseconds, as much as a small pattern's arrays)."""
    pat = object.__new__(BlockPattern)
    pat.__dict__.update(fields)
    return pat


def _general_blocks(codes_arr, kl, nl, kk, uoff, pairs, pair_tr, pair_tc, rowoff):
    """The blocks of every term pair, ``rowoff`` (filled in), and the CSC pattern."""
    nterm = len(kl)
    blocks = []   # (tr, tc, lr, lc, offsets) per pair
    nblk = []
    nvals = 0
    for i, (tr, tc) in enumerate(pairs):
        size = kl[tr] * kl[tc]
        if tr == tc:
            # a row has one level per term, so Z_t'Z_t is block diagonal by level
            nb = nl[tr]
            lr = lc = np.arange(nb, dtype=np.int64) if nterm > 1 else None
            # rowoff = offsets[codes], offsets = nvals + size * (block number)
            np.multiply(codes_arr[tr], size, out=rowoff[i], dtype=np.int64)
        else:
            key = codes_arr[tr].astype(np.int64) * nl[tc] + codes_arr[tc]
            uniq, inverse = _unique_inverse(key, nl[tr] * nl[tc])
            lr, lc = uniq // nl[tc], uniq % nl[tc]
            nb = len(uniq)
            np.multiply(inverse, size, out=rowoff[i])
        if nvals:
            rowoff[i] += nvals
        offsets = np.arange(nvals, nvals + nb * size, size, dtype=np.int64)
        blocks.append((tr, tc, lr, lc, offsets))
        nblk.append(nb)
        nvals += nb * size

    if len(pairs) == 1:
        blk_off = blocks[0][4]
        blk_tr = np.zeros(nblk[0], np.int32)
        blk_tc = np.zeros(nblk[0], np.int32)
        blk_diag = np.ones(nblk[0], np.int8)
    else:
        blk_off = np.concatenate([b[4] for b in blocks])
        blk_tr = np.repeat(pair_tr, nblk)
        blk_tc = np.repeat(pair_tc, nblk)
        blk_diag = (blk_tr == blk_tc).astype(np.int8)

    indptr = indices = pos = None
    if nterm > 1:
        indptr, indices, pos = _csc_lower(blocks, kk, uoff, nvals)
    return dict(blk_off=blk_off, blk_tr=blk_tr, blk_tc=blk_tc, blk_diag=blk_diag,
                nvals=int(nvals), indptr=indptr, indices=indices, pos=pos)


def _scalar_blocks(codes_arr, nl, uoff, pairs, pair_tr, pair_tc, rowoff):
    """:func:`_general_blocks` for two or more terms of one column each, in fewer
    NumPy calls (the same arrays: tests hold the two together).

    Every block is one value, so the blocks' offsets are 0, 1, ..., nvals - 1, and
    every block is an entry of M's lower triangle. Within a column of M the values
    come in increasing row order (pair (tr, tc) before (tr + 1, tc), and within a
    pair by increasing key, hence row), so sorting the entries by column alone, stably,
    is the general code's sort by (column, row).
    """
    n = codes_arr.shape[1]
    rows, cols, nblk = [], [], []
    nvals = 0
    # (array methods and plain assignment where a NumPy function with out= or dtype=
    # would cost microseconds in dispatch: the arrays here are small)
    for i, (tr, tc) in enumerate(pairs):
        if tr == tc:
            nb = nl[tr]
            row = rowoff[i]
            row[...] = codes_arr[tr]
            if nvals:
                row += nvals
            seg = np.arange(uoff[tr], uoff[tr] + nb, dtype=np.int64)
            rows.append(seg)
            cols.append(seg)
        else:
            key = codes_arr[tr].astype(np.int64)
            key *= nl[tc]
            key += codes_arr[tc]
            size = nl[tr] * nl[tc]
            if size <= 4 * n + 1024:
                # _unique_inverse's presence table, its rank shifted to the offsets; the
                # table as (level r, level c) gives the levels of the pairs, in key order
                present = np.zeros(size, dtype=bool)
                present[key] = True
                rank = np.add.accumulate(present, dtype=np.int64)
                rank += nvals - 1
                rank.take(key, out=rowoff[i])
                lr, lc = present.reshape(nl[tr], nl[tc]).nonzero()
            else:
                uniq, inverse = _unique_inverse(key, size)
                inverse += nvals
                rowoff[i] = inverse
                lr, lc = np.divmod(uniq, nl[tc])
            nb = len(lr)
            lr += uoff[tr]
            lc += uoff[tc]
            rows.append(lr)
            cols.append(lc)
        nblk.append(nb)
        nvals += nb
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    order = cols.argsort(kind="stable")
    pos = np.empty(nvals, np.int64)
    pos[order] = np.arange(nvals, dtype=np.int64)
    q = uoff[-1] + nl[-1]
    indptr = np.empty(q + 1, dtype=np.int32)
    indptr[0] = 0
    indptr[1:] = np.add.accumulate(np.bincount(cols, minlength=q))
    blk_tr = pair_tr.repeat(nblk)
    blk_tc = pair_tc.repeat(nblk)
    return dict(blk_off=np.arange(nvals, dtype=np.int64), blk_tr=blk_tr, blk_tc=blk_tc,
                blk_diag=(blk_tr == blk_tc).view(np.int8), nvals=int(nvals),
                indptr=indptr, indices=rows[order].astype(np.int32), pos=pos)


def _offsets(sizes):
    """Exclusive cumulative sums: where each of a run of sizes starts."""
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


def _unique_inverse(key, size):
    """``numpy.unique(key, return_inverse=True)`` for keys in ``[0, size)``.

    A presence table when it is no larger than a few times the number of keys (linear
    time, as in the formula layer's ``_group_codes``), else ``numpy.unique``.
    """
    if size <= 4 * len(key) + 1024:
        present = np.zeros(size, dtype=bool)
        present[key] = True
        uniq = np.flatnonzero(present)
        rank = np.cumsum(present, dtype=np.int64)
        rank -= 1
        return uniq.astype(np.int64, copy=False), rank[key]
    uniq, inverse = np.unique(key, return_inverse=True)
    return uniq, inverse.reshape(-1)


@functools.lru_cache(maxsize=64)
def _entry_grid(kr, kc):
    """Row and column within a kr-by-kc block of each entry, in block entry order
    (``a + d * kr``, column-major)."""
    a = np.tile(np.arange(kr), kc)
    d = np.repeat(np.arange(kc), kr)
    entry = a + d * kr
    a.flags.writeable = d.flags.writeable = entry.flags.writeable = False   # shared
    return a, d, entry


def _csc_lower(blocks, kk, uoff, nvals):
    """CSC pattern of M's lower triangle, and the map from block values to CSC slots."""
    rows = np.empty(nvals, np.int64)
    cols = np.empty(nvals, np.int64)
    for tr, tc, lr, lc, offsets in blocks:
        kr, kc = int(kk[tr]), int(kk[tc])
        if kr == kc == 1:
            rows[offsets] = uoff[tr] + lr
            cols[offsets] = uoff[tc] + lc
            continue
        a, d, entry = _entry_grid(kr, kc)
        slots = offsets[:, None] + entry[None, :]
        rows[slots] = (uoff[tr] + lr * kr)[:, None] + a[None, :]
        cols[slots] = (uoff[tc] + lc * kc)[:, None] + d[None, :]
    pos = np.full(nvals, -1, np.int64)
    if all(int(k) == 1 for k in kk):
        # scalar terms: every block entry is on or below the diagonal
        order = np.lexsort((rows, cols))
        kept = order
        rows_kept = rows[order]
        cols_kept = cols
    else:
        keep = np.flatnonzero(rows >= cols)
        order = np.lexsort((rows[keep], cols[keep]))
        kept = keep[order]
        rows_kept = rows[kept]
        cols_kept = cols[keep]
    pos[kept] = np.arange(len(kept))
    # the last block is the last term's diagonal one, with every level: it ends at q
    tr, _, lr, _, _ = blocks[-1]
    q = int(uoff[tr]) + int(kk[tr]) * len(lr)
    counts = np.bincount(cols_kept, minlength=q)
    indptr = np.empty(q + 1, dtype=np.int32)
    indptr[0] = 0
    np.cumsum(counts, out=indptr[1:])
    indices = rows_kept.astype(np.int32)
    return indptr, indices, pos


# -- the level-only structure (out-of-core fitting) ----------------------------------------
@dataclass(frozen=True)
class BlockStructure:
    """The block structure of Z'WZ from levels alone: which level pairs share a row.

    Everything :class:`BlockPattern` holds except the per-row data (``zcat``, ``codes``,
    ``rowoff``): the per-θ code (``ThetaFactorizer``, the CHOLMOD pattern) needs only
    this, and an out-of-core fit never holds the rows. Blocks are laid out exactly as
    :func:`build_pattern` lays them out for the same level pairs (pairs of terms in the
    same order, the blocks of a term pair in increasing key order), so the values
    array, the CSC pattern and CHOLMOD's ordering are the in-memory ones.

    Attributes
    ----------
    kk, nlev, uoff, zoff, pair_tr, pair_tc, blk_off, blk_tr, blk_tc, blk_diag, nvals,
    indptr, indices, pos : as in :class:`BlockPattern`
    pair_keys : list of int64 arrays
        Per term pair, the sorted keys ``level_r * nlev[tc] + level_c`` of its blocks;
        None for a diagonal pair (every level of the term is a block).
    pair_start : int64 array
        Offset in ``avals`` of each term pair's first block.
    """

    kk: np.ndarray
    nlev: np.ndarray
    uoff: np.ndarray
    zoff: np.ndarray
    pair_tr: np.ndarray
    pair_tc: np.ndarray
    pair_keys: list
    pair_start: np.ndarray
    blk_off: np.ndarray
    blk_tr: np.ndarray
    blk_tc: np.ndarray
    blk_diag: np.ndarray
    nvals: int
    indptr: np.ndarray | None
    indices: np.ndarray | None
    pos: np.ndarray | None

    q = BlockPattern.q
    nterm = BlockPattern.nterm
    blockdiagonal = BlockPattern.blockdiagonal

    def for_rows(self):
        """This structure without the per-block arrays and the CSC pattern: what a chunk of
        rows needs to find its blocks (``row_offsets``, ``nvals``, ``q``), to ship to
        workers (the per-block arrays are several times the size of the level pairs)."""
        import dataclasses

        return dataclasses.replace(self, blk_off=None, blk_tr=None, blk_tc=None, blk_diag=None,
                                   indptr=None, indices=None, pos=None)

    def row_offsets(self, codes):
        """``rowoff`` for a chunk of rows: where each row adds to each term pair's blocks.

        Parameters
        ----------
        codes : (nterm, n) int array
            The chunk's level codes, in term order (global levels).

        Returns
        -------
        (npair, n) int64 array, C-contiguous (what ``accumulate_blocks`` reads).

        Raises
        ------
        ValueError
            When a row pairs two levels this structure has no block for (the chunk is
            not part of the data the structure was learned from).
        """
        codes = np.asarray(codes)
        n = codes.shape[1]
        out = np.empty((len(self.pair_tr), n), dtype=np.int64)
        for p, (tr, tc) in enumerate(zip(self.pair_tr.tolist(), self.pair_tc.tolist())):
            size = int(self.kk[tr]) * int(self.kk[tc])
            if tr == tc:
                out[p] = self.pair_start[p] + codes[tr].astype(np.int64) * size
                continue
            keys = self.pair_keys[p]
            key = codes[tr].astype(np.int64) * int(self.nlev[tc]) + codes[tc]
            idx = np.searchsorted(keys, key)
            if n and (idx.max() >= len(keys) or not np.array_equal(keys[idx], key)):
                raise ValueError("rows pair levels that the block structure has no block for; "
                                 "it was learned from other data")
            out[p] = self.pair_start[p] + idx * size
        return out


def pair_keys_of(codes, nlevels):
    """The sorted distinct level-pair keys of every off-diagonal term pair in a chunk.

    Parameters
    ----------
    codes : (nterm, n) int array, in term order
    nlevels : per term

    Returns
    -------
    dict (tr, tc) -> int64 array of ``level_r * nlevels[tc] + level_c``, for tr > tc:
    what :func:`build_structure` needs, and what chunks unite by ``numpy.union1d``.
    """
    codes = np.asarray(codes)
    out = {}
    for tr in range(codes.shape[0]):
        for tc in range(tr):
            key = codes[tr].astype(np.int64) * int(nlevels[tc]) + codes[tc]
            out[(tr, tc)] = np.unique(key)
    return out


def build_structure(kk, nlevels, pair_keys):
    """The level-only block structure from the level pairs that share a row.

    Parameters
    ----------
    kk, nlevels : per term (in term order), columns and levels
    pair_keys : dict (tr, tc) -> sorted int64 keys, for every tr > tc
        (:func:`pair_keys_of`, united over all chunks of the data)

    Returns
    -------
    BlockStructure
        The same blocks, values layout and CSC pattern as :func:`build_pattern` gives
        for rows with these level pairs.
    """
    kk = np.asarray(kk, dtype=np.int32)
    nlev = np.asarray(nlevels, dtype=np.int32)
    nterm = len(kk)
    uoff = np.concatenate([[0], np.cumsum(kk.astype(np.int64) * nlev)[:-1]]).astype(np.int64)
    zoff = np.concatenate([[0], np.cumsum(kk)[:-1]]).astype(np.int32)
    pairs, keys_out, starts, blocks = [], [], [], []
    nvals = 0
    for tr in range(nterm):
        for tc in range(tr + 1):
            if tr == tc:
                lr = lc = np.arange(nlev[tr], dtype=np.int64)
                keys = None
            else:
                keys = np.asarray(pair_keys[(tr, tc)], dtype=np.int64)
                lr, lc = keys // nlev[tc], keys % nlev[tc]
            size = int(kk[tr]) * int(kk[tc])
            offsets = nvals + np.arange(len(lr), dtype=np.int64) * size
            pairs.append((tr, tc))
            keys_out.append(keys)
            starts.append(nvals)
            blocks.append((tr, tc, lr, lc, offsets))
            nvals += len(lr) * size
    blk_off = np.concatenate([b[4] for b in blocks])
    blk_tr = np.concatenate([np.full(len(b[2]), b[0], np.int32) for b in blocks])
    blk_tc = np.concatenate([np.full(len(b[2]), b[1], np.int32) for b in blocks])
    indptr = indices = pos = None
    if nterm > 1:
        indptr, indices, pos = _csc_lower(blocks, kk, uoff, nvals)
    return BlockStructure(
        kk=kk, nlev=nlev, uoff=uoff, zoff=zoff,
        pair_tr=np.array([p[0] for p in pairs], np.int32),
        pair_tc=np.array([p[1] for p in pairs], np.int32),
        pair_keys=keys_out, pair_start=np.array(starts, dtype=np.int64),
        blk_off=blk_off, blk_tr=blk_tr, blk_tc=blk_tc,
        blk_diag=(blk_tr == blk_tc).astype(np.int8),
        nvals=int(nvals), indptr=indptr, indices=indices, pos=pos,
    )

"""Sufficient statistics of a linear mixed model, chunk by chunk of rows (no Dask here).

An LMM's profiled deviance sees the data only through the cross-products of [Z X̃ y]
(see _linalg/system.py). Each of them is a sum over rows, so it can be computed for a
chunk of rows (a Dask partition) and the chunks' sums added, as long as every chunk
codes its rows the same way: the same levels in the same order for every grouping
factor and categorical predictor, the same fixed-effects columns, the same working basis
X̃ = X R̃⁻¹, and the same block layout of Z'WZ. Three passes over the chunks give that:

1. ``scan_chunk``: which rows are used (the formula layer's rule for missing values,
   then rows of zero weight dropped as an LMM does) and the distinct values of every
   categorical column among them. ``Scan.merge`` unites chunks; ``Schema.from_scan``
   orders the levels by the formula layer's own rules (``_columns.factorize`` and
   ``_design._group_codes`` run on the distinct values) and builds the model matrices'
   codings from a small *template* frame holding every level.
2. ``keys_and_r``: per chunk, the level pairs that share a row (the block pattern of
   Z'Z between crossed terms) and the R of a QR of [X y] (TSQR: the R of the stacked
   R's is the R of all rows). From R: the aliased columns, R̃ of the kept ones and the
   OLS coefficients the starting values use.
3. ``chunk_products``: per chunk, Z'WZ in the global block layout, Z'W[X̃ y],
   [X̃ y]'W[X̃ y], and per level the unweighted moments the starting values need.

Everything a chunk returns is bounded by the number of levels (and level pairs) and the
number of columns, never by the number of rows; merging is a sum or a union, so the
partial results reduce as a tree.
"""
import dataclasses
import math
import warnings

import numpy as np
import pandas as pd

from .._linalg import _blocked
from .._linalg._pattern import pair_keys_of, term_order
from ..formula._columns import ColumnCache, column, encode, factorize
from ..formula._columns import as_float as _as_float
from ..formula._columns import is_numeric as _is_numeric
from ..formula._contrasts import normalize_coding
from ..lmm import relative_covariance_of_levels
from ..formula._design import (_aliased_columns, _float_values, _group_codes, _model_columns,
                               _offset_part, _or, _parse, _part, _response, _y_from,
                               build_design)

# patsy transforms that learn from the rows they see (a mean, a standard deviation):
# chunk by chunk they would learn each chunk's own
_STATEFUL = ("center(", "standardize(", "scale(")

# rows kept per chunk as examples of complete numeric values (for the template)
_SAMPLE_ROWS = 4


class OutOfCoreError(RuntimeError):
    """What an out-of-core fit cannot give: it holds cross-products, not rows."""


# -- what the formula reads ------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """Which columns a formula reads from a frame, and how (from the frame's dtypes).

    Attributes
    ----------
    formula : str
    parsed : ParsedFormula
    read : list of str
        Every column the model reads (response, model matrices, grouping, weights,
        offset), the formula layer's order for the missing-value message.
    categorical : list of str
        Columns the model matrices read as categorical (all levels go in the template).
    grouping : list of tuple of str
        Each random-effects term's grouping columns (in the order written).
    group_columns : list of str
        The grouping columns, each once.
    weights, offset : str or None
        Column names.
    """

    formula: str
    parsed: object
    contrasts: dict
    read: list
    categorical: list
    grouping: list
    group_columns: list
    weights: str | None
    offset: str | None
    response_column: str | None

    @classmethod
    def from_meta(cls, formula, meta, contrasts=None, weights=None, offset=None):
        """The plan of ``formula`` for frames like ``meta`` (an empty pandas frame)."""
        for what, value in (("weights", weights), ("offset", offset)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{what} of an out-of-core fit must be a column name of the "
                                f"Dask DataFrame, not {type(value).__name__}")
        text = formula if isinstance(formula, str) else str(formula)
        for name in _STATEFUL:
            if name in text.replace(" ", ""):
                raise ValueError(f"{name[:-1]}() learns from the rows it sees; an out-of-core "
                                 "fit sees them chunk by chunk, so it cannot use it: transform "
                                 "the column in the Dask DataFrame first")
        parsed = _parse(formula)
        if parsed.counts is not None:
            raise ValueError(f"the response {parsed.response!r} is a cbind() of counts: fit it "
                             "with family=Binomial() (out-of-core fits are linear mixed models)")
        if not parsed.random:
            raise ValueError(f"formula {formula!r} has no random-effects term like (1 | g); "
                             "fit a fixed-effects model with another library")
        codings = {name: normalize_coding(c) for name, c in (contrasts or {}).items()}
        columns = meta.columns
        cache = ColumnCache(meta)
        used = []
        _, _, resp_col = _response(parsed.response, meta, used, formula, cache)
        if resp_col is not None and not cache.is_numeric(resp_col):
            raise ValueError(
                f"response '{resp_col}' is not numeric; a linear mixed model needs a numeric "
                "response (out-of-core fits are linear mixed models)")
        parts = [_part(parsed.fixed, formula, "the fixed-effects part", columns, True)]
        parts += [_offset_part(e, formula, columns, True) for e in parsed.offsets]
        parts += [_part(t.expr, formula, f"random-effects term {t.text}", columns, True)
                  for t in parsed.random]
        for t in parsed.random:
            for g in t.grouping:
                if g not in columns:
                    raise ValueError(f"column {g!r} not found in data")
        matrix_cols, group_cols = _model_columns(parts, parsed, codings)
        categorical = [c for c in matrix_cols
                       if codings.get(c) is not None or not cache.is_numeric(c)]
        read = list(dict.fromkeys(used + matrix_cols + group_cols))
        for label in (weights, offset):
            if label is not None:
                if label not in columns:
                    raise ValueError(f"column {label!r} not found in data")
                if not _is_numeric(column(meta, label)):
                    raise ValueError(f"{'weights' if label == weights else 'offset'} column "
                                     f"{label!r} must be numeric")
        for c in categorical + group_cols:
            dtype = meta[c].dtype
            if isinstance(dtype, pd.CategoricalDtype) and dtype.categories is not None and (
                    len(dtype.categories) == 1 and dtype.categories[0] == "__UNKNOWN_CATEGORIES__"):
                raise ValueError(
                    f"column {c!r} is categorical with unknown categories, so its level order "
                    f"is not defined: make them known first (ddf[{c!r}] = "
                    f"ddf[{c!r}].cat.as_known())")
        return cls(formula=formula, parsed=parsed, contrasts=contrasts, read=read,
                   categorical=categorical, grouping=[tuple(t.grouping) for t in parsed.random],
                   group_columns=group_cols, weights=weights, offset=offset,
                   response_column=resp_col)

    @property
    def columns(self):
        """Every column a chunk must hold."""
        extra = [c for c in (self.weights, self.offset) if c is not None]
        return list(dict.fromkeys(self.read + extra))

    def rows_used(self, frame):
        """Which rows of a chunk the model uses, as the in-memory fit decides.

        Returns
        -------
        mask : bool ndarray
            Complete rows (no missing or non-finite value in a column the model reads,
            nor in the response expression) with a non-zero weight.
        missing : dict name -> int
            Rows missing in each column (the response expression last), in the formula
            layer's order.
        bad : int
            Rows dropped for missing values.
        zero : int
            Complete rows dropped for a weight of zero.
        """
        n = len(frame)
        cache = ColumnCache(frame)
        bad_by = {}
        _, resp_bad, _ = _response(self.parsed.response, frame, [], self.formula, cache)
        for name in self.read:
            bad_by[name] = cache.missing(name)
        w = None
        if self.weights is not None:
            w = _as_float(column(frame, self.weights))
            bad_by[self.weights] = _or(bad_by.get(self.weights), np.isnan(w))
        if self.offset is not None:
            o = _as_float(column(frame, self.offset))
            bad_by[self.offset] = _or(bad_by.get(self.offset), ~np.isfinite(o))
        bad = np.zeros(n, dtype=bool)
        for mask in bad_by.values():
            if mask is not None:
                bad |= mask
        # the response expression can be undefined where its columns are fine (0 / 0)
        if resp_bad is not None and (resp_bad & ~bad).any():
            bad_by[self.parsed.response] = resp_bad
            bad |= resp_bad
        missing = {name: 0 if mask is None else int(mask.sum()) for name, mask in bad_by.items()}
        keep = ~bad
        zero = 0
        if w is not None:
            wk = w[keep]
            invalid = ~np.isfinite(wk) | (wk < 0)
            if invalid.any():
                name = f"weights column {self.weights!r}"
                raise ValueError(f"{name} must be finite and non-negative; {int(invalid.sum())} "
                                 f"value(s) are not, e.g. {wk[invalid][:5].tolist()}")
            zero_rows = keep & (w == 0)
            zero = int(zero_rows.sum())
            keep &= ~zero_rows
        return keep, missing, int(bad.sum()), zero


# -- pass 1: rows used and levels ------------------------------------------------------
@dataclasses.dataclass
class Scan:
    """What pass 1 learns from some chunks: rows, missing values, distinct values.

    Attributes
    ----------
    rows : int
        Rows read.
    used : list of int
        Rows used, per chunk (in chunk order).
    bad, zero : int
        Rows dropped for missing values, and for zero weight.
    missing : dict name -> int
    values : dict column -> pandas.Series
        Distinct values among the rows used, of every categorical or grouping column.
    combos : dict tuple of columns -> pandas.DataFrame
        Distinct combinations, for grouping factors of several columns.
    sample : pandas.DataFrame
        A few used rows (the template's numeric values).
    """

    rows: int
    used: list
    bad: int
    zero: int
    missing: dict
    values: dict
    combos: dict
    sample: pd.DataFrame

    @staticmethod
    def merge(scans):
        """One Scan for several (in chunk order): sums and unions."""
        scans = list(scans)
        first = scans[0]
        missing = {}
        for s in scans:
            for name, count in s.missing.items():
                missing[name] = missing.get(name, 0) + count
        values = {c: _distinct(pd.concat([s.values[c] for s in scans], ignore_index=True))
                  for c in first.values}
        combos = {g: pd.concat([s.combos[g] for s in scans], ignore_index=True)
                  .drop_duplicates(ignore_index=True) for g in first.combos}
        sample = pd.concat([s.sample for s in scans], ignore_index=True).iloc[:_SAMPLE_ROWS]
        return Scan(rows=sum(s.rows for s in scans), used=[u for s in scans for u in s.used],
                    bad=sum(s.bad for s in scans), zero=sum(s.zero for s in scans),
                    missing=missing, values=values, combos=combos, sample=sample)


def _distinct(series):
    return series.drop_duplicates(ignore_index=True)


def scan_chunk(frame, plan):
    """Pass 1 over one chunk (a pandas DataFrame): a :class:`Scan`."""
    frame = _plain(frame, plan)
    keep, missing, bad, zero = plan.rows_used(frame)
    used = frame.loc[keep] if not keep.all() else frame
    values = {c: _distinct(used[c].reset_index(drop=True))
              for c in dict.fromkeys(plan.categorical + plan.group_columns)}
    combos = {g: used[list(g)].drop_duplicates(ignore_index=True)
              for g in dict.fromkeys(plan.grouping) if len(g) > 1}
    return Scan(rows=len(frame), used=[int(keep.sum())], bad=bad, zero=zero, missing=missing,
                values=values, combos=combos,
                sample=used.iloc[:_SAMPLE_ROWS].reset_index(drop=True))


def _plain(frame, plan):
    """The chunk's columns the model reads, with a fresh RangeIndex."""
    frame = frame[plan.columns]
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.start != 0:
        frame = frame.reset_index(drop=True)
    return frame


# -- the schema: levels, codings, the template ----------------------------------------------
class Schema:
    """The coding every chunk shares: levels, model-matrix builders, term order.

    Built once from the merged :class:`Scan` (levels bounded by their number, never the
    rows); it travels to the workers with every pass after the first.

    Attributes
    ----------
    plan : Plan
    design : formula.Design
        The design of the template frame (every level of every categorical column in a
        model matrix), whose builders (``_fixed.build``, ``ReTerm.new_codes``,
        ``offset_for``) code a chunk as the in-memory fit codes all rows.
    reterms : list of ReTerm
        The random-effects terms in the order written, with the levels of all rows.
    order : list of int
        Term order (decreasing number of levels, as in memory).
    """

    def __init__(self, plan, design, reterms):
        self.plan = plan
        self.design = design
        self.reterms = reterms
        self.order = term_order([t.nlevels for t in reterms])
        self.p_full = len(design._fixed.names)

    @classmethod
    def from_scan(cls, plan, scan, na_action="drop"):
        """Levels in the formula layer's order, and the template design.

        Warns (or raises, with ``na_action="raise"``) about dropped rows as the in-memory
        fit does, with the counts of all chunks.
        """
        _report_dropped(plan, scan, na_action)
        # every level of every grouping factor, ordered by the formula layer's rules
        levels = {c: factorize(scan.values[c])[1] for c in plan.group_columns}
        groups = []
        for term, grouping in zip(plan.parsed.random, plan.grouping):
            if len(grouping) == 1:
                factors = [(np.arange(len(levels[grouping[0]])), levels[grouping[0]])]
            else:
                combos = scan.combos[grouping]
                factors = []
                for g in grouping:
                    codes, unseen = encode(combos[g], levels[g])
                    assert not unseen
                    factors.append((codes, levels[g]))
            _, labels, components, steps = _group_codes(factors)
            if len(labels) < 2:
                raise ValueError(f"grouping factor {term.group_name!r} has a single level")
            groups.append((labels, components, steps))
        template = _template(plan, scan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            design = build_design(plan.formula, template, contrasts=plan.contrasts,
                                  weights=plan.weights, offset=plan.offset, na_action="raise")
        reterms = [dataclasses.replace(t, codes=np.zeros(0, np.int32),
                                       z=np.zeros((0, t.ncols)), levels=list(labels),
                                       _components=components, _steps=steps)
                   for t, (labels, components, steps) in zip(design.reterms, groups)]
        return cls(plan, design, reterms)

    def rows(self, frame):
        """A chunk's rows as the model sees them (a :class:`Rows`)."""
        plan = self.plan
        frame = _plain(frame, plan)
        keep, _, _, _ = plan.rows_used(frame)
        if not keep.all():
            frame = frame.loc[keep].reset_index(drop=True)
        n = len(frame)
        d = self.design
        X = d._fixed.build(frame) if n else np.zeros((0, self.p_full))
        cache = ColumnCache(frame)
        series, _, col = _response(plan.parsed.response, frame, [], plan.formula, cache)
        y = (np.array(_float_values(series), dtype=np.float64) if col is not None
             else _y_from(series, plan.parsed.response)[0])
        offset = None
        if plan.offset is not None:
            offset = np.array(_as_float(column(frame, plan.offset)), dtype=np.float64)
        if n:
            formula_offset = d.offset_for(frame)
            if formula_offset is not None:
                offset = formula_offset if offset is None else offset + formula_offset
        w = None
        if plan.weights is not None:
            w = np.array(_as_float(column(frame, plan.weights)), dtype=np.float64)
        codes, z = [], []
        for t in self.reterms:
            if n:
                c, zt = t.new_codes(frame)
                if c.size and c.min() < 0:
                    raise ValueError(f"grouping factor {t.group_name!r} has a level that the "
                                     "first pass did not see: the data changed between passes")
            else:
                c, zt = np.zeros(0, np.int32), np.zeros((0, t.ncols))
            codes.append(c)
            z.append(np.ascontiguousarray(zt, dtype=np.float64))
        return Rows(X=np.ascontiguousarray(X, dtype=np.float64), y=y, offset=offset, w=w,
                    codes=codes, z=z)


@dataclasses.dataclass
class Rows:
    """One chunk's rows as the model sees them (terms in the order written)."""

    X: np.ndarray           # all fixed-effects columns, before aliased ones are dropped
    y: np.ndarray
    offset: np.ndarray | None
    w: np.ndarray | None
    codes: list
    z: list

    @property
    def y_fit(self):
        return self.y if self.offset is None else self.y - self.offset


def _report_dropped(plan, scan, na_action):
    if scan.bad:
        cols = [name for name, count in scan.missing.items() if count]
        if na_action == "raise":
            raise ValueError(f"{scan.bad} row(s) have missing or non-finite values in "
                             f"column(s) {cols}")
        if scan.bad == scan.rows:
            raise ValueError(f"all {scan.bad} rows have missing or non-finite values "
                             f"(column(s) {cols})")
        warnings.warn(f"dropped {scan.bad} of {scan.rows} row(s) with missing or non-finite "
                      f"values in column(s) {cols}", stacklevel=4)
    if scan.zero:
        warnings.warn(f"dropped {scan.zero} of {scan.rows - scan.bad} row(s) with zero weight: "
                      "they carry no information about the model", stacklevel=4)
    if sum(scan.used) == 0:
        raise ValueError("no rows left to fit")


def _template(plan, scan):
    """A small frame holding every level of every categorical model-matrix column, two
    levels of every other grouping column, and used rows' values elsewhere."""
    sizes = [len(scan.values[c]) for c in plan.categorical]
    size = max([2] + sizes)
    index = np.arange(size)
    sample = scan.sample
    cols = {}
    for c in plan.columns:
        if c in plan.categorical:
            vals = scan.values[c]
        elif c in plan.group_columns:
            vals = scan.values[c].iloc[:2]
        else:
            vals = sample[c]
        cols[c] = vals.iloc[index % len(vals)].reset_index(drop=True)
    return pd.DataFrame(cols)


# -- pass 2: level pairs and the R of [X y] ---------------------------------------------
@dataclasses.dataclass
class KeysAndR:
    """Pass 2's result for some chunks: level pairs, R of [X y], the range of y."""

    keys: dict
    r: np.ndarray
    ymin: float
    ymax: float

    @staticmethod
    def merge(parts):
        parts = list(parts)
        keys = {k: _union([p.keys[k] for p in parts]) for k in parts[0].keys}
        return KeysAndR(keys=keys, r=_stacked_r([p.r for p in parts]),
                        ymin=min(p.ymin for p in parts), ymax=max(p.ymax for p in parts))


def _union(arrays):
    return np.unique(np.concatenate(arrays))


def _stacked_r(rs):
    """The R of the rows whose chunks' R's are ``rs`` (TSQR's reduction step)."""
    stacked = np.vstack(rs)
    m = stacked.shape[1]
    r = np.linalg.qr(stacked, mode="r") if stacked.shape[0] else np.zeros((0, m))
    return r[:m]


def keys_and_r(frame, schema):
    """Pass 2 over one chunk: a :class:`KeysAndR`."""
    rows = schema.rows(frame)
    nlev = [schema.reterms[i].nlevels for i in schema.order]
    codes = np.vstack([rows.codes[i] for i in schema.order]) if rows.y.size else (
        np.zeros((len(nlev), 0), np.int32))
    keys = pair_keys_of(codes, nlev)
    y = rows.y_fit
    xy = np.column_stack([rows.X, y])
    return KeysAndR(keys=keys, r=_stacked_r([xy]),
                    ymin=float(y.min()) if y.size else math.inf,
                    ymax=float(y.max()) if y.size else -math.inf)


@dataclasses.dataclass
class Basis:
    """The fixed-effects basis from the R of [X y] (pass 2), as ``FixedEffectsBasis``
    would compute it from X: the kept columns, R̃, R̃⁻¹, log|det R̃| and the OLS
    coefficients in the working basis."""

    keep: np.ndarray
    dropped: list
    R: np.ndarray
    Rinv: np.ndarray
    logabsdet: float
    beta_ols: np.ndarray
    n: int

    @classmethod
    def from_r(cls, r, n, names):
        p_full = len(names)
        rx = r[:p_full, :p_full]
        aliased = _aliased_columns(rx, gram=rx.T @ rx) if n else []
        dropped = [names[j] for j in aliased]
        if dropped:
            warnings.warn("fixed-effects model matrix is rank deficient; dropping aliased "
                          f"columns: {dropped}", stacklevel=4)
        keep = np.setdiff1d(np.arange(p_full), aliased).astype(np.intp)
        p = len(keep)
        cols = np.concatenate([keep, [p_full]])
        rk = np.linalg.qr(r[:, cols], mode="r")[:p + 1]
        signs = np.where(np.diag(rk)[:p] < 0, -1.0, 1.0)
        scale = math.sqrt(max(n, 1))
        R = (rk[:p, :p] * signs[:, None]) / scale
        beta_ols = signs * rk[:p, p] / scale
        Rinv = np.empty((p, p))
        rc = np.ascontiguousarray(R)
        for j in range(p):
            col = np.zeros(p)
            col[j] = 1.0
            _blocked.upper_solve(rc, col)
            Rinv[:, j] = col
        logabsdet = float(np.sum(np.log(np.abs(np.diag(R))))) if p else 0.0
        basis = cls(keep=keep, dropped=dropped, R=R, Rinv=Rinv, logabsdet=logabsdet,
                    beta_ols=beta_ols, n=int(n))
        basis._warn_near_alias(rk[:p, :p], [names[j] for j in keep])
        return basis

    def _warn_near_alias(self, rk, names):
        # FixedEffectsBasis's warning, from R: X's column norms are R's
        from .._fixed import NEAR_ALIAS

        p = len(names)
        if not p:
            return
        scale = math.sqrt(max(self.n, 1))
        norms = np.linalg.norm(rk, axis=0) / scale
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.abs(np.diag(self.R)) / norms
        bad = [j for j in range(p) if norms[j] > 0 and ratio[j] < NEAR_ALIAS]
        if bad:
            worst = float(np.min(ratio[bad]))
            warnings.warn(
                f"fixed-effects column(s) {[names[j] for j in bad]} are nearly collinear with "
                f"the columns before them (only {worst:.2g} of the norm is orthogonal to "
                "them): the likelihood is computed stably, but their coefficients and standard "
                f"errors carry about {max(0, int(-np.log10(worst)))} fewer significant digits; "
                "centring or rescaling those predictors would restore them", stacklevel=5)

    def fixed_effects_basis(self):
        """A ``FixedEffectsBasis`` with R̃ and no rows (``X`` is None)."""
        from .._fixed import FixedEffectsBasis

        basis = object.__new__(FixedEffectsBasis)
        basis.p = len(self.keep)
        basis.X = None
        basis.R = self.R.copy()
        basis.Rinv = self.Rinv.copy()
        basis.logabsdet = self.logabsdet
        return basis


# -- pass 3: the cross-products -----------------------------------------------------------
@dataclasses.dataclass
class Products:
    """Pass 3's sums for some chunks.

    Attributes
    ----------
    avals : Z'WZ's blocks in the structure's layout; for one chunk that touches few of
        them, a pair (positions, values) of its non-zero entries instead (a chunk of a
        frame sorted by a grouping factor touches a small share of the level pairs)
    ztxy : (q, p + 1) Z'W[X̃ y], Fortran order
    xtxy : (p + 1, p + 1) [X̃ y]'W[X̃ y]
    start : per term (term order): (ztz (levels, k, k), ztr (levels, k), rr (levels,),
        nrow (levels,)), unweighted, with r the OLS residual: what the starting values use
    n : rows
    logw : Σ log w
    """

    avals: np.ndarray
    ztxy: np.ndarray
    xtxy: np.ndarray
    start: list
    n: int
    logw: float
    nvals: int = 0

    @staticmethod
    def merge(parts, nvals=None):
        parts = list(parts)
        out = parts[0]
        if nvals is None:
            nvals = next((p.avals.size for p in parts if not isinstance(p.avals, tuple)),
                         None)
        if nvals is None:
            nvals = parts[0].nvals
        avals = np.zeros(nvals)
        ztxy, xtxy = out.ztxy.copy(order="F"), out.xtxy.copy()
        start = [tuple(a.copy() for a in s) for s in out.start]
        _add_avals(avals, out.avals)
        for p in parts[1:]:
            _add_avals(avals, p.avals)
            ztxy += p.ztxy
            xtxy += p.xtxy
            for mine, theirs in zip(start, p.start):
                for a, b in zip(mine, theirs):
                    a += b
        return Products(avals=avals, ztxy=ztxy, xtxy=xtxy, start=start,
                        n=sum(p.n for p in parts), logw=sum(p.logw for p in parts),
                        nvals=nvals)

    def dense(self):
        """These products with ``avals`` as one array."""
        if not isinstance(self.avals, tuple):
            return self
        return Products.merge([self], self.nvals)


def _add_avals(acc, avals):
    if isinstance(avals, tuple):
        where, values = avals
        acc[where] += values          # positions are distinct within one chunk
    else:
        acc += avals


def chunk_products(frame, schema, structure, basis):
    """Pass 3 over one chunk: its :class:`Products` in the global layout."""
    rows = schema.rows(frame)
    n = rows.y.size
    order = schema.order
    kk = structure.kk
    codes = (np.ascontiguousarray(np.vstack([rows.codes[i] for i in order]), dtype=np.int32)
             if n else np.zeros((len(order), 0), np.int32))
    zcat = (np.ascontiguousarray(np.hstack([rows.z[i] for i in order]), dtype=np.float64)
            if n else np.zeros((0, int(np.sum(kk)))))
    p = len(basis.keep)
    xw = np.ascontiguousarray(rows.X[:, basis.keep] @ basis.Rinv) if p else np.zeros((n, 0))
    y = rows.y_fit
    xy = np.ascontiguousarray(np.column_stack([xw, y]), dtype=np.float64)
    m = xy.shape[1]
    w = np.zeros(0) if rows.w is None else np.ascontiguousarray(rows.w)
    avals = np.zeros(structure.nvals)
    ztxy = np.zeros((structure.q, m), order="F")
    xtxy = np.zeros((m, m))
    if n:
        rowoff = structure.row_offsets(codes)
        _blocked.accumulate_blocks(zcat, rowoff, structure.pair_tr, structure.pair_tc,
                                   structure.zoff, kk, w, avals)
        _blocked.accumulate_zt(zcat, codes, structure.uoff, structure.zoff, kk, w, xy, ztxy)
        _blocked.weighted_crossprod(xy, w, xtxy)
    # the starting values' moments: unweighted, r the OLS residual (as lmm.starting_theta)
    r = y - xw @ basis.beta_ols if p else y.copy()
    start = []
    for t, i in enumerate(order):
        k, nlev = int(kk[t]), int(structure.nlev[t])
        c, z = codes[t], rows.z[i]
        ztz = np.empty((nlev, k, k))
        ztr = np.empty((nlev, k))
        for a in range(k):
            ztr[:, a] = np.bincount(c, weights=z[:, a] * r, minlength=nlev)
            for e in range(a, k):
                ztz[:, a, e] = ztz[:, e, a] = np.bincount(c, weights=z[:, a] * z[:, e],
                                                          minlength=nlev)
        # (bincount of no rows gives integers)
        rr = np.bincount(c, weights=r * r, minlength=nlev).astype(np.float64)
        nrow = np.bincount(c, minlength=nlev).astype(np.float64)
        start.append((ztz, ztr, rr, nrow))
    logw = float(np.sum(np.log(rows.w))) if rows.w is not None and n else 0.0
    where = np.flatnonzero(avals)
    if where.size < structure.nvals // 4:
        avals = (where, avals[where])
    return Products(avals=avals, ztxy=ztxy, xtxy=xtxy, start=start, n=int(n), logw=logw,
                    nvals=structure.nvals)


def relative_covariance(ztz, ztr, rr, nrow, k):
    """``lmm._relative_covariance`` from per-level moments instead of rows: the residual
    sum of squares of the usable levels is Σ (r_l'r_l - 2 b_l'Z_l'r_l + b_l'Z_l'Z_l b_l),
    with as many rows as those levels hold (``rr``, ``nrow`` per level)."""
    def level_rss(usable, coef):
        cu, zu = coef[usable], ztr[usable]
        rss = float(np.sum(rr[usable]) - 2.0 * np.einsum("li,li->", cu, zu)
                    + np.einsum("li,lij,lj->", cu, ztz[usable], cu))
        return rss, float(np.sum(nrow[usable]))

    return relative_covariance_of_levels(ztz, ztr, level_rss)

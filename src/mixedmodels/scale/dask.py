"""Fitting a linear mixed model to a Dask DataFrame, by sufficient statistics.

Three passes over the partitions, each a map over partitions and a tree reduction
(``split_every`` partial results merged per task), run by whatever scheduler Dask has
(a ``dask.distributed.Client`` if one is active):

1. levels: the rows used and the distinct values of every categorical column
   (:func:`._stats.scan_chunk`); the client orders the levels by the formula layer's rules;
2. structure: the level pairs that share a row and the R of [X y]
   (:func:`._stats.keys_and_r`, a TSQR); the client drops aliased columns and sets up
   the fixed-effects basis X̃ = X R̃⁻¹ and the block structure of Z'WZ;
3. products: Z'WZ in that structure, Z'W[X̃ y] and [X̃ y]'W[X̃ y]
   (:func:`._stats.chunk_products`).

Then the fit is the in-memory one, in the client, from the summed cross-products:
nothing per θ touches the data. Peak memory is a partition's rows in each worker plus
partial sums the size of the structure (levels and level pairs), and the structure and
the factor in the client.
"""
import time

import numpy as np

from . import is_dask_frame
from ._model import OutOfCoreLinearMixedModel
from ._stats import (Basis, KeysAndR, Plan, Products, Scan, Schema, chunk_products,
                     keys_and_r, scan_chunk)


def _require_dask():
    try:
        import dask  # noqa: F401
        import dask.dataframe  # noqa: F401
    except ImportError as exc:   # pragma: no cover - only without the extra
        raise ImportError('fitting a Dask DataFrame needs the dask extra: '
                          'pip install "mixedmodels[dask]"') from exc




def _tree(parts, merge, split_every):
    """Merge delayed partial results ``split_every`` at a time, in order, to one."""
    from dask import delayed

    merge_d = delayed(merge, pure=True)
    level = list(parts)
    while len(level) > 1:
        level = [merge_d(level[i:i + split_every]) if len(level[i:i + split_every]) > 1
                 else level[i] for i in range(0, len(level), split_every)]
    return level[0]


def fit(formula, ddf, *, REML=False, weights=None, offset=None, contrasts=None,
        na_action="drop", progress=False, check_convergence=True, split_every=8):
    """Fit a linear mixed model to a Dask DataFrame, out of core.

    Parameters
    ----------
    formula : str
        As for :func:`mixedmodels.fit`.
    ddf : dask.dataframe.DataFrame
    REML, contrasts, na_action, progress : as for :func:`mixedmodels.fit`
    weights, offset : str, optional
        Column names of ``ddf`` (arrays cannot be matched to partitions).
    check_convergence : bool, default True
    split_every : int, default 8
        Partial results merged per task in the tree reductions.

    Returns
    -------
    OutOfCoreLinearMixedModelFit
        The in-memory fit's record (β, θ, σ, standard errors, VarCorr, ranef, summary,
        profiles, likelihood-ratio tests). Row-level results are lazy Dask arrays over
        ``ddf``; ``model.pass_seconds`` gives the time of each pass.

    Notes
    -----
    The numbers equal the in-memory fit's on the same rows up to the order in which
    the sums are added (tests/test_scale_dask.py holds them to 1e-8 relative).
    """
    _require_dask()
    import dask
    from dask import delayed

    if not is_dask_frame(ddf):
        raise TypeError(f"ddf must be a Dask DataFrame, not {type(ddf).__name__}")
    if na_action not in ("drop", "raise"):
        raise ValueError(f"na_action must be 'drop' or 'raise', not {na_action!r}")
    t0 = time.perf_counter()
    plan = Plan.from_meta(formula, ddf._meta, contrasts=contrasts, weights=weights,
                          offset=offset)
    frame = ddf[plan.columns]
    parts = frame.to_delayed()
    seconds = {}

    # pass 1: rows used, levels
    t = time.perf_counter()
    plan_d = delayed(plan, pure=True)
    scan = dask.compute(_tree([delayed(scan_chunk, pure=True)(p, plan_d) for p in parts],
                              Scan.merge, split_every))[0]
    schema = Schema.from_scan(plan, scan, na_action)
    seconds["levels"] = time.perf_counter() - t

    # pass 2: level pairs and the TSQR of [X y]
    t = time.perf_counter()
    schema_d = delayed(schema, pure=True)
    kr = dask.compute(_tree([delayed(keys_and_r, pure=True)(p, schema_d) for p in parts],
                            KeysAndR.merge, split_every))[0]
    n = int(sum(scan.used))
    if not kr.ymin < kr.ymax:
        what = "response" if not schema.design._offsets and plan.offset is None else (
            "response less its offset")
        raise ValueError(f"{what} '{schema.design.response_name}' is constant "
                         f"({kr.ymin:g}): there is no variance to partition")
    basis = Basis.from_r(kr.r, n, list(schema.design._fixed.names))
    from .._linalg._pattern import build_structure

    terms = [schema.reterms[i] for i in schema.order]
    structure = build_structure([t.ncols for t in terms], [t.nlevels for t in terms], kr.keys)
    seconds["structure"] = time.perf_counter() - t

    # pass 3: the cross-products
    t = time.perf_counter()
    structure_d, basis_d = delayed(structure.for_rows(), pure=True), delayed(basis, pure=True)
    products = dask.compute(_tree([delayed(chunk_products, pure=True)(p, schema_d, structure_d,
                                                                       basis_d) for p in parts],
                                  Products.merge, split_every))[0].dense()
    seconds["products"] = time.perf_counter() - t

    model = OutOfCoreLinearMixedModel(schema, basis, kr.keys, products, REML=REML,
                                      rows_per_chunk=scan.used,
                                      source=_Source(frame, schema, basis, scan.used),
                                      setup_seconds=None)
    seconds["setup"] = model.setup_seconds
    model.setup_seconds = time.perf_counter() - t0
    t = time.perf_counter()
    result = model.fit(progress=progress, check_convergence=check_convergence)
    seconds["fit"] = time.perf_counter() - t
    model.pass_seconds = seconds
    return result


# -- the rows, lazily ------------------------------------------------------------------------
def _rows_of(frame, schema, basis, kind):
    rows = schema.rows(frame)
    if kind == "y":
        return rows.y
    if kind == "y_fit":
        return rows.y_fit
    if kind == "X":
        return np.ascontiguousarray(rows.X[:, basis.keep])
    if kind == "Xw":
        return rows.X[:, basis.keep] @ basis.Rinv
    if kind == "w":
        return rows.w
    if kind == "offset":
        return rows.offset if rows.offset is not None else np.zeros(rows.y.size)
    what, i = kind
    if what == "codes":
        return rows.codes[i]
    return rows.z[i]


def _eta_of(frame, schema, basis, beta_w, blocks):
    rows = schema.rows(frame)
    eta = rows.X[:, basis.keep] @ basis.Rinv @ beta_w
    for i, blk in enumerate(blocks):
        eta = eta + np.einsum("ij,ij->i", rows.z[i], blk[rows.codes[i]])
    if rows.offset is not None:
        eta = eta + rows.offset
    return eta


class _Source:
    """The rows of the data frame as lazy Dask arrays, chunk sizes known from pass 1."""

    def __init__(self, frame, schema, basis, rows_per_chunk):
        self.frame = frame
        self.schema = schema
        self.basis = basis
        self.rows = list(rows_per_chunk)

    @classmethod
    def attach(cls, model, ddf):
        _require_dask()
        schema, basis = model._schema, model._basis
        frame = ddf[schema.plan.columns]
        if frame.npartitions != len(model.rows_per_chunk):
            raise ValueError(f"the data frame has {frame.npartitions} partitions; the model was "
                             f"fitted to {len(model.rows_per_chunk)}")
        return cls(frame, schema, basis, model.rows_per_chunk)

    def _concat(self, fn, args, width, dtype=float):
        import dask.array as da
        from dask import delayed

        shared = [delayed(a, pure=True) for a in args]
        arrays = []
        for part, n in zip(self.frame.to_delayed(), self.rows):
            shape = (n,) if width is None else (n, width)
            arrays.append(da.from_delayed(delayed(fn, pure=True)(part, *shared), shape=shape,
                                          dtype=dtype))
        return da.concatenate(arrays, axis=0)

    def array(self, kind):
        """One row-level quantity over all rows used, as a Dask array."""
        width = None
        dtype = float
        if kind in ("X", "Xw"):
            width = len(self.basis.keep)
        elif isinstance(kind, tuple):
            what, i = kind
            if what == "z":
                width = self.schema.reterms[i].ncols
            else:
                dtype = np.int32
        return self._concat(_rows_of, (self.schema, self.basis, kind), width, dtype)

    def linear_predictor(self, beta_w, b):
        """X̃β̃ + Zb (+ offset) over all rows, as a Dask array."""
        schema = self.schema
        blocks = [None] * len(schema.reterms)
        off = 0
        for i in schema.order:
            t = schema.reterms[i]
            k, nl = t.ncols, t.nlevels
            blocks[i] = np.asarray(b[off:off + k * nl]).reshape(nl, k)
            off += k * nl
        return self._concat(_eta_of, (schema, self.basis, np.asarray(beta_w), blocks), None)

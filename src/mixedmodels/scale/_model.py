"""A linear mixed model whose data are its cross-products: the out-of-core specification.

``OutOfCoreLinearMixedModel`` is a :class:`~mixedmodels.lmm.LinearMixedModel` built from
the sums of :mod:`._stats` rather than from a data frame. Everything per θ is the
in-memory code (the workspace is :meth:`BlockedSystem.from_structure` given the summed
cross-products), so ``objective``, ``fit``, ``profiled_parts``, ``deviance_at`` and what
is built on them (summary, standard errors, VarCorr, ranef, condvar, profiles,
likelihood-ratio statistics) are the in-memory ones.

What needs the rows is computed lazily against the Dask DataFrame the model was fitted
to, as Dask arrays: ``fit.y``, ``fit.X``, ``fit.fitted()``, ``fit.linpred()``,
``fit.residuals(kind)``, ``fit.predict()``. The row-level attributes of ``model.design``
and of the random-effects terms (which ``mm.lrtest``'s checks that two fits share their
data read) are computed from the data frame when read, as NumPy arrays. A pickled fit does not carry the data frame:
``fit.model.attach(ddf)`` gives those back. What would need the rows on every step —
``simulate``, ``bootstrap``, Kenward-Roger (``fit.Z``) — raises :class:`OutOfCoreError`.
"""
import dataclasses
import time

import numpy as np

from .._linalg._pattern import build_structure
from .._linalg.system import BlockedSystem, ThetaLayout
from ..formula._design import Design, ReTerm
from ..lmm import LinearMixedModel, LinearMixedModelFit, start_from_relative
from ._stats import OutOfCoreError, relative_covariance


def _no_rows(what):
    return OutOfCoreError(
        f"{what} of an out-of-core fit is computed from the rows of its Dask DataFrame, which "
        "this model no longer has (a pickled fit does not carry its data frame): attach it "
        "again with fit.model.attach(ddf)")


class _DropsSource:
    """Pickles without the attached Dask DataFrame (``attach`` restores it)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


class RowlessDesign(_DropsSource, Design):
    """A :class:`Design` without rows: levels, names and builders. ``y``, ``X``,
    ``weights`` and ``offset`` are read from the attached data frame when asked for (a
    NumPy array each time, nothing kept: code written for in-memory designs, such as
    ``mm.lrtest``'s same-data checks, reads them as arrays)."""

    def __repr__(self):
        return (f"RowlessDesign(formula={self.formula!r}, n={self.n}, "
                f"coef_names={self.coef_names})")

    def _rows(self, kind):
        if self._source is None:
            raise _no_rows(f"design.{kind}")
        return self._source.array(kind).compute()

    @property
    def y(self):
        return self._rows("y")

    @property
    def X(self):
        return self._rows("X")

    @property
    def weights(self):
        return self._rows("w") if self._weighted else None

    @property
    def offset(self):
        return self._rows("offset") if self._offset else None

    @property
    def rows_used(self):
        raise OutOfCoreError("rows_used: an out-of-core fit does not number the rows of its "
                             "Dask DataFrame (their count per partition is model.rows_per_chunk)")


class RowlessTerm(_DropsSource, ReTerm):
    """A random-effects term without rows: levels and builders; ``codes`` and ``z`` are
    read from the attached data frame when asked for (NumPy arrays, nothing kept)."""

    def __repr__(self):
        return (f"RowlessTerm(group_name={self.group_name!r}, nlevels={self.nlevels}, "
                f"cnames={self.cnames})")

    @property
    def ncols(self):
        return len(self.cnames)

    @property
    def codes(self):
        if self._source is None:
            raise _no_rows("the level codes of a random-effects term")
        return self._source.array(("codes", self._index)).compute()

    @property
    def z(self):
        if self._source is None:
            raise _no_rows("the columns of a random-effects term")
        return self._source.array(("z", self._index)).compute()


def _rowless(cls, template, props, **values):
    """An instance of a dataclass subclass whose row fields are properties."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(template):
        if f.name in props:
            continue
        object.__setattr__(obj, f.name, values.get(f.name, getattr(template, f.name)))
    for name, value in values.items():
        if name not in {f.name for f in dataclasses.fields(template)}:
            object.__setattr__(obj, name, value)
    return obj


class OutOfCoreLinearMixedModel(LinearMixedModel):
    """A linear mixed model specification from the sufficient statistics of its rows.

    Build it with :func:`mixedmodels.scale.dask.fit` (or ``mm.fit`` given a Dask
    DataFrame); the constructor takes what the passes over the data computed.

    Parameters
    ----------
    schema : _stats.Schema
        Levels and model-matrix builders shared by every chunk.
    basis : _stats.Basis
        The fixed-effects basis from the R of a TSQR of [X y].
    keys : dict
        The level pairs that share a row, per pair of terms (the block structure).
    products : _stats.Products
        The summed cross-products and the starting values' moments.
    REML : bool
    rows_per_chunk : list of int
        Rows used in each partition (the lazy row accessors' chunk sizes).
    source : object, optional
        The lazy view of the data frame (see dask.py); never pickled.
    """

    _transient = ("_workspace", "_Z", "_source")

    def __init__(self, schema, basis, keys, products, REML=False, rows_per_chunk=None,
                 source=None, setup_seconds=None):
        self._t0 = time.perf_counter()
        self.formula = schema.plan.formula
        self.REML = bool(REML)
        self._n = int(products.n)
        self._keys = keys
        self._schema = schema
        self._basis = basis
        self._products = products
        self.rows_per_chunk = list(rows_per_chunk or [])
        self._source = None
        self._weighted = schema.plan.weights is not None
        self._has_offset = bool(schema.plan.offset is not None or schema.design._offsets)
        d = schema.design
        terms = [_rowless(RowlessTerm, t, ("codes", "z"), _index=i, _source=None)
                 for i, t in enumerate(schema.reterms)]
        names = [d._fixed.names[j] for j in basis.keep]
        self.design = _rowless(RowlessDesign, d, ("y", "X", "weights", "offset", "rows_used"),
                               coef_names=names, dropped=list(basis.dropped), reterms=terms,
                               n=self._n, _keep=np.asarray(basis.keep), _source=None,
                               _weighted=self._weighted, _offset=self._has_offset)
        self.reterms = [terms[i] for i in schema.order]
        self.layout = ThetaLayout([t.ncols for t in self.reterms],
                                  [bool(t.zerocorr) for t in self.reterms])
        self.fixed = basis.fixed_effects_basis()
        self._basis_keep = np.asarray(basis.keep)
        self._workspace = None
        self._Z = None
        self._check_random_effects_count(strict=True)
        if self.REML and self.n <= self.p:
            raise ValueError(f"REML needs more observations ({self.n}) than fixed effects ({self.p})")
        self._logw = float(products.logw) if self._weighted else 0.0
        self._dfr = self.n - self.p if self.REML else self.n
        if source is not None:
            self._set_source(source)
        self.workspace
        self.setup_seconds = (time.perf_counter() - self._t0 if setup_seconds is None
                              else float(setup_seconds))

    # -- the workspace from the cross-products ----------------------------------------
    @property
    def workspace(self):
        """The blocked system over the level-only structure (rebuilt after unpickling)."""
        if self._workspace is None:
            kk = [t.ncols for t in self.reterms]
            nlev = [t.nlevels for t in self.reterms]
            structure = build_structure(kk, nlev, self._keys)
            ws = BlockedSystem.from_structure(structure, [bool(t.zerocorr) for t in self.reterms])
            pr = self._products
            ws.set_crossproducts(pr.avals, pr.ztxy, pr.xtxy)
            self._workspace = ws
        return self._workspace

    def _workspace_ready(self, ws):
        pr = self._products
        ws.set_crossproducts(pr.avals, pr.ztxy, pr.xtxy)

    @property
    def structure(self):
        """The level-only block structure (which level pairs share a row)."""
        return self.workspace.pattern

    # -- the data frame, lazily ---------------------------------------------------------
    def attach(self, ddf):
        """Give a (loaded) out-of-core model its Dask DataFrame back, for the row accessors.

        The frame must be the one the model was fitted to (the same partitions); its
        rows per partition are checked against the fit's.
        """
        from .dask import _Source

        self._set_source(_Source.attach(self, ddf))
        return self

    def _set_source(self, source):
        self._source = source
        object.__setattr__(self.design, "_source", source)
        for t in self.design.reterms:
            object.__setattr__(t, "_source", source)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._source = None

    # -- what differs from the in-memory specification ------------------------------------
    @property
    def n(self):
        return self._n

    @property
    def p(self):
        return self.fixed.p

    @property
    def X(self):
        """The working fixed-effects matrix X̃ over the rows, as a Dask array."""
        if self._source is None:
            raise _no_rows("X̃")
        return self._source.array("Xw")

    @property
    def y_fit(self):
        """The response less its offset, over the rows, as a Dask array."""
        if self._source is None:
            raise _no_rows("the response")
        return self._source.array("y_fit")

    @property
    def Z(self):
        raise OutOfCoreError("Z (the sparse n-by-q random-effects matrix) is not built for an "
                             "out-of-core fit: its cross-products are all the fit holds")

    def replace_response(self, y):
        raise OutOfCoreError("an out-of-core model cannot take a new response in memory: "
                             "fit the new response from its Dask DataFrame")

    def with_response(self, y):
        self.replace_response(y)

    def _fixed_part(self, beta_w):
        return None

    def _optimum(self, theta, kernel=None):
        out = super()._optimum(theta, kernel)
        out.pop("xbeta", None)
        return out

    def starting_theta(self):
        """As :meth:`LinearMixedModel.starting_theta`, from per-level moments of the OLS
        residuals (summed over chunks) instead of the rows."""
        rels = [relative_covariance(ztz, ztr, rr, nrow, t.ncols)
                for t, (ztz, ztr, rr, nrow) in zip(self.reterms, self._products.start)]
        return start_from_relative(self.layout, self.reterms, rels)

    def fit(self, progress=False, initial=None, check_convergence=True):
        """Minimize the objective over θ as in memory; an :class:`OutOfCoreLinearMixedModelFit`."""
        res = super().fit(progress=progress, initial=initial,
                          check_convergence=check_convergence)
        out = object.__new__(OutOfCoreLinearMixedModelFit)
        out.__dict__.update(res.__dict__)
        return out

    def describe(self):
        return (f"out of core, {self.n} rows in {len(self.rows_per_chunk)} partitions; "
                + self.workspace.describe())


class OutOfCoreLinearMixedModelFit(LinearMixedModelFit):
    """A linear mixed model fitted from the cross-products of a Dask DataFrame.

    The same record as :class:`LinearMixedModelFit`; what needs the rows comes lazily
    from the data frame, as Dask arrays (``.compute()`` them): ``y``, ``X``,
    ``fitted()``, ``linpred()``, ``residuals(kind)``, ``predict()`` on the fitted rows.
    ``predict(newdata)`` with a pandas frame works as in memory. ``Z``, ``xbeta``,
    ``simulate`` (and so ``mm.bootstrap``) raise :class:`OutOfCoreError`.
    """

    @property
    def nobs(self):
        return self.model.n

    @property
    def y(self):
        """The response over the rows used: a Dask array."""
        return self._source().array("y")

    @property
    def X(self):
        """The fixed-effects model matrix over the rows used: a Dask array."""
        return self._source().array("X")

    @property
    def Z(self):
        return self.model.Z

    @property
    def xbeta(self):
        raise OutOfCoreError("xbeta (X̃β̃ for every row) is not kept by an out-of-core fit; "
                             "fit.linpred() gives the linear predictor lazily, as a Dask array")

    def _source(self):
        src = self.model._source
        if src is None:
            raise _no_rows("a row-level result")
        return src

    def linpred(self):
        """X β + Z b (+ offset) over the rows: a Dask array."""
        return self._source().linear_predictor(self.model.fixed.to_working(self.coef), self.b)

    def fitted(self):
        """X β + Z b (+ offset) over the rows: a Dask array."""
        return self.linpred()

    def residuals(self, kind="response"):
        """Residuals over the rows, as a Dask array (see ``MixedModelFit.residuals``)."""
        if kind not in ("response", "pearson", "deviance", "working"):
            raise ValueError('kind must be "response", "pearson", "deviance" or "working", '
                             f"not {kind!r}")
        r = self.y - self.fitted()
        if kind in ("response", "working"):
            return r
        if self.model._weighted:
            r = r * np.sqrt(self._source().array("w"))
        return r / self.sigma if kind == "pearson" else r

    def simulate(self, n=1, seed=None):
        raise OutOfCoreError("simulating responses needs X̃β̃ and Z for every row, which an "
                             "out-of-core fit does not hold; the parametric bootstrap is not "
                             "available for it")

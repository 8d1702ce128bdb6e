"""Out-of-core fitting: linear mixed models from Dask partitions by sufficient statistics.

``mm.fit(formula, ddf)`` with a ``dask.dataframe.DataFrame`` comes here (Dask is the
optional ``dask`` extra, imported only when such a frame is given). The passes over the
partitions compute the cross-products of [Z X̃ y] chunk by chunk (``_stats.py``, plain
NumPy); ``dask.py`` runs them as tree reductions; ``_model.py`` is the specification
built from their sums, whose per-θ code is the in-memory one.

Public names: :func:`fit_dask` (= ``dask.fit``), :class:`OutOfCoreLinearMixedModel`,
:class:`OutOfCoreLinearMixedModelFit`, :class:`OutOfCoreError`.
"""
from ._stats import OutOfCoreError

__all__ = ["fit_dask", "is_dask_frame", "OutOfCoreError", "OutOfCoreLinearMixedModel",
           "OutOfCoreLinearMixedModelFit"]


def is_dask_frame(data):
    """Whether ``data`` is a Dask DataFrame, decided without importing Dask."""
    module = type(data).__module__.split(".")[0]
    return module in ("dask", "dask_expr") and hasattr(data, "to_delayed") and hasattr(
        data, "npartitions")


def fit_dask(formula, ddf, **kwargs):
    """Fit a linear mixed model to a Dask DataFrame out of core (see :func:`.dask.fit`)."""
    from .dask import fit

    return fit(formula, ddf, **kwargs)


def __getattr__(name):
    if name in ("OutOfCoreLinearMixedModel", "OutOfCoreLinearMixedModelFit"):
        from . import _model

        return getattr(_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

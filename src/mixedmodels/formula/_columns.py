"""Data columns as the design layer sees them: numeric arrays, missing rows, level codes.

One :class:`ColumnCache` lives for one ``build_design`` call.  Each column the model
reads is pulled out of the data frame once, checked for missing values once and, if
categorical, factorized once (``pandas.factorize`` on the whole column, hashing rather
than sorting); everything later (the fitting rows, the level order, the codes of the
fitting rows) is derived from those arrays with vectorised NumPy.  Only the *unique*
values of a column are ever touched one by one in Python: their labels and their
sort order.

Level conventions (shared with lme4 and MixedModels.jl): strings sort as strings,
booleans as false < true, numbers numerically; a pandas ``Categorical`` keeps its
declared category order; levels absent from the rows used are dropped.

Data frames other than pandas (polars, pyarrow, anything narwhals reads) are seen
through :func:`as_table`, which converts a column to a pandas Series when it is first
read, so that the columns a model does not use cost nothing.  A polars ``Enum``
keeps its declared order; a polars ``Categorical`` (which polars itself sorts as
strings) and an Arrow dictionary column become strings.
"""
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ._contrasts import _label

__all__ = [
    "ColumnCache",
    "as_table",
    "as_pandas",
    "column",
    "is_numeric",
    "as_float",
    "missing",
    "raw_factorize",
    "levels_from_raw",
    "factorize",
    "encode",
]

def column(data, name):
    """One column of a data table as a pandas Series, checked to be there once.

    Parameters
    ----------
    data : pandas.DataFrame or the result of :func:`as_table`
    name : str

    Returns
    -------
    pandas.Series

    Raises
    ------
    ValueError
        When ``data`` has no column ``name``, or more than one.
    """
    if name not in data.columns:
        raise ValueError(f"column {name!r} not found in data")
    series = data[name]
    if isinstance(series, pd.DataFrame):
        # pandas answers a repeated name with all its columns
        raise ValueError(f"column {name!r} appears {series.shape[1]} times in data; "
                         "rename the copies so that the formula names one column")
    return series


class _NarwhalsTable:
    """A narwhals-readable data frame as the design layer reads a table: ``columns``,
    ``len()`` and ``table[name]`` giving a pandas Series, converted on first use."""

    def __init__(self, frame):
        self._frame = frame
        self.columns = pd.Index(frame.columns)
        self._len = len(frame)
        self._series = {}

    def __len__(self):
        return self._len

    def __getitem__(self, name):
        out = self._series.get(name)
        if out is None:
            out = self._series[name] = _to_series(self._frame.get_column(name), name)
        return out


def _to_series(series, name):
    """A narwhals Series as a pandas Series with the same values and level order."""
    import narwhals as nw

    dtype = series.dtype
    values = series.to_numpy()
    if isinstance(dtype, nw.Enum):
        # an Enum's declared categories are its level order, as a pandas Categorical's
        values = pd.Categorical(values, categories=list(dtype.categories))
    elif dtype == nw.Boolean and values.dtype == object:
        # booleans with nulls: pandas' nullable boolean keeps false < true and the nulls
        values = pd.array(values, dtype="boolean")
    elif dtype.is_numeric() and values.dtype.kind not in "biufc":
        values = series.cast(nw.Float64).to_numpy()  # e.g. Decimal
    return pd.Series(values, name=name)


def as_table(data):
    """``data`` as the design layer reads it: a pandas DataFrame or a column view.

    Parameters
    ----------
    data : pandas.DataFrame, mapping of column name to values, or a data frame
        narwhals supports (polars, pyarrow, modin, cuDF, DuckDB, ...)

    Returns
    -------
    pandas.DataFrame or _NarwhalsTable
        Both give ``columns``, ``len()`` and ``table[name]`` (a pandas Series).

    Raises
    ------
    TypeError
        For anything else, naming its type.
    ValueError
        For a mapping pandas cannot make a frame of, or a frame with repeated column
        names that narwhals refuses.
    """
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Mapping):
        try:
            return pd.DataFrame(dict(data))
        except Exception as err:
            raise ValueError(f"data must be a pandas DataFrame or a mapping of columns: "
                             f"{err}") from None
    import narwhals as nw

    try:
        frame = nw.from_native(data)
    except nw.exceptions.DuplicateError:
        names = pd.Index(getattr(data, "column_names", None) or list(data.columns))
        repeated = names[names.duplicated()].unique().tolist()
        raise ValueError(f"column(s) {repeated} appear more than once in data; rename the "
                         "copies so that the formula names one column") from None
    except TypeError:
        raise TypeError(f"data must be a pandas DataFrame, a dict of columns or a data "
                        f"frame narwhals supports (polars, pyarrow, ...), not "
                        f"{type(data).__module__}.{type(data).__qualname__}") from None
    if isinstance(frame, nw.LazyFrame):
        frame = frame.collect()
    return _NarwhalsTable(frame)


def as_pandas(data):
    """``data`` (anything :func:`as_table` takes) as a pandas DataFrame.

    Parameters
    ----------
    data : pandas.DataFrame, mapping or narwhals-supported data frame

    Returns
    -------
    pandas.DataFrame
    """
    table = as_table(data)
    if isinstance(table, pd.DataFrame):
        return table
    return pd.DataFrame({name: table[name] for name in table.columns},
                        index=pd.RangeIndex(len(table)))


def is_numeric(series):
    """Whether a column enters a model as numbers (bools and categoricals do not)."""
    dtype = series.dtype
    if isinstance(dtype, np.dtype):
        return dtype.kind in "iufc"
    if isinstance(dtype, (pd.StringDtype, pd.CategoricalDtype)) or pd.api.types.is_bool_dtype(
            dtype):
        return False
    return pd.api.types.is_numeric_dtype(dtype)


def as_float(series):
    """A numeric column as float64 with NaN for missing values."""
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def _numeric_missing(series):
    """Rows of a numeric column holding NaN, inf or pd.NA; None when there can be none."""
    dtype = series.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "iu":
        return None
    values = series.to_numpy() if isinstance(dtype, np.dtype) and dtype.kind == "f" else (
        as_float(series))
    # a finite sum means every value is finite: one read-only pass in the common case
    if np.isfinite(values.sum()):
        return None
    return ~np.isfinite(values)


def missing(series):
    """Rows of a column that hold no usable value (NaN, inf, None, pd.NA)."""
    if is_numeric(series):
        bad = _numeric_missing(series)
        return np.zeros(len(series), dtype=bool) if bad is None else bad
    return series.isna().to_numpy()


def _hashable_values(series):
    """What ``pandas.factorize`` should hash: the plain ndarray where that keeps the
    unique values' types (object strings, numpy numbers and bools), else the Series."""
    dtype = series.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "Obiuf":
        return series.to_numpy()
    if isinstance(dtype, pd.StringDtype) and dtype.storage == "python":
        # the StringArray's own factorize re-validates every element; its object
        # ndarray holds the same str objects and hashes twice as fast.
        return series.to_numpy()
    return series


def raw_factorize(series):
    """Unsorted level codes of a whole column.

    Returns
    -------
    raw : ndarray of signed integers
        Index into ``uniques`` per row, -1 where missing (a Categorical's own code
        dtype, int8 or int16 for most, else int64).
    uniques : list
        The distinct values (a Categorical's categories, used or not).
    declared : bool
        True when ``uniques`` is a declared order (a Categorical) to keep.
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        raw = series.cat.codes.to_numpy()
        cats = series.cat.categories
        values = cats.to_numpy()
        # Index.tolist() boxes as list(Index) does, without a Python loop; but an
        # ndarray's own tolist() turns datetimes into integers
        uniques = values.tolist() if values.dtype.kind in "Obiuf" else list(cats)
        return raw, uniques, True
    raw, uniq = pd.factorize(_hashable_values(series), sort=False)
    return raw.astype(np.int64, copy=False), list(uniq), False


def _is_number(value):
    return isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating))


def levels_from_raw(raw, uniques, declared, order=None, name=None):
    """Level codes and labels in model order from :func:`raw_factorize` output.

    Parameters
    ----------
    raw : ndarray of signed integers
        Unsorted codes of the rows used (-1 where missing).
    uniques : list
    declared : bool
    order : sequence, optional
        Explicit level order (from a coding's ``levels``); unobserved ones are dropped.
    name : str, optional
        The column's name, for messages.

    Returns
    -------
    codes : ndarray of signed integers
        Level index per row, -1 where missing; ``raw`` itself when it is already in
        model order, else int32.
    levels : list of str
    """
    labels = [u if type(u) is str else _label(u) for u in uniques]
    present = np.zeros(len(uniques) + 1, dtype=bool)
    present[raw] = True  # a missing value's -1 marks the extra last slot
    idx = np.flatnonzero(present[:-1]).tolist()
    if order is not None:
        wanted = [_label(v) for v in order]
        seen = {labels[i] for i in idx}
        unknown = sorted(seen - set(wanted))
        if unknown:
            raise ValueError(f"column {name!r} has values {unknown} that are not "
                             f"among the levels {wanted} given in its coding")
        levels = [w for w in wanted if w in seen]
    else:
        if not declared:
            if all(_is_number(uniques[i]) for i in idx):
                idx.sort(key=lambda i: float(uniques[i]))
            else:
                idx.sort(key=lambda i: labels[i])
        levels = list(dict.fromkeys(labels[i] for i in idx))
    pos = {lab: k for k, lab in enumerate(levels)}
    remap = [pos.get(lab, -1) for lab in labels]
    if remap == list(range(len(labels))):
        return raw, levels  # already in model order (e.g. a Categorical using all levels)
    # the trailing -1 is where raw's -1 (missing) lands
    return np.array(remap + [-1], dtype=np.int32)[raw], levels


def factorize(series, order=None):
    """Level codes (signed integers, -1 where missing) and level labels in model order.

    Parameters
    ----------
    series : pandas.Series
    order : sequence, optional
        Explicit level order (from a coding's ``levels``); unobserved ones are dropped.
    """
    raw, uniques, declared = raw_factorize(series)
    return levels_from_raw(raw, uniques, declared, order, series.name)


def encode(series, levels):
    """Codes of ``series`` in a fitted level list: -1 for missing or unseen values.

    Returns
    -------
    codes : int64 ndarray
    unseen : list of str
        Labels present in ``series`` but not in ``levels``.
    """
    raw, uniq = pd.factorize(series, sort=False)
    labels = [_label(u) for u in uniq]
    pos = {lab: k for k, lab in enumerate(levels)}
    remap = np.array([pos.get(lab, -1) for lab in labels] + [-1], dtype=np.int64)
    codes = remap[raw]
    unseen = sorted({lab for lab in labels if lab not in pos})
    return codes, unseen


class ColumnCache:
    """The columns of one data frame, each extracted and analysed at most once.

    Parameters
    ----------
    data : pandas.DataFrame or the result of :func:`as_table`

    Notes
    -----
    Before :meth:`keep` is called the cache answers questions about all rows
    (:meth:`missing`); afterwards :meth:`numeric` and :meth:`factor` give the values
    of the rows kept.  ``rows`` is None while every row is kept, so a complete data
    set is never copied row by row.
    """

    def __init__(self, data):
        self.data = data
        self.n = len(data)
        self.rows = None
        self._series = {}
        self._raw = {}
        self._numeric = {}
        self._factor = {}
        self._kind = {}
        self._missing = {}

    def series(self, name):
        """The column as a pandas Series."""
        s = self._series.get(name)
        if s is None:
            s = self._series[name] = column(self.data, name)
        return s

    def is_numeric(self, name):
        """Whether the column is numeric (see :func:`is_numeric`)."""
        kind = self._kind.get(name)
        if kind is None:
            kind = self._kind[name] = is_numeric(self.series(name))
        return kind

    def raw(self, name):
        """:func:`raw_factorize` of the whole column, computed once."""
        out = self._raw.get(name)
        if out is None:
            out = self._raw[name] = raw_factorize(self.series(name))
        return out

    def missing(self, name):
        """Missing rows of the whole column, or None when it has none for certain."""
        if name not in self._missing:
            if self.is_numeric(name):
                self._missing[name] = _numeric_missing(self.series(name))
            else:
                self._missing[name] = self.raw(name)[0] < 0
        return self._missing[name]

    def keep(self, rows):
        """Restrict later answers to ``rows`` (None: all rows)."""
        self.rows = rows
        self._numeric.clear()
        self._factor.clear()

    def take(self, values):
        """``values`` restricted to the rows kept (not copied when all are kept)."""
        return values if self.rows is None else values[self.rows]

    def numeric(self, name):
        """A numeric column over the rows kept: its own int/float array, else float64."""
        out = self._numeric.get(name)
        if out is None:
            series = self.series(name)
            values = series.to_numpy()
            if values.dtype.kind not in "iuf":
                values = as_float(series)
            out = self._numeric[name] = self.take(values)
        return out

    def factor(self, name, order=None):
        """Level codes and labels of the rows kept, as :func:`factorize`."""
        key = (name, None if order is None else tuple(order))
        out = self._factor.get(key)
        if out is None:
            raw, uniques, declared = self.raw(name)
            out = levels_from_raw(self.take(raw), uniques, declared, order, name)
            self._factor[key] = out
        return out

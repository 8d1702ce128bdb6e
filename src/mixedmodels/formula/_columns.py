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
import math
import operator
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .._kernels._factorize import arrow_string_codes
from ._contrasts import _label

__all__ = [
    "ColumnCache",
    "as_table",
    "column_values",
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


def column_values(data, name, loc=None):
    """:func:`column`'s values as the frame stores them, an ndarray (read-only) or an
    ExtensionArray, without making a pandas Series (which costs more than reading a small
    column does); the same arguments and errors as :func:`column`. ``loc``: the column's
    position in a DataFrame, when the caller knows it already."""
    values = None
    if isinstance(data, pd.DataFrame):
        if loc is None:
            try:
                loc = data.columns.get_loc(name)
            except KeyError:
                raise ValueError(f"column {name!r} not found in data") from None
        if isinstance(loc, (int, np.integer)):
            try:
                # the block's own array, without the Series pandas would wrap it in
                values = data._get_column_array(int(loc))
            except AttributeError:
                pass
    if values is None:
        series = column(data, name)
        values = series.to_numpy() if isinstance(series.dtype, np.dtype) else series.array
    if isinstance(values, np.ndarray) and values.flags.writeable:
        values = values.view()
        values.flags.writeable = False   # the caller's data: never written through
    return values


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
    return _nonfinite(values)


def _nonfinite(values):
    """Rows of a float array that are not finite; None when all are."""
    # a finite sum means every value is finite: one read-only pass in the common case
    # (a small column's in Python floats: NumPy's reduction machinery, cold, costs a
    # small fit more than the sum)
    total = sum(values.tolist()) if len(values) <= _PYTHON_SUM_MAX else np.add.reduce(values)
    if math.isfinite(total):
        return None
    return ~np.isfinite(values)


_PYTHON_SUM_MAX = 1000


def _values_missing(values):
    """:func:`_numeric_missing` of a numeric column given as an array."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iu":
            return None
        return _nonfinite(values if values.dtype.kind == "f"
                          else np.asarray(values, dtype=np.float64))
    return _nonfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))


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
        return _categorical_raw(series.array)
    raw, uniq = pd.factorize(_hashable_values(series), sort=False)
    return raw.astype(np.int64, copy=False), list(uniq), False


def _categorical_raw(cat):
    raw = cat.codes
    cats = cat.categories
    strings = getattr(cats.array, "_pa_array", None)
    if strings is not None and isinstance(cats.dtype, pd.StringDtype):
        # Arrow-backed string categories: Arrow's own list of them, without the object
        # array (and its Arrow conversion) that to_numpy() would make first
        return raw, strings.to_pylist(), True
    values = cats.to_numpy()
    # Index.tolist() boxes as list(Index) does, without a Python loop; but an
    # ndarray's own tolist() turns datetimes into integers
    uniques = values.tolist() if values.dtype.kind in "Obiuf" else list(cats)
    return raw, uniques, True


def _raw_of_values(values):
    """:func:`raw_factorize` of a column given as an array, for the kinds of column
    whose result does not depend on the Series around them; None for the others."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "Obiuf":
            return None
        raw, uniq = pd.factorize(values, sort=False)
        return raw.astype(np.int64, copy=False), list(uniq), False
    if isinstance(values, pd.Categorical):
        return _categorical_raw(values)
    dtype = values.dtype
    if isinstance(dtype, pd.StringDtype):
        if dtype.storage == "python":
            raw, uniq = pd.factorize(values.to_numpy(), sort=False)
            return raw.astype(np.int64, copy=False), list(uniq), False
        return _arrow_string_raw(values)
    return None


# Up to this many rows an Arrow string column without nulls is factorized by a Python
# dict. In isolation Arrow's dictionary_encode is as fast at ~200 rows and faster
# beyond, but a model build that called it took 60-90 microseconds more per column
# (sleepstudy, cbpp, penicillin: whole builds timed alternately), more than the call
# itself: the code after it apparently runs slower (its machinery leaves the caches
# colder for NumPy's).
_PY_FACTORIZE_MAX_ROWS = 500


def _arrow_string_raw(values):
    """pandas' own factorize of an Arrow-backed string array (``dictionary_encode``),
    without its wrapping of the unique values in a new pandas array."""
    data = getattr(values, "_pa_array", None)
    if data is None or len(values) == 0:
        return None
    import pyarrow as pa

    if not (pa.types.is_string(data.type) or pa.types.is_large_string(data.type)):
        return None
    if len(values) <= _PY_FACTORIZE_MAX_ROWS and not data.null_count:
        return _python_factorize(data.to_pylist())
    if data.num_chunks == 1:
        encoded = data.chunk(0).dictionary_encode()
    else:
        encoded = data.dictionary_encode().combine_chunks()
    indices = encoded.indices
    if indices.null_count:
        raw = indices.to_numpy(zero_copy_only=False)   # float, NaN where missing
        raw = np.where(np.isnan(raw), -1, raw).astype(np.int64)
    else:
        raw = indices.to_numpy().astype(np.int64)
    return raw, encoded.dictionary.to_pylist(), False


def _python_factorize(items):
    """``dictionary_encode`` of a list of strings without None: codes in order of first
    appearance (int64) and the distinct strings in that order."""
    uniques = list(dict.fromkeys(items))          # in order of first appearance
    index = dict(zip(uniques, range(len(uniques))))
    raw = np.fromiter(map(index.__getitem__, items), dtype=np.int64, count=len(items))
    return raw, uniques, False


def _short_strings_factor(values):
    """:func:`factorize` of a whole Arrow string column of at most
    ``_PY_FACTORIZE_MAX_ROWS`` rows without nulls, straight into model order; None for
    any other column.

    Strings sort as strings, so the sorted distinct values are the levels and each
    row's code is its value's place among them: no first-appearance codes to remap.
    """
    data = _arrow_strings_without_nulls(values)
    if data is None or not 1 < len(data) <= _PY_FACTORIZE_MAX_ROWS:
        return None
    return _sorted_string_codes(data)


def _sorted_string_codes(data):
    """(codes, levels) of an Arrow string ChunkedArray without nulls, levels sorted: from
    the Arrow buffers in compiled code (one chunk), else in Python (its twin)."""
    if data.num_chunks == 1:
        chunk = data.chunk(0)
        _, offsets, values = chunk.buffers()
        if values is not None:
            # the buffers read in place, by address (no NumPy views of them)
            return arrow_string_codes(offsets.address, offsets.size, values.address,
                                      values.size, chunk.offset, len(chunk),
                                      data.type.id == _arrow_string_ids()[1])
    return _sorted_string_codes_python(data)


def _sorted_string_codes_python(data):
    """:func:`_sorted_string_codes` through Python strings."""
    items = data.to_pylist()
    levels = sorted(set(items))
    index = dict(zip(levels, range(len(levels))))
    if len(levels) <= 256:
        # one C-level pass: itemgetter looks every row up, bytes() packs the small codes
        packed = bytes(operator.itemgetter(*items)(index))
        codes = np.frombuffer(packed, dtype=np.uint8).astype(np.int32)
    else:
        codes = np.fromiter(map(index.__getitem__, items), dtype=np.int32, count=len(items))
    return codes, levels


# pyarrow's type ids of string and large_string (looked up on first use: pyarrow is
# imported only for a column that holds Arrow data)
_ARROW_STRING_IDS = None


def _arrow_strings_without_nulls(values):
    """The Arrow data (a ChunkedArray) of a column of Arrow-backed strings with no
    missing value (so no row of its factorization is -1); None for any other column."""
    data = getattr(values, "_pa_array", None)
    if data is None or not isinstance(values.dtype, pd.StringDtype) or data.null_count:
        return None
    return data if data.type.id in _arrow_string_ids() else None


def _arrow_string_ids():
    """pyarrow's type ids of (string, large_string)."""
    global _ARROW_STRING_IDS
    if _ARROW_STRING_IDS is None:
        import pyarrow as pa

        _ARROW_STRING_IDS = (pa.string().id, pa.large_string().id)
    return _ARROW_STRING_IDS


def _is_number(value):
    return isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating))


def levels_from_raw(raw, uniques, declared, order=None, name=None, complete=False):
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
    complete : bool
        True when every one of ``uniques`` occurs in ``raw`` (a factorization of
        exactly these rows), which spares a pass to find the ones that do.

    Returns
    -------
    codes : ndarray of signed integers
        Level index per row, -1 where missing; ``raw`` itself when it is already in
        model order, else int32.
    levels : list of str
    """
    if complete and order is None and not declared and all(type(u) is str for u in uniques):
        # strings sort as strings; distinct strings are distinct labels
        m = len(uniques)
        perm = sorted(range(m), key=uniques.__getitem__)
        levels = [uniques[i] for i in perm]
        if perm == list(range(m)):
            return raw, levels
        remap = np.empty(m + 1, dtype=np.int32)
        remap[perm] = np.arange(m, dtype=np.int32)
        remap[m] = -1   # where raw's -1 (missing) lands
        return remap[raw], levels
    labels = [u if type(u) is str else _label(u) for u in uniques]
    present = np.zeros(len(uniques) + 1, dtype=bool)
    present[raw] = True  # a missing value's -1 marks the extra last slot
    if declared and order is None and present[:-1].all() and len(set(labels)) == len(labels):
        # a declared order whose levels all occur, with distinct labels: the codes are
        # in model order already
        return raw, labels
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


_UNSEEN = object()    # a column not looked at yet (None is an answer)


class ColumnCache:
    """The columns of one data frame, each extracted and analysed at most once.

    Parameters
    ----------
    data : pandas.DataFrame or the result of :func:`as_table`
    locs : dict, optional
        Column name -> its position in ``data`` (a DataFrame), for the columns whose
        position the caller knows.

    Notes
    -----
    Before :meth:`keep` is called the cache answers questions about all rows
    (:meth:`missing`); afterwards :meth:`numeric` and :meth:`factor` give the values
    of the rows kept.  ``rows`` is None while every row is kept, so a complete data
    set is never copied row by row.  Columns are read as the arrays the frame stores
    (:func:`column_values`); a pandas Series is made only when asked for.
    """

    def __init__(self, data, locs=None):
        self.data = data
        self.rows = None
        # name -> position of the column in a DataFrame, where known (see column_values)
        self._locs = {} if locs is None else locs
        self._values = {}
        self._series = {}
        self._raw = {}
        self._numeric = {}
        self._factor = {}
        self._kind = {}
        self._missing = {}
        self._strings = {}

    @property
    def n(self):
        """The number of rows of the data."""
        return len(self.data)

    def values(self, name):
        """The column as stored (see :func:`column_values`)."""
        v = self._values.get(name)
        if v is None:
            v = self._values[name] = column_values(self.data, name, self._locs.get(name))
        return v

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
            kind = self._kind[name] = is_numeric(self.values(name))
        return kind

    def raw(self, name):
        """:func:`raw_factorize` of the whole column, computed once."""
        out = self._raw.get(name)
        if out is None:
            out = _raw_of_values(self.values(name))
            if out is None:
                out = raw_factorize(self.series(name))
            self._raw[name] = out
        return out

    def arrow_strings(self, name):
        """The column's Arrow data when it is Arrow-backed strings without nulls, else
        None (see :func:`_arrow_strings_without_nulls`), found once."""
        data = self._strings.get(name, _UNSEEN)
        if data is _UNSEEN:
            data = self._strings[name] = _arrow_strings_without_nulls(self.values(name))
        return data

    def missing(self, name):
        """Missing rows of the whole column, or None when it has none for certain."""
        bad = self._missing.get(name, _UNSEEN)
        if bad is not _UNSEEN:
            return bad
        values = self.values(name)
        if isinstance(values, np.ndarray) and values.dtype.kind in "iufc":
            bad = _values_missing(values)
        elif not isinstance(values, np.ndarray) and self.arrow_strings(name) is not None:
            bad = None          # strings (not numeric), none missing
        elif self.is_numeric(name):
            bad = _values_missing(values)
        else:
            bad = self.raw(name)[0] < 0
        self._missing[name] = bad
        return bad

    def keep(self, rows):
        """Restrict later answers to ``rows`` (None: all rows)."""
        self.rows = rows
        self._numeric.clear()
        self._factor.clear()

    def take(self, values):
        """``values`` restricted to the rows kept (not copied when all are kept)."""
        return values if self.rows is None else values[self.rows]

    def all_numeric(self, name):
        """A numeric column over all rows: its own int/float array, else float64 (NaN
        where missing), as the Series' ``to_numpy()`` and :func:`as_float` give them."""
        values = self.values(name)
        plain = values if isinstance(values, np.ndarray) else values.to_numpy()
        if plain.dtype.kind in "iuf":
            return plain
        if isinstance(values, np.ndarray):
            return np.asarray(values, dtype=np.float64)
        return values.to_numpy(dtype=np.float64, na_value=np.nan)

    def numeric(self, name):
        """A numeric column over the rows kept: its own int/float array, else float64."""
        out = self._numeric.get(name)
        if out is None:
            out = self._numeric[name] = self.take(self.all_numeric(name))
        return out

    def factor(self, name, order=None):
        """Level codes and labels of the rows kept, as :func:`factorize`."""
        key = (name, None if order is None else tuple(order))
        out = self._factor.get(key)
        if out is None and self.rows is None and order is None:
            data = self.arrow_strings(name)
            if data is not None and 1 < len(data) <= _PY_FACTORIZE_MAX_ROWS:
                out = self._factor[key] = _sorted_string_codes(data)
        if out is None:
            raw, uniques, declared = self.raw(name)
            # a factorization lists only values that occur: all of them do while
            # every row is kept
            out = levels_from_raw(self.take(raw), uniques, declared, order, name,
                                  complete=self.rows is None and not declared)
            self._factor[key] = out
        return out

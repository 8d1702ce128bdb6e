"""The design of a small model whose columns need no cleaning, built without the column
cache: the common case of ``y ~ 1 + x + (1 + x | g)`` over a pandas DataFrame.

:func:`_design._build_design` serves every formula and data frame: a response
expression, weights, offsets, contrasts, categorical predictors, missing values to drop,
aliased columns, patsy's terms. On a model of a few hundred rows its own Python is most
of a fit's set-up, and a fit in a benchmark, or in a loop over many small data sets,
runs it cold: measured on penicillin (144 rows) in a fit that follows another library's,
the design cost 300 µs of 1.35 ms. :func:`simple_design` builds the same
:class:`Design`, field for field (tests/test_simple_design.py holds the two together),
where the formula and the columns allow it:

- the response is a column, there are no ``offset()`` terms, and the fixed part and
  every random term are in the fast path's grammar (``_fast``), each term grouped by
  one column;
- the caller gives no weights, offset or contrasts, and the data is a pandas
  DataFrame of fewer than 500 rows (where ``ColumnCache.factor`` reads Arrow strings
  in compiled code too);
- the response and the model matrices' columns are NumPy integers or floats with no
  NaN or infinity, and each grouping column holds Arrow-backed strings with no
  missing value and at least two levels;
- X is clearly of full rank (or the intercept alone).

Anything else returns None, and the caller takes the general path, which also raises
every error and warning.
"""
import numpy as np

from . import _design
from ._columns import (_PY_FACTORIZE_MAX_ROWS, _arrow_strings_without_nulls,
                       _sorted_string_codes, _values_missing, column_values)
from ._fast import FastMatrix, fast_plan


def simple_design(formula, data, plan, qr_out):
    """:func:`_design._build_design` of ``formula`` over ``data`` (a pandas DataFrame)
    with the formula's ``plan``, or None where the columns or the formula ask for more
    (see the module docstring); the QR of X its rank test made is appended to
    ``qr_out``."""
    if not _plan_is_simple(plan):
        return None
    n = len(data)
    if not 1 < n <= _PY_FACTORIZE_MAX_ROWS:
        return None
    locs = plan.locs
    resp_col = plan.resp_col
    y = _numbers(data, resp_col, locs)
    if y is None:
        return None
    numeric = {}
    for name in plan.matrix_cols:
        values = _numbers(data, name, locs)
        if values is None:
            return None
        numeric[name] = values
    factors = {}
    for name in plan.group_cols:
        if name in numeric:
            return None
        strings = _arrow_strings_without_nulls(column_values(data, name, locs.get(name)))
        if strings is None:
            return None
        codes, levels = factors[name] = _sorted_string_codes(strings)
        if len(levels) < 2:
            return None

    # the model matrices as _build_design's model_matrix makes them, the same terms
    # sharing one matrix
    built = {}

    def model_matrix(part, what):
        shared = built.get(part.terms)
        if shared is not None:
            return shared.copy_for(what)
        specs = dict.fromkeys(part.cols)
        mat = built[part.terms] = FastMatrix(
            fast_plan(part.terms, specs, {}), specs, {}, {c: numeric[c] for c in part.cols},
            n, what, _design._check_finite)
        return mat

    fixed = model_matrix(plan.fixed, "the fixed-effects model matrix")
    if fixed.subterms != ((),):
        qr = _design._qr_if_clearly_not_aliased(fixed.matrix)
        if qr is None:
            return None
        qr_out.append(qr)
    parsed = plan.fresh_parsed()
    reterms = []
    for term, part in zip(parsed.random, plan.random):
        codes, levels = factors[term.grouping[0]]
        zmat = model_matrix(part, f"the columns of random-effects term {term.text}")
        if not zmat.names:
            return None
        reterms.append(_design._make_frozen(_design.ReTerm, _design._RETERM_FIELDS, (
            term.group_name, codes.astype(np.int32), levels, list(zmat.names), zmat.matrix,
            term.zerocorr, tuple(term.grouping), [levels], [], zmat)))
    return _design._make_frozen(_design.Design, _design._DESIGN_FIELDS, (
        formula, resp_col, np.array(y, dtype=np.float64), None, fixed.matrix,
        list(fixed.names), [], reterms, None, None, n, np.arange(n, dtype=np.int64), False,
        parsed, fixed, np.arange(len(fixed.names), dtype=np.intp), []))


def _plan_is_simple(plan):
    """Whether the formula's plan is one :func:`simple_design` builds (a property of
    the formula and the column names, so found once per plan)."""
    simple = plan.simple
    if simple is None:
        simple = plan.simple = (
            plan.resp_col is not None and plan.parsed.counts is None and not plan.offsets
            and plan.fixed.terms is not None
            and all(part.terms is not None for part in plan.random)
            and all(len(term.grouping) == 1 for term in plan.parsed.random)
            and all(name in plan.locs for name in plan.checked))
    return simple


def _numbers(data, name, locs):
    """A column of NumPy integers or floats with no NaN or infinity, as the frame
    stores it; None for any other."""
    values = column_values(data, name, locs.get(name))
    if not (isinstance(values, np.ndarray) and values.dtype.kind in "iuf"):
        return None
    return values if _values_missing(values) is None else None


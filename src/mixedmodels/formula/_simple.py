"""The design of a small model whose columns need no cleaning, built without most of
the general path's machinery: the common case of ``y ~ 1 + x + f + (1 + x | g)`` over
a pandas DataFrame.

:func:`_design._build_design` serves every formula and data frame: contrasts, offsets,
``cbind()`` responses, missing values to drop, aliased columns, patsy's terms. On a model
of a few hundred rows its own Python is much of a fit's set-up, and a fit in a
benchmark, or in a loop over many small data sets, runs it cold (measured on penicillin,
144 rows, in a fit that follows another library's: the whole design cost 300 µs of
1.35 ms). :func:`simple_design` builds the same :class:`Design`, field for field
(tests/test_simple_design.py holds the two together), where the formula and the columns
allow it:

- no ``offset()`` terms and no ``cbind()`` response; the fixed part and every random
  term in the fast path's grammar (``_fast``), each term grouped by one column;
- the caller gives no offset or contrasts, and weights (if any) as a column name; the
  data is a pandas DataFrame of at most 500 rows (where ``ColumnCache.factor`` reads
  Arrow strings in compiled code too);
- the response (a column, or an expression of numeric columns), the weights and the
  numeric columns of the model matrices are NumPy integers or floats with no NaN or
  infinity (and weights not negative); every other column a model matrix or a grouping
  factor reads holds Arrow-backed strings with no missing value, a grouping factor at
  least two levels;
- X is clearly of full rank (or the intercept alone).

Anything else returns None, and the caller takes the general path, which also raises
every error and warning.
"""
import math

import numpy as np

from . import _design
from ._columns import (_PY_FACTORIZE_MAX_ROWS, ColumnCache, _arrow_strings_without_nulls,
                       _sorted_string_codes, _values_missing)
from ._fast import FastMatrix, fast_plan


def simple_design(formula, data, plan, qr_out, weights=None, evaluated=None):
    """:func:`_design._build_design` of ``formula`` over ``data`` (a pandas DataFrame)
    with the formula's ``plan`` and ``weights`` (None or a column name), or None where
    the columns or the formula ask for more (see the module docstring); the QR of X its
    rank test made is appended to ``qr_out``, and a response expression's values and
    the columns it read to ``evaluated["response"]`` (for the general path to take)."""
    if not _plan_is_simple(plan):
        return None
    n = len(data)
    if not 1 < n <= _PY_FACTORIZE_MAX_ROWS:
        return None
    # every column read once (a frame's column is a cold path of its own in pandas)
    cache = ColumnCache(data, plan.locs)
    resp_col = plan.resp_col
    if resp_col is not None:
        y = _numbers(cache.values(resp_col))
    else:
        y = _expression(formula, data, plan, cache, {} if evaluated is None else evaluated)
    if y is None:
        return None
    # each column as the model matrices read it: numbers, or a string column's codes
    # with its levels as the spec
    specs, values, factors = {}, {}, {}
    for name in plan.matrix_cols:
        column = cache.values(name)
        numbers = _numbers(column)
        if numbers is None:
            factor = factors[name] = _factor(column)
            if factor is None:
                return None
            values[name], specs[name] = factor
        else:
            values[name], specs[name] = numbers, None
    for name in plan.group_cols:
        factor = factors.get(name)
        if factor is None:
            if name in specs:           # a numeric column as a grouping factor
                return None
            factor = factors[name] = _factor(cache.values(name))
            if factor is None:
                return None
        if len(factor[1]) < 2:
            return None
    w = None
    if weights is not None:
        plan.add_locs([weights], data.columns)
        w = _numbers(cache.values(weights))
        if w is None:
            return None
        w = np.array(w, dtype=np.float64)
        if not all(0.0 <= v < math.inf for v in w.tolist()):
            return None

    # the model matrices as _build_design's model_matrix makes them, the same terms
    # sharing one matrix
    built = {}

    def model_matrix(part, what):
        shared = built.get(part.terms)
        if shared is not None:
            return shared.copy_for(what)
        part_specs = {c: specs[c] for c in part.cols}
        layout = fast_plan(part.terms, part_specs, {})
        if layout is None:              # abs2 of a string column: patsy's, or its error
            return None
        mat = built[part.terms] = FastMatrix(layout, part_specs, {},
                                             {c: values[c] for c in part.cols}, n, what,
                                             _design._check_finite)
        return mat

    fixed = model_matrix(plan.fixed, "the fixed-effects model matrix")
    if fixed is None:
        return None
    qr = None
    if fixed.subterms != ((),):
        qr = _design._qr_if_clearly_not_aliased(fixed.matrix)
        if qr is None:
            return None
    parsed = plan.fresh_parsed()
    reterms = []
    for term, part in zip(parsed.random, plan.random):
        codes, levels = factors[term.grouping[0]]
        zmat = model_matrix(part, f"the columns of random-effects term {term.text}")
        if zmat is None or not zmat.names:
            return None
        reterms.append(_design._make_frozen(_design.ReTerm, _design._RETERM_FIELDS, (
            term.group_name, codes.astype(np.int32), levels, list(zmat.names), zmat.matrix,
            term.zerocorr, tuple(term.grouping), [levels], [], zmat)))
    if qr is not None:
        qr_out.append(qr)
    return _design._make_frozen(_design.Design, _design._DESIGN_FIELDS, (
        formula, parsed.response if resp_col is None else resp_col,
        np.array(y, dtype=np.float64), None, fixed.matrix, list(fixed.names), [], reterms,
        w, None, n, np.arange(n, dtype=np.int64), False, parsed, fixed,
        np.arange(len(fixed.names), dtype=np.intp), []))


def _plan_is_simple(plan):
    """Whether the formula's plan is one :func:`simple_design` builds (a property of
    the formula and the column names, so found once per plan)."""
    simple = plan.simple
    if simple is None:
        simple = plan.simple = (
            plan.parsed.counts is None and not plan.offsets and plan.fixed.terms is not None
            and all(part.terms is not None for part in plan.random)
            and all(len(term.grouping) == 1 for term in plan.parsed.random)
            and all(name in plan.locs for name in plan.checked))
    return simple


def _numbers(values):
    """A column of NumPy integers or floats with no NaN or infinity, as the frame stores
    it; None for any other."""
    if not (isinstance(values, np.ndarray) and values.dtype.kind in "iuf"):
        return None
    return values if _values_missing(values) is None else None


def _factor(values):
    """(codes, sorted levels) of a column of Arrow-backed strings with no missing value,
    as ``ColumnCache.factor`` gives them; None for any other."""
    strings = _arrow_strings_without_nulls(values)
    return None if strings is None else _sorted_string_codes(strings)


def _expression(formula, data, plan, cache, evaluated):
    """A response expression's values, where they and the columns it reads are numbers
    with no NaN or infinity; None otherwise. Either way the values and the columns read
    go to ``evaluated["response"]``. An expression that cannot be evaluated raises as on
    the general path, which would evaluate it first too."""
    used = []
    value = _design._evaluate_response(plan.parsed.response, data, used, formula, cache, plan)
    evaluated["response"] = (value, used)
    if _numbers(value) is None:
        return None
    for name in used:
        if _numbers(cache.values(name)) is None:
            return None
    return value

"""Model matrices built directly with NumPy for the formulas most models use.

patsy evaluates every factor as Python code, checks categorical values for missing
entries one element at a time and rebuilds its term bookkeeping on every call; for a
180-row data set that is milliseconds, for 10^6 rows seconds.  This module covers the
common fixed parts and random-term expressions without it:

* an intercept (``1``, ``0``, ``-1`` and ``... - 1`` in any position),
* data columns named directly (in backticks too), numeric or categorical,
* ``abs2(col)`` of a numeric column,
* their interactions with ``:`` and ``*`` (any depth, any mix).

Anything else (parentheses, ``I()``, ``C()``, ``Q()``, ``np.log(x)``, ``**``, ``/``,
removing terms with ``-``, patsy's own contrast objects) makes :func:`fast_terms` or
:func:`fast_plan` answer None and the caller uses patsy.

Same matrix, bit for bit
------------------------
The columns, their order, their names and their values equal those of the patsy
path (``tests/test_formula_fastpath.py`` holds the two together):

* Terms are expanded as patsy expands them: ``a * b`` is ``a + b + a:b``, the
  intercept is always the first term, a term is a *set* of factors (``b:a`` repeats
  ``a:b``) and repeats are dropped keeping the first.
* Whether a categorical factor gets full (``k``) or reduced (``k - 1``) coding in a
  term is decided by patsy's own rule, :func:`patsy.redundancy.pick_contrasts_for_term`,
  applied to symbolic factors in patsy's order (terms bucketed by their numeric
  factors, the bucket without numeric factors first, by degree within a bucket).
* Columns are then laid out in R's term order (by degree, then as written), the
  first factor of a term varying fastest, as in ``_ModelMatrix``.
* A column is the left-to-right product of its factors' values, as patsy computes it
  (floating-point multiplication is commutative but not associative, so the order
  is kept).
"""
import functools
import itertools
import re

import numpy as np
import patsy
from patsy.redundancy import pick_contrasts_for_term

from ._contrasts import DummyCoding, EffectsCoding, HelmertCoding, _Coding
from ._contrasts import _label as _level_label
from ._rsyntax import deparse, unquote

__all__ = ["fast_terms", "fast_plan", "FastMatrix"]

# A column: a plain identifier, or any name in backticks (R's quoting, which
# ``_rsyntax.canonical`` also gives dotted and non-ASCII column names).
_COLUMN = r"[A-Za-z_][A-Za-z0-9_]*|`(?:[^`\\]|\\.)+`"

_TOKEN = re.compile(rf"""
    \s*(?:
        (?P<abs2>abs2\s*\(\s*(?P<arg>{_COLUMN})\s*\))
      | (?P<name>{_COLUMN})(?![A-Za-z0-9_.(\[`])
      | (?P<num>[01])(?![A-Za-z0-9_.(\[])
      | (?P<op>[-+*:])
    )""", re.VERBOSE | re.ASCII)


def _column(token):
    return unquote(token) if token.startswith("`") else token

_ONE, _ZERO = "1", "0"


def _tokens(text):
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            return None
        pos = m.end()
        if m.group("abs2"):
            out.append(("abs2", _column(m.group("arg"))))
        elif m.group("name"):
            out.append(("col", _column(m.group("name"))))
        elif m.group("num"):
            out.append(m.group("num"))
        else:
            out.append(m.group("op"))
    return out


def _unique_terms(terms):
    """Drop repeated terms (a term is a set of factors), keeping the first."""
    seen, out = set(), []
    for term in terms:
        key = frozenset(term)
        if key not in seen:
            seen.add(key)
            out.append(term)
    return out


def _interact(left, right):
    # a term's factors keep their first position: a:b:a is a:b
    return _unique_terms([tuple(dict.fromkeys(lt + rt)) for lt in left for rt in right])


class _Parser:
    """Recursive descent over ``sum := [-] prod ((+|-) prod)*``, ``prod := inter (* inter)*``,
    ``inter := atom (: atom)*``; None on anything outside that grammar."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.pos = 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def next(self):
        tok = self.peek()
        self.pos += 1
        return tok

    def atom(self):
        tok = self.next()
        if isinstance(tok, tuple):
            return [(tok,)]
        return None

    def inter(self):
        terms = self.atom()
        while terms is not None and self.peek() == ":":
            self.next()
            right = self.atom()
            terms = None if right is None else _interact(terms, right)
        return terms

    def prod(self):
        if self.peek() in (_ONE, _ZERO):
            tok = self.next()
            # an intercept only stands alone between + and - signs
            return tok if self.peek() in (None, "+", "-") else None
        terms = self.inter()
        while terms is not None and self.peek() == "*":
            self.next()
            right = self.inter()
            terms = None if right is None else _unique_terms(
                terms + right + _interact(terms, right))
        return terms

    def parse(self):
        sign = "+"
        if self.peek() == "-":
            sign = self.next()
        removed, terms = False, []
        while True:
            item = self.prod()
            if item is None:
                return None
            if sign == "-":
                if item != _ONE:
                    return None  # "- 0" and removing terms: patsy's business
                removed = True
            elif item == _ONE:
                removed = False
            elif item == _ZERO:
                removed = True
            else:
                terms.extend(item)
            sign = self.next()
            if sign is None:
                break
            if sign not in ("+", "-"):
                return None
        return _unique_terms(([()] if not removed else []) + terms)


@functools.lru_cache(maxsize=512)
def fast_terms(text):
    """The terms of a model part, if it is in the fast path's grammar.

    Parameters
    ----------
    text : str
        A fixed part or a random term's expression, e.g. ``"1 + age * urban"``.

    Returns
    -------
    tuple of tuple or None
        One tuple of factors per term, in patsy's term order (the intercept, if any,
        is the empty tuple and comes first).  A factor is ``("col", name)`` or
        ``("abs2", name)``.  None when the text needs patsy.
    """
    tokens = _tokens(text)
    if not tokens:
        return None
    terms = _Parser(tokens).parse()
    return None if terms is None else tuple(terms)


def term_columns(terms):
    """Data columns the terms read, in reading order."""
    return list(dict.fromkeys(f[1] for term in terms for f in term))


@functools.lru_cache(maxsize=512)
def _layout(terms, numeric):
    """Subterms in column order: for each, ``((factor, coding), ...)`` in the term's
    factor order, coding None for a numeric factor, True for full and False for
    reduced coding of a categorical one."""
    buckets = {}
    for term in terms:
        buckets.setdefault(frozenset(f for f in term if f in numeric), []).append(term)
    # the bucket of terms without numeric factors is coded first, the rest as met
    order = [b for b in buckets if not b] + [b for b in buckets if b]
    codings = {}
    for bucket in order:
        used = set()
        for term in sorted(buckets[bucket], key=len):
            codings[term] = pick_contrasts_for_term(patsy.Term(list(term)), numeric, used)
    subterms = []
    for term in sorted(terms, key=len):  # R's order: by degree, then as written
        for coding in codings[term]:
            subterms.append(tuple((f, None if f in numeric else coding[f])
                                  for f in term if f in numeric or f in coding))
    return tuple(subterms)


def fast_plan(terms, specs, codings):
    """Check that the fast path can build these terms, and lay out their columns.

    Parameters
    ----------
    terms : tuple
        From :func:`fast_terms`.
    specs : dict
        Column name -> level list (categorical) or None (numeric).
    codings : dict
        Column name -> normalized coding.

    Returns
    -------
    tuple of subterms, or None when patsy must build the matrix (``abs2`` of a
    categorical column, a coding that is not one of ours).
    """
    numeric = set()
    for term in terms:
        for kind, col in term:
            if specs[col] is None:
                numeric.add((kind, col))
            elif kind == "abs2":
                return None
            else:
                coding = codings.get(col)
                if coding is not None and not isinstance(coding, _Coding):
                    return None
    return _layout(terms, frozenset(numeric))


def _contrast(coding, levels, full):
    """(matrix, column suffixes) of a categorical factor's full or reduced coding."""
    if coding is None or (type(coding) is DummyCoding and coding.base is None):
        # patsy's default Treatment: identity, minus the first column when reduced
        k = len(levels)
        if full:
            return np.eye(k), list(levels)
        return np.eye(k)[:, 1:], list(levels[1:])
    cm = coding.code_with_intercept(levels) if full else coding.code_without_intercept(levels)
    return np.asarray(cm.matrix, dtype=np.float64), list(cm.column_suffixes)


def _label(factor):
    # patsy names abs2(Q("x y")) as the factor's code, which shows as abs2(`x y`)
    kind, col = factor
    return col if kind == "col" else f"abs2({deparse(col)})"


class _Structure:
    """What a :class:`FastMatrix` knows before it sees a row: column names, the span of
    each subterm, the monomial of each column, the contrast matrices, and which
    columns can overflow.  The same for every matrix of one part over one set of
    levels and codings, so remembered (see :func:`_structure`)."""

    __slots__ = ("contrasts", "cats", "names", "spans", "monomial", "numeric_cols", "risky",
                 "table", "all_cols")

    def __init__(self, subterms, specs, codings):
        contrasts = {}

        def coding_of(col, full):
            key = (col, full)
            out = contrasts.get(key)
            if out is None:
                out = contrasts[key] = _contrast(codings.get(col), specs[col], full)
            return out

        self.cats = tuple(dict.fromkeys(f[1] for sub in subterms for f, full in sub
                                        if full is not None))
        names, spans = [], []
        for sub in subterms:
            per_factor = []
            for factor, full in sub:
                if full is None:
                    per_factor.append([_label(factor)])
                else:
                    col = factor[1]
                    _, suffixes = coding_of(col, full)
                    per_factor.append([f"{col}: {s}" for s in suffixes])
            start = len(names)
            if not per_factor:
                names.append("(Intercept)")
            else:
                # the first factor varies fastest, as in R and patsy
                for combo in itertools.product(*reversed(per_factor)):
                    names.append(" & ".join(reversed(combo)))
            spans.append((start, len(names)))
        self.names = tuple(names)
        self.spans = tuple(spans)
        # Columns with a numeric factor, and the monomial (product of numeric factors)
        # each column carries; 1 is the empty monomial.
        monomial, numeric_cols, risky = [], [], []
        for sub, (a, b) in zip(subterms, spans):
            nums = tuple(sorted(f for f, full in sub if full is None))
            monomial.extend([nums] * (b - a))
            if nums:
                numeric_cols.append((sub, a, b))
                # squares and products can overflow where their inputs are finite
                if len(sub) > 1 or any(f[0] == "abs2" for f in nums):
                    risky.extend(range(a, b))
        if not all(np.isfinite(m).all() and np.abs(m).max(initial=0.0) < 1e100
                   for m, _ in contrasts.values()):
            risky = list(range(len(names)))  # a user's coding with odd entries
        self.contrasts = contrasts
        self.table = None   # the cell table, made by the first matrix that needs it
        self.monomial = tuple(monomial)
        self.numeric_cols = tuple(numeric_cols)
        self.risky = tuple(risky)
        # every subterm with its columns: what a matrix without a cell table builds
        self.all_cols = tuple((sub, a, b) for sub, (a, b) in zip(subterms, spans))


# Codings whose contrasts depend on nothing but their class and base level (and the
# level list, which is part of the key anyway): structures using them are remembered.
_PLAIN_CODINGS = (DummyCoding, EffectsCoding, HelmertCoding)
# Remember no structure with more contrast entries than this (a factor of many levels).
_STRUCTURE_MAX_ENTRIES = 4096
_structures = {}


def _structure(subterms, specs, codings):
    """The :class:`_Structure` of one part, remembered when its codings allow."""
    key = _structure_key(subterms, specs, codings)
    st = None
    if key is not None:
        try:
            st = _structures.get(key)
        except TypeError:      # a level that cannot be hashed: not remembered
            key = None
    if st is None:
        st = _Structure(subterms, specs, codings)
        if key is not None and sum(m.size for m, _ in st.contrasts.values()) <= \
                _STRUCTURE_MAX_ENTRIES:
            for matrix, _ in st.contrasts.values():
                matrix.flags.writeable = False   # shared by every matrix built from it
            if len(_structures) >= 256:
                _structures.clear()
            _structures[key] = st
    return st


def _structure_key(subterms, specs, codings):
    """A key naming everything a structure depends on, or None (not remembered)."""
    parts = []
    for col, levels in specs.items():
        if levels is None:
            parts.append((col, None, None))
            continue
        coding = codings.get(col)
        if coding is None:
            how = None
        elif type(coding) in _PLAIN_CODINGS:
            # the base is matched by its label (True and 1 are equal, "true" and "1" not)
            how = (type(coding), None if coding.base is None else _level_label(coding.base))
        else:
            return None
        if len(levels) > _STRUCTURE_MAX_ENTRIES:
            return None
        parts.append((col, tuple(levels), how))
    return (subterms, tuple(parts))


class FastMatrix:
    """One model matrix (fixed part or a random term's columns) built with NumPy.

    Same interface as the patsy-backed ``_ModelMatrix``: ``names``, ``matrix``,
    ``specs``, ``what`` and :meth:`build` for new data; plus :meth:`gram`.

    Parameters
    ----------
    subterms : tuple
        From :func:`fast_plan`.
    specs : dict
        Column name -> level list or None, for the columns this part reads.
    codings : dict
        Column name -> coding.
    values : dict
        Column name -> numeric array or integer level codes, for the fitting rows.
    n : int
        Number of fitting rows.
    what : str
        What this matrix is, for messages.
    check_finite : callable
        ``check_finite(matrix, names, what, columns)`` raises on non-finite entries.
    keep_cells : bool
        Keep the fitting rows' cells for :meth:`gram`.

    Notes
    -----
    The categorical columns of the part cross into *cells* (one per combination of
    their levels, numbered in mixed radix).  When there are no more cells than rows,
    a table with one row per cell holds the product of the contrast entries of every
    column, and the columns without numeric factors are gathered from it in one pass
    (``table[cell]``), which is bit for bit the product patsy forms row by row.
    Columns with numeric factors are formed row by row, factor by factor.  The same
    cells give ``X'X`` from per-cell sums (:meth:`gram`) without a pass over X.
    """

    def __init__(self, subterms, specs, codings, values, n, what, check_finite,
                 keep_cells=False):
        self.subterms = subterms
        self.specs = dict(specs)
        self.what = what
        self._check = check_finite
        st = _structure(subterms, self.specs, codings)
        # the structure's tuples and read-only contrast matrices are shared, never changed;
        # the names are the matrix's own list
        self._contrasts = st.contrasts
        self._cats = st.cats
        self.names = list(st.names)
        self._spans = st.spans
        self._monomial = st.monomial
        self._numeric_cols = st.numeric_cols
        self._risky = st.risky
        self._cells = None
        self.matrix = self._assemble(values, n, keep=keep_cells, structure=st)
        self._check(self.matrix, self.names, self.what, self._risky)

    def copy_for(self, what):
        """This matrix as another part of the model with the same terms (a random term
        whose columns are the fixed part's, as in ``y ~ 1 + x + (1 + x | g)``): its own
        copy of the columns and of the names, under its own description."""
        new = object.__new__(FastMatrix)
        new.__dict__.update(self.__dict__)
        new.what = what
        new.specs = dict(self.specs)
        new.names = list(self.names)
        new.matrix = self.matrix.copy()
        new._cells = None
        return new

    def _product(self, sub, values, n, numeric=True):
        """Columns of one subterm, left-to-right product of its factors; with
        ``numeric=False`` numeric factors count as 1 (a cell table's entries)."""
        block = None
        for factor, full in sub:
            kind, col = factor
            if full is None:
                if not numeric:
                    continue
                x = values[col]
                # abs2 squares in the column's own dtype, as abs2() does under patsy
                part = np.asarray(x ** 2 if kind == "abs2" else x, dtype=np.float64)[:, None]
            else:
                part = self._contrasts[(col, full)][0][values[col]]
            if block is None:
                block = part
            else:
                # the new factor's index varies slowest: (n, new, old) -> (n, new*old)
                block = (part[:, :, None] * block[:, None, :]).reshape(n, -1)
        return np.ones((n, 1)) if block is None else block

    def _cell_codes(self, values, n, grid=True):
        """(cell per row, number of cells, per-column codes of each cell) or None;
        with ``grid=False`` the codes of each cell are not made (None)."""
        if not self._cats:
            return np.zeros(n, dtype=np.int64), 1, {}
        sizes = [len(self.specs[c]) for c in self._cats]
        ncells = 1
        for k in sizes:
            ncells *= k
        if ncells > max(n, 1):
            return None
        cell = np.array(values[self._cats[0]], dtype=np.int64)
        radix = 1
        for col, k_prev in zip(self._cats[1:], sizes[:-1]):
            radix *= k_prev
            cell += radix * np.asarray(values[col], dtype=np.int64)
        if not grid:
            return cell, ncells, None
        grid = np.unravel_index(np.arange(ncells), sizes, order="F")
        return cell, ncells, dict(zip(self._cats, grid))

    def _cell_table(self, grid, ncells):
        """The product of the contrast entries of every column, one row per cell."""
        table = np.empty((ncells, len(self.names)), dtype=np.float64)
        for sub, (a, b) in zip(self.subterms, self._spans):
            table[:, a:b] = self._product(sub, grid, ncells, numeric=False)
        return table

    def _assemble(self, values, n, keep=False, structure=None):
        p = len(self.names)
        # the cell table depends on the levels and codings alone: a structure keeps it
        known = None if structure is None else structure.table
        cells = self._cell_codes(values, n, grid=known is None) if self._cats else None
        if cells is not None:
            cell, ncells, grid = cells
            table = known
            if table is None:
                table = self._cell_table(grid, ncells)
                if structure is not None:
                    table.flags.writeable = False
                    structure.table = table
            mat = table.take(cell, axis=0)
            todo = self._numeric_cols
            if keep:
                self._cells = (cell, ncells, table)
        else:
            mat = np.empty((n, p), dtype=np.float64)
            todo = (structure.all_cols if structure is not None else
                    [(sub, a, b) for sub, (a, b) in zip(self.subterms, self._spans)])
        for sub, a, b in todo:
            if not sub:
                mat[:, a] = 1.0
            elif len(sub) == 1 and sub[0][1] is None and sub[0][0][0] == "col":
                # one numeric column: its values, converted as _product converts them
                mat[:, a] = values[sub[0][0][1]]
            else:
                mat[:, a:b] = self._product(sub, values, n)
        return mat

    def gram(self, values):
        """``X'X`` of the fitting rows from per-cell sums, or None when not cheaper.

        Parameters
        ----------
        values : dict
            The fitting rows' values, as given to the constructor.

        Notes
        -----
        Column ``j`` is ``c_j(cell) * m_j(row)``: its contrast product times its
        monomial.  So ``(X'X)_ab = sum_cells c_a c_b S_{m_a m_b}`` with ``S_uv`` the
        per-cell sums of ``m_u * m_v``: one ``bincount`` per pair of distinct
        monomials instead of a pass over X per pair of columns.  Summation order
        differs from ``X.T @ X``; the error is of the same order (``n eps`` relative
        to the column norms).
        """
        cells, self._cells = self._cells, None
        if self._cats:
            if cells is None:
                return None  # more cells than rows
            cell, ncells, table = cells
        else:
            cell, ncells, table = None, 1, np.ones((1, len(self.names)))
        monomials = list(dict.fromkeys(self._monomial))
        if len(monomials) > 6:
            return None
        mvalues = {}
        for mono in monomials:
            if mono:
                prod = None
                for kind, col in mono:
                    x = values[col]
                    x = np.asarray(x ** 2 if kind == "abs2" else x, dtype=np.float64)
                    prod = x if prod is None else prod * x
                mvalues[mono] = prod
        cols = {m: [j for j, mj in enumerate(self._monomial) if mj == m] for m in monomials}
        p = len(self.names)
        G = np.empty((p, p))
        for iu, u in enumerate(monomials):
            for v in monomials[iu:]:
                if ncells == 1:
                    # sums without a temporary the size of a column
                    if not u and not v:
                        total = float(self.matrix.shape[0])
                    elif not u or not v:
                        total = mvalues[u or v].sum()
                    else:
                        total = np.dot(mvalues[u], mvalues[v])
                    sums = np.array([total])
                else:
                    if not u and not v:
                        w = None
                    elif not u or not v:
                        w = mvalues[u or v]
                    else:
                        w = mvalues[u] * mvalues[v]
                    sums = np.bincount(cell, weights=w, minlength=ncells)
                A, B = cols[u], cols[v]
                block = table[:, A].T @ (sums[:, None] * table[:, B])
                G[np.ix_(A, B)] = block
                G[np.ix_(B, A)] = block.T
        return G

    def build(self, data):
        """The matrix for new data, same columns and coding.

        Parameters
        ----------
        data : pandas.DataFrame

        Returns
        -------
        numpy.ndarray
        """
        from ._design import _frame_values

        values = _frame_values(data, self.specs, f"{self.what} of new data")
        mat = self._assemble(values, len(data))
        self._check(mat, self.names, self.what, self._risky)
        return mat

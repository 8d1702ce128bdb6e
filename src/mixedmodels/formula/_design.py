"""Build the response, the fixed-effects matrix and the random-effects term data.

The pipeline is: split the formula (``_parse``), find every data column it touches,
drop (or refuse) incomplete rows, turn categorical columns into level codes with a
fixed level order (``_columns``: each column read, checked and factorized once),
expand the fixed part and each random term's columns, put the columns in R's term
order, name them as MixedModels.jl does, and remove aliased fixed-effects columns.

Each model matrix is built one of two ways, with identical results:

* ``_fast.FastMatrix``, straight from the level codes and numeric arrays with NumPy,
  for parts made of an intercept, data columns, ``abs2(col)`` and their ``:``/``*``
  interactions, with our own codings (what nearly every model uses);
* ``_ModelMatrix``, through patsy, for everything else (``I()``, ``np.log(x)``,
  parentheses, patsy contrast objects, ...).

Which one a part took shows in ``type(design._fixed)`` and ``type(reterm._matrix)``.

Two conventions shared with lme4 and MixedModels.jl decide what the matrices look like:

* Level order.  Strings sort as strings, booleans as false < true, numbers
  numerically; a pandas ``Categorical`` keeps its declared category order.  Levels
  absent from the rows used are dropped (as lme4's ``drop.unused.levels``).
* Column order.  patsy groups terms by the numeric factors they contain, which puts
  ``urban`` before ``age`` in ``1 + age + urban``; R orders terms by degree (the
  number of factors), then as written.  lme4 reports coefficients in R's order, so we
  permute patsy's columns term by term into that order.  patsy's choice of full or
  reduced coding per term is unchanged by the permutation.
"""
import ast
import builtins
import dataclasses
import functools
import io
import itertools
import keyword
import re
import tokenize
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import patsy
import patsy.builtins

from ._columns import ColumnCache
from ._columns import as_float as _as_float
from ._columns import encode as _encode
from ._columns import factorize as _factorize
from ._columns import is_numeric as _is_numeric
from ._columns import missing as _missing
from ._contrasts import (
    DummyCoding,
    _Coding,
    _label,
    clean_suffix,
    is_grouping,
    normalize_coding,
)
from ._fast import FastMatrix, fast_plan, fast_terms, term_columns
from ._parse import parse_formula

__all__ = ["Design", "ReTerm", "build_design", "abs2"]


def abs2(x):
    """Square of ``x``: Julia's ``abs2`` for real numbers, usable in formulas."""
    return np.asarray(x) ** 2


# Names a formula may use besides data columns.  A data column of the same name wins,
# as it does in patsy's own lookup.
_ENV = {name: getattr(patsy.builtins, name) for name in patsy.builtins.__all__}
_ENV.update({"np": np, "numpy": np, "abs2": abs2,
             "log": np.log, "exp": np.exp, "sqrt": np.sqrt})

# The relative tolerance of the left-to-right rank test on X: a column whose part
# orthogonal to the columns kept before it is below this fraction of its own norm is
# taken as aliased.
RANK_RTOL = 1e-8


# ---------------------------------------------------------------------------
# Columns and levels
# ---------------------------------------------------------------------------

def _names_in(code, what, formula):
    """Variable names an expression reads, in reading order (``Q("x")`` gives ``x``)."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot parse formula {formula!r}: {what} {code!r} is not a "
                         f"valid expression ({err.msg})") from None
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.append((node.lineno, node.col_offset, node.id))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "Q" and node.args
              and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.col_offset, node.args[0].value))
    out = []
    for _, _, name in sorted(found):
        if name not in out:
            out.append(name)
    return out


def _quote_keywords(text, columns):
    """Write data columns named like Python keywords (``yield``) as ``Q("yield")``.

    patsy evaluates factors as Python, where such a name is a syntax error.
    """
    if not any(keyword.iskeyword(c) for c in columns if isinstance(c, str)):
        return text
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return text
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    out, last = [], 0
    for tok in tokens:
        if tok.type == tokenize.NAME and keyword.iskeyword(tok.string) and tok.string in columns:
            begin = starts[tok.start[0] - 1] + tok.start[1]
            out.append(text[last:begin])
            out.append(f'Q("{tok.string}")')
            last = begin + len(tok.string)
    out.append(text[last:])
    return "".join(out)


def _resolve(names, columns):
    """Keep the names that are data columns; fail on names that are nothing known."""
    cols = []
    for name in names:
        if name in columns:
            cols.append(name)
        elif name in _ENV or hasattr(builtins, name):
            continue
        else:
            raise ValueError(f"column {name!r} not found in data")
    return cols


def _need_column(name, columns):
    if name not in columns:
        raise ValueError(f"column {name!r} not found in data")


def _frame_values(data, specs, what):
    """The values a model matrix reads, checked: numeric arrays and level codes.

    ``specs`` maps column name to its level list, or None for a numeric column.
    Numeric columns come as their own int/float array (float64 otherwise),
    categorical ones as int64 codes into their level list.
    """
    values = {}
    for name, levels in specs.items():
        _need_column(name, data.columns)
        series = data[name]
        if levels is None:
            if not _is_numeric(series):
                raise ValueError(f"column {name!r} in {what} is not numeric")
            vals = series.to_numpy()
            if vals.dtype.kind not in "iuf":
                vals = _as_float(series)
            bad = ~np.isfinite(vals.astype(np.float64, copy=False))
        else:
            vals, unseen = _encode(series, levels)
            if unseen:
                raise ValueError(f"column {name!r} in {what} has levels not seen in "
                                 f"fitting: {unseen}")
            bad = vals < 0
        if bad.any():
            raise ValueError(f"column {name!r} in {what} has {int(bad.sum())} missing or "
                             "non-finite values")
        values[name] = vals
    return values


def _patsy_frame(data, specs, what):
    """The columns patsy needs: numeric as arrays, categorical with fixed levels.

    ``specs`` maps column name to its level list, or None for a numeric column.
    """
    values = _frame_values(data, specs, what)
    return _as_patsy_frame(values, specs, len(data))


def _as_patsy_frame(values, specs, n):
    cols = {}
    for name, levels in specs.items():
        vals = values[name]
        cols[name] = vals if levels is None else pd.Categorical.from_codes(vals, categories=levels)
    return pd.DataFrame(cols, index=pd.RangeIndex(n))


def _check_finite(mat, names, what, columns=None):
    """Raise naming the columns of ``mat`` (all, or those listed) with non-finite values."""
    if columns is None:
        bad = np.flatnonzero(~np.isfinite(mat).all(axis=0))
    elif columns:
        sub = np.asarray(columns, dtype=np.intp)
        bad = sub[~np.isfinite(mat[:, sub]).all(axis=0)]
    else:
        return
    if len(bad):
        cols = [names[j] for j in bad]
        raise ValueError(f"{what} has non-finite values in column(s) {cols}")


# ---------------------------------------------------------------------------
# One model matrix (the fixed part, or one random term's columns)
# ---------------------------------------------------------------------------

_Q_CALL = re.compile(r"""^Q\(\s*(["'])(.*)\1\s*\)$""")
_C_CALL = re.compile(r"^C\(\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(?:,.*)?\)$", re.S)


def _bare_column(code):
    """The column a factor's code names directly (``x`` or ``Q("x")``), else None."""
    code = code.strip()
    if code.isidentifier():
        return code
    m = _Q_CALL.match(code)
    return m.group(2) if m else None


@functools.lru_cache(maxsize=256)
def _patsy_desc(text):
    # patsy's parse is pure symbol work; its ModelDesc is not modified downstream
    return patsy.ModelDesc.from_formula(text)


def _model_desc(text, formula, what, columns):
    text = _quote_keywords(text, columns)
    try:
        desc = _patsy_desc(text)
    except patsy.PatsyError as err:
        raise ValueError(f"cannot parse formula {formula!r}: {what} {text!r}: "
                         f"{err.message}") from None
    if desc.lhs_termlist:
        raise ValueError(f"cannot parse formula {formula!r}: '~' inside {what} {text!r}")
    return desc


def _desc_columns(desc, columns, formula, what):
    cols = []
    for term in desc.rhs_termlist:
        for factor in term.factors:
            for name in _resolve(_names_in(factor.code, what, formula), columns):
                if name not in cols:
                    cols.append(name)
    return cols


class _ModelMatrix:
    """A patsy design for one part of the formula, in R's column order, with names.

    Parameters
    ----------
    desc : patsy.ModelDesc
        The part's terms (no response).
    specs : dict
        Column name -> level list (categorical) or None (numeric), for the columns
        this part reads.
    codings : dict
        Column name -> coding for categorical columns.
    frame : pandas.DataFrame
        The fitting rows, as made by :func:`_patsy_frame`.
    what : str
        What this matrix is, for messages ("the fixed-effects part").
    """

    def __init__(self, desc, specs, codings, frame, what):
        self.specs = dict(specs)
        self.what = what
        env = dict(_ENV)
        # How each factor's contrast columns get their level names: "levels" when
        # patsy's default treatment coding is used on our level list, "labels" when
        # one of our codings names them, "patsy" for patsy's own contrast objects.
        display, naming = {}, {}
        mapped = {}
        for term in desc.rhs_termlist:
            for factor in term.factors:
                if factor in mapped:
                    continue
                col = _bare_column(factor.code)
                new = factor
                if col is not None and self.specs.get(col) is not None:
                    display[new] = col
                    coding = codings.get(col)
                    if coding is None or (type(coding) is DummyCoding and coding.base is None):
                        # patsy's Treatment equals DummyCoding() here, and a plain
                        # pandas Categorical keeps patsy on its fast vectorised path;
                        # wrapping it in C() would convert element by element.
                        naming[new] = ("levels", self.specs[col])
                    else:
                        var = f"__mm_coding_{len(mapped)}__"
                        env[var] = coding
                        new = patsy.EvalFactor(f"C({factor.code}, {var})")
                        display[new] = col
                        naming[new] = ("labels" if isinstance(coding, _Coding) else "patsy",
                                       None)
                else:
                    m = _C_CALL.match(factor.code)
                    display[new] = col if col is not None else (
                        m.group(1) if m and m.group(1) in self.specs else factor.name())
                    naming[new] = ("patsy", None)
                mapped[factor] = new
        terms = [patsy.Term([mapped[f] for f in t.factors]) for t in desc.rhs_termlist]
        self._env = patsy.EvalEnvironment([env])
        try:
            dm = patsy.dmatrix(patsy.ModelDesc([], terms), frame, eval_env=self._env,
                               NA_action="raise", return_type="matrix")
        except patsy.PatsyError as err:
            raise ValueError(f"cannot build {what}: {err.message}") from None
        self.design_info = dm.design_info
        self.order, self.names = self._order_and_names(terms, display, naming)
        self.matrix = np.ascontiguousarray(np.asarray(dm, dtype=np.float64)[:, self.order])
        self._check_finite(self.matrix)

    def _order_and_names(self, terms, display, naming):
        info = self.design_info
        names_by_term = {}
        for term, subterms in info.term_codings.items():
            names = []
            for sub in subterms:
                per_factor = []
                for factor in sub.factors:
                    label = display[factor]
                    if factor in sub.contrast_matrices:
                        suffixes = sub.contrast_matrices[factor].column_suffixes
                        how, levels = naming[factor]
                        if how == "levels":
                            # full coding names every level, reduced drops the first
                            suffixes = levels[len(levels) - len(suffixes):]
                        elif how == "patsy":
                            suffixes = [clean_suffix(s) for s in suffixes]
                        per_factor.append([f"{label}: {s}" for s in suffixes])
                    else:
                        k = info.factor_infos[factor].num_columns
                        per_factor.append([label] if k == 1
                                          else [f"{label}[{i}]" for i in range(k)])
                if not per_factor:
                    names.append("(Intercept)")
                    continue
                # patsy varies the first factor fastest within a subterm, as R does.
                for combo in itertools.product(*reversed(per_factor)):
                    names.append(" & ".join(reversed(combo)))
            names_by_term[term] = names
        # R's term order: by degree, ties as written (sorted() is stable).
        r_terms = sorted(terms, key=lambda t: len(t.factors))
        order, names = [], []
        for term in r_terms:
            sl = info.term_slices[term]
            order.extend(range(sl.start, sl.stop))
            assert len(names_by_term[term]) == sl.stop - sl.start
            names.extend(names_by_term[term])
        return np.array(order, dtype=np.intp), names

    def _check_finite(self, mat):
        _check_finite(mat, self.names, self.what)

    def build(self, data):
        """The matrix for new data, same columns and coding.

        Parameters
        ----------
        data : pandas.DataFrame

        Returns
        -------
        numpy.ndarray
        """
        frame = _patsy_frame(data, self.specs, f"{self.what} of new data")
        try:
            (dm,) = patsy.build_design_matrices([self.design_info], frame,
                                                NA_action="raise", return_type="matrix")
        except patsy.PatsyError as err:
            raise ValueError(f"cannot build {self.what} for new data: {err.message}") from None
        mat = np.ascontiguousarray(np.asarray(dm, dtype=np.float64)[:, self.order])
        self._check_finite(mat)
        return mat


def _aliased_columns(X, rtol=RANK_RTOL, gram=None):
    """Indices of columns that are (numerically) combinations of earlier ones.

    Notes
    -----
    With ``X = QR`` (``Q`` with orthonormal columns) the columns of ``R`` have the
    same inner products as those of ``X``, so the sequential test runs on the small
    ``R``.  Column ``j`` is aliased when its component orthogonal to the columns kept
    so far, ``r_j``, satisfies ``||r_j|| <= rtol * ||x_j||``.  Gram-Schmidt is applied
    twice per column to keep the orthogonal basis orthogonal to working precision.
    Householder QR cannot fail, so neither can this test.
    """
    p = X.shape[1]
    if p == 0 or _clearly_full_rank(X.T @ X if gram is None else gram):
        return []
    R = np.linalg.qr(X, mode="r")
    basis = np.zeros((R.shape[0], p))
    k = 0
    aliased = []
    for j in range(p):
        v = R[:, j].copy()
        norm = np.linalg.norm(v)
        for _ in range(2):
            if k:
                v -= basis[:, :k] @ (basis[:, :k].T @ v)
        resid = np.linalg.norm(v)
        if norm == 0.0 or resid <= rtol * norm:
            aliased.append(j)
        else:
            basis[:, k] = v / resid
            k += 1
    return aliased


# Smallest eigenvalue of X's correlation matrix that :func:`_clearly_full_rank` accepts.
_GRAM_EIG_MIN = 1e-6


def _clearly_full_rank(G):
    """True when no column of X can come out aliased from the QR test, decided from
    ``G = X'X`` alone.

    Notes
    -----
    With ``D = diag(X'X)`` and ``C = D^-1/2 X'X D^-1/2`` (unit diagonal), the squared
    relative residual of column ``j`` against the columns before it is
    ``1 / (C_{1:j,1:j}^{-1})_{jj} >= lambda_min(C)``.  ``X'X`` is accurate to about
    ``n eps`` relative to the column norms and the QR of the aliasing test is exact
    for X perturbed by about as much, so when ``lambda_min(C) > 1e-6`` every residual
    is above ``1e-3`` times its column's norm under either perturbation, far from the
    ``RANK_RTOL`` (1e-8) boundary: the QR test would alias nothing.  Otherwise (a
    near-collinear or zero column) the caller runs the QR test itself.  ``X'X`` costs
    one pass over X (or less: see ``FastMatrix.gram``); Householder QR of a tall X
    costs several.
    """
    d = np.diag(G)
    if not (np.all(d > 0) and np.all(np.isfinite(G))):
        return False
    if len(d) == 1:
        return True
    if len(d) == 2:  # eigenvalues of [[1, c], [c, 1]] are 1 -+ |c|
        return bool(1.0 - abs(G[0, 1]) / np.sqrt(d[0] * d[1]) > _GRAM_EIG_MIN)
    s = 1.0 / np.sqrt(d)
    C = G * s[:, None] * s[None, :]
    return bool(np.linalg.eigvalsh(C)[0] > _GRAM_EIG_MIN)


# ---------------------------------------------------------------------------
# Grouping factors
# ---------------------------------------------------------------------------

def _group_codes(factors):
    """Codes and labels of the interaction of one or more grouping columns.

    Parameters
    ----------
    factors : list of (codes, levels)
        Each grouping column's level codes (integers, rows used) and level labels.

    Notes
    -----
    Combinations are coded pairwise (key ``a * n_b + b``), so keys never exceed the
    product of two level counts, and numbered in key order, which is lexicographic
    in the components.  The keys seen are found with a presence table when it is no
    larger than a few times n (linear time), else with ``np.unique``.

    Returns
    -------
    codes : int64 ndarray
    labels : list of str
    components : list of list of str
        Each column's own levels.
    steps : list of (int, ndarray)
        For each further column, its level count and the sorted combined keys seen.
    """
    codes, labels = factors[0]
    components = [labels]
    steps = []
    for c2, l2 in factors[1:]:
        key = np.asarray(codes, dtype=np.int64) * len(l2) + c2
        size = len(labels) * len(l2)
        if size <= 4 * len(key) + 1024:
            present = np.zeros(size, dtype=bool)
            present[key] = True
            uniq = np.flatnonzero(present).astype(np.int64)
            rank = np.cumsum(present, dtype=np.int64) - 1
            codes = rank[key]
        else:
            uniq, inverse = np.unique(key, return_inverse=True)
            codes = inverse.astype(np.int64).ravel()
        labels = [f"{labels[k // len(l2)]} & {l2[k % len(l2)]}" for k in uniq.tolist()]
        components.append(l2)
        steps.append((len(l2), uniq))
    return codes, labels, components, steps


@dataclass(frozen=True, eq=False)
class ReTerm:
    """The data of one random-effects term.

    Attributes
    ----------
    group_name : str
        The grouping factor, e.g. ``"subj"`` or ``"batch & cask"``.
    codes : numpy.ndarray of int32, shape (n,)
        Each row's level index into `levels`.
    levels : list of str
        The grouping factor's levels (combinations joined by ``" & "``).
    cnames : list of str
        Names of the term's columns, e.g. ``["(Intercept)", "days"]``.
    z : numpy.ndarray of float64, shape (n, k)
        The term's columns, C-contiguous.
    zerocorr : bool
        True for ``||``: the random effects within a level are uncorrelated.
    """

    group_name: str
    codes: np.ndarray
    levels: list
    cnames: list
    z: np.ndarray
    zerocorr: bool
    _grouping: tuple = field(default=(), repr=False)
    _components: list = field(default_factory=list, repr=False)
    _steps: list = field(default_factory=list, repr=False)
    _matrix: object = field(default=None, repr=False)

    @property
    def nlevels(self):
        """Number of levels of the grouping factor."""
        return len(self.levels)

    @property
    def ncols(self):
        """Number of columns of `z`."""
        return self.z.shape[1]

    def new_codes(self, newdata):
        """Level codes and columns of this term for new data.

        Parameters
        ----------
        newdata : pandas.DataFrame

        Returns
        -------
        codes : numpy.ndarray of int32
            Level index per row; -1 for a level (or combination) not seen in fitting,
            or a missing grouping value.
        z : numpy.ndarray of float64, shape (m, k)
        """
        data = _as_frame(newdata)
        for name in self._grouping:
            _need_column(name, data.columns)
        codes, _ = _encode(data[self._grouping[0]], self._components[0])
        for name, levels, (width, keys) in zip(self._grouping[1:], self._components[1:],
                                               self._steps):
            c2, _ = _encode(data[name], levels)
            key = codes * width + c2
            pos = np.clip(np.searchsorted(keys, key), 0, max(len(keys) - 1, 0))
            found = (codes >= 0) & (c2 >= 0) & (keys[pos] == key)
            codes = np.where(found, pos, -1)
        z = self._matrix.build(data)
        return codes.astype(np.int32), z


# ---------------------------------------------------------------------------
# The design
# ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Design:
    """Everything a mixed model needs from a formula and a data frame.

    Attributes
    ----------
    formula : str
    response_name : str
        The left-hand side as written, e.g. ``"incid / hsz"``.
    y : numpy.ndarray of float64, shape (n,)
    y_levels : tuple of str or None
        ``(failure, success)`` for a two-level non-numeric response (y is 1.0 for the
        second); None for a numeric response.
    X : numpy.ndarray of float64, shape (n, p)
        Fixed-effects model matrix without aliased columns, C-contiguous.
    coef_names : list of str
        Names of the columns of `X`.
    dropped : list of str
        Names of aliased columns removed from `X`.
    reterms : list of ReTerm
        Random-effects terms in the order written (nesting expanded).
    weights, offset : numpy.ndarray of float64 or None
    n : int
        Number of rows used.
    rows_used : numpy.ndarray of int64
        Positions of the rows of ``data`` that were used.
    parsed : ParsedFormula
    """

    formula: str
    response_name: str
    y: np.ndarray
    y_levels: tuple
    X: np.ndarray
    coef_names: list
    dropped: list
    reterms: list
    weights: np.ndarray
    offset: np.ndarray
    n: int
    rows_used: np.ndarray
    parsed: object = field(default=None, repr=False)
    _fixed: object = field(default=None, repr=False)
    _keep: np.ndarray = field(default=None, repr=False)

    def fixed_matrix(self, newdata):
        """The fixed-effects model matrix for new data.

        Same columns as `X` (aliased columns removed), same contrasts and level
        coding; new data may hold only some of the levels of a factor.

        Parameters
        ----------
        newdata : pandas.DataFrame

        Returns
        -------
        numpy.ndarray of float64, shape (m, p)
        """
        mat = self._fixed.build(_as_frame(newdata))
        return np.ascontiguousarray(mat[:, self._keep])


def _as_frame(data):
    if isinstance(data, pd.DataFrame):
        return data
    try:
        return pd.DataFrame(data)
    except Exception as err:
        raise ValueError(f"data must be a pandas DataFrame or a mapping of columns: {err}")


def _side_array(value, what, data):
    """weights/offset given as a column name or an array -> (label, float array)."""
    if isinstance(value, str):
        _need_column(value, data.columns)
        series = data[value]
        label = value
    else:
        arr = np.asarray(value)
        if arr.ndim != 1 or len(arr) != len(data):
            raise ValueError(f"{what} must have one value per row of data "
                             f"({len(data)}); got shape {arr.shape}")
        series = pd.Series(arr)
        label = what
    if not _is_numeric(series):
        name = what if label == what else f"{what} column {label!r}"
        raise ValueError(f"{name} must be numeric")
    return label, _as_float(series)


def _response(lhs, data, columns, formula, cache):
    """Evaluate the left-hand side over all rows.

    Returns
    -------
    series : pandas.Series
    bad : ndarray of bool or None
        Rows where the response is missing or non-finite (None: none can be).
    column : str or None
        The data column when the response is one, else None.
    """
    name = lhs.strip()
    if name in data.columns:
        columns.extend(n for n in [name] if n not in columns)
        return cache.series(name), cache.missing(name), name
    lhs = _quote_keywords(lhs, data.columns)
    names = _resolve(_names_in(lhs, "response", formula), data.columns)
    ns = {}
    for name in names:
        s = data[name]
        if not _is_numeric(s):
            ns[name] = s.to_numpy(dtype=object)
        elif s.dtype.kind in "iuf":
            ns[name] = s.to_numpy()
        else:
            ns[name] = _as_float(s)
    try:
        value = eval(compile(lhs.strip(), "<response>", "eval"),
                     {"__builtins__": builtins, **_ENV}, ns)
    except Exception as err:
        raise ValueError(f"cannot evaluate the response {lhs.strip()!r}: {err}") from None
    value = np.asarray(value)
    if value.ndim != 1 or len(value) != len(data):
        raise ValueError(f"the response {lhs!r} must give one value per row; "
                         f"got shape {value.shape}")
    series = pd.Series(value, name=lhs)
    columns.extend(n for n in names if n not in columns)
    return series, _missing(series), None


def _y_from(series, lhs, factorized=None):
    if _is_numeric(series):
        return _as_float(series), None
    codes, levels = _factorize(series) if factorized is None else factorized
    if len(levels) != 2:
        raise ValueError(f"the response {lhs!r} is not numeric and has {len(levels)} "
                         f"level(s) {levels[:10]}; a non-numeric response needs exactly two")
    return (codes == 1).astype(np.float64), (levels[0], levels[1])


def _float_values(series):
    """A numeric column as float64 values, possibly a view of the data."""
    values = series.to_numpy()
    if values.dtype.kind in "iuf":
        return values.astype(np.float64, copy=False)
    return _as_float(series)


@functools.lru_cache(maxsize=256)
def _parse_cached(formula):
    return parse_formula(formula)


def _parse(formula):
    """:func:`parse_formula`, remembered per formula text (a fresh list each call)."""
    if not isinstance(formula, str):
        return parse_formula(formula)
    parsed = _parse_cached(formula)
    return dataclasses.replace(parsed, random=list(parsed.random))


class _Part:
    """One model matrix to build: its text, the columns it reads, and how.

    ``terms`` holds the fast path's terms when the text is in its grammar and reads
    only data columns, else None and ``desc`` holds patsy's description.
    """

    __slots__ = ("text", "what", "cols", "terms", "desc")

    def __init__(self, text, what, cols, terms, desc):
        self.text, self.what, self.cols, self.terms, self.desc = text, what, cols, terms, desc


def _part(text, formula, what, columns, fast):
    if fast:
        terms = fast_terms(text)
        if terms is not None:
            cols = term_columns(terms)
            squares = any(f[0] == "abs2" for t in terms for f in t)
            # names that are not columns (and a column shadowing abs2) are patsy's to
            # resolve or report
            if all(c in columns for c in cols) and not (squares and "abs2" in columns):
                return _Part(text, what, cols, terms, None)
    desc = _model_desc(text, formula, what, columns)
    return _Part(text, what, _desc_columns(desc, columns, formula, what), None, desc)


def build_design(formula, data, contrasts=None, weights=None, offset=None,
                 na_action="drop"):
    """Build the response, fixed-effects matrix and random-effects terms of a model.

    Parameters
    ----------
    formula : str
        lme4-style formula, e.g. ``"reaction ~ 1 + days + (1 + days | subj)"``.  The
        fixed part is patsy syntax (plus ``abs2(x)`` for ``x**2``); random terms are
        ``(expr | g)``, ``(expr || g)`` (uncorrelated), with ``g`` a column, an
        interaction ``a & b`` / ``a:b`` or a nesting ``a/b``.
    data : pandas.DataFrame
    contrasts : dict, optional
        Column name -> coding (:class:`DummyCoding`, :class:`EffectsCoding`,
        :class:`HelmertCoding`, :class:`Grouping`, a patsy contrast or a contrast
        matrix).  A coding given for a numeric column makes it categorical.  Entries
        for columns not in the formula are ignored.
    weights, offset : str or array_like, optional
        A column name or one value per row of ``data``.
    na_action : {"drop", "raise"}
        What to do with rows holding missing or non-finite values in any column the
        model uses: drop them with a warning, or raise ``ValueError``.

    Returns
    -------
    Design

    Raises
    ------
    ValueError
        For an unparseable formula, a column not in ``data``, missing values with
        ``na_action="raise"``, a single-level grouping factor, a non-numeric response
        without exactly two levels, or negative or non-finite weights.

    Examples
    --------
    >>> import mixedmodels
    >>> d = build_design("reaction ~ 1 + days + (1 + days | subj)",
    ...                  mixedmodels.dataset("sleepstudy"))
    >>> d.X.shape, d.coef_names, d.reterms[0].nlevels
    ((180, 2), ['(Intercept)', 'days'], 18)
    """
    return _build_design(formula, data, contrasts, weights, offset, na_action, fast=True)


def _build_design(formula, data, contrasts=None, weights=None, offset=None,
                  na_action="drop", fast=True):
    """:func:`build_design`; ``fast=False`` builds every model matrix with patsy."""
    if na_action not in ("drop", "raise"):
        raise ValueError(f"na_action must be 'drop' or 'raise', not {na_action!r}")
    data = _as_frame(data)
    parsed = _parse(formula)
    codings = {}
    for name, coding in (contrasts or {}).items():
        codings[name] = normalize_coding(coding)
    columns = data.columns
    cache = ColumnCache(data)

    # Which columns each part reads; unknown names fail here, before any work.
    used = []
    resp_series, resp_bad, resp_col = _response(parsed.response, data, used, formula, cache)
    fixed_part = _part(parsed.fixed, formula, "the fixed-effects part", columns, fast)
    random_parts = []
    for term in parsed.random:
        random_parts.append(_part(term.expr, formula, f"random-effects term {term.text}",
                                  columns, fast))
        for g in term.grouping:
            _need_column(g, columns)
    for part in [fixed_part] + random_parts:
        for name in part.cols:
            if is_grouping(codings.get(name)):
                where = ("the fixed-effects part" if part is fixed_part else part.what)
                raise ValueError(f"column {name!r} has the Grouping() contrast and cannot "
                                 f"appear in {where}")
    matrix_cols = list(dict.fromkeys(c for part in [fixed_part] + random_parts
                                     for c in part.cols))
    group_cols = list(dict.fromkeys(g for t in parsed.random for g in t.grouping))
    w_label, w_all = _side_array(weights, "weights", data) if weights is not None else (None, None)
    o_label, o_all = _side_array(offset, "offset", data) if offset is not None else (None, None)

    # Incomplete rows.  A NaN weight is a missing value; an infinite or negative one is
    # an error below, since dropping it would silently change the model.  A mask of
    # None means the column cannot hold a missing value (an integer column).
    n_all = len(data)
    bad_by = {}
    for name in dict.fromkeys(used + matrix_cols + group_cols):
        bad_by[name] = cache.missing(name)
    if w_all is not None:
        bad_by[w_label] = _or(bad_by.get(w_label), np.isnan(w_all))
    if o_all is not None:
        bad_by[o_label] = _or(bad_by.get(o_label), ~np.isfinite(o_all))
    bad = None
    for mask in bad_by.values():
        bad = _or(bad, mask)
    # The response expression can be undefined where its columns are fine (0 / 0).
    if resp_bad is not None and (resp_bad if bad is None else resp_bad & ~bad).any():
        bad_by[parsed.response] = resp_bad
        bad = _or(bad, resp_bad)
    if bad is not None and bad.any():
        cols = [name for name, mask in bad_by.items() if mask is not None and mask.any()]
        count = int(bad.sum())
        if na_action == "raise":
            raise ValueError(f"{count} row(s) have missing or non-finite values in "
                             f"column(s) {cols}")
        if count == n_all:
            raise ValueError(f"all {count} rows have missing or non-finite values "
                             f"(column(s) {cols})")
        warnings.warn(f"dropped {count} of {n_all} row(s) with missing or non-finite "
                      f"values in column(s) {cols}", stacklevel=3)
        rows = np.flatnonzero(~bad).astype(np.int64)
        cache.keep(rows)
    else:
        rows = np.arange(n_all, dtype=np.int64)
        cache.keep(None)
    n = len(rows)

    if resp_col is None:
        y, y_levels = _y_from(resp_series.iloc[rows].reset_index(drop=True), parsed.response)
    elif cache.is_numeric(resp_col):
        y, y_levels = np.array(cache.take(_float_values(resp_series)), dtype=np.float64), None
    else:
        y, y_levels = _y_from(resp_series, parsed.response, cache.factor(resp_col))

    specs, orders = {}, {}
    for name in matrix_cols:
        coding = codings.get(name)
        if coding is None and cache.is_numeric(name):
            specs[name] = None
            continue
        orders[name] = getattr(coding, "levels", None)
        _, specs[name] = cache.factor(name, orders[name])
        base = getattr(coding, "base", None)
        if base is not None and _label(base) not in specs[name]:
            raise ValueError(f"base level {_label(base)!r} of the coding of column {name!r} "
                             f"is not one of its levels {specs[name]}")

    def values(name):
        if specs[name] is None:
            return cache.numeric(name)
        return cache.factor(name, orders[name])[0]

    frame = None

    # per-cell sums beat a pass over X for X'X only when X is tall
    tall = n >= 20000

    def model_matrix(part, what):
        nonlocal frame
        part_specs = {c: specs[c] for c in part.cols}
        if part.terms is not None:
            plan = fast_plan(part.terms, part_specs, codings)
            if plan is not None:
                return FastMatrix(plan, part_specs, codings, {c: values(c) for c in part.cols},
                                  n, what, _check_finite, keep_cells=tall and part is fixed_part)
            part.desc = _model_desc(part.text, formula, part.what, columns)
        if frame is None:
            frame = _as_patsy_frame({c: values(c) for c in matrix_cols}, specs, n)
        return _ModelMatrix(part.desc, part_specs, codings, frame, what)

    fixed = model_matrix(fixed_part, "the fixed-effects model matrix")
    gram = None
    if isinstance(fixed, FastMatrix) and tall:
        gram = fixed.gram({c: values(c) for c in fixed_part.cols})
    aliased = _aliased_columns(fixed.matrix, gram=gram)
    dropped = [fixed.names[j] for j in aliased]
    if dropped:
        warnings.warn("fixed-effects model matrix is rank deficient; dropping aliased "
                      f"columns: {dropped}", stacklevel=3)
        keep = np.setdiff1d(np.arange(len(fixed.names)), aliased).astype(np.intp)
        X = np.ascontiguousarray(fixed.matrix[:, keep])
    else:
        keep = np.arange(len(fixed.names), dtype=np.intp)
        X = fixed.matrix

    reterms = []
    for term, part in zip(parsed.random, random_parts):
        group = term.group_name
        codes, labels, components, steps = _group_codes([cache.factor(g)
                                                         for g in term.grouping])
        if len(labels) < 2:
            raise ValueError(f"grouping factor {group!r} has a single level")
        zmat = model_matrix(part, f"the columns of random-effects term {term.text}")
        if not zmat.names:
            raise ValueError(f"random-effects term {term.text} has no columns")
        reterms.append(ReTerm(group, codes.astype(np.int32), labels, list(zmat.names),
                              zmat.matrix, term.zerocorr, tuple(term.grouping),
                              components, steps, zmat))

    w = o = None
    if w_all is not None:
        w = np.array(cache.take(w_all), dtype=np.float64)
        invalid = ~np.isfinite(w) | (w < 0)
        if invalid.any():
            where = rows[invalid][:5].tolist()
            name = "weights" if w_label == "weights" else f"weights column {w_label!r}"
            raise ValueError(f"{name} must be finite and non-negative; {int(invalid.sum())} "
                             f"value(s) are not, e.g. {w[invalid][:5].tolist()} at rows {where}")
    if o_all is not None:
        o = np.array(cache.take(o_all), dtype=np.float64)

    return Design(formula=formula, response_name=parsed.response, y=y, y_levels=y_levels,
                  X=X, coef_names=[fixed.names[j] for j in keep], dropped=dropped,
                  reterms=reterms, weights=w, offset=o, n=len(y), rows_used=rows,
                  parsed=parsed, _fixed=fixed, _keep=keep)


def _or(a, b):
    """Union of two row masks, either of which may be None (no rows); never in place."""
    if a is None:
        return b
    if b is None:
        return a
    return a | b

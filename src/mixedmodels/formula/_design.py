"""Build the response, the fixed-effects matrix and the random-effects term data.

The pipeline is: split the formula (``_parse``), find every data column it touches,
drop (or refuse) incomplete rows, turn categorical columns into level codes with a
fixed level order (``_columns``: each column read, checked and factorized once),
expand the fixed part and each random term's columns, put the columns in R's term
order, name them as MixedModels.jl does, and remove aliased fixed-effects columns.
What depends on the formula text and the column names alone (the split, the parts and
the columns they read) is worked out once per pandas column Index (``_plan``).

Each model matrix is built one of two ways, with identical results:

* ``_fast.FastMatrix``, straight from the level codes and numeric arrays with NumPy,
  for parts made of an intercept, data columns, ``abs2(col)`` and their ``:``/``*``
  interactions, with our own codings (what nearly every model uses);
* ``_ModelMatrix``, through patsy, for everything else (``I()``, ``np.log(x)``,
  parentheses, patsy contrast objects, ...).

Which one a part took shows in ``type(design._fixed)`` and ``type(reterm._matrix)``.

Before either sees a part, R's spelling is made explicit (``_rsyntax``): ``^`` becomes
``**`` (power inside calls, crossing in the formula algebra, as in R), and columns
whose names are not plain identifiers (`` `subject id` ``, ``days.n``) are written in
backticks, which the fast path reads directly and patsy reads as ``Q("...")``.
``offset(expr)`` terms build a one-column matrix each, summed into the offset; a
``cbind(successes, failures)`` response gives a proportion and its trials.

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
import functools
import io
import itertools
import keyword
import math
import re
import tokenize
import warnings
import weakref
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import patsy
import patsy.builtins
from patsy.contrasts import code_contrast_matrix

try:
    from numpy.linalg import _umath_linalg
except ImportError:  # pragma: no cover - a NumPy without the private gufuncs
    _umath_linalg = None

from ._columns import ColumnCache, as_pandas, as_table, column, column_values
from ._columns import as_float as _as_float
from ._columns import encode as _encode
from ._columns import factorize as _factorize
from ._columns import is_numeric as _is_numeric
from ._columns import _values_missing
from ._columns import missing as _missing
from ._contrasts import (
    DummyCoding,
    _Coding,
    _label,
    clean_suffix,
    is_grouping,
    normalize_coding,
)
from .._fixed import householder_qr as _householder_qr
from ._fast import FastMatrix, fast_plan, fast_terms, term_columns
from ._parse import ParsedFormula, parse_formula
from ._rsyntax import canonical, single_name, to_python
from ._simple import simple_design
from ._rsyntax import display as _display

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
        return list(_code_names(code.strip()))
    except SyntaxError as err:
        raise ValueError(f"cannot parse formula {formula!r}: {what} {code!r} is not a "
                         f"valid expression ({err.msg})") from None


@functools.lru_cache(maxsize=512)
def _code_names(code):
    """:func:`_names_in` of stripped code, remembered; raises SyntaxError."""
    tree = ast.parse(code, mode="eval")
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
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _compiled(code):
    return compile(code, "<response>", "eval")


_KEYWORD_WORD = re.compile(r"\b(?:" + "|".join(keyword.kwlist) + r")\b")


def _quote_keywords(text, columns):
    """Write data columns named like Python keywords (``yield``) as ``Q("yield")``.

    patsy evaluates factors as Python, where such a name is a syntax error.
    """
    # a text without a keyword as a word has nothing to quote (and the test below
    # reads every column name)
    if _KEYWORD_WORD.search(text) is None:
        return text
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


def _known(name):
    """Whether a name that is not a data column still means something in a formula."""
    return name in _ENV or hasattr(builtins, name) or keyword.iskeyword(name)


def _canonical(text, columns):
    """R formula text in the spelling both model-matrix builders read (``_rsyntax``)."""
    return canonical(text, columns, _known)


def _frame_values(data, specs, what):
    """The values a model matrix reads, checked: numeric arrays and level codes.

    ``specs`` maps column name to its level list, or None for a numeric column.
    Numeric columns come as their own int/float array (float64 otherwise),
    categorical ones as int64 codes into their level list.
    """
    values = {}
    for name, levels in specs.items():
        series = column(data, name)
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

# a Python string literal, as patsy keeps it in a factor's code
_STRING = r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_Q_CALL = re.compile(rf"^Q\(\s*({_STRING})\s*\)$", re.S)
_C_CALL = re.compile(rf"^C\(\s*([A-Za-z_][A-Za-z0-9_.]*|Q\(\s*{_STRING}\s*\))\s*(?:,.*)?\)$",
                     re.S)


def _bare_column(code):
    """The column a factor's code names directly (``x`` or ``Q("x")``), else None."""
    code = code.strip()
    if code.isidentifier():
        return code
    m = _Q_CALL.match(code)
    if m is None:
        return None
    try:
        return ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        return None


@functools.lru_cache(maxsize=256)
def _patsy_desc(text):
    # patsy's parse is pure symbol work; its ModelDesc is not modified downstream
    return patsy.ModelDesc.from_formula(text)


def _patsy_text(text, columns):
    """Canonical formula text as patsy reads it: ``Q("...")`` for quoted names."""
    return _quote_keywords(to_python(text), columns)


def _model_desc(ptext, formula, what):
    try:
        desc = _patsy_desc(ptext)
    except patsy.PatsyError as err:
        raise ValueError(f"cannot parse formula {formula!r}: {what} {ptext!r}: "
                         f"{err.message}") from None
    if desc.lhs_termlist:
        raise ValueError(f"cannot parse formula {formula!r}: '~' inside {what} {ptext!r}")
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
    text : str
        The part's terms (no response) as patsy reads them.
    specs : dict
        Column name -> level list (categorical) or None (numeric), for the columns
        this part reads.
    codings : dict
        Column name -> coding for categorical columns.
    frame : pandas.DataFrame
        The fitting rows, as made by :func:`_patsy_frame`.
    what : str
        What this matrix is, for messages ("the fixed-effects part").

    Notes
    -----
    patsy's design objects refuse to be pickled.  What is pickled instead is what
    rebuilds them exactly: the text, the specs, the codings (patsy's own contrast
    objects as the contrast matrices they gave) and the values this part read from
    the fitting rows, which stateful transforms such as ``center(x)`` learn from.
    """

    def __init__(self, text, specs, codings, frame, what):
        self.text = text
        self.specs = dict(specs)
        self.what = what
        self.codings = {c: codings[c] for c in self.specs if c in codings}
        terms, display, naming = self._terms()
        try:
            dm = patsy.dmatrix(patsy.ModelDesc([], terms), frame, eval_env=self._env,
                               NA_action="raise", return_type="matrix")
        except patsy.PatsyError as err:
            raise ValueError(f"cannot build {what}: {err.message}") from None
        self.design_info = dm.design_info
        self.order, self.names = self._order_and_names(terms, display, naming)
        self.matrix = np.ascontiguousarray(np.asarray(dm, dtype=np.float64)[:, self.order])
        self._check_finite(self.matrix)
        self._frame = frame

    def _terms(self):
        """patsy's terms with our codings applied, and how to name their columns.

        Sets ``self._env``, the namespace the factors are evaluated in.
        """
        desc = _patsy_desc(self.text)
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
                    coding = self.codings.get(col)
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
                    inner = None if m is None else (_bare_column(m.group(1)) or m.group(1))
                    display[new] = col if col is not None else (
                        inner if inner in self.specs else _display(factor.name()))
                    naming[new] = ("patsy", None)
                mapped[factor] = new
        self._env = patsy.EvalEnvironment([env])
        terms = [patsy.Term([mapped[f] for f in t.factors]) for t in desc.rhs_termlist]
        return terms, display, naming

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["design_info"], state["_env"]
        frame = state.pop("_frame")
        state["_values"] = {c: (frame[c].to_numpy() if levels is None
                                else frame[c].cat.codes.to_numpy())
                            for c, levels in self.specs.items()}
        state["_n"] = len(frame)
        state["codings"] = {c: coding if isinstance(coding, (_Coding, np.ndarray))
                            else _FrozenCoding(coding, self.specs[c])
                            for c, coding in self.codings.items()}
        return state

    def __setstate__(self, state):
        state = dict(state)
        values, n = state.pop("_values"), state.pop("_n")
        self.__dict__.update(state)
        frame = _as_patsy_frame(values, self.specs, n)
        terms, _, _ = self._terms()
        # dmatrix's own call, without building the matrix again
        self.design_info = patsy.design_matrix_builders(
            [[], terms], lambda: iter([frame]), self._env, NA_action="raise")[1]
        self._frame = frame

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
        data : pandas.DataFrame or the result of :func:`_columns.as_table`

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


class _FrozenCoding:
    """A coding that cannot be pickled (patsy's contrast objects, a ContrastMatrix),
    kept as the full- and reduced-rank contrast matrices it gives one column's levels.

    Parameters
    ----------
    coding : object
        Anything :func:`patsy.contrasts.code_contrast_matrix` accepts.
    levels : list of str
        The column's levels in model order.
    """

    def __init__(self, coding, levels):
        self._matrices = {}
        for full in (True, False):
            try:
                cm = code_contrast_matrix(full, tuple(levels), coding)
            except Exception:
                continue  # a coding that only offers one of the two; patsy asked for that one
            self._matrices[full] = (np.asarray(cm.matrix), list(cm.column_suffixes))

    def _matrix(self, full):
        matrix, suffixes = self._matrices[full]
        return patsy.ContrastMatrix(matrix, suffixes)

    def code_with_intercept(self, levels):
        """The full-rank contrast matrix (see :class:`patsy.ContrastMatrix`)."""
        return self._matrix(True)

    def code_without_intercept(self, levels):
        """The reduced-rank contrast matrix (see :class:`patsy.ContrastMatrix`)."""
        return self._matrix(False)


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


# A column whose diagonal entry of R is above this fraction of its norm is far from
# aliased (see :func:`_qr_if_clearly_not_aliased`): a hundred times RANK_RTOL.
_R_DIAG_MIN = 100 * RANK_RTOL


def _qr_if_clearly_not_aliased(X):
    """``householder_qr(X)`` when its R shows that :func:`_aliased_columns` would alias
    no column, else None (and the caller runs that test).

    Notes
    -----
    The test of :func:`_aliased_columns` runs Gram-Schmidt on the columns of R (the
    same Householder R, to rounding: LAPACK's there, the compiled one here). Since R is
    upper triangular, the basis vectors of the columns before j vanish below row j - 1,
    so the projections never touch entry j of column j: its residual is at least |R_jj|
    (to the rounding of a norm), and when
    ``|R_jj| > 1e-6 ||R_j||`` for every j, no residual is anywhere near the aliasing
    threshold ``RANK_RTOL ||R_j||``. Only for X of at most 16 columns and at least as
    many rows: the fitting code factors X anyway (``FixedEffectsBasis``, which takes
    this QR), so the test costs a pass over R instead of a Gram matrix and its
    eigenvalues.
    """
    n, p = X.shape
    if p == 0 or n < p or p > 16 or X.dtype != np.float64:
        return None
    if p == 1 and n < 20000 and (X == 1.0).all():
        # the intercept alone: its QR depends on n only (the copies are the caller's)
        q, r = _intercept_qr(n)
        return q.copy(), r.copy()
    q, r = _householder_qr(X)
    rl = r.tolist()
    for j in range(p):
        norm2 = 0.0
        for i in range(j + 1):
            norm2 += rl[i][j] * rl[i][j]
        if not abs(rl[j][j]) > _R_DIAG_MIN * math.sqrt(norm2):
            return None
    return q, r


@functools.lru_cache(maxsize=8)
def _intercept_qr(n):
    """``householder_qr`` of a column of n ones, remembered (read-only arrays)."""
    q, r = _householder_qr(np.ones((n, 1)))
    q.flags.writeable = r.flags.writeable = False
    return q, r


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
    p = G.shape[0]
    if p <= 2:
        # the same tests on Python floats
        g = G.tolist()
        if not (all(g[i][i] > 0 for i in range(p))
                and all(math.isfinite(v) for row in g for v in row)):
            return False
        if p == 1:
            return True
        # eigenvalues of [[1, c], [c, 1]] are 1 -+ |c|
        return 1.0 - abs(g[0][1]) / math.sqrt(g[0][0] * g[1][1]) > _GRAM_EIG_MIN
    d = G.diagonal()
    if not ((d > 0).all() and np.isfinite(G).all()):
        return False
    s = 1.0 / np.sqrt(d)
    C = G * s[:, None] * s[None, :]
    return bool(_eigvalsh(C)[0] > _GRAM_EIG_MIN)


def _raise_eig(err, flag):
    raise np.linalg.LinAlgError("Eigenvalues did not converge")


def _eigvalsh(C):
    """``numpy.linalg.eigvalsh(C)`` of a float64 matrix: the same LAPACK call through
    NumPy's gufunc, without the wrapper's type dispatch."""
    if _umath_linalg is None or C.dtype != np.float64:
        return np.linalg.eigvalsh(C)
    with np.errstate(call=_raise_eig, invalid="call", over="ignore", divide="ignore",
                     under="ignore"):
        return _umath_linalg.eigvalsh_lo(C, signature="d->d")


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
        newdata : pandas.DataFrame, dict of columns, or a data frame narwhals supports

        Returns
        -------
        codes : numpy.ndarray of int32
            Level index per row; -1 for a level (or combination) not seen in fitting,
            or a missing grouping value.
        z : numpy.ndarray of float64, shape (m, k)
        """
        data = as_table(newdata)
        series = [column(data, name) for name in self._grouping]
        codes, _ = _encode(series[0], self._components[0])
        for s2, levels, (width, keys) in zip(series[1:], self._components[1:], self._steps):
            c2, _ = _encode(s2, levels)
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
        The left-hand side as written, e.g. ``"incid / hsz"`` or
        ``"cbind(incid, hsz - incid)"``; a single column's bare name (``my y`` for
        `` `my y` ``).
    y : numpy.ndarray of float64, shape (n,)
        For a ``cbind(successes, failures)`` response, the proportion
        ``successes / (successes + failures)``, 0 where there are no trials.
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
    weights : numpy.ndarray of float64 or None
        The ``weights`` argument; for a ``cbind()`` response, the numbers of trials
        ``successes + failures`` (0 allowed).
    offset : numpy.ndarray of float64 or None
        The ``offset`` argument plus every ``offset(expr)`` term of the formula, in
        that order, as R's ``model.offset`` sums them; None when there is neither.
    n : int
        Number of rows used.
    rows_used : numpy.ndarray of int64
        Positions of the rows of ``data`` that were used.
    binomial_counts : bool
        True when the response is ``cbind(successes, failures)``: y and weights are
        a binomial proportion and its trials, for a Binomial family only.
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
    binomial_counts: bool = False
    parsed: object = field(default=None, repr=False)
    _fixed: object = field(default=None, repr=False)
    _keep: np.ndarray = field(default=None, repr=False)
    _offsets: list = field(default_factory=list, repr=False)

    def fixed_matrix(self, newdata):
        """The fixed-effects model matrix for new data.

        Same columns as `X` (aliased columns removed), same contrasts and level
        coding; new data may hold only some of the levels of a factor.

        Parameters
        ----------
        newdata : pandas.DataFrame, dict of columns, or a data frame narwhals supports

        Returns
        -------
        numpy.ndarray of float64, shape (m, p)
        """
        mat = self._fixed.build(as_table(newdata))
        return np.ascontiguousarray(mat[:, self._keep])

    def offset_for(self, newdata):
        """The formula's ``offset(expr)`` terms evaluated on new data, summed.

        The ``offset`` argument given when fitting is not part of it: its values for
        new rows are the caller's to add.

        Parameters
        ----------
        newdata : pandas.DataFrame, dict of columns, or a data frame narwhals supports

        Returns
        -------
        numpy.ndarray of float64, shape (m,), or None
            None when the formula has no ``offset()`` term.
        """
        if not self._offsets:
            return None
        data = as_table(newdata)
        total = None
        for mat in self._offsets:
            values = mat.build(data)[:, 0]
            total = np.array(values) if total is None else total + values
        return total


_RETERM_FIELDS = tuple(f.name for f in fields(ReTerm))
_DESIGN_FIELDS = tuple(f.name for f in fields(Design))


def _as_frame(data):
    """``data`` as a pandas DataFrame (see :func:`_columns.as_pandas`)."""
    return as_pandas(data)


def _side_array(value, what, data, cache=None):
    """weights/offset given as a column name or an array -> (label, float array)."""
    if isinstance(value, str):
        values = column_values(data, value) if cache is None else cache.values(value)
        label = value
    else:
        values = np.asarray(value)
        if values.ndim != 1 or len(values) != len(data):
            raise ValueError(f"{what} must have one value per row of data "
                             f"({len(data)}); got shape {values.shape}")
        if values.dtype.kind == "O":
            # what pandas would make of the objects (strings, say)
            values = pd.Series(values).array
        label = what
    if not _is_numeric(values):
        name = what if label == what else f"{what} column {label!r}"
        raise ValueError(f"{name} must be numeric")
    return label, _float_array(values)


def _float_array(values):
    """A numeric column (ndarray or pandas array) as float64, NaN where missing:
    :func:`_columns.as_float` of the Series it would make."""
    if isinstance(values, np.ndarray):
        return np.asarray(values, dtype=np.float64)
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _evaluator(text, data, formula, columns, cache=None, code=None):
    """An expression of data columns, ready to evaluate over all rows as Python.

    Parameters
    ----------
    text : str
        The expression in canonical spelling (see ``_rsyntax``).
    columns : list
        Extended with the data columns the expression reads.
    cache : ColumnCache, optional
        Where the columns are read from (a new one when not given).
    code : tuple, optional
        ``_expression_code(text, data.columns, formula)``, when the caller has it.

    Returns
    -------
    callable
        Evaluates the expression, giving an ndarray; it raises whatever the
        expression raises, for the caller to name.
    """
    if cache is None:
        cache = ColumnCache(data)
    names, compiled = (_expression_code(text, data.columns, formula) if code is None
                       else code)
    ns = {}
    for name in names:
        ns[name] = _expression_values(cache, name)
    columns.extend(n for n in names if n not in columns)
    return lambda: np.asarray(eval(compiled, {"__builtins__": builtins, **_ENV}, ns))


def _expression_code(text, columns, formula):
    """The data columns an expression in canonical spelling reads, and its code."""
    code = _patsy_text(text, columns).strip()
    names = _resolve(_names_in(code, "response", formula), columns)
    return names, _compiled(code)


def _response_expression(lhs, columns, formula, plan):
    """``(canonical text, the columns it reads, its code)`` of a response expression or
    a count of a ``cbind()``: text and column names alone decide them, so the formula's
    :class:`_Plan` (or None) keeps them, and where those columns sit, which spares a
    small model's build the tokenizing, parsing and lookups."""
    hit = None if plan is None else plan.expressions.get(lhs)
    if hit is None:
        text = _canonical(lhs, columns)
        hit = (text,) + _expression_code(text, columns, formula)
        if plan is not None:
            plan.expressions[lhs] = hit
            plan.add_locs(hit[1], columns)
    return hit


def _expression_values(cache, name):
    """A column as an expression sees it: numbers as their own int/float array
    (float64 for other numeric kinds), anything else as Python objects."""
    values = cache.values(name)
    dtype = values.dtype
    if not _is_numeric(values):
        return (np.asarray(values, dtype=object) if isinstance(values, np.ndarray)
                else values.to_numpy(dtype=object))
    if dtype.kind in "iuf":
        return values if isinstance(values, np.ndarray) else values.to_numpy()
    if isinstance(values, np.ndarray):
        return np.asarray(values, dtype=np.float64)
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _response_column(lhs, columns):
    """The data column the left-hand side names by itself, else None."""
    name = lhs.strip()
    if name not in columns:
        name = single_name(lhs)
    return name if name is not None and name in columns else None


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
    name = _response_column(lhs, data.columns)
    if name is not None:
        columns.extend(n for n in [name] if n not in columns)
        return cache.series(name), cache.missing(name), name
    series = pd.Series(_evaluate_response(lhs, data, columns, formula, cache), name=lhs)
    return series, _missing(series), None


def _evaluate_response(lhs, data, columns, formula, cache, plan=None):
    """The values of a left-hand side that is an expression, over all rows (``plan``:
    see :func:`_response_expression`)."""
    text, *code = _response_expression(lhs, data.columns, formula, plan)
    evaluate = _evaluator(text, data, formula, columns, cache, code)
    try:
        value = evaluate()
    except Exception as err:
        raise ValueError(f"cannot evaluate the response {lhs.strip()!r}: {err}") from None
    if value.ndim != 1 or len(value) != len(data):
        raise ValueError(f"the response {lhs!r} must give one value per row; "
                         f"got shape {value.shape}")
    return value


def _counts(parsed, data, columns, formula, cache=None, plan=None):
    """Successes and failures of a ``cbind(successes, failures)`` response, all rows.

    Returns
    -------
    counts : tuple of two float64 ndarrays
    bad : ndarray of bool
        Rows where either count is missing or non-finite.
    """
    if cache is None:
        cache = ColumnCache(data)
    lhs = parsed.response
    counts = []
    for arg, which in zip(parsed.counts, ("successes", "failures")):
        name = single_name(arg)
        if name is not None and name in data.columns:
            values = cache.values(name)
            columns.extend(n for n in [name] if n not in columns)
            if not _is_numeric(values):
                raise ValueError(f"the {which} {arg!r} of the response {lhs!r} are not "
                                 "numeric")
            counts.append(_float_array(values))
            continue
        text, *code = _response_expression(arg, data.columns, formula, plan)
        evaluate = _evaluator(text, data, formula, columns, cache, code)
        try:
            value = evaluate()
        except Exception as err:
            raise ValueError(f"cannot evaluate the {which} {arg!r} of the response "
                             f"{lhs!r}: {err}") from None
        if value.ndim == 0:
            value = np.full(len(data), value)  # R's cbind recycles a single number
        if value.shape != (len(data),):
            raise ValueError(f"the {which} {arg!r} of the response {lhs!r} must give one "
                             f"value per row; got shape {value.shape}")
        if value.dtype.kind not in "biuf":
            raise ValueError(f"the {which} {arg!r} of the response {lhs!r} are not numeric")
        counts.append(value.astype(np.float64))
    bad = ~(np.isfinite(counts[0]) & np.isfinite(counts[1]))
    return tuple(counts), bad


def _binomial(counts, rows, lhs):
    """y (the proportion of successes, 0 without trials) and the trials, rows used."""
    successes, failures = (c[rows] for c in counts)
    negative = (successes < 0) | (failures < 0)
    if negative.any():
        where = rows[negative][:5].tolist()
        raise ValueError(f"the response {lhs!r} has {int(negative.sum())} row(s) with "
                         f"negative counts, e.g. at rows {where}")
    trials = successes + failures
    y = np.zeros_like(trials)
    np.divide(successes, trials, out=y, where=trials > 0)
    return y, trials


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
    # dataclasses.replace(parsed, random=list(parsed.random)), without its field scan
    return ParsedFormula(parsed.formula, parsed.response, parsed.fixed, list(parsed.random),
                         parsed.offsets, parsed.counts)


class _Part:
    """One model matrix to build: its text, the columns it reads, and how.

    ``text`` is in canonical spelling (see ``_rsyntax``).  ``terms`` holds the fast
    path's terms when the text is in its grammar and reads only data columns, else
    None, and ``ptext`` holds the text as patsy reads it, ``desc`` patsy's
    description of it.
    """

    __slots__ = ("text", "what", "cols", "terms", "ptext", "desc")

    def __init__(self, text, what, cols, terms, ptext=None, desc=None):
        self.text, self.what, self.cols, self.terms = text, what, cols, terms
        self.ptext, self.desc = ptext, desc

    def for_patsy(self, formula, columns):
        """Fill in ``ptext`` and ``desc`` (the fast path declined this part)."""
        if self.desc is None:
            self.ptext = _patsy_text(self.text, columns)
            self.desc = _model_desc(self.ptext, formula, self.what)


def _part(text, formula, what, columns, fast):
    text = _canonical(text, columns)
    if fast:
        terms = fast_terms(text)
        if terms is not None:
            cols = term_columns(terms)
            squares = any(f[0] == "abs2" for t in terms for f in t)
            # names that are not columns (and a column shadowing abs2) are patsy's to
            # resolve or report
            if all(c in columns for c in cols) and not (squares and "abs2" in columns):
                return _Part(text, what, cols, terms)
    part = _Part(text, what, None, None)
    part.for_patsy(formula, columns)
    part.cols = _desc_columns(part.desc, columns, formula, what)
    return part


def _offset_part(expr, formula, columns, fast):
    """The one-column model matrix of an ``offset(expr)`` term, to build."""
    # I() keeps an expression such as a + b one column, summed as R sums it
    text = expr if single_name(expr) is not None else f"I({expr})"
    return _part(f"0 + {text}", formula, f"offset({expr})", columns, fast)


def _offset_column(mat):
    """The values of an offset's one-column matrix; an error unless numeric."""
    if isinstance(mat, FastMatrix):
        categorical = any(levels is not None for levels in mat.specs.values())
    else:
        categorical = any(info.type == "categorical"
                          for info in mat.design_info.factor_infos.values())
    if categorical or mat.matrix.shape[1] != 1:
        raise ValueError(f"{mat.what} is not numeric: it gives the column(s) {mat.names}")
    return mat.matrix[:, 0]


def build_design(formula, data, contrasts=None, weights=None, offset=None,
                 na_action="drop"):
    """Build the response, fixed-effects matrix and random-effects terms of a model.

    Parameters
    ----------
    formula : str
        lme4-style formula, e.g. ``"reaction ~ 1 + days + (1 + days | subj)"``.  The
        fixed part is patsy syntax (plus ``abs2(x)`` for ``x**2``) read as R reads
        it: ``^`` is a power inside a call (``I(x^2)``) and crossing outside
        (``(a + b)^2``), names may hold dots (``days.n``) or be quoted in backticks
        (`` `my col` ``), and ``offset(expr)`` terms go to the offset, not to X.
        Random terms are ``(expr | g)``, ``(expr || g)`` (uncorrelated), with ``g`` a
        column, an interaction ``a & b`` / ``a:b`` or a nesting ``a/b``.  The
        response may be ``cbind(successes, failures)`` (a binomial response: see
        :class:`Design`).
    data : pandas.DataFrame, dict of columns, or a data frame narwhals supports
        (polars, pyarrow, ...)
    contrasts : dict, optional
        Column name -> coding (:class:`DummyCoding`, :class:`EffectsCoding`,
        :class:`HelmertCoding`, :class:`Grouping`, a patsy contrast or a contrast
        matrix).  A coding given for a numeric column makes it categorical.  Entries
        for columns not in the formula are ignored.
    weights, offset : str or array_like, optional
        A column name or one value per row of ``data``.  ``weights`` cannot be given
        with a ``cbind()`` response, which gives its own (the numbers of trials).
    na_action : {"drop", "raise"}
        What to do with rows holding missing or non-finite values in any column the
        model uses: drop them with a warning, or raise ``ValueError``.

    Returns
    -------
    Design

    Raises
    ------
    ValueError
        For an unparseable formula, a column not in ``data`` (or in it more than
        once), missing values with ``na_action="raise"``, a single-level grouping
        factor, a non-numeric response without exactly two levels, negative or
        non-finite weights, negative counts in a ``cbind()`` response, or a
        non-numeric offset.
    TypeError
        When ``data`` is not a data frame or a dict of columns.

    Examples
    --------
    >>> import mixedmodels
    >>> d = build_design("reaction ~ 1 + days + (1 + days | subj)",
    ...                  mixedmodels.dataset("sleepstudy"))
    >>> d.X.shape, d.coef_names, d.reterms[0].nlevels
    ((180, 2), ['(Intercept)', 'days'], 18)
    """
    return _build_design(formula, data, contrasts, weights, offset, na_action, fast=True)


def _design_and_qr(formula, data, contrasts, weights, offset, na_action, qr_out):
    """:func:`build_design`, appending to ``qr_out`` the QR of X its rank test made (see
    :func:`_build_design`); one call deep, as build_design, so that the warnings of
    :func:`_build_design` name the same caller."""
    return _build_design(formula, data, contrasts, weights, offset, na_action, fast=True,
                         qr_out=qr_out)


def _model_columns(parts, parsed, codings):
    """The columns the model matrices read and the grouping columns, in formula order;
    refuses a Grouping()-coded column inside a model matrix."""
    _refuse_grouping_codings(parts, codings)
    matrix_cols = list(dict.fromkeys(c for part in parts for c in part.cols))
    group_cols = list(dict.fromkeys(g for t in parsed.random for g in t.grouping))
    return matrix_cols, group_cols


def _refuse_grouping_codings(parts, codings):
    """Refuse a Grouping()-coded column inside a model matrix."""
    for part in parts:
        for name in part.cols:
            if is_grouping(codings.get(name)):
                raise ValueError(f"column {name!r} has the Grouping() contrast and cannot "
                                 f"appear in {part.what}")


class _Plan:
    """What a formula asks of a table, decided by the formula text and the table's
    column names alone: the parsed formula, the response column (None for an
    expression or a ``cbind()``), the parts to build as model matrices, the columns
    they and the grouping factors read, in formula order, and where those columns sit.

    Shared by every build with the same formula over the same column Index (see
    :func:`_plan`): nothing in it is changed after it is made, except that a
    :class:`_Part` fills in its patsy text on demand, ``expressions`` the code of the
    response's expressions, ``locs`` the places of the columns builds read (a weights
    column's too) and ``simple`` whether _simple.simple_design can build it, all of
    which depend on the same two things.
    """

    __slots__ = ("parsed", "resp_col", "fixed", "offsets", "random", "parts", "matrix_cols",
                 "group_cols", "locs", "resp_used", "checked", "expressions", "simple")

    def __init__(self, formula, columns, fast):
        parsed = self.parsed = _parse(formula)
        self.resp_col = (_response_column(parsed.response, columns)
                         if parsed.counts is None else None)
        self.fixed = _part(parsed.fixed, formula, "the fixed-effects part", columns, fast)
        self.offsets = [_offset_part(expr, formula, columns, fast) for expr in parsed.offsets]
        self.random = []
        for term in parsed.random:
            self.random.append(_part(term.expr, formula, f"random-effects term {term.text}",
                                     columns, fast))
            for g in term.grouping:
                _need_column(g, columns)
        self.parts = [self.fixed] + self.offsets + self.random
        # (the codings' check is the build's: they are no part of the plan)
        self.matrix_cols, self.group_cols = _model_columns(self.parts, parsed, {})
        # the columns whose missing rows a build looks for, when the response is a column
        self.resp_used = [] if self.resp_col is None else [self.resp_col]
        self.checked = tuple(dict.fromkeys(self.resp_used + self.matrix_cols + self.group_cols))
        # a response expression's or count's text -> _response_expression's answer
        self.expressions = {}
        # where the columns sit: a position is a property of the Index alone
        self.locs = {}
        counted = [single_name(arg) for arg in parsed.counts or ()]
        self.add_locs([self.resp_col, *counted, *self.matrix_cols, *self.group_cols], columns)
        # whether _simple.simple_design can build it (found on its first build)
        self.simple = None

    def add_locs(self, names, columns):
        """Remember where these columns sit (a position is a property of the Index)."""
        if isinstance(columns, pd.Index):
            for name in names:
                if name in self.locs:
                    continue
                loc = columns.get_loc(name) if name is not None and name in columns else None
                if isinstance(loc, int):
                    self.locs[name] = loc

    def fresh_parsed(self):
        """The parsed formula, with its own list of random terms for the design to keep
        (made as :func:`_make_frozen` makes a record)."""
        new = object.__new__(ParsedFormula)
        new.__dict__.update(self.parsed.__dict__, random=list(self.parsed.random))
        return new


# (formula, id of the column Index, fast) -> (weak reference to that Index, _Plan). A
# pandas Index cannot change, so the same object means the same names; the weak reference
# tells a live Index from a new one at a freed one's address.
_plans = {}
_PLANS_MAX = 128


def _plan(formula, columns, fast):
    """The :class:`_Plan` of a formula over a table's columns, remembered per pandas
    column Index: parsing and checking the formula costs more than reading a small
    table's columns does."""
    if not (isinstance(formula, str) and isinstance(columns, pd.Index)):
        return _Plan(formula, columns, fast)
    key = (formula, id(columns), fast)
    hit = _plans.get(key)
    if hit is not None and hit[0]() is columns:
        return hit[1]
    plan = _Plan(formula, columns, fast)
    if len(_plans) >= _PLANS_MAX:
        _plans.clear()
    _plans[key] = (weakref.ref(columns), plan)
    return plan


def _build_design(formula, data, contrasts=None, weights=None, offset=None,
                  na_action="drop", fast=True, qr_out=None):
    """:func:`build_design`; ``fast=False`` builds every model matrix with patsy.

    ``qr_out``: a list to which ``householder_qr(design.X)`` is appended when the rank
    test made it (for ``FixedEffectsBasis``, which then need not); it is the caller's
    to overwrite.
    """
    if na_action not in ("drop", "raise"):
        raise ValueError(f"na_action must be 'drop' or 'raise', not {na_action!r}")
    data = as_table(data)
    columns = data.columns
    # Which columns each part reads; unknown names fail here, before any work.
    plan = _plan(formula, columns, fast)
    # a response expression the simple design evaluated: (values, columns read)
    evaluated = {}
    if (fast and contrasts is None and offset is None and type(data) is pd.DataFrame
            and (weights is None or isinstance(weights, str))):
        design = simple_design(formula, data, plan, [] if qr_out is None else qr_out,
                               weights, evaluated)
        if design is not None:
            return design
    parsed = plan.fresh_parsed()
    if parsed.counts is not None and weights is not None:
        raise ValueError(f"weights cannot be given with the response {parsed.response!r}: "
                         "a cbind(successes, failures) response sets the weights to the "
                         "numbers of trials, successes + failures")
    codings = {}
    for name, coding in (contrasts or {}).items():
        codings[name] = normalize_coding(coding)
    cache = ColumnCache(data, plan.locs)

    used = []
    if parsed.counts is None:
        resp_col = plan.resp_col
        resp_series = resp_value = None
        if resp_col is not None:
            used.append(resp_col)
            resp_bad = cache.missing(resp_col)
        else:
            if evaluated:
                # once only: its warnings (0 / 0, say) are the user's to see once
                resp_value, read = evaluated["response"]
                used.extend(read)
            else:
                resp_value = _evaluate_response(parsed.response, data, used, formula, cache,
                                                plan)
            if resp_value.dtype.kind in "iuf":
                # numbers, as pandas would keep them: no Series needed
                resp_bad = _values_missing(resp_value)
            else:
                resp_series = pd.Series(resp_value, name=parsed.response)
                resp_bad = _missing(resp_series)
        counts = None
    else:
        counts, resp_bad = _counts(parsed, data, used, formula, cache, plan)
        resp_col = None
    fixed_part, offset_parts, random_parts = plan.fixed, plan.offsets, plan.random
    matrix_cols, group_cols = plan.matrix_cols, plan.group_cols
    if codings:
        _refuse_grouping_codings(plan.parts, codings)
    w_label, w_all = (_side_array(weights, "weights", data, cache) if weights is not None
                      else (None, None))
    o_label, o_all = (_side_array(offset, "offset", data, cache) if offset is not None
                      else (None, None))

    # Incomplete rows.  A NaN weight is a missing value; an infinite or negative one is
    # an error below, since dropping it would silently change the model.  A mask of
    # None means the column cannot hold a missing value (an integer column).
    n_all = len(data)
    bad_by = {}
    bad = None
    checked = plan.checked if used == plan.resp_used else dict.fromkeys(
        used + matrix_cols + group_cols)
    for name in checked:
        mask = bad_by[name] = cache.missing(name)
        if mask is not None:
            bad = mask if bad is None else bad | mask
    if w_all is not None:
        mask = bad_by[w_label] = _or(bad_by.get(w_label), _nan_rows(w_all))
        bad = _or(bad, mask)
    if o_all is not None:
        mask = bad_by[o_label] = _or(bad_by.get(o_label), _nonfinite_rows(o_all))
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

    w = None
    if counts is not None:
        (y, w), y_levels = _binomial(counts, rows, parsed.response), None
    elif resp_series is None and resp_col is None:
        y, y_levels = np.array(cache.take(resp_value), dtype=np.float64), None
    elif resp_col is None:
        y, y_levels = _y_from(resp_series.iloc[rows].reset_index(drop=True), parsed.response)
    elif cache.is_numeric(resp_col):
        y, y_levels = np.array(cache.take(cache.all_numeric(resp_col)), dtype=np.float64), None
    else:
        y, y_levels = _y_from(cache.series(resp_col), parsed.response, cache.factor(resp_col))

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

    # fast-path matrices by their terms: the same terms over the same columns give the
    # same matrix ((1 + days | subj) repeats 1 + days; (1 | a) + (1 | b) repeats 1)
    built = {}

    def model_matrix(part, what):
        nonlocal frame
        if part.terms is not None and built:
            shared = built.get(part.terms)
            if shared is not None:
                return shared.copy_for(what)
        part_specs = {c: specs[c] for c in part.cols}
        if part.terms is not None:
            layout = fast_plan(part.terms, part_specs, codings)
            if layout is not None:
                mat = built[part.terms] = FastMatrix(
                    layout, part_specs, codings, {c: values(c) for c in part.cols}, n, what,
                    _check_finite, keep_cells=tall and part is fixed_part)
                return mat
            part.for_patsy(formula, columns)
        if frame is None:
            frame = _as_patsy_frame({c: values(c) for c in matrix_cols}, specs, n)
        return _ModelMatrix(part.ptext, part_specs, codings, frame, what)

    fixed = model_matrix(fixed_part, "the fixed-effects model matrix")
    gram = None
    if isinstance(fixed, FastMatrix) and tall:
        gram = fixed.gram({c: values(c) for c in fixed_part.cols})
    if isinstance(fixed, FastMatrix) and fixed.subterms == ((),):
        # the intercept alone, a column of ones: never aliased, and the model's basis of
        # it is remembered by n (FixedEffectsBasis), which takes no QR from here
        qr, aliased = None, []
    else:
        qr = None if tall else _qr_if_clearly_not_aliased(fixed.matrix)
        aliased = [] if qr is not None else _aliased_columns(fixed.matrix, gram=gram)
    if qr_out is not None and qr is not None:
        qr_out.append(qr)
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
        if len(term.grouping) == 1:
            # _group_codes of one column: its own codes and levels
            codes, labels = cache.factor(term.grouping[0])
            components, steps = [labels], []
        else:
            codes, labels, components, steps = _group_codes([cache.factor(g)
                                                             for g in term.grouping])
        if len(labels) < 2:
            raise ValueError(f"grouping factor {group!r} has a single level")
        zmat = model_matrix(part, f"the columns of random-effects term {term.text}")
        if not zmat.names:
            raise ValueError(f"random-effects term {term.text} has no columns")
        reterms.append(_make_frozen(ReTerm, _RETERM_FIELDS, (
            group, codes.astype(np.int32), labels, list(zmat.names), zmat.matrix,
            term.zerocorr, tuple(term.grouping), components, steps, zmat)))

    offsets = [model_matrix(part, part.what) for part in offset_parts]
    o = None
    if w_all is not None:
        w = np.array(cache.take(w_all), dtype=np.float64)
        # (the extremes settle it in two passes: NaN would make both NaN)
        if len(w) and not (w.min() >= 0.0 and w.max() < math.inf):
            _refuse_invalid_weights(w, rows, w_label)
    # R's model.offset: the offset argument, then each offset() term in turn
    if o_all is not None:
        o = np.array(cache.take(o_all), dtype=np.float64)
    for mat in offsets:
        term_offset = _offset_column(mat)
        o = np.array(term_offset) if o is None else o + term_offset

    coef_names = [fixed.names[j] for j in keep] if dropped else list(fixed.names)
    return _make_frozen(Design, _DESIGN_FIELDS, (
        formula, parsed.response if resp_col is None else resp_col, y, y_levels, X,
        coef_names, dropped, reterms, w, o, len(y), rows, counts is not None, parsed, fixed,
        keep, offsets))


def _make_frozen(cls, names, values):
    """``cls(*values)`` for a frozen dataclass given every field (``names``, in field
    order), without the per-field ``object.__setattr__`` of its ``__init__``: a few
    microseconds per object, a noticeable part of a small model's set-up."""
    if len(values) != len(names):
        raise TypeError(f"{cls.__name__} has {len(names)} fields, not {len(values)}")
    obj = object.__new__(cls)
    obj.__dict__.update(zip(names, values))
    return obj


def _refuse_invalid_weights(w, rows, label):
    """Raise naming the weights that are negative or not finite, if any."""
    invalid = ~np.isfinite(w) | (w < 0)
    if invalid.any():
        where = rows[invalid][:5].tolist()
        name = "weights" if label == "weights" else f"weights column {label!r}"
        raise ValueError(f"{name} must be finite and non-negative; {int(invalid.sum())} "
                         f"value(s) are not, e.g. {w[invalid][:5].tolist()} at rows {where}")


def _nan_rows(values):
    """Rows of a float array holding NaN; None when there are none."""
    # the smallest value is NaN when any is (and, unlike a sum, never overflows)
    if not (len(values) and math.isnan(values.min())):
        return None
    return np.isnan(values)


def _nonfinite_rows(values):
    """Rows of a float array that are not finite; None when all are."""
    if not len(values) or (math.isfinite(values.min()) and math.isfinite(values.max())):
        return None
    return ~np.isfinite(values)


def _or(a, b):
    """Union of two row masks, either of which may be None (no rows); never in place."""
    if a is None:
        return b
    if b is None:
        return a
    return a | b

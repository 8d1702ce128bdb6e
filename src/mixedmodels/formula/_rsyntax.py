"""R's spelling of names and powers, rewritten into what patsy and Python read.

An lme4 formula is R code: a name may hold dots (``days.n``) or any character when
written in backticks (`` `subject id` ``), and ``^`` is a power inside a call
(``I(x^2)``, ``log(x^2)``) but crossing in the formula algebra (``(a + b)^2``).
patsy reads Python: a dotted name is attribute access, backticks do not exist and
``^`` is exclusive or.  The rewriting here happens outside string literals, in two
steps.

:func:`canonical` (needs the data's column names)
    ``^`` becomes ``**``: patsy reads ``**`` as crossing in the formula algebra and
    Python as a power inside a call, so each place gets R's meaning of ``^``.  A name
    that is a data column but not a plain ASCII identifier (dots, non-ASCII letters)
    is put in backticks, the one spelling of such a column that both the NumPy fast
    path and :func:`to_python` read.  So is any other dotted name R would read as one
    name, so that the error names all of it (``days.n``, not ``days``); only
    ``np.log`` and the like, and method calls on a column (``x.clip(0)``), keep
    Python's meaning.
:func:`to_python`
    Each backtick name becomes ``Q("name")``, patsy's own quoting of a column.

:func:`deparse` and :func:`display` go back: a column's name as it shows in a
coefficient name (bare when R or Python could write it bare, else in backticks).
"""
import ast
import functools
import re

__all__ = ["canonical", "to_python", "deparse", "display", "single_name", "unquote"]

_TOKEN = re.compile(r"""
    (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<bq>`(?:[^`\\]|\\.)*`)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[jJ]?)
  | (?P<name>(?:[^\W\d]|\.)[\w.]*)
  | (?P<pow>\^)
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)

# A name written bare: a letter or underscore first (or a dot not followed by a
# digit, as R allows), then letters, digits, underscores and dots.
_BARE = re.compile(r"(?:[^\W\d]|\.(?!\d))[\w.]*|\.")
_ASCII_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_Q_CALL = re.compile(r"""(?<![\w.])Q\(\s*('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\s*\)""")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


@functools.lru_cache(maxsize=1024)
def _tokens(text):
    return tuple((m.lastgroup, m.group()) for m in _TOKEN.finditer(text))


def unquote(token):
    """The name inside a backtick token: `` `a\\`b` `` gives ``a`b``."""
    return _ESCAPE.sub(r"\1", token[1:-1])


def _backticks(name):
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def deparse(name):
    """A column's name as written in a coefficient name or formula text.

    Parameters
    ----------
    name : str

    Returns
    -------
    str
        ``name`` itself when it can stand bare (``days``, ``days.n``, ``größe``),
        else in backticks (`` `my col` ``), as R deparses names.
    """
    return name if _BARE.fullmatch(name) else _backticks(name)


def canonical(text, columns, known):
    """R formula text with R's names and powers made explicit (see the module notes).

    Parameters
    ----------
    text : str
        A fixed part, a random term's expression, a response or an offset.
    columns : container of str
        The data's column names.
    known : callable
        ``known(name)`` is true for names that are not data columns but mean
        something (``np``, ``log``, ``center``).

    Returns
    -------
    str
    """
    if "^" not in text and "." not in text and text.isascii():
        # every name is then a plain ASCII identifier and there is no power: the
        # loop below would leave the text as it is
        return text
    tokens = _tokens(text)
    out = []
    changed = False
    for i, (kind, tok) in enumerate(tokens):
        if kind == "pow":
            tok, changed = "**", True
        elif kind == "name" and not _ASCII_IDENTIFIER.fullmatch(tok):
            if tok in columns or ("." in tok and _is_r_name(tok, tokens, i, columns, known)):
                tok, changed = _backticks(tok), True
        out.append(tok)
    return "".join(out) if changed else text


def _is_r_name(tok, tokens, i, columns, known):
    """Whether a dotted name that is no column is one name, as R reads it, rather
    than Python's attribute access: ``np.log`` and a method call on a column
    (``x.clip(0)``) stay Python."""
    head = tok.split(".", 1)[0]
    if not head:
        return False
    if head in columns:
        rest = (t for kind, t in tokens[i + 1:] if not t.isspace())
        return next(rest, None) != "("
    return not known(head)


def to_python(text):
    """Canonical text with each backtick name written ``Q("name")``, for patsy and eval.

    Parameters
    ----------
    text : str

    Returns
    -------
    str
    """
    if "`" not in text:
        return text
    return "".join(f"Q({unquote(tok)!r})" if kind == "bq" else tok
                   for kind, tok in _tokens(text))


def display(code):
    """A patsy factor's code as a coefficient name: ``Q("x y")`` shows as `` `x y` ``.

    Parameters
    ----------
    code : str

    Returns
    -------
    str
    """
    if "Q(" not in code:
        return code
    return _Q_CALL.sub(lambda m: deparse(_literal(m.group(1))), code)


def _literal(token):
    try:
        return ast.literal_eval(token)
    except (ValueError, SyntaxError):
        return token[1:-1]


def single_name(text):
    """The column a text names by itself (`` `x y` `` or ``days.n``), else None.

    Parameters
    ----------
    text : str

    Returns
    -------
    str or None
    """
    toks = [(kind, tok) for kind, tok in _tokens(text.strip())]
    if len(toks) != 1:
        return None
    kind, tok = toks[0]
    if kind == "bq":
        return unquote(tok)
    if kind == "name" and _BARE.fullmatch(tok):
        return tok
    return None

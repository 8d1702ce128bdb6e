"""Split an lme4-style formula into response, fixed part and random-effects terms.

Only the random-effects syntax is ours; the fixed part and the column expressions
inside a random term are left as text for patsy.  A random-effects term is a
parenthesised group, standing alone between top-level ``+`` signs, whose contents hold
a ``|`` (correlated) or ``||`` (uncorrelated) outside any inner parentheses.

Grouping expressions are column names joined by ``&`` or ``:`` (interaction) and
``/`` (nesting); ``a/b`` expands to the two terms ``a`` and ``a & b``, as in lme4.  A
name may hold dots (``subj.id``) or, in backticks, anything (`` `subject id` ``).

Two more pieces of lme4's syntax are taken apart here: ``offset(expr)`` terms of the
fixed part, which lme4 adds to the linear predictor rather than to X, and a
``cbind(successes, failures)`` response.
"""
import re
from dataclasses import dataclass, field

__all__ = ["ParsedFormula", "RandomTerm", "parse_formula"]


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects term after expansion of nesting.

    Attributes
    ----------
    expr : str
        The column expression left of the bar, e.g. ``"1 + days"``.
    grouping : tuple of str
        Names of the grouping columns; more than one means their interaction.
    zerocorr : bool
        True for ``||`` (no correlation between the term's random effects).
    text : str
        The term as written in the formula, e.g. ``"(1 + days | subj)"``.

    Notes
    -----
    Grouping names are bare: `` (1 | `subject id`) `` gives ``("subject id",)``.
    """

    expr: str
    grouping: tuple
    zerocorr: bool = False
    text: str = ""

    @property
    def group_name(self):
        """The grouping factor's display name, e.g. ``"subj"`` or ``"batch & cask"``."""
        return " & ".join(self.grouping)


@dataclass(frozen=True)
class ParsedFormula:
    """A formula split into its parts.

    Attributes
    ----------
    formula : str
        The formula as given.
    response : str
        The left-hand side text, stripped.
    fixed : str
        The fixed-effects part as written, without its ``offset()`` terms (``"1"`` if
        only random or offset terms were given).
    random : list of RandomTerm
        The random-effects terms in the order written, nesting expanded in place.
    offsets : tuple of str
        The expressions inside the fixed part's ``offset(...)`` terms, in order.
    counts : tuple of str or None
        ``(successes, failures)`` for a ``cbind(successes, failures)`` response.
    """

    formula: str
    response: str
    fixed: str
    random: list = field(default_factory=list)
    offsets: tuple = ()
    counts: tuple = None


def _fail(formula, why):
    return ValueError(f"cannot parse formula {formula!r}: {why}")


def _scan(text, end=None):
    """Yield (index, char, depth) outside string literals and backtick names; depth
    counts parentheses.

    If ``end`` is a dict, ``end["quote"]`` is left holding the quote character of a
    string literal (or the backtick of a name) still open at the end of ``text``
    (None when all are closed).
    """
    depth = 0
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
            i += 1
            continue
        if ch in "\"'`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        yield i, ch, depth
        i += 1
    if end is not None:
        end["quote"] = quote


def _check_balanced(formula):
    depth = 0
    end = {}
    for _, _, depth in _scan(formula, end):
        if depth < 0:
            raise _fail(formula, "unbalanced parentheses (a ')' without its '(')")
    # an open quote hides the parentheses after it: report it first
    if end["quote"] == "`":
        raise _fail(formula, "unterminated backtick-quoted name")
    if end["quote"] is not None:
        raise _fail(formula, "unterminated string literal")
    if depth != 0:
        raise _fail(formula, "unbalanced parentheses")


def _split_top(text, sep):
    """Split ``text`` at occurrences of the one-character ``sep`` at depth 0."""
    parts, start = [], 0
    for i, ch, depth in _scan(text):
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _is_wrapped(chunk):
    """True when the whole chunk is one parenthesised group ``( ... )``."""
    if not (chunk.startswith("(") and chunk.endswith(")")):
        return False
    for i, ch, depth in _scan(chunk):
        if depth == 0 and i < len(chunk) - 1:
            return False
    return True


def _find_bar(inner):
    """Position and width of the top-level ``|`` or ``||`` in a term's inside."""
    bars = [i for i, ch, depth in _scan(inner) if ch == "|" and depth == 0]
    if not bars:
        return None
    first = bars[0]
    if len(bars) == 2 and bars[1] == first + 1:
        return first, 2
    if len(bars) == 1:
        return first, 1
    return -1, 0


_GROUP_NAME = re.compile(r"\s*(?:`((?:[^`\\]|\\.)+)`|((?:[^\W\d]|\.)[\w.]*))\s*")
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _parse_grouping(formula, text):
    """Expand ``a/b:c`` into the cumulative column tuples ``(a,), (a, b, c)``."""
    if not text.strip():
        raise _fail(formula, "a random-effects term has no grouping factor after '|'")
    out, prefix, pos = [], [], 0
    while True:
        m = _GROUP_NAME.match(text, pos)
        if m is None or m.end() == pos:
            raise _fail(formula, f"grouping expression {text.strip()!r} is not column names "
                                 "joined by '&', ':' or '/'")
        name = _ESCAPE.sub(r"\1", m.group(1)) if m.group(1) is not None else m.group(2)
        if name not in prefix:
            prefix.append(name)
        pos = m.end()
        if pos == len(text):
            out.append(tuple(prefix))
            return out
        if text[pos] == "/":
            out.append(tuple(prefix))
        elif text[pos] not in "&:":
            raise _fail(formula, f"grouping expression {text.strip()!r} is not column names "
                                 "joined by '&', ':' or '/'")
        pos += 1


def _parse_random(formula, chunk):
    inner = chunk[1:-1]
    bar = _find_bar(inner)
    if bar is None:
        return None
    pos, width = bar
    if width == 0:
        raise _fail(formula, f"too many '|' in {chunk!r}")
    expr = inner[:pos].strip()
    group = inner[pos + width:]
    if not expr:
        raise _fail(formula, f"empty random-effects term {chunk!r}")
    groupings = _parse_grouping(formula, group)
    zerocorr = width == 2
    return [RandomTerm(expr, g, zerocorr, chunk) for g in groupings]


def parse_formula(formula):
    """Split a mixed-model formula into response, fixed part and random terms.

    Parameters
    ----------
    formula : str
        e.g. ``"reaction ~ 1 + days + (1 + days | subj)"``.

    Returns
    -------
    ParsedFormula

    Raises
    ------
    ValueError
        Starting "cannot parse formula" for a missing ``~`` or response, unbalanced
        parentheses, an empty random term, a ``|`` term without a grouping factor, a
        ``|`` outside a parenthesised random term, an ``offset()`` that is not a term
        of the fixed part, or a ``cbind()`` response without two arguments.

    Examples
    --------
    >>> p = parse_formula("y ~ 1 + x + (1 + x || g) + (1 | a/b)")
    >>> p.fixed
    '1 + x'
    >>> [(t.expr, t.group_name, t.zerocorr) for t in p.random]
    [('1 + x', 'g', True), ('1', 'a', False), ('1', 'a & b', False)]
    >>> p = parse_formula("cbind(k, n - k) ~ x + offset(log(t)) + (1 | `herd id`)")
    >>> p.counts, p.fixed, p.offsets, p.random[0].grouping
    (('k', 'n - k'), 'x', ('log(t)',), ('herd id',))
    """
    if not isinstance(formula, str):
        raise ValueError(f"cannot parse formula {formula!r}: a formula must be a string")
    _check_balanced(formula)
    tildes = [i for i, ch, depth in _scan(formula) if ch == "~"]
    if not tildes:
        raise _fail(formula, "no '~' separating response and predictors")
    if len(tildes) > 1:
        raise _fail(formula, "more than one '~'")
    lhs = formula[:tildes[0]].strip()
    rhs = formula[tildes[0] + 1:].strip()
    if not lhs:
        raise _fail(formula, "no response on the left of '~'")
    if not rhs:
        raise _fail(formula, "nothing on the right of '~'")
    if "|" in "".join(ch for _, ch, _ in _scan(lhs)):
        raise _fail(formula, "'|' in the response")

    fixed_chunks, random_terms, offsets = [], [], []
    for chunk in _split_top(rhs, "+"):
        chunk = chunk.strip()
        if not chunk:
            raise _fail(formula, "an empty term between '+' signs")
        terms = _parse_random(formula, chunk) if _is_wrapped(chunk) else None
        if terms is not None:
            random_terms.extend(terms)
            continue
        if any(ch == "|" and depth == 0 for _, ch, depth in _scan(chunk)):
            raise _fail(formula, f"'|' outside a parenthesised random-effects term in {chunk!r}")
        chunk = _take_offset(formula, chunk, offsets)
        if chunk:
            fixed_chunks.append(chunk)
    for text in fixed_chunks + [t.expr for t in random_terms] + [lhs]:
        if _OFFSET_CALL.search(_outside_quotes(text)):
            raise _fail(formula, "offset(...) must be a term of its own in the fixed part, "
                                 "as in 'y ~ x + offset(log(n)) + (1 | g)'")
    # lme4 keeps the intercept when only random terms are written: y ~ (1 | g).
    fixed = "1"
    if fixed_chunks:
        fixed = fixed_chunks[0]
        for chunk in fixed_chunks[1:]:
            fixed += f" {chunk}" if chunk.startswith("-") else f" + {chunk}"
    return ParsedFormula(formula, lhs, fixed, random_terms, tuple(offsets),
                         _counts(formula, lhs))


_OFFSET_CALL = re.compile(r"(?<![\w.])offset\s*\(")


def _outside_quotes(text):
    """``text`` with string literals and backtick names blanked out."""
    chars = [" "] * len(text)
    for i, ch, _ in _scan(text):
        chars[i] = ch
    return "".join(chars)


def _call_argument(text, name):
    """The inside of ``text`` when all of it is one call ``name(...)``, else None."""
    m = re.match(rf"{name}\s*(?=\()", text)
    if m is None or not _is_wrapped(text[m.end():]):
        return None
    return text[m.end() + 1:-1]


def _take_offset(formula, chunk, offsets):
    """Move a leading ``offset(expr)`` of a fixed-part chunk into ``offsets``.

    A chunk lies between top-level ``+`` signs, so it can still remove terms after
    the offset (``offset(t) - 1``); those stay.  Returns the rest of the chunk.
    """
    pieces = _split_top(chunk, "-")
    for piece in pieces[1:]:
        if _call_argument(piece.strip(), "offset") is not None:
            raise _fail(formula, f"an offset cannot be removed with '-' (in {chunk!r})")
    inner = _call_argument(pieces[0].strip(), "offset")
    if inner is None:
        return chunk
    if not inner.strip():
        raise _fail(formula, "offset() needs an expression")
    offsets.append(inner.strip())
    return " ".join(f"- {piece.strip()}" for piece in pieces[1:])


def _counts(formula, lhs):
    """``(successes, failures)`` of a ``cbind(successes, failures)`` response, or None."""
    inner = _call_argument(lhs, "cbind")
    if inner is None:
        return None
    args = [arg.strip() for arg in _split_top(inner, ",")]
    if len(args) != 2 or not all(args):
        raise _fail(formula, f"the response {lhs!r} needs two arguments, "
                             "cbind(successes, failures)")
    return tuple(args)

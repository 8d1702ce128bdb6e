"""Tables for notebooks and reports: Markdown, HTML and LaTeX.

The layouts are MixedModels.jl's (its ``show`` methods for the ``text/markdown``,
``text/html`` and ``text/latex`` MIME types):

* a fit is its compact table -- ``Est.``, ``SE``, ``z``, ``p`` and a ``σ_<group>`` column
  per grouping factor, then ``Residual`` (or ``Dispersion``) -- as
  ``fit.format_compact_table()`` prints it;
* the coefficient table has ``Coef.``, ``Std. Error``, ``z``, ``Pr(>|z|)``, as
  ``print(fit)`` shows it;
* VarCorr has a row per random-effects column: group (on a term's first row), column,
  variance, standard deviation and the correlations with the earlier columns;
* a likelihood-ratio test has a row per model, named by its formula: model degrees of
  freedom, -2 log L (or the REML criterion), χ², its degrees of freedom and P(>χ²).

Every cell is the text the printed table shows: the cells come from the same functions
the printed tables are made of (``_summary.compact_table_cells``,
``_summary.coeftable_cells``, ``VarCorr.cells``, ``LikelihoodRatioTest.cells``); only
the frame around them differs. Where MixedModels.jl rounds the likelihood-ratio table to
whole numbers in Markdown, this one keeps the printed four decimals.

Markdown is padded to aligned columns (it reads as a table as plain text too) and
escapes ``|``; HTML escapes its text and aligns numbers right; LaTeX is a plain
``tabular`` with ``\\hline`` rules (no packages needed): its special characters are
escaped, ``σ_g``, ``χ²`` and comparison signs go to math mode, and a leading minus sign
becomes ``$-$``. The notes of a likelihood-ratio test (a variance component tested on
its boundary) follow the Markdown and HTML tables; LaTeX leaves them to the text.
"""
from __future__ import annotations

import html
import re

__all__ = ["Table", "fit_table", "lrt_table", "varcorr_table"]


class Table:
    """Header, rows of strings and per-column alignment; rendered three ways.

    Parameters
    ----------
    header : list of str
    rows : list of list of str
    align : list of {"l", "r"}
        One per column.
    caption : str, optional
        Shown above the HTML table (Markdown and LaTeX leave it out).
    notes : list of str, optional
        Paragraphs after the Markdown and HTML tables.
    """

    def __init__(self, header, rows, align, caption=None, notes=()):
        self.header = [str(h) for h in header]
        self.rows = [[str(c) for c in r] for r in rows]
        self.align = list(align)
        self.caption = caption
        self.notes = list(notes)
        n = len(self.header)
        if len(self.align) != n or any(len(r) != n for r in self.rows):
            raise ValueError("every row and the alignment need one entry per column")

    # -- Markdown ----------------------------------------------------------------------
    def to_markdown(self) -> str:
        """A pipe table, columns padded to a common width, ``|`` escaped."""
        head = [_md_escape(h) for h in self.header]
        body = [[_md_escape(c) for c in r] for r in self.rows]
        widths = [max([len(head[j]), 3] + [len(r[j]) for r in body])
                  for j in range(len(head))]

        def line(cells):
            out = []
            for c, w, a in zip(cells, widths, self.align):
                out.append(c.ljust(w) if a == "l" else c.rjust(w))
            return "| " + " | ".join(out) + " |"

        rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                              for w, a in zip(widths, self.align)) + "|"
        lines = [line(head), rule] + [line(r) for r in body]
        text = "\n".join(lines) + "\n"
        if self.notes:
            text += "".join(f"\n*Note:* {_md_escape(n)}\n" for n in self.notes)
        return text

    # -- HTML --------------------------------------------------------------------------
    def to_html(self) -> str:
        """A ``<table>`` with a header row; numbers right-aligned, text escaped."""
        def cell(tag, text, a):
            side = "left" if a == "l" else "right"
            return f'<{tag} style="text-align: {side};">{html.escape(text)}</{tag}>'

        parts = ['<table class="mixedmodels">']
        if self.caption:
            parts.append(f'<caption style="text-align: left;">{html.escape(self.caption)}</caption>')
        parts.append("<thead><tr>" + "".join(cell("th", h, a) for h, a in zip(self.header, self.align))
                     + "</tr></thead>")
        parts.append("<tbody>")
        for r in self.rows:
            parts.append("<tr>" + "".join(cell("td", c, a) for c, a in zip(r, self.align))
                         + "</tr>")
        parts.append("</tbody>")
        parts.append("</table>")
        for n in self.notes:
            parts.append(f"<p><em>Note:</em> {html.escape(n)}</p>")
        return "\n".join(parts) + "\n"

    # -- LaTeX -------------------------------------------------------------------------
    def to_latex(self) -> str:
        """A ``tabular``: header, ``\\hline`` rules, cells escaped for LaTeX."""
        spec = "".join(self.align)
        lines = [f"\\begin{{tabular}}{{{spec}}}", "\\hline",
                 " & ".join(latex_escape(h) for h in self.header) + " \\\\", "\\hline"]
        for r in self.rows:
            cells = [latex_number(c) if a == "r" else latex_escape(c)
                     for c, a in zip(r, self.align)]
            lines.append(" & ".join(cells) + " \\\\")
        lines += ["\\hline", "\\end{tabular}"]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------
# escaping
# ------------------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


_LATEX_TEXT = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
# characters that need math mode, with their math-mode spelling
_LATEX_MATH = {"<": "<", ">": ">", "|": "|", "σ": r"\sigma", "χ": r"\chi", "²": "^2",
               "φ": r"\phi", "θ": r"\theta", "±": r"\pm", "≤": r"\leq", "≥": r"\geq"}
# inside \mathrm{...}: the text specials that differ there
_LATEX_MATHRM = {"\\": r"\backslash ", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\sim ", "^": r"\hat{}",
                 " ": r"\ "}


def latex_escape(text: str) -> str:
    """Text for a LaTeX table cell: special characters escaped, ``σ_<name>`` as
    ``$\\sigma_{\\mathrm{name}}$``, ``χ²`` as ``$\\chi^2$``, ``<``, ``>`` and ``|`` in
    math mode (a plain-text ``<`` prints as ``¡`` in LaTeX's default font encoding)."""
    m = re.fullmatch(r"σ_(.+)", text)
    if m:
        name = "".join(_LATEX_MATHRM.get(ch) or _LATEX_MATH.get(ch) or ch for ch in m.group(1))
        return f"$\\sigma_{{\\mathrm{{{name}}}}}$"
    out, math = [], []
    for ch in text:
        if ch in _LATEX_MATH:
            math.append(_LATEX_MATH[ch])
            continue
        if math:
            out.append("$" + "".join(math) + "$")
            math = []
        out.append(_LATEX_TEXT.get(ch, ch))
    if math:
        out.append("$" + "".join(math) + "$")
    return "".join(out)


def latex_number(text: str) -> str:
    """A printed number for LaTeX: a leading minus sign as ``$-$``, ``<1e-99`` as
    ``$<$1e-99``; the digits are the printed ones."""
    if text.startswith("-"):
        return "$-$" + latex_escape(text[1:])
    return latex_escape(text)


# ------------------------------------------------------------------------------------
# the tables
# ------------------------------------------------------------------------------------
_TABLES = ("compact", "coeftable", "varcorr")


def fit_table(fit, table="compact", digits=4):
    """A fit's table: ``"compact"`` (the default display), ``"coeftable"`` or
    ``"varcorr"``.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
    table : {"compact", "coeftable", "varcorr"}
    digits : int
        Decimals of the compact table's estimates, standard errors and σ (as
        ``format_compact_table``).

    Returns
    -------
    Table
    """
    from ._summary import coeftable_cells, compact_table_cells

    if table == "compact":
        header, rows = compact_table_cells(fit, digits)
        return Table(header, rows, ["l"] + ["r"] * (len(header) - 1), caption=describe(fit))
    if table == "coeftable":
        header, cells = coeftable_cells(fit)
        rows = [[text for text, _ in r] for r in cells]
        return Table(header, rows, ["l", "r", "r", "r", "r"], caption=describe(fit))
    if table == "varcorr":
        return varcorr_table(fit.varcorr)
    raise ValueError(f"table must be one of {list(_TABLES)}, not {table!r}")


def describe(fit):
    """One line: what was fitted, how, and the formula (the caption of a fit's table)."""
    if fit.is_glmm:
        fam = fit.family
        name = str(fam.name)
        how = (f"Generalized linear mixed model ({name[:1].upper() + name[1:]}, "
               f"{fam.link.name} link) fit by maximum likelihood (nAGQ = {int(fit.nAGQ)})")
    elif fit.REML:
        how = "Linear mixed model fit by REML"
    else:
        how = "Linear mixed model fit by maximum likelihood"
    return f"{how}: {fit.formula}"


def varcorr_table(vc):
    """VarCorr's table: group, column, variance, std. dev., correlations."""
    rows = vc.cells()
    ncor = max([len(r[4]) for r in rows], default=0)
    header = ["", "Column", "Variance", "Std.Dev."] + (["Corr."] + [""] * (ncor - 1) if ncor else [])
    body = [[g, c, v, s] + list(cors) + [""] * (ncor - len(cors)) for g, c, v, s, cors in rows]
    return Table(header, body, ["l", "l", "r", "r"] + ["r"] * ncor)


def lrt_table(lrt):
    """A likelihood-ratio test's table: a row per model, named by its formula."""
    header, rows = lrt.cells()
    return Table(header, rows, ["l"] + ["r"] * (len(header) - 1), notes=lrt.notes)

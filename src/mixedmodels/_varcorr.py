"""Variance components of a fitted mixed model, and their printed table.

The printed layout follows MixedModels.jl's ``VarCorr`` display::

    Variance components:
                Column    Variance Std.Dev.   Corr.
    subj     (Intercept)  565.51067 23.78047
             days          32.68212  5.71683 +0.08
    Residual              654.94145 25.59182

Design notes
------------
* One block per random-effects *term*, in the model's term order.  Two terms may
  share a grouping factor, ``(1 | subj) + (0 + days | subj)``; they stay two blocks,
  both labelled ``subj``.  The per-group accessors (``variances``, ``stddevs``,
  ``correlations``) merge such terms: their columns are concatenated and the
  correlation between columns of different terms is 0 (the model says so).
* Variances and standard deviations share one number of decimals, chosen from the
  standard deviations: each is rendered the way Julia's compact ``show`` would
  (six significant digits, shortest form) and the longest fractional part wins.
  So sleepstudy's 23.7805 / 5.71684 / 25.5918 give 5 decimals and contra's 0.478637
  gives 6.
* Correlations are printed with an explicit sign and 2 decimals in the lower
  triangle; correlations a ``zerocorr`` term holds at 0 are printed as ``.``.

The small number-formatting helpers at the bottom are shared with ``_summary``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["VarCorr", "VarCorrTerm"]


@dataclass(frozen=True)
class VarCorrTerm:
    """The covariance of one random-effects term.

    Attributes
    ----------
    group : str
        Name of the grouping factor.
    cnames : tuple of str
        Names of the term's columns (e.g. ``("(Intercept)", "days")``).
    cov : ndarray, shape (k, k)
        Covariance matrix of the term's random effects, ``sigma^2 Lambda Lambda'``.
    zerocorr : bool
        True when the correlations are held at zero by the model (``||``).
    """

    group: str
    cnames: tuple
    cov: np.ndarray
    zerocorr: bool

    @property
    def variances(self) -> np.ndarray:
        """Diagonal of ``cov``."""
        return np.diag(self.cov).copy()

    @property
    def stddevs(self) -> np.ndarray:
        """Square roots of the variances."""
        return np.sqrt(np.maximum(self.variances, 0.0))

    @property
    def correlation(self) -> np.ndarray:
        """Correlation matrix (unit diagonal; NaN where a standard deviation is 0)."""
        return _cov2cor(self.cov)

    @property
    def has_correlations(self) -> bool:
        """Whether the printed block has a correlation part (vector-valued term)."""
        return len(self.cnames) > 1


def _cov2cor(cov: np.ndarray) -> np.ndarray:
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        cor = cov / np.outer(sd, sd)
    k = cov.shape[0]
    cor[np.arange(k), np.arange(k)] = 1.0
    return cor


class VarCorr:
    """Estimated variances, standard deviations and correlations of the random effects.

    Parameters
    ----------
    groups : sequence of tuple
        One ``(group_name, cnames, cov, zerocorr)`` per random-effects term, in the
        model's term order.  ``cov`` is the k x k covariance matrix
        ``sigma^2 Lambda Lambda'`` of that term's random effects.
    residual_sigma : float or None
        The residual standard deviation (or the dispersion's square root); ``None``
        for families without a dispersion parameter (Bernoulli, binomial, Poisson),
        in which case there is no ``Residual`` row.

    Attributes
    ----------
    terms : tuple of VarCorrTerm
        The terms, by position.
    groups : tuple of str
        Distinct grouping-factor names, in order of first appearance.
    residual_sigma : float or None
    variances, stddevs : dict of str to ndarray
        Per grouping factor; the columns of all terms on that factor, concatenated.
    correlations : dict of str to ndarray
        Per grouping factor, the correlation matrix of those columns (block diagonal
        when several terms share the factor).
    cnames : dict of str to list of str
        Per grouping factor, the column names in the same order.

    Notes
    -----
    For a term with covariance :math:`\\Sigma`, the standard deviations are
    :math:`s_i = \\sqrt{\\Sigma_{ii}}` and the correlations
    :math:`\\rho_{ij} = \\Sigma_{ij} / (s_i s_j)`.
    """

    def __init__(self, groups: Sequence, residual_sigma: float | None = None):
        terms = []
        for entry in groups:
            name, cnames, cov, zerocorr = entry
            cnames = tuple(str(c) for c in cnames)
            cov = np.atleast_2d(np.asarray(cov, dtype=float)).copy()
            k = len(cnames)
            if cov.shape != (k, k):
                raise ValueError(
                    f"term on {name!r}: covariance has shape {cov.shape} but there are "
                    f"{k} column names {list(cnames)}"
                )
            cov.setflags(write=False)
            terms.append(VarCorrTerm(str(name), cnames, cov, bool(zerocorr)))
        self._terms = tuple(terms)
        if residual_sigma is not None:
            residual_sigma = float(residual_sigma)
            if not math.isfinite(residual_sigma):
                residual_sigma = None
        self._sigma = residual_sigma

    # -- accessors -------------------------------------------------------------------
    @property
    def terms(self) -> tuple:
        return self._terms

    @property
    def groups(self) -> tuple:
        seen = []
        for t in self._terms:
            if t.group not in seen:
                seen.append(t.group)
        return tuple(seen)

    @property
    def residual_sigma(self) -> float | None:
        return self._sigma

    def _by_group(self, group):
        return [t for t in self._terms if t.group == group]

    @property
    def cnames(self) -> dict:
        return {g: [c for t in self._by_group(g) for c in t.cnames] for g in self.groups}

    @property
    def variances(self) -> dict:
        return {g: np.concatenate([t.variances for t in self._by_group(g)])
                for g in self.groups}

    @property
    def stddevs(self) -> dict:
        return {g: np.concatenate([t.stddevs for t in self._by_group(g)])
                for g in self.groups}

    @property
    def correlations(self) -> dict:
        out = {}
        for g in self.groups:
            blocks = [t.correlation for t in self._by_group(g)]
            k = sum(b.shape[0] for b in blocks)
            cor = np.zeros((k, k))
            i = 0
            for b in blocks:
                n = b.shape[0]
                cor[i:i + n, i:i + n] = b
                i += n
            out[g] = cor
        return out

    # -- tabular form -----------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per random-effects column, plus ``Residual`` when present.

        Returns
        -------
        pandas.DataFrame
            Columns ``group``, ``column``, ``variance``, ``stddev`` and one
            ``corr_<name>`` column per distinct column name: the correlation of the
            row's column with column ``<name>`` of the same term.  NaN where it does
            not apply (the column itself, another term or grouping factor, a
            ``zerocorr`` term, the residual).
        """
        corr_names = []
        for t in self._terms:
            if t.has_correlations and not t.zerocorr:
                for c in t.cnames:
                    if c not in corr_names:
                        corr_names.append(c)
        rows = []
        for t in self._terms:
            sd = t.stddevs
            var = t.variances
            cor = t.correlation
            for i, c in enumerate(t.cnames):
                row = {"group": t.group, "column": c,
                       "variance": var[i], "stddev": sd[i]}
                for name in corr_names:
                    row["corr_" + name] = np.nan
                if t.has_correlations and not t.zerocorr:
                    for j, other in enumerate(t.cnames):
                        if j != i:
                            row["corr_" + other] = cor[i, j]
                rows.append(row)
        if self._sigma is not None:
            row = {"group": "Residual", "column": "",
                   "variance": self._sigma ** 2, "stddev": self._sigma}
            for name in corr_names:
                row["corr_" + name] = np.nan
            rows.append(row)
        columns = ["group", "column", "variance", "stddev"] + ["corr_" + n for n in corr_names]
        return pd.DataFrame(rows, columns=columns)

    # -- printing ---------------------------------------------------------------------
    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return self.format()

    def format(self) -> str:
        """The table as printed by MixedModels.jl (see the module docstring).

        Returns
        -------
        str
            The lines of the table, without a trailing newline.
        """
        rows = self.cells()
        if not rows:
            return "Variance components:\n(no random effects)"
        names = [r[0] for r in rows]
        cols = [r[1] for r in rows]
        show_var = [r[2] for r in rows]
        show_sd = [r[3] for r in rows]

        nmwd = max(len(n) for n in names) + 1
        cnmwd = max([len(c) for c in cols] + [len("Column")]) + 1
        varwd = max([len(v) for v in show_var] + [len("Variance")]) + 1
        stdwd = max([len(s) for s in show_sd] + [len("Std.Dev.")]) + 1
        any_corr = any(t.has_correlations for t in self._terms)

        lines = ["Variance components:"]
        head = (" " * nmwd + _cpad("Column", cnmwd) + _cpad("Variance", varwd)
                + _cpad("Std.Dev.", stdwd) + ("  Corr." if any_corr else ""))
        lines.append(head.rstrip())
        for name, col, var, sd, cors in rows:
            line = name.ljust(nmwd) + col.ljust(cnmwd) + var.rjust(varwd) + sd.rjust(stdwd)
            for c in cors:
                line += "   .  " if c == "." else c.rjust(6)
            lines.append(line.rstrip())
        return "\n".join(lines)

    def cells(self) -> list:
        """The rows of the printed table, each number as :meth:`format` prints it.

        Returns
        -------
        list of tuple
            ``(group, column, variance, std_dev, correlations)`` per random-effects
            column (the group name on a term's first row only), then
            ``("Residual", "", variance, std_dev, [])`` when there is a residual.
            ``correlations`` lists the row's correlations with the term's earlier
            columns (``"+0.08"``; ``"."`` where a ``zerocorr`` term holds them at 0).
            Empty when there are no random effects.
        """
        sds = [float(s) for t in self._terms for s in t.stddevs]
        if self._sigma is not None:
            sds.append(self._sigma)
        if not sds:
            return []
        digits = print_digits(sds)
        show_sd = [fixed(s, digits) for s in sds]
        show_var = [fixed(s * s, digits) for s in sds]
        rows = []
        ind = 0
        for t in self._terms:
            cor = t.correlation
            for j, c in enumerate(t.cnames):
                cors = ["." if t.zerocorr else _signed2(cor[j, i]) for i in range(j)]
                rows.append((t.group if j == 0 else "", c, show_var[ind], show_sd[ind], cors))
                ind += 1
        if self._sigma is not None:
            rows.append(("Residual", "", show_var[ind], show_sd[ind], []))
        return rows

    # -- notebook and report display (layouts in _display.py) ---------------------------
    def to_markdown(self) -> str:
        """The table as Markdown, in MixedModels.jl's layout (numbers as printed)."""
        from ._display import varcorr_table

        return varcorr_table(self).to_markdown()

    def to_html(self) -> str:
        """The table as an HTML ``<table>`` (numbers as printed)."""
        from ._display import varcorr_table

        return varcorr_table(self).to_html()

    def to_latex(self) -> str:
        """The table as a LaTeX ``tabular`` (numbers as printed)."""
        from ._display import varcorr_table

        return varcorr_table(self).to_latex()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def _repr_html_(self) -> str:
        return self.to_html()


# ------------------------------------------------------------------------------------
# Number formatting shared with _summary.  These reproduce, in Python, the rules of
# Julia's printing that MixedModels.jl tables rely on.
# ------------------------------------------------------------------------------------
def _cpad(s: str, n: int) -> str:
    """Centre ``s`` in a field of width ``n`` (extra space goes to the right)."""
    return s.rjust((n + len(s)) // 2).ljust(n)


def fixed(x: float, digits: int) -> str:
    """``x`` with exactly ``digits`` decimals (correctly rounded, ties to even)."""
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    return f"{x:.{max(digits, 0)}f}"


def _signed2(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    return f"{x:+.2f}"


def compact(x: float) -> str:
    """``x`` as Julia prints a Float64 in compact mode (e.g. inside a table).

    At most six significant digits and no trailing zeros; fixed notation when the
    decimal point falls within ``-4 < pt <= 6`` digits of the first significant
    digit (and a rounded-off integer part would not be misrepresented), otherwise
    ``d.ddddde±x`` with no exponent padding.  ``251.405``, ``10.4673``,
    ``0.000722797``, ``1.0e-5``, ``1.23457e6``.
    """
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    if x == 0.0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    mant, exp = f"{abs(x):.5e}".split("e")
    digits = mant.replace(".", "").rstrip("0") or "0"
    olength = len(digits)
    pt = int(exp) + 1                    # position of the decimal point
    nexp = pt - olength                  # value == int(digits) * 10**nexp
    exp_form = True
    if -4 < pt <= 6:
        exp_form = pt >= olength and abs((x + 0.05) % (10.0 ** (pt - olength)) - 0.05) > 0.05
    if not exp_form:
        if pt <= 0:
            body = "0." + "0" * (-pt) + digits
        elif pt >= olength:
            body = digits + "0" * nexp + ".0"
        else:
            body = digits[:pt] + "." + digits[pt:]
    else:
        body = digits[0] + "." + (digits[1:] or "0") + "e" + str(pt - 1)
    return sign + body


def alignment(s: str) -> tuple:
    """Split a printed number at its decimal point (or exponent marker).

    Mirrors Julia's ``Base.alignment`` for reals: returns the widths of the part
    before the first of ``.eEfF`` and of the rest.
    """
    for i, ch in enumerate(s):
        if ch in ".eEfF":
            return i, len(s) - i
    return len(s), 0


def print_digits(values) -> int:
    """Common number of decimals for a column of standard deviations.

    The longest fractional part among the values' compact renderings, as
    MixedModels.jl chooses it for the VarCorr table.
    """
    best = max(alignment(compact(v))[1] for v in values) - 1
    return max(best, 0)

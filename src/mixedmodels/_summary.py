"""Printed summaries of fitted mixed models: coefficient tables and the model display.

Everything here reads a fitted model by duck typing; the attributes used are

``coef``, ``coef_names``, ``stderror``, ``dropped_coefs``, ``varcorr``,
``reterm_names``, ``reterm_cnames``, ``reterm_sds``, ``ngroups``, ``nobs``,
``objective``, ``loglik``, ``deviance``, ``aic``, ``aicc``, ``bic``, ``formula``,
``REML``, ``is_glmm``, ``family`` (``.name``, ``.link.name``), ``nAGQ``, ``sigma``,
``singular``.

The layouts follow MixedModels.jl (which prints coefficient tables with StatsBase's
``CoefTable``):

* ``format_coeftable`` -- the ``Coef. / Std. Error / z / Pr(>|z|)`` table between
  box-drawing rules.  Coefficients and standard errors are shown the way Julia shows
  a Float64 in compact mode (six significant digits) and aligned on the decimal
  point; ``z`` has 2 decimals; p-values use :func:`format_pvalue`.
* ``format_compact_table`` -- the one-table-per-model view of the MixedModels.jl
  tutorials: ``Est.``, ``SE`` (4 decimals), ``z``, ``p`` and a ``σ_<group>`` column
  per grouping factor, the σ of a random-effects column in the row of the
  fixed-effects coefficient with the same name.
* ``format_model`` -- the full ``print(model)`` display.

Notes
-----
The Wald statistic is :math:`z_j = \\hat\\beta_j / \\mathrm{se}(\\hat\\beta_j)` and its
two-sided p-value :math:`p_j = 2\\,\\Phi(-|z_j|)` (equivalently the upper tail of a
:math:`\\chi^2_1` at :math:`z_j^2`, as MixedModels.jl computes it).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from ._varcorr import alignment, compact, fixed

__all__ = [
    "coeftable",
    "coeftable_cells",
    "compact_table",
    "compact_table_cells",
    "format_coeftable",
    "format_compact_table",
    "format_model",
    "format_pvalue",
]

_RULE = "\u2500"          # box-drawing horizontal line, as in MixedModels.jl
_COEF_COLUMNS = ["Coef.", "Std. Error", "z", "Pr(>|z|)"]


# ------------------------------------------------------------------------------------
# p-values
# ------------------------------------------------------------------------------------
def format_pvalue(p: float) -> str:
    """Format a p-value in at most 6 characters, as StatsBase's ``PValue`` does.

    Parameters
    ----------
    p : float
        A probability in [0, 1] (NaN allowed).

    Returns
    -------
    str
        ``"%.4f"`` when ``p >= 1e-4``; otherwise ``"<1e-NN"`` with
        ``NN = -ceil(nextfloat(log10(p)))`` bounded by 99, so the printed bound is the
        smallest power of ten strictly above ``p``: ``4.5e-5 -> "<1e-04"``,
        ``1e-5 -> "<1e-04"``, ``3e-12 -> "<1e-11"``, ``0 -> "<1e-99"``.
        ``"NaN"`` for NaN.

    Raises
    ------
    ValueError
        If ``p`` lies outside [0, 1].
    """
    p = float(p)
    if math.isnan(p):
        return "NaN"
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a p-value must lie in [0, 1], got {p!r}")
    if p >= 1e-4:
        return f"{p:.4f}"
    if p == 0.0:
        e = -99
    else:
        e = math.ceil(max(math.nextafter(math.log10(p), math.inf), -99.0))
    return f"<1e-{-e:02d}"


# ------------------------------------------------------------------------------------
# the coefficient table
# ------------------------------------------------------------------------------------
def _dropped(model) -> list:
    names = set(model.coef_names)
    return [str(d) for d in (getattr(model, "dropped_coefs", None) or []) if d not in names]


def coeftable(model, stderror=None) -> pd.DataFrame:
    """Wald table of the fixed-effects coefficients.

    Parameters
    ----------
    model
        A fitted model (see the module docstring for the attributes read).
    stderror : array_like, optional
        The standard errors to use (default ``model.stderror``).

    Returns
    -------
    pandas.DataFrame
        Indexed by coefficient name, columns ``"Coef."``, ``"Std. Error"``, ``"z"``,
        ``"Pr(>|z|)"``.  Coefficients whose columns of X were dropped as aliased
        (``model.dropped_coefs``) follow as rows of NaN.
    """
    coef = np.asarray(model.coef, dtype=float).ravel()
    se = np.asarray(model.stderror if stderror is None else stderror, dtype=float).ravel()
    names = [str(n) for n in model.coef_names]
    if not len(coef) == len(se) == len(names):
        raise ValueError(
            f"coef ({len(coef)}), stderror ({len(se)}) and coef_names ({len(names)}) "
            "must have the same length"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        z = coef / se
    p = 2.0 * stats.norm.sf(np.abs(z))
    table = pd.DataFrame({"Coef.": coef, "Std. Error": se, "z": z, "Pr(>|z|)": p},
                         index=pd.Index(names), columns=_COEF_COLUMNS)
    dropped = _dropped(model)
    if dropped:
        extra = pd.DataFrame(np.nan, index=pd.Index(dropped), columns=_COEF_COLUMNS)
        table = pd.concat([table, extra])
    return table


def _aligned_table(header, cells) -> list:
    """Lay out a CoefTable the way StatsBase does.

    ``cells[i][j]`` is ``(text, kind)`` with kind ``"num"`` (aligned on the decimal
    point) or ``"text"`` (left-aligned).  Column 0 is the row name.  Columns are
    separated by two spaces; headers are right-aligned over their column.
    """
    ncol = len(header)
    parts = []
    for row in cells:
        prow = []
        for text, kind in row:
            prow.append(alignment(text) if kind == "num" else (0, len(text)))
        parts.append(prow)
    widths = []
    for j in range(ncol):
        left = max([r[j][0] for r in parts], default=0)
        right = max([r[j][1] for r in parts], default=0)
        if len(header[j]) > left + right:
            left += len(header[j]) - (left + right)
        widths.append((left, right))
    total = sum(l + r for l, r in widths) + 2 * (ncol - 1)
    lines = [_RULE * total]
    head = " " * sum(widths[0]) + "".join(
        "  " + header[j].rjust(sum(widths[j])) for j in range(1, ncol))
    lines.append(head)
    lines.append(_RULE * total)
    for row, prow in zip(cells, parts):
        out = []
        for j, ((text, _), (a, b)) in enumerate(zip(row, prow)):
            out.append(" " * (widths[j][0] - a) + text + " " * (widths[j][1] - b))
        lines.append("  ".join(out).rstrip())
    lines.append(_RULE * total)
    return lines


def format_coeftable(model) -> str:
    """The fixed-effects table as MixedModels.jl prints it.

    Returns
    -------
    str
        For sleepstudy::

            ──────────────────────────────────────────────────
                            Coef.  Std. Error      z  Pr(>|z|)
            ──────────────────────────────────────────────────
            (Intercept)  251.405      6.63226  37.91    <1e-99
            days          10.4673     1.50224   6.97    <1e-11
            ──────────────────────────────────────────────────

        Rows of dropped (aliased) coefficients are left blank.  No trailing newline.
    """
    header, cells = coeftable_cells(model)
    return "\n".join(_aligned_table(header, cells))


def coeftable_cells(model):
    """The cells of :func:`format_coeftable`, as printed.

    Returns
    -------
    header : list of str
        ``["", "Coef.", "Std. Error", "z", "Pr(>|z|)"]``.
    rows : list of list of (str, str)
        Per coefficient ``(text, kind)`` pairs, kind ``"num"`` (aligned on the decimal
        point) or ``"text"``; the text of every number is the one printed. Dropped
        (aliased) coefficients have empty cells.
    """
    table = coeftable(model)
    cells = []
    for name, row in table.iterrows():
        if np.isnan(row["Coef."]):
            cells.append([(name, "text")] + [("", "text")] * 4)
            continue
        cells.append([
            (name, "text"),
            (compact(row["Coef."]), "num"),
            (compact(row["Std. Error"]), "num"),
            (fixed(row["z"], 2), "num"),
            (format_pvalue(row["Pr(>|z|)"]), "text"),
        ])
    return [""] + _COEF_COLUMNS, cells


# ------------------------------------------------------------------------------------
# the compact (tutorial) table
# ------------------------------------------------------------------------------------
def _sigma_columns(model):
    """Per grouping factor (first-appearance order): {column name: σ}."""
    bygroup: dict = {}
    for g, cnames, sds in zip(model.reterm_names, model.reterm_cnames, model.reterm_sds):
        d = bygroup.setdefault(str(g), {})
        for c, s in zip(cnames, np.asarray(sds, dtype=float).ravel()):
            d.setdefault(str(c), float(s))
    return bygroup


def _residual_label(model):
    """Name and value of the dispersion row, or None when there is none."""
    sigma = getattr(model, "sigma", None)
    if sigma is None or not math.isfinite(float(sigma)):
        return None
    return ("Dispersion" if getattr(model, "is_glmm", False) else "Residual"), float(sigma)


def compact_table(model) -> pd.DataFrame:
    """The tutorial-style table as numbers.

    Returns
    -------
    pandas.DataFrame
        Indexed by row name, columns ``"Est."``, ``"SE"``, ``"z"``, ``"p"`` and one
        ``"σ_<group>"`` per grouping factor.  Rows: the fixed-effects coefficients
        (then dropped ones, all NaN); then random-effects columns that are not
        fixed effects; then ``"Residual"`` (LMM) or ``"Dispersion"`` (a GLMM family
        with a dispersion) carrying σ in ``"Est."``.  NaN where a cell is empty.
    """
    ct = coeftable(model)
    sig = _sigma_columns(model)
    scols = ["σ_" + g for g in sig]
    rows = {}
    for name, r in ct.iterrows():
        rows[name] = [r["Coef."], r["Std. Error"], r["z"], r["Pr(>|z|)"]]
    for g in sig:
        for c in sig[g]:
            if c not in rows:
                rows[c] = [np.nan] * 4
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["Est.", "SE", "z", "p"])
    for g, col in zip(sig, scols):
        out[col] = [sig[g].get(name, np.nan) for name in out.index]
    resid = _residual_label(model)
    if resid is not None:
        label, sigma = resid
        out.loc[label] = [sigma] + [np.nan] * (3 + len(scols))
    return out


def format_compact_table(model, digits: int = 4) -> str:
    """The tutorial-style table as text.

    Parameters
    ----------
    model
        A fitted model.
    digits : int, default 4
        Decimals for ``Est.``, ``SE`` and the σ columns (``z`` always has 2).

    Returns
    -------
    str
        E.g. for the contra GLMM::

                           Est.      SE      z       p  σ_dist
            (Intercept)  -0.6871  0.1686  -4.08  <1e-04  0.4786
            age           0.0035  0.0092   0.38  0.7022

        Name column left-aligned, the others right-aligned, two spaces between
        columns, blank where a cell does not apply.  No trailing newline.
    """
    header, body = compact_table_cells(model, digits)
    widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]
    lines = []
    for r in [header] + body:
        cells = [r[0].ljust(widths[0])] + [r[j].rjust(widths[j]) for j in range(1, len(r))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def compact_table_cells(model, digits: int = 4):
    """The cells of :func:`format_compact_table`, as printed.

    Returns
    -------
    header : list of str
        ``""`` (the row names), then the columns of :func:`compact_table`.
    rows : list of list of str
        The row name, then each cell as printed (``""`` where a cell does not apply).
    """
    tab = compact_table(model)
    header = [""] + list(tab.columns)
    body = []
    for name, r in tab.iterrows():
        row = [str(name)]
        for col in tab.columns:
            v = r[col]
            if np.isnan(v):
                row.append("")
            elif col == "z":
                row.append(fixed(v, 2))
            elif col == "p":
                row.append(format_pvalue(v))
            else:
                row.append(fixed(v, digits))
        body.append(row)
    return header, body


# ------------------------------------------------------------------------------------
# the full display
# ------------------------------------------------------------------------------------
def _criteria_lines(labels, values) -> list:
    nums = [fixed(v, 4) for v in values]
    width = max(max(len(n) for n in nums) + 1, 11)
    head = "".join(lab.rjust((width + len(lab)) // 2).ljust(width) for lab in labels)
    return [head.rstrip(), "".join(n.rjust(width) for n in nums)]


def _family_line(model) -> str:
    fam = getattr(model, "family", None)
    if fam is None:
        return "  Family: unknown"
    name = str(getattr(fam, "name", fam))
    name = name[:1].upper() + name[1:]
    link = getattr(fam, "link", None)
    link = getattr(link, "name", link)
    return f"  Family: {name}, link: {link}" if link is not None else f"  Family: {name}"


def format_model(model) -> str:
    """The full display of a fitted model, in the layout of MixedModels.jl.

    Header (method, formula, for a GLMM the family and link), the fit criteria
    (log-likelihood, -2 log-likelihood or deviance, AIC, AICc, BIC; the REML
    criterion for a REML fit), the variance components, the numbers of
    observations and of levels of each grouping factor, and the fixed-effects table;
    then notes for a singular fit and for coefficients dropped as aliased.

    Returns
    -------
    str
        No trailing newline.
    """
    glmm = bool(getattr(model, "is_glmm", False))
    lines = []
    if glmm:
        nagq = int(getattr(model, "nAGQ", 1) or 1)
        lines.append(f"Generalized linear mixed model fit by maximum likelihood (nAGQ = {nagq})")
        lines.append("  " + str(model.formula))
        lines.append(_family_line(model))
        lines.append("")
        lines += _criteria_lines(
            [" logLik", " deviance", "AIC", "AICc", "BIC"],
            [model.loglik, model.deviance, model.aic, model.aicc, model.bic])
    elif getattr(model, "REML", False):
        lines.append("Linear mixed model fit by REML")
        lines.append(" " + str(model.formula))
        lines.append(f" REML criterion at convergence: {float(model.objective)!r}")
    else:
        lines.append("Linear mixed model fit by maximum likelihood")
        lines.append(" " + str(model.formula))
        lines += _criteria_lines(
            ["  logLik", "-2 logLik", "AIC", "AICc", "BIC"],
            [model.loglik, model.objective, model.aic, model.aicc, model.bic])
    lines.append("")
    lines.append(str(model.varcorr))
    if model.varcorr.residual_sigma is None:
        lines.append("")      # MixedModels.jl leaves a gap when there is no Residual row
    levels = ", ".join(str(int(n)) for n in model.ngroups)
    lines.append(f" Number of obs: {int(model.nobs)}; levels of grouping factors: {levels}")
    lines.append("")
    lines.append("Fixed-effects parameters:" if glmm else "  Fixed-effects parameters:")
    lines.append(format_coeftable(model))
    if glmm:
        what = "θ and φ" if getattr(model, "dispersion", None) is not None else "θ"
        lines.append(f"Standard errors: conditional on {what} (MixedModels.jl's); "
                     "coeftable(se=\"hessian\") gives the Hessian-based ones of lme4 and glmmTMB.")
    if getattr(model, "nb_theta", None) is not None:
        se = model.nb_theta_stderror
        how = f"estimated (SE {se:.4g})" if se is not None else "given"
        lines.append(f"Negative binomial θ = {model.nb_theta:.6g}, {how}: Var(y) = μ + μ²/θ.")
    if getattr(model, "dispersion", None) is not None:
        lines.append(f"Dispersion φ = {model.dispersion:.6g} (σ = √φ = {model.sigma:.6g}), "
                     "estimated with β and θ by maximum likelihood.")
    if getattr(model, "singular", False):
        lines.append("The fit is singular: some variance components are zero or some "
                     "correlations are \u00b11 (a boundary estimate).")
    dropped = _dropped(model)
    if dropped:
        lines.append("Aliased columns dropped from the fixed-effects model matrix "
                     "(not estimable): " + ", ".join(dropped))
    return "\n".join(lines)

"""Likelihood-ratio tests between nested fits (lme4's ``anova(m0, m1)``, MixedModels.jl's
``lrtest``).

The fits are put in order of their number of parameters and each is tested against the
one before it: χ² = 2 (log L_larger - log L_smaller) on the difference in parameters.
Linear mixed models fitted by ML compare freely; REML criteria compare only between fits
with the same fixed effects (the REML likelihood is that of the residual contrasts of X,
so it changes with X); GLMMs compare by their log-likelihood, the full family density
as lme4's ``logLik`` reports it, which needs one family, link and quadrature rule.

Notes
-----
When the smaller model sets a variance component to zero (it lacks a random-effects term,
or a column of one), the null hypothesis lies on the boundary of the parameter space and
the statistic is not χ²-distributed under it: the reference distribution is a mixture of
χ² distributions with fewer degrees of freedom, so the χ² p-value is conservative (with a
single variance component added, the right p-value is half the reported one; Self and
Liang 1987, Stram and Lee 1994). The table says so in a note.
"""
import math
import textwrap

import numpy as np
import pandas as pd
from scipy.stats import chi2

# A smaller model fitting better than a larger one by more than this (in -2 log L) means
# an optimizer stopped short; less is rounding at a shared optimum (lme4 clamps both to 0)
_NEGATIVE_CHISQ_NOTE = 1e-4
# relative residual below which a column lies in the span of another model's columns
_SPAN_RTOL = 1e-8


class LikelihoodRatioTest:
    """Likelihood-ratio tests between nested fits, in order of their number of parameters.

    Built by :func:`lrtest`. Model i (1-based, as printed) is tested against model i - 1.

    Attributes
    ----------
    fits : tuple
        The fits, smallest first.
    formulas : list of str
    npar : ndarray of int
        Number of parameters of each fit (``fit.dof``: β, θ, σ or φ).
    loglik, deviance, aic, bic : ndarray
        Per fit; ``deviance`` is -2 log L (the REML criterion for REML fits), as lme4's
        ``anova`` reports it.
    chisq, df, pvalues : ndarray
        Per test (one fewer than fits): the statistic, its degrees of freedom and the
        upper-tail χ² probability.
    notes : list of str
        Caveats: a variance component tested on its boundary, a larger model that fits
        worse than a smaller one.
    """

    def __init__(self, fits, notes):
        self.fits = tuple(fits)
        self.REML = bool(fits[0].REML)
        self.formulas = [str(f.formula) for f in fits]
        self.npar = np.array([f.dof for f in fits], dtype=int)
        self.loglik = np.array([float(f.loglik) for f in fits])
        self.deviance = -2.0 * self.loglik
        self.aic = np.array([float(f.aic) for f in fits])
        self.bic = np.array([float(f.bic) for f in fits])
        # lme4 clamps a negative statistic to 0 (p = 1); the note says why it happened
        self.chisq = np.maximum(0.0, 2.0 * np.diff(self.loglik))
        self.df = np.diff(self.npar)
        self.pvalues = chi2.sf(self.chisq, self.df)
        self.notes = list(notes)

    def to_frame(self):
        """The table as a DataFrame, one row per fit (smallest first).

        Returns
        -------
        pandas.DataFrame
            Indexed 1, 2, ... (``model``) as printed; columns ``npar``, ``loglik``,
            ``deviance`` (-2 log L), ``aic``, ``bic``, ``chisq``, ``df``, ``p``; the
            test columns of the first row are NaN.
        """
        pad = np.array([np.nan])
        return pd.DataFrame({
            "npar": self.npar,
            "loglik": self.loglik,
            "deviance": self.deviance,
            "aic": self.aic,
            "bic": self.bic,
            "chisq": np.concatenate([pad, self.chisq]),
            "df": np.concatenate([pad, self.df.astype(float)]),
            "p": np.concatenate([pad, self.pvalues]),
        }, index=pd.RangeIndex(1, len(self.fits) + 1, name="model"))

    def __str__(self):
        lines = ["Model Formulae"]
        lines += [f"{i}: {f}" for i, f in enumerate(self.formulas, start=1)]
        header, body = self.cells()
        header = [""] + header[1:]
        rows = [header] + [[f"[{i + 1}]"] + r[1:] for i, r in enumerate(body)]
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        rule = "─" * (sum(widths) + 2 * (len(widths) - 1))
        body = ["  ".join(cell.rjust(w) if c else cell.ljust(w)
                          for c, (cell, w) in enumerate(zip(r, widths)))
                for r in rows]
        lines += [rule, body[0], rule] + body[1:] + [rule]
        for note in self.notes:
            lines.append(textwrap.fill(note, width=max(len(rule), 88), initial_indent="Note: ",
                                       subsequent_indent="      "))
        return "\n".join(lines)

    __repr__ = __str__

    # -- notebook and report display (layouts in _display.py) -----------------------------
    def cells(self):
        """The printed table's cells, each number as printed.

        Returns
        -------
        header : list of str
            ``["", "model-dof", "-2 logLik" (or "REML crit"), "χ²", "χ²-dof", "P(>χ²)"]``.
        rows : list of list of str
            Per fit, smallest first: its formula, then the cells (the test columns of
            the first fit empty).
        """
        header = ["", "model-dof", "REML crit" if self.REML else "-2 logLik", "χ²", "χ²-dof",
                  "P(>χ²)"]
        rows = []
        for i in range(len(self.fits)):
            row = [self.formulas[i], str(self.npar[i]), f"{self.deviance[i]:.4f}"]
            if i == 0:
                row += ["", "", ""]
            else:
                row += [f"{self.chisq[i - 1]:.4f}", str(self.df[i - 1]),
                        format_pvalue(self.pvalues[i - 1])]
            rows.append(row)
        return header, rows

    def to_markdown(self):
        """The table as Markdown, in MixedModels.jl's layout (a row per formula; the
        numbers as printed), then the notes."""
        from .._display import lrt_table

        return lrt_table(self).to_markdown()

    def to_html(self):
        """The table as an HTML ``<table>`` (numbers as printed), then the notes."""
        from .._display import lrt_table

        return lrt_table(self).to_html()

    def to_latex(self):
        """The table as a LaTeX ``tabular`` (numbers as printed; the notes are left out)."""
        from .._display import lrt_table

        return lrt_table(self).to_latex()

    def _repr_markdown_(self):
        return self.to_markdown()

    def _repr_html_(self):
        return self.to_html()


def format_pvalue(p):
    """A p-value as MixedModels.jl prints it: four decimals, or ``<1e-NN`` below 1e-4."""
    if not np.isfinite(p):
        return "NaN"
    if p >= 1e-4:
        return f"{p:.4f}"
    # the smallest power of ten above p (below 1e-99 the exponent stops there)
    e = math.ceil(math.log10(p)) if p > 0 else -99
    if 10.0 ** e == p:
        e += 1
    return f"<1e{max(e, -99):03d}"


def lrtest(*fits):
    """Likelihood-ratio tests between nested mixed-model fits.

    Parameters
    ----------
    *fits : LinearMixedModelFit or GeneralizedLinearMixedModelFit
        Two or more fits (or one list of them) to the same data, each nested in the next larger one; any
        order (they are sorted by their number of parameters, as lme4's ``anova`` does).
        Linear mixed models fitted by ML; REML fits only when their fixed effects are
        identical (they then differ in the random effects alone); GLMMs of one family,
        link and ``nAGQ``, compared by their log-likelihood.

    Returns
    -------
    LikelihoodRatioTest
        ``.to_frame()`` gives the table (``npar``, ``loglik``, ``deviance``, ``aic``,
        ``bic``, ``chisq``, ``df``, ``p``); printing it gives MixedModels.jl's layout.
        Each fit is tested against the one before it.

    Raises
    ------
    TypeError
        An argument is not a fitted mixed model.
    ValueError
        Fewer than two fits; fits to different data (number of observations, response,
        weights); a linear mixed model with a GLMM, or GLMMs of different families, links
        or ``nAGQ``; REML with ML fits, or REML fits with different fixed effects; fits
        that cannot be nested (the same number of parameters, fixed-effect columns or
        random-effects terms of the smaller model that the larger one lacks).

    Notes
    -----
    χ² = 2 (log L_1 - log L_0) on npar_1 - npar_0 degrees of freedom. When the smaller
    model lacks a variance component of the larger one, the test is on the boundary of
    the parameter space and the χ² p-value conservative; the result carries a note.

    Examples
    --------
    >>> m0 = mm.fit("reaction ~ 1 + days + (1 | subj)", sleep)
    >>> m1 = mm.fit("reaction ~ 1 + days + (1 + days | subj)", sleep)
    >>> print(mm.lrtest(m0, m1))
    """
    from .._results import MixedModelFit

    if len(fits) == 1 and isinstance(fits[0], (list, tuple)):
        fits = tuple(fits[0])
    for i, f in enumerate(fits, start=1):
        if not isinstance(f, MixedModelFit):
            raise TypeError(f"argument {i} ({type(f).__name__}) is not a fitted mixed model "
                            "(the result of mm.fit or Model.fit)")
    if len(fits) < 2:
        raise ValueError(f"a likelihood-ratio test compares two or more fits; got {len(fits)}")
    _check_comparable(fits)
    # stable: fits with the same count keep their order (and are refused below)
    ordered = sorted(fits, key=lambda f: f.dof)
    notes = []
    for i in range(1, len(ordered)):
        small, large = ordered[i - 1], ordered[i]
        label = f"[{i}] and [{i + 1}]"
        if small.dof == large.dof:
            raise ValueError(
                f"models {label} have the same number of parameters ({small.dof}), so neither "
                f"is nested in the other ({small.formula!r}, {large.formula!r}); compare "
                "non-nested models by their AIC or BIC instead")
        _check_fixed_nested(small, large, label)
        _check_random_nested(small, large, label)
        note = _boundary_note(small, large, i)
        if note:
            notes.append(note)
        diff = 2.0 * (float(large.loglik) - float(small.loglik))
        if diff < -_NEGATIVE_CHISQ_NOTE:
            notes.append(
                f"[{i + 1}] has the lower log-likelihood although it has more parameters "
                f"(by {-diff / 2:.4g}); one of the two fits stopped short of its optimum. "
                "χ² is reported as 0")
    return LikelihoodRatioTest(ordered, notes)


# -- checks ---------------------------------------------------------------------------

def _describe(f):
    if not f.is_glmm:
        return "a linear mixed model"
    return f"a {f.family.name} GLMM with the {f.family.link.name} link"


def _check_comparable(fits):
    first = fits[0]
    for f in fits[1:]:
        if f.is_glmm != first.is_glmm:
            lmm, glmm = (first, f) if f.is_glmm else (f, first)
            raise ValueError(
                f"cannot compare {_describe(lmm)} ({lmm.formula!r}) with {_describe(glmm)} "
                f"({glmm.formula!r}): their likelihoods are of different families")
        if f.is_glmm and (f.family.name != first.family.name
                          or f.family.link.name != first.family.link.name):
            raise ValueError(
                f"cannot compare {_describe(first)} with {_describe(f)}: likelihood-ratio "
                "tests need one family and link")
        if f.is_glmm and f.nAGQ != first.nAGQ:
            raise ValueError(
                f"the GLMMs approximate their likelihoods differently (nAGQ = {first.nAGQ} and "
                f"{f.nAGQ}); refit them with the same nAGQ before comparing")
    reml = [bool(f.REML) for f in fits]
    if any(reml) and not all(reml):
        raise ValueError(
            "cannot compare REML and ML fits: the REML criterion is not a likelihood of the "
            "same data; refit all models with REML=False")
    for i, f in enumerate(fits[1:], start=2):
        if f.nobs != first.nobs:
            raise ValueError(
                f"the fits use different data: {first.nobs} observations in fit 1 and "
                f"{f.nobs} in fit {i}; fit every model to the same rows (rows with missing "
                "values in a model's own columns are dropped per model, so drop them from "
                "the data first)")
        if not np.array_equal(np.asarray(first.y, float), np.asarray(f.y, float)):
            raise ValueError(f"the fits use different data: fit {i} has another response "
                             "than fit 1")
        w0, w1 = first.model.design.weights, f.model.design.weights
        if (w0 is None) != (w1 is None) or (w0 is not None and not np.array_equal(w0, w1)):
            raise ValueError(f"the fits use different weights (fit 1 and fit {i}); their "
                             "likelihoods are not of the same data")
    if all(reml):
        for i, f in enumerate(fits[1:], start=2):
            same = (list(f.coef_names) == list(first.coef_names)
                    and np.shape(f.X) == np.shape(first.X)
                    and np.array_equal(np.asarray(f.X), np.asarray(first.X)))
            if not same:
                raise ValueError(
                    "REML fits compare only when their fixed effects are identical (the REML "
                    f"criterion changes with X); fits 1 and {i} differ in them: refit the "
                    "models with REML=False to test fixed effects")


def _outside_span(a, b):
    """Which columns of a are not in the column span of b (both n-by-*)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape[1] == 0:
        return np.zeros(0, dtype=bool)
    if b.shape[1] == 0:
        return np.linalg.norm(a, axis=0) > 0
    q, r = np.linalg.qr(b)
    # columns of b that are (numerically) dependent add no direction
    keep = np.abs(np.diag(r)) > _SPAN_RTOL * max(np.max(np.abs(np.diag(r))), 1e-300)
    q = q[:, keep]
    resid = a - q @ (q.T @ a)
    return np.linalg.norm(resid, axis=0) > _SPAN_RTOL * np.maximum(np.linalg.norm(a, axis=0), 1e-300)


def _check_fixed_nested(small, large, label):
    out = _outside_span(small.X, large.X)
    if out.any():
        names = [n for n, o in zip(small.coef_names, out) if o]
        raise ValueError(
            f"models {label} are not nested: the fixed-effect column(s) {names} of "
            f"{small.formula!r} are not among those of {large.formula!r}")


def _check_random_nested(small, large, label):
    """Each grouping factor of the smaller model must be in the larger one, with columns
    that the larger one's columns for that factor span (otherwise no constraint on the
    larger model's parameters gives the smaller)."""
    for g in dict.fromkeys(t.group_name for t in small.model.reterms):
        terms_s = [t for t in small.model.reterms if t.group_name == g]
        terms_l = [t for t in large.model.reterms
                   if t.group_name == g or _same_partition(t, terms_s[0])]
        if not terms_l:
            raise ValueError(
                f"models {label} are not nested: the grouping factor {g!r} of "
                f"{small.formula!r} does not appear in {large.formula!r}")
        zs = np.column_stack([t.z for t in terms_s])
        zl = np.column_stack([t.z for t in terms_l])
        out = _outside_span(zs, zl)
        if out.any():
            names = [n for t in terms_s for n in t.cnames]
            bad = [n for n, o in zip(names, out) if o]
            raise ValueError(
                f"models {label} are not nested: the random effect(s) {bad} on {g!r} in "
                f"{small.formula!r} are not among those on {g!r} in {large.formula!r}")


def _same_partition(a, b):
    """Whether two terms group the rows alike, whatever their factors' names and level
    order (``(1 | a & b)`` and ``(1 | b & a)``): a one-to-one map between their levels."""
    if a.nlevels != b.nlevels:
        return False
    pairs = a.codes.astype(np.int64) * b.nlevels + b.codes
    return len(np.unique(pairs)) == a.nlevels


def _variance_components(fit):
    """Number of standard deviations among θ (the entries bounded below by zero)."""
    return int(np.sum(np.isfinite(fit.model.layout.lower)))


def _boundary_note(small, large, i):
    ns, nl = _variance_components(small), _variance_components(large)
    if nl <= ns:
        return None
    added = nl - ns
    return (f"[{i}] vs [{i + 1}] tests {added} variance component(s) on the boundary of the "
            "parameter space (zero in the smaller model); the χ² p-value is conservative (the "
            "null distribution is a mixture of χ² with fewer degrees of freedom: for one "
            "variance component added alone, the right p-value is half the printed one)")

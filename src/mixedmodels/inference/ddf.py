"""t and F tests of the fixed effects of a linear mixed model with Satterthwaite or
Kenward-Roger denominator degrees of freedom (lmerTest's ``summary`` and ``anova``).

- :func:`coeftable_ddf` -- ``fit.coeftable(ddf=...)``: a t test per coefficient;
- :func:`anova` -- ``fit.anova(type=..., ddf=...)``: an F test per fixed-effects term,
  with lmerTest's type I, II and III hypotheses;
- :func:`contrast_test` -- the F test of any L β = 0;
- :func:`hypotheses` -- the L matrices :func:`anova` tests (lmerTest's ``show_tests``);
- :func:`fixed_terms` -- which columns of X make up each term.

The degrees of freedom are computed in ``_satterthwaite.py`` and ``_kenward_roger.py``;
what both need from a fit is computed once and kept with it (a fit is a frozen record, so
this is a cache, and it pickles with the fit).

Terms from coefficient names
----------------------------
Which columns of X belong to which term is read from the coefficient names, which the
formula layer writes in MixedModels.jl's style whichever way it built X: factors of an
interaction joined by `` & ``, a categorical factor as ``name: level``, a numeric factor
by its expression (``abs2(age)``, with ``[i]`` for the columns of a multi-column one).
So ``time & diet: 2`` is in the term ``time:diet`` (MixedModels.jl: ``time & diet``),
with categorical ``diet`` and numeric ``time``. The names are the formula layer's stable,
public output and are the same for its NumPy and patsy builders; its internal term
bookkeeping differs between the two. The price: a level or column name that itself
contains `` & `` or ``: `` would be split wrongly, and where patsy codes a term without
its margins (``1 + a:b``) through columns named like a main effect (``b: x``), those
columns are reported as that main effect's term.
"""
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from ._kenward_roger import kenward_roger_parts, kr_ddf, kr_f
from ._satterthwaite import satterthwaite_f, satterthwaite_parts, satterthwaite_t

__all__ = ["Term", "anova", "coeftable_ddf", "contrast_test", "fixed_terms", "hypotheses"]

_COLUMNS = ["Coef.", "Std. Error", "df", "t", "Pr(>|t|)"]
_ANOVA_COLUMNS = ["Sum Sq", "Mean Sq", "numdf", "dendf", "F", "p"]
_NOT_INDICATORS = ("type III hypotheses: term {!r} is not coded by level indicators even with "
                   "the default codings (a coding written into the formula, like C(x, Sum), "
                   "stays); pass the coding as contrasts= instead, or use type=1 or type=2")
_METHOD_NAMES = {"satterthwaite": "Satterthwaite's", "kenward-roger": "Kenward-Roger's"}


@dataclass(frozen=True)
class Term:
    """A fixed-effects term: its factors in order, which are categorical, its columns."""

    factors: tuple
    categorical: frozenset
    columns: tuple

    @property
    def numeric(self):
        return frozenset(self.factors) - self.categorical

    def label(self, labels="lme4"):
        """``time:diet`` (lme4, lmerTest) or ``time & diet`` (MixedModels.jl)."""
        return (":" if labels == "lme4" else " & ").join(self.factors)


def fixed_terms(coef_names):
    """The fixed-effects terms, in column order, from MixedModels.jl-style names.

    Parameters
    ----------
    coef_names : sequence of str

    Returns
    -------
    intercept : int or None
        The column of ``(Intercept)``.
    terms : list of Term
        The other terms in order of first appearance, with their column indices.
    """
    intercept, found = None, {}
    for j, name in enumerate(coef_names):
        if name == "(Intercept)":
            intercept = j
            continue
        factors, categorical = [], set()
        for piece in name.split(" & "):
            label, sep, _ = piece.partition(": ")
            if sep:
                categorical.add(label)
            else:
                label = re.sub(r"\[\d+\]$", "", piece)   # a column of a multi-column factor
            factors.append(label)
        key = frozenset(factors)
        if key in found:
            found[key][2].append(j)
        else:
            found[key] = (tuple(factors), frozenset(categorical), [j])
    return intercept, [Term(f, c, tuple(cols)) for f, c, cols in found.values()]


def _contains(inner, outer):
    """lmerTest's containment: ``outer`` has every factor of ``inner`` and more, and the
    same numeric factors (so ``diet`` is not contained in ``time:diet``, ``time`` is)."""
    a, b = set(inner.factors), set(outer.factors)
    return a < b and inner.numeric == outer.numeric


def _normalize(ddf):
    key = str(ddf).lower().replace("_", "-").replace(" ", "-")
    if key not in _METHOD_NAMES:
        raise ValueError(f"ddf must be 'satterthwaite' or 'kenward-roger', not {ddf!r}")
    return key


def _check_lmm(fit):
    if getattr(fit, "is_glmm", False) or getattr(fit, "sigma", None) is None:
        raise ValueError("Satterthwaite and Kenward-Roger degrees of freedom apply to linear "
                         "mixed models; a GLMM's Wald tests use the normal distribution")


def _parts(fit, method):
    _check_lmm(fit)
    if method == "satterthwaite":
        return fit._cached("ddf_satterthwaite", lambda: satterthwaite_parts(fit))
    return fit._cached("ddf_kenward_roger", lambda: kenward_roger_parts(fit))


def coeftable_ddf(fit, ddf="satterthwaite"):
    """The coefficient table with t tests on Satterthwaite or Kenward-Roger df.

    Parameters
    ----------
    fit : LinearMixedModelFit
    ddf : {"satterthwaite", "kenward-roger"}
        Kenward-Roger needs a REML fit and reports its adjusted standard errors.

    Returns
    -------
    pandas.DataFrame
        Indexed by coefficient name; columns ``Coef.``, ``Std. Error``, ``df``, ``t``,
        ``Pr(>|t|)``. Coefficients dropped as aliased follow as rows of NaN.

    Notes
    -----
    For coefficient j with standard error s_j and ν_j degrees of freedom,
    t = β̂_j / s_j and p = 2 P(T_ν > |t|). Satterthwaite: s_j² = (V_β)_jj and ν_j as in
    ``_satterthwaite.satterthwaite_t``; Kenward-Roger: s_j² = (Φ_A)_jj and ν_j from
    ``_kenward_roger.kr_ddf`` (lmerTest's ``summary(ddf=...)``).
    """
    method = _normalize(ddf)
    parts = _parts(fit, method)
    beta = np.asarray(fit.coef, dtype=float)
    p = beta.size
    se, df = np.empty(p), np.empty(p)
    for j, l in enumerate(np.eye(p)):
        if method == "satterthwaite":
            var, df[j] = satterthwaite_t(parts, l)
            se[j] = np.sqrt(var)
        else:
            se[j] = np.sqrt(parts.vcov_adjusted[j, j])
            df[j] = kr_ddf(parts, l)
    t = beta / se
    table = pd.DataFrame({"Coef.": beta, "Std. Error": se, "df": df, "t": t,
                          "Pr(>|t|)": 2.0 * stats.t.sf(np.abs(t), df)},
                         index=pd.Index([str(n) for n in fit.coef_names]), columns=_COLUMNS)
    dropped = [str(d) for d in fit.dropped_coefs]
    if dropped:
        table = pd.concat([table, pd.DataFrame(np.nan, index=pd.Index(dropped), columns=_COLUMNS)])
    return table


def contrast_test(fit, L, ddf="satterthwaite"):
    """The F test of L β = 0 (lmerTest's ``contestMD``).

    Parameters
    ----------
    fit : LinearMixedModelFit
    L : array_like, shape (m, p) or (p,)
        One row per contrast, one column per coefficient of ``fit.coef``.
    ddf : {"satterthwaite", "kenward-roger"}

    Returns
    -------
    dict
        ``F``, ``numdf``, ``dendf``, ``p``, and ``Sum Sq``, ``Mean Sq`` as lmerTest reports
        them (Mean Sq = σ̂² times the F statistic, unscaled for Kenward-Roger).
    """
    method = _normalize(ddf)
    parts = _parts(fit, method)
    L = np.atleast_2d(np.asarray(L, dtype=float))
    if L.shape[1] != len(fit.coef):
        raise ValueError(f"L has {L.shape[1]} columns; the model has {len(fit.coef)} coefficients")
    beta = np.asarray(fit.coef, dtype=float)
    if method == "satterthwaite":
        res = satterthwaite_f(parts, beta, L)
        ms = res["F"] * fit.sigma ** 2
    else:
        res = kr_f(parts, beta, L)
        ms = res.pop("F_unscaled") * fit.sigma ** 2
        res.pop("scaling")
    return {"Sum Sq": ms * res["numdf"], "Mean Sq": ms, **res}


# -- the hypotheses -------------------------------------------------------------------------
def _type1(X, terms):
    """Sequential hypotheses: for each column i, row i of D⁻¹R where X = QR (R upper,
    D its diagonal), the unit upper factor of the LDL' (Doolittle) decomposition of X'X
    that lmerTest uses."""
    R = np.linalg.qr(X, mode="r")
    U = R / np.diag(R)[:, None]
    return {t: U[list(t.columns)] for t in terms}


def _type2(X, intercept, terms):
    """lmerTest's "unfolded" type II: a term contained in no other is tested by its own
    columns; a contained term sequentially after every column but its own and those of
    the terms containing it."""
    out = {}
    p = X.shape[1]
    for t in terms:
        containing = [u for u in terms if _contains(t, u)]
        if not containing:
            out[t] = np.eye(p)[list(t.columns)]
            continue
        tail = list(t.columns) + [j for u in containing for j in u.columns]
        order = [j for j in range(p) if j not in tail] + tail
        R = np.linalg.qr(X[:, order], mode="r")
        U = R / np.diag(R)[:, None]
        rows = U[p - len(tail):p - len(tail) + len(t.columns)]
        back = np.empty_like(rows)
        back[:, order] = rows
        out[t] = back
    return out


def _zapsmall(x, digits=7):
    """Zero the entries below 10^-digits of the largest, the rounding noise of the least
    squares solutions. lmerTest's ``zapsmall`` rounds every entry to that many digits;
    we leave the others exact, which moves nothing beyond the 7th digit."""
    mx = np.max(np.abs(x), initial=0.0)
    return np.where(np.abs(x) < 10.0 ** -digits * mx, 0.0, x)


def _grid(fit, terms):
    """Rows holding every combination of the fixed part's factor levels, each with a few
    random draws of its numeric columns: enough for any model matrix of the fixed part to
    have full column rank (see :func:`_type3`).

    Returns
    -------
    frame : pandas.DataFrame
        The rows, draw by draw; the categorical columns as Categoricals in the fitted
        level order.
    codes : dict of str -> ndarray of int
        Each categorical column's level index per row.
    ndraw : int
    """
    specs = fit.model.design._fixed.specs
    cats = {c: list(v) for c, v in specs.items() if v is not None}
    nums = [c for c, v in specs.items() if v is None]
    for t in terms:
        unknown = t.categorical - set(cats)
        if unknown:
            raise NotImplementedError(
                f"type III hypotheses: the factor(s) {sorted(unknown)} of term {t.label()!r} "
                "are not plain categorical data columns; use type=1 or type=2")
    # a numeric part is a product of numeric factors: one draw per distinct part, and one
    # more, makes them linearly independent over the draws
    ndraw = len({t.numeric for t in terms} | {frozenset()}) + 1
    sizes = [len(v) for v in cats.values()]
    ncell = int(np.prod(sizes)) if cats else 1
    if ncell * ndraw * (len(fit.coef) + 1) > 5e7:
        raise ValueError(f"type III hypotheses: the {ncell} combinations of factor levels are "
                         "too many for the level grid; use type=1 or type=2")
    # cell index in mixed radix, draw-major rows
    cell = np.tile(np.arange(ncell), ndraw)
    codes = dict(zip(cats, np.unravel_index(cell, sizes))) if cats else {}
    frame = {c: pd.Categorical.from_codes(codes[c], categories=levels)
             for c, levels in cats.items()}
    draws = np.random.default_rng(20231108).uniform(0.5, 2.0, size=(ndraw, len(nums)))
    for i, c in enumerate(nums):
        frame[c] = np.repeat(draws[:, i], ncell)
    return pd.DataFrame(frame), codes, ndraw


def _overparametrized(Xt, terms, intercept, codes, ndraw):
    """rdX -- the intercept, then for each term every combination of its factors' levels
    times its numeric part -- and, for each treatment-coded column, its column in rdX."""
    n = Xt.shape[0]
    per_draw = n // ndraw
    blocks, own = [], {}
    if intercept is not None:
        blocks.append(np.ones((n, 1)))
        own[intercept] = 0
    width = len(blocks)
    for t in terms:
        sub = Xt[:, list(t.columns)].reshape(ndraw, per_draw, len(t.columns))
        # the numeric part, draw by draw: every non-zero treatment-coded entry equals it
        mono = np.empty(ndraw)
        for j, blk in enumerate(sub):
            mono[j] = blk.flat[np.argmax(np.abs(blk))]
            if not np.allclose(blk[blk != 0], mono[j], rtol=1e-12, atol=0):
                raise NotImplementedError(_NOT_INDICATORS.format(t.label()))
        cell = np.zeros(n, dtype=np.int64)
        ncomb = 1
        for f in t.factors:
            if f in t.categorical:
                size = int(codes[f].max()) + 1
                cell = cell * size + codes[f]
                ncomb *= size
        rd = np.zeros((n, ncomb))
        rd[np.arange(n), cell] = np.repeat(mono, per_draw)
        # which rdX column each treatment-coded column is: the one with its support
        for j in t.columns:
            match = np.flatnonzero(np.all((rd != 0) == (Xt[:, [j]] != 0), axis=0))
            if match.size != 1:
                raise NotImplementedError(_NOT_INDICATORS.format(t.label()))
            own[j] = width + int(match[0])
        blocks.append(rd)
        width += ncomb
    return np.hstack(blocks), own


def _type3(fit, intercept, terms):
    """lmerTest's type III hypotheses (``get_contrasts_type3``), for any coding.

    lmerTest works in treatment coding: with rdX the overparametrized design (the
    intercept, then every level combination of each term's factors times its numeric
    factors) and X the treatment-coded one, the rows of L₀ = (X⁺ rdX)' express each rdX
    column in X's coefficients; for each term contained in others (highest order
    first) its columns of L₀ are replaced by their residuals on the columns of the
    terms containing it; the rows of L₀ that are X's own columns (treatment coding makes
    each X column one rdX column) then give, column by column, the term's hypotheses.
    With another coding, X_orig = X M and the hypotheses map as L M.

    All of these are exact identities between columns, row by row, so they can be
    computed on any rows that give X full column rank. We use a grid of every level
    combination with random numeric values (:func:`_grid`) -- the fit keeps no data --
    and build X on it with the fit's own coding (``design.fixed_matrix``) and with
    treatment coding (the formula layer with default codings). With aliased columns
    lmerTest's least-squares projection depends on the data rows, so that case is refused.
    """
    design = fit.model.design
    if design.dropped:
        raise ValueError(
            f"type III hypotheses need a full-rank X; columns {list(design.dropped)} were "
            "dropped as aliased (empty cells?). Use type=1 or type=2")
    grid, codes, ndraw = _grid(fit, terms)
    X = np.asarray(design.fixed_matrix(grid), dtype=float)
    Xt = _treatment_matrix(fit, grid)
    if Xt.shape != X.shape:
        raise NotImplementedError("type III hypotheses: the treatment-coded model matrix does "
                                  "not have the fitted one's columns; use type=1 or type=2")
    rdX, own = _overparametrized(Xt, terms, intercept, codes, ndraw)
    L0 = _zapsmall(np.linalg.lstsq(Xt, rdX, rcond=None)[0].T)
    for t in sorted(terms, key=lambda u: len(u.factors), reverse=True):
        containing = [j for u in terms if _contains(t, u) for j in u.columns]
        if containing:
            x, y = L0[:, containing], L0[:, list(t.columns)]
            L0[:, list(t.columns)] = _zapsmall(y - x @ np.linalg.lstsq(x, y, rcond=None)[0])
    Lsq = L0[[own[j] for j in range(X.shape[1])]]
    M = None if np.array_equal(X, Xt) else np.linalg.lstsq(Xt, X, rcond=None)[0]
    out = {}
    for t in terms:
        Lt = Lsq[:, list(t.columns)].T
        Lt = Lt[np.sum(np.abs(Lt), axis=1) > 1e-8]
        out[t] = Lt if M is None else _zapsmall(Lt @ M)
    return out


def _treatment_matrix(fit, grid):
    """The fixed part's model matrix on ``grid`` with the default (treatment) codings."""
    design = fit.model.design
    from ..formula import build_design
    response = "ddf_grid_response_"
    frame = grid.assign(**{response: np.arange(len(grid), dtype=float)})
    return np.asarray(build_design(f"{response} ~ {design.parsed.fixed}", frame).X, dtype=float)


def _kind(type):
    kind = {1: 1, 2: 2, 3: 3, "1": 1, "2": 2, "3": 3, "I": 1, "II": 2, "III": 3}.get(type)
    if kind is None:
        raise ValueError(f"type must be 1, 2 or 3, not {type!r}")
    return kind


def hypotheses(fit, type=3, labels="lme4"):
    """The hypothesis matrices :func:`anova` tests, one per term (lmerTest's ``show_tests``).

    Parameters
    ----------
    fit : LinearMixedModelFit
    type : {1, 2, 3}
    labels : {"lme4", "mixedmodels"}

    Returns
    -------
    dict of str -> pandas.DataFrame
        For each term, L with one row per tested contrast and a column per coefficient.

    Notes
    -----
    Type I is sequential (each term adjusted for those before it), type II adjusts each
    term for every term not containing it, type III for everything (lmerTest's
    definitions, with its containment rule: a term is contained in another that has all
    its factors and more and the same numeric ones). With at most one term, or one
    column, types II and III are type I, as in lmerTest.
    """
    kind = _kind(type)
    if labels not in ("lme4", "mixedmodels"):
        raise ValueError(f"labels must be 'lme4' or 'mixedmodels', not {labels!r}")
    X = np.asarray(fit.X, dtype=float)
    intercept, terms = fixed_terms(fit.coef_names)
    if kind == 1 or X.shape[1] <= 1 or len(terms) <= 1:
        L = _type1(X, terms)
    elif kind == 2:
        L = _type2(X, intercept, terms)
    else:
        L = _type3(fit, intercept, terms)
    names = [str(n) for n in fit.coef_names]
    return {t.label(labels): pd.DataFrame(L[t], columns=names) for t in terms}


def anova(fit, type=3, ddf="satterthwaite", labels="lme4"):
    """F tests of the fixed-effects terms (lmerTest's ``anova``).

    Parameters
    ----------
    fit : LinearMixedModelFit
    type : {1, 2, 3}, default 3
        The hypotheses (see :func:`hypotheses`).
    ddf : {"satterthwaite", "kenward-roger"}
        Kenward-Roger needs a REML fit.
    labels : {"lme4", "mixedmodels"}
        Row labels ``time:diet`` (lme4, lmerTest) or ``time & diet`` (MixedModels.jl).

    Returns
    -------
    pandas.DataFrame
        One row per term (none for an intercept-only model); columns ``Sum Sq``,
        ``Mean Sq``, ``numdf``, ``dendf``, ``F``, ``p``. ``attrs["heading"]`` says which
        test it is.
    """
    method = _normalize(ddf)
    L = hypotheses(fit, type=type, labels=labels)
    rows = [contrast_test(fit, Lt.to_numpy(), ddf=method) for Lt in L.values()]
    table = pd.DataFrame(rows, index=pd.Index(list(L)), columns=_ANOVA_COLUMNS)
    table["numdf"] = table["numdf"].astype(int)
    roman = ("I", "II", "III")[_kind(type) - 1]
    table.attrs["heading"] = (f"Type {roman} Analysis of Variance Table with "
                              f"{_METHOD_NAMES[method]} method")
    return table

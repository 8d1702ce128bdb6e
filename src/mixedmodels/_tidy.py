"""Tidy tables of a fit's parameters: one row per parameter, as broom.mixed lays them out.

``fit.tidy(effects=..., conf_int=..., conf_level=..., conf_method=...)`` follows
broom.mixed's ``tidy.merMod`` (R's lme4 tidier), with its column names spelt as Python
identifiers (``std.error`` -> ``std_error``, ``p.value`` -> ``p_value``, ``conf.low`` ->
``conf_low``, ``conf.high`` -> ``conf_high``).

broom.mixed's rules, as followed here
------------------------------------
* ``effects`` is one or several of ``"fixed"``, ``"ran_pars"``, ``"ran_vals"``; the
  default is ``("fixed", "ran_pars")`` (broom.mixed's ``c("ran_pars", "fixed")``). The
  rows come in the order fixed, ran_pars, ran_vals whatever the order asked for, each
  labelled in the ``effect`` column.
* Columns: ``effect``, ``group``, ``level`` (only when ran_vals are asked for), ``term``,
  ``estimate``, ``std_error``, ``statistic``, ``p_value``, then ``conf_low`` and
  ``conf_high`` only with ``conf_int=True`` (broom.mixed adds them only then). Missing
  values are NaN; ``group`` of a fixed effect and ``level`` of a non-ran_vals row are None.
* fixed: one row per estimated coefficient (aliased, dropped columns have none), ``term``
  the coefficient name, ``estimate``, ``std_error``, ``statistic`` = estimate /
  std_error and its two-sided normal ``p_value``: the numbers of ``fit.coeftable()``
  (lme4's ``summary`` gives no p-value for an LMM; MixedModels.jl and this package give
  the z test). With ``ddf="satterthwaite"`` or ``"kenward-roger"`` (LMMs) they are those
  of ``fit.coeftable(ddf=...)`` -- a t test -- and a ``df`` column follows
  ``statistic``, as broom.mixed does for lmerTest fits.
* ran_pars: standard deviations and correlations (broom.mixed's default ``scales =
  "sdcor"``), per random-effects term in the model's term order, the entries of its
  covariance in the order of its lower triangle taken column by column (lme4's
  ``order = "lower.tri"``, the order of θ): for columns (Intercept), days that is
  ``sd__(Intercept)``, ``cor__(Intercept).days``, ``sd__days``. A correlation is named
  ``cor__<first column>.<second column>``, the earlier column first. The residual
  standard deviation (LMMs; √φ of a GLMM with a dispersion) is ``sd__Observation`` in
  group ``Residual``. ``std_error``, ``statistic`` and ``p_value`` are NaN (lme4 has
  none); the estimates are those of ``fit.varcorr``. An uncorrelated term ``(1 + x ||
  g)`` has no correlation rows (lme4 splits it into terms named ``g``, ``g.1``; here its
  rows keep the group name ``g``), nor do two terms on one grouping factor.
* ran_vals: the conditional modes ``fit.ranef()`` with their conditional standard
  deviations, the square roots of the diagonal of ``fit.condvar()`` (lme4's ``condsd``),
  as ``std_error``; per grouping factor, per column (``term``), every level (``level``)
  -- the order of lme4's ``as.data.frame(ranef(fit, condVar = TRUE))``.
* Intervals: ``conf_method="wald"`` (estimate ± z·std_error; NaN for ran_pars, as
  lme4's Wald ``confint``), ``"profile"`` or ``"bootstrap"`` (``fit.confint``; extra
  keyword arguments go to it: ``n``, ``seed`` for the bootstrap). The conditional modes
  have Wald intervals only (broom.mixed refuses the others too).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm

__all__ = ["tidy", "ran_pars_names"]

_EFFECTS = ("fixed", "ran_pars", "ran_vals")
_METHODS = ("wald", "profile", "bootstrap")


def ran_pars_names(fit):
    """broom.mixed's ``term`` and ``group`` of each variance parameter, in lme4's
    ``confint`` order (θ's order, then σ), with lme4's ``confint`` name beside it.

    Returns
    -------
    list of (group, term, lme4_name)
    """
    out = []
    model = fit.model
    for t, e, a in model.layout.entries:
        term = model.reterms[t]
        cn, g = list(term.cnames), str(term.group_name)
        if e == a:
            out.append((g, f"sd__{cn[e]}", f"sd_{cn[e]}|{g}"))
        else:
            out.append((g, f"cor__{cn[a]}.{cn[e]}", f"cor_{cn[e]}.{cn[a]}|{g}"))
    if fit.sigma is not None:
        out.append(("Residual", "sd__Observation", "sigma"))
    return out


def _ran_pars_estimates(fit):
    """sd and correlation of each θ entry from VarCorr's covariances, then σ."""
    model = fit.model
    terms = fit.varcorr.terms
    est = []
    for t, e, a in model.layout.entries:
        vt = terms[t]
        est.append(vt.stddevs[e] if e == a else vt.correlation[e, a])
    if fit.sigma is not None:
        est.append(float(fit.sigma))
    return np.asarray(est, dtype=float)


def _effects(effects):
    if isinstance(effects, str):
        effects = [effects]
    effects = list(effects)
    bad = [e for e in effects if e not in _EFFECTS]
    if bad or not effects:
        raise ValueError(f"effects must be one or more of {list(_EFFECTS)}; got {bad or effects}")
    return [e for e in _EFFECTS if e in effects]


def tidy(fit, effects=("fixed", "ran_pars"), conf_int=False, conf_level=0.95,
         conf_method="wald", ddf=None, **confint_kwargs):
    """The parameters of a fit as a tidy table (broom.mixed's ``tidy``).

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
    effects : str or sequence of str, default ("fixed", "ran_pars")
        ``"fixed"`` (the coefficients), ``"ran_pars"`` (standard deviations and
        correlations of the random effects, and the residual standard deviation),
        ``"ran_vals"`` (the conditional modes per level).
    conf_int : bool, default False
        Add ``conf_low`` and ``conf_high``.
    conf_level : float, default 0.95
    conf_method : {"wald", "profile", "bootstrap"}
        How the intervals of fixed effects and ran_pars are computed (``fit.confint``);
        ran_vals take only "wald".
    ddf : {None, "satterthwaite", "kenward-roger"}
        LMMs: the fixed effects' t tests of ``fit.coeftable(ddf=...)``, with a ``df``
        column (broom.mixed's layout for lmerTest fits).
    **confint_kwargs
        Passed to ``fit.confint`` (``n``, ``seed``, ``n_jobs`` for the bootstrap).

    Returns
    -------
    pandas.DataFrame
        One row per parameter; the columns and their order are described in the module
        docstring (broom.mixed's, with ``_`` for ``.``).

    Notes
    -----
    Wald intervals are estimate ± Φ⁻¹((1 + conf_level)/2)·std_error for the fixed
    effects (with ``ddf``, the standard errors are those of the t test, the quantile
    still the normal one, as lme4's ``confint(method = "Wald")``) and for the
    conditional modes.
    """
    chosen = _effects(effects)
    method = str(conf_method).lower()
    if method == "boot":
        method = "bootstrap"
    if conf_int:
        if method not in _METHODS:
            raise ValueError(f"conf_method must be one of {list(_METHODS)}, not {conf_method!r}")
        if not 0.0 < conf_level < 1.0:
            raise ValueError(f"conf_level must be between 0 and 1, not {conf_level}")
        if "ran_vals" in chosen and method != "wald":
            raise ValueError("the conditional modes (ran_vals) have Wald intervals only "
                             "(as in broom.mixed); ask for them separately with "
                             "conf_method='wald'")
    z = float(norm.ppf(0.5 + conf_level / 2.0))

    intervals = None
    if conf_int and method != "wald" and ({"fixed", "ran_pars"} & set(chosen)):
        which = ("beta_" if "ran_pars" not in chosen else
                 "theta_" if "fixed" not in chosen else None)
        kwargs = dict(confint_kwargs)
        if method == "profile" and which is not None:
            kwargs.setdefault("which", which)
        intervals = fit.confint(method=method, level=conf_level, **kwargs)

    frames = []
    if "fixed" in chosen:
        frames.append(_fixed(fit, conf_int, z, intervals, ddf))
    if "ran_pars" in chosen:
        frames.append(_ran_pars(fit, conf_int, intervals))
    if "ran_vals" in chosen:
        frames.append(_ran_vals(fit, conf_int, z))
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    columns = ["effect", "group"]
    if "ran_vals" in chosen:
        columns.append("level")
    columns += ["term", "estimate", "std_error", "statistic"]
    if ddf is not None and "fixed" in chosen:
        columns.append("df")
    columns.append("p_value")
    if conf_int:
        columns += ["conf_low", "conf_high"]
    for c in columns:
        if c not in out:
            out[c] = None if c in ("group", "level") else np.nan
    out = out[columns]
    out = out.astype({c: object for c in ("effect", "group", "level", "term") if c in out})
    for c in ("group", "level"):
        if c in out:
            out[c] = out[c].where(out[c].notna(), None)
    return out.reset_index(drop=True)


def _fixed(fit, conf_int, z, intervals, ddf):
    if ddf is None:
        table = fit.coeftable()
        stat_col, p_col = "z", "Pr(>|z|)"
    else:
        if fit.is_glmm:
            raise ValueError("ddf applies to linear mixed models")
        table = fit.coeftable(ddf=ddf)
        stat_col, p_col = "t", "Pr(>|t|)"
    table = table.loc[[n for n in fit.coef_names]]       # estimated coefficients only
    frame = pd.DataFrame({
        "effect": "fixed",
        "group": None,
        "term": list(table.index),
        "estimate": table["Coef."].to_numpy(dtype=float),
        "std_error": table["Std. Error"].to_numpy(dtype=float),
        "statistic": table[stat_col].to_numpy(dtype=float),
        "p_value": table[p_col].to_numpy(dtype=float),
    })
    if ddf is not None:
        frame["df"] = table["df"].to_numpy(dtype=float)
    if conf_int:
        if intervals is None:
            frame["conf_low"] = frame["estimate"] - z * frame["std_error"]
            frame["conf_high"] = frame["estimate"] + z * frame["std_error"]
        else:
            ci = intervals.reindex(list(table.index))
            frame["conf_low"] = ci["lower"].to_numpy(dtype=float)
            frame["conf_high"] = ci["upper"].to_numpy(dtype=float)
    return frame


def _ran_pars(fit, conf_int, intervals):
    names = ran_pars_names(fit)
    n = len(names)
    frame = pd.DataFrame({
        "effect": ["ran_pars"] * n,
        "group": [g for g, _, _ in names],
        "term": [t for _, t, _ in names],
        "estimate": _ran_pars_estimates(fit),
        "std_error": np.full(n, np.nan),
        "statistic": np.full(n, np.nan),
        "p_value": np.full(n, np.nan),
    })
    if conf_int:
        if intervals is None:          # Wald: none for variance parameters (lme4's NA)
            frame["conf_low"] = np.nan
            frame["conf_high"] = np.nan
        else:
            ci = intervals.reindex([lme4 for _, _, lme4 in names])
            frame["conf_low"] = ci["lower"].to_numpy(dtype=float)
            frame["conf_high"] = ci["upper"].to_numpy(dtype=float)
    return frame


def _ran_vals(fit, conf_int, z):
    cv = fit.condvar()
    blocks = fit._b_blocks()
    rows = []
    seen = {}
    for term, b in zip(fit.model.reterms, blocks):
        g = str(term.group_name)
        key = g + "'" * seen.get(g, 0)
        seen[g] = seen.get(g, 0) + 1
        se = np.sqrt(np.maximum(np.diagonal(cv[key], axis1=1, axis2=2), 0.0))
        levels = [str(lv) for lv in term.levels]
        for j, col in enumerate(term.cnames):
            for i, lv in enumerate(levels):
                rows.append((g, lv, str(col), float(b[i, j]), float(se[i, j])))
    frame = pd.DataFrame(rows, columns=["group", "level", "term", "estimate", "std_error"])
    frame.insert(0, "effect", "ran_vals")
    frame["statistic"] = np.nan
    frame["p_value"] = np.nan
    if conf_int:
        frame["conf_low"] = frame["estimate"] - z * frame["std_error"]
        frame["conf_high"] = frame["estimate"] + z * frame["std_error"]
    return frame

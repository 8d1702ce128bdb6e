"""Plots of fitted mixed models, with matplotlib (an optional extra:
``pip install "mixedmodels[plot]"``).

Each function takes a fit (``profile`` also takes a :class:`Profile`) and returns a
matplotlib ``Figure``. Given ``ax=`` (one Axes, or a sequence of Axes for plots with
several panels: as many as the plot draws), it draws there and returns their figure;
otherwise it makes a new figure. New figures are not registered with pyplot: nothing is
shown twice in a notebook (the returned figure displays as a cell's value) and nothing
accumulates in pyplot's figure list; save one with ``fig.savefig(path)``, or draw into
``plt.subplots()`` axes with ``ax=`` to show it in a pyplot window.

=================  ===========================================================================
``caterpillar``    conditional modes of one grouping factor's random effects with prediction
                   intervals from their conditional variances, one panel per column
``qqcaterpillar``  the same modes against standard normal quantiles
``shrinkage``      per-level coefficients without the random-effects penalty (θ very large)
                   and with it (the fit), an arrow from one to the other
``profile``        ζ against each profiled parameter, the interval's ends marked
``diagnostics``    residuals against fitted values, their normal QQ plot, scale-location
=================  ===========================================================================

The drawn artists carry labels (``"mode"``, ``"interval"``, ``"zeta"``...) so that a test
or a user can find them again (``[l for l in ax.lines if l.get_label() == "mode"]``).

Notes
-----
Prediction intervals of the conditional modes: b̂ ± Φ⁻¹((1 + level)/2) √diag Var(b | y),
Var(b | y) from ``fit.condvar()`` (lme4's ``condVar``; MixedModels.jl's ``condVar``). For a
GLMM that is the covariance of the Laplace approximation at the modes.

Normal quantiles of a QQ plot are those of R's ``ppoints``: Φ⁻¹((i - a) / (n + 1 - 2a)),
i = 1..n, with a = 3/8 for n ≤ 10 and 1/2 above (lattice's ``qqmath``).

Shrinkage: the "without penalty" estimates are the conditional modes at θ with every
relative covariance factor Λ set to 10⁴·I (MixedModels.jl's ``shrinkageplot`` reference),
where the penalty ‖u‖² no longer restrains b = Λu: for an LMM, β and b re-estimated at that
θ (per-level least squares, in the limit); for a GLMM, the modes by PIRLS with β held at
the estimate (per-level maximum likelihood with Xβ̂ as an offset). A level whose data do
not determine its coefficients (a Bernoulli district where every answer is the same) has
no finite unpenalized estimate; at 10⁴ it lands far out, and the plot's limits are set from
the levels that stay near the rest (see ``_robust_limits``), with those beyond drawn at
the edge as open triangles. Plotted are the per-level coefficients: the fixed effect of
the same name (if any) plus the random effect, with the population estimate marked ``+``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

try:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
except ImportError as exc:          # pragma: no cover - exercised with matplotlib hidden
    raise ImportError(
        "mixedmodels.plots needs matplotlib, an optional dependency of mixedmodels: "
        "install it with  pip install \"mixedmodels[plot]\"  (or pip install matplotlib)"
    ) from exc

__all__ = ["caterpillar", "qqcaterpillar", "shrinkage", "profile", "diagnostics"]

_POINT = "C0"
_REFERENCE = "0.55"
_THETA_REF = 1.0e4


# ------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------
def _axes(n, ax, *, ncols=None, panel_size=(3.2, 3.0), figsize=None, sharey=False):
    """(figure, list of n Axes, made_here): the caller's axes, or a new figure."""
    if ax is not None:
        axes = [ax] if isinstance(ax, Axes) else list(np.ravel(ax))
        if len(axes) != n:
            raise ValueError(f"this plot draws {n} panel(s); ax= holds {len(axes)} Axes")
        return axes[0].figure, axes, False
    ncols = ncols or n
    nrows = math.ceil(n / ncols)
    if figsize is None:
        # at least 5 inches wide: room for the title over a single panel
        figsize = (max(5.0, panel_size[0] * ncols + 0.6), panel_size[1] * nrows + 0.6)
    fig = Figure(figsize=figsize, layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    axes = list(grid.ravel())
    for extra in axes[n:]:
        fig.delaxes(extra)
    return fig, axes[:n], True


def _group_name(fit, group):
    names = list(dict.fromkeys(str(g) for g in fit.reterm_names))
    if group is None:
        return names[0]
    if str(group) not in names:
        raise ValueError(f"no grouping factor {group!r}; the model has {names}")
    return str(group)


def _ranef_info(fit, group):
    """(group, levels, column names, modes (L, k), conditional sds (L, k))."""
    group = _group_name(fit, group)
    frame = fit.ranef()[group]
    cv = fit.condvar()
    sds, seen = [], 0
    for term in fit.model.reterms:
        if str(term.group_name) == group:
            block = cv[group + "'" * seen]
            seen += 1
            sds.append(np.sqrt(np.maximum(np.diagonal(block, axis1=1, axis2=2), 0.0)))
    return (group, [str(v) for v in frame.index], [str(c) for c in frame.columns],
            frame.to_numpy(dtype=float), np.hstack(sds))


def _ppoints(n):
    """R's ``ppoints``: the probabilities a normal QQ plot of n points is drawn at."""
    a = 3.0 / 8.0 if n <= 10 else 0.5
    return (np.arange(1, n + 1) - a) / (n + 1 - 2 * a)


def _level_labels(ax, y, labels):
    """Level names as y tick labels, smaller for many levels, none beyond 120."""
    n = len(labels)
    if n > 120:
        ax.set_yticks([])
        return
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=max(4.0, min(9.0, 360.0 / max(n, 1))))


def _order(modes, cnames, order):
    if order is True:
        key = 0
    elif order is False or order is None:
        return np.arange(modes.shape[0])
    elif isinstance(order, str):
        if order not in cnames:
            raise ValueError(f"order={order!r} is not a column; the columns are {cnames}")
        key = cnames.index(order)
    else:
        key = int(order)
    return np.argsort(modes[:, key], kind="stable")


# ------------------------------------------------------------------------------------
# caterpillar plots
# ------------------------------------------------------------------------------------
def caterpillar(fit, group=None, level=0.95, order=True, ax=None):
    """Conditional modes of one grouping factor's random effects with prediction intervals.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
    group : str, optional
        The grouping factor (default: the model's first, the one with most levels).
    level : float, default 0.95
        Coverage of the intervals, b̂ ± Φ⁻¹((1 + level)/2) × conditional sd.
    order : bool, int or str, default True
        Sort the levels by the first column's mode (True), by another column (its index
        or name), or keep ``ranef()``'s order (False). One order for all panels.
    ax : Axes or sequence of Axes, optional
        One per random-effects column of the group.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per column: a point per level (label ``"mode"``) and a horizontal
        segment from the lower to the upper end of its interval (label ``"interval"``),
        the levels from bottom to top in the chosen order.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, not {level}")
    group, levels, cnames, modes, sds = _ranef_info(fit, group)
    idx = _order(modes, cnames, order)
    z = float(norm.ppf(0.5 + level / 2.0))
    nl, k = modes.shape
    height = min(12.0, max(3.0, 0.16 * nl + 1.0))        # a line per level, within reason
    fig, axes, made = _axes(k, ax, panel_size=(3.2, height), sharey=True)
    y = np.arange(nl, dtype=float)
    for j, a in enumerate(axes):
        m, s = modes[idx, j], sds[idx, j]
        a.axvline(0.0, color=_REFERENCE, lw=0.8, ls=":", zorder=0)
        a.hlines(y, m - z * s, m + z * s, color=_POINT, lw=1.2, alpha=0.8, label="interval")
        a.plot(m, y, "o", color=_POINT, ms=3.5, label="mode")
        a.set_title(cnames[j])
        a.set_ylim(-0.7, nl - 0.3)
        if j == 0 or not made:
            _level_labels(a, y, [levels[i] for i in idx])
        a.grid(axis="x", alpha=0.3)
    axes[0].set_ylabel(group)
    if made:
        fig.suptitle(f"Conditional modes of the random effects by {group}, "
                     f"{100 * level:g}% prediction intervals", fontsize=10)
    return fig


def qqcaterpillar(fit, group=None, level=0.95, ax=None):
    """Conditional modes against standard normal quantiles, with prediction intervals.

    Each column's modes are sorted on their own and plotted (x) against the normal
    quantiles at R's ``ppoints`` (y); a straight band means normal-looking random effects.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
    group : str, optional
        The grouping factor (default: the model's first).
    level : float, default 0.95
    ax : Axes or sequence of Axes, optional
        One per random-effects column.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per column: points (label ``"mode"``) and intervals (``"interval"``).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, not {level}")
    group, levels, cnames, modes, sds = _ranef_info(fit, group)
    z = float(norm.ppf(0.5 + level / 2.0))
    nl, k = modes.shape
    q = norm.ppf(_ppoints(nl))
    fig, axes, made = _axes(k, ax, sharey=True)
    for j, a in enumerate(axes):
        idx = np.argsort(modes[:, j], kind="stable")
        m, s = modes[idx, j], sds[idx, j]
        a.axvline(0.0, color=_REFERENCE, lw=0.8, ls=":", zorder=0)
        a.hlines(q, m - z * s, m + z * s, color=_POINT, lw=1.0, alpha=0.6, label="interval")
        a.plot(m, q, "o", color=_POINT, ms=3.5, label="mode")
        a.set_title(cnames[j])
        a.set_xlabel("conditional mode")
        a.grid(alpha=0.3)
    axes[0].set_ylabel("standard normal quantile")
    if made:
        fig.suptitle(f"Normal QQ plot of the conditional modes by {group}", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------
# shrinkage
# ------------------------------------------------------------------------------------
def _reference_theta(fit):
    """θ with every relative covariance factor Λ = 10⁴·I."""
    theta = np.zeros(len(fit.theta))
    for i, (_, e, a) in enumerate(fit.model.layout.entries):
        if e == a:
            theta[i] = _THETA_REF
    return theta


def _unpenalized_b(fit, theta):
    """(b, β) at θ: for an LMM both re-estimated; for a GLMM β held at the fit's, b the
    PIRLS modes. The specification's state is left as the fit left it."""
    model = fit.model
    if not fit.is_glmm:
        try:
            opt = model._optimum(theta)
        finally:
            model._evaluate(np.asarray(fit.theta, dtype=float))
        return np.asarray(opt["b"]), np.asarray(opt["coef"])
    phi = 1.0 if fit.dispersion is None else float(fit.dispersion)
    model._u = None
    try:
        _, u, _ = model._value(theta, np.asarray(fit.beta_w, dtype=float), phi, nAGQ=1,
                               family=fit.family)
        b = model.workspace.lambda_times(theta, u)
    finally:
        model._u = None
    return np.asarray(b), np.asarray(fit.coef)


def _level_coefficients(fit, group, b, beta):
    """Per-level coefficients of ``group``'s columns from b (u's order) and β."""
    names = list(fit.coef_names)
    cols, blocks, o = [], [], 0
    for term in fit.model.reterms:
        k, nl = term.ncols, term.nlevels
        if str(term.group_name) == group:
            blk = np.array(b[o:o + k * nl]).reshape(nl, k)
            for j, c in enumerate(term.cnames):
                if str(c) in names:
                    blk[:, j] += beta[names.index(str(c))]
            blocks.append(blk)
            cols += [str(c) for c in term.cnames]
        o += k * nl
    return cols, np.hstack(blocks)


def shrinkage_estimates(fit, group=None):
    """The numbers :func:`shrinkage` draws.

    Returns
    -------
    dict
        ``group``, ``levels``, ``columns``; ``penalized`` and ``unpenalized``: arrays
        (levels, k) of per-level coefficients (fixed effect of the same name, if any,
        plus the random effect) at the fit and at the reference θ (Λ = 10⁴·I);
        ``population``: the fixed effects of those columns (0 where there is none).
    """
    group = _group_name(fit, group)
    theta_ref = _reference_theta(fit)
    b_ref, beta_ref = _unpenalized_b(fit, theta_ref)
    cols, unpen = _level_coefficients(fit, group, b_ref, beta_ref)
    _, pen = _level_coefficients(fit, group, np.asarray(fit.b), np.asarray(fit.coef))
    names = list(fit.coef_names)
    pop = np.array([fit.coef[names.index(c)] if c in names else 0.0 for c in cols])
    term = next(t for t in fit.model.reterms if str(t.group_name) == group)
    return dict(group=group, levels=[str(v) for v in term.levels], columns=cols,
                penalized=pen, unpenalized=unpen, population=pop)


def _robust_limits(values, anchor):
    """Axis limits holding the penalized estimates and every unpenalized one not far
    beyond them: an unpenalized estimate more than three times the penalized spread away
    from the population value (a level its data cannot pin down) is left out."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    lo, hi = float(np.min(anchor)), float(np.max(anchor))
    spread = max(hi - lo, 1e-12)
    keep = v[(v > lo - 3.0 * spread) & (v < hi + 3.0 * spread)]
    lo, hi = min(lo, float(np.min(keep, initial=lo))), max(hi, float(np.max(keep, initial=hi)))
    pad = 0.06 * (hi - lo)
    return lo - pad, hi + pad


def shrinkage(fit, group=None, ax=None):
    """Per-level coefficients without and with the random-effects penalty.

    For a vector-valued random effect, one panel per pair of columns (a lower-triangular
    grid): an open circle per level at its unpenalized estimate (label
    ``"unpenalized"``), a filled one at the fit's (``"penalized"``), an arrow between
    them (a ``Quiver``) and ``+`` at the population estimate. For a scalar random effect,
    one panel with the levels on the y axis, sorted by their unpenalized estimates.
    See the module notes for how the unpenalized estimates are made.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
    group : str, optional
        The grouping factor (default: the model's first).
    ax : Axes or sequence of Axes, optional
        k(k-1)/2 of them for k columns (1 for a scalar random effect), in the order
        (column 0, column 1), (0, 2), (1, 2), ... when given.

    Returns
    -------
    matplotlib.figure.Figure
    """
    est = shrinkage_estimates(fit, group)
    cols, pen, unpen, pop = est["columns"], est["penalized"], est["unpenalized"], est["population"]
    k = len(cols)
    if k == 1:
        height = min(12.0, max(3.0, 0.16 * len(pen) + 1.0))
        fig, axes, made = _axes(1, ax, panel_size=(5.0, height))
        a = axes[0]
        idx = np.argsort(unpen[:, 0], kind="stable")
        y = np.arange(len(idx), dtype=float)
        x0, x1 = unpen[idx, 0], pen[idx, 0]
        a.axvline(pop[0], color=_REFERENCE, lw=0.8, ls=":", zorder=0, label="population")
        a.quiver(x0, y, x1 - x0, np.zeros_like(y), angles="xy", scale_units="xy", scale=1,
                 color=_POINT, alpha=0.6, width=0.003, label="shrinkage")
        a.plot(x0, y, "o", mfc="none", color=_POINT, ms=4, label="unpenalized")
        a.plot(x1, y, "o", color=_POINT, ms=3.5, label="penalized")
        lo, hi = _robust_limits(np.concatenate([x0, x1]), x1)
        _mark_outside(a, x0, y, (lo, hi))
        a.set_xlim(lo, hi)
        _level_labels(a, y, [est["levels"][i] for i in idx])
        a.set_ylabel(est["group"])
        a.set_xlabel(cols[0])
        a.legend(handles=[h for h in a.lines if h.get_label() in ("unpenalized", "penalized")],
                 fontsize=8, loc="lower right")
    else:
        pairs = [(i, j) for j in range(1, k) for i in range(j)]
        if ax is not None:
            fig, axes, made = _axes(len(pairs), ax)
            panel = dict(zip(pairs, axes))
        else:
            fig = Figure(figsize=(3.6 * (k - 1) + 0.6, 3.4 * (k - 1) + 0.6), layout="constrained")
            grid = fig.subplots(k - 1, k - 1, squeeze=False)
            panel = {}
            for r in range(k - 1):
                for c in range(k - 1):
                    if c <= r:
                        panel[(c, r + 1)] = grid[r, c]
                    else:
                        fig.delaxes(grid[r, c])
            made = True
        for (i, j), a in panel.items():
            x0, y0, x1, y1 = unpen[:, i], unpen[:, j], pen[:, i], pen[:, j]
            a.quiver(x0, y0, x1 - x0, y1 - y0, angles="xy", scale_units="xy", scale=1,
                     color=_POINT, alpha=0.5, width=0.004, label="shrinkage")
            a.plot(x0, y0, "o", mfc="none", color=_POINT, ms=4, label="unpenalized")
            a.plot(x1, y1, "o", color=_POINT, ms=3.5, label="penalized")
            a.plot([pop[i]], [pop[j]], "+", color="C3", ms=12, mew=2, label="population")
            xlo, xhi = _robust_limits(np.concatenate([x0, x1]), x1)
            ylo, yhi = _robust_limits(np.concatenate([y0, y1]), y1)
            _mark_outside(a, x0, y0, (xlo, xhi), (ylo, yhi))
            a.set_xlim(xlo, xhi)
            a.set_ylim(ylo, yhi)
            a.set_xlabel(cols[i])
            a.set_ylabel(cols[j])
            a.grid(alpha=0.3)
        first = panel[pairs[0]]
        first.legend(handles=[h for h in first.lines
                              if h.get_label() in ("unpenalized", "penalized", "population")],
                     fontsize=8)
    if made:
        fig.suptitle(f"Shrinkage of the per-{est['group']} coefficients", fontsize=10)
    return fig


def _mark_outside(a, x, y, xlim, ylim=None):
    """Points beyond the limits (unpenalized estimates a level's data cannot pin down)
    drawn at the edge as open red triangles (label ``"beyond"``)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out = (x < xlim[0]) | (x > xlim[1])
    if ylim is not None:
        out |= (y < ylim[0]) | (y > ylim[1])
    if out.any():
        xs = np.clip(x[out], *xlim)
        ys = y[out] if ylim is None else np.clip(y[out], *ylim)
        style = dict(ls="none", mfc="none", color="C3", ms=6, label="beyond")
        if ylim is None:        # one axis: a triangle pointing off the side it lies beyond
            for side, m in ((xs <= xlim[0], "<"), (xs >= xlim[1], ">")):
                if side.any():
                    a.plot(xs[side], ys[side], marker=m, **style)
        else:
            a.plot(xs, ys, marker="^", **style)


# ------------------------------------------------------------------------------------
# likelihood profiles
# ------------------------------------------------------------------------------------
def profile(fit_or_profile, which=None, level=0.95, ax=None):
    """ζ against each profiled parameter, with the interval's ends marked.

    Parameters
    ----------
    fit_or_profile : a fit, or a :class:`~mixedmodels.inference.profile.Profile`
        A fit is profiled first (``fit.profile(which=which, level=level)``).
    which : str or list of str, optional
        The parameters: given a fit, those to profile (``fit.profile``'s ``which``);
        given a profile, those of its parameters to draw (default: all).
    level : float, default 0.95
        The interval marked: where ζ = ∓Φ⁻¹((1 + level)/2) (``Profile.confint``).
    ax : Axes or sequence of Axes, optional
        One per profiled parameter.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per parameter: ζ at the profile's points (line, label ``"zeta"``),
        the estimate at ζ = 0 (``"estimate"``), horizontal lines at ±Φ⁻¹((1 + level)/2)
        and vertical ones at the interval's ends (``"interval"``).
    """
    from .inference.profile import Profile

    if isinstance(fit_or_profile, Profile):
        pr = fit_or_profile
        names = list(pr.names)
        if which is not None:
            wanted = [which] if isinstance(which, str) else list(which)
            missing = [w for w in wanted if w not in names]
            if missing:
                raise ValueError(f"{missing} not profiled; the profile holds {names}")
            names = [n for n in names if n in wanted]
    else:
        pr = fit_or_profile.profile(which=which, level=level)
        names = list(pr.names)
    ci = pr.confint(level)
    z = float(norm.ppf(0.5 + level / 2.0))
    fig, axes, made = _axes(len(names), ax, ncols=min(3, len(names)), panel_size=(3.4, 2.9))
    for name, a in zip(names, axes):
        tab = pr.table(name)
        x, zeta = tab[name].to_numpy(float), tab["zeta"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(zeta)
        a.axhline(0.0, color=_REFERENCE, lw=0.6, zorder=0)
        for s in (-z, z):
            a.axhline(s, color=_REFERENCE, lw=0.8, ls="--", zorder=0)
        a.plot(x[ok], zeta[ok], "-", color=_POINT, lw=1.5, marker=".", ms=4, label="zeta")
        est = float(pr.estimates[name])
        if np.isfinite(est):
            a.plot([est], [0.0], "o", color="C3", ms=4, label="estimate")
        lo, hi = (float(v) for v in ci.loc[name, ["lower", "upper"]])
        bottom = min(float(np.min(zeta[ok], initial=0.0)), -z) - 0.25
        top = max(float(np.max(zeta[ok], initial=0.0)), z) + 0.25
        # each end of the interval: a segment from where ζ crosses ∓z down to the axis
        ends = [(v, s) for v, s in ((lo, -z), (hi, z)) if np.isfinite(v)]
        if ends:
            a.vlines([v for v, _ in ends], bottom, [s for _, s in ends], colors="C3", lw=1.0,
                     ls="-", label="interval")
        a.set_ylim(bottom, top)
        a.set_xlabel(name)
        a.locator_params(axis="x", nbins=5)
        a.set_title(f"[{_short(lo)}, {_short(hi)}]", fontsize=9)
        a.grid(alpha=0.3)
    for i, a in enumerate(axes):
        if not made or i % min(3, len(names)) == 0:
            a.set_ylabel("ζ")
    if made:
        refit = " (the ML refit of a REML fit)" if pr.ml_refit else ""
        fig.suptitle(f"Likelihood profiles{refit}: ζ, {100 * level:g}% intervals", fontsize=10)
    return fig


def _short(v):
    return "NaN" if np.isnan(v) else f"{v:.4g}"


# ------------------------------------------------------------------------------------
# residual diagnostics
# ------------------------------------------------------------------------------------
def diagnostics(fit, kind=None, ax=None):
    """Residuals against fitted values, their normal QQ plot, and scale-location.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
    kind : {"pearson", "deviance", "response", "working"}, optional
        The residuals (``fit.residuals(kind)``); default "pearson" for an LMM
        ((y - μ)√w / σ) and "deviance" for a GLMM.
    ax : sequence of 3 Axes, optional

    Returns
    -------
    matplotlib.figure.Figure
        Panel 1: residuals (y) against ``fit.fitted()`` (x), label ``"residuals"``;
        panel 2: sorted residuals against normal quantiles at R's ``ppoints`` (label
        ``"qq"``) with the line through the quartiles (``"qqline"``); panel 3: √|residual|
        against the fitted values (``"scale"``).
    """
    if kind is None:
        kind = "deviance" if fit.is_glmm else "pearson"
    r = np.asarray(fit.residuals(kind), dtype=float)
    mu = np.asarray(fit.fitted(), dtype=float)
    n = len(r)
    fig, axes, made = _axes(3, ax, panel_size=(3.5, 3.2))
    small = dict(ms=2.5 if n > 2000 else 3.5, alpha=0.35 if n > 2000 else 0.6, color=_POINT)
    label = f"{kind} residual"

    a = axes[0]
    a.axhline(0.0, color=_REFERENCE, lw=0.8, zorder=0)
    a.plot(mu, r, "o", ls="none", mew=0, label="residuals", **small)
    a.set_xlabel("fitted")
    a.set_ylabel(label)
    a.set_title("Residuals vs fitted", fontsize=10)

    a = axes[1]
    q = norm.ppf(_ppoints(n))
    rs = np.sort(r)
    a.plot(q, rs, "o", ls="none", mew=0, label="qq", **small)
    q1, q3 = np.quantile(r, [0.25, 0.75])
    n1, n3 = norm.ppf([0.25, 0.75])
    slope = (q3 - q1) / (n3 - n1)
    a.plot(q[[0, -1]], q1 + slope * (q[[0, -1]] - n1), "-", color="C3", lw=1.0, label="qqline")
    a.set_xlabel("standard normal quantile")
    a.set_ylabel(label)
    a.set_title("Normal QQ", fontsize=10)

    a = axes[2]
    a.plot(mu, np.sqrt(np.abs(r)), "o", ls="none", mew=0, label="scale", **small)
    a.set_xlabel("fitted")
    a.set_ylabel(f"√|{label}|")
    a.set_title("Scale-location", fontsize=10)
    for a in axes:
        a.grid(alpha=0.3)
    if made:
        fig.suptitle(f"Residual diagnostics: {fit.formula}", fontsize=9)
    return fig

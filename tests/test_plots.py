"""mixedmodels.plots: what each plot draws, checked against the model; residual kinds.

Every figure is rendered with the Agg backend (to PNG bytes), and its artists are read
back: the points and interval ends a caterpillar plot draws are the fit's conditional
modes and their prediction intervals, in sorted order; a shrinkage plot's unpenalized
points are per-level least-squares (LMM) or maximum-likelihood (GLMM) fits computed here
independently; a profile plot draws the profile's own table and interval.
"""
import importlib
import io
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

import matplotlib  # noqa: E402  (the test extra installs it: a missing install must fail)
matplotlib.use("Agg")

import mixedmodels as mm  # noqa: E402
from mixedmodels import plots  # noqa: E402


# -- models (public data; each fitted once) -----------------------------------------------
@pytest.fixture(scope="module")
def sleep():
    return mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))


def render(fig):
    """Draw the figure with Agg (to PNG bytes) and return them."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=30)
    data = buf.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    return data


def lines(ax, label):
    return [ln for ln in ax.lines if ln.get_label() == label]


def collection(ax, label):
    found = [c for c in ax.collections if c.get_label() == label]
    assert len(found) == 1, [c.get_label() for c in ax.collections]
    return found[0]


def z95():
    return norm.ppf(0.975)


# -- caterpillar ------------------------------------------------------------------------------
def test_caterpillar_draws_modes_and_intervals_in_sorted_order(sleep):
    fig = plots.caterpillar(sleep)
    render(fig)
    re = sleep.ranef()["subj"]
    sd = np.sqrt(np.diagonal(sleep.condvar()["subj"], axis1=1, axis2=2))
    order = np.argsort(re["(Intercept)"].to_numpy())          # sorted by the first column
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["(Intercept)", "days"]
    for j, a in enumerate(axes):
        (mode,) = lines(a, "mode")
        x = np.asarray(mode.get_xdata(), float)
        np.testing.assert_allclose(x, re.iloc[order, j].to_numpy(), rtol=1e-12)
        np.testing.assert_array_equal(mode.get_ydata(), np.arange(18))
        seg = np.asarray(collection(a, "interval").get_segments())    # (18, 2, 2)
        np.testing.assert_allclose(seg[:, 0, 0], x - z95() * sd[order, j], rtol=1e-12)
        np.testing.assert_allclose(seg[:, 1, 0], x + z95() * sd[order, j], rtol=1e-12)
        np.testing.assert_allclose(seg[:, :, 1], np.c_[np.arange(18), np.arange(18)])
    assert np.all(np.diff(lines(axes[0], "mode")[0].get_xdata()) >= 0)
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == [str(v) for v in re.index[order]]


def test_caterpillar_order_and_level_options(sleep):
    re = sleep.ranef()["subj"]
    fig = plots.caterpillar(sleep, order="days", level=0.5)
    x = lines(fig.axes[1], "mode")[0].get_xdata()
    np.testing.assert_allclose(x, np.sort(re["days"].to_numpy()))
    seg = np.asarray(collection(fig.axes[1], "interval").get_segments())
    sd = np.sqrt(sleep.condvar()["subj"][:, 1, 1])[np.argsort(re["days"].to_numpy())]
    np.testing.assert_allclose(seg[:, 1, 0] - x, norm.ppf(0.75) * sd, rtol=1e-12)
    fig = plots.caterpillar(sleep, order=False)
    np.testing.assert_allclose(lines(fig.axes[0], "mode")[0].get_xdata(), re["(Intercept)"])
    with pytest.raises(ValueError, match="no grouping factor 'item'"):
        plots.caterpillar(sleep, group="item")


def test_caterpillar_draws_into_given_axes(sleep):
    from matplotlib.figure import Figure

    fig = Figure()
    axes = fig.subplots(1, 2)
    assert plots.caterpillar(sleep, ax=axes) is fig
    assert len(lines(axes[1], "mode")[0].get_xdata()) == 18
    with pytest.raises(ValueError, match="2 panel"):
        plots.caterpillar(sleep, ax=axes[0])
    render(fig)


@pytest.mark.parametrize("name", ["gm1", "cbpp"])
def test_caterpillar_glmm(name, request):
    fit = request.getfixturevalue(name)
    group = fit.reterm_names[0]
    fig = plots.caterpillar(fit)
    render(fig)
    re = fit.ranef()[group].iloc[:, 0].to_numpy()
    sd = np.sqrt(fit.condvar()[group][:, 0, 0])
    (a,) = fig.axes
    x = lines(a, "mode")[0].get_xdata()
    np.testing.assert_allclose(x, np.sort(re))
    seg = np.asarray(collection(a, "interval").get_segments())
    np.testing.assert_allclose(seg[:, 1, 0], np.sort(re) + z95() * sd[np.argsort(re)], rtol=1e-12)


# -- qqcaterpillar ---------------------------------------------------------------------------
def test_ppoints_are_rs():
    # R: ppoints(5); ppoints(18)
    np.testing.assert_allclose(plots._ppoints(5), [0.119047619047619, 0.309523809523810, 0.5,
                                                   0.690476190476190, 0.880952380952381])
    np.testing.assert_allclose(plots._ppoints(18), (np.arange(1, 19) - 0.5) / 18)


def test_qqcaterpillar_sorts_each_column_against_normal_quantiles(sleep, cbpp):
    fig = plots.qqcaterpillar(sleep)
    render(fig)
    re = sleep.ranef()["subj"]
    q = norm.ppf((np.arange(1, 19) - 0.5) / 18)
    for j, a in enumerate(fig.axes):
        mode = lines(a, "mode")[0]
        np.testing.assert_allclose(mode.get_xdata(), np.sort(re.iloc[:, j].to_numpy()))
        np.testing.assert_allclose(mode.get_ydata(), q)
    render(plots.qqcaterpillar(cbpp))


# -- shrinkage --------------------------------------------------------------------------------
def test_shrinkage_lmm_against_per_subject_least_squares(sleep):
    fig = plots.shrinkage(sleep)
    render(fig)
    (a,) = fig.axes
    data = mm.dataset("sleepstudy")
    re = sleep.ranef()["subj"]
    ols = np.array([np.polyfit(g["days"], g["reaction"], 1)[::-1]
                    for _, g in data.groupby("subj", sort=False)])
    subjects = list(dict.fromkeys(data["subj"].astype(str)))
    ols = pd.DataFrame(ols, index=subjects).loc[[str(s) for s in re.index]].to_numpy()
    penalized = re.to_numpy() + sleep.coef                   # per-subject coefficients
    unpen, pen = lines(a, "unpenalized")[0], lines(a, "penalized")[0]
    np.testing.assert_allclose(np.c_[pen.get_xdata(), pen.get_ydata()], penalized, rtol=1e-12)
    # Λ = 10⁴ I is the unpenalized limit to far better than this
    np.testing.assert_allclose(np.c_[unpen.get_xdata(), unpen.get_ydata()], ols, rtol=1e-6)
    arrows = collection(a, "shrinkage")
    np.testing.assert_allclose(np.c_[arrows.U, arrows.V], penalized - ols, atol=1e-4)
    np.testing.assert_allclose(lines(a, "population")[0].get_xydata(), [sleep.coef])
    assert (a.get_xlabel(), a.get_ylabel()) == ("(Intercept)", "days")
    # the specification is left as the fit left it
    assert sleep.model.objective(sleep.theta) == pytest.approx(sleep.objective, rel=1e-12)


def _logistic_offset_mle(y, offset):
    """Maximum likelihood intercept of a logistic regression with a known offset."""
    b = 0.0
    for _ in range(50):
        mu = 1.0 / (1.0 + np.exp(-(offset + b)))
        step = np.sum(y - mu) / np.sum(mu * (1 - mu))
        b += step
        if abs(step) < 1e-12:
            break
    return b


def test_shrinkage_glmm_against_per_district_likelihood(gm1):
    fig = plots.shrinkage(gm1)
    render(fig)
    (a,) = fig.axes
    est = plots.shrinkage_estimates(gm1)
    levels = est["levels"]
    beta0 = gm1.fixef["(Intercept)"]
    np.testing.assert_allclose(est["penalized"][:, 0], beta0 + gm1.ranef()["dist"].iloc[:, 0])
    # per district: the ML estimate of its intercept with Xβ̂ less β̂₀ as offset
    y = np.asarray(gm1.y, float)
    offset = np.asarray(gm1.X @ gm1.coef) - beta0
    codes = gm1.model.reterms[0].codes
    mixed = 0
    for i, lv in enumerate(levels):
        rows = codes == i
        if 0 < y[rows].sum() < rows.sum():
            mixed += 1
            intercept = _logistic_offset_mle(y[rows], offset[rows])
            assert est["unpenalized"][i, 0] == pytest.approx(intercept, abs=1e-6)
        else:      # every answer the same: no finite estimate, far out on its side
            assert abs(est["unpenalized"][i, 0] - beta0) > 10
    assert mixed > 50
    # the drawn points are these numbers, levels sorted by the unpenalized estimate
    order = np.argsort(est["unpenalized"][:, 0], kind="stable")
    np.testing.assert_allclose(lines(a, "penalized")[0].get_xdata(), est["penalized"][order, 0])
    np.testing.assert_allclose(lines(a, "unpenalized")[0].get_xdata(), est["unpenalized"][order, 0])
    assert [t.get_text() for t in a.get_yticklabels()] == [levels[i] for i in order]
    # the levels with no finite estimate are marked at the edge of the plot
    beyond = np.concatenate([ln.get_xdata() for ln in lines(a, "beyond")])
    assert len(beyond) == 3 and set(np.round(beyond, 12)) <= set(np.round(a.get_xlim(), 12))
    dev = gm1.model.objective(gm1.theta, gm1.coef)
    assert dev == pytest.approx(gm1.deviance, rel=1e-10)


# -- profile ----------------------------------------------------------------------------------
def test_profile_plot_draws_the_profile_and_its_interval(sleep):
    pr = sleep.profile()
    fig = plots.profile(pr)
    render(fig)
    ci = pr.confint(0.95)
    assert len(fig.axes) == len(pr.names) == 6
    for name, a in zip(pr.names, fig.axes):
        tab = pr.table(name)
        zeta = lines(a, "zeta")[0]
        np.testing.assert_allclose(zeta.get_xdata(), tab[name])
        np.testing.assert_allclose(zeta.get_ydata(), tab["zeta"])
        assert a.get_xlabel() == name
        seg = np.asarray(collection(a, "interval").get_segments())
        np.testing.assert_allclose(seg[:, 0, 0], ci.loc[name].to_numpy())
        np.testing.assert_allclose(seg[:, 1, 1], [-z95(), z95()])     # to where ζ = ∓z
        np.testing.assert_allclose(lines(a, "estimate")[0].get_xydata(),
                                   [[pr.estimates[name], 0.0]])


def test_profile_plot_of_gm1_sigma(gm1):
    """The README's picture: the profile of gm1's σ_dist (nAGQ = 9 profiles directly)."""
    name = "sd_(Intercept)|dist"
    fig = plots.profile(gm1, which=name)
    render(fig)
    (a,) = fig.axes
    x = lines(a, "zeta")[0].get_xdata()
    lo, hi = np.asarray(collection(a, "interval").get_segments())[:, 0, 0]
    assert x.min() < lo < 0.4786 < hi < x.max()
    np.testing.assert_allclose([lo, hi], [0.3365, 0.6601], atol=1e-4)


def test_profile_plot_of_some_parameters(sleep):
    pr = sleep.profile(which=["sigma", "days"])
    fig = plots.profile(pr, which="days")
    assert [a.get_xlabel() for a in fig.axes] == ["days"]
    with pytest.raises(ValueError, match="not profiled"):
        plots.profile(pr, which="(Intercept)")


# -- diagnostics and residuals --------------------------------------------------------------
def test_diagnostics_lmm(sleep):
    fig = plots.diagnostics(sleep)
    render(fig)
    r = sleep.residuals("pearson")
    a1, a2, a3 = fig.axes
    res = lines(a1, "residuals")[0]
    np.testing.assert_allclose(res.get_xdata(), sleep.fitted())
    np.testing.assert_allclose(res.get_ydata(), r)
    qq = lines(a2, "qq")[0]
    np.testing.assert_allclose(qq.get_ydata(), np.sort(r))
    np.testing.assert_allclose(qq.get_xdata(), norm.ppf((np.arange(1, 181) - 0.5) / 180))
    np.testing.assert_allclose(lines(a3, "scale")[0].get_ydata(), np.sqrt(np.abs(r)))
    assert a1.get_ylabel() == "pearson residual"


@pytest.mark.parametrize("kind", [None, "pearson"])
def test_diagnostics_glmm(cbpp, kind):
    fig = plots.diagnostics(cbpp, kind=kind)
    render(fig)
    r = cbpp.residuals(kind or "deviance")
    res = lines(fig.axes[0], "residuals")[0]
    np.testing.assert_allclose(res.get_xdata(), cbpp.fitted())
    np.testing.assert_allclose(res.get_ydata(), r)
    assert fig.axes[0].get_ylabel() == f"{kind or 'deviance'} residual"


def test_residual_kinds_against_lme4(sleep, cbpp):
    """Against lme4 1.1-31 (its own optimum, 3e-4 away from ours on cbpp):

        gm <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp,
                    binomial, control = glmerControl(optimizer = "bobyqa"))
        residuals(gm, type = k)[c(1, 2, 3, 20, 56)]
        fm <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy, REML = FALSE)
        residuals(fm, type = k)[c(1, 2, 100)]; sigma(fm)
    """
    lme4 = {
        "response": [-0.16530759898493, 0.108226477735539, 0.318458678810443,
                     0.0344744040029162, -0.0290660383640834],
        "pearson": [-1.33956569187875, 1.07479497739394, 2.87908409992157,
                    0.407228608963201, -0.670106305637831],
        "deviance": [-1.43770795725605, 0.988470310774894, 2.3566859332142,
                     0.394796562323711, -0.940693738853319],
        "working": [-0.775366759508299, 0.889480611708554, 2.89209865656112,
                    0.282963796328559, -1.02993616405704],
    }
    rows = [0, 1, 2, 19, 55]
    for kind, ref in lme4.items():
        np.testing.assert_allclose(cbpp.residuals(kind)[rows], ref, rtol=1e-3)
    # lme4's LMM residuals of every type are y - μ (unscaled); ours: Pearson over σ
    ref = [-4.66089386815216, -15.0589866052989, 0.948222735525519]
    for kind in ("response", "deviance", "working"):
        np.testing.assert_allclose(sleep.residuals(kind)[[0, 1, 99]], ref, rtol=1e-4)
    np.testing.assert_allclose(sleep.residuals("pearson")[[0, 1, 99]] * sleep.sigma, ref,
                               rtol=1e-4)
    assert sleep.sigma == pytest.approx(25.591907036487, rel=1e-4)


def test_residual_definitions(cbpp):
    y, mu, n = cbpp.y, cbpp.fitted(), cbpp.model.prior_w
    np.testing.assert_allclose(cbpp.residuals("pearson"), (y - mu) * np.sqrt(n / (mu * (1 - mu))))
    np.testing.assert_allclose(cbpp.residuals("working"), (y - mu) / (mu * (1 - mu)))
    d = cbpp.residuals("deviance")
    np.testing.assert_allclose(d ** 2, cbpp.devresid, rtol=1e-12)
    assert np.all(np.sign(d) == np.sign(y - mu))
    # a weighted LMM: Pearson residuals carry √w and 1/σ
    data = mm.dataset("sleepstudy")
    data["w"] = 1.0 + (data["days"] % 3)
    fit = mm.fit("reaction ~ 1 + days + (1 | subj)", data, weights="w")
    r = fit.y - fit.fitted()
    np.testing.assert_allclose(fit.residuals("pearson"), r * np.sqrt(data["w"]) / fit.sigma)
    np.testing.assert_allclose(fit.residuals("deviance"), r * np.sqrt(data["w"]))
    np.testing.assert_allclose(fit.residuals(), r)
    with pytest.raises(ValueError, match="kind must be"):
        fit.residuals("studentized")


def test_a_gamma_glmm_pearson_residuals_are_standardized():
    data = mm.dataset("cbpp")
    data["rate"] = (data["incid"] + 0.5) / data["hsz"]
    fit = mm.fit("rate ~ 1 + period + (1 | herd)", data, family=mm.Gamma(link="log"))
    y, mu = fit.y, fit.fitted()
    np.testing.assert_allclose(fit.residuals("pearson"),
                               (y - mu) / (mu * np.sqrt(fit.dispersion)), rtol=1e-10)
    np.testing.assert_allclose(fit.residuals("deviance") ** 2, fit.devresid, rtol=1e-10)
    render(plots.diagnostics(fit))


# -- the optional dependency -----------------------------------------------------------------
def test_missing_matplotlib_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)       # as if it were not installed
    monkeypatch.delitem(sys.modules, "mixedmodels.plots")
    with pytest.raises(ImportError, match=r"pip install \"mixedmodels\[plot\]\""):
        importlib.import_module("mixedmodels.plots")

"""Notebook and report display (Markdown, HTML, LaTeX), tidy tables, progress bars.

The displayed numbers are checked against the printed tables by reading both: a cell of
the Markdown, HTML or LaTeX table must be the text the printed table shows in that row.
The layouts are MixedModels.jl's (its test/mime.jl). Tidy tables are checked against the
fit's own accessors (the values they lay out) and against broom.mixed's naming and
layout rules, written down in src/mixedmodels/_tidy.py.
"""
import html.parser
import re
import sys
import time

import numpy as np
import pytest
from scipy.stats import norm

import mixedmodels as mm
from mixedmodels import _optimize


@pytest.fixture(scope="module")
def sleep():
    return mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))


@pytest.fixture(scope="module")
def sleep0():
    return mm.fit("reaction ~ 1 + days + (1 | subj)", mm.dataset("sleepstudy"))


@pytest.fixture(scope="module")
def pastes():
    """Nested: a grouping factor named 'batch & cask' (escaping in every format)."""
    return mm.fit("strength ~ 1 + (1 | batch/cask)", mm.dataset("pastes"))


# -- reading the tables back --------------------------------------------------------------
def markdown_cells(text):
    """Header and rows of a pipe table (unescaping ``\\|``); checks the alignment row."""
    lines = [ln for ln in text.split("\n") if ln.startswith("|")]
    split = [[c.strip().replace("\\|", "|")
              for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
    assert all(re.fullmatch(r":-+|-+:", c) for c in split[1]), lines[1]
    return split[0], split[2:]


class _Cells(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def html_cells(text):
    p = _Cells()
    p.feed(text)
    return p.rows[0], p.rows[1:]


def latex_cells(text):
    """Rows of a tabular, cells split at unescaped &, the math-mode escapes undone."""
    body = text.split("\n")
    assert body[0].startswith("\\begin{tabular}{") and body[-2] == "\\end{tabular}"
    spec = re.match(r"\\begin\{tabular\}\{([lr]+)\}", body[0]).group(1)
    rows = []
    for ln in body:
        if ln.endswith(" \\\\"):
            cells = re.split(r"(?<!\\)&", ln[:-3])
            assert len(cells) == len(spec), ln
            rows.append([_unlatex(c.strip()) for c in cells])
    return rows[0], rows[1:]


def _unlatex(s):
    s = s.replace("$-$", "-").replace("$<$", "<").replace("\\&", "&")
    return s.replace("\\textasciitilde{}", "~").replace("$|$", "|")


def printed_rows(text, names):
    """The cells of a printed table's rows, found by their names (which may contain
    spaces): the tokens after the name."""
    out = {}
    for line in text.split("\n"):
        for name in names:
            if line.startswith(name + " ") and name not in out:
                out[name] = line[len(name):].split()
    return out


def nonempty(row):
    return [c for c in row if c != ""]


# -- a fit --------------------------------------------------------------------------------
def test_fit_markdown_is_mixedmodels_jl_layout(sleep):
    md = sleep._repr_markdown_()
    lines = md.rstrip("\n").split("\n")
    # MixedModels.jl test/mime.jl: the header and first column of fm1's table
    assert re.fullmatch(r"\| +\| +Est\. \| +SE \| +z \| +p \| +σ_subj \|", lines[0])
    assert re.fullmatch(r"\|:-+\|(-+:\|){5}", lines[1])
    header, rows = markdown_cells(md)
    assert [r[0] for r in rows] == ["(Intercept)", "days", "Residual"]
    assert rows[0][1:4] == ["251.4051", "6.6323", "37.91"]
    assert rows[2][2:] == ["", "", "", ""]
    # every line has the same width (padded columns)
    assert len({len(ln) for ln in lines}) == 1


@pytest.mark.parametrize("name", ["sleep", "gm1", "cbpp", "pastes"])
def test_fit_tables_show_the_printed_numbers(name, request):
    fit = request.getfixturevalue(name)
    printed = fit.format_compact_table()
    names = list(fit.compact_table().index)
    want = printed_rows(printed, names)
    for fmt, reader in (("markdown", markdown_cells), ("html", html_cells), ("latex", latex_cells)):
        text = getattr(fit, f"to_{fmt}")()
        header, rows = reader(text)
        assert [r[0] for r in rows] == names, fmt
        for r in rows:
            assert nonempty(r[1:]) == want[r[0]], (fmt, r)
        assert header[1:5] == ["Est.", "SE", "z", "p"], fmt
    assert fit._repr_html_() == fit.to_html()


@pytest.mark.parametrize("name", ["sleep", "gm1"])
def test_coefficient_table_shows_the_printed_numbers(name, request):
    fit = request.getfixturevalue(name)
    printed = str(fit)
    want = printed_rows(printed, fit.coef_names)
    for fmt, reader in (("markdown", markdown_cells), ("html", html_cells), ("latex", latex_cells)):
        header, rows = reader(getattr(fit, f"to_{fmt}")("coeftable"))
        assert [r[0] for r in rows] == fit.coef_names
        for r in rows:
            assert r[1:] == want[r[0]], (fmt, r)
    header, _ = markdown_cells(fit.to_markdown("coeftable"))
    assert header == ["", "Coef.", "Std. Error", "z", "Pr(>|z|)"]
    with pytest.raises(ValueError, match="table must be one of"):
        fit.to_markdown("anova")


@pytest.mark.parametrize("name", ["sleep", "gm1", "pastes"])
def test_varcorr_tables_show_the_printed_numbers(name, request):
    fit = request.getfixturevalue(name)
    vc = fit.varcorr
    text_rows = str(vc).split("\n")[2:]
    for fmt, reader in (("markdown", markdown_cells), ("html", html_cells), ("latex", latex_cells)):
        text = getattr(vc, f"to_{fmt}")()
        header, rows = reader(text)
        assert header[:4] == ["", "Column", "Variance", "Std.Dev."]
        assert len(rows) == len(text_rows)
        for printed, r in zip(text_rows, rows):
            # the numbers of the printed row, in order (names may hold spaces)
            nums = re.findall(r"[+-]?\d+\.\d+|(?<=\s)\.(?=\s|$)", printed)
            assert nonempty(r[2:]) == nums, (fmt, printed, r)
            assert printed.startswith(r[0])
    assert vc._repr_html_() == vc.to_html()
    assert fit.to_markdown("varcorr") == vc.to_markdown()


def test_varcorr_markdown_layout(sleep):
    # MixedModels.jl test/mime.jl, VarCorr(fm1); "Std.Dev." as our printed table spells it
    header, rows = markdown_cells(sleep.varcorr.to_markdown())
    assert header == ["", "Column", "Variance", "Std.Dev.", "Corr."]
    assert [r[:2] for r in rows] == [["subj", "(Intercept)"], ["", "days"], ["Residual", ""]]
    assert rows[1][4] == "+0.08" and rows[0][4] == ""


def test_lrt_tables_show_the_printed_numbers(sleep, sleep0):
    lrt = mm.lrtest(sleep0, sleep)
    printed = str(lrt)
    want = printed_rows(printed, ["[1]", "[2]"])
    for fmt, reader in (("markdown", markdown_cells), ("html", html_cells), ("latex", latex_cells)):
        header, rows = reader(getattr(lrt, f"to_{fmt}")())
        assert [r[0] for r in rows] == lrt.formulas, fmt
        for i, r in enumerate(rows):
            assert nonempty(r[1:]) == want[f"[{i + 1}]"], (fmt, r)
    md = lrt._repr_markdown_()
    # the formulas' | escaped, as MixedModels.jl does; the boundary note follows
    assert "(1 \\| subj)" in md and "*Note:* [1] vs [2] tests 1 variance component" in md
    header, _ = markdown_cells(md)
    assert header == ["", "model-dof", "-2 logLik", "χ²", "χ²-dof", "P(>χ²)"]
    assert "<p><em>Note:</em>" in lrt._repr_html_()
    assert lrt.to_latex().split("\n")[2] == (
        " & model-dof & -2 logLik & $\\chi^2$ & $\\chi^2$-dof & P($>\\chi^2$) \\\\")


def test_escaping(pastes, gm1):
    h = pastes.to_html()
    assert "σ_batch &amp; cask" in h and "σ_batch & cask" not in h
    tex = pastes.to_latex()
    assert "$\\sigma_{\\mathrm{batch\\ \\&\\ cask}}$" in tex
    assert "$<$1e-99" in tex
    assert "$-$0.6871" in gm1.to_latex()          # gm1's intercept, -0.6871
    assert "<caption" in gm1.to_html() and "nAGQ = 9" in gm1.to_html()


# -- tidy ---------------------------------------------------------------------------------
BASE = ["effect", "group", "term", "estimate", "std_error", "statistic", "p_value"]


def test_tidy_lmm_fixed_and_ran_pars(sleep):
    t = sleep.tidy()
    assert list(t.columns) == BASE
    assert list(t.effect) == ["fixed"] * 2 + ["ran_pars"] * 4
    # broom.mixed's names: sd__<col>, cor__<col1>.<col2> in lower-triangle order, and
    # sd__Observation for the residual, in group "Residual"
    assert list(t.term) == ["(Intercept)", "days", "sd__(Intercept)", "cor__(Intercept).days",
                            "sd__days", "sd__Observation"]
    assert list(t.group) == [None, None, "subj", "subj", "subj", "Residual"]
    ct = sleep.coeftable()
    np.testing.assert_array_equal(t.estimate[:2], ct["Coef."])
    np.testing.assert_array_equal(t.std_error[:2], ct["Std. Error"])
    np.testing.assert_array_equal(t.statistic[:2], ct["z"])
    np.testing.assert_array_equal(t.p_value[:2], ct["Pr(>|z|)"])
    vc = sleep.varcorr
    sd, cor = vc.stddevs["subj"], vc.correlations["subj"]
    np.testing.assert_allclose(t.estimate[2:], [sd[0], cor[1, 0], sd[1], sleep.sigma], rtol=1e-14)
    assert t.loc[2:, ["std_error", "statistic", "p_value"]].isna().all().all()


def test_tidy_intervals(sleep):
    z = norm.ppf(0.975)
    t = sleep.tidy(conf_int=True)
    assert list(t.columns) == BASE + ["conf_low", "conf_high"]
    np.testing.assert_allclose(t.conf_low[:2], t.estimate[:2] - z * t.std_error[:2])
    assert t.conf_low[2:].isna().all()            # Wald: none for variance parameters (lme4)
    t = sleep.tidy(conf_int=True, conf_method="profile", conf_level=0.9)
    ci = sleep.confint("profile", level=0.9)
    # lme4's confint lists the variance parameters first; tidy, the fixed effects
    order = [4, 5, 0, 1, 2, 3]
    np.testing.assert_allclose(t.conf_low, ci["lower"].iloc[order])
    np.testing.assert_allclose(t.conf_high, ci["upper"].iloc[order])
    t = sleep.tidy("ran_pars", conf_int=True, conf_method="profile")
    assert list(t.effect) == ["ran_pars"] * 4
    np.testing.assert_allclose(t.conf_high, sleep.confint("profile").iloc[:4]["upper"])


def test_tidy_ran_vals(sleep):
    t = sleep.tidy(effects="ran_vals", conf_int=True, conf_level=0.8)
    assert list(t.columns) == ["effect", "group", "level", "term", "estimate", "std_error",
                               "statistic", "p_value", "conf_low", "conf_high"]
    re = sleep.ranef()["subj"]
    sd = np.sqrt(np.diagonal(sleep.condvar()["subj"], axis1=1, axis2=2))
    # lme4's as.data.frame(ranef(., condVar = TRUE)) order: by term, then level
    assert list(t.term) == ["(Intercept)"] * 18 + ["days"] * 18
    assert list(t.level) == [str(v) for v in re.index] * 2
    np.testing.assert_array_equal(t.estimate, np.r_[re.iloc[:, 0], re.iloc[:, 1]])
    np.testing.assert_allclose(t.std_error, np.r_[sd[:, 0], sd[:, 1]], rtol=1e-14)
    np.testing.assert_allclose(t.conf_high - t.estimate, norm.ppf(0.9) * t.std_error)
    with pytest.raises(ValueError, match="Wald intervals only"):
        sleep.tidy(effects="ran_vals", conf_int=True, conf_method="profile")
    every = sleep.tidy(effects=["ran_vals", "fixed", "ran_pars"])
    assert list(dict.fromkeys(every.effect)) == ["fixed", "ran_pars", "ran_vals"]
    assert every.level[:6].isna().all()


def test_tidy_glmm(gm1, cbpp):
    t = gm1.tidy()
    assert list(t.term[-1:]) == ["sd__(Intercept)"] and list(t.group[-1:]) == ["dist"]
    assert "sd__Observation" not in set(t.term)      # no residual for a Bernoulli GLMM
    assert list(t.term[:-1]) == gm1.coef_names
    np.testing.assert_array_equal(t.p_value[:-1], gm1.coeftable()["Pr(>|z|)"])
    assert t.estimate.iloc[-1] == pytest.approx(gm1.varcorr.stddevs["dist"][0], rel=1e-14)
    v = cbpp.tidy("ran_vals")
    np.testing.assert_allclose(v.std_error, np.sqrt(cbpp.condvar()["herd"][:, 0, 0]))
    assert list(v.group.unique()) == ["herd"]


def test_tidy_other_layouts(sleep):
    m = mm.fit("reaction ~ 1 + days + (1 + days || subj)", mm.dataset("sleepstudy"))
    # an uncorrelated term has no correlation rows (lme4 splits it into scalar terms)
    assert list(m.tidy("ran_pars").term) == ["sd__(Intercept)", "sd__days", "sd__Observation"]
    t = sleep.tidy("fixed", ddf="satterthwaite")
    assert list(t.columns) == ["effect", "group", "term", "estimate", "std_error", "statistic",
                               "df", "p_value"]
    ct = sleep.coeftable(ddf="satterthwaite")
    np.testing.assert_array_equal(t.df, ct["df"])
    np.testing.assert_array_equal(t.p_value, ct["Pr(>|t|)"])
    with pytest.raises(ValueError, match="effects must be"):
        sleep.tidy("random")


# -- progress -----------------------------------------------------------------------------
def test_optimizer_progress_bar(capsys):
    data = mm.dataset("sleepstudy")
    fit = mm.fit("reaction ~ 1 + days + (1 + days | subj)", data, progress=True)
    err = capsys.readouterr().err
    assert "Minimizing" in err
    shown = int(re.findall(r"Minimizing (\d+)", err)[-1])
    assert 0 < shown <= fit.optsum.feval              # the optimizer's own evaluations
    mm.fit("reaction ~ 1 + days + (1 + days | subj)", data)
    assert capsys.readouterr().err == ""


def test_progress_off_makes_no_bar(monkeypatch):
    import mixedmodels._progress as progress

    def refuse(*args, **kwargs):
        raise AssertionError("a progress bar was made")

    monkeypatch.setattr(progress, "progress_bar", refuse)
    bar = _optimize._Progress(False)
    bar.update(10)
    bar.update(20, final=True)
    assert bar.bar is None
    mm.fit("reaction ~ 1 + days + (1 | subj)", mm.dataset("sleepstudy"))


def test_progress_off_costs_nothing(monkeypatch):
    """A fit with progress=False is not slower than with no progress code at all."""
    data = mm.dataset("sleepstudy")
    model = mm.LinearMixedModel("reaction ~ 1 + days + (1 + days | subj)", data)

    def best_time(reps=15):
        best = np.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            model.fit(check_convergence=False)
            best = min(best, time.perf_counter() - t0)
        return best

    class Null:
        def __init__(self, enabled):
            pass

        def update(self, count, final=False):
            pass

    best_time(3)                                   # warm up
    ours = best_time()
    monkeypatch.setattr(_optimize, "_Progress", Null)
    null = best_time()
    assert ours <= 1.3 * null + 2e-4, (ours, null)


def test_profile_progress(capsys, sleep):
    sleep.profile(which="theta_", progress=True)
    err = capsys.readouterr().err
    assert "profile" in err and "8/8" in err          # 4 parameters, 2 sides each
    sleep.profile(which="theta_")                     # default: only when interactive
    assert capsys.readouterr().err == ""


def test_interactive_detection(monkeypatch):
    import mixedmodels._progress as progress

    class Tty:
        def isatty(self):
            return True

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress.interactive()
    monkeypatch.setattr(sys, "stderr", None)
    assert not progress.interactive()
    assert progress.progress_bar(None) is None
    assert progress.progress_bar(False) is None

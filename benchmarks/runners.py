"""Python runners: one adapter per library that says whether it can express a problem
and, if so, turns it into a zero-argument fit function.

Everything an adapter does in ``prepare`` (reading the data, renaming a response to 0/1,
adding a squared column a formula parser cannot write) happens before timing starts;
the function it returns is what is timed: formula parsing, model building, the
optimization and the result object, from the data frame on.

Each fit function returns a dict with ``objective`` (-2 log-likelihood; the REML
criterion for REML fits; None for an approximation that has no likelihood),
``converged``, ``nfev`` and ``method`` (what was run, shown in the table).
"""
from __future__ import annotations

import re
import warnings

import numpy as np

from problems import load


class CannotExpress(Exception):
    """The library cannot express this model; the message says why."""


def _bern01(df, col):
    """A Bernoulli response with "N"/"Y" labels as 0/1 floats ("Y" the success)."""
    import pandas as pd
    if col and not pd.api.types.is_numeric_dtype(df[col]):
        df[col] = (df[col].astype(str) == "Y").astype(float)
    return df


def _age2(df, formula):
    """Replace ``I(age^2)`` by a precomputed column, for parsers without I()."""
    if "I(age^2)" in formula:
        df["age2"] = df["age"] ** 2
        formula = formula.replace("I(age^2)", "age2")
    return df, formula


# ----------------------------------------------------------------------------------
# mixedmodels (ours)
# ----------------------------------------------------------------------------------

class Ours:
    name = "mixedmodels"
    CONVERGED = {"SUCCESS", "STOPVAL_REACHED", "FTOL_REACHED", "XTOL_REACHED"}

    def version(self):
        import mixedmodels as mm
        return getattr(mm, "__version__", "?")

    def _kwargs(self, p):
        import mixedmodels as mm
        kw = {}
        if p.glmm:
            kw["family"] = {"bernoulli": mm.Bernoulli, "binomial": mm.Binomial,
                            "poisson": mm.Poisson}[p.family]()
            kw["nAGQ"] = max(p.nAGQ, 1)
            if p.fast:
                kw["fast"] = True
        else:
            kw["REML"] = p.REML
        if p.weights:
            kw["weights"] = p.weights
        if p.contrasts:
            coding = {"helmert": mm.HelmertCoding, "dummy": mm.DummyCoding,
                      "effects": mm.EffectsCoding}
            kw["contrasts"] = {k: coding[v]() for k, v in p.contrasts.items()}
        return kw

    def prepare(self, p):
        import mixedmodels as mm
        # bundled data as mm.dataset gives them (labels as str); generated factors as
        # pandas categoricals (the analogue of R's factors)
        df = load(p, factor_as="category")
        kw = self._kwargs(p)
        formula = p.formula

        def fit():
            m = mm.fit(formula, df, **kw)
            obj = -2.0 * float(m.loglik) if p.glmm else float(m.objective)
            res = {"objective": obj, "method": "mm.fit" + (" fast=True" if p.fast else "")}
            stages = [s for s in (getattr(m, "optsum_fast", None), getattr(m, "optsum", None))
                      if s is not None]
            if stages:
                res["nfev"] = int(sum(_get(s, "feval") or 0 for s in stages))
                ret = str(_get(stages[-1], "returnvalue"))
                res["status"] = ret
                res["converged"] = ret in self.CONVERGED
                res["optimizer_time"] = float(sum(_get(s, "elapsed") or 0 for s in stages))
            return res, m

        self._df = df
        return fit

    def evals(self, p, fit, k):
        """Set-up (building the model from the data frame) and per-evaluation time of the
        objective at theta near the optimum (LMMs)."""
        import time
        import mixedmodels as mm
        if p.glmm:
            return {"ok": False, "error": "evals: LMMs only"}
        res, m = fit()
        kw = self._kwargs(p)
        t0 = time.perf_counter()
        model = mm.LinearMixedModel(p.formula, self._df, **kw)
        setup = time.perf_counter() - t0
        theta = np.asarray(m.theta, dtype=float)
        model.objective(theta)
        t0 = time.perf_counter()
        for i in range(k):
            model.objective(theta * (1 + 1e-6 * (i + 1)))
        per = (time.perf_counter() - t0) / k
        return {"ok": True, "setup": setup, "per_eval": per, "nfev": res.get("nfev"),
                "n_timed": k, "path": str(getattr(model, "path", "")),
                "optimizer_time": res.get("optimizer_time")}


def _get(obj, key):
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


# ----------------------------------------------------------------------------------
# glmm (PyPI, Rust-backed)
# ----------------------------------------------------------------------------------

class Glmm:
    name = "glmm"

    def version(self):
        from importlib.metadata import version
        return version("glmm")

    def prepare(self, p):
        import glmm
        if p.fast:
            raise CannotExpress("no nAGQ=0 (nagq is 1..25)")
        if p.nAGQ > 1 and (len(p.groups) > 1 or p.slopes):
            raise CannotExpress("nagq>1 needs one scalar random-effect term")
        df = load(p, factor_as="category")
        df = _bern01(df, p.response01)
        family = {"gaussian": "gaussian", "bernoulli": "binomial", "binomial": "binomial",
                  "poisson": "poisson"}[p.family]
        kw = dict(nagq=max(p.nAGQ, 1),
                  # lme4 computes no lmerTest df and refits nothing for anova: switch the
                  # two extra passes off so the same work is compared
                  satterthwaite=False, anova_test="Wald")
        if family == "gaussian":
            kw["reml"] = p.REML
        if p.weights:
            kw["weights"] = df[p.weights].to_numpy(float)
        formula = p.r_formula
        method = "fit" + (" (treatment coding)" if p.contrasts else "")

        def fit():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = glmm.fit(df, formula, family, **kw)
            return {"objective": -2.0 * float(r.loglik), "converged": bool(r.converged),
                    "nfev": int(r.n_eval), "method": method}, r

        return fit


# ----------------------------------------------------------------------------------
# mixedlm (PyPI, Rust-backed lme4 port)
# ----------------------------------------------------------------------------------

class MixedLM:
    name = "mixedlm"

    def version(self):
        from importlib.metadata import version
        return version("mixedlm")

    def prepare(self, p):
        import mixedlm
        df = load(p, factor_as="category")
        df = _bern01(df, p.response01)
        df, formula = _age2(df, p.r_formula)
        contrasts = {k: {"helmert": "helmert", "dummy": "treatment", "effects": "sum"}[v]
                     for k, v in p.contrasts.items()} or None
        if p.family == "gaussian":
            def fit():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = mixedlm.lmer(formula, df, REML=p.REML, contrasts=contrasts)
                return _mixedlm_result(r, "lmer"), r
        else:
            fam = {"bernoulli": mixedlm.families.Binomial, "binomial": mixedlm.families.Binomial,
                   "poisson": mixedlm.families.Poisson}[p.family]()
            kw = dict(family=fam, nAGQ=p.nAGQ, contrasts=contrasts)
            if p.weights:
                kw["weights"] = p.weights

            def fit():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = mixedlm.glmer(formula, df, **kw)
                return _mixedlm_result(r, "glmer"), r
        return fit


def _mixedlm_result(r, method):
    ll = r.logLik()
    val = getattr(ll, "value", ll)
    conv = getattr(r, "converged", None)
    return {"objective": -2.0 * float(val), "converged": None if conv is None else bool(conv),
            "nfev": getattr(r, "function_evals", None), "method": method}


# ----------------------------------------------------------------------------------
# statsmodels
# ----------------------------------------------------------------------------------

ONE_GROUP_MAX_ROWS = 2000   # crossed effects by pretending all rows are one group


class Statsmodels:
    name = "statsmodels"

    def version(self):
        import statsmodels
        return statsmodels.__version__

    def prepare(self, p):
        if p.family == "gaussian":
            return self._mixedlm(p)
        return self._bayes(p)

    def _split(self, formula):
        fixed = re.sub(r"\s*\+\s*\([^()]*\|[^()]*\)", "", formula).strip()
        return fixed

    def _mixedlm(self, p):
        import statsmodels.formula.api as smf
        fixed = self._split(p.r_formula)
        df = load(p, factor_as="category")
        method = "MixedLM"
        if len(p.groups) == 1:
            g = p.groups[0]
            slope = p.slopes.get(g)
            re_formula = f"~{slope}" if slope else "1"
            kw = dict(groups=g, re_formula=re_formula)
        elif p.nested and len(p.groups) == 2 and not p.slopes:
            g, h = p.groups
            kw = dict(groups=g, re_formula="1", vc_formula={h: f"0 + C({h})"})
            method = "MixedLM (inner factor as variance component)"
        elif not p.slopes and len(df) <= ONE_GROUP_MAX_ROWS:
            df["_one"] = 1
            kw = dict(groups="_one", re_formula="0",
                      vc_formula={g: f"0 + C({g})" for g in p.groups})
            method = "MixedLM (crossed as one group, dense n x n)"
        else:
            why = "crossed factors with a random slope" if p.slopes else \
                f"crossed factors need the one-group trick, a dense {len(df)} x {len(df)} covariance"
            raise CannotExpress(why)
        for c in df.columns:   # patsy wants plain columns for C()
            if hasattr(df[c], "cat"):
                df[c] = df[c].astype(str)

        def fit():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = smf.mixedlm(fixed, df, **kw).fit(reml=p.REML)
            return {"objective": -2.0 * float(r.llf), "converged": bool(r.converged),
                    "method": method}, r

        return fit

    def _bayes(self, p):
        from statsmodels.genmod import bayes_mixed_glm as bmg
        if p.slopes:
            raise CannotExpress("random slopes")
        if p.family == "binomial":
            raise CannotExpress("binomial with trials (BinomialBayesMixedGLM is Bernoulli only)")
        if p.fast:
            raise CannotExpress("no nAGQ=0; only a variational approximation (see :laplace)")
        df = load(p, factor_as="category")
        df = _bern01(df, p.response01)
        df, formula = _age2(df, p.r_formula)
        fixed = self._split(formula)
        vc = {}
        for g in p.groups:
            if ":" in g:
                a, b = g.split(":")
                df[g.replace(":", "_")] = df[a].astype(str) + ":" + df[b].astype(str)
                g = g.replace(":", "_")
            vc[g] = f"0 + C({g})"
        for c in df.columns:
            if hasattr(df[c], "cat"):
                df[c] = df[c].astype(str)
        cls = bmg.BinomialBayesMixedGLM if p.family == "bernoulli" else bmg.PoissonBayesMixedGLM
        method = f"{cls.__name__}.fit_vb (approximation, no likelihood)"

        def fit():
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                m = cls.from_formula(fixed, vc, df)
                r = m.fit_vb()
            conv = not any("converge" in str(x.message) for x in w)
            return {"objective": None, "converged": conv, "method": method,
                    "approximation": True}, r

        return fit


ADAPTERS = {a.name: a for a in (Ours(), Glmm(), MixedLM(), Statsmodels())}

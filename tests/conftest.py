"""Tolerance tiers, written down once (STYLE.md point 9). Never loosen a tier to pass.

- KERNEL: a compiled kernel against its NumPy twin on the same inputs.
- FIXED_THETA: an objective evaluated at a θ given by a reference, relative.
- OPTIMUM: θ, β, standard errors and σ of a fitted optimum against a reference, relative.
- OBJECTIVE_ABS: the objective at the optimum against a reference, absolute (ours may be lower).
"""
import json
from pathlib import Path

import pytest

KERNEL = 1e-10
FIXED_THETA = 1e-8
OPTIMUM = 1e-4
OBJECTIVE_ABS = 1e-3

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
LOCAL_REFERENCE = Path(__file__).resolve().parent / "reference"


def _reference_dir():
    # tests/reference holds a copy so that the tests run without ../shared
    return LOCAL_REFERENCE if (LOCAL_REFERENCE / "lme4_public.json").exists() else REFERENCE


@pytest.fixture(scope="session")
def lme4_ref():
    entries = json.loads((_reference_dir() / "lme4_public.json").read_text())
    return {e["name"]: e for e in entries}


@pytest.fixture(scope="session")
def jl_ref():
    d = json.loads((_reference_dir() / "mixedmodels_jl.json").read_text())
    return {m["name"]: m for m in d["models"]}


# -- the models of lme4_inference.json, fitted once per session -------------------------
CODINGS = {"DummyCoding": "DummyCoding", "EffectsCoding": "EffectsCoding",
           "HelmertCoding": "HelmertCoding"}
_INFERENCE = {}
_INFERENCE_FITS = {}


def inference_reference():
    """lme4_inference.json (lme4 1.1-31, lmerTest, pbkrtest): ``models`` by name and the
    ``comparisons``."""
    if not _INFERENCE:
        d = json.loads((_reference_dir() / "lme4_inference.json").read_text())
        _INFERENCE["models"] = {m["name"]: m for m in d["models"]}
        _INFERENCE["comparisons"] = {c["name"]: c for c in d["comparisons"]}
    return _INFERENCE


def fit_inference_model(name):
    """Our fit of one ``models`` entry of lme4_inference.json (bundled data, the entry's
    family, REML, weights, offset and MixedModels.jl contrast codings), cached."""
    if name not in _INFERENCE_FITS:
        import mixedmodels as mm

        m = inference_reference()["models"][name]
        family = None if m["family"] == "gaussian" else m["family"]
        contrasts = {k: getattr(mm, CODINGS[v])() for k, v in (m["contrasts_py"] or {}).items()}
        _INFERENCE_FITS[name] = mm.fit(m["formula"], mm.dataset(m["data"]), family=family,
                                       REML=m["REML"], weights=m["weights"],
                                       offset=m["offset"], contrasts=contrasts or None)
    return _INFERENCE_FITS[name]


_JOINT_OPTIMA = {}


def joint_optimum(cases, name):
    """(model, its joint optimum [β̃, θ]) for ``cases[name]()`` (a GLMM specification),
    fitted once per session: what the gradient tests differentiate at."""
    key = (id(cases), name)
    if key not in _JOINT_OPTIMA:
        import numpy as np

        model = cases[name]()
        fit = model.fit()
        _JOINT_OPTIMA[key] = (model, np.concatenate([fit.beta_w, fit.theta]))
    return _JOINT_OPTIMA[key]


# -- fits that several test modules share (public data; each fitted once per session) -------
@pytest.fixture(scope="session")
def gm1():
    """The tutorial's gm1: Bernoulli, nAGQ = 9."""
    import mixedmodels as mm

    contra = mm.dataset("contra")
    contrasts = {"dist": mm.Grouping(), "urban": mm.HelmertCoding(), "livch": mm.DummyCoding()}
    return mm.fit("use ~ 1 + age + abs2(age) + urban + livch + (1 | dist)", contra,
                  family=mm.Bernoulli(), nAGQ=9, contrasts=contrasts)


@pytest.fixture(scope="session")
def cbpp():
    """cbpp as counts, cbind(incid, hsz - incid)."""
    import mixedmodels as mm

    return mm.fit("cbind(incid, hsz - incid) ~ 1 + period + (1 | herd)", mm.dataset("cbpp"),
                  family=mm.Binomial())

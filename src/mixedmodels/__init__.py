"""mixedmodels: linear and generalized linear mixed-effects models over CHOLMOD.

>>> import mixedmodels as mm
>>> m = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
"""
from .datasets import dataset, datasets
from .families import (Bernoulli, Binomial, CloglogLink, Gamma, IdentityLink, InverseGaussian,
                       InverseLink, InverseSquareLink, LogitLink, LogLink, NegativeBinomial, Normal, Poisson,
                       ProbitLink, SqrtLink, logistic)
from .formula import DummyCoding, EffectsCoding, Grouping, HelmertCoding
from .glmm import GeneralizedLinearMixedModel, GeneralizedLinearMixedModelFit
from .lmm import LinearMixedModel, LinearMixedModelFit
from ._varcorr import VarCorr
from ._threads import get_num_threads, set_num_threads
from .inference.bootstrap import bootstrap
from .inference.lrt import lrtest
from . import scale        # out-of-core fits; Dask itself is imported only when used

__version__ = "0.1.0"

__all__ = [
    "fit", "lrtest", "bootstrap", "dataset", "datasets", "set_num_threads", "get_num_threads", "LinearMixedModel", "LinearMixedModelFit",
    "GeneralizedLinearMixedModel", "GeneralizedLinearMixedModelFit", "VarCorr",
    "Bernoulli", "Binomial", "Poisson", "Gamma", "InverseGaussian", "Normal", "NegativeBinomial",
    "LogitLink", "ProbitLink", "CloglogLink", "LogLink", "IdentityLink", "InverseLink",
    "SqrtLink", "InverseSquareLink", "logistic",
    "DummyCoding", "EffectsCoding", "HelmertCoding", "Grouping",
]


def fit(formula, data, family=None, *, REML=False, weights=None, offset=None, contrasts=None,
        nAGQ=1, fast=False, progress=False, na_action="drop"):
    """Fit a linear (no ``family``) or generalized linear mixed model.

    Parameters
    ----------
    formula : str
        lme4-style: ``"y ~ 1 + x + (1 + x | g)"``; ``||`` for uncorrelated terms,
        ``(1 | a/b)`` for nesting, ``(1 | a & b)`` for an interaction grouping factor.
    data : pandas.DataFrame, or a polars / pyarrow table
    family : Family, str or None
        None (or ``Normal()`` with its identity link) fits a linear mixed model.
    REML : bool
        LMM only: the REML criterion instead of maximum likelihood.
    weights : str or array, optional
        LMM: precision weights. GLMM: prior weights (Binomial: the number of trials).
    offset : str or array, optional
        A known part of the linear predictor (LMM: of the mean), as lme4's ``offset``;
        ``offset(x)`` terms in the formula add to it.
    contrasts : dict, optional
        Column -> ``DummyCoding()`` | ``EffectsCoding()`` | ``HelmertCoding()`` | ``Grouping()``.
    nAGQ : int
        GLMM: Gauss-Hermite points (1 is the Laplace approximation).
    fast : bool
        GLMM: optimize θ only, with β from PIRLS (lme4's nAGQ = 0).
    progress : bool
        Show the optimizer's progress on stderr.
    na_action : {"drop", "raise"}
        Rows with missing or infinite values: drop them with a warning, or raise.

    Returns
    -------
    LinearMixedModelFit or GeneralizedLinearMixedModelFit

    Notes
    -----
    ``data`` may be a Dask DataFrame (the ``dask`` extra): a linear mixed model is then
    fitted out of core, from cross-products computed partition by partition
    (:mod:`mixedmodels.scale`); weights and offset must be column names.
    """
    if scale.is_dask_frame(data):
        from .families import get_family

        fam = None if family is None else get_family(family)
        if fam is not None and not (fam.name == "Normal" and fam.link.name == "identity"):
            raise NotImplementedError(
                "out-of-core fits of a Dask DataFrame are linear mixed models; a GLMM needs a "
                "pass over the rows per PIRLS iteration (see the README, 'Larger than memory')")
        if nAGQ != 1 or fast:
            raise ValueError("nAGQ and fast apply to generalized linear mixed models")
        return scale.fit_dask(formula, data, REML=REML, weights=weights, offset=offset,
                              contrasts=contrasts, na_action=na_action, progress=progress)
    if family is not None:
        from .families import get_family

        fam = get_family(family)
        if not (fam.name == "Normal" and fam.link.name == "identity"):
            if REML:
                raise ValueError("REML applies to linear mixed models only")
            model = GeneralizedLinearMixedModel(formula, data, fam, weights=weights, offset=offset,
                                                contrasts=contrasts, nAGQ=nAGQ, na_action=na_action)
            return model.fit(fast=fast, progress=progress)
    if nAGQ != 1 or fast:
        raise ValueError("nAGQ and fast apply to generalized linear mixed models (pass a family)")
    model = LinearMixedModel(formula, data, REML=REML, weights=weights, offset=offset,
                             contrasts=contrasts, na_action=na_action)
    return model.fit(progress=progress)


def __getattr__(name):
    # mm.plots without importing matplotlib at import time (it is an optional extra)
    if name == "plots":
        import importlib

        return importlib.import_module(".plots", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

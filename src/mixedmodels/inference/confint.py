"""Confidence intervals for a fit's parameters: Wald, profile likelihood, bootstrap.

Every method returns the same table: indexed by the parameter names of lme4's
``confint(..., oldNames = FALSE)`` (``sd_(Intercept)|subj``, ``cor_days.(Intercept)|subj``,
``sd_days|subj``, ``sigma``, then the fixed effects by ``fit.coef_names``), with columns
``lower`` and ``upper``.
"""
import numpy as np
import pandas as pd
from scipy.stats import norm

from .profile import parameter_names
from .profile import profile as _profile

__all__ = ["confint"]

_METHODS = {"wald": "wald", "profile": "profile", "bootstrap": "bootstrap", "boot": "bootstrap"}


def confint(fit, method="wald", level=0.95, **kwargs):
    """Confidence intervals for the variance parameters and the fixed effects.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
    method : {"wald", "profile", "bootstrap"}
        "wald": estimate ± Φ⁻¹((1 + level)/2) × standard error for the fixed effects;
        the variance parameters get NaN, as in lme4 (their sampling distributions are
        far from normal on this scale). "profile": likelihood-profile intervals
        (:func:`mixedmodels.inference.profile.profile`; a REML fit is profiled through
        its ML refit, as lme4 does). "bootstrap": parametric bootstrap percentiles.
    level : float, default 0.95
    **kwargs
        "wald": ``se`` ("conditional", the default, or "hessian" for a GLMM's
        Hessian-based standard errors). "profile": passed to ``profile`` (``which``,
        ``step``, ``max_points``). "bootstrap": ``n`` (replicates, default 1000),
        ``boot_type`` (default "percentile", passed to the bootstrap's ``confint`` as
        its ``method``), and ``seed``, ``n_jobs``, ``progress`` for the bootstrap.

    Returns
    -------
    pandas.DataFrame
        Columns ``lower`` and ``upper``, indexed by parameter.

    Examples
    --------
    >>> import mixedmodels as mm
    >>> fit = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
    >>> confint(fit).loc["days"].round(4).tolist()
    [7.523, 13.4116]
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, not {level}")
    key = _METHODS.get(str(method).lower())
    if key is None:
        raise ValueError(f"method must be 'wald', 'profile' or 'bootstrap', not {method!r}")
    if key == "wald":
        return _wald(fit, level, **kwargs)
    if key == "profile":
        return _profile(fit, level=level, **kwargs).confint(level)
    from .bootstrap import bootstrap

    n = kwargs.pop("n", 1000)
    boot_type = kwargs.pop("boot_type", "percentile")
    return bootstrap(fit, n, **kwargs).confint(level=level, method=boot_type)


def _wald(fit, level, se="conditional"):
    var_names, coef_names = parameter_names(fit)
    if se == "conditional":
        stderr = np.asarray(fit.stderror, dtype=float)
    elif se == "hessian":
        if not fit.is_glmm:
            raise ValueError("se='hessian' applies to GLMMs; an LMM's standard errors are "
                             "exact given θ")
        stderr = np.asarray(fit.stderror_hessian, dtype=float)
    else:
        raise ValueError(f"se must be 'conditional' or 'hessian', not {se!r}")
    z = float(norm.ppf(0.5 + level / 2.0))
    coef = np.asarray(fit.coef, dtype=float)
    nan = np.full(len(var_names), np.nan)
    return pd.DataFrame({"lower": np.concatenate([nan, coef - z * stderr]),
                         "upper": np.concatenate([nan, coef + z * stderr])},
                        index=pd.Index(var_names + coef_names, name="parameter"))

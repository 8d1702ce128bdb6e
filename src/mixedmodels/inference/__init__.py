"""Inference after the fit: one module per capability, each working on a fitted model
(a frozen record) and its specification's public operations.

- ``lrt``: likelihood-ratio tests between nested fits (``mm.lrtest``)
- ``confint``: Wald, profile and bootstrap intervals (``fit.confint``)
- ``profile``: likelihood profiles of every parameter (``fit.profile``)
- ``simulate``: responses drawn from a fit (``fit.simulate``)
- ``bootstrap``: the parametric bootstrap (``mm.bootstrap``)
- ``condvar``: conditional covariances of the random effects (``fit.condvar``)
- ``ddf``: Satterthwaite and Kenward-Roger degrees of freedom, F tests (``fit.anova``)
"""

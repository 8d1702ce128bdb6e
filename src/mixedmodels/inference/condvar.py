"""Conditional covariances of the random effects given the data, at the estimates.

What lme4 returns as ``ranef(fit, condVar = TRUE)`` (the ``postVar`` attribute) and
MixedModels.jl as ``condVar(fit)``: for each level of each random-effects term, the
covariance of its k random effects given y, with θ, β and σ held at their estimates.

Notes
-----
With b = Λu and M = Λ'Z'WZΛ + I the matrix the fit factors,

    Var(b | y) = s² Λ M⁻¹ Λ',

and since Λ is block diagonal (one k-by-k template T_t per level of term t) the block of
a level l is s² T_t [M⁻¹]_ll T_t'. Only the level blocks on the diagonal of M⁻¹ are
needed; the workspace computes them from its factor
(``BlockedSystem.inverse_diagonal_blocks``).

- Linear mixed model: W holds the precision weights (none: I), s = σ, and Λ is
  relative to σ; the conditional distribution is exactly normal.
- GLMM: W holds the weights at the conditional modes, the curvature the Laplace
  approximation of the fit uses, and s = 1 (Λ is on the scale of b). For Bernoulli,
  Binomial and Poisson these are PIRLS's working weights, as in lme4 and MixedModels.jl.
  For the families with a dispersion φ (Gamma, inverse Gaussian, Normal with a link) they
  are the observed information W° over φ that the fit's Laplace approximation uses (see
  _dispersion.py); under the canonical link that is the working weight over φ, and where
  the link is not canonical the two differ. Either way the result is the covariance of
  the normal approximation to the conditional distribution at the modes.
"""
import numpy as np

from .._dispersion import observed_weights
from .._pirls import PirlsState


def condvar(fit):
    """Conditional covariances of the random effects, per term and level.

    Parameters
    ----------
    fit : LinearMixedModelFit or GeneralizedLinearMixedModelFit
        A fitted model (also one loaded from a pickle: the workspace is rebuilt and
        refactored at ``fit.theta``).

    Returns
    -------
    dict of str -> ndarray, shape (levels, k, k)
        Keyed by grouping factor (``fit.ranef()``'s keys), levels in the order of
        ``fit.ranef()[group].index``, the k columns in the term's order (``cnames``).
        Terms that share a grouping factor, such as ``(1 | g) + (0 + x | g)``, get one
        entry each, as lme4 returns them: ``g`` for the first, ``g'`` for the second
        (``ranef()`` joins their columns side by side in the same order).

    Notes
    -----
    Var(b | y) at the estimates: σ² Λ (Λ'Z'WZΛ + I)⁻¹ Λ' for a linear mixed model, and
    Λ (Λ'Z'WZΛ + I)⁻¹ Λ' with the weights at the conditional modes for a GLMM (see the
    module docstring). An uncorrelated term ``(1 + x || g)`` is one term here, so its
    blocks are k-by-k and carry the conditional covariance between its columns, which
    is not zero even though Λ is diagonal; lme4 splits such a term into scalar terms and
    reports only the diagonal of these blocks.

    Examples
    --------
    >>> fit = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
    >>> cv = fit.condvar()["subj"]          # (18, 2, 2)
    >>> se = np.sqrt(np.diagonal(cv, axis1=1, axis2=2))   # conditional standard errors
    """
    cached = fit._cached("condvar", lambda: _compute(fit))
    return {key: value.copy() for key, value in cached.items()}


def _compute(fit):
    model = fit.model
    ws = model.workspace
    theta = np.asarray(fit.theta, dtype=float)
    if fit.is_glmm:
        ws.set_products(np.zeros((model.n, 1)), _weights_at_modes(fit))
        scale2 = 1.0
    else:
        # an LMM's workspace keeps its cross-products; the factor may be at another θ
        scale2 = float(fit.sigma) ** 2
    try:
        ws.factorize(theta, schur=False)
    except np.linalg.LinAlgError:
        raise ValueError(
            "the conditional covariance of the random effects is not defined at this fit: "
            "Λ'Z'WZΛ + I is not positive definite at the conditional modes (for a GLMM with "
            "a dispersion parameter, observations far from their means can make the "
            "observed information negative); check that the fit converged") from None
    inverse = ws.inverse_diagonal_blocks()
    out, seen = {}, {}
    for term, lam, minv in zip(model.reterms, fit.lambda_, inverse):
        # T [M⁻¹]_ll T' for every level at once
        blocks = scale2 * np.einsum("ab,lbc,dc->lad", lam, minv, lam)
        name = term.group_name
        repeat = seen.get(name, 0)
        seen[name] = repeat + 1
        out[name + "'" * repeat] = blocks
    return out


def _weights_at_modes(fit):
    """The weights W of M at the fit's conditional modes (from its stored η and μ).

    Using the record rather than re-running PIRLS keeps this cheap and exact for a fit
    loaded from a pickle: η is the linear predictor at the modes the fit reported.
    """
    model = fit.model
    fam = model.family
    y, prior_w = model.y, model.prior_w
    eta = np.ascontiguousarray(fit.eta, dtype=float)
    if fit.dispersion is not None:
        mu = np.ascontiguousarray(fit.mu, dtype=float)
        return observed_weights(fam, y, mu, eta, prior_w, float(fit.dispersion))
    state = PirlsState(model.n)
    state.evaluate(fam, y, prior_w, eta)
    return np.ascontiguousarray(state.wrkwt)

"""Adaptive Gauss-Hermite quadrature for a GLMM with one scalar random-effects term.

With a single scalar term the random effects of different levels are independent given
the data, so the integral over u factors into one-dimensional integrals, one per level.
Centring each at its conditional mode û_j and scaling by s_j = 1/L_jj (L_jj the level's
entry of the Cholesky factor at the modes), with d_j(u) = u_j² + Σ_{i in j} dev_i,

    -2 log ∫ exp(-d_j(u)/2) du/√(2π)  ≈  d_j(û) - 2 log s_j - 2 log Σ_k w_k exp((z_k² - d_j(û + s_j z_k) + d_j(û))/2)

with z_k, w_k the Gauss-Hermite nodes and weights for the standard normal density.
One node (z = 0, w = 1) gives the Laplace approximation exactly. The compiled kernel is
``_kernels._glm.agq_deviance``; ``agq_deviance_numpy`` is its twin.
"""
from functools import lru_cache

import numpy as np

from ._kernels import _glm
from ._linalg._blocked import matvec


@lru_cache(maxsize=32)
def gauss_hermite_normal(n):
    """Nodes and weights of n-point Gauss-Hermite quadrature against N(0, 1)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return z, w / np.sqrt(2.0 * np.pi)


def _inputs(model, theta, beta, working, prior_w, sd):
    term = model.reterms[0]
    fixed = np.empty(model.n)
    beta_w = beta if working else model.fixed.to_working(beta)
    matvec(model.X, np.ascontiguousarray(beta_w, dtype=float), model.offset_or_zero, fixed)
    zlam = np.ascontiguousarray(term.z[:, 0] * theta[0])
    if sd is None:
        sd = 1.0 / model.workspace.blockdiag_diagonal()
    pw = model.prior_w if prior_w is None else np.ascontiguousarray(prior_w, dtype=float)
    return term, fixed, zlam, np.ascontiguousarray(sd, dtype=float), pw


def agq_deviance(model, theta, beta, u, nAGQ, working=False, prior_w=None, sd=None,
                 family=None):
    """The AGQ deviance at the modes u.

    ``beta`` is in the coefficients' own coordinates, or in the working basis of
    _fixed.py with ``working=True``. ``sd`` are the per-level scales s_j (default: from
    the factor PIRLS has just left at the modes); ``prior_w`` overrides the prior
    weights (w/φ for the dispersion families), ``family`` the model's family (the
    negative binomial at a trial θ).
    """
    term, fixed, zlam, sd, pw = _inputs(model, theta, beta, working, prior_w, sd)
    nodes, weights = gauss_hermite_normal(nAGQ)
    nlev = term.nlevels
    fam = model.family if family is None else family
    return _glm.agq_deviance(fam.code, fam.link.code, fixed, zlam, term.codes, model.y,
                             pw, np.ascontiguousarray(u), sd, nodes, weights,
                             np.empty(nlev), np.empty(nlev), np.empty(nlev), fam.param)


def agq_deviance_numpy(model, theta, beta, u, nAGQ, working=False, prior_w=None, sd=None,
                       family=None):
    """NumPy twin of the compiled kernel, through the family's own ``update``."""
    term, fixed, zlam, sd, pw = _inputs(model, theta, beta, working, prior_w, sd)
    codes, nlev = term.codes, term.nlevels
    st, y = model.state, model.y
    fam = model.family if family is None else family

    def devc_at(v):
        st.evaluate(fam, y, pw, fixed + zlam * v[codes])
        return v * v + np.bincount(codes, weights=st.devresid, minlength=nlev)

    devc0 = devc_at(u)
    mult = np.zeros(nlev)
    for z, w in zip(*gauss_hermite_normal(nAGQ)):
        devc = devc0 if z == 0.0 else devc_at(u + z * sd)
        mult += w * np.exp((z * z - devc + devc0) / 2.0)
    devc_at(u)   # leave the response state at the modes
    return float(np.sum(devc0) - 2.0 * (np.sum(np.log(mult)) + np.sum(np.log(sd))))

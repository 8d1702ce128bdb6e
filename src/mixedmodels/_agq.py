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


def _inputs(model, theta, beta):
    term = model.reterms[0]
    fixed = np.empty(model.n)
    matvec(model.design.X, np.ascontiguousarray(beta, dtype=float), model.offset_or_zero, fixed)
    zlam = np.ascontiguousarray(term.z[:, 0] * theta[0])
    sd = 1.0 / model.system.blockdiag_diagonal()
    return term, fixed, zlam, sd


def agq_deviance(model, theta, beta, u, nAGQ):
    """The AGQ deviance at the modes u (PIRLS has just found them, so the model's
    system holds the factor at u)."""
    term, fixed, zlam, sd = _inputs(model, theta, beta)
    nodes, weights = gauss_hermite_normal(nAGQ)
    nlev = term.nlevels
    fam = model.family
    return _glm.agq_deviance(fam.code, fam.link.code, fixed, zlam, term.codes, model.y,
                             model.prior_w, np.ascontiguousarray(u), sd, nodes, weights,
                             np.empty(nlev), np.empty(nlev), np.empty(nlev))


def agq_deviance_numpy(model, theta, beta, u, nAGQ):
    """NumPy twin of the compiled kernel, through the family's own ``update``."""
    term, fixed, zlam, sd = _inputs(model, theta, beta)
    codes, nlev = term.codes, term.nlevels
    st, fam, y, pw = model.state, model.family, model.y, model.prior_w

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

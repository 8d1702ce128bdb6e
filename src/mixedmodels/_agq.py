"""Adaptive Gauss-Hermite quadrature for a GLMM with one scalar random-effects term.

With a single scalar term the random effects of different levels are independent given
the data, so the integral over u factors into one-dimensional integrals, one per level.
Centring each at its conditional mode û_j and scaling by s_j = 1/L_jj (L_jj the level's
entry of the Cholesky factor at the modes), with d_j(u) = u_j² + Σ_{i in j} dev_i,

    -2 log ∫ exp(-d_j(u)/2) du/√(2π)  ≈  d_j(û) - 2 log s_j - 2 log Σ_k w_k exp((z_k² - d_j(û + s_j z_k) + d_j(û))/2)

with z_k, w_k the Gauss-Hermite nodes and weights for the standard normal density.
One node (z = 0, w = 1) gives the Laplace approximation exactly.
"""
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=32)
def gauss_hermite_normal(n):
    """Nodes and weights of n-point Gauss-Hermite quadrature against N(0, 1)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return z, w / np.sqrt(2.0 * np.pi)


def agq_deviance(model, theta, beta, u, nAGQ):
    """The AGQ deviance at the modes u (which PIRLS has just found, so that the
    model's system holds the factor at u)."""
    codes = model.reterms[0].codes
    nlev = model.reterms[0].nlevels
    st, fam = model.state, model.family
    y, pw = model.y, model.prior_w
    lam = theta[0]
    fixed = model.design.X @ beta + model.offset_or_zero
    zcol = model.reterms[0].z[:, 0]
    sd = 1.0 / model.system.blockdiag_diagonal()
    st.evaluate(fam, y, pw, fixed + zcol * lam * u[codes])
    devc0 = u * u + np.bincount(codes, weights=st.devresid, minlength=nlev)
    mult = np.zeros(nlev)
    for z, w in zip(*gauss_hermite_normal(nAGQ)):
        if z == 0.0:
            devc = devc0
        else:
            uz = u + z * sd
            st.evaluate(fam, y, pw, fixed + zcol * lam * uz[codes])
            devc = uz * uz + np.bincount(codes, weights=st.devresid, minlength=nlev)
        mult += w * np.exp((z * z - devc + devc0) / 2.0)
    # leave the response state at the modes
    st.evaluate(fam, y, pw, fixed + zcol * lam * u[codes])
    return float(np.sum(devc0) - 2.0 * (np.sum(np.log(mult)) + np.sum(np.log(sd))))

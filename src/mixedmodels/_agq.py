"""Adaptive Gauss-Hermite quadrature for a GLMM with one scalar random-effects term.

With a single scalar term the random effects of different levels are independent given
the data, so the integral over u factors into one-dimensional integrals, one per level.
Centring each at its conditional mode û_j and scaling by s_j = 1/L_jj (L_jj the level's
entry of the Cholesky factor at the modes), with d_j(u) = u_j² + Σ_{i in j} dev_i,

    -2 log ∫ exp(-d_j(u)/2) du/√(2π)  ≈  d_j(û) - 2 log s_j - 2 log Σ_k w_k exp((z_k² - d_j(û + s_j z_k) + d_j(û))/2)

with z_k, w_k the Gauss-Hermite nodes and weights for the standard normal density.
One node (z = 0, w = 1) gives the Laplace approximation exactly.

The compiled kernels: ``_kernels._agq.agq_deviance`` for Bernoulli and Binomial with the
logit link and Poisson with the log link (the pairs of the exact gradient, one loop
each, the rows taken level by level: see that module), ``_kernels._glm.agq_deviance``
for every other family and link. ``agq_deviance_numpy`` is the twin of both (through
the NumPy twin of the family's pass), ``_agq_numpy.agq_deviance`` of the first in its
own arithmetic.
"""
import weakref
from functools import lru_cache

import numpy as np

from ._kernels import _agq, _glm
from ._kernels._glm_numpy import update as update_numpy
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


def kernel_kind(family):
    """The loop of ``_kernels._agq`` that covers ``family``, or None (then
    ``_kernels._glm.agq_deviance``'s generic one)."""
    link = family.link.name
    if family.name in ("Bernoulli", "Binomial") and link == "logit":
        return _agq.KIND_LOGIT
    if family.name == "Poisson" and link == "log":
        return _agq.KIND_POISSON
    return None


class LevelRows:
    """What ``_kernels._agq`` reads of a model that no parameter changes: the rows
    sorted by level (``order``) and where each level starts (``starts``); the term's
    column, y, 1 - y and the prior weights in that order (the weights as one number
    ``wc`` when they are all equal, and then ``w`` empty); and ``rowconst``, the sum of
    the deviance's parts that do not depend on η (Binomial: 2w [y log y + (1-y)
    log(1-y)]; Poisson: 2w (y log y - y); Bernoulli: 0)."""

    def __init__(self, model, family, prior_w):
        term = model.reterms[0]
        codes = term.codes
        self.order = np.ascontiguousarray(np.argsort(codes, kind="stable"), dtype=np.int32)
        counts = np.bincount(codes, minlength=term.nlevels)
        self.starts = np.ascontiguousarray(np.concatenate([[0], np.cumsum(counts)]),
                                           dtype=np.int32)
        y = np.asarray(model.y, dtype=float)
        w = np.ones(y.size) if prior_w.size == 0 else np.asarray(prior_w, dtype=float)
        self.prior_w = prior_w          # the array this was built for
        self.z = np.ascontiguousarray(term.z[self.order, 0], dtype=float)
        self.y = np.ascontiguousarray(y[self.order])
        self.yb = 1.0 - self.y
        uniform = w.size == 0 or bool(np.all(w == w[0]))
        self.wc = float(w[0]) if w.size else 1.0
        self.w = np.empty(0) if uniform else np.ascontiguousarray(w[self.order])
        self.rowconst = float(np.sum(_row_constants(family, y, w)))


def _xlogy(x, y):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x != 0.0, x * np.log(np.where(x != 0.0, y, 1.0)), 0.0)


def _row_constants(family, y, w):
    """Per row, the part of the weighted deviance that does not depend on η."""
    if family.name == "Binomial":
        return 2.0 * w * (_xlogy(y, y) + _xlogy(1.0 - y, 1.0 - y))
    if family.name == "Poisson":
        return 2.0 * w * (_xlogy(y, y) - y)
    return np.zeros(y.size)


_LEVEL_ROWS = weakref.WeakKeyDictionary()


def level_rows(model, family, prior_w):
    """The model's ``LevelRows`` for ``family`` and these prior weights, built once per
    model (again only for other prior weights than the last ones)."""
    per_model = _LEVEL_ROWS.setdefault(model, {})
    rows = per_model.get(family.name)
    if rows is None or rows.prior_w is not prior_w:
        rows = per_model[family.name] = LevelRows(model, family, prior_w)
    return rows


def agq_deviance(model, theta, beta, u, nAGQ, working=False, prior_w=None, sd=None,
                 family=None):
    """The AGQ deviance at the modes u.

    ``beta`` is in the coefficients' own coordinates, or in the working basis of
    _fixed.py with ``working=True``. ``sd`` are the per-level scales s_j (default: from
    the factor PIRLS has just left at the modes); ``prior_w`` overrides the prior
    weights (w/φ for the dispersion families), ``family`` the model's family (the
    negative binomial at a trial θ).
    """
    fam = model.family if family is None else family
    kind = kernel_kind(fam)
    if kind is not None:
        return _agq_deviance_levels(model, theta, beta, u, nAGQ, working, prior_w, sd, fam,
                                    kind)
    term, fixed, zlam, sd, pw = _inputs(model, theta, beta, working, prior_w, sd)
    nodes, weights = gauss_hermite_normal(nAGQ)
    nlev = term.nlevels
    return _glm.agq_deviance(fam.code, fam.link.code, fixed, zlam, term.codes, model.y,
                             pw, np.ascontiguousarray(u), sd, nodes, weights,
                             np.empty(nlev), np.empty(nlev), np.empty(nlev), fam.param)


def _agq_deviance_levels(model, theta, beta, u, nAGQ, working, prior_w, sd, fam, kind):
    _, fixed, _, sd, pw = _inputs(model, theta, beta, working, prior_w, sd)
    rows = level_rows(model, fam, pw)
    nodes, weights = gauss_hermite_normal(nAGQ)
    return _agq.agq_deviance(kind, fixed, float(theta[0]), rows.z, rows.y, rows.yb, rows.w,
                             rows.wc, rows.order, rows.starts,
                             np.ascontiguousarray(u, dtype=float), sd, nodes, weights,
                             rows.rowconst)


def agq_deviance_numpy(model, theta, beta, u, nAGQ, working=False, prior_w=None, sd=None,
                       family=None):
    """NumPy twin of the compiled kernels, through the NumPy twin of the family's pass
    (``_kernels._glm_numpy.update``)."""
    term, fixed, zlam, sd, pw = _inputs(model, theta, beta, working, prior_w, sd)
    codes, nlev = term.codes, term.nlevels
    y, n = model.y, model.n
    fam = model.family if family is None else family

    def devc_at(v):
        devresid = np.empty(n)
        update_numpy(fam.code, fam.link.code, fixed + zlam * v[codes], y, pw, np.empty(n),
                     np.empty(n), np.empty(n), np.empty(n), devresid, fam.param)
        return v * v + np.bincount(codes, weights=devresid, minlength=nlev)

    devc0 = devc_at(u)
    mult = np.zeros(nlev)
    for z, w in zip(*gauss_hermite_normal(nAGQ)):
        devc = devc0 if z == 0.0 else devc_at(u + z * sd)
        mult += w * np.exp((z * z - devc + devc0) / 2.0)
    return float(np.sum(devc0) - 2.0 * (np.sum(np.log(mult)) + np.sum(np.log(sd))))

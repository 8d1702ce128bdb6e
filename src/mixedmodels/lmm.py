"""Linear mixed models by maximum likelihood or REML, through the profiled deviance.

Notes
-----
For a given θ the blocked system (see _linalg/system.py) gives log det(L), the
Cholesky factor RX of the fixed-effects block and the penalized weighted residual sum of
squares r². With n observations, p fixed effects and d = n (ML) or n - p (REML),

    objective(θ) = 2 log det(L) [+ 2 log det(RX) for REML] + d (1 + log(2π r² / d)) - Σ log w,

the deviance with β and σ² profiled out (σ̂² = r² / d). The last term is present only with
precision weights w.
"""
import math

import numpy as np

from ._linalg._blocked import upper_solve

from ._model import MixedModelSpec
from ._optimize import OptSummary, minimize, rectify
from ._results import MixedModelFit


class LinearMixedModel(MixedModelSpec):
    """A linear mixed model specification; ``objective(theta)`` and ``fit()``.

    Parameters
    ----------
    formula : str
        ``response ~ fixed part + (columns | group) + ...``.
    data : pandas.DataFrame
    REML : bool, default False
    weights : str or array, optional
        Precision weights (the residual variance of row i is σ²/w_i).
    contrasts : dict, optional
        Column name -> coding (``DummyCoding()``, ``EffectsCoding()``, ``HelmertCoding()``...).
    na_action : {"drop", "raise"}
    """

    def __init__(self, formula, data, *, REML=False, weights=None, contrasts=None,
                 na_action="drop"):
        super().__init__(formula, data, weights=weights, contrasts=contrasts,
                         na_action=na_action)
        self.REML = bool(REML)
        d = self.design
        if d.y_levels is not None:
            raise ValueError(
                f"response '{d.response_name}' is not numeric (levels {', '.join(map(str, d.y_levels))}); "
                "a linear mixed model needs a numeric response (for a binary one pass family=Bernoulli())")
        if d.offset is not None:
            raise ValueError("offset is not supported for a linear mixed model; subtract it from the response")
        if np.ptp(d.y) == 0:
            raise ValueError(f"response '{d.response_name}' is constant ({d.y[0]:g}): there is no variance to partition")
        n = self.n
        for t in self.reterms:
            if t.nlevels >= n or t.nlevels * t.ncols >= n:
                raise ValueError(
                    f"term ({' + '.join(t.cnames)} | {t.group_name}) has {t.nlevels * t.ncols} random effects "
                    f"for {n} observations: the random-effects variances and the residual variance "
                    "are not identifiable")
        if self.REML and n <= self.p:
            raise ValueError(f"REML needs more observations ({n}) than fixed effects ({self.p})")
        self._logw = 0.0 if d.weights is None else float(np.sum(np.log(d.weights)))
        self._dfr = n - self.p if self.REML else n    # residual degrees of freedom
        self.system.set_products(np.column_stack([d.X, d.y]), d.weights)
        self._setup_done()

    def _evaluate(self, theta):
        logdet, r = self.system.factorize(theta)
        pwrss = float(r[-1, -1]) ** 2
        dfr = self._dfr
        if pwrss <= 0.0:
            return -math.inf, logdet, r, pwrss
        val = 2.0 * logdet + dfr * (1.0 + math.log(2.0 * math.pi * pwrss / dfr)) - self._logw
        if self.REML:
            val += 2.0 * float(np.sum(np.log(np.diag(r)[:-1])))
        return val, logdet, r, pwrss

    def objective(self, theta):
        """-2 log-likelihood (ML) or the REML criterion, profiled over β and σ, at θ."""
        return self._evaluate(self._check_theta(theta))[0]

    def _objective_unchecked(self, theta):
        # the optimizer's entry: θ comes from NLopt as a float64 vector of the right length
        return self._evaluate(theta)[0]

    def starting_theta(self):
        """Where the optimizer starts, and its initial steps.

        Each term starts from a moment estimate of its covariance relative to σ²: with r
        the OLS residuals, the term's coefficients are fitted level by level (b_j from
        Z_j'Z_j b_j = Z_j'r_j), and their between-level covariance less the average
        sampling covariance s²(Z_j'Z_j)⁻¹, over s², gives ΛΛ' (eigenvalues floored at 0.01,
        so the start keeps off the boundary); θ is its Cholesky factor (its diagonal for
        ``||`` terms) and each step a quarter of θ (at least 0.05). A term with too few
        usable levels starts as lme4 does (Λ = I, step 0.75). Only the path changes, not
        the optimum: insteval takes 37 evaluations instead of 102, sleepstudy 38 for 49.
        """
        d = self.design
        theta = self.layout.initial()
        step = np.full(self.layout.ntheta, 0.75)
        # OLS residuals; X has full column rank (aliased columns were dropped), so the
        # normal equations suffice for a starting point
        beta = np.linalg.solve(d.X.T @ d.X, d.X.T @ d.y) if self.p else np.zeros(0)
        r = d.y - d.X @ beta
        pos = 0
        for t in self.reterms:
            k = t.ncols
            npar = k if t.zerocorr else k * (k + 1) // 2
            rel = _relative_covariance(t, r)
            if rel is not None:
                if t.zerocorr:
                    vals = np.sqrt(np.diag(rel))
                else:
                    chol = np.linalg.cholesky(rel)
                    vals = np.array([chol[e, a] for a in range(k) for e in range(a, k)])
                theta[pos:pos + npar] = vals
                step[pos:pos + npar] = np.maximum(0.25 * np.abs(vals), 0.05)
            pos += npar
        return theta, step

    def fit(self, progress=False, initial=None):
        """Minimize the objective over θ with BOBYQA; return a :class:`LinearMixedModelFit`.

        ``initial`` overrides the starting θ (see :meth:`starting_theta`).
        """
        theta0, step = self.starting_theta()
        if initial is not None:
            theta0, step = self._check_theta(initial), np.full(self.layout.ntheta, 0.75)
        optsum = OptSummary(initial=theta0, lowerbd=self.layout.lower, initial_step=step)
        minimize(self._objective_unchecked, optsum, progress=progress)
        rectify(self._objective_unchecked, optsum, np.flatnonzero(np.isfinite(self.layout.lower)))
        return LinearMixedModelFit(self, optsum.final, optsum)


def _relative_covariance(term, r):
    """Moment estimate of a term's random-effects covariance over σ² (see starting_theta)."""
    k, c, z, nlev = term.ncols, term.codes, term.z, term.nlevels
    ztz = np.empty((nlev, k, k))
    ztr = np.empty((nlev, k))
    for a in range(k):
        ztr[:, a] = np.bincount(c, weights=z[:, a] * r, minlength=nlev)
        for e in range(a, k):
            ztz[:, a, e] = ztz[:, e, a] = np.bincount(c, weights=z[:, a] * z[:, e], minlength=nlev)
    # levels whose own k-by-k system is solvable (a determinant well away from zero
    # relative to its diagonal: cheaper than a rank decomposition per level)
    diag_prod = np.prod(np.diagonal(ztz, axis1=1, axis2=2), axis=1)
    if k == 1:
        usable = diag_prod > 0.0
    else:
        usable = (diag_prod > 0.0) & (np.linalg.det(ztz) > 1e-10 * diag_prod)
    if usable.sum() < k + 2:
        return None
    if k == 1:
        inv = 1.0 / ztz[usable]
    else:
        inv = np.linalg.inv(ztz[usable])
    coef = np.zeros((nlev, k))
    coef[usable] = np.einsum("lij,lj->li", inv, ztr[usable])
    rows = usable[c]
    resid = (r - np.einsum("ij,ij->i", z, coef[c]))[rows]
    dfw = resid.size - k * int(usable.sum())
    if dfw <= 0:
        return None
    s2 = float(resid @ resid) / dfw
    if not (s2 > 0.0 and np.isfinite(s2)):
        return None
    dev = coef[usable] - coef[usable].mean(axis=0)
    between = dev.T @ dev / (len(dev) - 1)
    rel = (between - s2 * inv.mean(axis=0)) / s2
    if k == 1:
        return np.maximum(rel, 0.01)
    w, v = np.linalg.eigh((rel + rel.T) / 2)
    return (v * np.maximum(w, 0.01)) @ v.T


def rx_inverse_crossprod(r, p):
    """(RX'RX)⁻¹ = RX⁻¹ RX⁻ᵀ from the leading p-square block of the upper factor r."""
    rxinv = np.eye(p)
    for j in range(p):
        col = np.ascontiguousarray(rxinv[:, j])
        upper_solve(r, col)
        rxinv[:, j] = col
    return rxinv @ rxinv.T


class LinearMixedModelFit(MixedModelFit):
    """A fitted linear mixed model: estimates at the optimum, fixed once built.

    Attributes
    ----------
    theta, coef (β), b (conditional modes, u's order), u, sigma, vcov, objective, optsum
    """

    def __init__(self, model, theta, optsum=None):
        self.model = model
        self.REML = model.REML
        self.theta = np.asarray(theta, dtype=float)
        self.optsum = optsum
        val, logdet, r, pwrss = model._evaluate(self.theta)
        p = model.p
        self.objective = float(val)
        self.logdet = 2.0 * logdet
        self.pwrss = float(pwrss)
        self.coef = r[:p, p].copy()
        upper_solve(r, self.coef)
        self.sigma = float(np.sqrt(pwrss / model._dfr))
        self.vcov = self.sigma ** 2 * rx_inverse_crossprod(r, p)
        sysm = model.system
        cu = np.asfortranarray((sysm.rzxy[:, p] - sysm.rzxy[:, :p] @ self.coef)[:, None])
        self.u = sysm.backward(cu)[:, 0].copy()
        self.b = sysm.lambda_times(self.theta, self.u)

    @property
    def loglik(self):
        return -0.5 * self.objective

    @property
    def deviance(self):
        return self.objective

    def fitted(self):
        """X β + Z b."""
        return self.linpred()

    def residuals(self):
        return self.y - self.fitted()

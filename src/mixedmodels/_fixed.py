"""The fixed-effects basis: X = Q R, and the model is fitted in Q's coordinates.

An uncentred or badly scaled predictor (``days + 1e8``) makes X'X numerically
singular long before X itself is: the normal equations square the condition number.
So the fitting code never sees X. It sees the working matrix X̃ = √n·Q, whose columns
are orthogonal with squared norm n (the intercept column becomes a constant ±1), and
the working coefficients β̃ = R̃β with R̃ = R/√n. The likelihood depends on X only
through its column space, so ML fits are unchanged; the REML criterion uses
log det(X'WX), which differs by the constant 2 log|det R̃| added back here. β, its
covariance and the fixed part of η are transformed back once, at the end.

Householder QR is backward stable, so the log-likelihood keeps its digits however X is
shifted or scaled; what cannot be kept is the accuracy of individual coefficients
whose columns are nearly collinear (the intercept of ``days + 1e8`` is the value at
day -1e8). A column whose part orthogonal to the columns before it is below
``NEAR_ALIAS`` of its norm gets a warning that names it.
"""
import warnings

import numpy as np

from ._linalg._blocked import upper_solve

# Below this fraction of its norm orthogonal to the earlier columns, a column's
# coefficient (and those it is collinear with) loses more than six digits to the
# conditioning of X; the formula layer drops columns below 1e-8 as aliased.
NEAR_ALIAS = 1e-6


class FixedEffectsBasis:
    """X = √n Q · R̃ with Q orthonormal and R̃ upper triangular, positive diagonal.

    Attributes
    ----------
    X : (n, p) ndarray
        The working model matrix √n Q (C-contiguous).
    R : (p, p) ndarray
        R̃, with X_original = X @ R.
    logabsdet : float
        log |det R̃|, the REML criterion's constant.
    """

    def __init__(self, X, names=None, warn=True):
        X = np.asarray(X, dtype=np.float64)
        n, p = X.shape
        self.p = p
        if p == 0:
            self.X = np.zeros((n, 0))
            self.R = np.zeros((0, 0))
            self.Rinv = np.zeros((0, 0))
            self.logabsdet = 0.0
            return
        q, r = np.linalg.qr(X)
        signs = np.where(np.diag(r) < 0, -1.0, 1.0)
        scale = np.sqrt(max(n, 1))
        self.X = np.ascontiguousarray(q * (signs * scale))
        self.R = (r * signs[:, None]) / scale
        self.logabsdet = float(np.sum(np.log(np.abs(np.diag(self.R)))))
        # R̃⁻¹ once, by the plain-loop solve of _blocked: LAPACK's triangular solve
        # cost milliseconds per call waking the BLAS threads on a busy machine
        self.Rinv = np.empty((p, p))
        r = np.ascontiguousarray(self.R)
        for j in range(p):
            col = np.zeros(p)
            col[j] = 1.0
            upper_solve(r, col)
            self.Rinv[:, j] = col
        if warn:
            norms = np.linalg.norm(X, axis=0) / scale
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.abs(np.diag(self.R)) / norms
            bad = [j for j in range(p) if norms[j] > 0 and ratio[j] < NEAR_ALIAS]
            if bad:
                label = [names[j] if names is not None else str(j) for j in bad]
                worst = float(np.min(ratio[bad]))
                warnings.warn(
                    f"fixed-effects column(s) {label} are nearly collinear with the columns "
                    f"before them (only {worst:.2g} of the norm is orthogonal to them): the "
                    "likelihood is computed stably, but their coefficients and standard "
                    "errors carry about "
                    f"{max(0, int(-np.log10(worst)))} fewer significant digits; centring or "
                    "rescaling those predictors would restore them", stacklevel=4)

    def to_working(self, beta):
        """β̃ = R̃ β."""
        return self.R @ np.asarray(beta, dtype=np.float64)

    def from_working(self, beta_w):
        """β = R̃⁻¹ β̃."""
        return self.Rinv @ np.asarray(beta_w, dtype=np.float64)

    def vcov_from_working(self, v):
        """R̃⁻¹ V R̃⁻ᵀ: a covariance of β̃ as one of β."""
        return self.Rinv @ np.asarray(v, dtype=np.float64) @ self.Rinv.T

    def jacobian(self):
        """dβ̃/dβ = R̃ (for transforming derivatives)."""
        return self.R

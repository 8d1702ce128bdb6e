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
import functools
import math
import warnings

import numpy as np

from ._linalg._blocked import upper_solve

try:
    from ._kernels import _dense
except ImportError:  # pragma: no cover - not built: NumPy's LAPACK QR
    _dense = None

try:
    from numpy.linalg import _umath_linalg
except ImportError:  # pragma: no cover - a NumPy without the private gufuncs
    _umath_linalg = None

# Below this fraction of its norm orthogonal to the earlier columns, a column's
# coefficient (and those it is collinear with) loses more than six digits to the
# conditioning of X; the formula layer drops columns below 1e-8 as aliased.
NEAR_ALIAS = 1e-6


def _raise_qr(err, flag):
    raise np.linalg.LinAlgError("Incorrect argument found while performing QR "
                                "factorization")


try:
    from numpy._core._ufunc_config import _extobj_contextvar, _make_extobj

    # the floating-point state numpy.linalg.qr runs its gufuncs in (np.errstate with these
    # arguments), made once: np.errstate makes it anew on every entry, which cost a
    # third as much as the QR of a small X
    _QR_STATE = _make_extobj(call=_raise_qr, invalid="call", over="ignore", divide="ignore",
                             under="ignore")
except Exception:  # pragma: no cover - a NumPy without these internals
    _QR_STATE = None


# Above this many columns numpy.linalg.qr: the compiled QR matches OpenBLAS's unblocked
# LAPACK QR (the same algorithm, level-2 kernels) up to 64 columns (0.6-1.0 of its time at
# 200-100000 rows, one thread) and falls behind from about 100 (1.2-1.35 times at 128),
# where also LAPACK's blocked level-3 dgeqrf takes over; by then the factorization costs
# milliseconds and LAPACK's cold start (~90 µs) no longer matters.
_COMPILED_QR_MAX_COLUMNS = 64

# False: every QR by NumPy's LAPACK gufuncs (the twin; for timing and tests)
COMPILED_QR = True


def householder_qr(X):
    """``numpy.linalg.qr(X)`` (reduced) of a float64 matrix, to rounding.

    Up to 64 columns and at least as many rows, with finite entries, by the compiled
    Householder QR of ``_kernels._dense`` (LAPACK's dgeqr2 and dorg2r written out, so
    R's signs are LAPACK's): a fit runs cold, and NumPy's LAPACK path cost ~90 µs there
    against a few for the factorization of a small X. Otherwise :func:`numpy_qr`.

    Parameters
    ----------
    X : (n, p) float64 ndarray

    Returns
    -------
    q : (n, min(n, p)) ndarray, C-contiguous
    r : (min(n, p), p) ndarray, upper triangular
    """
    if (COMPILED_QR and _dense is not None and type(X) is np.ndarray and X.ndim == 2
            and X.dtype == np.float64 and X.dtype.isnative
            and X.shape[0] >= X.shape[1] and 0 < X.shape[1] <= _COMPILED_QR_MAX_COLUMNS):
        qr = _dense.householder_qr(X)
        if qr is not None:
            return qr
    # an inf or nan entry too: whatever LAPACK makes of it (no error; nan in q and r)
    return numpy_qr(X)


def numpy_qr(X):
    """``numpy.linalg.qr(X)`` (reduced) of a float64 matrix, bit for bit (the twin of
    :func:`householder_qr`'s compiled path).

    The same LAPACK calls (``dgeqrf``, ``dorgqr``) through NumPy's own gufuncs, without
    the wrapper's type dispatch, which costs as much as the factorization of a
    small X.
    """
    if _umath_linalg is None or X.dtype != np.float64 or X.ndim != 2 or \
            not X.dtype.isnative:
        return np.linalg.qr(X)
    a = np.array(X, dtype=np.float64, order="C")   # a copy, overwritten by LAPACK
    mn = min(a.shape)
    if _QR_STATE is None:   # pragma: no cover
        with np.errstate(call=_raise_qr, invalid="call", over="ignore", divide="ignore",
                         under="ignore"):
            q = _qr_gufuncs(a)
    else:
        token = _extobj_contextvar.set(_QR_STATE)
        try:
            q = _qr_gufuncs(a)
        finally:
            _extobj_contextvar.reset(token)
    r = a[:mn].copy()
    for i in range(1, mn):
        r[i, :i] = 0.0   # numpy.triu
    return q, r


def _qr_gufuncs(a):
    """dgeqrf and dorgqr through NumPy's gufuncs: q, with a overwritten by R (above
    its diagonal) and the reflectors."""
    tau = _umath_linalg.qr_r_raw(a, signature="d->d")
    return _umath_linalg.qr_reduced(a, tau, signature="dd->d")


def _raise_lstsq(err, flag):
    raise np.linalg.LinAlgError("SVD did not converge in Linear Least Squares")


def least_squares(A, b):
    """``numpy.linalg.lstsq(A, b, rcond=None)[0]`` of a float64 matrix and vector, bit
    for bit: the same LAPACK call (``dgelsd``) through NumPy's gufunc, without the
    wrapper's type dispatch, which costs more than the solve of a small system.

    Parameters
    ----------
    A : (n, p) float64 ndarray, n >= 1
    b : (n,) float64 ndarray

    Returns
    -------
    (p,) ndarray
    """
    n, p = A.shape
    if (_umath_linalg is None or n == 0 or A.dtype != np.float64 or b.dtype != np.float64
            or not (A.dtype.isnative and b.dtype.isnative) or b.shape != (n,)):
        return np.linalg.lstsq(A, b, rcond=None)[0]
    # the wrapper's default rcond
    rcond = _EPS * max(n, p)
    with np.errstate(call=_raise_lstsq, invalid="call", over="ignore", divide="ignore",
                     under="ignore"):
        x = _umath_linalg.lstsq(A, b[:, None], rcond, signature="ddd->ddid")[0]
    return x[:, 0].copy()


_EPS = float(np.finfo(np.float64).eps)


def _clearly_far_from_aliased(R, absdiag):
    """True when no column can be near-aliased (see ``NEAR_ALIAS``), judged from R̃.

    X = √n Q R̃ with Q orthonormal, so the norms of R̃'s columns are those of X's over
    √n, to a few units of rounding: a ratio |R̃_jj| / ‖R̃_j‖ above twice the threshold
    settles the test on X (a pass over n rows) without making it.
    """
    p = R.shape[1]
    if R.shape[0] == p and p <= 8:
        return _rows_far_from_aliased(R.tolist(), absdiag.tolist())
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.add.reduce(R * R, axis=0))
        return bool((absdiag > 2.0 * NEAR_ALIAS * norms).all())


def _rows_far_from_aliased(rl, ad):
    """:func:`_clearly_far_from_aliased` of a square R̃ given as rows of Python floats,
    with its absolute diagonal ``ad``."""
    for j in range(len(rl)):
        norm2 = 0.0
        for i in range(j + 1):
            norm2 += rl[i][j] * rl[i][j]
        if not ad[j] > 2.0 * NEAR_ALIAS * math.sqrt(norm2):
            return False
    return True


# Up to this many columns the basis's p-by-p arithmetic runs in Python floats: on a cold
# start (every small fit in the benchmark) a few hundred float operations cost less than
# the NumPy calls they stand for; and those floats in one call of _dense.fixed_basis cost
# less still (~250 interpreted lines for cbpp's four columns)
_FLOAT_BASIS_MAX = 8

# False: the Python floats (the twin of _dense.fixed_basis; for timing and tests)
COMPILED_BASIS = True


def _upper_inverse(Rl, R):
    """R⁻¹ of an upper-triangular R (also given as rows of Python floats, ``Rl``), as
    ``_blocked.upper_solve`` gives it column by column.

    Up to ``_FLOAT_BASIS_MAX`` columns with a nonzero diagonal, the solves run in Python
    floats: the same IEEE operations in the same order, at a fraction of the calls' cost.
    """
    p = len(Rl)
    if p > _FLOAT_BASIS_MAX or any(Rl[i][i] == 0.0 for i in range(p)):
        return _upper_solve_inverse(R)
    # column j = R⁻¹ e_j from the last row up, as upper_solve's loops (built without
    # FMA, so no product is fused with its subtraction there either)
    cols = []
    for j in range(p):
        b = [0.0] * p
        b[j] = 1.0
        for i in range(p - 1, -1, -1):
            s = b[i]
            row = Rl[i]
            for k in range(i + 1, p):
                s -= row[k] * b[k]
            b[i] = s / row[i]
        cols.append(b)
    return np.array([[cols[j][i] for j in range(p)] for i in range(p)])


def _upper_solve_inverse(R):
    """R⁻¹, one ``_blocked.upper_solve`` per column."""
    r = np.ascontiguousarray(R)
    p = R.shape[1]
    cols = np.zeros((p, p))       # row j: the unit vector e_j, then R⁻¹ e_j
    for j in range(p):
        col = cols[j]
        col[j] = 1.0
        upper_solve(r, col)
    return np.ascontiguousarray(cols.T)


# Up to this many rows an intercept-only basis is remembered (a column of n doubles).
_INTERCEPT_MAX_ROWS = 20000


@functools.lru_cache(maxsize=8)
def _intercept_basis(n):
    """(X̃, R̃, R̃⁻¹, log|det R̃|) of a lone intercept column of n rows, as
    :class:`FixedEffectsBasis` computes them (read-only arrays, for copying)."""
    ones = np.ones((n, 1))
    basis = object.__new__(FixedEffectsBasis)
    basis.p = 1
    basis._from_qr(ones, householder_qr(ones), None, False)
    for a in (basis.X, basis.R, basis.Rinv):
        a.flags.writeable = False
    return basis.X, basis.R, basis.Rinv, basis.logabsdet


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

    def __init__(self, X, names=None, warn=True, qr=None, ones=False):
        # ``ones``: the caller knows X to be a column of ones (the formula's intercept
        # alone), which spares the test
        X = np.asarray(X, dtype=np.float64)
        n, p = X.shape
        self.p = p
        if p == 0:
            self.X = np.zeros((n, 0))
            self.R = np.zeros((0, 0))
            self.Rinv = np.zeros((0, 0))
            self.logabsdet = 0.0
            return
        if p == 1 and 0 < n < _INTERCEPT_MAX_ROWS and (ones or (X == 1.0).all()):
            # the intercept alone: the basis depends on n only
            X1, R, Rinv, self.logabsdet = _intercept_basis(n)
            self.X, self.R, self.Rinv = X1.copy(), R.copy(), Rinv.copy()
            return
        # ``qr``: householder_qr(X), when the caller has it already (the formula layer's
        # rank test takes it); q is ours to overwrite
        self._from_qr(X, householder_qr(X) if qr is None else qr, names, warn)

    def _from_qr(self, X, qr, names, warn):
        """Everything from X's Householder QR (``qr``, whose q is overwritten)."""
        n, p = X.shape
        q, r = qr
        scale = math.sqrt(max(n, 1))
        basis = (_dense.fixed_basis(r, q, scale, NEAR_ALIAS)
                 if COMPILED_BASIS and _dense is not None and r.shape[0] == p
                 and p <= _FLOAT_BASIS_MAX else None)
        if basis is not None:
            # the Python floats below in one compiled call, bit for bit (its twin); q is
            # now X̃
            self.R, self.Rinv, absdiag, far = basis
            self.X = q
        elif r.shape[0] == p:
            # the p-by-p arithmetic in Python floats: the same IEEE operations, in the
            # same order, as the NumPy expressions they stand for (see below)
            rl = r.tolist()
            signs = [-1.0 if rl[i][i] < 0 else 1.0 for i in range(p)]
            if p <= _FLOAT_BASIS_MAX:
                # R = (r * signs[:, None]) / scale
                Rl = [[(v * s) / scale for v in row] for row, s in zip(rl, signs)]
                self.R = np.array(Rl)
            else:
                # that expression itself: on a larger R, fewer calls than the floats
                self.R = r * np.array(signs)[:, None]
                self.R /= scale
                Rl = self.R.tolist()
            ad = [abs(Rl[i][i]) for i in range(p)]
            absdiag = np.array(ad)
            # X = q * (signs * scale), in place (C-contiguous, as householder_qr makes it)
            q *= np.array([s * scale for s in signs])
            self.X = np.ascontiguousarray(q)
            # R̃⁻¹ once, by the plain-loop solve of _blocked or its equal: LAPACK's
            # triangular solve cost milliseconds per call waking the BLAS threads on a busy
            # machine
            self.Rinv = _upper_inverse(Rl, self.R)
            far = (_rows_far_from_aliased(Rl, ad) if p <= 8
                   else _clearly_far_from_aliased(self.R, absdiag))
        else:
            signs = np.where(r.diagonal() < 0, -1.0, 1.0)
            self.X = np.ascontiguousarray(q * (signs * scale))
            self.R = (r * signs[:, None]) / scale
            absdiag = np.abs(self.R.diagonal())
            self.Rinv = _upper_solve_inverse(self.R)
            far = _clearly_far_from_aliased(self.R, absdiag)
        logs = np.log(absdiag)
        if p <= 7:
            # np.add.reduce's order for fewer than 8 entries (a plain loop from 0), in
            # Python floats: the reduction machinery, cold, costs a small fit more than
            # the sum
            self.logabsdet = sum(logs.tolist(), 0.0)
        else:
            self.logabsdet = float(np.add.reduce(logs))
        if warn and not far:
            # numpy.linalg.norm(X, axis=0), without its dispatch
            norms = np.sqrt(np.add.reduce(X * X, axis=0)) / scale
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = absdiag / norms
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
                    "rescaling those predictors would restore them", stacklevel=5)

    # numpy.linalg.lstsq's solution, bit for bit (the GLM start's IRLS, in the working
    # basis, reaches it through the model's basis)
    least_squares = staticmethod(least_squares)

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

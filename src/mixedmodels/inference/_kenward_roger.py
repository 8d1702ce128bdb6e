"""The Kenward-Roger adjusted covariance of β̂ and denominator degrees of freedom (REML).

The method is Kenward and Roger (1997) as pbkrtest implements it (Halekoh and Højsgaard
2014): the marginal covariance Σ = Var(y) is written as a linear combination of known
matrices, Σ = Σ_r γ_r G_r, with one γ per variance or covariance of a random-effects term
and one for the residual variance; the small-sample bias of Φ = (X'Σ⁻¹X)⁻¹ as an
estimate of Var(β̂), and the variance of the Wald statistic, are then expressed through
the derivatives of Σ⁻¹ along the G_r.

The parametrization matters: pbkrtest drops the second-derivative terms of Kenward and
Roger's formula, which vanish only when Σ is linear in the parameters. So the parameters
here are those of pbkrtest -- the entries of each term's covariance matrix σ²TT'
(lower triangle, or the diagonal for a ``||`` term) and σ² -- not θ. G for the (a, b)
entry of term t is Z_t (I ⊗ (E_ab + E_ba)) Z_t' (E_aa once on the diagonal), and G for σ²
is W⁻¹, the inverse precision weights (pbkrtest uses the identity there, which is the
same without weights and wrong with them).

Memory and time: no n-by-n matrix
---------------------------------
pbkrtest forms Σ⁻¹ (n by n) and n-by-n products per parameter. Here everything goes
through the Woodbury identity in the q random effects:

    V = Σ/σ² = W⁻¹ + ZΛΛ'Z',    V⁻¹ = W - WZ H Z'W,    H = Λ (Λ'AΛ + I)⁻¹ Λ',

with A = Z'WZ, B = Z'WX, E = X'WX. Then Z'V⁻¹Z = A - AHA, Z'V⁻¹X = B - AHB and every
product and trace below is a sum of blocks of these q-by-q and q-by-p matrices (see
:func:`kenward_roger_parts`). Memory is a few dense q-by-q arrays and time O(q³), so the
computation refuses models with more than ``MAX_RANDOM_EFFECTS`` random effects with a
message rather than allocate gigabytes; the number of rows does not limit it.
"""
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import stats
from scipy.linalg import cho_factor, cho_solve

__all__ = [
    "MAX_RANDOM_EFFECTS",
    "KenwardRogerParts",
    "kenward_roger_parts",
    "kr_ddf",
    "kr_f",
]

# A few dense q-by-q float64 arrays are alive at once: at q = 4000, 128 MB each.
MAX_RANDOM_EFFECTS = 4000


@dataclass(frozen=True, eq=False)
class KenwardRogerParts:
    """The pieces of pbkrtest's ``vcovAdj`` that every Kenward-Roger test uses.

    Attributes
    ----------
    vcov : ndarray, shape (p, p)
        Φ = (X'Σ̂⁻¹X)⁻¹, the unadjusted covariance of β̂ (the fit's ``vcov``).
    vcov_adjusted : ndarray, shape (p, p)
        Φ_A = Φ + 2Φ U Φ (see Notes of :func:`kenward_roger_parts`).
    P : ndarray, shape (m, p, p)
        P_r = -X'Σ⁻¹G_rΣ⁻¹X for each of the m covariance parameters.
    W : ndarray, shape (m, m)
        The asymptotic covariance of the covariance parameters, 2 I_E⁻¹.
    """

    vcov: np.ndarray
    vcov_adjusted: np.ndarray
    P: np.ndarray
    W: np.ndarray


def _parameters(model):
    """The covariance parameters as lists of (a, b) column-index pairs into u, such that
    G = Σ Z[:, a] Z[:, b]'; term by term, each term's lower triangle by columns."""
    params, offset = [], 0
    for term in model.reterms:
        k, nlev = term.ncols, term.nlevels
        cols = [offset + np.arange(nlev) * k + i for i in range(k)]   # u is level-major
        for j in range(k):
            for i in ([j] if term.zerocorr else range(j, k)):
                params.append([(cols[i], cols[i])] if i == j else
                              [(cols[i], cols[j]), (cols[j], cols[i])])
        offset += k * nlev
    return params


def kenward_roger_parts(fit):
    """Φ, the adjusted covariance Φ_A, and the P_r and W of a REML fit.

    Parameters
    ----------
    fit : LinearMixedModelFit
        Fitted by REML (as pbkrtest requires).

    Returns
    -------
    KenwardRogerParts

    Raises
    ------
    ValueError
        For an ML fit, or more than ``MAX_RANDOM_EFFECTS`` random effects.

    Notes
    -----
    With M = Σ⁻¹ and the G_r of the module docstring (pbkrtest's ``vcovAdj``):

        P_r = -X'M G_r M X,    Q_rs = X'M G_r M G_s M X,    K_rs = tr(M G_r M G_s),
        I_E[r, s] = K_rs - 2 tr(Φ Q_rs) + tr(Φ P_r Φ P_s),    W = 2 I_E⁻¹,
        U = Σ_rs W_rs (Q_rs - P_r Φ P_s),    Φ_A = Φ + 2 Φ U Φ.

    In the Woodbury form, writing S = Z'V⁻¹Z, Y = Z'V⁻¹X, T = (I - AH) Y
    (= Z'V⁻¹W⁻¹V⁻¹X) and R = (I - AH) A (I - HA) (= Z'V⁻¹W⁻¹V⁻¹Z), and Z_a for the columns
    of Z in index set a, the relative (σ² = 1) quantities are, for random-effects
    parameters r = Σ(a, b), s = Σ(c, d):

        X'V⁻¹G_rV⁻¹X = Σ Y_a'Y_b,    X'V⁻¹G_rV⁻¹G_sV⁻¹X = Σ Y_a' S_bc Y_d,
        tr(V⁻¹G_rV⁻¹G_s) = Σ sum(S_bc ∘ S_ad),

    and with the residual parameter (G = W⁻¹): X'V⁻¹W⁻¹V⁻¹X = E - 2B'HB + B'HAHB,
    X'V⁻¹G_rV⁻¹W⁻¹V⁻¹X = Σ Y_a'T_b, X'V⁻¹W⁻¹V⁻¹W⁻¹V⁻¹X = E - 2B'HB + B'HAHB - Y'HY,
    tr(V⁻¹G_rV⁻¹W⁻¹) = Σ tr(R_ba), tr((V⁻¹W⁻¹)²) = n - 2 tr(HA) + tr(HAHA). P, Q and K
    scale by σ⁻⁴, σ⁻⁶ and σ⁻⁴.
    """
    if not fit.REML:
        raise ValueError("the Kenward-Roger method is defined for REML fits (pbkrtest refits "
                         "with REML); fit the model with REML=True")
    model = fit.model
    Z = sp.csc_matrix(fit.Z)
    q = Z.shape[1]
    if q > MAX_RANDOM_EFFECTS:
        raise ValueError(
            f"the Kenward-Roger computation holds several dense {q}-by-{q} matrices (about "
            f"{5 * 8 * q * q / 1e9:.1f} GB for this model's {q} random effects); it is limited "
            f"to {MAX_RANDOM_EFFECTS} random effects. Use ddf='satterthwaite', which has no "
            "such limit")
    X = np.asarray(fit.X, dtype=float)
    n, p = X.shape
    sigma2 = float(fit.sigma) ** 2
    w = model.design.weights
    WZ = Z if w is None else sp.diags(w) @ Z
    WX = X if w is None else X * w[:, None]
    A = (Z.T @ WZ).toarray()
    B = np.asarray(Z.T @ WX)
    E = X.T @ WX
    Lam = sp.block_diag([sp.kron(sp.identity(t.nlevels), T)
                         for t, T in zip(model.reterms, fit.lambda_)], format="csc")
    LamT = Lam.T.toarray()
    # H = Λ (Λ'AΛ + I)⁻¹ Λ' through the Cholesky factor of the q-by-q system
    AL = np.asarray(Lam.T @ A).T            # AΛ (A is symmetric)
    C = LamT @ AL + np.eye(q)
    H = LamT.T @ cho_solve(cho_factor(C, lower=True), LamT)
    H = 0.5 * (H + H.T)
    AH = A @ H
    S = A - AH @ A
    Y = B - AH @ B
    HB = H @ B
    F0 = E - 2.0 * B.T @ HB + HB.T @ A @ HB
    T0 = Y - AH @ Y
    R0 = S - (S @ H) @ A           # (I - AH) A (I - HA) = S (I - HA)
    Phi = np.asarray(fit.vcov, dtype=float)

    params = _parameters(model)
    m = len(params) + 1
    Prel = np.empty((m, p, p))
    for r, pieces in enumerate(params):
        Prel[r] = sum(Y[a].T @ Y[b] for a, b in pieces)
    Prel[-1] = F0
    Qrel = np.empty((m, m, p, p))
    K = np.empty((m, m))
    for r, pr in enumerate(params):
        for s, ps in enumerate(params):
            Qrel[r, s] = sum(Y[a].T @ S[np.ix_(b, c)] @ Y[d] for a, b in pr for c, d in ps)
            K[r, s] = sum(np.sum(S[np.ix_(b, c)] * S[np.ix_(a, d)]) for a, b in pr for c, d in ps)
        Qrel[r, -1] = sum(Y[a].T @ T0[b] for a, b in pr)
        Qrel[-1, r] = Qrel[r, -1].T
        K[r, -1] = K[-1, r] = sum(np.trace(R0[np.ix_(b, a)]) for a, b in pr)
    Qrel[-1, -1] = F0 - Y.T @ H @ Y
    K[-1, -1] = n - 2.0 * np.trace(AH) + np.sum(AH * AH.T)

    P = -Prel / sigma2 ** 2
    Q = Qrel / sigma2 ** 3
    K = K / sigma2 ** 2
    PhiP = np.einsum("ij,rjk->rik", Phi, P)
    IE = (K - 2.0 * np.einsum("ij,rsji->rs", Phi, Q)
          + np.einsum("rij,sji->rs", PhiP, PhiP))
    IE = 0.5 * (IE + IE.T)
    # pbkrtest inverts I_E unless it is numerically singular, then takes the pseudo-inverse
    if np.min(np.abs(np.linalg.eigvalsh(IE))) > 1e-10:
        Wm = 2.0 * np.linalg.inv(IE)
    else:
        Wm = 2.0 * np.linalg.pinv(IE)
    Wm = 0.5 * (Wm + Wm.T)
    U = np.einsum("rs,rsij->ij", Wm, Q) - np.einsum("rs,rij,sjk->ik", Wm, P, PhiP)
    U = 0.5 * (U + U.T)
    PhiA = Phi + 2.0 * Phi @ U @ Phi
    return KenwardRogerParts(vcov=Phi, vcov_adjusted=0.5 * (PhiA + PhiA.T), P=P, W=Wm)


def _a1_a2(parts, L):
    """A1 = Σ W_rs tr(U_r) tr(U_s), A2 = Σ W_rs tr(U_r U_s), U_r = Θ Φ P_r Φ,
    Θ = L'(LΦL')⁻¹L."""
    Phi = parts.vcov
    Theta = L.T @ np.linalg.solve(L @ Phi @ L.T, L)
    Ur = np.einsum("ij,jk,rkl,lm->rim", Theta, Phi, parts.P, Phi)
    tr = np.einsum("rii->r", Ur)
    A1 = float(tr @ parts.W @ tr)
    A2 = float(np.einsum("rs,rij,sji->", parts.W, Ur, Ur))
    return A1, A2


def _ddf_and_scale(A1, A2, q):
    """pbkrtest's denominator degrees of freedom and F scaling from A1, A2 and q."""
    B = (A1 + 6.0 * A2) / (2.0 * q)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = ((q + 1) * A1 - (q + 4) * A2) / ((q + 2) * A2)
        den = 3 * q + 2 * (1 - g)
        c1, c2, c3 = g / den, (q - g) / den, (q + 2 - g) / den
        V0 = 1 + c1 * B
        V1 = 1 - c2 * B
        V2 = 1 - c3 * B
        V0 = 0.0 if abs(V0) < 1e-10 else V0
        # pbkrtest's .divZero: the ratio is 1 when both parts are below 1e-14
        x = 1 - A2 / q
        ratio = 1.0 if (abs(x) < 1e-14 and abs(V1) < 1e-14) else x / V1
        rho = ratio ** 2 * V0 / V2 / q
        df2 = 4 + (q + 2) / (q * rho - 1)
        scale = 1.0 if abs(df2 - 2) < 1e-2 else df2 * (1 - A2 / q) / (df2 - 2)
    return float(df2), float(scale)


def kr_ddf(parts, L):
    """Kenward-Roger denominator degrees of freedom of the contrasts L (pbkrtest's
    ``Lb_ddf``, which takes q as the number of rows of L).

    Parameters
    ----------
    parts : KenwardRogerParts
    L : array_like, shape (m, p) or (p,)

    Returns
    -------
    float

    Notes
    -----
    With A1, A2 as in :func:`_a1_a2` and q rows:

        B = (A1 + 6A2) / 2q,   g = ((q+1)A1 - (q+4)A2) / ((q+2)A2),
        c1, c2, c3 = g, q - g, q + 2 - g, each over 3q + 2(1 - g),
        ρ = ((1 - A2/q) / (1 - c2 B))² (1 + c1 B) / (q (1 - c3 B)),   ddf = 4 + (q+2)/(qρ - 1).
    """
    L = np.atleast_2d(np.asarray(L, dtype=float))
    A1, A2 = _a1_a2(parts, L)
    return _ddf_and_scale(A1, A2, L.shape[0])[0]


def kr_f(parts, beta, L):
    """The Kenward-Roger F test of L β = 0 (pbkrtest's ``KRmodcomp`` with a restriction
    matrix, as lmerTest's ``anova`` calls it).

    Parameters
    ----------
    parts : KenwardRogerParts
    beta : ndarray, shape (p,)
    L : array_like, shape (m, p)

    Returns
    -------
    dict
        ``F`` (scaled), ``F_unscaled``, ``scaling``, ``numdf`` (rank of L), ``dendf``, ``p``.

    Notes
    -----
    F_unscaled = (Lβ)'(L Φ_A L')⁻¹(Lβ) / q and F = λ F_unscaled with
    λ = ddf (1 - A2/q) / (ddf - 2) (1 when ddf is within 0.01 of 2). The test is invariant
    to how the rows of L are chosen within its row space.
    """
    L = np.atleast_2d(np.asarray(L, dtype=float))
    q = int(np.linalg.matrix_rank(L))
    A1, A2 = _a1_a2(parts, L)
    ddf, scale = _ddf_and_scale(A1, A2, q)
    Lb = L @ np.asarray(beta, dtype=float)
    Fu = float(Lb @ np.linalg.solve(L @ parts.vcov_adjusted @ L.T, Lb)) / q
    F = scale * Fu
    return {"F": F, "F_unscaled": Fu, "scaling": scale, "numdf": q, "dendf": ddf,
            "p": float(stats.f.sf(F, q, ddf))}

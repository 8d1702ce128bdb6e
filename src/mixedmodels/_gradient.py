"""The exact gradient of the Laplace deviance of a GLMM over (β̃, θ), by the adjoint method.

For the families without a dispersion (Bernoulli, Binomial, Poisson; the negative
binomial at a given θ_nb) the optimizer minimizes MixedModels.jl's deviance

    D(β, θ) = f(û; β, θ) + log det M(û; β, θ),
    f(u; β, θ) = Σ_i dev_i(η_i) + u'u,     η = X̃β̃ + offset + ZΛ(θ)u,
    M = Λ'Z'W(η)ZΛ + I,

with û = argmin_u f (PIRLS) and W the working weights w μ'²/V(μ) at û: the expected
(Fisher) information, as in the factor PIRLS leaves in the workspace.

Notes
-----
**The adjoint.** Because f_u(û) = 0, the change of û with a parameter p,
dû/dp = -f_uu⁻¹ f_up, enters f to first order not at all, and the log-determinant only
through its own derivative in u. With d_i = ∂dev_i/∂η_i = -2 w (y - μ) μ'/V,
W°_i = ½ ∂²dev_i/∂η_i² (the observed information: f_uu = 2 M°, M° = Λ'Z'W°ZΛ + I),
W'_i = dW_i/dη_i, the leverages h_i = (ZΛ M⁻¹ Λ'Z')_ii and g_i = h_i W'_i
(= ∂ log det M/∂η_i), one solve v = M°⁻¹ Λ'Z'g gives

    r = d + g - W° ∘ (ZΛv)
    dD/dβ̃ = X̃'r
    dD/dθ_j = r'ZΛ_j û - ½ d'ZΛ_j v + 2 tr(M⁻¹Λ'Z'WZΛ_j),       Λ_j = ∂Λ/∂θ_j.

θ_j is entry (e, a) of term t's template T_t, so ZΛ_j x = z_{i,t,e} x_{(t, l_t(i), a)} row
by row, and the trace is Σ_i W_i z_{i,t,e} c_{i,t,a} with c_{i,t} the part of
M⁻¹Λ'Z'e_i at row i's own level of term t. Both the leverages (h_i = Σ_t ζ_{i,t}·c_{i,t},
ζ_{i,t} = T_t'z_{i,t}) and the traces come from c, that is from the blocks of M⁻¹ on the
block pattern of Z'Z, and every θ component is one k_t-by-k_t accumulation over rows:

    dD/dT_t = Σ_i z_{i,t} [r_i û_{t,l(i)} - ½ d_i v_{t,l(i)} + 2 W_i c_{i,t}]'.

**Which Hessian.** f_uu = 2M° with the observed W°; the deviance's log-determinant has
the expected W. For the canonical links (logit for Bernoulli/Binomial, log for Poisson)
the two are equal, the adjoint solve reuses the factor PIRLS left, and W' is W(1 - 2μ)
(logit) or W (log). For another link (probit, cloglog, the negative binomial's log) the
deviance is still what MixedModels.jl computes, û is still the exact minimizer, and the
formulas above hold with W° ≠ W: W' = w(2μ'μ''/V - μ'³V'/V²) and the adjoint solve is
with M° (a sparse LU here: M° is not the matrix in the workspace). Were the Laplace
determinant taken with W° (as glmmTMB does, and as glmm.py does for the dispersion
families), g would need dW°/dη, which has the third derivative of the log density.

**Blocks of M⁻¹.** Term 0 (the most levels) makes the block A = M₀₀ block diagonal by
level; with M = [[A, B], [B', C]] and the columns of M⁻¹ at the other terms' indices,
[G; S⁻¹] = M⁻¹E₂ (S = C - B'A⁻¹B, G = -A⁻¹BS⁻¹; forward and backward solves with the
workspace's CHOLMOD factor, in batches of whole levels), the level blocks of M⁻¹ on term
0 are A_l⁻¹ - K_l'A_l⁻¹ with K_l = B_lG_l' = Σ_{i in l} W_i ζ_{i,0} y_i' and
y_i = Σ_{s>0} G_{l0(i),(s,l_s(i))} ζ_{i,s}. So the solves run over q - q₀ columns only
(none for a single term), and everything else is a few passes over the rows.

**Cost** (beyond the PIRLS call that puts the state at the modes): q - q₀ forward plus
backward solves with the factor, one more for the adjoint, and O(n k²) row passes.
Measured (one thread) over an L-BFGS-B run, where each objective is a warm-started
PIRLS at a new point: 0.5-1.4 times the objective's own time on contra, grouseticks and
verbagg, 2 times on contra with (1 + urban | dist), ~3 times on cbpp (56 rows: NumPy's
per-call overhead, 0.1 ms). On a binary insteval (73,421 rows, q = 4114, 1142 solve
columns) 0.6 s against 0.2 s for a warm objective. A selected inversion (Takahashi's
recurrence on L's pattern) would bring the solves to about one factorization, but needs
the factor's columns, which the CHOLMOD shim does not expose.
"""
import weakref

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ._dispersion import link_derivatives, observed_weights, variance_derivatives
from ._kernels._gradient import laplace_blockdiag_gradient
from ._linalg._densetail import DenseTailFactor

__all__ = ["laplace_gradient", "laplace_gradient_reference", "laplace_value_and_gradient"]

# Target size of one batch of M⁻¹ columns (q rows by a batch of whole levels): the work
# does not depend on it, only how it is cut up.
_BATCH_BYTES = 1 << 22


def _check_model(model, family):
    if model.has_dispersion:
        raise NotImplementedError(
            f"the {model.family.name} family has a dispersion φ: its objective is -2 log L "
            "with the observed information in the determinant, which this gradient does "
            "not cover")
    if model.nAGQ > 1:
        raise NotImplementedError("the gradient is of the Laplace deviance (nAGQ = 1); "
                                  f"this model has nAGQ = {model.nAGQ}")
    fam = model.family if family is None else family
    if fam.name == "NegativeBinomial" and not (np.isfinite(fam.param) and fam.param > 0):
        raise ValueError("the negative binomial needs its θ: pass "
                         "family=model.family.with_param(value)")
    return fam


def laplace_value_and_gradient(model, theta, beta_w, family=None):
    """The Laplace deviance of a GLMM at (β̃, θ) and its exact gradient.

    Parameters
    ----------
    model : GeneralizedLinearMixedModel
        Bernoulli, Binomial or Poisson (any link), or a negative binomial at a given θ_nb
        (``family``), with nAGQ = 1.
    theta : array_like, shape (ntheta,)
    beta_w : array_like, shape (p,)
        The fixed effects in the working basis (``model.X``).
    family : Family, optional
        The family at a trial parameter (the negative binomial's θ_nb).

    Returns
    -------
    value : float
        ``model._value(theta, beta_w)[0]`` (what ``model._joint_value`` returns).
    gradient : ndarray, shape (p + ntheta,)
        dD/d(β̃, θ), in the order of ``model._joint_value``'s argument.

    Notes
    -----
    Runs PIRLS once (warm-started from the last modes, as every objective evaluation
    is), then the adjoint of the module docstring. The model's state and workspace are
    left at the modes.
    """
    fam = _check_model(model, family)
    theta = np.asarray(theta, dtype=float)
    beta_w = np.asarray(beta_w, dtype=float)
    value, u, _ = model._value(theta, beta_w, 1.0, family=family)
    return value, _gradient_at_modes(model, theta, u, fam)


def laplace_gradient(model, theta, beta_w, family=None):
    """The exact gradient of the Laplace deviance over (β̃, θ); see
    :func:`laplace_value_and_gradient`."""
    return laplace_value_and_gradient(model, theta, beta_w, family)[1]


# -- per-row quantities --------------------------------------------------------------
def _response_side(model, fam):
    """d = ∂dev/∂η, W (expected, the factor's), W° (observed) and W' = dW/dη at the
    state PIRLS left."""
    st = model.state
    W = st.wrkwt.copy()
    d = -2.0 * W * st.wrkresid
    canonical = fam.canonical_link and fam.name in ("Bernoulli", "Binomial", "Poisson")
    if canonical:
        Wo = W
        dW = W * (1.0 - 2.0 * st.mu) if fam.link.name == "logit" else W.copy()
    else:
        Wo = observed_weights(fam, model.y, st.mu, st.eta, model.prior_w, 1.0)
        d1, d2 = link_derivatives(fam.link, st.eta, st.mu)
        v, dv = variance_derivatives(fam, st.mu)
        dW = model.prior_w * d1 * (2.0 * d2 / v - d1 * d1 * dv / (v * v))
    return d, W, Wo, dW, canonical


class _Structure:
    """What the gradient needs of the block structure, independent of θ and y: per term
    the levels of the rows, their z, the u indices of each row's level, and the rows
    sorted by level (for the batches of M⁻¹ columns). Built once per workspace."""

    def __init__(self, ws):
        pat = ws.pattern
        self.q = int(ws.q)
        self.nterm = int(pat.nterm)
        self.kk = [int(k) for k in pat.kk]
        self.nlev = [int(m) for m in pat.nlev]
        self.uoff = [int(o) for o in pat.uoff]
        self.codes = [pat.codes[t].astype(np.intp) for t in range(self.nterm)]
        self.n = self.codes[0].size
        self.z = [np.ascontiguousarray(pat.zcat[:, pat.zoff[t]:pat.zoff[t] + self.kk[t]])
                  for t in range(self.nterm)]
        # index of (row i, column a of term t) in u
        self.idx = [self.uoff[t] + self.codes[t][:, None] * self.kk[t] + np.arange(self.kk[t])
                    for t in range(self.nterm)]
        self.batches = [self._plan(s) for s in range(1, self.nterm)]

    def _plan(self, s):
        """Batches of whole levels of term s > 0: (unit rows, rows of the data, their
        columns within the batch)."""
        ks, nls, offs, q = self.kk[s], self.nlev[s], self.uoff[s], self.q
        width = max(16, _BATCH_BYTES // (8 * q))
        step = max(1, width // ks)
        order = np.argsort(self.codes[s], kind="stable")
        bounds = np.searchsorted(self.codes[s][order], np.arange(0, nls + step, step))
        plan = []
        for b, first in enumerate(range(0, nls, step)):
            m = min(step, nls - first) * ks
            sel = order[bounds[b]:bounds[b + 1]]
            cols = ((self.codes[s][sel] - first) * ks)[:, None] + np.arange(ks)
            plan.append((offs + first * ks + np.arange(m), sel, cols))
        return plan


_STRUCTURES = weakref.WeakKeyDictionary()


def _structure(ws):
    st = _STRUCTURES.get(ws)
    if st is None:
        st = _STRUCTURES[ws] = _Structure(ws)
    return st


class _Rows:
    """Row i's view of the random effects at θ: the structure and ζ_{i,t} = T_t'z_{i,t}."""

    def __init__(self, model, theta):
        s = _structure(model.workspace)
        self.s = s
        self.q, self.nterm, self.kk, self.nlev, self.uoff = s.q, s.nterm, s.kk, s.nlev, s.uoff
        self.codes, self.z, self.idx = s.codes, s.z, s.idx
        self.templates = model.layout.templates(theta)
        self.zeta = [self.z[t] * self.templates[t][0, 0] if self.kk[t] == 1
                     else self.z[t] @ self.templates[t] for t in range(self.nterm)]

    def at_levels(self, x, t):
        """x (length q) at each row's level of term t: (n, k_t)."""
        return x[self.idx[t]]

    def level_sum(self, values, t):
        """Σ over the rows of each level of term t of values (n, a, b): (nlev, a, b)."""
        n = values.shape[0]
        flat = values.reshape(n, -1)
        out = np.empty((self.nlev[t], flat.shape[1]))
        for c in range(flat.shape[1]):
            out[:, c] = np.bincount(self.codes[t], weights=flat[:, c], minlength=self.nlev[t])
        return out.reshape((self.nlev[t],) + values.shape[1:])

    def zlam_times(self, x):
        """ZΛx for x in u's coordinates: Σ_t ζ_{i,t}·x_{t,l_t(i)}."""
        return sum(np.einsum("ia,ia->i", self.zeta[t], self.at_levels(x, t))
                   for t in range(self.nterm))

    def zlam_t(self, g):
        """Λ'Z'g = Σ_i g_i ζ_i."""
        out = np.zeros(self.q)
        for t in range(self.nterm):
            k, m = self.kk[t], self.nlev[t]
            out[self.uoff[t]:self.uoff[t] + k * m] = self.level_sum(
                g[:, None] * self.zeta[t], t).ravel()
        return out

    def zlam_sparse(self):
        """ZΛ as a sparse n-by-q matrix."""
        n = self.s.n
        rows = np.concatenate([np.repeat(np.arange(n), self.kk[t]) for t in range(self.nterm)])
        cols = np.concatenate([self.idx[t].ravel() for t in range(self.nterm)])
        vals = np.concatenate([self.zeta[t].ravel() for t in range(self.nterm)])
        return sp.csr_matrix((vals, (rows, cols)), shape=(n, self.q))


def _own_coefficients(model, rows, W):
    """c_{i,t} = (M⁻¹Λ'Z'e_i) at row i's own level of each term, (n, k_t) per term, and
    the level blocks of M⁻¹ on term 0 (nlev₀, k₀, k₀).

    See the module Notes: A_l from the rows, the other terms' columns of M⁻¹ by solves
    with the workspace's factor (at the modes: PIRLS left it there).
    """
    n = rows.codes[0].size
    k0 = rows.kk[0]
    zeta0 = rows.zeta[0]
    A = rows.level_sum(W[:, None, None] * zeta0[:, :, None] * zeta0[:, None, :], 0)
    A += np.eye(k0)
    Ainv = np.linalg.inv(A)
    c = [np.zeros((n, k)) for k in rows.kk]
    if rows.nterm == 1:
        c[0] = np.einsum("iab,ib->ia", Ainv[rows.codes[0]], zeta0)
        return c, Ainv
    factor = model.workspace.factor
    y = np.zeros((n, k0))                       # y_i = G_{l0(i), ·} ζ_{i, s>0}
    tail = _dense_tail_of(model.workspace)
    if tail is not None:
        _tail_blocks(rows, tail, y, c)
    for s, plan in enumerate(rows.s.batches if tail is None else (), start=1):
        for units, sel, cols in plan:
            e = np.zeros((rows.q, units.size), order="F")
            e[units, np.arange(units.size)] = 1.0
            factor.forward(e)
            factor.backward(e)                  # e = M⁻¹[:, this batch of levels]
            if sel.size == 0:
                continue
            zs = rows.zeta[s][sel]
            # term 0's rows of these columns: G
            g_blk = e[rows.idx[0][sel][:, :, None], cols[:, None, :]]          # (nb, k0, ks)
            y[sel] += np.einsum("iab,ib->ia", g_blk, zs)
            c[s][sel] += np.einsum("iab,ia->ib", g_blk, rows.zeta[0][sel])
            for t in range(1, rows.nterm):
                s_blk = e[rows.idx[t][sel][:, :, None], cols[:, None, :]]      # (nb, kt, ks)
                c[t][sel] += np.einsum("iab,ib->ia", s_blk, zs)
    K = rows.level_sum(W[:, None, None] * zeta0[:, :, None] * y[:, None, :], 0)
    minv0 = Ainv - np.einsum("lba,lbc->lac", K, Ainv)
    minv0 = 0.5 * (minv0 + minv0.transpose(0, 2, 1))
    c[0] = np.einsum("iab,ib->ia", minv0[rows.codes[0]], zeta0) + y
    return c, minv0


# Where the dense tail replaces the solves: S⁻¹ is r-by-r in memory and r³/3 flops,
# against r solves with a factor that may be far sparser.
_REST_MAX = 2000
_TAILS = weakref.WeakKeyDictionary()


def _dense_tail_of(ws):
    """A factorized dense-tail factor of the workspace's current M: its own, or one made on
    the same values where CHOLMOD factors it (grouseticks, r = 181); None above
    ``_REST_MAX``."""
    factor = ws.factor
    if isinstance(factor, DenseTailFactor):
        return factor
    q0 = int(ws.pattern.uoff[1])
    if ws.q - q0 > _REST_MAX:
        return None
    tail = _TAILS.get(ws)
    if tail is None:
        pat = ws.pattern
        tail = _TAILS[ws] = DenseTailFactor(pat.indptr, pat.indices, ws._mx,
                                            int(pat.kk[0]), q0)
    tail.factorize()                            # the values the workspace factored last
    return tail


def _tail_blocks(rows, tail, y, c):
    """The batch loop of :func:`_own_coefficients` from the dense tail: per row, the block
    of G at its own levels (``g_blocks``) and of S⁻¹ at its pairs of levels, instead of
    M⁻¹'s columns (grouseticks: 0.7 ms for all 181 columns)."""
    q0 = int(rows.uoff[1])
    sinv = tail.tail_inverse()
    level0 = np.ascontiguousarray(rows.codes[0], dtype=np.int32)
    for s in range(1, rows.nterm):
        zs = rows.zeta[s]
        cs = rows.idx[s] - q0                   # (n, ks): tail columns of each row's level
        g_blk = tail.g_blocks(sinv, level0, np.ascontiguousarray(cs[:, 0], dtype=np.int64),
                              rows.kk[s])       # (n, k0, ks)
        y += np.einsum("iab,ib->ia", g_blk, zs)
        c[s] += np.einsum("iab,ia->ib", g_blk, rows.zeta[0])
        for t in range(1, rows.nterm):
            s_blk = sinv[(rows.idx[t] - q0)[:, :, None], cs[:, None, :]]   # (n, kt, ks)
            c[t] += np.einsum("iab,ib->ia", s_blk, zs)


def _solve_m(model, rows, minv0, rhs):
    """M⁻¹ rhs with the factor PIRLS left (level blocks for a single term)."""
    if rows.nterm == 1:
        k = rows.kk[0]
        return np.einsum("lab,lb->la", minv0, rhs.reshape(-1, k)).ravel()
    b = np.asfortranarray(rhs[:, None])
    model.workspace.factor.forward(b)
    model.workspace.factor.backward(b)
    return b[:, 0]


def _theta_gradient(model, rows, per_row):
    """dD/dθ from per term t the (n, k_t) arrays x_t: Σ_i z_{i,t} x_{i,t}' picked at
    each θ's template entry."""
    mats = [rows.z[t].T @ per_row[t] for t in range(rows.nterm)]
    return np.array([mats[t][e, a] for t, e, a in model.layout.entries])


def _gradient_at_modes(model, theta, u, fam):
    ws = model.workspace
    if ws.factor is None and _compiled_case(fam):
        return _one_term_compiled(model, ws, theta, u, fam)
    return _gradient_at_modes_numpy(model, theta, u, fam)


def _compiled_case(fam):
    return (fam.canonical_link and fam.name in ("Bernoulli", "Binomial", "Poisson")
            and fam.link.name in ("logit", "log"))


def _one_term_compiled(model, ws, theta, u, fam):
    """One term, canonical link: the kernel ``laplace_blockdiag_gradient`` (the formulas
    of the module Notes, level by level)."""
    pat, st, layout = ws.pattern, model.state, model.layout
    k = int(pat.kk[0])
    grad_beta, grad_t = np.empty(model.p), np.empty((k, k))
    laplace_blockdiag_gradient(pat.codes[0], pat.zcat, layout.lam(theta), k, st.wrkwt,
                               st.wrkresid, st.mu, fam.link.name == "logit",
                               np.ascontiguousarray(u), model.X, grad_beta, grad_t)
    return np.concatenate([grad_beta, [grad_t[e, a] for _, e, a in layout.entries]])


def _gradient_at_modes_numpy(model, theta, u, fam):
    """Every case, and the compiled one-term kernel's twin."""
    rows = _Rows(model, theta)
    d, W, Wo, dW, canonical = _response_side(model, fam)
    c, minv0 = _own_coefficients(model, rows, W)
    h = sum(np.einsum("ia,ia->i", rows.zeta[t], c[t]) for t in range(rows.nterm))
    g = h * dW
    a = rows.zlam_t(g)
    if canonical:
        v = _solve_m(model, rows, minv0, a)
    else:
        zl = rows.zlam_sparse()
        m_obs = (zl.T @ sp.diags(Wo) @ zl + sp.identity(rows.q)).tocsc()
        v = spla.splu(m_obs).solve(a)
    r = d + g - Wo * rows.zlam_times(v)
    grad_beta = model.X.T @ r
    per_row = [r[:, None] * rows.at_levels(u, t) - 0.5 * d[:, None] * rows.at_levels(v, t)
               + 2.0 * W[:, None] * c[t] for t in range(rows.nterm)]
    return np.concatenate([grad_beta, _theta_gradient(model, rows, per_row)])


# -- the plain version, for checking -------------------------------------------------
def laplace_gradient_reference(model, theta, beta_w, family=None):
    """The same gradient with sparse matrices and a dense M⁻¹ (q up to a few thousand).

    Every term written as in the module Notes with matrices: ZΛ and Λ_j as sparse
    matrices, M⁻¹ and M°⁻¹ from a sparse LU, the traces tr(M⁻¹Λ'Z'WZΛ_j) as such. For
    tests of :func:`laplace_gradient`; returns (value, gradient).
    """
    fam = _check_model(model, family)
    theta = np.asarray(theta, dtype=float)
    beta_w = np.asarray(beta_w, dtype=float)
    value, u, _ = model._value(theta, beta_w, 1.0, family=family)
    d, W, Wo, dW, _ = _response_side(model, fam)
    Z = sp.csr_matrix(model.Z)
    layout, q = model.layout, model.workspace.q
    pat = model.workspace.pattern

    def lam_matrix(templates):
        return sp.block_diag([sp.kron(sp.identity(int(m)), sp.csr_matrix(T))
                              for T, m in zip(templates, pat.nlev)], format="csr")

    Lam = lam_matrix(layout.templates(theta))
    ZL = (Z @ Lam).tocsr()
    M = (ZL.T @ sp.diags(W) @ ZL + sp.identity(q)).tocsc()
    Minv = spla.splu(M).solve(np.eye(q))
    Mo = (ZL.T @ sp.diags(Wo) @ ZL + sp.identity(q)).tocsc()
    h = np.asarray(ZL.multiply(ZL @ Minv).sum(axis=1)).ravel()   # diag(ZΛM⁻¹Λ'Z')
    g = h * dW
    v = spla.splu(Mo).solve(ZL.T @ g)
    r = d + g - Wo * (ZL @ v)
    grad = [model.X.T @ r]
    WZ = sp.diags(W) @ Z
    gt = np.empty(layout.ntheta)
    for j in range(layout.ntheta):
        unit = np.zeros(layout.ntheta)
        unit[j] = 1.0
        dLam = lam_matrix(layout.templates(unit))   # Λ is linear in θ
        ZdL = Z @ dLam
        trace = float(np.sum(Minv * (ZL.T @ (WZ @ dLam)).toarray().T))
        gt[j] = r @ (ZdL @ u) - 0.5 * d @ (ZdL @ v) + 2.0 * trace
    grad.append(gt)
    return value, np.concatenate(grad)

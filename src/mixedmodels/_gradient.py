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

**Blocks of M⁻¹.** c needs M⁻¹ only on the block pattern of Z'Z (the level pairs that
share a row), which is M's own pattern: a selected inversion of the workspace's factor
(at the modes: PIRLS left it there) gives exactly that, ``factor.selected_inverse``:
Takahashi's recurrences on the pattern of CHOLMOD's L (entry by entry for a simplicial
factor, csrc/mm_cholmod.c; supernode by supernode with BLAS, _cholmod.pyx), or on the
dense-tail factor S⁻¹ whole and per level of term 0 the blocks at the tail levels it
meets (_densetail.pyx). Each costs one to three factorizations, where the columns of
M⁻¹ at the q - q₀ indices after term 0 by solves cost q - q₀ forward and backward
solves (grouseticks' 181: 0.7 ms against 20 µs). With one term M is block diagonal and
its level blocks are inverted directly.

**Cost** (beyond the PIRLS call that puts the state at the modes): one selected
inversion, one solve with the factor for the adjoint, and two compiled passes over the
rows (``laplace_leverage_pass`` before the solve, ``laplace_residual_pass`` after; the
single-term kernel ``laplace_blockdiag_gradient`` does all of it level by level).
Measured per call (one thread, CPU time on a shared machine), against the columns of
M⁻¹ by solves and NumPy's passes before: verbagg (7,584 rows, dense tail r = 24)
0.3 ms against 0.9 ms, under half a warm PIRLS value; grouseticks with three terms (403
rows, CHOLMOD, no fill) 0.05 against 0.85 ms, half a warm value; a binary insteval
(73,421 rows, dense tail r = 1,142) 60 against 110-130 ms, of which 35 ms are LAPACK's
dense S⁻¹ (dpotri), ~1.2 warm values; the same on CHOLMOD's supernodal factor 80
against 200 ms. The non-canonical links keep NumPy's passes and a sparse LU of M° for
the adjoint.

**One term** (canonical link): the value and the gradient are one call of the compiled
PIRLS (``_glm.PirlsKernel.laplace``): Xβ + offset, PIRLS, and the gradient at the
modes on the level blocks A_l of Z'WZ the last row pass left (no pass to sum them
again), with no Python between. Its warm start is the last modes moved by their
first-order change with (β, θ), which the same call prepares (see ``_glm.pyx``): on a
fit's later calls PIRLS then takes one Newton step where it took two. contra with
(1 | urban & dist) (1,934 rows, 102 levels), at the optimum: 154 µs → 50 µs a value
and gradient, of which the gradient 10 µs (from 80: the kernel on the rows summed M_l
again, in loops written for any k); cbpp (56 rows): 38 → 9 µs, mostly the Python
around the kernels before.
"""
import weakref

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ._dispersion import link_derivatives, observed_weights, variance_derivatives
from ._pirls import STEP_TOL, row_kernel, warn_exhausted
from ._kernels._gradient import (
    laplace_blockdiag_gradient,
    laplace_leverage_pass,
    laplace_residual_pass,
)

__all__ = ["laplace_gradient", "laplace_gradient_reference", "laplace_value_and_gradient"]

_PIRLS_MAXITER = 100        # _pirls.pirls's default, which model._value runs


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
    left at the modes. One term with a canonical link: both in one compiled call
    (``_one_term_value_and_gradient``).
    """
    fam = _check_model(model, family)
    theta = np.asarray(theta, dtype=float)
    beta_w = np.asarray(beta_w, dtype=float)
    if model.workspace.factor is None and _compiled_case(fam):
        return _one_term_value_and_gradient(model, theta, beta_w, fam)
    value, u, _ = model._value(theta, beta_w, 1.0, family=family)
    return value, _gradient_at_modes(model, theta, u, fam)


def _one_term_value_and_gradient(model, theta, beta_w, fam):
    """One term, canonical link: PIRLS and the gradient in one call of the compiled
    PIRLS (``_glm.PirlsKernel.laplace``), from and to the model's warm start, as
    ``model._value`` (its twin, with ``_one_term_compiled``) runs PIRLS and leaves the
    modes and the log-determinant on the model."""
    kernel = row_kernel(model)
    u = model._u.copy()                 # a fit's record may hold the last modes' array
    grad = np.empty(beta_w.size + theta.size)
    value, logdet, _, _, _, exhausted = kernel.laplace(
        fam.code, fam.link.code, fam.param, model.prior_w, theta, beta_w, u, grad,
        1e-13, _PIRLS_MAXITER, 30, STEP_TOL)
    if exhausted:
        warn_exhausted(theta, _PIRLS_MAXITER)
    model._u = u
    model._last_logdet = 2.0 * logdet
    return value, grad


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
    the levels of the rows, their z and the u indices of each row's level, and where
    each value of Z'Z's blocks sits in M's lower CSC pattern. Built once per workspace."""

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
        self.gather = None if pat.pos is None else _block_slots(pat)


def _block_slots(pat):
    """For each value of Z'Z's blocks (the layout of ``avals``), the slot of M's lower
    CSC pattern that holds it, or its transpose above the diagonal of a diagonal block."""
    slots = np.array(pat.pos, dtype=np.intp)
    for t, k in enumerate(int(k) for k in pat.kk):
        if k == 1:
            continue
        offs = pat.blk_off[(pat.blk_diag == 1) & (pat.blk_tr == t)]
        a, d = np.triu_indices(k, 1)                # above the diagonal: (a, d), a < d
        slots[offs[:, None] + (a + d * k)] = pat.pos[offs[:, None] + (d + a * k)]
    return slots


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


def _one_term_coefficients(rows, W):
    """One term: c_i = M_l⁻¹ζ_i and the level blocks M_l⁻¹ (nlev, k, k), M_l = A_l from
    the rows."""
    k0, zeta0 = rows.kk[0], rows.zeta[0]
    A = rows.level_sum(W[:, None, None] * zeta0[:, :, None] * zeta0[:, None, :], 0)
    A += np.eye(k0)
    Ainv = np.linalg.inv(A)
    return [np.einsum("iab,ib->ia", Ainv[rows.codes[0]], zeta0)], Ainv


def _selected_inverse(ws):
    """M⁻¹ at the slots of M's lower CSC pattern, from the workspace's factor (CHOLMOD's or
    the dense tail's ``selected_inverse``: see the module Notes)."""
    out = np.empty(len(ws.pattern.indices))
    ws.factor.selected_inverse(out)
    return out


def _coefficients_from_inverse(model, rows, minv):
    """c_{i,t} = Σ_s M⁻¹[(t, l_t(i)), (s, l_s(i))] ζ_{i,s} (n, k_t) per term, from M⁻¹ at
    the slots of M's lower pattern (``minv``): the NumPy twin of the first half of
    ``laplace_leverage_pass``."""
    pat = model.workspace.pattern
    vals = minv[rows.s.gather]                 # M⁻¹ on Z'Z's blocks, the layout of avals
    n = rows.s.n
    c = [np.zeros((n, k)) for k in rows.kk]
    for p, (tr, tc) in enumerate(zip(pat.pair_tr, pat.pair_tc)):
        kr, kc = rows.kk[tr], rows.kk[tc]
        # block entry (a, d) at a + d·kr: (n, kc, kr) read, then [i, a, d]
        blk = vals[pat.rowoff[p][:, None] + np.arange(kr * kc)].reshape(n, kc, kr)
        blk = blk.transpose(0, 2, 1)
        c[tr] += np.einsum("iad,id->ia", blk, rows.zeta[tc])
        if tr != tc:
            c[tc] += np.einsum("iad,ia->id", blk, rows.zeta[tr])
    return c


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
    if not _compiled_case(fam):
        return _gradient_at_modes_numpy(model, theta, u, fam)
    if model.workspace.factor is None:
        return _one_term_compiled(model, model.workspace, theta, u, fam)
    return _multi_term_compiled(model, model.workspace, theta, u, fam)


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


def _multi_term_compiled(model, ws, theta, u, fam, minv=None):
    """Several terms, canonical link: M⁻¹ on M's pattern by the factor's selected
    inversion (or ``minv``, for tests), then the row passes of the module Notes around the
    adjoint solve."""
    pat, st, layout = ws.pattern, model.state, model.layout
    if minv is None:
        minv = _selected_inverse(ws)
    blocks = minv[_structure(ws).gather]      # M⁻¹ on Z'Z's blocks, the layout of avals
    lam = layout.lam(theta)
    g, a = np.empty(model.n), np.empty(ws.q)
    grad_t = np.empty(layout.nlam)
    laplace_leverage_pass(pat.zcat, pat.zoff, pat.kk, pat.codes, pat.uoff, pat.rowoff,
                          pat.pair_tr, pat.pair_tc, blocks, lam, layout.lam_off, st.wrkwt,
                          st.mu, fam.link.name == "logit", g, a, grad_t)
    v = np.asfortranarray(a[:, None])          # the adjoint: v = M⁻¹ Λ'Z'g
    ws.factor.forward(v)
    ws.factor.backward(v)
    r = np.empty(model.n)
    laplace_residual_pass(pat.zcat, pat.zoff, pat.kk, pat.codes, pat.uoff, lam,
                          layout.lam_off, st.wrkwt, st.wrkresid, g,
                          np.ascontiguousarray(u), v[:, 0], r, grad_t)
    return np.concatenate([model.X.T @ r, grad_t[layout.index]])


def _gradient_at_modes_numpy(model, theta, u, fam, minv=None):
    """Every case, and the compiled kernels' twin (``minv``: M⁻¹ at M's pattern, else the
    factor's selected inverse)."""
    rows = _Rows(model, theta)
    d, W, Wo, dW, canonical = _response_side(model, fam)
    if rows.nterm == 1:
        c, minv0 = _one_term_coefficients(rows, W)
    else:
        minv0 = None
        c = _coefficients_from_inverse(
            model, rows, _selected_inverse(model.workspace) if minv is None else minv)
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


# -- twins of the selected inversions --------------------------------------------------
def _takahashi_numpy(indptr, indices, data, d, perm, m_indptr, m_indices):
    """NumPy twin of CHOLMOD's ``selected_inverse``: Takahashi's recurrences on the pattern
    of the unit factor P M P' = U D U' (``SparseCholesky.unit_factor``), read at the slots
    of M's lower pattern (``m_indptr``, ``m_indices``).

    Column by column from the last, Z = (U D U')⁻¹ on U's pattern:
    Z[S_j, j] = -Z[S_j, S_j] U[S_j, j], Z_jj = 1/D_j - U[S_j, j]'Z[S_j, j], S_j the
    rows of column j below the diagonal. Dense storage, for tests.
    """
    q = len(indptr) - 1
    z = np.zeros((q, q))
    for j in range(q - 1, -1, -1):
        rows = indices[indptr[j] + 1:indptr[j + 1]]
        ucol = data[indptr[j] + 1:indptr[j + 1]]
        z[rows, j] = -z[np.ix_(rows, rows)] @ ucol
        z[j, rows] = z[rows, j]
        z[j, j] = 1.0 / d[j] - ucol @ z[rows, j]
    pinv = np.empty(q, dtype=np.intp)
    pinv[perm] = np.arange(q)
    cols = np.repeat(np.arange(q), np.diff(m_indptr))
    return z[pinv[m_indices], pinv[cols]]


def _dense_tail_selected_inverse_numpy(indptr, indices, mx, k0, q0):
    """NumPy twin of ``DenseTailFactor.selected_inverse``: the block formula of its
    docstring on the dense M (term 0's levels by Cholesky, S⁻¹ by inversion), read at the
    slots of M's lower pattern."""
    q = len(indptr) - 1
    cols = np.repeat(np.arange(q), np.diff(indptr))
    m = np.zeros((q, q))
    m[indices, cols] = mx
    m = np.tril(m) + np.tril(m, -1).T
    a, b, c = m[:q0, :q0], m[q0:, :q0], m[q0:, q0:]
    la = np.zeros_like(a)
    for lev in range(q0 // k0):
        blk = slice(lev * k0, (lev + 1) * k0)
        la[blk, blk] = np.linalg.cholesky(a[blk, blk])
    la_inv = np.linalg.inv(la)
    w = la_inv @ b.T                            # W = L_A⁻¹B'
    sinv = np.linalg.inv(c - w.T @ w)
    y = sinv @ w.T @ la_inv                     # S⁻¹W'L_A⁻¹
    minv = np.block([[la_inv.T @ (la_inv + w @ y), -y.T], [-y, sinv]])
    return minv[indices, cols]


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

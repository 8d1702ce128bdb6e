"""The exact gradient of the scalar adaptive Gauss-Hermite deviance over (β̃, θ).

For one scalar random-effects term, a Bernoulli, Binomial or Poisson family with its
canonical link and nAGQ = K nodes, _agq.py's deviance is a sum over levels j,

    D_j = -2 log s_j - 2 log Σ_k w_k exp(z_k²/2 - d_j(v_jk)/2),     v_jk = û_j + s_j z_k,
    d_j(u) = u² + Σ_{i in j} dev_i(η_i),   η_i = x̃_i β̃ + offset_i + θ z_i u,

with z_k, w_k the standard-normal Gauss-Hermite nodes and weights, z_i the term's column,
û_j the level's conditional mode (PIRLS) and s_j = 1/L_jj = M_j^{-1/2},
M_j = 1 + θ² Σ_{i in j} W_i z_i² (W the working weights at û, prior weights included:
the factor PIRLS leaves; the prior weights enter dev_i too). The nodes move with the
parameters, through û and s.

Notes
-----
**The chain rule.** D_j = G(p, û_j(p), s_j(p)). With the normalized node weights
π_jk ∝ w_k exp(z_k²/2 - d_j(v_jk)/2) and d' = ∂d_j/∂u,

    ∂G/∂p = Σ_k π_jk ∂d_j/∂p (v_jk),     A_j = ∂G/∂û = Σ_k π_jk d'(v_jk),
    B_j = ∂G/∂s = -2/s_j + Σ_k π_jk z_k d'(v_jk).

At the mode d'(û) = 0, so dû/dp = -U_p/M_j with U_p = ½ ∂²d_j/∂u∂p (for the canonical
links the observed information ½ d'' is M_j itself). M_j depends on p directly and
through û (dM/dû = θ³ T_j, T_j = Σ W'_i z_i³, W' = dW/dη: W(1 - 2μ) for the logit
link, W for the log link), and ds/dp = -½ s³ dM/dp. With C_j = -½ s_j³ B_j and
E_j = A_j + C_j θ³ T_j,

    dD_j/dp = ∂G/∂p - (E_j/M_j) U_p + C_j ∂M_j/∂p|_û.

Per parameter, with dev'_i = ∂dev_i/∂η_i = -2 w_i (y_i - μ_i) (at a node: dev'_ik):

    β̃:  ∂G = Σ_k π x̃ dev'_k,   U = θ Σ W z x̃,   ∂M = θ² Σ W' z² x̃,
          so dD/dβ̃ = X̃'r,  r_i = Σ_k π_jk dev'_ik - (E_j/M_j) θ W_i z_i + C_j θ² W'_i z_i²;
    θ:  ∂G = Σ_i z_i Σ_k π_jk v_jk dev'_ik,   U = θ û Σ W z² + ½ Σ dev'_i z_i,
          ∂M = 2θ Σ W z² + θ² û T_j.

One node (z = 0, w = 1) gives π = 1, A = 0, C = 1/M: the Laplace gradient
∂d/∂p + ∂ log M/∂p of _gradient.py.

**Cost.** Everything is per (node, row) pair or per level. The compiled
``_kernels._agq.agq_value_gradient`` forms the value as ``_kernels._agq.agq_deviance``
does (the same loops, so the same bits) and keeps dev'_ik on the way; it takes the rows
level by level, and a level's chain rule right after its nodes; then X̃'r. So an
evaluation with the gradient costs about what one without it does: PIRLS plus one pass
over the K·n pairs (contra, n = 1934, K = 9: ~0.2 ms and ~0.1 ms; the pass cost
~0.6 ms with an exp and a log1p per pair, before the level-wise loops of _agq.pyx).
Its NumPy twin, :func:`value_and_gradient_numpy`, runs the NumPy twin of the family's
``update`` over all pairs at once and the same formulas in bincounts;
``_agq_numpy.agq_value_gradient`` is the twin of the kernel's own arguments and loops.
"""
import numpy as np

from ._agq import gauss_hermite_normal, kernel_kind, level_rows
from ._kernels import _agq
from ._kernels._glm_numpy import update as update_numpy

__all__ = ["agq_gradient", "agq_value_and_gradient", "supports_agq_gradient",
           "value_and_gradient_numpy"]


def supports_agq_gradient(model, family=None):
    """Whether the exact AGQ gradient covers the model: one scalar random-effects term,
    and Bernoulli, Binomial or Poisson with its canonical link (for canonical links the
    observed information, whose inverse moves the modes, is the expected one in L)."""
    fam = model.family if family is None else family
    return (len(model.reterms) == 1 and model.reterms[0].ncols == 1 and not model.has_dispersion
            and fam.canonical_link and fam.name in ("Bernoulli", "Binomial", "Poisson"))


def _check_model(model, family):
    fam = model.family if family is None else family
    if not supports_agq_gradient(model, fam):
        raise NotImplementedError(
            "the AGQ gradient covers one scalar random-effects term with a Bernoulli, "
            "Binomial or Poisson family and its canonical link, not "
            f"{fam!r} with {len(model.reterms)} term(s)")
    return fam


def agq_value_and_gradient(model, theta, beta_w, nAGQ=None, family=None, compiled=True):
    """The AGQ deviance at (β̃, θ) and its exact gradient.

    Parameters
    ----------
    model : GeneralizedLinearMixedModel
        One scalar random-effects term; Bernoulli, Binomial or Poisson with the canonical
        link.
    theta : array_like, shape (1,)
    beta_w : array_like, shape (p,)
        The fixed effects in the working basis (``model.X``).
    nAGQ : int, optional
        Quadrature nodes (default: the model's); 1 is the Laplace approximation.
    family : Family, optional
        The model's family (accepted for symmetry with ``laplace_value_and_gradient``).
    compiled : bool, default True
        By ``_kernels._agq.agq_value_gradient``, or by its NumPy twin
        :func:`value_and_gradient_numpy`.

    Returns
    -------
    value : float
        ``model._value(theta, beta_w, 1.0, nAGQ=nAGQ)[0]`` (what ``model._joint_value``
        returns for the model's own nAGQ), formed exactly as ``agq_deviance`` forms it.
    gradient : ndarray, shape (p + 1,)
        dD/d(β̃, θ), in the order of ``model._joint_value``'s argument.

    Notes
    -----
    Runs PIRLS once (warm-started, as every objective evaluation is), then one pass over
    the nodes that gives the value and the node weights together, then the chain rule
    of the module Notes. The model's state is left at the modes.
    """
    fam = _check_model(model, family)
    nAGQ = model.nAGQ if nAGQ is None else int(nAGQ)
    theta = np.asarray(theta, dtype=float)
    beta_w = np.asarray(beta_w, dtype=float)
    # PIRLS (and the Laplace value, which costs nothing more); the quadrature below
    laplace, u, _ = model._value(theta, beta_w, 1.0, nAGQ=1, family=family)
    value, grad = _value_and_gradient_at_modes(model, theta, u, nAGQ, fam, compiled)
    return (laplace if nAGQ == 1 else value), grad


def agq_gradient(model, theta, beta_w, nAGQ=None, family=None):
    """The exact gradient of the AGQ deviance over (β̃, θ); see
    :func:`agq_value_and_gradient`."""
    return agq_value_and_gradient(model, theta, beta_w, nAGQ, family)[1]


# -- at the modes -----------------------------------------------------------------------
def _inputs(model, theta, nAGQ):
    term = model.reterms[0]
    z = np.ascontiguousarray(term.z[:, 0])
    sd = 1.0 / model.workspace.blockdiag_diagonal()
    nodes, weights = gauss_hermite_normal(nAGQ)
    return term, z, np.ascontiguousarray(z * theta[0]), sd, nodes, weights


def _value_and_gradient_at_modes(model, theta, u, nAGQ, fam, compiled=True):
    """(value, gradient) at the modes ``u`` PIRLS has just left (the model's state and
    its level-wise factor at (β̃, θ)): one pass of ``_kernels._agq.agq_value_gradient``
    for the value, θ's component and the rows r of X̃'r."""
    if not compiled:
        return value_and_gradient_numpy(model, theta, u, nAGQ, fam)
    kind = kernel_kind(fam)
    rows = level_rows(model, fam, model.prior_w)
    st = model.state
    nodes, weights = gauss_hermite_normal(nAGQ)
    r = np.empty(model.n)
    value, grad_theta = _agq.agq_value_gradient(
        kind, st.fixed, float(theta[0]), rows.z, rows.y, rows.yb, rows.w, rows.wc,
        rows.order, rows.starts, np.ascontiguousarray(u, dtype=float),
        1.0 / model.workspace.blockdiag_diagonal(), nodes, weights, rows.rowconst,
        st.wrkwt, st.mu, r)
    grad = np.empty(model.p + 1)
    np.dot(r, model.X, out=grad[:-1])
    grad[-1] = grad_theta
    return value, grad


def value_and_gradient_numpy(model, theta, u, nAGQ, family=None):
    """NumPy twin of ``_kernels._agq.agq_value_gradient`` (with X̃'r formed): the NumPy
    twin of the family's ``update`` over the K·n (node, row) pairs at once, bincounts
    per (node, level), then the chain rule of the module Notes per level and row."""
    fam = model.family if family is None else family
    term, z, zlam, s, nodes, weights = _inputs(model, theta, nAGQ)
    codes, nlev, K = term.codes, term.nlevels, nodes.size
    y, pw, st = model.y, model.prior_w, model.state
    th = float(theta[0])
    flat = (np.arange(K)[:, None] * nlev + codes[None, :]).reshape(-1)

    def per_node_level(values):
        return np.bincount(flat, weights=values.reshape(-1), minlength=K * nlev).reshape(K, nlev)

    def level_sum(values):
        return np.bincount(codes, weights=values, minlength=nlev)

    # d_j(v_jk) and dev'_ik at every node, π_jk, Σ_{i in j} dev'_ik z_i
    v = u[None, :] + nodes[:, None] * s[None, :]                 # (K, nlev)
    eta = st.fixed[None, :] + zlam[None, :] * v[:, codes]
    mu, devresid = np.empty(eta.size), np.empty(eta.size)
    update_numpy(fam.code, fam.link.code, eta.reshape(-1), np.tile(y, K), np.tile(pw, K), mu,
                 np.empty(eta.size), np.empty(eta.size), np.empty(eta.size), devresid)
    dev1 = -2.0 * pw[None, :] * (y[None, :] - mu.reshape(K, -1))
    dv = v * v + per_node_level(devresid)
    d0 = u * u + level_sum(st.devresid)
    terms = weights[:, None] * np.exp((nodes * nodes)[:, None] / 2.0 - (dv - d0) / 2.0)
    mult = terms.sum(axis=0)
    value = float(np.sum(d0) - 2.0 * (np.sum(np.log(mult)) + np.sum(np.log(s))))
    pi = terms / mult
    gz = per_node_level(dev1 * z[None, :])
    # at the modes: W, W' = dW/dη, dev'; M = 1/s²
    W = st.wrkwt
    dW = W * (1.0 - 2.0 * st.mu) if fam.link.name == "logit" else W
    dev1_0 = -2.0 * pw * (y - st.mu)
    M = 1.0 / (s * s)
    # the chain rule
    dprime = 2.0 * v + th * gz                                   # d'(v_jk)
    A = np.sum(pi * dprime, axis=0)
    B = -2.0 / s + np.sum(pi * nodes[:, None] * dprime, axis=0)
    C = -0.5 * s ** 3 * B
    Wz2 = level_sum(W * z * z)
    T = level_sum(dW * z ** 3)
    EM = (A + C * th ** 3 * T) / M
    r = (np.sum(pi[:, codes] * dev1, axis=0) - EM[codes] * th * W * z
         + C[codes] * th * th * dW * z * z)
    explicit = np.sum(pi * v * gz)
    U = th * u * Wz2 + 0.5 * level_sum(dev1_0 * z)
    dM = 2.0 * th * Wz2 + th * th * u * T
    # the deviance is even in θ: exactly 0 at θ = 0, as the kernel returns it
    grad_theta = 0.0 if th == 0.0 else explicit - np.sum(EM * U) + np.sum(C * dM)
    return value, np.concatenate([model.X.T @ r, [grad_theta]])

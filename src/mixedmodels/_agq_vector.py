"""Adaptive Gauss-Hermite quadrature for a GLMM with one vector-valued random-effects term.

With a single term of k columns on one grouping factor, the k-vectors u_l of different
levels are independent given the data, so the integral over u factors into one
k-dimensional integral per level. Each is taken by the tensor-product Gauss-Hermite rule
for the standard normal density, after the change of variables u_l = û_l + L_l⁻ᵀ z that
centres it at the conditional mode û_l and scales it by the conditional covariance
(L_l L_l' = T'A_l T + I is the level's block of the factor at the modes). For k = 1 this
is the rule of _agq.py; one node per dimension gives the Laplace approximation exactly.
"""
from functools import lru_cache

import numpy as np

from ._agq import gauss_hermite_normal
from ._kernels import _glm
from ._linalg._blocked import matvec

MAX_COLUMNS = 3
MAX_NODES = 10_000
# (node, row) pairs per batch: each work array of a batch is then 512 kB (a handful of
# them, twice that many through family.update), and a batch still holds dozens of nodes
# for a few thousand rows, which keeps the per-batch Python overhead small.
BATCH_EVALUATIONS = 1 << 16
# μ is clamped into [ε, ∞) by the Poisson kernel's deviance; for the log link that is η
# clamped at log ε. (The binary deviances under the logit link take log μ and
# log(1 - μ) from η unclamped.)
_EPS = np.finfo(np.float64).eps
_LOG_EPS = float(np.log(_EPS))


@lru_cache(maxsize=32)
def product_rule(nAGQ, k):
    """The tensor-product Gauss-Hermite rule for the k-variate standard normal density.

    Parameters
    ----------
    nAGQ : int
        Nodes per dimension.
    k : int
        Dimension.

    Returns
    -------
    nodes : (nAGQ**k, k) ndarray
        The grid, the last coordinate varying fastest (read-only).
    weights : (nAGQ**k,) ndarray
        The product weights, summing to 1 (read-only).
    centre : int or None
        Index of the node z = 0 (odd nAGQ), None when there is none (even nAGQ).

    Notes
    -----
    With z_j, w_j the nodes and weights of the one-dimensional rule for N(0, 1),
    node (j_1, ..., j_k) is z = (z_{j_1}, ..., z_{j_k}) with weight W = Π_a w_{j_a}; the
    rule integrates exactly every polynomial of degree at most 2 nAGQ - 1 in each
    coordinate against the density (2π)^{-k/2} exp(-‖z‖²/2).
    """
    z, w = gauss_hermite_normal(nAGQ)
    grids = np.meshgrid(*([z] * k), indexing="ij")
    nodes = np.stack([g.ravel() for g in grids], axis=1)
    weights = np.ones(nodes.shape[0])
    for g in np.meshgrid(*([w] * k), indexing="ij"):
        weights *= g.ravel()
    # the caller reuses the value at the modes for the centre of an odd rule, which makes
    # nAGQ = 1 the Laplace value exactly; make sure that node is 0, not a rounding of it
    centre = (nodes.shape[0] - 1) // 2 if nAGQ % 2 == 1 else None
    if centre is not None:
        nodes[centre] = 0.0
    nodes.flags.writeable = False
    weights.flags.writeable = False
    return nodes, weights, centre


def _lower_inverse(L, diag):
    """L_l⁻¹ of every lower-triangular block (nlev, k, k), by forward substitution.

    Vectorized over levels, column by column; for k <= 3 this is a handful of array
    operations, about ten times faster than a batched general inverse, and the result
    is exactly lower triangular.
    """
    k = L.shape[1]
    out = np.zeros_like(L)
    for b in range(k):
        out[:, b, b] = 1.0 / diag[:, b]
        for a in range(b + 1, k):
            s = np.einsum("lc,lc->l", L[:, a, b:a], out[:, b:a, b])
            out[:, a, b] = -s / diag[:, a]
    return out


def _level_factors(factor, nlev, k):
    """The factor as an (nlev, k, k) array of lower-triangular L_l."""
    factor = np.asarray(factor, dtype=float)
    if factor.ndim == 3:
        if factor.shape != (nlev, k, k):
            raise ValueError(f"factor has shape {factor.shape}; expected ({nlev}, {k}, {k})")
        return factor
    if factor.size < nlev * k * k:
        raise ValueError(f"factor has {factor.size} values; {nlev} levels of {k}-by-{k} "
                         f"blocks need {nlev * k * k}")
    # the workspace stores each block column-major: read C-ordered it is L_l', so
    # transpose back
    return factor.ravel()[:nlev * k * k].reshape(nlev, k, k).transpose(0, 2, 1)


class _RowDeviance:
    """Per-row deviances w_i dev(y_i, μ_i) for a batch of linear predictors.

    Parameters
    ----------
    fam : Family
    y, pw : ndarray, shape (n,)
        Response and prior weights.
    n, nb : int
        Rows, and the most nodes a batch holds (the buffers are nb-by-n).

    Notes
    -----
    The canonical pairs take a NumPy path that computes the deviance alone, in closed
    form in η, as their kernels do:

    - Bernoulli/Binomial with the logit link, with c(y) = y log y + (1 - y) log(1 - y)
      for the Binomial and 0 for the Bernoulli,
      w dev = 2w [c(y) + log1p(e^{-|η|}) + max(η, 0) - y η],
      which is -2w [y log μ + (1 - y) log(1 - μ)] + 2w c(y) with both logarithms in
      their softplus forms, unclamped, as the kernel takes them (for y = 1 and η > 0 the
      last two terms cancel exactly, leaving log1p(e^{-η}) with all its digits);
    - Poisson with the log link, w dev = 2w [y log y - y - y η + e^η], with η clamped
      at log ε, where the kernel clamps μ at ε.

    The family's kernel also computes dμ/dη, the working weights and residuals, and it
    calls libm's exp and log one element at a time, so through it this function cost
    about six times as much (9 ms against 1.6 ms for 147,000 Bernoulli rows). The two
    agree to rounding. Every other family goes through ``family.update``.
    """

    def __init__(self, fam, y, pw, n, nb):
        self.fam, self.n = fam, n
        weighted = not np.all(pw == 1.0)
        self.w = pw if weighted else None
        binary = fam.code in (_glm.FAMILY_BERNOULLI, _glm.FAMILY_BINOMIAL)
        if binary and fam.link.code == _glm.LINK_LOGIT:
            self.kind = "logit"
            self.y = y
            # the saturated part y log y + (1 - y) log(1 - y): zero for 0/1 responses,
            # and left out of the Bernoulli deviance, as the families' kernels do
            self.const = None
            if fam.code == _glm.FAMILY_BINOMIAL and np.any((y != 0.0) & (y != 1.0)):
                with np.errstate(divide="ignore", invalid="ignore"):
                    self.const = (np.where(y != 0.0, y * np.log(y), 0.0)
                                  + np.where(y != 1.0, (1.0 - y) * np.log1p(-y), 0.0))
        elif fam.code == _glm.FAMILY_POISSON and fam.link.code == _glm.LINK_LOG:
            self.kind = "log"
            self.y = y
            with np.errstate(divide="ignore", invalid="ignore"):
                self.const = np.where(y != 0.0, y * np.log(y), 0.0) - y
        else:
            self.kind = "family"
            # the kernel takes flat arrays: a batch of nb nodes is nb copies of the rows
            self.y_rep = np.tile(y, nb)
            self.pw_rep = np.tile(pw, nb)
            self.work = [np.empty(nb * n) for _ in range(4)]
        self.t = np.empty((nb, n))
        self.out = np.empty((nb, n))

    def __call__(self, eta):
        """The deviances at ``eta`` (m, n), in a buffer reused by the next call."""
        m = eta.shape[0]
        out, t = self.out[:m], self.t[:m]
        if self.kind == "logit":
            # -[y log μ + (1 - y) log(1 - μ)] = log1p(e^{-|η|}) + (max(η, 0) - y η): the
            # softplus split at η = 0, which neither overflows nor rounds μ near 1; the
            # bracket first, so that for y = 1 and η > 0 it is exactly 0
            np.maximum(eta, 0.0, out=out)
            np.multiply(eta, self.y, out=t)
            out -= t
            np.abs(eta, out=t)
            np.negative(t, out=t)
            np.exp(t, out=t)
            np.log1p(t, out=t)
            out += t
            if self.const is not None:
                out += self.const
        elif self.kind == "log":
            # y log(y/μ) - (y - μ) = (y log y - y) - y η + e^η, with μ ≥ ε as in the kernels
            np.maximum(eta, _LOG_EPS, out=t)
            np.exp(t, out=out)
            t *= self.y
            out -= t
            out += self.const
        else:
            mn = m * self.n
            self.fam.update(eta.reshape(-1), self.y_rep[:mn], self.pw_rep[:mn],
                            *[w[:mn] for w in self.work], out.reshape(-1))
            return out
        out *= 2.0
        if self.w is not None:
            out *= self.w
        return out


def agq_vector_deviance(model, theta, beta_w, u, nAGQ, family=None, prior_w=None,
                        factor=None):
    """The AGQ deviance of a model with one random-effects term of k <= 3 columns.

    Parameters
    ----------
    model : GeneralizedLinearMixedModel
        A model with a single random-effects term (the workspace's block-diagonal path).
    theta : array_like
        The covariance parameters; the term's template T is
        ``model.layout.templates(theta)[0]``.
    beta_w : array_like
        Fixed-effects coefficients in the working basis of _fixed.py (``model.X``).
    u : array_like, shape (nlevels * k,)
        The conditional modes û, level by level, the term's k columns within a level
        (as PIRLS returns them).
    nAGQ : int
        Gauss-Hermite nodes per dimension; the rule has nAGQ**k nodes.
    family : Family, optional
        The family to evaluate (default the model's; the negative binomial at a trial θ).
    prior_w : array_like, optional
        Prior weights overriding the model's (w/φ for the dispersion families).
    factor : array_like, optional
        The level-wise lower Cholesky factors L_l of T'A_l T + I at the modes: flat,
        each block column-major, as ``model.workspace.blockdiag_diagonal()`` holds them
        (the default, which PIRLS leaves at the modes), or an (nlevels, k, k) array.

    Returns
    -------
    float
        The deviance on the scale of ``_agq.agq_deviance`` (and of the Laplace value
        Σ dev_i + ‖û‖² + 2 log det L that it reduces to at nAGQ = 1).

    Raises
    ------
    ValueError
        For a model with more than one term, a term with more than three columns, an
        nAGQ that is not a positive integer, a rule of more than ``MAX_NODES`` = 10⁴
        nodes, or inputs of the wrong size.

    Notes
    -----
    For level l, with η_i = (X̃β̃ + offset)_i + z_i'T u_l for its rows and

        d_l(u_l) = ‖u_l‖² + Σ_{i in l} dev_i(η_i),

    the change of variables u_l = û_l + L_l⁻ᵀ z (Jacobian |det L_l⁻ᵀ|) and the
    tensor-product rule (z_m, W_m) for the k-variate standard normal density give

        -2 log ∫ exp(-d_l(u)/2) du/(2π)^{k/2}
            ≈ d_l(û_l) - 2 log|det L_l⁻ᵀ|
              - 2 log Σ_m W_m exp((‖z_m‖² - d_l(û_l + L_l⁻ᵀ z_m) + d_l(û_l))/2),

    and the function returns the sum over levels; -2 log|det L_l⁻ᵀ| = 2 Σ_a log (L_l)_aa.
    Since η moves along u by the row's k-vector, the node z moves η_i by r_i'z with
    r_i = L_l⁻¹T'z_i, so a batch of nodes is one (nodes × k)(k × rows) product.

    One node per dimension (z = 0, W = 1) gives the Laplace approximation exactly. For
    k = 1 the value is that of ``_agq.agq_deviance`` (s_l = 1/L_l).

    Cost. Each evaluation runs the family on nAGQ^k × n (node, row) pairs, so the cost
    grows as nAGQ^k: with k = 3, nAGQ = 9 is already 729 passes over the data, 25 is
    15,625. At about 12 ns a pair (logit, NumPy path; see ``_RowDeviance``), k = 2 with
    nAGQ = 7 on 3,000 rows takes about 2.5 ms. The rule is refused above ``MAX_NODES`` =
    10⁴ nodes (k = 2: nAGQ <= 100; k = 3: nAGQ <= 21): a fit takes hundreds of
    evaluations, and 10⁴ nodes on ten thousand rows would be about a second each, while
    after centring and scaling the integrand is close to the normal density, so so many
    nodes buy no accuracy (lme4 stops at 25 nodes for a scalar term). Memory is bounded
    by processing the nodes in batches of about ``BATCH_EVALUATIONS`` (node, row) pairs.
    """
    if len(model.reterms) != 1:
        raise ValueError(f"adaptive quadrature needs a single random-effects term; this model "
                         f"has {len(model.reterms)}. Use nAGQ=1 (Laplace).")
    term = model.reterms[0]
    zmat = np.ascontiguousarray(term.z, dtype=float)
    n, k = zmat.shape
    if k > MAX_COLUMNS:
        raise ValueError(f"adaptive quadrature supports a term of at most {MAX_COLUMNS} "
                         f"columns (the rule has nAGQ**k nodes); this term has {k}. "
                         "Use nAGQ=1 (Laplace).")
    if int(nAGQ) != nAGQ or nAGQ < 1:
        raise ValueError(f"nAGQ must be a positive integer, got {nAGQ!r}")
    nAGQ = int(nAGQ)
    if nAGQ ** k > MAX_NODES:
        raise ValueError(f"nAGQ = {nAGQ} with a {k}-column term needs nAGQ**{k} = "
                         f"{nAGQ ** k} nodes, above the limit of {MAX_NODES}: each evaluation "
                         "runs the family nodes × rows times. Use fewer nodes.")
    nlev = int(term.nlevels)
    codes = np.asarray(term.codes, dtype=np.intp)
    fam = model.family if family is None else family
    y = model.y
    pw = model.prior_w if prior_w is None else np.asarray(prior_w, dtype=float)
    U = np.asarray(u, dtype=float).reshape(-1)
    if U.size != nlev * k:
        raise ValueError(f"u has {U.size} values; {nlev} levels of {k} columns need {nlev * k}")
    U = U.reshape(nlev, k)
    T = model.layout.templates(np.asarray(theta, dtype=float))[0]
    L = _level_factors(model.workspace.blockdiag_diagonal() if factor is None else factor,
                       nlev, k)
    diag = np.diagonal(L, axis1=1, axis2=2)
    if not np.all(diag > 0.0):
        raise ValueError("the factor has a non-positive diagonal entry: not a Cholesky factor")
    linv = _lower_inverse(L, diag)

    # η at the modes, and each row's direction r_i = L_l⁻¹ T' z_i
    fixed = np.empty(n)
    matvec(model.X, np.ascontiguousarray(beta_w, dtype=float), model.offset_or_zero, fixed)
    b = U @ T.T                                     # b_l = T û_l
    eta0 = fixed + np.einsum("ia,ia->i", zmat, b[codes])
    R = np.einsum("iab,ib->ia", (linv @ T.T)[codes], zmat)
    # η at a node z is [1, z'] [η̂; R'], so one product gives a batch's η with no extra pass
    base = np.empty((k + 1, n))
    base[0] = eta0
    base[1:] = R.T

    nodes, weights, centre = product_rule(nAGQ, k)
    nb = max(1, min(len(nodes), BATCH_EVALUATIONS // max(n, 1)))
    rows = _RowDeviance(fam, y, pw, n, nb)
    # (node, level) bins of the flattened batch: level + nlev * node
    bins = (codes[None, :] + nlev * np.arange(nb)[:, None]).ravel()
    eta = np.empty((nb, n))

    def level_deviance(eta_batch):
        # Σ_{i in l} dev_i for every node of the batch and level: (m, nlev)
        m = eta_batch.shape[0]
        dev = rows(eta_batch)
        return np.bincount(bins[:m * n], weights=dev.reshape(-1),
                           minlength=m * nlev).reshape(m, nlev)

    dev0 = level_deviance(eta0[None, :])[0]
    d0 = dev0 + np.einsum("la,la->l", U, U)
    # The prior part of the exponent is a quadratic in z per level,
    #   ‖z‖² - ‖û_l + L_l⁻ᵀz‖² + ‖û_l‖² = z'(I - S_l)z - 2 a_l'z
    # with S_l = L_l⁻¹L_l⁻ᵀ and a_l = L_l⁻¹û_l, so for a batch of nodes it is one product
    # of the features [z, vec(zz')] with per-level coefficients, instead of forming
    # û_l + L_l⁻ᵀz for every (node, level).
    a = np.einsum("lab,lb->la", linv, U)
    S = linv @ linv.transpose(0, 2, 1)
    coef = np.concatenate([-2.0 * a, (np.eye(k)[None] - S).reshape(nlev, k * k)], axis=1).T
    # Σ_m W_m exp(...); the centre node's exponent is exactly 0 and reuses dev0
    mult = np.full(nlev, weights[centre] if centre is not None else 0.0)
    others = np.arange(len(nodes))
    if centre is not None:
        others = np.delete(others, centre)
    lead = np.ones((nb, k + 1))                     # [1, z'] rows of a batch
    with np.errstate(over="ignore", under="ignore"):
        for start in range(0, len(others), nb):
            idx = others[start:start + nb]
            m = len(idx)
            zb = nodes[idx]
            e = eta[:m]
            lead[:m, 1:] = zb
            np.matmul(lead[:m], base, out=e)
            dev = level_deviance(e)
            feats = np.concatenate([zb, (zb[:, :, None] * zb[:, None, :]).reshape(m, k * k)],
                                   axis=1)
            # d_l ≥ d_l(û_l) at the mode, so the exponent is at most ‖z‖²/2: no overflow
            expo = 0.5 * (feats @ coef - dev + dev0[None, :])
            mult += weights[idx] @ np.exp(expo)
    with np.errstate(divide="ignore"):
        return float(np.sum(d0) + 2.0 * np.sum(np.log(diag)) - 2.0 * np.sum(np.log(mult)))

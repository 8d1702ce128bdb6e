"""NumPy twins of the kernels in ``_kernels/_agq.pyx``, held to them by
tests/test_agq_kernels.py.

Same arguments, same semantics (the rows in level order through ``order`` and
``starts``, the prior weights as one number ``wc`` or per row, the rows' constant
deviance ``rowconst`` added once), the same formulas per (node, row) pair, without the
kernels' devices for speed: an exp and a log1p per logit pair, no product form, every
level at once in bincounts. Written for clarity, not speed.
"""
import numpy as np

KIND_LOGIT = 0
KIND_POISSON = 1

MU_EPS = np.finfo(np.float64).eps
LOG_EPS = float(np.log(MU_EPS))


def pair_deviance(kind, eta, y, yb, w):
    """(dev_i less its constant, dev'_i = -2 w (y - μ)) at the linear predictors eta."""
    with np.errstate(all="ignore"):
        if kind == KIND_LOGIT:
            ae = np.abs(eta)
            e = np.exp(-ae)
            x = np.where(eta > 0.0, yb, y)
            dev = 2.0 * w * (np.log1p(e) + np.where(x != 0.0, x * ae, 0.0))
            mu = np.clip(np.where(eta >= 0.0, 1.0, e) / (1.0 + e), MU_EPS, 1.0 - MU_EPS)
        elif kind == KIND_POISSON:
            mu = np.exp(eta)
            clamped = mu < MU_EPS
            mu = np.where(clamped, MU_EPS, mu)
            log_mu = np.where(clamped, LOG_EPS, eta)
            dev = 2.0 * w * (mu - np.where(y != 0.0, y * log_mu, 0.0))
        else:
            raise ValueError(f"unknown AGQ kernel kind {kind}")
    return dev, -2.0 * w * (y - mu)


def _levels(order, starts, n):
    nlev = len(starts) - 1
    level = np.repeat(np.arange(nlev), np.diff(starts))      # level of row p (level order)
    if level.size != n or set(np.asarray(order).tolist()) != set(range(n)):
        raise ValueError("order and starts must cover the n rows")
    return level, nlev


def _quadrature(kind, fixed, theta, z, y, yb, prior_w, wc, order, starts, u, sd, nodes,
                weights):
    """Per level: d(û), the unnormalized π (K-by-nlev), Σ dev' z at every node, and
    dev' per (node, row) (rows in level order)."""
    n = len(fixed)
    level, nlev = _levels(order, starts, n)
    f = np.asarray(fixed, dtype=float)[np.asarray(order)]
    zl = np.asarray(z) * theta
    w = np.full(n, wc) if len(prior_w) == 0 else np.asarray(prior_w, dtype=float)

    def at(v):
        dev, d1 = pair_deviance(kind, f + zl * v[level], y, yb, w)
        return (v * v + np.bincount(level, weights=dev, minlength=nlev),
                np.bincount(level, weights=d1 * z, minlength=nlev), d1)

    d0, gz0, d1_0 = at(u)
    K = len(nodes)
    terms, gz, d1 = np.empty((K, nlev)), np.empty((K, nlev)), np.empty((K, n))
    for k, (zk, wk) in enumerate(zip(nodes, weights)):
        dk, gz[k], d1[k] = (d0, gz0, d1_0) if zk == 0.0 else at(u + zk * sd)
        terms[k] = wk * np.exp((zk * zk - dk + d0) / 2.0)
    return d0, terms, gz, gz0, d1, level


def agq_deviance(kind, fixed, theta, z, y, yb, prior_w, wc, order, starts, u, sd, nodes,
                 weights, rowconst):
    """Twin of ``_kernels._agq.agq_deviance``."""
    d0, terms, _, _, _, _ = _quadrature(kind, fixed, theta, z, y, yb, prior_w, wc, order,
                                        starts, u, sd, nodes, weights)
    mult = terms.sum(axis=0)
    return float(np.sum(d0 - 2.0 * (np.log(mult) + np.log(sd))) + rowconst)


def agq_value_gradient(kind, fixed, theta, z, y, yb, prior_w, wc, order, starts, u, sd,
                       nodes, weights, rowconst, wrkwt, mu, r):
    """Twin of ``_kernels._agq.agq_value_gradient``: fills r, returns (value, dD/dθ),
    by the chain rule of _agq_gradient.py."""
    d0, terms, gz, gz0, d1, level = _quadrature(kind, fixed, theta, z, y, yb, prior_w, wc,
                                                order, starts, u, sd, nodes, weights)
    nlev = len(sd)
    mult = terms.sum(axis=0)
    value = float(np.sum(d0 - 2.0 * (np.log(mult) + np.log(sd))) + rowconst)
    pi = terms / mult
    order = np.asarray(order)
    W = np.asarray(wrkwt)[order]
    dW = W * (1.0 - 2.0 * np.asarray(mu)[order]) if kind == KIND_LOGIT else W
    z = np.asarray(z)
    s, th = np.asarray(sd), float(theta)
    v = u[None, :] + np.asarray(nodes)[:, None] * s[None, :]
    dprime = 2.0 * v + th * gz
    A = np.sum(pi * dprime, axis=0)
    B = -2.0 / s + np.sum(pi * np.asarray(nodes)[:, None] * dprime, axis=0)
    C = -0.5 * s ** 3 * B
    wz2 = np.bincount(level, weights=W * z * z, minlength=nlev)
    t3 = np.bincount(level, weights=dW * z ** 3, minlength=nlev)
    EM = (A + C * th ** 3 * t3) * s * s
    grad_theta = float(np.sum(pi * v * gz) + np.sum(-EM * (th * u * wz2 + 0.5 * gz0)
                                                     + C * (2.0 * th * wz2 + th * th * u * t3)))
    rows = (np.sum(pi[:, level] * d1, axis=0) - EM[level] * th * W * z
            + C[level] * th * th * dW * z * z)
    r[order] = rows
    # even in θ: exactly 0 at θ = 0 (as the kernel returns it)
    return value, (0.0 if th == 0.0 else grad_theta)

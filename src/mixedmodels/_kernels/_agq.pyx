# cython: language_level=3
"""Compiled kernels of the scalar adaptive Gauss-Hermite deviance and its gradient.

For one scalar random-effects term and the canonical pairs Bernoulli/Binomial-logit and
Poisson-log; the derivation is in mixedmodels/_agq.py (the value) and
mixedmodels/_agq_gradient.py (the gradient), the NumPy twin in mixedmodels/_agq_numpy.py.
Other families and links keep ``_glm.agq_deviance``.

Why these are faster than ``_glm``'s generic loops (~35 ns per (node, row) pair there;
~3-4 ns here on contra's gm1):

- Rows are taken level by level (``order``, ``starts``: the rows sorted by level, once
  per model), so a level's sums stay in registers and its rows are contiguous, and the
  level's whole quadrature (its modes, its nodes, its node weights, its part of the
  gradient) is done before the next level's.
- One loop per pair, written for it: no per-row dispatch on family and link codes.
- No logarithm per pair. Logit: the deviance 2 w [log1p(e) + x |η|] (e = exp(-|η|), x
  the weight of the outcome η makes unlikely, as in ``_glm._logit_nlogp``) sums over a
  level's rows with equal prior weights as 2 w [log Π (1 + e) + Σ x |η|]; each factor
  is in (1, 2], so a block of PROD_BLOCK rows cannot overflow, and one log per block
  replaces a log1p per row (its rounding, ~1e-16 per row in absolute terms, is that of
  the sum it replaces). Rows of unequal weights keep a log1p each. Poisson:
  2 w [y log(y/μ) - (y - μ)] is 2 w (y log y - y) + 2 w (μ - y log μ) with log μ = η
  (log eps where μ is clamped at eps).
- No exp per pair either, where a level's rows share one z (an intercept term): at
  node k the linear predictor is η̂_i + θ z s_j z_k, so exp(±η) = exp(±η̂_i) exp(±θ z
  s_j z_k), one exp per row (at the modes) and one per node (the product form,
  ``_product_form``); the rest of a pair is a handful of multiplications and one
  division (μ). Levels of a few rows, or whose |η| could overflow exp, keep an exp
  per pair.
- The parts of the deviance that do not depend on η (the Binomial's saturated
  y log y + (1-y) log(1-y), Poisson's y log y - y) cancel between the nodes; they
  enter the value once, as one constant the caller computes per model (``rowconst``).

dev'_i = ∂dev_i/∂η_i = -2 w_i (y_i - μ_i) (μ clamped, as ``_glm.update`` clamps it) is
formed at every pair in both kernels, so that the value with the gradient and the value
alone are the same arithmetic, to the bit.
"""
from libc.math cimport exp, log, log1p, fabs
from libc.float cimport DBL_EPSILON
from libc.stdlib cimport malloc, free

# which of the loops below a model takes (mixedmodels/_agq.py maps family and link to it)
KIND_LOGIT = 0      # Bernoulli or Binomial, logit link
KIND_POISSON = 1    # Poisson, log link

cdef enum:
    K_LOGIT = 0
    K_POISSON = 1

# rows per product of (1 + e) factors, each <= 2: 2^512 is far from overflow
cdef Py_ssize_t PROD_BLOCK = 512
cdef double LOG_EPS = -36.04365338911715      # log(DBL_EPSILON), Poisson's clamp
# the product form's bound on |η| (exp overflows from 709.8 on)
cdef double PRODUCT_BOUND = 700.0
# and the fewest rows a level needs for it: it costs an exp per row and one per node
# (a level of one row, an observation-level effect, would pay more than it saves)
cdef Py_ssize_t PRODUCT_MIN_ROWS = 4


cdef inline double _clamp01(double mu) noexcept nogil:
    if mu < DBL_EPSILON:
        return DBL_EPSILON
    if mu > 1.0 - DBL_EPSILON:
        return 1.0 - DBL_EPSILON
    return mu


cdef inline double _logit_uniform(Py_ssize_t m, const double *f, const double *zl, double v,
                                  const double *y, const double *yb, double wc,
                                  const double *z, double *d1, double *gz) noexcept nogil:
    # Σ_rows of one level of 2 wc [log1p(e) + x |η|] at the random effect v, as
    # 2 wc [Σ_blocks log Π (1 + e) + Σ x |η|]; d1, gz: dev' per row and Σ dev' z
    cdef Py_ssize_t i, b0 = 0, b1
    cdef double eta, ae, e, t, x, mu, d, prod, logs = 0.0, lin = 0.0, g = 0.0
    while b0 < m:
        b1 = b0 + PROD_BLOCK if b0 + PROD_BLOCK < m else m
        prod = 1.0
        for i in range(b0, b1):
            eta = f[i] + zl[i] * v
            ae = fabs(eta)
            e = exp(-ae)
            t = 1.0 + e
            prod *= t
            # the unlikely outcome's weight; a zero weight adds 0 even at |η| = inf
            x = yb[i] if eta > 0.0 else y[i]
            lin += x * ae if x != 0.0 else 0.0
            mu = _clamp01((1.0 if eta >= 0.0 else e) / t)
            d = -2.0 * wc * (y[i] - mu)
            d1[i] = d
            g += d * z[i]
        logs += log(prod)
        b0 = b1
    gz[0] = g
    return 2.0 * wc * (logs + lin)


cdef inline double _logit_weighted(Py_ssize_t m, const double *f, const double *zl, double v,
                                   const double *y, const double *yb, const double *w,
                                   const double *z, double *d1, double *gz) noexcept nogil:
    # _logit_uniform for rows of unequal prior weights: a log1p per row
    cdef Py_ssize_t i
    cdef double eta, ae, e, t, x, mu, d, s = 0.0, g = 0.0
    for i in range(m):
        eta = f[i] + zl[i] * v
        ae = fabs(eta)
        e = exp(-ae)
        t = 1.0 + e
        x = yb[i] if eta > 0.0 else y[i]
        s += w[i] * (log1p(e) + (x * ae if x != 0.0 else 0.0))
        mu = _clamp01((1.0 if eta >= 0.0 else e) / t)
        d = -2.0 * w[i] * (y[i] - mu)
        d1[i] = d
        g += d * z[i]
    gz[0] = g
    return 2.0 * s


cdef inline double _poisson(Py_ssize_t m, const double *f, const double *zl, double v,
                            const double *y, const double *w, double wc,
                            const double *z, double *d1, double *gz) noexcept nogil:
    # Σ_rows 2 w (μ - y log μ), μ = max(exp(η), eps): the Poisson deviance less its
    # constant 2 w (y log y - y)
    cdef Py_ssize_t i
    cdef double eta, mu, lm, wi, d, s = 0.0, g = 0.0
    for i in range(m):
        eta = f[i] + zl[i] * v
        mu = exp(eta)
        lm = eta
        if mu < DBL_EPSILON:
            mu = DBL_EPSILON
            lm = LOG_EPS
        wi = w[i] if w != NULL else wc
        s += wi * (mu - (y[i] * lm if y[i] != 0.0 else 0.0))
        d = -2.0 * wi * (y[i] - mu)
        d1[i] = d
        g += d * z[i]
    gz[0] = g
    return 2.0 * s


cdef inline double _logit_product(Py_ssize_t m, const double *f, const double *zl,
                                  double v, const double *A, const double *B, double G,
                                  double H, const double *y, double wc, const double *z,
                                  double *d1, double *gz) noexcept nogil:
    # _logit_uniform with exp(±η) = exp(±η̂) exp(±θ z s z_k) (A, B: the first factor per
    # row, G, H: the second per node), so with no exp per pair: e = min(exp(η), exp(-η)),
    # μ = 1/(1 + exp(-η)), and x |η| = max(η, 0) - y η (η is finite here)
    cdef Py_ssize_t i, b0 = 0, b1
    cdef double eta, E, Ei, e, t, mu, d, prod, logs = 0.0, lin = 0.0, g = 0.0
    while b0 < m:
        b1 = b0 + PROD_BLOCK if b0 + PROD_BLOCK < m else m
        prod = 1.0
        for i in range(b0, b1):
            eta = f[i] + zl[i] * v
            E = A[i] * G
            Ei = B[i] * H
            e = E if E < Ei else Ei
            t = 1.0 + e
            prod *= t
            lin += (eta if eta > 0.0 else 0.0) - y[i] * eta
            mu = _clamp01(1.0 / (1.0 + Ei))
            d = -2.0 * wc * (y[i] - mu)
            d1[i] = d
            g += d * z[i]
        logs += log(prod)
        b0 = b1
    gz[0] = g
    return 2.0 * wc * (logs + lin)


cdef inline double _poisson_product(Py_ssize_t m, const double *f, const double *zl,
                                    double v, const double *A, double G, const double *y,
                                    const double *w, double wc, const double *z, double *d1,
                                    double *gz) noexcept nogil:
    # _poisson with μ = exp(η̂) exp(θ z s z_k) (A per row, G per node)
    cdef Py_ssize_t i
    cdef double eta, mu, lm, wi, d, s = 0.0, g = 0.0
    for i in range(m):
        eta = f[i] + zl[i] * v
        mu = A[i] * G
        lm = eta
        if mu < DBL_EPSILON:
            mu = DBL_EPSILON
            lm = LOG_EPS
        wi = w[i] if w != NULL else wc
        s += wi * (mu - y[i] * lm)
        d = -2.0 * wi * (y[i] - mu)
        d1[i] = d
        g += d * z[i]
    gz[0] = g
    return 2.0 * s


cdef inline double _level_deviance_product(int kind, Py_ssize_t m, const double *f,
                                           const double *zl, double v, const double *A,
                                           const double *B, double G, double H,
                                           const double *y, const double *w, double wc,
                                           const double *z, double *d1,
                                           double *gz) noexcept nogil:
    """_level_deviance by the product form of exp(η) (see _product_form)."""
    cdef double dev
    if kind == K_LOGIT:
        dev = _logit_product(m, f, zl, v, A, B, G, H, y, wc, z, d1, gz)
    else:
        dev = _poisson_product(m, f, zl, v, A, G, y, w, wc, z, d1, gz)
    return v * v + dev


cdef inline double _level_deviance(int kind, Py_ssize_t m, const double *f, const double *zl,
                                   double v, const double *y, const double *yb,
                                   const double *w, double wc, const double *z, double *d1,
                                   double *gz) noexcept nogil:
    """d_j(v) = v² + Σ_{rows of j} dev_i (less the rows' constants) at random effect v,
    dev'_i into d1 and Σ dev'_i z_i into gz."""
    cdef double dev
    if kind == K_LOGIT:
        if w == NULL:
            dev = _logit_uniform(m, f, zl, v, y, yb, wc, z, d1, gz)
        else:
            dev = _logit_weighted(m, f, zl, v, y, yb, w, z, d1, gz)
    else:
        dev = _poisson(m, f, zl, v, y, w, wc, z, d1, gz)
    return v * v + dev


cdef struct Level:
    # one level's quadrature: the value part, and what the chain rule needs
    double devc0        # d_j(û)
    double mult         # Σ_k w_k exp((z_k² - d_j(v_k) + d_j(û))/2)
    double gz0          # Σ dev'_i(η̂) z_i


cdef bint _product_form(int kind, Py_ssize_t m, const double *f, const double *zl,
                        double u, double s, double zmax, const double *w, double *A,
                        double *B) noexcept nogil:
    """Whether the level's nodes can take exp(η) as exp(η̂) exp(θ z s z_k): the level
    has PRODUCT_MIN_ROWS rows or more and they share one z (the term's column is
    constant on it, as for an intercept), no logit row has a weight of its own, and
    |η̂| + |θ z s| max|z_k| <= PRODUCT_BOUND, so that no factor or product overflows.
    Then fills A = exp(η̂) and B = 1/A."""
    cdef Py_ssize_t i
    cdef double eta, big = 0.0
    if m < PRODUCT_MIN_ROWS or (kind == K_LOGIT and w != NULL):
        return False
    for i in range(m):
        if zl[i] != zl[0]:
            return False
        eta = fabs(f[i] + zl[i] * u)
        if eta > big:
            big = eta
    if not (big + fabs(zl[0] * s) * zmax <= PRODUCT_BOUND):
        return False            # (NaN lands here too)
    for i in range(m):
        A[i] = exp(f[i] + zl[i] * u)
        B[i] = 1.0 / A[i]
    return True


cdef Level _quadrature(int kind, Py_ssize_t m, const double *f, const double *zl, double u,
                       double s, const double[::1] nodes, const double[::1] weights,
                       double zmax, const double *y, const double *yb, const double *w,
                       double wc, const double *z, bint allowed, double *A, double *B,
                       double *d1, double *pi, double *gzk, Py_ssize_t *slot) noexcept nogil:
    """The level's deviance at its mode and at every node: π_jk unnormalized into pi,
    Σ dev'_ik z_i into gzk, dev'_ik into d1 row slot[k] (slot 0: the mode, which a node
    at 0 shares). By the product form where _product_form allows it, else with an exp
    per pair."""
    cdef Level lev
    cdef Py_ssize_t k, K = nodes.shape[0], used = 1
    cdef double zk, d, g, t, a, G
    cdef bint product = allowed and _product_form(kind, m, f, zl, u, s, zmax, w, A, B)
    a = zl[0] * s if m > 0 else 0.0
    if product:
        lev.devc0 = _level_deviance_product(kind, m, f, zl, u, A, B, 1.0, 1.0, y, w, wc, z,
                                            d1, &lev.gz0)
    else:
        lev.devc0 = _level_deviance(kind, m, f, zl, u, y, yb, w, wc, z, d1, &lev.gz0)
    lev.mult = 0.0
    for k in range(K):
        zk = nodes[k]
        if zk == 0.0:
            slot[k] = 0
            g = lev.gz0
            t = weights[k]
        else:
            slot[k] = used
            if product:
                G = exp(a * zk)
                d = _level_deviance_product(kind, m, f, zl, u + zk * s, A, B, G, 1.0 / G, y,
                                            w, wc, z, d1 + used * m, &g)
            else:
                d = _level_deviance(kind, m, f, zl, u + zk * s, y, yb, w, wc, z,
                                    d1 + used * m, &g)
            used += 1
            t = weights[k] * exp((zk * zk - d + lev.devc0) / 2.0)
        gzk[k] = g
        pi[k] = t
        lev.mult += t
    return lev


cdef int _check(int kind, Py_ssize_t n, const double[::1] fixed, const double[::1] z,
                const double[::1] y, const double[::1] yb, const double[::1] prior_w,
                const int[::1] order, const int[::1] starts, const double[::1] u,
                const double[::1] sd, const double[::1] nodes,
                const double[::1] weights) except -1:
    # everything the loops index, so that no input reaches C out of bounds
    cdef Py_ssize_t nlev = u.shape[0], j, i
    if kind != K_LOGIT and kind != K_POISSON:
        raise ValueError(f"unknown AGQ kernel kind {kind}")
    if (fixed.shape[0] != n or z.shape[0] != n or y.shape[0] != n or yb.shape[0] != n
            or order.shape[0] != n or (prior_w.shape[0] != 0 and prior_w.shape[0] != n)):
        raise ValueError("AGQ kernel: per-observation arrays differ in length")
    if sd.shape[0] != nlev or starts.shape[0] != nlev + 1 or weights.shape[0] != nodes.shape[0]:
        raise ValueError("AGQ kernel: per-level arrays differ in length")
    if starts[0] != 0 or starts[nlev] != n:
        raise ValueError("AGQ kernel: starts must run from 0 to n")
    for j in range(nlev):
        if starts[j + 1] < starts[j]:
            raise ValueError("AGQ kernel: starts must not decrease")
    for i in range(n):
        if order[i] < 0 or order[i] >= n:
            raise ValueError("AGQ kernel: order holds a row out of range")
    return 0


cdef class _Buffers:
    # per call: the level's gathered Xβ + offset and θz, dev' at the mode and every node,
    # and per node π, Σ dev' z and the d1 row it uses
    cdef double *mem
    cdef double *f
    cdef double *zl
    cdef double *A
    cdef double *B
    cdef double *d1
    cdef double *pi
    cdef double *gzk
    cdef Py_ssize_t *slot

    def __cinit__(self, Py_ssize_t mmax, Py_ssize_t K):
        self.mem = <double *> malloc(((K + 5) * mmax + 2 * K + 1) * sizeof(double))
        self.slot = <Py_ssize_t *> malloc((K + 1) * sizeof(Py_ssize_t))
        if self.mem == NULL or self.slot == NULL:
            raise MemoryError()
        self.f = self.mem
        self.zl = self.f + mmax
        self.A = self.zl + mmax
        self.B = self.A + mmax
        self.pi = self.B + mmax
        self.gzk = self.pi + K
        self.d1 = self.gzk + K

    def __dealloc__(self):
        free(self.mem)
        free(self.slot)


cdef Py_ssize_t _largest_level(const int[::1] starts) noexcept nogil:
    cdef Py_ssize_t j, mmax = 0
    for j in range(starts.shape[0] - 1):
        if starts[j + 1] - starts[j] > mmax:
            mmax = starts[j + 1] - starts[j]
    return mmax


cdef inline void _gather(Py_ssize_t a, Py_ssize_t m, const int[::1] order,
                         const double[::1] fixed, const double[::1] z, double theta,
                         double *f, double *zl) noexcept nogil:
    # the level's Xβ + offset and θ z (z already in level order)
    cdef Py_ssize_t p
    for p in range(m):
        f[p] = fixed[order[a + p]]
        zl[p] = z[a + p] * theta


def agq_deviance(int kind, const double[::1] fixed, double theta, const double[::1] z,
                 const double[::1] y, const double[::1] yb, const double[::1] prior_w,
                 double wc, const int[::1] order, const int[::1] starts,
                 const double[::1] u, const double[::1] sd, const double[::1] nodes,
                 const double[::1] weights, double rowconst, bint product=True):
    """The AGQ deviance Σ_j [d_j(û) - 2 log s_j - 2 log Σ_k w_k exp((z_k² - d_j(v_jk)
    + d_j(û))/2)] + rowconst.

    Parameters
    ----------
    kind : KIND_LOGIT or KIND_POISSON
    fixed : Xβ + offset, in the rows' own order.
    theta : λ, the term's scale; the linear predictor of row i at random effect v of
        its level is fixed_i + θ z_i v.
    z, y, yb, prior_w : the term's column, the response, 1 - y and the prior weights,
        in level order (row p of them is row order[p] of fixed). prior_w empty: every
        row has weight ``wc``.
    order, starts : the rows sorted by level, and where each level starts in that order
        (length nlevels + 1).
    u, sd : the modes û_j and the scales s_j = 1/L_jj.
    nodes, weights : the Gauss-Hermite rule for N(0, 1).
    rowconst : Σ of the rows' deviance parts that do not depend on η (see the module
        docstring), added once.
    product : bool
        Whether levels may take the product form (``_product_form``; False: an exp per
        pair everywhere; the tests hold the two together).
    """
    value, _ = _run(kind, fixed, theta, z, y, yb, prior_w, wc, order, starts, u, sd,
                    nodes, weights, rowconst, None, None, None, product)
    return value


def agq_value_gradient(int kind, const double[::1] fixed, double theta, const double[::1] z,
                       const double[::1] y, const double[::1] yb, const double[::1] prior_w,
                       double wc, const int[::1] order, const int[::1] starts,
                       const double[::1] u, const double[::1] sd, const double[::1] nodes,
                       const double[::1] weights, double rowconst,
                       const double[::1] wrkwt, const double[::1] mu, double[::1] r,
                       bint product=True):
    """``agq_deviance`` and its gradient over (β̃, θ), at the modes PIRLS has left.

    The arguments of ``agq_deviance``, and the working weights W and means μ at the
    modes (PIRLS's state, in the rows' own order). Fills r (rows' own order) with the
    row weights of the β̃ gradient, dD/dβ̃ = X̃'r, and returns (value, dD/dθ); the value
    is ``agq_deviance``'s to the bit. The chain rule is that of _agq_gradient.py.
    """
    return _run(kind, fixed, theta, z, y, yb, prior_w, wc, order, starts, u, sd, nodes,
                weights, rowconst, wrkwt, mu, r, product)


cdef _run(int kind, const double[::1] fixed, double theta, const double[::1] z,
          const double[::1] y, const double[::1] yb, const double[::1] prior_w, double wc,
          const int[::1] order, const int[::1] starts, const double[::1] u,
          const double[::1] sd, const double[::1] nodes, const double[::1] weights,
          double rowconst, const double[::1] wrkwt, const double[::1] mu, double[::1] r,
          bint product):
    cdef Py_ssize_t n = fixed.shape[0], nlev = u.shape[0], K = nodes.shape[0]
    cdef Py_ssize_t j, k, p, a, m, i
    cdef bint grad = r is not None
    cdef const double *w = NULL
    cdef double total = 0.0, gtheta = 0.0, s, v, dp, ca, cb, B, C, EM, wz2, t3, Wi, dWi
    cdef double zi, t
    cdef Level lev
    _check(kind, n, fixed, z, y, yb, prior_w, order, starts, u, sd, nodes, weights)
    if grad and (wrkwt is None or mu is None or wrkwt.shape[0] != n or mu.shape[0] != n
                 or r.shape[0] != n):
        raise ValueError("AGQ kernel: wrkwt, mu and r must have the length of fixed")
    if prior_w.shape[0] > 0:
        w = &prior_w[0]
    if n == 0:
        return rowconst, 0.0
    cdef _Buffers buf = _Buffers(_largest_level(starts), K)
    cdef double *f = buf.f
    cdef double *zl = buf.zl
    cdef double *acc = buf.f        # (the level's Xβ + offset is spent by then)
    cdef double *row
    cdef double *expf = buf.A
    cdef double *expb = buf.B
    cdef double zmax = 0.0
    cdef double *d1 = buf.d1
    cdef double *pi = buf.pi
    cdef double *gzk = buf.gzk
    cdef Py_ssize_t *slot = buf.slot
    with nogil:
        for k in range(K):
            if fabs(nodes[k]) > zmax:
                zmax = fabs(nodes[k])
        for j in range(nlev):
            a = starts[j]
            m = starts[j + 1] - a
            s = sd[j]
            _gather(a, m, order, fixed, z, theta, f, zl)
            lev = _quadrature(kind, m, f, zl, u[j], s, nodes, weights, zmax, &y[a], &yb[a],
                              w + a if w != NULL else NULL, wc, &z[a], product, expf, expb,
                              d1, pi, gzk, slot)
            total += lev.devc0 - 2.0 * (log(lev.mult) + log(s))
            if not grad:
                continue
            # the chain rule (_agq_gradient.py): with d'(v) = 2v + θ gz,
            # A = Σ π d'(v), B = -2/s + Σ π z d'(v), C = -s³B/2, E/M = (A + C θ³ T) s²
            ca = 0.0
            cb = 0.0
            for k in range(K):
                pi[k] /= lev.mult
                v = u[j] + nodes[k] * s
                dp = 2.0 * v + theta * gzk[k]
                ca += pi[k] * dp
                cb += pi[k] * nodes[k] * dp
                gtheta += pi[k] * v * gzk[k]
            # Σ W z² and T = Σ W' z³ at the modes, W' = dW/dη
            wz2 = 0.0
            t3 = 0.0
            for p in range(m):
                i = order[a + p]
                zi = z[a + p]
                Wi = wrkwt[i]
                dWi = Wi * (1.0 - 2.0 * mu[i]) if kind == K_LOGIT else Wi
                wz2 += Wi * zi * zi
                t3 += dWi * zi * zi * zi
            B = cb - 2.0 / s
            C = -0.5 * s * s * s * B
            EM = (ca + C * theta * theta * theta * t3) * s * s
            gtheta += (-EM * (theta * u[j] * wz2 + 0.5 * lev.gz0)
                       + C * (2.0 * theta * wz2 + theta * theta * u[j] * t3))
            ca = -EM * theta
            cb = C * theta * theta
            # Σ_k π_k dev'_ik, node by node (independent rows: no chain of adds per row)
            for p in range(m):
                acc[p] = 0.0
            for k in range(K):
                t = pi[k]
                row = d1 + slot[k] * m
                for p in range(m):
                    acc[p] += t * row[p]
            for p in range(m):
                i = order[a + p]
                zi = z[a + p]
                Wi = wrkwt[i]
                dWi = Wi * (1.0 - 2.0 * mu[i]) if kind == K_LOGIT else Wi
                r[i] = acc[p] + (ca * Wi + cb * dWi * zi) * zi
    if theta == 0.0:
        # the deviance is even in θ (u -> -u), so this is 0 exactly; the sum above
        # leaves its rounding (~1e-14), whose sign would decide whether a search
        # leaves the bound (glmm.py's _leave_the_bound counts on the exact 0)
        gtheta = 0.0
    return total + rowconst, gtheta

# cython: language_level=3
"""Compiled passes of the Laplace GLMM gradients (the LMM's are in _lmm_gradient.pyx).

The general gradients are NumPy (_gradient.py); with a single term M = Λ'Z'WZΛ + I is
block diagonal, everything is a k-by-k computation per level or per row, and on small
models NumPy's per-call overhead was most of the cost (cbpp's Laplace gradient ~3 times
its objective). These kernels are those computations in loops. Their NumPy twins are the
general code restricted to one term; tests/test_gradient.py holds them together.

Blocks are column-major k-by-k, as in _blocked.pyx: entry (e, a) at e + a·k.
"""
from libc.stdlib cimport malloc, free
from libc.math cimport sqrt

from mixedmodels._linalg._blocked cimport inverse_from_lower


cdef int _inverse_spd(double *m, int k, double *work) noexcept nogil:
    """In place m <- m⁻¹ for a symmetric positive definite k-by-k m; 1 if not PD."""
    cdef int a, c, e
    cdef double s
    cdef double *lo = work              # Cholesky factor, then its inverse
    cdef double *li = work + k * k
    for c in range(k):
        for e in range(k):
            lo[e + c * k] = 0.0
    for c in range(k):
        s = m[c + c * k]
        for a in range(c):
            s -= lo[c + a * k] * lo[c + a * k]
        if s <= 0.0:
            return 1
        lo[c + c * k] = sqrt(s)
        for e in range(c + 1, k):
            s = m[e + c * k]
            for a in range(c):
                s -= lo[e + a * k] * lo[c + a * k]
            lo[e + c * k] = s / lo[c + c * k]
    inverse_from_lower(lo, k, li, m)
    return 0


# -- Laplace GLMMs with one term, canonical links (see _gradient.py) -------------------
#
# With one term M = Λ'Z'WZΛ + I is block diagonal: level l's block M_l = T'A_l T + I,
# A_l = Σ_{i in l} W_i z_i z_i' (the workspace's ``avals`` at the modes, which the
# compiled PIRLS leaves there), so M_l⁻¹ is a k-by-k inverse per level and the
# gradient two passes over the rows (the leverages and Λ'Z'g, then the residuals and
# the traces) and X'r. Rows of one level usually come together (data sorted by the
# grouping factor): the per-level sum of the first pass is kept in a register while
# the level repeats, not stored through a pointer per row.

cdef Py_ssize_t blockdiag_work_size(Py_ssize_t n, Py_ssize_t nlev, int k) noexcept nogil:
    """Doubles of scratch ``blockdiag_laplace_gradient_c`` needs."""
    return nlev * k * k + nlev * k + 2 * n + 3 * k * k + 4 * k


cdef int blockdiag_laplace_gradient_c(const OneTerm *ot, const double *lam,
                                      const double *avals, const double *u,
                                      double *grad_beta, double *grad_t,
                                      double *work) noexcept nogil:
    """The gradient of the Laplace deviance of a one-term GLMM (canonical link) at the
    modes u, from the level blocks A_l of Z'WZ there (``avals``, level l's k-by-k block
    at l·k², column-major) and the state PIRLS left (W, ρ, μ in ``ot``). With the
    notation of _gradient.py's Notes, per row i of level l (ζ_i = T'z_i, d_i = -2W_iρ_i):

        c_i = M_l⁻¹ζ_i,  g_i = (ζ_i'c_i) W'_i,  v_l = M_l⁻¹ Σ_{i in l} g_i ζ_i,
        r_i = d_i + g_i - W_i ζ_i'v_l,
        grad_beta = X'r,   grad_t[e + a·k] = Σ_i z_ie (r_i u_la - ½ d_i v_la + 2 W_i c_ia).

    ``lam`` is the template T (column-major, lower triangular), ``work`` holds
    ``blockdiag_work_size`` doubles. Returns 1 (nothing written) if some M_l is not
    positive definite. Levels are not checked here: the callers do (0 <= codes < nlev).
    """
    cdef Py_ssize_t n = ot.n, nlev = ot.nlev
    cdef int k = ot.k
    cdef double *minv = work
    cdef double *v = minv + nlev * k * k
    cdef double *g = v + nlev * k
    cdef double *r = g + n
    cdef double *scratch = r + n
    if _level_inverses(avals, lam, k, nlev, minv, scratch):
        return 1
    if k == 1:
        _scalar_term_passes(ot, lam[0], minv, u, v, g, r, grad_t)
    else:
        _vector_term_passes(ot, lam, minv, u, v, g, r, grad_t, scratch)
    _xt_times(ot.x, n, ot.p, r, grad_beta)
    return 0


cdef int _level_inverses(const double *avals, const double *lam, int k, Py_ssize_t nlev,
                         double *minv, double *scratch) noexcept nogil:
    """minv_l = (T'A_l T + I)⁻¹ per level; 1 if one is not positive definite."""
    cdef Py_ssize_t l
    cdef int a, c, e
    cdef double s, m
    cdef double *at = scratch                   # A_l T
    cdef double *blk
    cdef const double *A
    if k == 1:
        for l in range(nlev):
            m = lam[0] * avals[l] * lam[0] + 1.0
            if not m > 0.0:
                return 1
            minv[l] = 1.0 / m
        return 0
    for l in range(nlev):
        A = avals + l * k * k
        blk = minv + l * k * k
        for c in range(k):
            for e in range(k):
                s = 0.0
                for a in range(c, k):
                    s += A[e + a * k] * lam[a + c * k]
                at[e + c * k] = s
        for c in range(k):
            for e in range(k):
                s = 1.0 if e == c else 0.0
                for a in range(e, k):
                    s += lam[a + e * k] * at[a + c * k]
                blk[e + c * k] = s
        if _inverse_spd(blk, k, scratch + k * k):
            return 1
    return 0


cdef void _scalar_term_passes(const OneTerm *ot, double lam, const double *minv,
                              const double *u, double *v, double *g, double *r,
                              double *grad_t) noexcept nogil:
    # k = 1: ζ_i = λz_i, c_i = m_l ζ_i, h_i = m_l ζ_i²
    cdef Py_ssize_t n = ot.n, i, l, cur = -1
    cdef Py_ssize_t zs = ot.zstride
    cdef const int *codes = ot.codes
    cdef const double *z = ot.z
    cdef const double *wt = ot.wrkwt
    cdef const double *rho = ot.wrkresid
    cdef const double *mu = ot.mu
    cdef bint logit = ot.logit
    cdef double zeta, w, gi, acc = 0.0, vl, d, ri, gt = 0.0, zi
    for l in range(ot.nlev):
        v[l] = 0.0
    for i in range(n):                      # g_i, and Σ_{i in l} g_i ζ_i into v_l
        l = codes[i]
        zeta = lam * z[i * zs]
        w = wt[i]
        gi = zeta * zeta * minv[l] * (w * (1.0 - 2.0 * mu[i]) if logit else w)
        g[i] = gi
        if l != cur:
            if cur >= 0:
                v[cur] = acc
            cur = l
            acc = v[l]
        acc += gi * zeta
    if cur >= 0:
        v[cur] = acc
    for l in range(ot.nlev):                # v_l = M_l⁻¹ (Λ'Z'g)_l
        v[l] = minv[l] * v[l]
    for i in range(n):
        l = codes[i]
        zi = z[i * zs]
        zeta = lam * zi
        w = wt[i]
        d = -2.0 * w * rho[i]
        vl = v[l]
        ri = d + g[i] - w * zeta * vl
        r[i] = ri
        gt += zi * (ri * u[l] - 0.5 * d * vl + 2.0 * w * minv[l] * zeta)
    grad_t[0] = gt


cdef void _vector_term_passes(const OneTerm *ot, const double *lam, const double *minv,
                              const double *u, double *v, double *g, double *r,
                              double *grad_t, double *scratch) noexcept nogil:
    cdef Py_ssize_t n = ot.n, i, l
    cdef int k = ot.k, a, e
    cdef const double *zi
    cdef const double *blk
    cdef double *zeta = scratch
    cdef double *c = scratch + k
    cdef double *tmp = scratch + 2 * k
    cdef double w, gi, d, zv, ri, s
    for l in range(ot.nlev * k):
        v[l] = 0.0
    for a in range(k * k):
        grad_t[a] = 0.0
    for i in range(n):                      # g_i, and Σ_{i in l} g_i ζ_i into v_l
        l = ot.codes[i]
        _zeta(ot.z + i * ot.zstride, lam, k, zeta)
        w = ot.wrkwt[i]
        gi = _quad(minv + l * k * k, zeta, k, c) * (
            w * (1.0 - 2.0 * ot.mu[i]) if ot.logit else w)
        g[i] = gi
        for a in range(k):
            v[l * k + a] += gi * zeta[a]
    for l in range(ot.nlev):                # v_l = M_l⁻¹ (Λ'Z'g)_l
        blk = minv + l * k * k
        for a in range(k):
            s = 0.0
            for e in range(k):
                s += blk[a + e * k] * v[l * k + e]
            tmp[a] = s
        for a in range(k):
            v[l * k + a] = tmp[a]
    for i in range(n):
        l = ot.codes[i]
        zi = ot.z + i * ot.zstride
        _zeta(zi, lam, k, zeta)
        _quad(minv + l * k * k, zeta, k, c)
        w = ot.wrkwt[i]
        d = -2.0 * w * ot.wrkresid[i]
        zv = 0.0
        for a in range(k):
            zv += zeta[a] * v[l * k + a]
        ri = d + g[i] - w * zv
        r[i] = ri
        for a in range(k):
            tmp[a] = ri * u[l * k + a] - 0.5 * d * v[l * k + a] + 2.0 * w * c[a]
        for a in range(k):
            for e in range(k):
                grad_t[e + a * k] += zi[e] * tmp[a]


cdef void _xt_times(const double *x, Py_ssize_t n, Py_ssize_t p, const double *r,
                    double *out) noexcept nogil:
    """out = X'r for a row-major n-by-p X, four rows at a time (four products per
    store of out[j] rather than one: the sums over j are independent and vectorize)."""
    cdef Py_ssize_t i = 0, j
    cdef const double *x0
    cdef double r0, r1, r2, r3
    for j in range(p):
        out[j] = 0.0
    while i + 4 <= n:
        x0 = x + i * p
        r0, r1, r2, r3 = r[i], r[i + 1], r[i + 2], r[i + 3]
        for j in range(p):
            out[j] += (r0 * x0[j] + r1 * x0[p + j]) + (r2 * x0[2 * p + j] + r3 * x0[3 * p + j])
        i += 4
    while i < n:
        x0 = x + i * p
        for j in range(p):
            out[j] += r[i] * x0[j]
        i += 1


def laplace_blockdiag_gradient(const int[::1] codes, const double[:, ::1] z,
                               const double[::1] lam, int k, const double[::1] wrkwt,
                               const double[::1] wrkresid, const double[::1] mu, bint logit,
                               const double[::1] u, const double[:, ::1] x,
                               double[::1] grad_beta, double[:, ::1] grad_t):
    """The exact gradient of the Laplace deviance of a one-term GLMM with a canonical link,
    at the modes PIRLS left (the notation of _gradient.py's Notes), with the level blocks
    A_l = Σ_{i in l} W_i z_i z_i' summed here from the rows (the compiled PIRLS reads
    them from the workspace instead: ``blockdiag_laplace_gradient_c``).

    Per row i of level l, with ζ_i = T'z_i, W_i the working weight, d_i = -2 W_i ρ_i (ρ the
    working residual), W'_i = W_i(1 - 2μ_i) (logit) or W_i (log):
        M_l = Σ_i W_i ζ_iζ_i' + I,   c_i = M_l⁻¹ζ_i,   h_i = ζ_i'c_i,   g_i = h_i W'_i,
        v_l = M_l⁻¹ Σ_i g_i ζ_i,     r_i = d_i + g_i - W_i ζ_i'v_l,
        grad_beta = Σ_i r_i x_i,     grad_t[e, a] = Σ_i z_ie (r_i u_la - ½ d_i v_la + 2 W_i c_ia).
    Writes grad_beta (p) and grad_t (k-by-k, [e, a]). NumPy twin: _gradient._gradient_at_modes.
    Raises ValueError if some M_l is not positive definite or the arrays do not fit.
    """
    cdef Py_ssize_t n = codes.shape[0], i, l, nlev
    cdef int a, e
    cdef OneTerm ot
    cdef double w
    if k < 1 or u.shape[0] % k != 0 or z.shape[1] < k or lam.shape[0] < k * k:
        raise ValueError("laplace_blockdiag_gradient: inconsistent term sizes")
    nlev = u.shape[0] // k
    if (z.shape[0] != n or wrkwt.shape[0] != n or wrkresid.shape[0] != n
            or mu.shape[0] != n or x.shape[0] != n or grad_beta.shape[0] != x.shape[1]
            or grad_t.shape[0] != k or grad_t.shape[1] != k or n == 0 or nlev == 0):
        raise ValueError("laplace_blockdiag_gradient: the arrays differ in length")
    for i in range(n):
        if codes[i] < 0 or codes[i] >= nlev:
            raise ValueError(f"laplace_blockdiag_gradient: a level code is outside 0..{nlev - 1}")
    ot.n, ot.nlev, ot.p, ot.zstride, ot.k = n, nlev, x.shape[1], z.shape[1], k
    ot.codes = &codes[0]
    ot.z = &z[0, 0]
    ot.x = &x[0, 0] if x.shape[1] > 0 else NULL
    ot.wrkwt, ot.wrkresid, ot.mu, ot.logit = &wrkwt[0], &wrkresid[0], &mu[0], logit
    cdef double *avals = <double *> malloc((nlev * k * k + k * k
                                           + blockdiag_work_size(n, nlev, k)) * sizeof(double))
    if avals == NULL:
        raise MemoryError()
    cdef double *gt = avals + nlev * k * k
    cdef double *work = gt + k * k
    cdef int bad
    with nogil:
        for l in range(nlev * k * k):
            avals[l] = 0.0
        for i in range(n):                   # A_l, whole
            w = wrkwt[i]
            for a in range(k):
                for e in range(k):
                    avals[codes[i] * k * k + e + a * k] += z[i, e] * (w * z[i, a])
        bad = blockdiag_laplace_gradient_c(&ot, &lam[0], avals, &u[0], &grad_beta[0]
                                           if grad_beta.shape[0] > 0 else NULL, gt, work)
        if not bad:
            for e in range(k):
                for a in range(k):
                    grad_t[e, a] = gt[e + a * k]
    free(avals)
    if bad:
        raise ValueError("a level's block of M is not positive definite")


cdef inline void _zeta(const double *zi, const double *lam, int k, double *zeta) noexcept nogil:
    # ζ = T'z for the lower-triangular template T (column-major)
    cdef int a, e
    cdef double s
    for a in range(k):
        s = 0.0
        for e in range(a, k):
            s += lam[e + a * k] * zi[e]
        zeta[a] = s


cdef inline double _quad(const double *minv, const double *zeta, int k,
                         double *c) noexcept nogil:
    # c = M⁻¹ζ; returns ζ'c
    cdef int a, e
    cdef double s, h = 0.0
    for a in range(k):
        s = 0.0
        for e in range(k):
            s += minv[a + e * k] * zeta[e]
        c[a] = s
        h += zeta[a] * s
    return h


# -- the curvature of the deviance in β̃ at the modes, one term ---------------------------
#
# The covariance of β̃ given θ (glmm.py's ``_vcov_working``) is the inverse of the Schur
# complement S = X'WX - X'WZΛ M⁻¹ Λ'Z'WX of the PIRLS system at the modes. The general
# path accumulates the products of [X, working response] into the workspace and factors
# it there; with one term M is block diagonal and S a sum over levels,
#
#     C_l = Σ_{i in l} W_i z_i x_i' (k-by-p),   D_l = T'C_l,   S = X'WX - Σ_l D_l' M_l⁻¹ D_l,
#
# one pass over the rows and a k-by-k computation per level. (On cbpp the general path
# was a third of the convergence check, and its p + 1 columns of products cost the
# compiled PIRLS a fresh binding to the workspace after each call.)

cdef Py_ssize_t blockdiag_covariance_work_size(Py_ssize_t nlev, int k,
                                               Py_ssize_t p) noexcept nogil:
    """Doubles of scratch ``blockdiag_beta_covariance_c`` needs."""
    return nlev * k * p + 2 * nlev * k * k + 3 * k * k + 2 * k * p + 2 * p * p


cdef int blockdiag_beta_covariance_c(const OneTerm *ot, const double *lam, double *schur,
                                     double *vcov, double *work) noexcept nogil:
    """schur <- S (p-by-p, both triangles) at the working weights ``ot.wrkwt`` and the
    template T = ``lam`` (column-major, lower triangular), and vcov <- S⁻¹. ``work``
    holds ``blockdiag_covariance_work_size`` doubles; ot's wrkresid and mu are not read.
    Returns 0, 1 if some M_l = T'A_l T + I is not positive definite, 2 if S is not (and
    vcov is then not written)."""
    cdef Py_ssize_t n = ot.n, nlev = ot.nlev, p = ot.p, i, l, j, c
    cdef int k = ot.k, a, e
    cdef double *cl = work                      # C_l, level l's k rows of p at l·k·p
    cdef double *al = cl + nlev * k * p         # A_l, column-major k-by-k at l·k²
    cdef double *minv = al + nlev * k * k
    cdef double *scratch = minv + nlev * k * k  # 3k² for the level inverses
    cdef double *d = scratch + 3 * k * k        # D_l (k rows of p)
    cdef double *md = d + k * p                 # M_l⁻¹ D_l
    cdef double *inv_work = md + k * p          # 2p² for S⁻¹
    cdef const double *zi
    cdef const double *xi
    cdef const double *blk
    cdef double w, wz, wx, s
    for j in range(nlev * k * p):
        cl[j] = 0.0
    for j in range(nlev * k * k):
        al[j] = 0.0
    for j in range(p * p):
        schur[j] = 0.0
    for i in range(n):
        l = ot.codes[i]
        w = ot.wrkwt[i]
        zi = ot.z + i * ot.zstride
        xi = ot.x + i * p
        for a in range(k):
            wz = w * zi[a]
            for e in range(k):
                al[l * k * k + e + a * k] += zi[e] * wz
            for j in range(p):
                cl[(l * k + a) * p + j] += wz * xi[j]
        for j in range(p):
            wx = w * xi[j]
            for c in range(j, p):
                schur[j * p + c] += wx * xi[c]
    if _level_inverses(al, lam, k, nlev, minv, scratch):
        return 1
    for l in range(nlev):
        blk = minv + l * k * k
        for a in range(k):                      # D_l = T'C_l
            for j in range(p):
                s = 0.0
                for e in range(a, k):
                    s += lam[e + a * k] * cl[(l * k + e) * p + j]
                d[a * p + j] = s
        for a in range(k):                      # M_l⁻¹ D_l
            for j in range(p):
                s = 0.0
                for e in range(k):
                    s += blk[a + e * k] * d[e * p + j]
                md[a * p + j] = s
        for j in range(p):
            for c in range(j, p):
                s = 0.0
                for a in range(k):
                    s += d[a * p + j] * md[a * p + c]
                schur[j * p + c] -= s
    for j in range(p):
        for c in range(j):
            schur[j * p + c] = schur[c * p + j]
    for j in range(p * p):
        vcov[j] = schur[j]
    if p > 0 and _inverse_spd(vcov, <int> p, inv_work):
        return 2
    return 0


def blockdiag_beta_covariance(const int[::1] codes, const double[:, ::1] z,
                              const double[::1] lam, int k, const double[::1] wrkwt,
                              const double[:, ::1] x, double[:, ::1] schur,
                              double[:, ::1] vcov):
    """The Schur complement S = X'WX - X'WZΛ M⁻¹ Λ'Z'WX of a one-term PIRLS system
    (the section above) into ``schur`` and S⁻¹ into ``vcov`` (both p-by-p), for the
    working weights ``wrkwt``, the term's k columns of ``z``, its template ``lam`` (k²,
    column-major) and X (n-by-p). NumPy twin: glmm.py's ``_vcov_working`` on the
    workspace (set_products, factorize, rx_inverse_crossprod). Raises
    numpy.linalg.LinAlgError where M_l or S is not positive definite, ValueError where
    the arrays do not fit."""
    cdef Py_ssize_t n = codes.shape[0], p = x.shape[1], nlev = 0, i
    cdef OneTerm ot
    cdef int status
    cdef double *work
    if k < 1 or z.shape[1] < k or lam.shape[0] < k * k:
        raise ValueError("blockdiag_beta_covariance: inconsistent term sizes")
    if (z.shape[0] != n or wrkwt.shape[0] != n or x.shape[0] != n or n == 0
            or schur.shape[0] != p or schur.shape[1] != p or vcov.shape[0] != p
            or vcov.shape[1] != p):
        raise ValueError("blockdiag_beta_covariance: the arrays differ in size")
    for i in range(n):
        if codes[i] < 0:
            raise ValueError("blockdiag_beta_covariance: a negative level code")
        if codes[i] >= nlev:
            nlev = codes[i] + 1
    ot.n, ot.nlev, ot.p, ot.zstride, ot.k = n, nlev, p, z.shape[1], k
    ot.codes, ot.z, ot.wrkwt = &codes[0], &z[0, 0], &wrkwt[0]
    ot.x = &x[0, 0] if p > 0 else NULL
    ot.wrkresid = ot.mu = NULL
    ot.logit = False
    work = <double *> malloc(blockdiag_covariance_work_size(nlev, k, p) * sizeof(double))
    if work == NULL:
        raise MemoryError()
    with nogil:
        status = blockdiag_beta_covariance_c(&ot, &lam[0], &schur[0, 0] if p > 0 else NULL,
                                             &vcov[0, 0] if p > 0 else NULL, work)
    free(work)
    raise_covariance_status(status)


cdef int raise_covariance_status(int status) except -1:
    import numpy as np
    if status == 1:
        raise np.linalg.LinAlgError("random-effects block not positive definite")
    if status == 2:
        raise np.linalg.LinAlgError("fixed-effects block not positive definite: the "
                                    "columns of X are numerically collinear")
    return 0


# -- Laplace GLMMs with several terms, canonical links (see _gradient.py) ---------------
#
# Two passes over the rows around the adjoint solve. Terms with one column each (the
# common case) go term pair by term pair down the rows with the sums in locals: stores
# through double pointers stop the compiler keeping anything in registers across them
# (Python's extensions build with -fno-strict-aliasing), which made the row-by-row
# version of these loops five times slower. Vector terms go row by row.
ctypedef long long i64


cdef struct _Terms:
    # the per-term arrays the row passes read, as pointers (checked once by _terms_of)
    int nterm, ktot
    Py_ssize_t n
    const int *kk
    const int *zoff
    const int *codes          # nterm rows of n levels
    const i64 *uoff
    const double *lam
    const i64 *lam_off
    const double *z           # n rows of ktot columns


cdef _Terms _terms_of(const double[:, ::1] zcat, const int[::1] zoff, const int[::1] kk,
                      const int[:, ::1] codes, const i64[::1] uoff, const double[::1] lam,
                      const i64[::1] lam_off, Py_ssize_t q, Py_ssize_t nlam) except *:
    # the row passes index u, Λ and the gradient by these: checked here, not per row
    cdef Py_ssize_t nterm = kk.shape[0], n = zcat.shape[0], t, i
    cdef int top
    cdef _Terms tm
    if (nterm < 1 or n < 1 or codes.shape[0] != nterm or codes.shape[1] != n
            or zoff.shape[0] != nterm or uoff.shape[0] != nterm
            or lam_off.shape[0] != nterm or nlam > lam.shape[0]):
        raise ValueError("inconsistent term arrays for the row passes")
    for t in range(nterm):
        if (kk[t] < 1 or zoff[t] < 0 or zoff[t] + kk[t] > zcat.shape[1] or lam_off[t] < 0
                or lam_off[t] + kk[t] * kk[t] > nlam):
            raise ValueError(f"term {t} does not fit the arrays of the row passes")
        top = 0
        for i in range(n):
            if codes[t, i] < 0:
                raise ValueError(f"a negative level in term {t}")
            if codes[t, i] > top:
                top = codes[t, i]
        if uoff[t] < 0 or uoff[t] + (<i64> top + 1) * kk[t] > q:
            raise ValueError(f"term {t}'s levels run past u")
    tm.nterm = <int> nterm
    tm.ktot = <int> zcat.shape[1]
    tm.n = n
    tm.kk = &kk[0]
    tm.zoff = &zoff[0]
    tm.codes = &codes[0, 0]
    tm.uoff = &uoff[0]
    tm.lam = &lam[0]
    tm.lam_off = &lam_off[0]
    tm.z = &zcat[0, 0]
    return tm


cdef inline void _row_zetas(const _Terms *tm, Py_ssize_t i, double *zeta,
                            i64 *ustart) noexcept nogil:
    # ζ_t = T_t'z_t for every term, side by side as the terms' columns sit in zcat, and
    # the u index where each term's level of row i starts
    cdef int t
    cdef const double *zi = tm.z + i * tm.ktot
    for t in range(tm.nterm):
        _zeta(zi + tm.zoff[t], tm.lam + tm.lam_off[t], tm.kk[t], zeta + tm.zoff[t])
        ustart[t] = tm.uoff[t] + <i64> tm.codes[t * tm.n + i] * tm.kk[t]


def laplace_leverage_pass(const double[:, ::1] zcat, const int[::1] zoff, const int[::1] kk,
                          const int[:, ::1] codes, const i64[::1] uoff,
                          const i64[:, ::1] rowoff, const int[::1] pair_tr,
                          const int[::1] pair_tc, const double[::1] minv_blocks,
                          const double[::1] lam, const i64[::1] lam_off,
                          const double[::1] wrkwt, const double[::1] mu, bint logit,
                          double[::1] g, double[::1] a, double[::1] grad_t):
    """The first row pass of the multi-term Laplace gradient (canonical link): what needs
    the blocks of M⁻¹ on the pattern of Z'Z (the notation of _gradient.py's Notes).

    ``minv_blocks`` holds M⁻¹ on the blocks of Z'Z, laid out as the pattern lays out
    their values (``avals``: row i's block of term pair p starts at ``rowoff[p, i]``,
    column-major, diagonal blocks whole). Per row i, with ζ_{i,t} = T_t'z_{i,t}:

        c_{i,t} = Σ_s M⁻¹[(t, l_t(i)), (s, l_s(i))] ζ_{i,s},   h_i = Σ_t ζ_{i,t}·c_{i,t},
        g_i = h_i W'_i,      a = Λ'Z'g,      grad_t[T_t(e, a)] = Σ_i z_{i,t,e} 2 W_i c_{i,t,a},

    W'_i = W_i(1 - 2μ_i) (logit) or W_i (log). Writes g (n), a (q) and grad_t (the
    layout of Λ's templates, ``lam``). NumPy twin: _gradient._gradient_at_modes_numpy
    (``_coefficients_from_inverse``). Raises ValueError where ``rowoff`` points outside
    ``minv_blocks``.
    """
    cdef Py_ssize_t q = a.shape[0], nlam = grad_t.shape[0], nvals = minv_blocks.shape[0]
    cdef _Terms tm = _terms_of(zcat, zoff, kk, codes, uoff, lam, lam_off, q, nlam)
    cdef Py_ssize_t n = tm.n, npair = pair_tr.shape[0], p
    if (npair < 1 or rowoff.shape[0] != npair or rowoff.shape[1] != n
            or pair_tc.shape[0] != npair or wrkwt.shape[0] != n or mu.shape[0] != n
            or g.shape[0] != n):
        raise ValueError("inconsistent shapes for the leverage pass")
    for p in range(npair):
        if not (0 <= pair_tc[p] <= pair_tr[p] < tm.nterm):
            raise ValueError("a term pair outside the terms")
    cdef int bad
    cdef double *work = <double *> malloc((2 * tm.ktot + tm.nterm + 1) * sizeof(double))
    if work == NULL:
        raise MemoryError()
    with nogil:
        a[:] = 0.0
        grad_t[:] = 0.0
        if tm.ktot == tm.nterm:
            bad = _leverage_scalar(&tm, &rowoff[0, 0], &pair_tr[0], &pair_tc[0], npair,
                                   &minv_blocks[0], nvals, &wrkwt[0], &mu[0], logit, &g[0],
                                   &a[0], &grad_t[0])
        else:
            bad = _leverage_rows(&tm, &rowoff[0, 0], &pair_tr[0], &pair_tc[0], npair,
                                 &minv_blocks[0], nvals, &wrkwt[0], &mu[0], logit, &g[0],
                                 &a[0], &grad_t[0], work)
    free(work)
    if bad:
        raise ValueError("the block pattern points outside M⁻¹'s blocks")


cdef int _leverage_scalar(const _Terms *tm, const i64 *rowoff, const int *pair_tr,
                          const int *pair_tc, Py_ssize_t npair, const double *minv_blocks,
                          Py_ssize_t nvals, const double *wrkwt, const double *mu,
                          bint logit, double *g, double *a, double *grad_t) noexcept nogil:
    # every term scalar: with m the entry of M⁻¹ at row i's pair (r, c) of terms,
    # h_i = Σ_pairs m ζ_r ζ_c (twice off the diagonal) and the trace of term r gains
    # 2 W_i z_r m ζ_c (term c: 2 W_i z_c m ζ_r); one pass down the rows per pair
    cdef Py_ssize_t n = tm.n, i, p
    cdef int kt = tm.ktot, tr, tc
    cdef i64 off, ur
    cdef double lr, lc, m, zr, zc, w, acc_r, acc_c, twice
    cdef const double *z = tm.z
    cdef const i64 *ro
    for i in range(n):
        g[i] = 0.0
    for p in range(npair):
        tr, tc = pair_tr[p], pair_tc[p]
        lr, lc = tm.lam[tm.lam_off[tr]], tm.lam[tm.lam_off[tc]]
        twice = 1.0 if tr == tc else 2.0
        ro = rowoff + p * n
        acc_r = acc_c = 0.0
        for i in range(n):
            off = ro[i]
            if off < 0 or off >= nvals:
                return 1
            m = minv_blocks[off]
            zr, zc = z[i * kt + tr], z[i * kt + tc]
            g[i] += twice * m * (lr * zr) * (lc * zc)      # h_i, for now
            w = wrkwt[i]
            acc_r += w * zr * m * (lc * zc)
            acc_c += w * zc * m * (lr * zr)
        grad_t[tm.lam_off[tr]] += 2.0 * acc_r
        if tr != tc:
            grad_t[tm.lam_off[tc]] += 2.0 * acc_c
    for i in range(n):                           # g = h W', a = Λ'Z'g
        g[i] *= wrkwt[i] * (1.0 - 2.0 * mu[i]) if logit else wrkwt[i]
    for p in range(tm.nterm):
        lr = tm.lam[tm.lam_off[p]]
        ur = tm.uoff[p]
        for i in range(n):
            a[ur + tm.codes[p * n + i]] += g[i] * lr * z[i * kt + p]
    return 0


cdef int _leverage_rows(const _Terms *tm, const i64 *rowoff, const int *pair_tr,
                        const int *pair_tc, Py_ssize_t npair, const double *minv_blocks,
                        Py_ssize_t nvals, const double *wrkwt, const double *mu, bint logit,
                        double *g, double *a, double *grad_t, double *work) noexcept nogil:
    # any terms, row by row: c_{i,t} in full, then h, g, a and the traces
    cdef Py_ssize_t n = tm.n, i, p
    cdef int t, kr, kc, k, e, b, tr, tc, ktot = tm.ktot
    cdef i64 off
    cdef double w, h, gi, m
    cdef const double *zi
    cdef double *zeta = work
    cdef double *c = work + ktot
    cdef i64 *ustart = <i64 *> (work + 2 * ktot)     # nterm slots (i64 and double: 8 bytes)
    for i in range(n):
        _row_zetas(tm, i, zeta, ustart)
        for t in range(ktot):
            c[t] = 0.0
        for p in range(npair):
            tr, tc = pair_tr[p], pair_tc[p]
            kr, kc = tm.kk[tr], tm.kk[tc]
            off = rowoff[p * n + i]
            if off < 0 or off + kr * kc > nvals:
                return 1
            for b in range(kc):
                for e in range(kr):
                    m = minv_blocks[off + e + b * kr]
                    c[tm.zoff[tr] + e] += m * zeta[tm.zoff[tc] + b]
                    if tr != tc:
                        c[tm.zoff[tc] + b] += m * zeta[tm.zoff[tr] + e]
        h = 0.0
        for t in range(ktot):
            h += zeta[t] * c[t]
        w = wrkwt[i]
        gi = h * (w * (1.0 - 2.0 * mu[i]) if logit else w)
        g[i] = gi
        zi = tm.z + i * ktot
        for t in range(tm.nterm):
            k = tm.kk[t]
            for e in range(k):
                a[ustart[t] + e] += gi * zeta[tm.zoff[t] + e]
                for b in range(k):
                    grad_t[tm.lam_off[t] + e + b * k] += (
                        2.0 * w * zi[tm.zoff[t] + e] * c[tm.zoff[t] + b])
    return 0


def laplace_residual_pass(const double[:, ::1] zcat, const int[::1] zoff, const int[::1] kk,
                          const int[:, ::1] codes, const i64[::1] uoff,
                          const double[::1] lam, const i64[::1] lam_off,
                          const double[::1] wrkwt, const double[::1] wrkresid,
                          const double[::1] g, const double[::1] u, const double[::1] v,
                          double[::1] r, double[::1] grad_t):
    """The second row pass, after the adjoint solve v = M⁻¹a: per row, with
    d_i = -2 W_i ρ_i (ρ the working residual),

        r_i = d_i + g_i - W_i Σ_t ζ_{i,t}·v_{t,l_t(i)},
        grad_t[T_t(e, a)] += Σ_i z_{i,t,e} (r_i u_{t,l_t(i),a} - ½ d_i v_{t,l_t(i),a}).

    Writes r (n; dD/dβ̃ = X̃'r) and adds to grad_t. NumPy twin:
    _gradient._gradient_at_modes_numpy.
    """
    cdef _Terms tm = _terms_of(zcat, zoff, kk, codes, uoff, lam, lam_off, u.shape[0],
                               grad_t.shape[0])
    cdef Py_ssize_t n = tm.n
    if (wrkwt.shape[0] != n or wrkresid.shape[0] != n or g.shape[0] != n or r.shape[0] != n
            or v.shape[0] != u.shape[0]):
        raise ValueError("inconsistent shapes for the residual pass")
    cdef double *work = <double *> malloc((tm.ktot + tm.nterm + 1) * sizeof(double))
    if work == NULL:
        raise MemoryError()
    with nogil:
        if tm.ktot == tm.nterm:
            _residual_scalar(&tm, &wrkwt[0], &wrkresid[0], &g[0], &u[0], &v[0], &r[0],
                             &grad_t[0])
        else:
            _residual_rows(&tm, &wrkwt[0], &wrkresid[0], &g[0], &u[0], &v[0], &r[0],
                           &grad_t[0], work)
    free(work)


cdef void _residual_scalar(const _Terms *tm, const double *wrkwt, const double *wrkresid,
                           const double *g, const double *u, const double *v, double *r,
                           double *grad_t) noexcept nogil:
    # every term scalar: r first (one pass per term for ZΛv), then per term the sum
    # Σ_i z_i (r_i u_l - ½ d_i v_l) in a local
    cdef Py_ssize_t n = tm.n, i
    cdef int t, kt = tm.ktot
    cdef i64 ut
    cdef double lt, acc, w, d
    cdef const double *z = tm.z
    cdef const int *codes
    for i in range(n):
        r[i] = 0.0
    for t in range(tm.nterm):                 # r <- ZΛv
        lt = tm.lam[tm.lam_off[t]]
        ut = tm.uoff[t]
        codes = tm.codes + t * n
        for i in range(n):
            r[i] += lt * z[i * kt + t] * v[ut + codes[i]]
    for i in range(n):
        w = wrkwt[i]
        r[i] = -2.0 * w * wrkresid[i] + g[i] - w * r[i]
    for t in range(tm.nterm):
        ut = tm.uoff[t]
        codes = tm.codes + t * n
        acc = 0.0
        for i in range(n):
            d = -2.0 * wrkwt[i] * wrkresid[i]
            acc += z[i * kt + t] * (r[i] * u[ut + codes[i]] - 0.5 * d * v[ut + codes[i]])
        grad_t[tm.lam_off[t]] += acc


cdef void _residual_rows(const _Terms *tm, const double *wrkwt, const double *wrkresid,
                         const double *g, const double *u, const double *v, double *r,
                         double *grad_t, double *work) noexcept nogil:
    cdef Py_ssize_t n = tm.n, i
    cdef int t, e, b, k, ktot = tm.ktot
    cdef double w, d, ri, zv
    cdef const double *zi
    cdef double *zeta = work
    cdef i64 *ustart = <i64 *> (work + ktot)
    for i in range(n):
        _row_zetas(tm, i, zeta, ustart)
        zv = 0.0
        for t in range(tm.nterm):
            for e in range(tm.kk[t]):
                zv += zeta[tm.zoff[t] + e] * v[ustart[t] + e]
        w = wrkwt[i]
        d = -2.0 * w * wrkresid[i]
        ri = d + g[i] - w * zv
        r[i] = ri
        zi = tm.z + i * ktot
        for t in range(tm.nterm):
            k = tm.kk[t]
            for b in range(k):
                zv = ri * u[ustart[t] + b] - 0.5 * d * v[ustart[t] + b]
                for e in range(k):
                    grad_t[tm.lam_off[t] + e + b * k] += zi[tm.zoff[t] + e] * zv

# cython: language_level=3
"""Compiled passes of the exact gradients: one random-effects term, level by level.

The general gradients are NumPy (_lmm_gradient.py, _gradient.py); with a single term
M = Λ'Z'WZΛ + I is block diagonal, everything is a k-by-k computation per level or per
row, and on small models NumPy's per-call overhead was most of the cost (a one-term LMM
gradient 80 µs against 4 µs for its objective; cbpp's Laplace gradient ~3 times its
objective). These kernels are those computations in loops. Their NumPy twins are the
general code restricted to one term; tests/test_lmm_gradient.py and
tests/test_gradient.py hold them together.

Blocks are column-major k-by-k, as in _blocked.pyx: entry (e, a) at e + a·k.
"""
from libc.stdlib cimport malloc, free
from libc.math cimport sqrt


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
    _inverse_from_factor(lo, k, li, m)
    return 0


cdef void _inverse_from_factor(const double *lo, int k, double *li,
                               double *minv) noexcept nogil:
    """minv = (lo lo')⁻¹ for a lower-triangular lo (column-major); li is scratch."""
    cdef int a, c, e
    cdef double s
    for c in range(k):                  # li = lo⁻¹, column by column
        for e in range(k):
            if e < c:
                li[e + c * k] = 0.0
                continue
            s = 1.0 if e == c else 0.0
            for a in range(c, e):
                s -= lo[e + a * k] * li[a + c * k]
            li[e + c * k] = s / lo[e + e * k]
    for c in range(k):                  # minv = li' li
        for e in range(k):
            s = 0.0
            for a in range(e if e > c else c, k):
                s += li[a + e * k] * li[a + c * k]
            minv[e + c * k] = s


# -- linear mixed models (see _lmm_gradient.py) ---------------------------------------
def lmm_blockdiag_gradient(const double[::1] avals, const double[::1] lam,
                           const double[::1] L, int k, const double[::1] u,
                           const double[::1, :] zx, const double[::1] zy,
                           const double[::1] beta, const double[:, ::1] sinv,
                           double[:, ::1] ktrace, double[:, ::1] rss, double[:, ::1] schur):
    """The per-level sums behind the gradient of a one-term LMM's objective over T.

    With A_l the level's block of Z'WZ (column-major, full), T the template (``lam``,
    column-major), L_l the factor of M_l = T'A_l T + I (``L``, as ``blockdiag_factor``
    leaves it), u the modes, zx = Z'WX (q-by-p), zy = Z'Wy and β the coefficients, adds
    over the levels, each k-by-k and indexed [e, a]:

        ktrace += A_l T M_l⁻¹                          (K_ll)
        rss    += (zy_l - A_l T u_l - zx_l β) u_l'      ((Z'Wε)_l u_l')
        schur  += (zx_l - A_l T V_l) S⁻¹ V_l'           (V_l = M_l⁻¹ T' zx_l; when sinv
                                                         has p rows, else untouched)

    NumPy twin: _lmm_gradient._one_term_numpy.
    """
    cdef Py_ssize_t nlev = L.shape[0] // (k * k), l
    cdef Py_ssize_t p = zx.shape[1], i, j
    cdef bint reml = sinv.shape[0] == p and p > 0
    cdef int a, c, e
    cdef double s
    cdef double *buf = <double *> malloc((4 * k * k + k + 3 * k * max(p, 1)) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    cdef double *ct = buf                      # A_l T
    cdef double *linv = buf + k * k            # L_l⁻¹ (lower)
    cdef double *minv = buf + 2 * k * k        # M_l⁻¹
    cdef double *kt = buf + 3 * k * k
    cdef double *zres = buf + 4 * k * k
    cdef double *v = zres + k                  # V_l, then V_l S⁻¹ (k-by-p, column-major)
    cdef double *w = v + k * max(p, 1)         # zx_l - A_l T V_l
    cdef double *y = w + k * max(p, 1)
    cdef const double *A
    cdef const double *B
    with nogil:
        for l in range(nlev):
            A = &avals[l * k * k]
            B = &L[l * k * k]
            for c in range(k):                 # ct = A T (T lower)
                for e in range(k):
                    s = 0.0
                    for a in range(c, k):
                        s += A[e + a * k] * lam[a + c * k]
                    ct[e + c * k] = s
            _inverse_from_factor(B, k, linv, minv)
            for e in range(k):
                for c in range(k):
                    s = 0.0
                    for a in range(k):
                        s += ct[e + a * k] * minv[a + c * k]
                    ktrace[e, c] += s
                s = zy[l * k + e]
                for a in range(k):
                    s -= ct[e + a * k] * u[l * k + a]
                for j in range(p):
                    s -= zx[l * k + e, j] * beta[j]
                zres[e] = s
            for e in range(k):
                for a in range(k):
                    rss[e, a] += zres[e] * u[l * k + a]
            if not reml:
                continue
            for j in range(p):                 # y = T' zx_l, v = M⁻¹ y, w = zx_l - ct v
                for a in range(k):
                    s = 0.0
                    for e in range(a, k):
                        s += lam[e + a * k] * zx[l * k + e, j]
                    y[a + j * k] = s
                for a in range(k):
                    s = 0.0
                    for e in range(k):
                        s += minv[a + e * k] * y[e + j * k]
                    v[a + j * k] = s
                for e in range(k):
                    s = zx[l * k + e, j]
                    for a in range(k):
                        s -= ct[e + a * k] * v[a + j * k]
                    w[e + j * k] = s
            for a in range(k):                 # y = v S⁻¹
                for j in range(p):
                    s = 0.0
                    for i in range(p):
                        s += v[a + i * k] * sinv[i, j]
                    y[a + j * k] = s
            for e in range(k):
                for a in range(k):
                    s = 0.0
                    for j in range(p):
                        s += w[e + j * k] * y[a + j * k]
                    schur[e, a] += s
    free(buf)


# -- Laplace GLMMs, canonical links (see _gradient.py) ---------------------------------
def laplace_blockdiag_gradient(const int[::1] codes, const double[:, ::1] z,
                               const double[::1] lam, int k, const double[::1] wrkwt,
                               const double[::1] wrkresid, const double[::1] mu, bint logit,
                               const double[::1] u, const double[:, ::1] x,
                               double[::1] grad_beta, double[:, ::1] grad_t):
    """The exact gradient of the Laplace deviance of a one-term GLMM with a canonical link,
    at the modes PIRLS left (the notation of _gradient.py's Notes).

    Per row i of level l, with ζ_i = T'z_i, W_i the working weight, d_i = -2 W_i ρ_i (ρ the
    working residual), W'_i = W_i(1 - 2μ_i) (logit) or W_i (log):
        M_l = Σ_i W_i ζ_iζ_i' + I,   c_i = M_l⁻¹ζ_i,   h_i = ζ_i'c_i,   g_i = h_i W'_i,
        v_l = M_l⁻¹ Σ_i g_i ζ_i,     r_i = d_i + g_i - W_i ζ_i'v_l,
        grad_beta = Σ_i r_i x_i,     grad_t[e, a] = Σ_i z_ie (r_i u_la - ½ d_i v_la + 2 W_i c_ia).
    Writes grad_beta (p) and grad_t (k-by-k, [e, a]). NumPy twin: _gradient._gradient_at_modes.
    Raises ValueError if some M_l is not positive definite.
    """
    cdef Py_ssize_t n = codes.shape[0], i, j, l
    cdef Py_ssize_t p = x.shape[1]
    cdef Py_ssize_t nlev = u.shape[0] // k
    cdef int a, e, bad = 0
    cdef double s, w, dw, h, g, d, r, zv
    cdef double *minv = <double *> malloc((nlev * k * k + nlev * k + 4 * k + 2 * k * k)
                                          * sizeof(double))
    if minv == NULL:
        raise MemoryError()
    cdef double *av = minv + nlev * k * k      # Σ g ζ per level, then v_l
    cdef double *zeta = av + nlev * k
    cdef double *c = zeta + k
    cdef double *tmp = c + k
    cdef double *work = tmp + 2 * k
    cdef double *blk
    with nogil:
        for l in range(nlev * k * k):
            minv[l] = 0.0
        for l in range(nlev * k):
            av[l] = 0.0
        for j in range(p):
            grad_beta[j] = 0.0
        for e in range(k):
            for a in range(k):
                grad_t[e, a] = 0.0
        for i in range(n):                     # M_l without the identity
            _zeta(&z[i, 0], &lam[0], k, zeta)
            blk = &minv[codes[i] * k * k]
            w = wrkwt[i]
            for a in range(k):
                for e in range(a, k):
                    blk[e + a * k] += w * zeta[e] * zeta[a]
        for l in range(nlev):
            blk = &minv[l * k * k]
            for a in range(k):
                blk[a + a * k] += 1.0
                for e in range(a + 1, k):
                    blk[a + e * k] = blk[e + a * k]
            if _inverse_spd(blk, k, work):
                bad = 1
                break
        if not bad:
            for i in range(n):                 # Σ_i g_i ζ_i per level
                _zeta(&z[i, 0], &lam[0], k, zeta)
                blk = &minv[codes[i] * k * k]
                h = _quad(blk, zeta, k, c)
                w = wrkwt[i]
                dw = w * (1.0 - 2.0 * mu[i]) if logit else w
                g = h * dw
                for a in range(k):
                    av[codes[i] * k + a] += g * zeta[a]
            for l in range(nlev):              # v_l = M_l⁻¹ (Σ g ζ)_l
                blk = &minv[l * k * k]
                for a in range(k):
                    s = 0.0
                    for e in range(k):
                        s += blk[a + e * k] * av[l * k + e]
                    tmp[a] = s
                for a in range(k):
                    av[l * k + a] = tmp[a]
            for i in range(n):
                _zeta(&z[i, 0], &lam[0], k, zeta)
                l = codes[i]
                blk = &minv[l * k * k]
                h = _quad(blk, zeta, k, c)
                w = wrkwt[i]
                dw = w * (1.0 - 2.0 * mu[i]) if logit else w
                g = h * dw
                d = -2.0 * w * wrkresid[i]
                zv = 0.0
                for a in range(k):
                    zv += zeta[a] * av[l * k + a]
                r = d + g - w * zv
                for j in range(p):
                    grad_beta[j] += r * x[i, j]
                for a in range(k):
                    tmp[a] = r * u[l * k + a] - 0.5 * d * av[l * k + a] + 2.0 * w * c[a]
                for e in range(k):
                    for a in range(k):
                        grad_t[e, a] += z[i, e] * tmp[a]
    free(minv)
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

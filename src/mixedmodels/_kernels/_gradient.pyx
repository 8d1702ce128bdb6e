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

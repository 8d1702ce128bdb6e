"""The trust-region quasi-Newton search over θ with the exact gradient: the NumPy twin of
``_kernels._search.trust_region``, which :meth:`LinearMixedModel.fit` runs by default where
the profiled objective has a compiled gradient (see its Notes for what was measured)."""
import math

import numpy as np


# the trust-region search's first radius (BOBYQA's first steps on Λ = I) and stopping rule
TRUST_RADIUS = 0.75
TRUST_FTOL = 1e-8
TR_CONVERGED, TR_MAXEVAL = 0, 1        # the searches' return codes


def trust_region_search(value_and_grad, x0, lower, radius=TRUST_RADIUS, ftol=TRUST_FTOL,
                        maxeval=100_000, start_block=None):
    """A projected trust-region quasi-Newton search with the exact gradient, within
    lower bounds; the NumPy twin of ``_kernels._search.trust_region`` (the same
    arithmetic in the same order, so the same iterates).

    Each step minimizes the quadratic model g's + s'Bs/2 over the box |s_i| <= Δ
    intersected with the bounds (projected Newton steps on the free components); B starts
    as the identity times max|g|/Δ (the first step reaches the box's edge) and takes a
    damped BFGS update from every trial point. Δ starts at ``radius`` (BOBYQA's 0.75): a
    first step that is small keeps the search off the far bound, where a line search's
    unit step lands (L-BFGS-B from Λ = I on sleepstudy). A step is kept where it lowers
    the objective (ρ > 1e-4); Δ shrinks to a quarter of the step where ρ < 1/4 and doubles
    where ρ > 3/4 at the edge. It stops where a kept step lowered the objective by at
    most ``ftol`` relative and predicted at most ten times that, or the model predicts
    less than ``ftol``/1000.

    At such a stop, a bounded component within 0.01 of its bound is tried on the bound
    (kept and held there if no worse: the derivative of a column of Λ vanishes on its
    bound, so the search only creeps towards a boundary optimum) or else at 0.01 (where
    the objective is lower there or falls away from the bound, the search restarts
    there with a fresh B: a stop beside the bound can be a saddle); twice at most.

    The start is moved onto any bound it is below. ``start_block``, called (with no
    arguments) after the first evaluation, may give the curvature known in the leading
    coordinates (a square list of rows, or None), which B then starts with there.

    Returns
    -------
    xs, fs, code : every point evaluated, their values, TR_CONVERGED or TR_MAXEVAL
    """
    lower = [float(v) for v in lower]
    n = len(lower)
    # a start below a bound moves onto it (NaN stays)
    x = [lo if v < lo else v for v, lo in zip((float(v) for v in x0), lower)]
    xs, fs = [], []

    def evaluate(point):
        val, grad = value_and_grad(np.array(point))
        xs.append(list(point))
        fs.append(float(val))
        return float(val), [float(v) for v in grad]

    def scaled_identity(grad):
        gmax = 0.0
        for v in grad:
            if abs(v) > gmax:
                gmax = abs(v)
        gmax = gmax / radius
        if not gmax > 1e-8:
            gmax = 1e-8
        return [[gmax if i == j else 0.0 for j in range(n)] for i in range(n)]

    def result(code):
        return np.array(xs, dtype=float).reshape(len(xs), n), np.array(fs, dtype=float), code

    f, g = evaluate(x)
    if not math.isfinite(f):
        return result(TR_MAXEVAL)
    B = scaled_identity(g)
    block = start_block() if start_block is not None else None
    if block:
        for i, row in enumerate(block):
            for j, v in enumerate(row):
                B[i][j] = float(v)
    held = [False] * n
    delta = radius
    code, escapes = TR_MAXEVAL, 0
    while len(fs) < maxeval:
        lo = [max(lower[i] - x[i], -delta) for i in range(n)]
        hi = [delta] * n
        s = _box_qp(g, B, lo, hi, held)
        pred = -_quadratic_model(g, B, s)
        snorm = 0.0
        for v in s:
            if abs(v) > snorm:
                snorm = abs(v)
        fscale = max(1.0, abs(f))
        stop = False
        if snorm == 0.0 or pred <= 1e-3 * ftol * fscale:
            stop = True
        else:
            xn = [max(x[i] + s[i], lower[i]) for i in range(n)]
            fn, gn = evaluate(xn)
            if not math.isfinite(fn):
                delta = 0.25 * snorm
                continue
            sv = [xn[i] - x[i] for i in range(n)]
            yv = [gn[i] - g[i] for i in range(n)]
            bs = []
            for i in range(n):
                v = 0.0
                for j in range(n):
                    v = v + B[i][j] * sv[j]
                bs.append(v)
            sy = sbs = 0.0
            for i in range(n):
                sy = sy + sv[i] * yv[i]
                sbs = sbs + sv[i] * bs[i]
            if sy <= 0.2 * sbs:
                th = 0.8 * sbs / (sbs - sy)
                sy = 0.0
                for i in range(n):
                    yv[i] = th * yv[i] + (1.0 - th) * bs[i]
                    sy = sy + sv[i] * yv[i]
            for i in range(n):
                for j in range(n):
                    B[i][j] = B[i][j] - bs[i] * bs[j] / sbs + yv[i] * yv[j] / sy
            ared = f - fn
            rho = ared / pred
            if rho < 0.25:
                delta = 0.25 * snorm
            elif rho > 0.75 and snorm >= 0.99 * delta:
                delta = 2.0 * delta
            if ared > 0.0 and rho > 1e-4:
                x, g, f = xn, gn, fn
                fscale = max(1.0, abs(f))
                if ared <= ftol * fscale and pred <= 10.0 * ftol * fscale:
                    stop = True
        if not stop:
            continue
        code = TR_CONVERGED
        if escapes >= 2 or len(fs) >= maxeval:
            break
        escapes += 1
        near = [math.isfinite(lower[i]) and x[i] < lower[i] + 0.01 for i in range(n)]
        strict = [near[i] and x[i] > lower[i] for i in range(n)]
        if any(strict):
            xn = [lower[i] if strict[i] else x[i] for i in range(n)]
            fn, gn = evaluate(xn)
            if fn <= f:
                held = [held[i] or strict[i] for i in range(n)]
                x, g, f = xn, gn, fn
                code = TR_MAXEVAL
                continue
        if any(near):
            xn = [lower[i] + 0.01 if near[i] else x[i] for i in range(n)]
            fn, gn = evaluate(xn)
            down = fn < f or any(near[i] and gn[i] < 0.0 for i in range(n))
            if math.isfinite(fn) and down:
                x, g, f = xn, gn, fn
                held = [False] * n
                B = scaled_identity(g)
                delta = radius
                code = TR_MAXEVAL
                continue
        break
    return result(code)


def _quadratic_model(g, B, s):
    m = 0.0
    for i in range(len(g)):
        bs = 0.0
        for j in range(len(g)):
            bs = bs + B[i][j] * s[j]
        m = m + s[i] * (g[i] + 0.5 * bs)
    return m


def _box_qp(g, B, lo, hi, held):
    """s minimizing g's + s'Bs/2 over lo <= s <= hi, held components 0 (B positive
    definite): projected Newton steps on the free components, backtracking."""
    n = len(g)
    s = [0.0] * n
    gmax = 0.0
    for v in g:
        if abs(v) > gmax:
            gmax = abs(v)
    for _ in range(30):
        q = []
        for i in range(n):
            v = g[i]
            for j in range(n):
                v = v + B[i][j] * s[j]
            q.append(v)
        free = [i for i in range(n) if not (held[i] or (s[i] <= lo[i] and q[i] > 0.0)
                                            or (s[i] >= hi[i] and q[i] < 0.0))]
        nf = len(free)
        if nf == 0:
            break
        qmax = 0.0
        for i in free:
            if abs(q[i]) > qmax:
                qmax = abs(q[i])
        if qmax <= 1e-14 * (1.0 + gmax):
            break
        L = [[0.0] * nf for _ in range(nf)]
        fail = False
        for a in range(nf):
            for b in range(a + 1):
                v = B[free[a]][free[b]]
                for c in range(b):
                    v = v - L[a][c] * L[b][c]
                if a == b:
                    if not v > 0.0:
                        fail = True
                        break
                    L[a][a] = math.sqrt(v)
                else:
                    L[a][b] = v / L[b][b]
            if fail:
                break
        d = [0.0] * n
        if fail:
            for i in free:
                d[i] = -q[i]
        else:
            z = [0.0] * nf
            for a in range(nf):
                v = q[free[a]]
                for c in range(a):
                    v = v - L[a][c] * z[c]
                z[a] = v / L[a][a]
            for a in range(nf - 1, -1, -1):
                v = z[a]
                for c in range(a + 1, nf):
                    v = v - L[c][a] * z[c]
                z[a] = v / L[a][a]
            for a in range(nf):
                d[free[a]] = -z[a]
        ms = _quadratic_model(g, B, s)
        t = 1.0
        for _ls in range(30):
            sn = [min(max(s[i] + t * d[i], lo[i]), hi[i]) for i in range(n)]
            mn = _quadratic_model(g, B, sn)
            dq = 0.0
            for i in range(n):
                dq = dq + q[i] * (sn[i] - s[i])
            if mn <= ms + 1e-4 * dq:
                break
            t = 0.5 * t
        same = sn == s
        s = sn
        if same:
            break
    return s

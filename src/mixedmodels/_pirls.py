"""The inner loop of a GLMM: penalized iteratively reweighted least squares (PIRLS).

At fixed θ (and β, unless β varies too) find the conditional modes û that minimize the
penalized deviance  Σ dev_i(y_i, μ_i) + ||u||²,  μ = g⁻¹(Xβ + ZΛu + offset). Each
iteration evaluates the family at η (one compiled pass: μ, working weights, working
residuals, deviance residuals), accumulates the weighted cross-products of the blocked
system, factors it at θ and solves for the new u (and β); a step that raises the
penalized deviance is halved until it does not.

Convergence is judged on the penalized deviance, tightly (relative 1e-13): where PIRLS is a
Newton iteration (a canonical link: the working weights, the expected information, are
the observed one too) that costs about one more pass, and the outer optimizer needs an
objective whose noise is well below the 1e-9 changes that fix β to four digits. Where
the deviance's own rounding noise exceeds that (binomial counts of 10^5 trials), a
full Newton step below STEP_TOL ends the iteration instead. Elsewhere (probit, cloglog,
the negative binomial, Gamma and inverse Gaussian with the log link ...) PIRLS is Fisher
scoring and converges only linearly: the penalized deviance is stationary at the modes,
so its change is quadratic in their error and stops the iteration with the modes about
√1e-13 short, while log det(L) is first order in that error, which left the Laplace
objective 1e-8 noisy between warm starts. There the modes' error is bounded instead:
from two successive steps s' < s (the rate s'/s), the distance left is s'²/(s - s'),
and the iteration ends when that is below MODE_TOL (relative to the modes' size), the
step itself below STEP_TOL, or when steps below STEP_TOL stop shrinking (the modes'
rounding). Where the rate is slow (Gamma with the log link and a large dispersion:
0.8) that would take a hundred steps, but then the error is mostly along one
direction, which two successive steps show (nearly parallel, at a ratio λ): the modes
are moved on by the step times λ/(1 - λ), the limit of the iteration along it, if
that does not raise the penalized deviance (_extrapolation). The
factorization of the last pass is
the one at the modes, so log det(L) for the Laplace approximation comes from it.

With β fixed (the Laplace and quadrature objectives over (β, θ)) the loop below runs in
compiled code, _kernels._glm.PirlsKernel, bound once per model (kept on the PIRLS
state) to the rows, the workspace, the state's arrays, X and the offset: Xβ + offset is
formed there, each evaluation is one pass over the rows that also accumulates the
cross-products the next factorization needs, and an iteration makes no Python call of
its own. The Python loop remains for PIRLS over β and u (the ``fast`` stage) and as the
compiled loop's twin in the tests (``compiled=False``). (The one-term Laplace value and
gradient call the kernel directly: _gradient._one_term_value_and_gradient; and the
one-term search runs in the kernel: ``PirlsKernel.trust_region``.)
"""
import warnings

import numpy as np

from ._kernels import _glm
from ._linalg._blocked import matvec, upper_solve, zero_vectors


_EMPTY = np.empty(0)    # the kernels read an empty weight array as unit weights

# A Newton step below this (relative to the modes' size) ends PIRLS: the next one would
# change the modes by its square, far below anything the objective resolves.
STEP_TOL = 1e-9
# Fisher scoring (pirls_is_newton false) ends when the modes are within this (relative to
# their size) of their limit, by the rate of the last two steps: log det(L), first order
# in the modes' error, then moves the objective by about its rounding.
MODE_TOL = 1e-12


class PirlsState:
    """Per-observation arrays of the response side, allocated once per model."""

    def __init__(self, n):
        # seven np.zeros(n) in one call (each NumPy call is a cold C path on a small fit)
        (self.eta, self.mu, self.mu_eta, self.wrkwt, self.wrkresid, self.devresid,
         self.fixed) = zero_vectors(n, n, n, n, n, n, n)     # fixed: X β + offset
        self.n = n
        self._work1 = None
        self.workx = None                   # [X, working response], PIRLS over β and u
        self.kernel = None                  # the compiled PIRLS bound to these arrays

    @property
    def work1(self):
        """The working response (n x 1) of the u-only Python loop and the dispersion
        families' observed-information factorization; made on first use (the compiled
        PIRLS does not need it)."""
        if self._work1 is None:
            self._work1 = np.zeros((self.n, 1))
        return self._work1

    def evaluate(self, family, y, prior_w, eta):
        if eta is not self.eta:
            self.eta[:] = eta
        return family.update(self.eta, y, prior_w, self.mu, self.mu_eta, self.wrkwt,
                             self.wrkresid, self.devresid)


def row_kernel(model):
    """The compiled PIRLS of the model's workspace and state (_glm.PirlsKernel, bound to
    X and the offset too), made once and kept on the state while the arrays it is bound
    to stay the same."""
    system, st = model.workspace, model.state
    system.bind_products(1)
    kernel = st.kernel
    X, off = model.X, model.offset_or_zero
    if kernel is None or not kernel.bound_to(system.avals, system.ztxy, system.xtxy,
                                             system.rzxy, model.y, X, off):
        kernel = st.kernel = _glm.PirlsKernel(
            system.pattern, system.layout.lam_off, system.factorizer, system.avals,
            system.ztxy, system.xtxy, system.rzxy, model.y, st.fixed, st.eta, st.mu,
            st.mu_eta, st.wrkwt, st.wrkresid, st.devresid, x=X, offset=off,
            lam_index=system.layout.index)
    return kernel


def _fisher_converged(step, last_step, usize, halvings):
    """Whether Fisher scoring has converged after a full step ``step`` (the one before:
    ``last_step``, -1 for none) from modes of size ``usize``. A linear iteration at rate
    r = step/last_step has step·r/(1 - r) = step²/(last_step - step) left to go; steps
    that no longer shrink while below STEP_TOL are the modes' rounding."""
    if not step <= STEP_TOL * (1.0 + usize):
        return False
    return ((halvings == 0 and step * step <= MODE_TOL * (1.0 + usize) * (last_step - step))
            or 0.0 <= last_step <= step)


def _extrapolation(step_vec, last_vec):
    """The factor λ/(1 - λ) by which to extend the step ``step_vec`` of Fisher scoring
    towards the limit along its direction, or None: where the step before it,
    ``last_vec``, is nearly parallel (the part of the step off λ·last_vec below 0.3 of
    it) at a ratio 0.5 <= |λ| < 1 (below 0.5 the plain steps are fast enough)."""
    if last_vec is None:
        return None
    ss = float(step_vec @ step_vec)
    sp = float(step_vec @ last_vec)
    pp = float(last_vec @ last_vec)
    if not pp > 0.0:
        return None
    lam = sp / pp
    # ‖step - λ last‖² = ss - λ sp
    if not (0.5 <= abs(lam) < 1.0 and ss - lam * sp <= 0.09 * ss):
        return None
    return lam / (1.0 - lam)


def warn_exhausted(theta, maxiter):
    warnings.warn(f"PIRLS did not converge in {maxiter} iterations at theta={np.round(theta, 6).tolist()}; "
                  "the conditional modes may be inaccurate", RuntimeWarning)


def _pirls_kernel(model, fam, theta, beta, u, pw, tol, maxiter, max_halving):
    """β fixed: the loop below in _glm.PirlsKernel.pirls (fixed = Xβ + offset formed
    there, as matvec forms it)."""
    logdet, dev, iters, converged, exhausted = row_kernel(model).pirls(
        fam.code, fam.link.code, fam.param,
        _EMPTY if pw is None else np.ascontiguousarray(pw, dtype=float),
        np.ascontiguousarray(theta, dtype=float), u,
        tol, maxiter, max_halving, STEP_TOL, beta, MODE_TOL)
    if exhausted:
        warn_exhausted(theta, maxiter)
    return u, beta, logdet, dev, converged


def pirls(model, theta, beta, u, vary_beta=False, prior_w=None, family=None, tol=1e-13,
          maxiter=100, max_halving=30, compiled=True):
    """Run PIRLS; return (u, beta, logdet_l, sum of deviance residuals, converged).

    ``model`` supplies: family, y, prior_w, offset_or_zero, X (the working fixed-effects
    matrix; β is in its coordinates), workspace, state. ``prior_w`` overrides the
    model's prior weights (the dispersion families iterate with w/φ), ``family`` the
    model's family (the negative binomial at a trial θ). With
    ``vary_beta`` the blocked system carries the columns [X, working response] and β
    is re-solved with u; otherwise only the working response relative to Xβ.
    With ``vary_beta=False`` the loop runs in compiled code (``compiled=False`` runs the
    Python loop below instead: the compiled loops' twin, for the tests).
    """
    system, st = model.workspace, model.state
    fam = model.family if family is None else family
    X, y, off = model.X, model.y, model.offset_or_zero
    pw = model.prior_w if prior_w is None else prior_w
    p = X.shape[1]
    u = np.array(u, dtype=float, copy=True)
    beta = np.array(beta, dtype=float, copy=True)
    if not vary_beta and compiled:
        return _pirls_kernel(model, fam, theta, beta, u, pw, tol, maxiter, max_halving)
    if vary_beta and (st.workx is None or st.workx.shape[1] != p + 1):
        st.workx = np.ascontiguousarray(np.column_stack([X, np.zeros(len(y))]))

    def evaluate(beta_, u_):
        # η = Xβ + offset + ZΛu, then the family's compiled pass at η
        if vary_beta:
            matvec(X, beta_, off, st.fixed)
        system.linear_predictor(theta, u_, st.fixed, st.eta)
        return st.evaluate(fam, y, pw, st.eta)

    newton = _glm.pirls_is_newton(fam.code, fam.link.code)
    matvec(X, beta, off, st.fixed)
    dev = evaluate(beta, u)
    pdev = dev + u @ u
    converged = False
    last_step = -1.0        # the previous full step's size (none yet)
    last_vec = None         # the previous step, where it was taken whole
    for _ in range(maxiter):
        # working response relative to the part of η that this PIRLS does not move
        if vary_beta:
            cols = st.workx
            np.add(st.eta, st.wrkresid, out=cols[:, p])
            cols[:, p] -= off
        else:
            cols = st.work1
            np.subtract(st.eta, st.fixed, out=cols[:, 0])
            cols[:, 0] += st.wrkresid
        system.set_products(cols, st.wrkwt)
        logdet, r = system.factorize(theta, schur=vary_beta)
        if converged:
            break
        if vary_beta:
            new_beta = r[:p, p].copy()
            upper_solve(r, new_beta)
            cu = system.rzxy[:, p] - system.rzxy[:, :p] @ new_beta
        else:
            new_beta = beta
            cu = system.rzxy[:, 0].copy()
        new_u = system.backward(np.asfortranarray(cu[:, None]))[:, 0].copy()
        # the Newton step's own size: with large binomial counts the deviance carries
        # rounding noise above the relative tolerance, and the step is what shows
        # that the iteration has settled
        newton_step = float(np.max(np.abs(new_u - u), initial=0.0))
        if vary_beta:
            newton_step = max(newton_step, float(np.max(np.abs(new_beta - beta), initial=0.0)))
        new_dev = evaluate(new_beta, new_u)
        new_pdev = new_dev + new_u @ new_u
        halvings = 0
        while not (new_pdev <= pdev * (1 + 1e-12) + 1e-12) and halvings < max_halving:
            new_u = 0.5 * (u + new_u)
            if vary_beta:
                new_beta = 0.5 * (beta + new_beta)
            new_dev = evaluate(new_beta, new_u)
            new_pdev = new_dev + new_u @ new_u
            halvings += 1
        if halvings == max_halving:
            # could not improve: stay where we were
            evaluate(beta, u)
            converged = True
            continue
        usize = float(np.max(np.abs(u), initial=0.0))
        if newton:
            converged = (abs(pdev - new_pdev) <= tol * abs(new_pdev) + tol
                         or (halvings == 0 and newton_step <= STEP_TOL * (1.0 + usize)))
        else:
            converged = _fisher_converged(newton_step, last_step, usize, halvings)
        last_step = newton_step
        if not (newton or converged):
            step_vec = None
            if halvings == 0:
                step_vec = new_u - u
                if vary_beta:
                    step_vec = np.concatenate([step_vec, new_beta - beta])
                factor = _extrapolation(step_vec, last_vec)
                if factor is not None:
                    far_u = new_u + factor * (new_u - u)
                    far_beta = new_beta + factor * (new_beta - beta) if vary_beta else beta
                    far_dev = evaluate(far_beta, far_u)
                    far_pdev = far_dev + far_u @ far_u
                    if far_pdev <= new_pdev * (1 + 1e-12) + 1e-12:
                        new_u, new_beta, new_pdev, new_dev = far_u, far_beta, far_pdev, far_dev
                        # the rate shows again after two plain steps
                        step_vec = None
                        last_step = -1.0
                    else:
                        evaluate(new_beta, new_u)
            last_vec = step_vec
        u, beta, pdev, dev = new_u, new_beta, new_pdev, new_dev
    else:
        warn_exhausted(theta, maxiter)
    return u, beta, logdet, dev, converged

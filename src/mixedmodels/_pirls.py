"""The inner loop of a GLMM: penalized iteratively reweighted least squares (PIRLS).

At fixed θ (and β, unless β varies too) find the conditional modes û that minimize the
penalized deviance  Σ dev_i(y_i, μ_i) + ||u||²,  μ = g⁻¹(Xβ + ZΛu + offset). Each
iteration evaluates the family at η (one compiled pass: μ, working weights, working
residuals, deviance residuals), accumulates the weighted cross-products of the blocked
system, factors it at θ and solves for the new u (and β); a step that raises the
penalized deviance is halved until it does not.

Convergence is judged on the penalized deviance, tightly (relative 1e-13): PIRLS is a
Newton iteration, so that costs about one more pass, and the outer optimizer needs an
objective whose noise is well below the 1e-9 changes that fix β to four digits. Where
the deviance's own rounding noise exceeds that (binomial counts of 10^5 trials), a
full Newton step below STEP_TOL ends the iteration instead. The
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
one-term search runs its L-BFGS-B loop in the kernel: ``PirlsKernel.lbfgsb``.)
"""
import warnings

import numpy as np

from ._kernels import _glm
from ._linalg._blocked import matvec, upper_solve


_EMPTY = np.empty(0)    # the kernels read an empty weight array as unit weights

# A Newton step below this (relative to the modes' size) ends PIRLS: the next one would
# change the modes by its square, far below anything the objective resolves.
STEP_TOL = 1e-9


class PirlsState:
    """Per-observation arrays of the response side, allocated once per model."""

    def __init__(self, n):
        self.eta = np.zeros(n)
        self.mu = np.zeros(n)
        self.mu_eta = np.zeros(n)
        self.wrkwt = np.zeros(n)
        self.wrkresid = np.zeros(n)
        self.devresid = np.zeros(n)
        self.fixed = np.zeros(n)            # X β + offset
        self.work1 = np.zeros((n, 1))       # the working response, u-only Python loop
        self.workx = None                   # [X, working response], PIRLS over β and u
        self.kernel = None                  # the compiled PIRLS bound to these arrays

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
        tol, maxiter, max_halving, STEP_TOL, beta)
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

    matvec(X, beta, off, st.fixed)
    dev = evaluate(beta, u)
    pdev = dev + u @ u
    converged = False
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
        converged = (abs(pdev - new_pdev) <= tol * abs(new_pdev) + tol
                     or (halvings == 0 and newton_step <= STEP_TOL * (1.0 + float(np.max(np.abs(u), initial=0.0)))))
        u, beta, pdev, dev = new_u, new_beta, new_pdev, new_dev
    else:
        warn_exhausted(theta, maxiter)
    return u, beta, logdet, dev, converged

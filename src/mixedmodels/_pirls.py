"""The inner loop of a GLMM: penalized iteratively reweighted least squares (PIRLS).

At fixed θ (and β, unless β varies too) find the conditional modes û that minimize the
penalized deviance  Σ dev_i(y_i, μ_i) + ||u||²,  μ = g⁻¹(Xβ + ZΛu + offset). Each
iteration evaluates the family at η (one compiled pass: μ, working weights, working
residuals, deviance residuals), accumulates the weighted cross-products of the blocked
system, factors it at θ and solves for the new u (and β); a step that raises the
penalized deviance is halved until it does not.

Convergence is judged on the penalized deviance, tightly (relative 1e-13): PIRLS is a
Newton iteration, so that costs about one more pass, and the outer optimizer needs an
objective whose noise is well below the 1e-9 changes that fix β to four digits. The
factorization of the last pass is
the one at the modes, so log det(L) for the Laplace approximation comes from it.
"""
import warnings

import numpy as np

from ._linalg._blocked import upper_solve


class PirlsState:
    """Per-observation arrays of the response side, allocated once per model."""

    def __init__(self, n):
        self.eta = np.zeros(n)
        self.mu = np.zeros(n)
        self.mu_eta = np.zeros(n)
        self.wrkwt = np.zeros(n)
        self.wrkresid = np.zeros(n)
        self.devresid = np.zeros(n)

    def evaluate(self, family, y, prior_w, eta):
        self.eta[:] = eta
        return family.update(self.eta, y, prior_w, self.mu, self.mu_eta, self.wrkwt,
                             self.wrkresid, self.devresid)


def pirls(model, theta, beta, u, vary_beta=False, tol=1e-13, maxiter=100, max_halving=30):
    """Run PIRLS; return (u, beta, logdet_l, sum of deviance residuals, converged).

    ``model`` supplies: family, y, prior_w, offset (array), X, Z (CSR), system, state.
    With ``vary_beta`` the blocked system carries the columns [X, working response] and
    β is re-solved with u; otherwise only the working response relative to Xβ.
    """
    system, st, fam = model.system, model.state, model.family
    X, Zr, y, pw, off = model.design.X, model.Zcsr, model.y, model.prior_w, model.offset_or_zero
    p = X.shape[1]
    u = np.array(u, dtype=float, copy=True)
    beta = np.array(beta, dtype=float, copy=True)

    def eta_of(beta_, u_):
        return X @ beta_ + off + Zr @ system.lambda_times(theta, u_)

    dev = st.evaluate(fam, y, pw, eta_of(beta, u))
    pdev = dev + u @ u
    converged = False
    for _ in range(maxiter):
        # working response relative to the fixed part that PIRLS does not move
        if vary_beta:
            cols = np.column_stack([X, st.eta - off + st.wrkresid])
        else:
            cols = (st.eta - off - X @ beta + st.wrkresid)[:, None]
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
        new_dev = st.evaluate(fam, y, pw, eta_of(new_beta, new_u))
        new_pdev = new_dev + new_u @ new_u
        halvings = 0
        while not (new_pdev <= pdev * (1 + 1e-12) + 1e-12) and halvings < max_halving:
            new_u = 0.5 * (u + new_u)
            new_beta = 0.5 * (beta + new_beta)
            new_dev = st.evaluate(fam, y, pw, eta_of(new_beta, new_u))
            new_pdev = new_dev + new_u @ new_u
            halvings += 1
        if halvings == max_halving:
            # could not improve: stay where we were
            st.evaluate(fam, y, pw, eta_of(beta, u))
            converged = True
            continue
        converged = abs(pdev - new_pdev) <= tol * abs(new_pdev) + tol
        u, beta, pdev, dev = new_u, new_beta, new_pdev, new_dev
    else:
        warnings.warn(f"PIRLS did not converge in {maxiter} iterations at theta={np.round(theta, 6).tolist()}; "
                      "the conditional modes may be inaccurate", RuntimeWarning)
    return u, beta, logdet, dev, converged

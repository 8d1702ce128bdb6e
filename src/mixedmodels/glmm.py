"""Generalized linear mixed models: Laplace approximation and adaptive Gauss-Hermite quadrature.

Notes
-----
At θ and β (and φ), PIRLS finds the modes û of the random effects. For the families
without a dispersion parameter (Bernoulli, Binomial, Poisson) the optimizer minimizes
the deviance of MixedModels.jl, with nAGQ = 1 (Laplace)

    deviance(β, θ) = Σ dev_i(y_i, μ_i) + ||û||² + 2 log det(L),

and with nAGQ > 1 its adaptive Gauss-Hermite version (see _agq.py). The log-likelihood
adds the saturated model's log-likelihood, a constant, so that it equals the full family
log density that lme4's ``logLik`` reports:  loglik = -deviance/2 + Σ [ℓ_i(μ_i) + dev_i/2].

For the families with a dispersion φ (Gamma, inverse Gaussian, Normal with a link other
than the identity) φ is a parameter of the likelihood like β and θ, estimated with them
(as glmmTMB does). The conditional density of y given u is Σ ℓ_i(y_i; μ_i, φ), so the
modes minimize Σ dev_i/φ + ||u||² (PIRLS with prior weights w/φ), and the Laplace
approximation of -2 log L is

    -2 Σ ℓ_i(y_i; μ̂_i, φ) + ||û||² + log det(Λ'Z'W°ZΛ + I),

with W° the observed information -∂²ℓ_i/∂η_i² at the modes (see _dispersion.py): the
exact Hessian of the integrand, as in glmmTMB's Laplace, where the Fisher information
PIRLS iterates with would differ for a non-canonical link. The optimizer moves log φ.

By default β and θ (and φ) are optimized together (as MixedModels.jl does), starting
from a ``fast`` fit in which the optimizer moves θ (and φ) alone and PIRLS re-solves β
with u (lme4's nAGQ = 0); ``fast=True`` stops after that first stage. Where the exact
gradient is known (``has_gradient``: the canonical links of Bernoulli, Binomial and
Poisson, under the Laplace approximation (_gradient.py) or quadrature on one scalar term
(_agq_gradient.py)), one L-BFGS-B stage from the GLM's β and Λ = I replaces the two, and
its convergence check is _glmm_search.py's; with one term and nAGQ = 1 the search is
the compiled trust region of the LMMs (``PirlsKernel.trust_region``) instead. The fixed effects are handled in the
orthogonal working basis of _fixed.py throughout.
"""
import math
import warnings

import numpy as np

from ._agq import agq_deviance
from ._agq_gradient import agq_value_and_gradient, supports_agq_gradient
from ._agq_vector import MAX_COLUMNS, MAX_NODES, agq_vector_deviance
from . import _gradient
from ._dispersion import observed_weights, pearson_dispersion
from ._kernels import _glm
from ._model import MixedModelSpec
from .lmm import rx_inverse_crossprod
from ._gradient import laplace_value_and_gradient
from ._optimize import (BOUND_PROBE, OptSummary, check_optimum, check_optimum_with_gradient,
                        gradient_hessian, hessian_steps, leave_the_bound, minimize,
                        minimize_with_gradient, rectify, restart_lbfgsb)
from ._derivs import finite_difference_derivatives
from ._glmm_search import minimize_one_term
from ._pirls import PirlsState, pirls, row_kernel
from ._results import MixedModelFit
from .families import get_family

_EMPTY = np.empty(0)    # the kernels read an empty array as unit weights or no offset
# the one-stage L-BFGS-B search's stopping rule (models the compiled search does not take)
SEARCH_FTOL = 1e-14


class GeneralizedLinearMixedModel(MixedModelSpec):
    """A GLMM specification; ``objective(theta, beta)``, ``deviance`` and ``fit()``.

    Parameters
    ----------
    formula : str
        ``cbind(successes, failures) ~ ...`` gives a binomial response with its trials.
    data : pandas.DataFrame (or a polars / pyarrow table)
    family : Family, Family class or str
        ``Bernoulli()``, ``Binomial()`` (proportions, trials as ``weights``), ``Poisson()``,
        ``Gamma()``, ``InverseGaussian()``, ``Normal(link=...)``.
    weights : str or array, optional
        Prior weights (for Binomial, the number of trials).
    offset : str or array, optional
        Added to the linear predictor (as are ``offset(x)`` terms in the formula).
    contrasts : dict, optional
    nAGQ : int, default 1
        Quadrature points; > 1 needs a single scalar random-effects term.
    """

    _transient = MixedModelSpec._transient + ("_state", "_u_warm", "_one_term_laplace_p",
                                              "_last_evaluation")
    _one_term_laplace_p = None      # see _route_one_term_laplace (None: not yet decided)
    _last_evaluation = None         # (x, value, gradient, modes) of _joint_value_and_grad

    def __init__(self, formula, data, family, *, weights=None, offset=None, contrasts=None,
                 nAGQ=1, na_action="drop"):
        super().__init__(formula, data, weights=weights, offset=offset, contrasts=contrasts,
                         na_action=na_action)
        self.family = fam = get_family(family)
        d = self.design
        if getattr(d, "binomial_counts", False) and fam.name != "Binomial":
            raise ValueError(f"the response {d.response_name!r} is a cbind() of successes and "
                             f"failures, which needs family=Binomial(), not {fam!r}")
        self.nAGQ = int(nAGQ)
        if self.nAGQ < 1:
            raise ValueError("nAGQ must be a positive integer (use fast=True for lme4's nAGQ=0)")
        if self.nAGQ > 1:
            k = self.reterms[0].ncols
            if len(self.reterms) != 1 or k > MAX_COLUMNS:
                raise ValueError(
                    f"nAGQ = {self.nAGQ} needs a single random-effects term with at most "
                    f"{MAX_COLUMNS} columns on one grouping factor, such as (1 | g) or "
                    f"(1 + x | g); this model has {len(self.reterms)} term(s) with "
                    f"{sum(t.ncols for t in self.reterms)} column(s): with several terms the "
                    "integral does not factor into one per level. Use nAGQ=1 (Laplace).")
            if self.nAGQ ** k > MAX_NODES:
                raise ValueError(
                    f"nAGQ = {self.nAGQ} with {k} random effects per level is a grid of "
                    f"{self.nAGQ ** k} nodes per level (the cost grows as nAGQ^k); at most "
                    f"{MAX_NODES} are allowed: use nAGQ <= {int(MAX_NODES ** (1 / k) + 1e-9)}")
        self.success_level = None
        if d.y_levels is not None:
            if fam.name != "Bernoulli":
                raise ValueError(f"response '{d.response_name}' is a two-level factor "
                                 f"({', '.join(map(str, d.y_levels))}); use family=Bernoulli()")
            self.success_level = d.y_levels[1]
        self._check_random_effects_count(strict=False)
        self.offset_or_zero = (np.zeros(self.n) if d.offset is None
                               else np.ascontiguousarray(d.offset, float))
        self._state = self._u_warm = self._one_term_laplace_p = None
        self._last_evaluation = None
        self._response_changed()
        self._setup_done()

    @property
    def has_dispersion(self):
        """Whether φ is estimated (Gamma, inverse Gaussian, Normal with a link)."""
        return bool(self.family.has_dispersion)

    @property
    def estimates_family_param(self):
        """Whether the family's own parameter is estimated (the negative binomial θ)."""
        return bool(getattr(self.family, "estimate_param", False))

    @property
    def _full_loglik(self):
        # the families whose objective must be -2 log L itself: the saturated part of the
        # deviance depends on φ or on the negative binomial θ
        return self.has_dispersion or getattr(self.family, "n_extra_params", 0) > 0

    def _response_changed(self):
        d, fam = self.design, self.family
        self.y = np.ascontiguousarray(d.y, dtype=float)
        self.prior_w = (np.ones(self.n) if d.weights is None
                        else np.ascontiguousarray(d.weights, float))
        y_range = fam._validate_with_range(self.y, self.prior_w, d.response_name)
        self._refuse_degenerate_response(y_range)
        # the workspace and PIRLS arrays hold nothing of y between calls; the modes do
        self._u_warm = None
        self.beta0, self.phi0 = self._glm_start()

    def _refuse_degenerate_response(self, y_range=None):
        """Responses whose GLM estimates are infinite: lme4 refuses them too.
        ``y_range``: the smallest and largest y over the rows of positive weight, where
        the family's checks found them."""
        fam, y, w = self.family, self.y, self.prior_w
        if fam.name not in ("Bernoulli", "Binomial", "Poisson"):
            return
        # the response over the rows of positive weight (validate refused NaN), by its
        # range: every value is 0 (or 1) when the smallest and the largest are
        if y_range is None:
            used = w > 0
            yu = y if used.all() else y[used]
            y_range = (yu.min(), yu.max()) if yu.size else (math.nan, math.nan)
        lo, hi = y_range
        if lo == lo:
            zeros, ones = lo == 0 and hi == 0, lo == 1 and hi == 1
        else:
            zeros = ones = True     # no row: as numpy.all of nothing
        if fam.name in ("Bernoulli", "Binomial"):
            # all failures or all successes: the intercept runs off to ∓∞
            if zeros or ones:
                which = "successes" if ones else "failures"
                raise ValueError(
                    f"response {self.design.response_name!r} is constant: every observation "
                    f"is {which}, so the fixed effects have no finite estimate (lme4: "
                    "'Response is constant')")
        elif fam.name == "Poisson":
            if zeros:
                raise ValueError(
                    f"response {self.design.response_name!r} is all zeros: a Poisson mean of "
                    "zero has no finite linear predictor (lme4: 'Response is constant')")

    # -- transient state: rebuilt on demand, never pickled --------------------------
    @property
    def state(self):
        if self._state is None:
            self._state = PirlsState(self.n)
        return self._state

    @property
    def _u(self):
        """The modes of the last PIRLS call, PIRLS's next starting point."""
        if self._u_warm is None:
            self._u_warm = np.zeros(self.workspace.q)
        return self._u_warm

    @_u.setter
    def _u(self, value):
        self._u_warm = value

    # the GLM start by _kernels._glm.glm_irls (a Householder QR per step) rather than the
    # NumPy loop with LAPACK's dgelsd: 86 → 14 µs on cbpp, a start that differs from the
    # loop's in the last bits (its twin, within 1e-12)
    _compiled_glm_start = True

    def _glm_start(self, compiled=None):
        """β̃ of the GLM without random effects (IRLS), and a moment estimate of φ (or of
        the negative binomial θ, from Var y = μ + μ²/θ). ``compiled=False`` runs the
        NumPy loop, the compiled one's twin (default: ``_compiled_glm_start``)."""
        if compiled is None:
            compiled = self._compiled_glm_start
        y, w, fam = self.y, self.prior_w, self.family
        if self.estimates_family_param:
            fam = fam.with_param(1e8)        # a Poisson-like start for β
        eta = fam.link.link(fam.starting_mu(y, w))
        st = self.state
        beta = self._glm_irls_compiled(fam, eta) if compiled else None
        if beta is None:
            beta = self._glm_irls_numpy(fam, eta)
        if self.has_dispersion:
            return beta, pearson_dispersion(fam, y, st.mu, w, self.n - self.p)
        if self.estimates_family_param:
            mu = st.mu
            excess = float(np.sum(w * ((y - mu) ** 2 - mu)))
            size = float(np.sum(w * mu * mu)) / excess if excess > 0 else 10.0
            return beta, min(max(size, 1e-2), 1e4)
        return beta, 1.0

    def _glm_irls_compiled(self, fam, eta):
        """IRLS from ``eta`` in _kernels._glm.glm_irls, the state left at the last η; None
        where it hands back to the NumPy loop (a weighted X of lower rank)."""
        st = self.state
        st.eta[:] = eta
        beta = np.empty(self.p)
        off = _EMPTY if self.design.offset is None else self.offset_or_zero
        solves = _glm.glm_irls(fam.code, fam.link.code, fam.param, self.X, self.y,
                               self.prior_w, off, st.eta, st.mu, st.mu_eta, st.wrkwt,
                               st.wrkresid, st.devresid, beta)
        return None if solves < 0 else beta

    def _glm_irls_numpy(self, fam, eta):
        """IRLS from ``eta`` with NumPy's least squares (dgelsd), the state left at the
        last η."""
        X, y, w, off = self.X, self.y, self.prior_w, self.offset_or_zero
        least_squares = self.fixed.least_squares
        st = self.state
        beta = np.zeros(X.shape[1])
        dev_old = np.inf
        # scratch for the weighted working matrix and response (the same operations as
        # X * sw[:, None] and (eta - off + wrkresid) * sw, written in place)
        xw = np.empty_like(X)
        zw = np.empty_like(y)
        zero_offset = self.design.offset is None
        for _ in range(50):
            dev = st.evaluate(fam, y, w, eta)
            if abs(dev_old - dev) <= 1e-10 * (abs(dev) + 1e-10):
                break
            dev_old = dev
            sw = np.sqrt(st.wrkwt)
            np.multiply(X, sw[:, None], out=xw)
            if zero_offset:
                np.add(eta, st.wrkresid, out=zw)    # eta - 0.0 is eta, bit for bit
            else:
                np.subtract(eta, off, out=zw)
                zw += st.wrkresid
            zw *= sw
            beta = least_squares(xw, zw)
            eta = X @ beta
            eta += off
        return beta

    # -- the objective ---------------------------------------------------------------
    def _value(self, theta, beta_w, phi=1.0, vary_beta=False, nAGQ=None, family=None):
        """PIRLS at (θ, β̃, φ), then the value the optimizer minimizes.

        Returns (value, u, β̃): the deviance of MixedModels.jl for Bernoulli, Binomial and
        Poisson, -2 log L (Laplace or AGQ) for the families with φ or a parameter of their
        own (``family``: the negative binomial at a trial θ).
        """
        nAGQ = self.nAGQ if nAGQ is None else nAGQ
        disp = self.has_dispersion
        fam = self.family if family is None else family
        pw = self.prior_w / phi if disp else self.prior_w
        u, beta_w, logdet, dev, ok = pirls(self, theta, beta_w, self._u, vary_beta=vary_beta,
                                           prior_w=pw, family=fam)
        self._u = u
        if not disp:
            self._last_logdet = 2.0 * logdet
            if nAGQ > 1:
                val = self._agq(theta, beta_w, u, nAGQ, fam, self.prior_w)
            else:
                val = dev + u @ u + 2.0 * logdet
            if self._full_loglik:
                # the negative binomial: add back the saturated part, which depends on θ;
                # its Laplace curvature is PIRLS's expected information, as in lme4's
                # glmer.nb (whose optimum is the lower one on grouseticks)
                st = self.state
                saturated = float(np.sum(fam.loglik(self.y, st.mu, pw))
                                  + 0.5 * np.sum(st.devresid))
                val -= 2.0 * saturated
            return val, u, beta_w
        st = self.state
        ws = self.workspace
        wobs = observed_weights(fam, self.y, st.mu, st.eta, self.prior_w, phi)
        # only the factor of Λ'Z'W°ZΛ + I is wanted: PIRLS's scratch column (its values
        # do not matter) saves an n-vector per evaluation
        ws.set_products(st.work1, wobs)
        try:
            logdet_obs, _ = ws.factorize(theta, schur=False)
        except np.linalg.LinAlgError:
            # the integrand is not log-concave at the modes: no Laplace approximation
            return math.inf, u, beta_w
        self._last_logdet = 2.0 * logdet_obs
        loglik = float(np.sum(fam.loglik(self.y, st.mu, self.prior_w, phi)))
        if nAGQ > 1:
            # AGQ with weights w/φ gives Σ dev_i/φ + ...; the rest of -2ℓ_i does not
            # depend on μ (it is the saturated part)
            saturated = loglik + 0.5 * float(np.sum(st.devresid))
            # the factor in the workspace is the observed-information one just computed
            val = self._agq(theta, beta_w, u, nAGQ, fam, pw)
            return val - 2.0 * saturated, u, beta_w
        return -2.0 * loglik + u @ u + 2.0 * logdet_obs, u, beta_w

    def _agq(self, theta, beta_w, u, nAGQ, fam, prior_w):
        """The quadrature deviance at the modes, with the factor the workspace holds:
        the compiled scalar rule for one scalar term, the tensor-product rule of
        _agq_vector.py for a vector term."""
        if self.reterms[0].ncols == 1:
            sd = 1.0 / self.workspace.blockdiag_diagonal()
            return agq_deviance(self, theta, beta_w, u, nAGQ, working=True, prior_w=prior_w,
                                sd=sd, family=fam)
        return agq_vector_deviance(self, theta, beta_w, u, nAGQ, family=fam, prior_w=prior_w)

    def _deviance(self, theta, beta, vary_beta=False, nAGQ=None, phi=1.0):
        """:meth:`_value` with β in the coefficients' own coordinates."""
        return self._value(theta, self.fixed.to_working(beta), phi, vary_beta, nAGQ)

    def objective(self, theta, beta=None, phi=None, family_param=None):
        """The value the fit minimizes, at θ and β (β from PIRLS when None).

        For Bernoulli, Binomial and Poisson this is MixedModels.jl's deviance; for the
        families with a dispersion it is -2 log L at φ (default: the GLM's moment
        estimate), for the negative binomial -2 log L at its θ (``family_param``).
        """
        theta = self._check_theta(theta)
        phi = self._check_phi(phi)
        fam = self._family_at(family_param)
        if beta is None:
            return self._value(theta, self.beta0, phi, vary_beta=True, family=fam)[0]
        beta_w = self.fixed.to_working(np.asarray(beta, float))
        return self._value(theta, beta_w, phi, family=fam)[0]

    def _check_phi(self, phi):
        if not self.has_dispersion:
            if phi is not None:
                raise ValueError(f"the {self.family.name} family has no dispersion parameter")
            return 1.0
        phi = self.phi0 if phi is None else float(phi)
        if not phi > 0:
            raise ValueError(f"the dispersion φ must be positive, not {phi}")
        return phi

    def _family_at(self, value):
        """The family with its own parameter set (the negative binomial's θ)."""
        if not self.estimates_family_param:
            if value is not None:
                raise ValueError(f"{self.family!r} has no parameter to set")
            return self.family
        return self.family.with_param(self.phi0 if value is None else float(value))

    # -- the parameter vectors the optimizer sees -------------------------------------
    @property
    def _n_extra(self):
        """Parameters the optimizer moves after θ: log φ, or the log negative binomial θ."""
        return int(self.has_dispersion or self.estimates_family_param)

    def _split(self, x, with_beta):
        """(β̃ or None, θ, φ, family) from an optimizer vector [β̃] θ [log φ | log θ_nb]."""
        p, nt = self.p, self.layout.ntheta
        o = p if with_beta else 0
        beta_w = x[:p] if with_beta else None
        theta = x[o:o + nt]
        phi, fam = 1.0, self.family
        if self.has_dispersion:
            phi = math.exp(x[o + nt])
        elif self.estimates_family_param:
            fam = self.family.with_param(math.exp(x[o + nt]))
        return beta_w, theta, phi, fam

    def _joint_value(self, x):
        beta_w, theta, phi, fam = self._split(x, True)
        try:
            return self._value(theta, beta_w, phi, family=fam)[0]
        except (np.linalg.LinAlgError, ValueError, OverflowError):
            return math.inf

    @property
    def has_gradient(self):
        """Whether the exact gradient of the objective is available, for Bernoulli,
        Binomial and Poisson with their canonical links: the Laplace approximation
        (nAGQ = 1, _gradient.py) and adaptive quadrature on one scalar term (nAGQ > 1,
        _agq_gradient.py). Elsewhere PIRLS's Fisher scoring converges only linearly and
        the modes carry more noise than a gradient search tolerates."""
        fam = self.family
        if self._full_loglik or not (fam.canonical_link
                                     and fam.name in ("Bernoulli", "Binomial", "Poisson")):
            return False
        return self.nAGQ == 1 or supports_agq_gradient(self)

    def _joint_value_and_grad(self, x):
        try:
            p = self._one_term_laplace_p
            if p is None:
                p = self._one_term_laplace_p = self._route_one_term_laplace()
            if p >= 0 and type(x) is np.ndarray and x.dtype == np.float64:
                # the optimizer's own calls, a dozen per fit: straight to the compiled
                # call, without the checks laplace_value_and_gradient makes of the model
                # each time (a third of a call's cost on a small model)
                value, grad = _gradient._one_term_value_and_gradient(self, x[p:], x[:p],
                                                                     self.family)
            else:
                beta_w, theta, _, fam = self._split(x, True)
                if self.nAGQ > 1:
                    value, grad = agq_value_and_gradient(self, theta, beta_w, family=fam)
                else:
                    value, grad = laplace_value_and_gradient(self, theta, beta_w,
                                                             family=fam)
        except np.linalg.LinAlgError:
            return math.inf, np.zeros_like(x)
        # the convergence check starts where the search's last evaluation usually is
        self._last_evaluation = (np.array(x, dtype=float), value, grad, self._u_warm)
        return value, grad

    def _evaluation_at(self, x):
        """(x, value, gradient, modes) of the last joint evaluation if it was at ``x`` and
        the state still holds its modes (no PIRLS since), else None."""
        last = self._last_evaluation
        # the same bytes: the very point evaluated (cheaper than array_equal)
        if (last is None or last[3] is not self._u_warm
                or last[0].tobytes() != np.asarray(x, dtype=float).tobytes()):
            return None
        return last

    def _one_term_laplace(self):
        """Whether the joint value and gradient are one compiled call of the Laplace
        kernel (see :meth:`_route_one_term_laplace`)."""
        if self._one_term_laplace_p is None:
            self._one_term_laplace_p = self._route_one_term_laplace()
        return self._one_term_laplace_p >= 0

    def _route_one_term_laplace(self):
        """p where the joint value and gradient are one compiled call of the Laplace
        kernel (one term, nAGQ = 1, a canonical link of Bernoulli, Binomial or Poisson,
        the model's own family), else -1."""
        fam = self.family
        if (self.nAGQ == 1 and not self._full_loglik and self.workspace.factor is None
                and _gradient._compiled_case(fam)):
            return self.p
        return -1

    def fit(self, fast=False, progress=False, check_convergence=True, optimizer="auto"):
        """Fit by maximizing the (approximate) likelihood.

        Parameters
        ----------
        fast : bool
            Optimize θ (and φ) only, with β from PIRLS (lme4's nAGQ = 0).
        progress : bool
            Show the optimizer's progress.
        check_convergence : bool, default True
            Gradient and Hessian of the objective over the optimized parameters at the
            optimum (lme4's ``check.conv``); stored on ``optsum.derivs``, warnings when
            they fail. With the exact gradient that Hessian is a forward difference of
            it (n + 1 gradients); ``vcov_hessian`` takes the central one on first use.
            BOBYQA's Hessian (from values) also gives ``vcov_hessian``.
        optimizer : {"auto", "lbfgs", "bobyqa"}
            The joint stage's search over (β, θ): a quasi-Newton search with the exact
            gradient of the Laplace deviance, or of the quadrature deviance of one
            scalar term (``has_gradient``; "auto" takes it where available), or NLopt's
            derivative-free BOBYQA. With the gradient the search is one stage from
            the GLM's β and Λ = I: under "auto" the compiled trust region of the LMMs
            for one term with nAGQ = 1 ("TRUST_REGION_BFGS"), else L-BFGS-B, which
            "lbfgs" asks for everywhere. BOBYQA first moves θ alone with β from PIRLS
            (the ``fast`` fit, ``optsum_fast``), then β and θ together.
            ``optsum.optimizer`` records which ran.

        Returns
        -------
        GeneralizedLinearMixedModelFit
        """
        if optimizer not in ("auto", "lbfgs", "bobyqa"):
            raise ValueError(f"optimizer must be 'auto', 'lbfgs' or 'bobyqa', not {optimizer!r}")
        if optimizer == "lbfgs" and not self.has_gradient:
            raise ValueError("the exact gradient needs a Bernoulli, Binomial or Poisson "
                             "family with its canonical link, and nAGQ = 1 or a single "
                             "scalar random-effects term; use optimizer='bobyqa'")
        use_gradient = optimizer == "lbfgs" or (optimizer == "auto" and self.has_gradient)
        layout, p, disp = self.layout, self.p, self.has_dispersion
        self._u = None
        if use_gradient and not fast:
            fit = self._fit_with_gradient(progress, check_convergence,
                                          trust_region=optimizer == "auto")
            if fit is not None:
                return fit
            self._u = None
        beta_fast = {"beta": self.beta0.copy()}
        extra = [math.log(self.phi0)] if self._n_extra else []
        bounded = np.flatnonzero(np.isfinite(layout.lower))

        def f_stage1(x):
            _, theta, phi, fam = self._split(x, False)
            try:
                val, _, beta = self._value(theta, self.beta0, phi, vary_beta=True, family=fam)
            except (np.linalg.LinAlgError, ValueError, OverflowError):
                return math.inf
            beta_fast["beta"] = beta
            return val

        opt1 = OptSummary(initial=np.concatenate([layout.initial(), extra]),
                          lowerbd=np.concatenate([layout.lower, [-np.inf] * len(extra)]),
                          initial_step=np.concatenate([np.full(layout.ntheta, 0.75),
                                                       [0.25] * len(extra)]))
        minimize(f_stage1, opt1, progress=progress)
        rectify(f_stage1, opt1, bounded)
        self._u = None
        f_stage1(opt1.final)
        beta = beta_fast["beta"]
        _, theta, phi, fam = self._split(opt1.final, False)
        if fast:
            if check_convergence and check_optimum(f_stage1, opt1) and opt1.polished:
                self._u = None
                f_stage1(opt1.final)
                beta = beta_fast["beta"]
                _, theta, phi, fam = self._split(opt1.final, False)
            return GeneralizedLinearMixedModelFit(self, self._optimum(theta, beta, phi, fam),
                                                  opt1, fast=True)

        se = np.sqrt(np.diag(self._vcov_working(theta, beta, phi, fam)))
        ntheta = layout.ntheta
        # the deviance is flat in β near the optimum: four digits of β need changes of
        # 1e-9 in the deviance resolved, so stop on a relative change of 1e-15 only
        opt2 = OptSummary(initial=np.concatenate([beta, opt1.final]), ftol_rel=1e-15,
                          ftol_abs=0.0,
                          lowerbd=np.concatenate([np.full(p, -np.inf), opt1.lowerbd]),
                          # the fast fit lands within a fraction of a standard error of the
                          # optimum: a quarter-SE first step saved 15-20% of the evaluations
                          initial_step=np.concatenate([np.where(se > 0, 0.25 * se, 0.1),
                                                       np.full(ntheta, 0.05),
                                                       [0.05] * len(extra)]))
        if use_gradient:
            minimize_with_gradient(self._joint_value_and_grad, opt2, progress=progress)
        else:
            minimize(self._joint_value, opt2, progress=progress)
        rectify(self._joint_value, opt2, p + bounded)
        if check_convergence:
            beta_w, theta, phi, fam = self._split(opt2.final, True)
            se = np.sqrt(np.diag(self._vcov_working(theta, beta_w, phi, fam)))
            steps = hessian_steps(opt2.final, se)
            if use_gradient:
                check_optimum_with_gradient(self._joint_value_and_grad, opt2, step=steps,
                                            stencil=self._check_stencil)
            else:
                check_optimum(self._joint_value, opt2, step=steps)
        beta_w, theta, phi, fam = self._split(opt2.final, True)
        return GeneralizedLinearMixedModelFit(self, self._optimum(theta, beta_w, phi, fam),
                                              opt2, fast=False, stage1=opt1)

    def _fit_with_gradient(self, progress, check_convergence, trust_region=True):
        """One stage: a quasi-Newton search over (β̃, θ) with the exact gradient (L-BFGS-B;
        for one term, see below, a trust region), from the GLM's β and
        Λ = I, as glmm does. Measured on verbagg, contra, cbpp and grouseticks: the same
        optima as the two-stage BOBYQA search to 1e-11 in 17-29 evaluations instead of
        110-165; with nAGQ = 3-25 on contra's gm1, cbpp and grouseticks' (1 | index) to
        1e-12 in 18-27 instead of 90-110. (Starting from β scaled by the start's X̃'WX̃,
        or θ by a difference of gradients, saved no evaluations.) None when the search
        does not report success (the caller falls back).

        One term with nAGQ = 1 (the Laplace kernel in one compiled call), unless
        ``trust_region`` is False, takes the trust-region search of the LMMs instead
        (_glmm_search.py; stopping at a relative change of 1e-12), its first quadratic
        model holding the deviance's curvature in β̃ (twice the Schur complement at the
        start's modes). On 200 simulated responses each of cbpp, contra's
        (1 | urban & dist) and (1 + urban | dist), and grouseticks' (1 | brood) and
        (1 | location), it ended every fit within 4e-10 of the best of all searches, in
        11.3, 12.5, 14.4, 11.9 and 10.6 evaluations on average (16.4, 22.8, 17.3, 12.3
        and 14.0 from the scaled identity alone); L-BFGS-B took 17.4, 17.6, 20.9, 13.8
        and 16.8 and ended 9 fits more than 1e-6 above (8 of cbpp's on the bound θ = 0,
        0.09 to 2.3 above, which the bound probe then left; one of the vector term's at
        a saddle 17.3 above, which the fit returned with a warning:
        tests/test_glmm_search.py). A stop at 1e-10 ended one fit 1.3e-6 above."""
        layout, p = self.layout, self.p
        # the bounds, the start and the bound test in Python floats, made arrays once:
        # np.concatenate, np.full, np.flatnonzero, fancy indexing and a comparison's
        # any() on a handful of numbers are each a cold C path of a small fit
        lower_theta = layout.lower.tolist()
        lower = [-math.inf] * p + lower_theta
        opt = OptSummary(initial=np.array(self.beta0.tolist() + layout.initial().tolist(),
                                          dtype=float),
                         lowerbd=np.array(lower, dtype=float))
        if progress or not trust_region or not self._one_term_laplace():
            minimize_with_gradient(self._joint_value_and_grad, opt, progress=progress,
                                   ftol=SEARCH_FTOL)
        else:
            minimize_one_term(self, opt)
        if opt.returnvalue != "SUCCESS" or not math.isfinite(opt.fmin):
            return None
        bounded = [p + i for i, v in enumerate(lower_theta) if math.isfinite(v)]
        final = opt.final.tolist()
        if any(final[i] < lower[i] + BOUND_PROBE for i in bounded):
            # (both look only at components this close to their bound)
            leave_the_bound(self._joint_value_and_grad, opt, bounded, progress)
            rectify(self._joint_value, opt, bounded, near=BOUND_PROBE)
        end = self._evaluation_at(opt.final)
        if check_convergence and not self._check_with_gradient(opt, warn=False).converged:
            # L-BFGS-B reports success where a line search met the wall of non-finite
            # values beyond a far trial step (the wall has no gradient) and came back with
            # a step of zero, which its relative-reduction test reads as convergence
            # (simulated Poisson, nAGQ = 7: 1.3e-4 above the optimum). A fresh start
            # from where the check's Newton step left the fit.
            restart_lbfgsb(self._joint_value_and_grad, opt, opt.final, progress)
            rectify(self._joint_value, opt, bounded, near=BOUND_PROBE)
            self._check_with_gradient(opt, warn=True)
        beta_w, theta, phi, fam = self._split(opt.final, True)
        # PIRLS at the optimum from the modes the search found there, where it was
        # evaluated (a Newton step to confirm them, not five from zero)
        modes = end[3] if end is not None and end[0].tobytes() == opt.final.tobytes() else None
        return GeneralizedLinearMixedModelFit(
            self, self._optimum(theta, beta_w, phi, fam, modes=modes), opt, fast=False)

    # the convergence check's Hessian from the exact gradient: "forward" (n + 1
    # gradients) or "central" (2n + 1; tests compare the two)
    _check_stencil = "forward"

    def _check_with_gradient(self, opt, warn):
        """lme4's check.conv at ``opt.final`` with the Hessian from forward differences
        of the gradient (``_optimize.check_optimum_with_gradient``, which may also take a
        Newton step) in the θ columns, and in the β block twice the Schur complement
        X̃'WX̃ - X̃'WZΛ M⁻¹ Λ'Z'WX̃ of PIRLS's factor at the modes (the deviance's
        curvature in β with the modes profiled out; it leaves out the curvature of log
        det M, a 0.4-2.4 % difference on cbpp, contra, grouseticks and verbagg). That is
        ntheta + 1 gradients instead of n + 1 (verbagg: 3 instead of 9, a fifth of its
        fit), one fewer where the search's last evaluation was at ``opt.final``; neither
        the checks' verdicts (a scaled gradient against 2e-3, positive definiteness) nor
        the Newton step need more, and ``vcov_hessian`` takes the central Hessian again
        when asked for."""
        x = opt.final
        last = self._evaluation_at(x)
        grad = None if last is None else last[2]
        beta_w, theta, phi, fam = self._split(x, True)
        vcov, schur = self._beta_covariance(theta, beta_w, phi, fam, at_modes=last is not None)
        # the standard errors and the β block in Python floats (np.sqrt(np.diag(V)),
        # np.isfinite, 2 S: a handful of numbers, each ufunc a cold C path of its own)
        rows = vcov.tolist()
        se = [math.sqrt(v) if v >= 0.0 else math.nan
              for v in (rows[i][i] for i in range(len(rows)))]
        known = None
        if self._schur_beta_block and all(math.isfinite(v) for row in rows for v in row):
            try:
                known = (self.p, [[2.0 * v for v in row] for row in schur.tolist()]
                         if schur is not None else 2.0 * np.linalg.inv(vcov))
            except np.linalg.LinAlgError:
                known = None
        return check_optimum_with_gradient(self._joint_value_and_grad, opt, warn=warn,
                                           step=hessian_steps(x, se), known=known, grad=grad,
                                           stencil=self._check_stencil)

    # the check's β block from PIRLS's factor (False: from gradient differences, as
    # the θ columns; tests compare the two)
    _schur_beta_block = True

    def _vcov_working(self, theta, beta_w, phi=1.0, family=None, at_modes=False,
                      compiled=True):
        """(X̃'W X̃ - ...)⁻¹ at the modes: the covariance of β̃ given θ (and φ), with the
        working weights of PIRLS (which carry 1/φ for the dispersion families).
        ``at_modes``, ``compiled``: see :meth:`_beta_covariance`."""
        return self._beta_covariance(theta, beta_w, phi, family, at_modes, compiled)[0]

    def _beta_covariance(self, theta, beta_w, phi=1.0, family=None, at_modes=False,
                         compiled=True):
        """(V, S): the covariance V of β̃ given θ (and φ) and, with one term, the Schur
        complement S = X̃'WX̃ - X̃'WZΛ M⁻¹ Λ'Z'WX̃ = V⁻¹ (else None).

        ``at_modes``: the state already holds the modes at these parameters (the caller
        has just evaluated there), so PIRLS is not run again. One term: by the compiled
        PIRLS (``PirlsKernel.beta_covariance``), whose twin is the workspace's
        factorization with the columns [X̃, working response] (``compiled=False``),
        which every other model takes."""
        fam = self.family if family is None else family
        pw = self.prior_w / phi if self.has_dispersion else self.prior_w
        one_term = compiled and self.workspace.factor is None
        if not at_modes:
            if one_term:
                # the modes alone: _value's objective on top of them is not wanted here
                self._u, *_ = pirls(self, theta, beta_w, self._u, prior_w=pw, family=fam)
            else:
                self._value(theta, beta_w, phi, family=fam)
        st, X, off = self.state, self.X, self.offset_or_zero
        p = X.shape[1]
        if one_term:
            schur, vcov = row_kernel(self).beta_covariance(
                np.ascontiguousarray(theta, dtype=float))
            return vcov, schur
        ws = self.workspace
        st.evaluate(fam, self.y, pw, st.eta)
        ws.set_products(X, st.wrkwt, y=st.eta - off + st.wrkresid)
        _, r = ws.factorize(theta)
        return rx_inverse_crossprod(r, p), None

    def _optimum(self, theta, beta_w, phi, fam, modes=None):
        """The numbers of the fit at (θ, β̃, φ) and the family at its parameter, as a
        plain record; PIRLS there from ``modes`` (default: zero)."""
        theta = np.asarray(theta, float)
        beta_w = np.asarray(beta_w, float)
        disp = self.has_dispersion
        self._u = modes
        value, u, _ = self._value(theta, beta_w, phi, family=fam)
        logdet = self._last_logdet
        st = self.state
        mu, eta = st.mu.copy(), st.eta.copy()
        # deviance residuals on the family's own scale (prior weights, not w/φ)
        devresid = st.devresid * phi if disp else st.devresid.copy()
        if self._full_loglik:
            objective = value
            deviance = value
        else:
            # the saturated part, constant in μ: lme4's logLik is the full family log
            # density. One compiled call, bit for bit its twin (tests/test_glmm_cold_path):
            #   float(np.add.reduce(fam.loglik(self.y, mu, self.prior_w, 1.0, eta=eta))
            #         + 0.5 * np.add.reduce(devresid))
            saturated = _glm.saturated_loglik(fam.code, fam.link.code, fam.param, self.y, mu,
                                              self.prior_w, eta, devresid)
            deviance = value
            objective = -2.0 * (-0.5 * value + saturated)
        vcov_w = self._vcov_working(theta, beta_w, phi, fam, at_modes=True)
        fixed = self.fixed
        return dict(theta=theta, coef=fixed.from_working(beta_w), beta_w=beta_w, u=u,
                    b=self.workspace.lambda_times(theta, u), mu=mu, eta=eta,
                    devresid=devresid, logdet=logdet, deviance=float(deviance),
                    objective=float(objective),
                    dispersion=float(phi) if disp else None, family=fam,
                    sigma=float(math.sqrt(phi)) if disp else None,
                    vcov=fixed.vcov_from_working(vcov_w), xbeta=self.X @ beta_w)

    def _hessian_parameters(self, fit):
        """The point (β̃, θ, [log φ | log θ_nb]) of a fit, for the Hessian of the joint
        objective."""
        extra = []
        if self.has_dispersion:
            extra = [math.log(fit.dispersion)]
        elif self.estimates_family_param:
            extra = [math.log(fit.family.param)]
        return np.concatenate([fit.beta_w, fit.theta, extra])


class GeneralizedLinearMixedModelFit(MixedModelFit):
    """A fitted GLMM: a frozen record of the estimates at the optimum.

    Attributes
    ----------
    theta, coef, u, b, mu, eta, devresid, deviance, objective, dispersion (φ, None for
    families without one), sigma (√φ), vcov (conditional on θ and φ), optsum, model
    """

    is_glmm = True

    def __init__(self, model, optimum, optsum, fast=False, stage1=None):
        self._init_record(model, optimum, optsum, nAGQ=model.nAGQ, fast=fast,
                          optsum_fast=stage1)
        if optsum is not None and optsum.returnvalue == "MAXEVAL_REACHED":
            warnings.warn("the GLMM optimizer hit its evaluation limit; the fit may not be at the optimum")

    @property
    def loglik(self):
        """The log-likelihood with the full family log density (lme4's ``logLik``)."""
        return -0.5 * self.objective

    @property
    def success_level(self):
        return self.model.success_level

    def _scale(self):
        # Λ is on the scale of the random effects themselves (b = Λu, u ~ N(0, I)),
        # for the dispersion families too
        return 1.0

    @property
    def dof(self):
        return len(self.coef) + len(self.theta) + self.model._n_extra

    @property
    def nb_theta(self):
        """The negative binomial's θ (size: Var y = μ + μ²/θ), estimated or given; None
        for other families."""
        return self.family.param if self.family.name == "NegativeBinomial" else None

    @property
    def nb_theta_stderror(self):
        """Standard error of the estimated θ_nb, from the Hessian over log θ_nb (delta
        method); None when θ_nb was given or the family is another."""
        if not self.model.estimates_family_param:
            return None
        return self._cached("nb_theta_se", lambda: self.nb_theta * math.sqrt(
            self._hessian_covariance()[-1, -1]))

    def fitted(self):
        """μ, the conditional means on the response scale."""
        return np.array(self.mu)

    @property
    def y(self):
        return self.model.y

    # -- Hessian-based covariance -----------------------------------------------------
    @property
    def vcov_hessian(self):
        """Covariance of β from the Hessian of -2 log L over (β, θ[, φ]).

        The kind lme4's ``summary`` (``use.hessian = TRUE``) and glmmTMB report: θ and φ
        are estimated, not given, so their uncertainty widens β's. The Hessian is the
        convergence check's central-difference one; where the check took a forward
        difference of the exact gradient, the central one is taken at the check's point
        on first use (2n gradients), and where the fit kept none, from values. Variance
        parameters on their bound (zero) are held fixed.
        """
        return self._cached("vcov_hessian", self._compute_vcov_hessian)

    @property
    def stderror_hessian(self):
        return np.sqrt(np.diag(self.vcov_hessian))

    def _compute_vcov_hessian(self):
        cov = self._hessian_covariance()
        p = len(self.coef)
        if not np.all(np.isfinite(cov[:p, :p])):
            return np.full((p, p), np.nan)
        return self.model.fixed.vcov_from_working(cov[:p, :p])

    def _hessian_covariance(self):
        """2 H⁻¹ over (β̃, θ, [log φ | log θ_nb]); rows of parameters on their bound NaN."""
        return self._cached("hessian_covariance", self._compute_hessian_covariance)

    def _compute_hessian_covariance(self):
        model = self.model
        x = model._hessian_parameters(self)
        p = len(self.coef)
        lower = np.concatenate([np.full(p, -np.inf), model.layout.lower,
                                [-np.inf] * (len(x) - p - model.layout.ntheta)])
        derivs = getattr(self.optsum, "derivs", None)
        if self.fast or derivs is None or len(derivs.hessian) != len(x):
            hess = self._finite_difference_hessian(x, lower)
        elif getattr(derivs, "stencil", "central") != "central":
            # the check's forward-difference Hessian is good to ~1e-3, not to the digits
            # of a standard error: take the central one where the check took its own
            if model.has_gradient and derivs.point is not None:
                hess, _ = gradient_hessian(model._joint_value_and_grad, derivs.point,
                                           derivs.step, lower, stencil="central")
                model._u = None
            else:
                hess = self._finite_difference_hessian(x, lower)
        else:
            hess = derivs.hessian
        # parameters on their bound are held fixed (their one-sided curvature says
        # nothing about β's uncertainty)
        free = ~(np.isfinite(lower) & (x <= lower))
        h = np.asarray(hess)[np.ix_(free, free)]
        cov = np.full((len(x), len(x)), np.nan)
        try:
            chol = np.linalg.cholesky(0.5 * (h + h.T))
        except np.linalg.LinAlgError:
            warnings.warn("the Hessian of the objective is not positive definite at the fit: "
                          "no Hessian-based standard errors (they are reported as NaN)")
            return cov
        inv = np.linalg.inv(chol)
        cov[np.ix_(free, free)] = 2.0 * (inv.T @ inv)       # the objective is -2 log L
        return cov

    def _finite_difference_hessian(self, x, lower):
        """The Hessian of the joint objective at ``x`` from central differences of its
        values (n² + n + 1 of them), with the steps of the convergence check."""
        model = self.model
        se = np.sqrt(np.diag(model.fixed.R @ self.vcov @ model.fixed.R.T))
        _, hess = finite_difference_derivatives(model._joint_value, x, lower=lower,
                                                step=hessian_steps(x, se))
        model._u = None
        return hess

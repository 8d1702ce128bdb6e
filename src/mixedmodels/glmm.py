"""Generalized linear mixed models: Laplace approximation and adaptive Gauss-Hermite quadrature.

Notes
-----
The objective is the deviance of MixedModels.jl: at θ and β, PIRLS finds the modes û,
and with nAGQ = 1 (Laplace)

    deviance(β, θ) = Σ dev_i(y_i, μ_i) + ||û||² + 2 log det(L),

with nAGQ > 1 the adaptive Gauss-Hermite version (see _agq.py). The log-likelihood adds
the saturated model's log-likelihood, a constant, so that it equals the full family log
density that lme4's ``logLik`` reports:  loglik = -deviance/2 + Σ [ℓ_i(μ_i) + dev_i/2].

By default β and θ are optimized together (as MixedModels.jl does), starting from a
``fast`` fit in which the optimizer moves θ alone and PIRLS re-solves β with u (lme4's
nAGQ = 0); ``fast=True`` stops after that first stage.
"""
import warnings

import numpy as np

from ._agq import agq_deviance
from ._model import MixedModelSpec
from .lmm import rx_inverse_crossprod
from ._optimize import OptSummary, minimize, rectify
from ._pirls import PirlsState, pirls
from ._results import MixedModelFit
from .families import get_family


class GeneralizedLinearMixedModel(MixedModelSpec):
    """A GLMM specification; ``objective(theta, beta)``, ``deviance`` and ``fit()``.

    Parameters
    ----------
    formula : str
    data : pandas.DataFrame
    family : Family, Family class or str
        ``Bernoulli()``, ``Binomial()`` (proportions, trials as ``weights``), ``Poisson()``...
    weights : str or array, optional
        Prior weights (for Binomial, the number of trials).
    offset : str or array, optional
        Added to the linear predictor.
    contrasts : dict, optional
    nAGQ : int, default 1
        Quadrature points; > 1 needs a single scalar random-effects term.
    """

    def __init__(self, formula, data, family, *, weights=None, offset=None, contrasts=None,
                 nAGQ=1, na_action="drop"):
        super().__init__(formula, data, weights=weights, offset=offset, contrasts=contrasts,
                         na_action=na_action)
        self.family = get_family(family)
        d = self.design
        self.nAGQ = int(nAGQ)
        if self.nAGQ < 1:
            raise ValueError("nAGQ must be a positive integer (use fast=True for lme4's nAGQ=0)")
        if self.nAGQ > 1 and not (len(self.reterms) == 1 and self.reterms[0].ncols == 1):
            raise ValueError(
                f"nAGQ = {self.nAGQ} needs a single scalar random-effects term such as (1 | g); "
                f"this model has {len(self.reterms)} term(s) with "
                f"{sum(t.ncols for t in self.reterms)} column(s). Use nAGQ=1 (Laplace).")
        self.success_level = None
        if d.y_levels is not None:
            if self.family.name != "Bernoulli":
                raise ValueError(f"response '{d.response_name}' is a two-level factor "
                                 f"({', '.join(map(str, d.y_levels))}); use family=Bernoulli()")
            self.success_level = d.y_levels[1]
        self.y = np.ascontiguousarray(d.y, dtype=float)
        self.prior_w = np.ones(self.n) if d.weights is None else np.ascontiguousarray(d.weights, float)
        self.family.validate(self.y, self.prior_w, d.response_name)
        self.offset_or_zero = np.zeros(self.n) if d.offset is None else np.ascontiguousarray(d.offset, float)
        self.state = PirlsState(self.n)
        self._u = np.zeros(self.system.q)
        self.beta0 = self._glm_start()
        self._setup_done()

    def _glm_start(self):
        """β of the GLM without random effects (IRLS), the starting point of the fit."""
        X, y, w, off, fam = self.design.X, self.y, self.prior_w, self.offset_or_zero, self.family
        eta = fam.link.link(fam.starting_mu(y, w))
        st = self.state
        beta = np.zeros(X.shape[1])
        dev_old = np.inf
        for _ in range(50):
            dev = st.evaluate(fam, y, w, eta)
            if abs(dev_old - dev) <= 1e-10 * (abs(dev) + 1e-10):
                break
            dev_old = dev
            sw = np.sqrt(st.wrkwt)
            beta = np.linalg.lstsq(X * sw[:, None], (eta - off + st.wrkresid) * sw, rcond=None)[0]
            eta = X @ beta + off
        return beta

    # -- objective ------------------------------------------------------------------
    def _deviance(self, theta, beta, vary_beta=False, nAGQ=None):
        nAGQ = self.nAGQ if nAGQ is None else nAGQ
        u, beta, logdet, dev, ok = pirls(self, theta, beta, self._u, vary_beta=vary_beta)
        self._u = u
        self._last_logdet = 2.0 * logdet
        if nAGQ > 1:
            return agq_deviance(self, theta, beta, u, nAGQ), u, beta
        return dev + u @ u + 2.0 * logdet, u, beta

    def objective(self, theta, beta=None):
        """The deviance at θ and β (β from PIRLS when None, as in the fast fit)."""
        theta = self._check_theta(theta)
        if beta is None:
            return self._deviance(theta, self.beta0, vary_beta=True)[0]
        return self._deviance(theta, np.asarray(beta, float))[0]

    def fit(self, fast=False, progress=False):
        """Fit by minimizing the deviance; return a :class:`GeneralizedLinearMixedModelFit`."""
        layout, p = self.layout, self.p
        self._u[:] = 0.0
        beta_fast = {"beta": self.beta0.copy()}

        def f_theta(theta):
            val, _, beta = self._deviance(theta, self.beta0, vary_beta=True)
            beta_fast["beta"] = beta
            return val

        opt1 = OptSummary(initial=layout.initial(), lowerbd=layout.lower,
                          initial_step=np.full(layout.ntheta, 0.75))
        minimize(f_theta, opt1, progress=progress)
        rectify(f_theta, opt1, np.flatnonzero(np.isfinite(layout.lower)))
        theta = opt1.final
        self._u[:] = 0.0
        f_theta(theta)
        beta = beta_fast["beta"]
        if fast:
            return GeneralizedLinearMixedModelFit(self, theta, beta, opt1, fast=True)

        se = self._stderror_at(theta, beta)
        ntheta = layout.ntheta

        def f_joint(x):
            return self._deviance(x[p:], x[:p])[0]

        # the deviance is flat in β near the optimum: four digits of β need changes of
        # 1e-9 in the deviance resolved, so stop on a relative change of 1e-15 only
        opt2 = OptSummary(initial=np.concatenate([beta, theta]), ftol_rel=1e-15, ftol_abs=0.0,
                          lowerbd=np.concatenate([np.full(p, -np.inf), layout.lower]),
                          # the fast fit lands within a fraction of a standard error of the
                          # optimum: a quarter-SE first step saved 15-20% of the evaluations
                          initial_step=np.concatenate([np.where(se > 0, 0.25 * se, 0.1),
                                                       np.full(ntheta, 0.05)]))
        minimize(f_joint, opt2, progress=progress)
        rectify(f_joint, opt2, p + np.flatnonzero(np.isfinite(layout.lower)))
        x = opt2.final
        return GeneralizedLinearMixedModelFit(self, x[p:], x[:p], opt2, fast=False, stage1=opt1)

    def _stderror_at(self, theta, beta):
        self._deviance(theta, beta)
        vcov = self._vcov(theta, beta)
        return np.sqrt(np.diag(vcov))

    def _vcov(self, theta, beta, phi=1.0):
        """φ (RX'RX)⁻¹ from the blocked system with the working weights at the modes."""
        st, X, off = self.state, self.design.X, self.offset_or_zero
        self.system.set_products(np.column_stack([X, st.eta - off + st.wrkresid]), st.wrkwt)
        _, r = self.system.factorize(theta)
        return phi * rx_inverse_crossprod(r, X.shape[1])


class GeneralizedLinearMixedModelFit(MixedModelFit):
    """A fitted GLMM: estimates at the optimum, fixed once built."""

    is_glmm = True

    def __init__(self, model, theta, beta, optsum, fast=False, stage1=None):
        self.model = model
        self.family = model.family
        self.nAGQ = model.nAGQ
        self.fast = fast
        self.theta = np.asarray(theta, float)
        self.coef = np.asarray(beta, float)
        self.optsum = optsum
        self.optsum_fast = stage1
        model._u[:] = 0.0
        self.deviance, self.u, _ = model._deviance(self.theta, self.coef)
        st = model.state
        self.mu = st.mu.copy()
        self.eta = st.eta.copy()
        self.devresid = st.devresid.copy()
        self.logdet = model._last_logdet
        self.b = model.system.lambda_times(self.theta, self.u)
        fam = model.family
        self.dispersion = (float(np.sum(self.devresid) / np.sum(model.prior_w))
                           if fam.has_dispersion else None)
        self.sigma = None if self.dispersion is None else float(np.sqrt(self.dispersion))
        self.vcov = model._vcov(self.theta, self.coef, 1.0 if self.dispersion is None else self.dispersion)
        ll_obs = fam.loglik(model.y, self.mu, model.prior_w, 1.0 if self.dispersion is None else self.dispersion)
        # the saturated part, constant in μ: lme4's logLik is the full family log density
        self._ll_saturated = float(np.sum(ll_obs) + 0.5 * np.sum(self.devresid))
        if optsum is not None and optsum.returnvalue == "MAXEVAL_REACHED":
            warnings.warn("the GLMM optimizer hit its evaluation limit; the fit may not be at the optimum")

    @property
    def objective(self):
        """-2 log-likelihood, comparable with lme4's -2 * logLik."""
        return -2.0 * self.loglik

    @property
    def loglik(self):
        return -0.5 * self.deviance + self._ll_saturated

    @property
    def success_level(self):
        return self.model.success_level

    def _scale(self):
        return 1.0

    def fitted(self):
        """μ, the conditional means on the response scale."""
        return self.mu.copy()

    def residuals(self):
        return self.y - self.mu

    @property
    def y(self):
        return self.model.y

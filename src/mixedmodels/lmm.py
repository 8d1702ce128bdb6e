"""Linear mixed models by maximum likelihood or REML, through the profiled deviance.

Notes
-----
For a given θ the blocked system (see _linalg/system.py) gives log det(L), the
Cholesky factor RX of the fixed-effects block and the penalized weighted residual sum of
squares r². With n observations, p fixed effects and d = n (ML) or n - p (REML),

    objective(θ) = 2 log det(L) [+ 2 log det(RX) for REML] + d (1 + log(2π r² / d)) - Σ log w,

the deviance with β and σ² profiled out (σ̂² = r² / d). The last term is present only with
precision weights w.
"""
import math
import time
import warnings

import numpy as np

from ._kernels import _search
from ._linalg._blocked import upper_solve

from ._lmm_gradient import compiled_objective, has_exact_gradient, lmm_value_and_gradient
from ._model import MixedModelSpec
from ._optimize import (BOUND_PROBE, ConvergenceWarning, LastValueAndGradient, OptSummary,
                        _Progress,
                        check_optimum, check_with_exact_gradient, leave_the_bound, minimize,
                        minimize_with_gradient, probe_off_the_bound, rectify)
from ._results import MixedModelFit
from ._trust_region import TR_CONVERGED, TRUST_FTOL, TRUST_RADIUS, trust_region_search


class LinearMixedModel(MixedModelSpec):
    """A linear mixed model specification; ``objective(theta)`` and ``fit()``.

    Parameters
    ----------
    formula : str
        ``response ~ fixed part + (columns | group) + ...``; ``offset(x)`` terms are
        subtracted from the response, as in lme4.
    data : pandas.DataFrame (or a polars / pyarrow table)
    REML : bool, default False
    weights : str or array, optional
        Precision weights (the residual variance of row i is σ²/w_i). Rows of weight
        zero carry no information and are dropped with a warning.
    offset : str or array, optional
        A known part of the mean, subtracted from the response before fitting and added
        back to fitted values and predictions.
    contrasts : dict, optional
        Column name -> coding (``DummyCoding()``, ``EffectsCoding()``, ``HelmertCoding()``...).
    na_action : {"drop", "raise"}
    """

    # the last evaluation (θ, its numbers, the workspace's factorization count)
    _transient = MixedModelSpec._transient + ("_last_evaluated",)
    _last_evaluated = None

    def __init__(self, formula, data, *, REML=False, weights=None, offset=None,
                 contrasts=None, na_action="drop"):
        super().__init__(formula, data, weights=weights, offset=offset, contrasts=contrasts,
                         na_action=na_action, drop_zero_weights=True)
        self.REML = bool(REML)
        d = self.design
        if getattr(d, "binomial_counts", False):
            raise ValueError(f"the response {d.response_name!r} is a cbind() of counts: fit it "
                             "with family=Binomial()")
        if d.y_levels is not None:
            raise ValueError(
                f"response '{d.response_name}' is not numeric (levels {', '.join(map(str, d.y_levels))}); "
                "a linear mixed model needs a numeric response (for a binary one pass family=Bernoulli())")
        self._check_random_effects_count(strict=True)
        if self.REML and self.n <= self.p:
            raise ValueError(f"REML needs more observations ({self.n}) than fixed effects ({self.p})")
        self._logw = 0.0 if d.weights is None else float(np.sum(np.log(d.weights)))
        self._dfr = self.n - self.p if self.REML else self.n    # residual degrees of freedom
        self._response_changed()
        self._setup_done()

    def _response_changed(self):
        d = self.design
        self.y_fit = d.y if d.offset is None else d.y - d.offset
        y = self.y_fit
        # a short response in Python floats: the NumPy reductions would be the only ones
        # of a small fit
        values = y.tolist() if len(y) <= 1000 else None
        if (max(values) - min(values) if values is not None else y.max() - y.min()) == 0:
            what = "response" if d.offset is None else "response less its offset"
            raise ValueError(f"{what} '{d.response_name}' is constant ({self.y_fit[0]:g}): "
                             "there is no variance to partition")
        if self._workspace is not None:
            self._workspace_ready(self._workspace)

    def _workspace_ready(self, ws):
        # [X y] stacked in compiled code: np.column_stack is a cold path of its own
        ws.set_products(self.X, self.design.weights, y=self.y_fit)

    def _evaluate(self, theta):
        result = self._factorized(theta)
        # the record of the fit is taken where the search's last evaluation usually was:
        # keep that point, so that the factorization there is not repeated (insteval: 13 ms)
        self._last_evaluated = (np.array(theta, dtype=float), result,
                                getattr(self.workspace, "nfactorized", None))
        return result

    def _factorized(self, theta):
        logdet, r = self.workspace.factorize(theta)
        pwrss = float(r[-1, -1]) ** 2
        dfr = self._dfr
        if pwrss <= 0.0:
            return -math.inf, logdet, r, pwrss
        val = 2.0 * logdet + dfr * (1.0 + math.log(2.0 * math.pi * pwrss / dfr)) - self._logw
        if self.REML:
            # log det(X'WX) of the original columns: the working basis differs by R̃
            val += 2.0 * (float(np.sum(np.log(np.diag(r)[:-1]))) + self.fixed.logabsdet)
        return val, logdet, r, pwrss

    def objective(self, theta):
        """-2 log-likelihood (ML) or the REML criterion, profiled over β and σ, at θ."""
        return self._evaluate(self._check_theta(theta))[0]

    def _objective_unchecked(self, theta):
        # the optimizer's entry: θ comes from NLopt as a float64 vector of the right length
        try:
            return self._evaluate(theta)[0]
        except np.linalg.LinAlgError:
            # a θ where the system is numerically singular: the optimizer backs off
            return math.inf

    # -- operations for inference: the likelihood away from the profiled optimum -------
    def profiled_parts(self, theta):
        """What the blocked factorization gives at θ, in the coefficients' own coordinates.

        Returns
        -------
        dict
            ``logdet_l`` (log det L, half that of Λ'Z'WZΛ + I), ``logdet_rx`` (log det of
            the fixed-effects factor for the original X, half that of X'V⁻¹X / σ²),
            ``pwrss`` (penalized weighted residual sum of squares at β̂(θ)), ``beta``
            (β̂(θ)), ``rx_inverse_crossprod`` ((RX'RX)⁻¹ for the original X: the covariance
            of β̂ over σ²), ``dfr`` (n for ML, n - p for REML), ``logw`` (Σ log w).
        """
        theta = self._check_theta(theta)
        _, logdet, r, pwrss = self._evaluate(theta)
        p = self.p
        beta_w = r[:p, p].copy()
        upper_solve(r, beta_w)
        fixed = self.fixed
        return dict(logdet_l=float(logdet),
                    logdet_rx=float(np.sum(np.log(np.diag(r)[:-1]))) + fixed.logabsdet,
                    pwrss=float(pwrss), beta=fixed.from_working(beta_w),
                    rx_inverse_crossprod=fixed.vcov_from_working(rx_inverse_crossprod(r, p)),
                    dfr=self._dfr, logw=self._logw)

    def deviance_at(self, theta, sigma, beta=None):
        """-2 log-likelihood (ML) or the REML criterion at θ and σ, not profiled over σ.

        β is profiled out (at β̂(θ)) unless given; REML does not depend on β. At σ̂(θ) this
        equals :meth:`objective`. The profile of σ, the Satterthwaite and Kenward-Roger
        degrees of freedom and the Wald intervals of the variance parameters use it.

        Notes
        -----
        With r² the penalized RSS at β̂ and d = n (ML) or n - p (REML),

            deviance = d log(2πσ²) + 2 log det L [+ 2 log det RX] + (r² + ‖RX(β - β̂)‖²)/σ² - Σ log w.
        """
        parts = self.profiled_parts(theta)
        sigma = float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, not {sigma}")
        rss = parts["pwrss"]
        if beta is not None:
            if self.REML:
                raise ValueError("the REML criterion does not depend on β; pass beta=None")
            delta = np.asarray(beta, dtype=float) - parts["beta"]
            # ‖RX(β - β̂)‖² = δ'(RX'RX)δ
            rss += float(delta @ np.linalg.solve(parts["rx_inverse_crossprod"], delta))
        val = (parts["dfr"] * math.log(2.0 * math.pi * sigma ** 2) + 2.0 * parts["logdet_l"]
               + rss / sigma ** 2 - parts["logw"])
        if self.REML:
            val += 2.0 * parts["logdet_rx"]
        return val

    def vcov_at(self, theta, sigma):
        """σ²(RX'RX)⁻¹ at θ: the covariance of β̂ given θ and σ (original coordinates)."""
        return float(sigma) ** 2 * self.profiled_parts(theta)["rx_inverse_crossprod"]

    def starting_theta(self):
        """Where the optimizer starts, and its initial steps.

        Each term starts from a moment estimate of its covariance relative to σ²: with r
        the OLS residuals, the term's coefficients are fitted level by level (b_j from
        Z_j'Z_j b_j = Z_j'r_j), and their between-level covariance less the average
        sampling covariance s²(Z_j'Z_j)⁻¹, over s², gives ΛΛ' (eigenvalues floored at 0.01,
        so the start keeps off the boundary); θ is its Cholesky factor (its diagonal for
        ``||`` terms) and each step a quarter of θ (at least 0.05). A term with too few
        usable levels starts as lme4 does (Λ = I, step 0.75). Only the path changes, not
        the optimum: insteval takes 37 evaluations instead of 102, sleepstudy 38 for 49.
        """
        # OLS residuals, in the orthogonal working basis
        X, y = self.X, self.y_fit
        beta = np.linalg.lstsq(X, y, rcond=None)[0] if self.p else np.zeros(0)
        r = y - X @ beta
        return start_from_relative(self.layout, self.reterms,
                                   [_relative_covariance(t, r) for t in self.reterms])

    def fit(self, progress=False, initial=None, check_convergence=True, optimizer="auto"):
        """Minimize the objective over θ; return a :class:`LinearMixedModelFit`.

        Parameters
        ----------
        progress : bool
            Show the optimizer's progress on stderr.
        initial : array_like, optional
            The starting θ (default: :meth:`starting_theta` on models with 5,000 rows
            or 500 random effects, else Λ = I as lme4 starts).
        check_convergence : bool, default True
            Compute the gradient and Hessian of the objective over θ at the optimum
            (lme4's ``check.conv``), store them on ``optsum`` and warn when the scaled
            gradient is large or the Hessian is not positive definite. With the exact
            gradient the Hessian is a forward difference of it (n + 1 gradients) and
            Newton steps with it end the fit at the stationary point to the gradient's
            rounding; otherwise both come from finite differences of the objective.
        optimizer : {"auto", "bobyqa", "lbfgs"}
            "auto": where the objective has a compiled exact gradient over θ (a one-term
            model, or a dense tail as penicillin's), the convergence check runs and the
            search starts from Λ = I (a small model), the trust-region quasi-Newton
            search :func:`trust_region_search` (``optsum.optimizer`` "TRUST_REGION_BFGS");
            otherwise NLopt's derivative-free BOBYQA, as lme4 and MixedModels.jl
            ("LN_BOBYQA"). "bobyqa" forces BOBYQA; "lbfgs" is L-BFGS-B with the exact
            gradient (:mod:`._lmm_gradient`). ``optsum.optimizer`` records which ran
            (joined by "+" where BOBYQA went on after it).

        Notes
        -----
        The trust-region search (compiled, _kernels/_search.pyx) uses a value and the
        exact gradient per evaluation; its first box of radius 0.75 is BOBYQA's first
        steps, which keeps it off the far bound that L-BFGS-B's unit step reaches (below).
        Measured on 200 simulated responses (two seeds) each of sleepstudy (ML and REML),
        penicillin, pastes, dyestuff and chickweight (tests/test_gradient_search.py has 20
        of them), against a tight BOBYQA from the better end: no fit ended more than 1e-6
        above that optimum (BOBYQA with ``SEARCH_FTOL``: one, sleepstudy ML at +0.21).
        The search took 12, 11.5, 11.6, 14.5, 6.5 and 15 values-with-gradient on average
        where BOBYQA took 34, 34, 32, 25, 10 and 41 values; the whole fit's log 14, 14,
        14, 17, 8.5 and 18 against 41, 40, 36, 33, 12.5 and 61; five of the 1200 fits
        went on with BOBYQA after the check. Whole fits, interleaved: sleepstudy 195 µs
        warm / 700 µs cold against 296 / 852, penicillin 409 / 688 against 479 / 793,
        chickweight 391 / 707 against 794 / 1117. NLopt's gradient searches did worse on the same
        responses (a first step of 0.75): LD_MMA, LD_CCSAQ and LD_SLSQP took 41-56
        evaluations on sleepstudy and ended fits 1e-3 to 8.5 above the optimum
        (chickweight, sleepstudy REML), LD_LBFGS and LD_TNEWTON more evaluations still.

        Where BOBYQA runs, the exact gradient is available and the convergence check
        runs, BOBYQA stops at a relative change of ``SEARCH_FTOL`` (1e-6) instead of
        1e-12 and the check's Newton steps on the exact gradient (their Hessian
        BFGS-updated as they go) finish the fit: the same optimum to ~1e-12 in θ on sleepstudy, penicillin
        and insteval, with a third fewer evaluations (insteval: 18 BOBYQA values
        instead of 37, sleepstudy 23 instead of 36; on 100 simulated responses of each
        of five models none ended above tight BOBYQA's optimum). Where the check then
        fails, BOBYQA goes on from there with its tight tolerances, and the check runs
        again. L-BFGS-B is no default: it needs a third of BOBYQA's evaluations but each
        with a gradient (insteval: 13 value-and-gradient calls at 3 evaluations each,
        against 20 values), and its unit first step can land on a boundary optimum
        that BOBYQA's small steps never reach (on 200 simulated sleepstudy responses
        from Λ = I it ended 13 fits with the intercept's θ₁₁ = 0, 1.4 to 9 above
        BOBYQA's optimum).
        """
        if optimizer not in ("auto", "lbfgs", "bobyqa"):
            raise ValueError(f"optimizer must be 'auto', 'lbfgs' or 'bobyqa', not {optimizer!r}")
        available = has_exact_gradient(self.workspace)
        polish = check_convergence and available
        use_gradient = optimizer == "lbfgs"
        if use_gradient and not available:
            raise ValueError("this model has no cheap exact gradient over θ "
                             "(see mixedmodels._lmm_gradient); use optimizer='bobyqa'")
        theta0, step = self.starting_theta() if self._moment_start_pays() else (
            self.layout.initial(), np.array([0.75] * self.layout.ntheta))
        if initial is not None:
            theta0, step = self._check_theta(initial), np.full(self.layout.ntheta, 0.75)
        optsum = OptSummary(initial=theta0, lowerbd=self.layout.lower, initial_step=step)
        end = None      # where the search ended and its gradient there
        # (a few parameters: Python floats, not three NumPy calls)
        bounded = np.array([i for i, v in enumerate(self.layout.lower.tolist())
                            if math.isfinite(v)], dtype=np.intp)
        kernel = compiled_objective(self)
        value_and_grad = LastValueAndGradient(
            lambda theta: self._value_and_gradient_safe(theta, kernel))
        if use_gradient:
            # the Newton steps of the check end the fit: L-BFGS-B need not chase the
            # last digits (insteval's objective of 2.4e5 wobbles by 1e-8 at the optimum,
            # and a 1e-14 rule spent 40 line-search evaluations there, ending ABNORMAL)
            minimize_with_gradient(value_and_grad, optsum, progress=progress, ftol=1e-12)
            leave_the_bound(value_and_grad, optsum, bounded, progress, ftol=1e-12)
        elif optimizer == "auto" and polish and kernel.has_gradient and \
                not self._moment_start_pays():
            end = self._trust_region(optsum, progress, kernel)
        else:
            if polish:
                optsum.ftol_rel = self.SEARCH_FTOL
            self._bobyqa(optsum, progress, kernel)
        if not polish:
            self._rectify(optsum, bounded)
        elif not use_gradient:
            # a parameter alone in its column of Λ (a scalar term's θ, the last diagonal
            # entry of a vector term's) has a zero derivative on its bound, so a search
            # stopped early can end there on a saddle the check cannot see (it leaves
            # bound parameters out): chickweight's (1 + time | chick) with BOBYQA at 1e-8
            # ended at θ₂₂ = 0, 0.16 above lme4's optimum at θ₂₂ = 0.04. Where the
            # objective falls away from the bound, the search goes on from the probe.
            probe = probe_off_the_bound(value_and_grad, optsum, bounded)
            if probe is not None:
                self._continue_with_bobyqa(optsum, bounded, progress, start=probe,
                                           check=False, kernel=kernel)
        if check_convergence:
            # the search's last gradient, where the check starts at that very point
            known = (end[1] if end is not None and math.isfinite(optsum.fmin)
                     and end[0].tobytes() == np.asarray(optsum.final, float).tobytes()
                     else None)
            record = self._check_optimum(optsum, warn=False, value_and_grad=value_and_grad,
                                         kernel=kernel, known_grad=known)
            if polish and not (record.converged and _stationary(record)):
                self._continue_with_bobyqa(optsum, bounded, progress, kernel=kernel)
            elif polish and self._rectify(optsum, bounded):
                # a bound tried only now: the shortened search's value is no minimum to
                # compare a trial on the bound with, the polished one is
                self._check_optimum(optsum, warn=False, kernel=kernel)
            for msg in optsum.derivs.messages:
                warnings.warn(msg, ConvergenceWarning, stacklevel=2)
        return LinearMixedModelFit(self, self._optimum(optsum.final, kernel), optsum)

    # BOBYQA's stopping rule where the exact gradient's Newton steps finish the fit
    SEARCH_FTOL = 1e-6

    def _continue_with_bobyqa(self, optsum, bounded, progress, start=None, check=True,
                              kernel=None):
        """BOBYQA with its tight tolerances from the best point so far (or ``start``),
        where the check after a shortened search (loose BOBYQA, or L-BFGS-B) disagrees
        or a bound turns out to be no minimum; then (``check``) the check again."""
        start = optsum.final if start is None else start
        # the first search's steps: smaller ones (5 % of θ) left a fit on a saddle next
        # to a bound (a Hessian with a negative eigenvalue), where BOBYQA's first model
        # saw no way down
        step = optsum.initial_step
        again = OptSummary(initial=np.array(start, dtype=float), lowerbd=optsum.lowerbd,
                           initial_step=None if step is None else np.array(step, dtype=float))
        self._bobyqa(again, progress, kernel)
        optsum.fitlog.extend(again.fitlog)
        optsum.elapsed += again.elapsed
        if again.fmin < optsum.fmin:
            optsum.final, optsum.fmin = again.final, again.fmin
        if optsum.optimizer != again.optimizer:
            optsum.optimizer = f"{optsum.optimizer}+{again.optimizer}"
        optsum.returnvalue = again.returnvalue
        optsum.feval = len(optsum.fitlog)
        self._rectify(optsum, bounded)
        if check:
            self._check_optimum(optsum, warn=False)

    def _bobyqa(self, optsum, progress, kernel=None):
        """BOBYQA over θ (:func:`minimize`), its evaluations in compiled code where NLopt's
        C API was found (_kernels/_search.pyx): ~1 µs an evaluation of a small model
        instead of ~6 µs through Python. ``kernel``: the fit's compiled_objective."""
        objective = self._objective_unchecked
        if not progress and _search.available():
            objective = compiled_objective(self) if kernel is None else kernel
        return minimize(objective, optsum, progress=progress)

    def _trust_region(self, optsum, progress, kernel):
        """The trust-region search with the exact gradient (:func:`trust_region_search`),
        compiled (_kernels/_search.pyx) unless ``progress`` asks for Python's; fills
        ``optsum`` as :func:`minimize` does (every value-and-gradient joins the fit log).
        Returns the point the compiled search ended at and its gradient there (2 by n),
        or None."""
        x0 = np.asarray(optsum.initial, dtype=float)
        lower = np.asarray(optsum.lowerbd, dtype=float)
        t0 = time.perf_counter()
        end = None
        if progress:
            bar = _Progress(True)
            count = [0]

            def value_and_grad(theta):
                out = self._value_and_gradient_safe(theta, kernel)
                count[0] += 1
                bar.update(count[0])
                return out

            xs, fs, code = trust_region_search(value_and_grad, x0, lower,
                                               maxeval=optsum.maxfeval)
            bar.update(count[0], final=True)
        else:
            end = np.empty((2, len(x0)))
            xs, fs, code = _search.trust_region(kernel, x0, lower, TRUST_RADIUS, TRUST_FTOL,
                                                optsum.maxfeval, end)
        optsum.elapsed = time.perf_counter() - t0
        optsum.optimizer = "TRUST_REGION_BFGS"
        optsum.ftol_rel = TRUST_FTOL
        optsum.returnvalue = "FTOL_REACHED" if code == TR_CONVERGED else "MAXEVAL_REACHED"
        values = fs.tolist()
        optsum.fitlog.extend(zip(xs, values))
        if values and min(values) < math.inf:
            best = values.index(min(values))      # the first of equal values
            optsum.fmin, optsum.final = values[best], xs[best].copy()
        else:
            optsum.fmin, optsum.final = math.inf, x0.copy()
        optsum.feval = len(optsum.fitlog)
        if optsum.returnvalue == "MAXEVAL_REACHED" and math.isfinite(optsum.fmin):
            warnings.warn(f"the optimizer stopped after {optsum.feval} evaluations without converging")
        return end

    def _rectify(self, optsum, bounded):
        """:func:`rectify` near the bounds; whether it moved a component there. BOBYQA
        stops within ~1e-4 of a boundary optimum: a component farther off is in the
        interior, and a trial at zero would cost an evaluation (insteval: 3)."""
        final, lower = optsum.final, optsum.lowerbd
        if not any(final[i] < lower[i] + BOUND_PROBE for i in bounded):
            return False
        before = len(optsum.rectified)
        rectify(self._objective_unchecked, optsum, bounded, near=BOUND_PROBE)
        return len(optsum.rectified) > before

    def _check_optimum(self, optsum, warn=True, value_and_grad=None, kernel=None,
                       known_grad=None):
        ws = self.workspace
        if not has_exact_gradient(ws):
            return check_optimum(self._objective_unchecked, optsum, warn=warn)
        value_and_grad = value_and_grad or self._value_and_gradient
        # the Hessian from forward differences of the exact gradient (n + 1 gradients,
        # against n² + n + 1 values), then Newton steps with it: as many as it takes
        # from where a shortened search stopped, each a tenth to a thousandth closer
        return check_with_exact_gradient(value_and_grad, optsum, warn=warn, max_steps=8,
                                         kernel=kernel, known_grad=known_grad)

    def _value_and_gradient_safe(self, theta, kernel=None):
        # the optimizer's entry, as _objective_unchecked
        try:
            return self._value_and_gradient(theta, kernel)
        except np.linalg.LinAlgError:
            return math.inf, np.zeros(len(theta))

    def _value_and_gradient(self, theta, kernel=None):
        """The objective and its exact gradient over θ (see _lmm_gradient.py)."""
        return lmm_value_and_gradient(self, np.asarray(theta, dtype=float), kernel)

    def _moment_start_pays(self):
        """Whether the moment start is worth its cost (~0.3 ms of NumPy calls).

        It saves a third to two thirds of the evaluations where an evaluation is dear
        (insteval: 102 → 36 at 45 ms each), but on a small model the evaluations it saves
        cost less than it does (sleepstudy: 49 → 38 at 8 µs; penicillin takes more, 55
        against 44). The optimum does not depend on the start: the exact-gradient
        Newton steps end both paths at the same θ.
        """
        return self.n >= 5000 or self.workspace.q >= 500

    def _optimum(self, theta, kernel=None):
        """The numbers of the fit at θ, as a plain record (see LinearMixedModelFit);
        ``kernel``: the fit's compiled_objective, which computes them in one call."""
        theta = np.asarray(theta, dtype=float)
        if kernel is not None:
            fixed = self.fixed
            rows = (type(self)._fixed_part is LinearMixedModel._fixed_part
                    and fixed.Rinv.flags.c_contiguous and self.X.flags.c_contiguous)
            # β, its covariance's factor and X̃β̃ from the same call where the model has
            # its rows (an out-of-core one has none)
            sol = kernel.solution(theta, fixed.Rinv, self.X) if rows else kernel.solution(theta)
            beta_w, pwrss = sol["beta_w"], sol["pwrss"]
            sigma = math.sqrt(pwrss / self._dfr)
            if rows:
                coef, cross, xbeta = sol["coef"], sol["coef_crossprod"], sol["xbeta"]
            else:
                coef = fixed.from_working(beta_w)
                cross = fixed.vcov_from_working(sol["rx_inverse_crossprod"])
                xbeta = self._fixed_part(beta_w)
            return dict(theta=theta, objective=float(sol["objective"]),
                        logdet=2.0 * sol["logdet"], pwrss=pwrss, coef=coef, sigma=sigma,
                        vcov=sigma ** 2 * cross, u=sol["u"], b=sol["b"], xbeta=xbeta)
        last = self._last_evaluated
        if (last is not None and last[2] is not None and np.array_equal(last[0], theta)
                and last[2] == getattr(self.workspace, "nfactorized", None)):
            val, logdet, r, pwrss = last[1]
        else:
            val, logdet, r, pwrss = self._evaluate(theta)
        p = self.p
        beta_w = r[:p, p].copy()
        upper_solve(r, beta_w)
        sigma = float(np.sqrt(pwrss / self._dfr))
        ws = self.workspace
        cu = np.asfortranarray((ws.rzxy[:, p] - ws.rzxy[:, :p] @ beta_w)[:, None])
        u = ws.backward(cu)[:, 0].copy()
        fixed = self.fixed
        return dict(theta=theta, objective=float(val), logdet=2.0 * logdet, pwrss=float(pwrss),
                    coef=fixed.from_working(beta_w), sigma=sigma,
                    vcov=sigma ** 2 * fixed.vcov_from_working(rx_inverse_crossprod(r, p)),
                    u=u, b=ws.lambda_times(theta, u), xbeta=self._fixed_part(beta_w))

    def _fixed_part(self, beta_w):
        """X̃β̃ for every row (the fit's ``xbeta``); an out-of-core model has no rows."""
        return self.X @ beta_w


# the largest scaled gradient (the Newton decrement's components) at which a shortened
# search's end, after the polish, counts as the optimum; lme4's check allows 2e-3
STATIONARY_TOL = 1e-6


def _stationary(record):
    """Whether the polish ended at the stationary point, not merely within lme4's
    tolerance of it (sleepstudy simulated: a search stopped 0.06 above the optimum,
    three Newton steps left a scaled gradient of 4e-4, 1e-7 above the optimum)."""
    # NaN (a parameter on its bound) compares False: only the finite ones can fail
    return not any(abs(g) > STATIONARY_TOL for g in record.scaled_gradient.tolist())


def start_from_relative(layout, reterms, rels):
    """θ and the optimizer's first steps from each term's relative covariance ΛΛ'
    (see ``LinearMixedModel.starting_theta``); a term whose estimate is None starts as
    lme4 does (Λ = I, step 0.75)."""
    theta = layout.initial()
    step = np.full(layout.ntheta, 0.75)
    pos = 0
    for t, rel in zip(reterms, rels):
        k = t.ncols
        npar = k if t.zerocorr else k * (k + 1) // 2
        if rel is not None:
            if t.zerocorr:
                vals = np.sqrt(np.diag(rel))
            else:
                chol = np.linalg.cholesky(rel)
                vals = np.array([chol[e, a] for a in range(k) for e in range(a, k)])
            theta[pos:pos + npar] = vals
            step[pos:pos + npar] = np.maximum(0.25 * np.abs(vals), 0.05)
        pos += npar
    return theta, step


def _relative_covariance(term, r):
    """Moment estimate of a term's random-effects covariance over σ² (see starting_theta)."""
    k, c, z, nlev = term.ncols, term.codes, term.z, term.nlevels
    ztz = np.empty((nlev, k, k))
    ztr = np.empty((nlev, k))
    for a in range(k):
        ztr[:, a] = np.bincount(c, weights=z[:, a] * r, minlength=nlev)
        for e in range(a, k):
            ztz[:, a, e] = ztz[:, e, a] = np.bincount(c, weights=z[:, a] * z[:, e], minlength=nlev)

    def level_rss(usable, coef):
        rows = usable[c]
        resid = (r - np.einsum("ij,ij->i", z, coef[c]))[rows]
        return float(resid @ resid), resid.size

    return relative_covariance_of_levels(ztz, ztr, level_rss)


def relative_covariance_of_levels(ztz, ztr, level_rss):
    """The moment estimate from the per-level Z_l'Z_l (``ztz``, levels by k by k) and
    Z_l'r_l (``ztr``): b_l from Z_l'Z_l b_l = Z_l'r_l on the levels whose own system is
    solvable, and ``level_rss(usable, coef)`` -> (their residual sum of squares, their
    number of rows), from the rows in memory or from per-level moments out of core."""
    k = ztz.shape[1]
    # levels whose own k-by-k system is solvable (a determinant well away from zero
    # relative to its diagonal: cheaper than a rank decomposition per level)
    diag_prod = np.prod(np.diagonal(ztz, axis1=1, axis2=2), axis=1)
    if k == 1:
        usable = diag_prod > 0.0
    else:
        usable = (diag_prod > 0.0) & (np.linalg.det(ztz) > 1e-10 * diag_prod)
    if usable.sum() < k + 2:
        return None
    if k == 1:
        inv = 1.0 / ztz[usable]
    else:
        inv = np.linalg.inv(ztz[usable])
    coef = np.zeros((ztz.shape[0], k))
    coef[usable] = np.einsum("lij,lj->li", inv, ztr[usable])
    rss, nrows = level_rss(usable, coef)
    dfw = nrows - k * int(usable.sum())
    if dfw <= 0:
        return None
    s2 = rss / dfw
    if not (s2 > 0.0 and np.isfinite(s2)):
        return None
    dev = coef[usable] - coef[usable].mean(axis=0)
    between = dev.T @ dev / (len(dev) - 1)
    rel = (between - s2 * inv.mean(axis=0)) / s2
    if k == 1:
        return np.maximum(rel, 0.01)
    w, v = np.linalg.eigh((rel + rel.T) / 2)
    return (v * np.maximum(w, 0.01)) @ v.T


def rx_inverse_crossprod(r, p):
    """(RX'RX)⁻¹ = RX⁻¹ RX⁻ᵀ from the leading p-square block of the upper factor r."""
    rxinv = np.eye(p)
    for j in range(p):
        col = np.ascontiguousarray(rxinv[:, j])
        upper_solve(r, col)
        rxinv[:, j] = col
    return rxinv @ rxinv.T


class LinearMixedModelFit(MixedModelFit):
    """A fitted linear mixed model: a frozen record of the estimates at the optimum.

    Attributes
    ----------
    theta, coef (β), b (conditional modes, u's order), u, sigma, vcov, objective, optsum,
    model (the specification, whose workspace is rebuilt on demand)
    """

    def __init__(self, model, optimum, optsum=None):
        self._init_record(model, optimum, optsum, REML=model.REML)

    @property
    def loglik(self):
        return -0.5 * self.objective

    @property
    def deviance(self):
        return self.objective

    def fitted(self):
        """X β + Z b (+ offset)."""
        return self.linpred()

"""What LMM and GLMM fits share: the accessors of a fitted mixed model.

A fit is a frozen record of numbers built once, at the optimum: assigning to one of
its attributes raises. It refers to the specification it came from (``fit.model``,
with ``objective(theta)`` for re-evaluation), whose compiled workspace is rebuilt on
demand, so a fit pickles, copies and travels to other processes.
"""
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import norm

from ._summary import coeftable as _coeftable
from ._summary import compact_table as _compact_table
from ._summary import format_compact_table as _format_compact_table
from ._summary import format_model
from ._varcorr import VarCorr


class MixedModelFit:
    """Base of fitted mixed models: a frozen record set once by ``_init_record``."""

    is_glmm = False
    family = None
    nAGQ = 1
    REML = False
    _frozen = False

    def _init_record(self, model, optimum, optsum, **extra):
        record = {**optimum, **extra}
        for name, value in record.items():
            if isinstance(value, np.ndarray):
                value = record[name] = value.copy()
                value.flags.writeable = False
        record.update(model=model, optsum=optsum, _cache={}, _frozen=True)
        # the instance's own attributes, set at once (__setattr__ refuses them)
        self.__dict__.update(record)

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError(f"a fitted model is a frozen record; cannot set {name!r} "
                                 "(refit the specification, fit.model, instead)")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        raise AttributeError(f"a fitted model is a frozen record; cannot delete {name!r}")

    def _cached(self, key, compute):
        """A derived value computed once on demand (the record itself never changes)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # -- coefficients -------------------------------------------------------------------
    @property
    def coef_names(self):
        return list(self.model.design.coef_names)

    @property
    def dropped_coefs(self):
        return list(self.model.design.dropped)

    @property
    def fixef(self):
        """Fixed effects as a pandas Series indexed by coefficient name."""
        return pd.Series(self.coef, index=self.coef_names, name="fixef")

    @property
    def stderror(self):
        return np.sqrt(np.diag(self.vcov))

    # -- inference (the inference/ package; each method hands the fit over) ---------------
    def confint(self, method="wald", level=0.95, **kwargs):
        """Confidence intervals for the variance parameters and the fixed effects.

        Parameters
        ----------
        method : {"wald", "profile", "bootstrap"}
        level : float
        **kwargs
            Passed to the method (for "bootstrap": ``n``, ``seed``, ``n_jobs``...).

        Returns
        -------
        pandas.DataFrame
            Indexed by parameter with lme4's names (``sd_(Intercept)|subj``,
            ``cor_days.(Intercept)|subj``, ``sigma``, then the coefficients); columns
            ``lower``, ``upper``.
        """
        from .inference.confint import confint
        return confint(self, method=method, level=level, **kwargs)

    def profile(self, **kwargs):
        """The likelihood profile of every parameter (see inference/profile.py)."""
        from .inference.profile import profile
        return profile(self, **kwargs)

    def simulate(self, n=1, seed=None):
        """Responses drawn from the fitted model: an array of shape (n, nobs)."""
        from .inference.simulate import simulate
        return simulate(self, n=n, seed=seed)

    def condvar(self):
        """Conditional covariances of the random effects, per grouping factor: an
        array (levels, k, k) in the order of ``ranef()[group].index``."""
        from .inference.condvar import condvar
        return condvar(self)

    def anova(self, type=3, ddf="satterthwaite", labels="lme4"):
        """F tests of the fixed-effect terms (LMMs): one row per term.

        ``type`` 1, 2 or 3 (lmerTest's); ``ddf`` "satterthwaite" or "kenward-roger";
        ``labels`` "lme4" (``time:diet``) or "mixedmodels" (``time & diet``).
        """
        from .inference.ddf import anova
        return anova(self, type=type, ddf=ddf, labels=labels)

    def coeftable(self, se="conditional", ddf=None):
        """Coef., Std. Error, z and Pr(>|z|) as a DataFrame indexed by coefficient name.

        Parameters
        ----------
        se : {"conditional", "hessian"}
            "conditional" (the default, MixedModels.jl's and the tutorial's): the
            covariance of β given the variance parameters, φ(RX'RX)⁻¹. "hessian" (GLMMs):
            from the Hessian of -2 log L over β and the variance parameters, as lme4's
            ``summary`` and glmmTMB report (``vcov_hessian``).
        ddf : {None, "satterthwaite", "kenward-roger"}
            LMMs: add ``df``, ``t`` and ``Pr(>|t|)`` with these denominator degrees of
            freedom (Kenward-Roger also adjusts ``Std. Error``; REML fits only).
        """
        if ddf is not None:
            if se != "conditional":
                raise ValueError("ddf applies to the conditional standard errors of an LMM")
            from .inference.ddf import coeftable_ddf
            return coeftable_ddf(self, ddf=ddf)
        if se == "conditional":
            return _coeftable(self)
        if se == "hessian":
            if not self.is_glmm:
                raise ValueError("se='hessian' applies to GLMMs; a linear mixed model's "
                                 "standard errors are exact given θ (lme4 reports the same)")
            return _coeftable(self, self.stderror_hessian)
        raise ValueError(f"se must be 'conditional' or 'hessian', not {se!r}")

    def compact_table(self):
        """Est., SE, z, p and the σ of each grouping factor (MixedModels.jl's summary table)."""
        return _compact_table(self)

    def format_compact_table(self, digits=4):
        """The compact table as MixedModels.jl prints it (Est., SE, z, p, σ per group)."""
        return _format_compact_table(self, digits=digits)

    # -- random effects -----------------------------------------------------------------
    @property
    def model_terms(self):
        return self.model.reterms

    @property
    def reterm_names(self):
        return [t.group_name for t in self.model.reterms]

    @property
    def reterm_cnames(self):
        return [list(t.cnames) for t in self.model.reterms]

    @property
    def ngroups(self):
        return [t.nlevels for t in self.model.reterms]

    @property
    def lambda_(self):
        """The lower-triangular template of Λ for each term (θ on the relative scale)."""
        return self.model.layout.templates(self.theta)

    def _scale(self):
        return 1.0 if self.sigma is None else self.sigma

    @property
    def varcorr(self):
        s2 = self._scale() ** 2
        groups = [(t.group_name, list(t.cnames), s2 * (lam @ lam.T), bool(t.zerocorr))
                  for t, lam in zip(self.model.reterms, self.lambda_)]
        return VarCorr(groups, self.sigma)

    @property
    def reterm_sds(self):
        s = self._scale()
        return [s * np.sqrt(np.sum(lam * lam, axis=1)) for lam in self.lambda_]

    def ranef(self):
        """Conditional modes of the random effects, b = Λu, per grouping factor.

        Returns
        -------
        dict of str -> DataFrame
            One DataFrame per grouping factor, indexed by level, a column per random-effect
            column; terms on the same grouping factor are joined side by side.
        """
        out = {}
        for t, blk in zip(self.model.reterms, self._b_blocks()):
            frame = pd.DataFrame(blk, index=pd.Index(t.levels, name=t.group_name),
                                 columns=list(t.cnames))
            if t.group_name in out:
                out[t.group_name] = out[t.group_name].join(frame, rsuffix="'")
            else:
                out[t.group_name] = frame
        return out

    def _b_blocks(self):
        blocks, o = [], 0
        for t in self.model.reterms:
            k, nl = t.ncols, t.nlevels
            blocks.append(self.b[o:o + k * nl].reshape(nl, k))
            o += k * nl
        return blocks

    # -- model matrices and fitted values -----------------------------------------------
    @property
    def X(self):
        return self.model.design.X

    @property
    def y(self):
        return self.model.design.y

    @property
    def Z(self):
        """The random-effects model matrix (n-by-q, CSC), columns in u's order."""
        return self.model.Z

    @property
    def nobs(self):
        return len(self.model.design.y)

    def residuals(self, kind="response"):
        """Residuals of the fit, on one of four scales.

        Parameters
        ----------
        kind : {"response", "pearson", "deviance", "working"}
            - ``"response"``: y - μ, with μ = ``fitted()`` (the conditional mean).
            - ``"pearson"``: (y - μ) √(w / (φ V(μ))) with prior (precision) weights w,
              the family's variance function V and dispersion φ: an LMM's is
              (y - μ) √w / σ; Bernoulli, binomial and Poisson fits have φ = 1 (lme4's
              Pearson residuals); Gamma, inverse Gaussian and Normal-with-a-link fits
              divide by σ = √φ, which lme4 leaves out.
            - ``"deviance"``: sign(y - μ) √d with d the observation's contribution to
              the family deviance (prior weights in, φ not: ``devresid`` of a GLMM fit;
              w (y - μ)² for an LMM), as lme4 and R's ``glm`` give them.
            - ``"working"``: (y - μ) dη/dμ, the residual of PIRLS's working response
              (the response residual for an LMM).

        Returns
        -------
        numpy.ndarray
            One value per observation used in the fit.
        """
        if kind not in ("response", "pearson", "deviance", "working"):
            raise ValueError('kind must be "response", "pearson", "deviance" or "working", '
                             f"not {kind!r}")
        mu = np.asarray(self.fitted(), dtype=float)
        r = np.asarray(self.y, dtype=float) - mu
        if kind == "response":
            return r
        if not self.is_glmm:
            if kind == "working":
                return r
            w = self.model.design.weights
            if w is not None:
                r = r * np.sqrt(np.asarray(w, dtype=float))
            return r / self.sigma if kind == "pearson" else r
        fam = self.family
        if kind == "working":
            return r / fam.link.mu_eta(np.asarray(self.eta, dtype=float))
        if kind == "deviance":
            return np.sign(r) * np.sqrt(np.maximum(np.asarray(self.devresid, dtype=float), 0.0))
        phi = 1.0 if self.dispersion is None else float(self.dispersion)
        return r * np.sqrt(np.asarray(self.model.prior_w, dtype=float) / (phi * fam.variance(mu)))

    def linpred(self):
        """X β + Z b (+ offset)."""
        # X̃β̃ rather than Xβ: the same numbers, without the cancellation an
        # uncentred predictor causes in Xβ
        eta = self.xbeta + self.Z @ self.b
        off = self.model.design.offset
        return eta if off is None else eta + off

    def predict(self, newdata=None, type="response", new_levels="population", offset=None):
        """Predictions for new data (or the fitted data when ``newdata`` is None).

        Parameters
        ----------
        newdata : pandas.DataFrame, optional
            Must hold the columns of the fixed part and the grouping factors.
        type : {"response", "link"}
            The mean μ = g⁻¹(η), or the linear predictor η (the same for an LMM).
        new_levels : {"population", "error"}
            For a level of a grouping factor not seen in fitting (or missing): use a
            random effect of zero (the population-level prediction), or raise.
        offset : array, optional
            Added to η for the new rows (a model fitted with ``offset=`` needs one;
            ``offset(x)`` terms of the formula are evaluated on ``newdata``).

        Returns
        -------
        numpy.ndarray
        """
        if type not in ("response", "link"):
            raise ValueError('type must be "response" or "link"')
        if new_levels not in ("population", "error"):
            raise ValueError('new_levels must be "population" or "error"')
        if newdata is None:
            eta = self.linpred()
        else:
            eta = self.model.design.fixed_matrix(newdata) @ self.coef
            for term, blk in zip(self.model.reterms, self._b_blocks()):
                codes, z = term.new_codes(newdata)
                unseen = codes < 0
                if unseen.any() and new_levels == "error":
                    bad = sorted(set(map(str, np.asarray(newdata[term.group_name.split(" & ")[0]])[unseen])))
                    raise ValueError(f"grouping factor '{term.group_name}' has levels not seen in fitting "
                                     f"(e.g. {bad[:5]}); pass new_levels='population' to predict with zero random effects")
                contrib = np.einsum("ij,ij->i", z, blk[np.where(unseen, 0, codes)])
                eta = eta + np.where(unseen, 0.0, contrib)
            # offset(x) terms of the formula apply to new rows as they did in fitting
            offset_for = getattr(self.model.design, "offset_for", None)
            formula_offset = offset_for(newdata) if offset_for is not None else None
            if formula_offset is not None:
                eta = eta + formula_offset
            if offset is not None:
                eta = eta + np.asarray(offset, dtype=float)
        if type == "link" or self.family is None:
            return eta
        return self.family.link.inverse(eta)

    # -- likelihood summaries -----------------------------------------------------------
    @property
    def dof(self):
        return len(self.coef) + len(self.theta) + (0 if self.sigma is None else 1)

    @property
    def aic(self):
        return -2 * self.loglik + 2 * self.dof

    @property
    def aicc(self):
        n, k = self.nobs, self.dof
        return self.aic + 2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else np.inf

    @property
    def bic(self):
        return -2 * self.loglik + self.dof * np.log(self.nobs)

    @property
    def formula(self):
        return self.model.formula

    @property
    def singular(self):
        """θ on its boundary: a diagonal entry of some Λ template is (near) zero."""
        lower = self.model.layout.lower
        return bool(np.any(self.theta[np.isfinite(lower)] < 1e-4))

    # -- tables for notebooks and reports ------------------------------------------------
    def tidy(self, effects=("fixed", "ran_pars"), conf_int=False, conf_level=0.95,
             conf_method="wald", **kwargs):
        """One row per parameter, in broom.mixed's layout (see _tidy.py for its rules).

        Parameters
        ----------
        effects : str or sequence of {"fixed", "ran_pars", "ran_vals"}
            Default ("fixed", "ran_pars").
        conf_int : bool
            Add ``conf_low`` and ``conf_high``.
        conf_level : float
        conf_method : {"wald", "profile", "bootstrap"}
        **kwargs
            ``ddf`` ("satterthwaite" or "kenward-roger", LMMs: t tests with a ``df``
            column); the rest go to :meth:`confint` (``n``, ``seed`` for the bootstrap).

        Returns
        -------
        pandas.DataFrame
            Columns ``effect``, ``group``, [``level``,] ``term``, ``estimate``,
            ``std_error``, ``statistic``, [``df``,] ``p_value``[, ``conf_low``,
            ``conf_high``].
        """
        from ._tidy import tidy
        return tidy(self, effects=effects, conf_int=conf_int, conf_level=conf_level,
                    conf_method=conf_method, **kwargs)

    def to_markdown(self, table="compact", digits=4):
        """A table of the fit as Markdown, in MixedModels.jl's layout.

        Parameters
        ----------
        table : {"compact", "coeftable", "varcorr"}
            "compact" (the notebook display): Est., SE, z, p and σ per grouping factor,
            as :meth:`format_compact_table`; "coeftable": Coef., Std. Error, z,
            Pr(>|z|) as ``print(fit)``; "varcorr": the variance components.
        digits : int
            Decimals of the compact table (as :meth:`format_compact_table`).

        Every number is shown as the printed table shows it.
        """
        from ._display import fit_table
        return fit_table(self, table, digits).to_markdown()

    def to_html(self, table="compact", digits=4):
        """A table of the fit as HTML (see :meth:`to_markdown`); captioned with the model."""
        from ._display import fit_table
        return fit_table(self, table, digits).to_html()

    def to_latex(self, table="compact", digits=4):
        """A table of the fit as a LaTeX ``tabular``, to paste into a paper (see
        :meth:`to_markdown`; no LaTeX packages needed)."""
        from ._display import fit_table
        return fit_table(self, table, digits).to_latex()

    def _repr_markdown_(self):
        return self.to_markdown()

    def _repr_html_(self):
        return self.to_html()

    def __repr__(self):
        return format_model(self)

    def __str__(self):
        return format_model(self)


def pvalues(coef, se):
    """Two-sided normal p-values of coef/se."""
    return 2 * norm.sf(np.abs(np.asarray(coef) / np.asarray(se)))


def random_effects_matrix(reterms):
    """Z as a sparse n-by-q CSC matrix from the terms' codes and columns (u's order:
    term by term, level by level, the term's columns within a level)."""
    n = len(reterms[0].codes)
    rows, cols, vals = [], [], []
    uoff = 0
    for t in reterms:
        k = t.ncols
        base = uoff + t.codes.astype(np.int64) * k
        for a in range(k):
            rows.append(np.arange(n))
            cols.append(base + a)
            vals.append(t.z[:, a])
        uoff += k * t.nlevels
    return sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n, uoff))

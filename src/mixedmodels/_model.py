"""What LMM and GLMM specifications share: the design, the term order, the workspace.

A specification is a record of the model: formula, design (y, X, terms, weights,
offset), the θ layout and the fixed-effects basis. The workspace (cross-products, the
CHOLMOD factor, scratch arrays; compiled objects that cannot be pickled) is built on
first use and dropped when the specification is pickled or copied, so a specification,
and a fit that refers to it, is a plain picklable record. ``with_response(y)`` gives
the same model with a new response (bootstrap, simulation, refits).
"""
import copy
import dataclasses
import time
import warnings

import numpy as np

from ._fixed import FixedEffectsBasis
from ._linalg._pattern import term_order
from ._linalg.system import BlockedSystem, ThetaLayout
from ._results import random_effects_matrix
from .formula import build_design
from .formula._design import _as_frame, _design_and_qr


class MixedModelSpec:
    """The parts of a model specification that do not depend on the family.

    Attributes
    ----------
    design : formula.Design
        y, X, the random-effects terms as the formula gave them, weights, offset.
    reterms : list of ReTerm
        The terms in decreasing order of their number of levels (θ's order, lme4's too).
    layout : ThetaLayout
        How θ fills the Λ templates.
    fixed : FixedEffectsBasis
        X = X̃ R̃ with X̃ orthogonal: the fitting code works with X̃ and β̃ = R̃β.
    workspace : BlockedSystem
        Cross-products and their factorization at θ; built on demand, never pickled.
    """

    # attributes rebuilt on demand, never pickled
    _transient = ("_workspace", "_Z")

    def __init__(self, formula, data, *, weights=None, offset=None, contrasts=None,
                 na_action="drop", drop_zero_weights=False):
        self._t0 = time.perf_counter()   # set-up time: the subclasses finish the clock
        self.formula = formula
        # build_design, keeping the QR of X that its rank test makes
        qr = []
        design = _design_and_qr(formula, data, contrasts, weights, offset, na_action, qr)
        if drop_zero_weights and design.weights is not None and np.any(design.weights == 0):
            design = _without_zero_weights(design, formula, data, contrasts, weights, offset,
                                           na_action)
            qr = []
        self.design = design
        if not design.reterms:
            raise ValueError(f"formula {formula!r} has no random-effects term like (1 | g); "
                             "fit a fixed-effects model with another library")
        self.reterms = _in_term_order(design.reterms)
        self.layout = ThetaLayout([t.ncols for t in self.reterms],
                                  [t.zerocorr for t in self.reterms])
        self.fixed = FixedEffectsBasis(design.X, design.coef_names, qr=qr[0] if qr else None,
                                       ones=getattr(design._fixed, "subterms", None) == ((),))
        self._workspace = None
        self._Z = None

    # -- the workspace, rebuilt on demand -------------------------------------------
    @property
    def workspace(self):
        """The blocked system of this model (built on first use)."""
        if self._workspace is None:
            terms = self.reterms
            self._workspace = BlockedSystem([t.codes for t in terms], [t.z for t in terms],
                                            [t.nlevels for t in terms],
                                            [bool(t.zerocorr) for t in terms],
                                            layout=self.layout)
            self._workspace_ready(self._workspace)
        return self._workspace

    def _workspace_ready(self, ws):
        """Subclasses load the per-model data into a fresh workspace."""

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._transient:
            state[name] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __copy__(self):
        new = object.__new__(type(self))
        new.__setstate__(self.__getstate__())
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def with_response(self, y):
        """The same model with a new response (same X, terms, weights and offset).

        Parameters
        ----------
        y : array_like, shape (n,)
            One value per row used in fitting (``len(model.design.y)``).

        Returns
        -------
        A specification of the same class, with its own workspace.
        """
        new = copy.copy(self)
        new.replace_response(y)
        return new

    def replace_response(self, y):
        """In place: a new response for this specification, keeping its workspace.

        The block structure, the symbolic factorization and the fixed-effects basis do
        not depend on y, so only the response's cross-products are recomputed. This is
        the cheap path for a bootstrap worker that refits one private copy of a model
        (``copy.copy(fit.model)``) to many responses; :meth:`with_response` is the safe
        one that leaves the original alone.
        """
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.shape != self.design.y.shape:
            raise ValueError(f"the new response has {y.size} values; the model has "
                             f"{self.design.y.size} rows")
        if not np.isfinite(y).all():
            raise ValueError("the new response has missing or non-finite values")
        self.design = dataclasses.replace(self.design, y=y)
        self._response_changed()

    def _response_changed(self):
        """Subclasses recompute what depends on y (checks, starting values, products)."""

    def _setup_done(self):
        """Record ``setup_seconds``: formula, design, block pattern, symbolic analysis,
        cross-products — everything before the first objective evaluation."""
        self.workspace
        self.setup_seconds = time.perf_counter() - self._t0

    @property
    def n(self):
        return len(self.design.y)

    @property
    def p(self):
        return self.design.X.shape[1]

    @property
    def X(self):
        """The working fixed-effects matrix X̃ (orthogonal columns; see _fixed.py)."""
        return self.fixed.X

    @property
    def path(self):
        """'block-diagonal' or 'cholmod': how the random-effects block is factored."""
        return self.workspace.path

    @property
    def Z(self):
        if self._Z is None:
            self._Z = random_effects_matrix(self.reterms)
        return self._Z

    def describe(self):
        """One line on the structure of the model and the factorization it uses."""
        return self.workspace.describe()

    def _check_theta(self, theta):
        theta = np.asarray(theta, dtype=float).ravel()
        if theta.shape != (self.layout.ntheta,):
            raise ValueError(f"theta has {theta.size} values; this model has {self.layout.ntheta}")
        return theta

    def _check_random_effects_count(self, strict):
        """Refuse terms with more random effects than observations, as lme4 does
        (``check.nobs.vs.nRE``: ``<=`` for an LMM, whose residual variance also needs
        room, ``<`` for a GLMM)."""
        n = self.n
        for t in self.reterms:
            q = t.nlevels * t.ncols
            if (q >= n) if strict else (q > n):
                raise ValueError(
                    f"term ({' + '.join(t.cnames)} | {t.group_name}) has {q} random effects "
                    f"for {n} observations: the random-effects parameters are not "
                    "identifiable (lme4 refuses this model too)")


def _in_term_order(reterms):
    """The terms by decreasing number of levels (see :func:`_pattern.term_order`), as a
    new list."""
    if len(reterms) == 1:
        return [reterms[0]]
    return [reterms[i] for i in term_order([t.nlevels for t in reterms])]


def _without_zero_weights(design, formula, data, contrasts, weights, offset, na_action):
    """Rebuild the design without rows of zero weight, warning how many there were.

    A zero precision weight makes a row carry no information, but left in, it enters
    the log-likelihood as log(0); lme4 likewise fits the model without them.
    """
    zero = design.weights == 0
    count = int(zero.sum())
    warnings.warn(f"dropped {count} of {design.n} row(s) with zero weight: they carry no "
                  "information about the model", stacklevel=4)
    frame = _as_frame(data)
    keep = design.rows_used[~zero]
    sub = frame.iloc[keep].reset_index(drop=True)

    def rows_of(value):
        if value is None or isinstance(value, str):
            return value
        return np.asarray(value)[keep]

    return build_design(formula, sub, contrasts=contrasts, weights=rows_of(weights),
                        offset=rows_of(offset), na_action=na_action)

"""What LMM and GLMM specifications share: the design, the term order, the workspace."""
import time
from functools import cached_property

import numpy as np

from ._linalg._pattern import term_order
from ._linalg.system import BlockedSystem
from ._results import random_effects_matrix
from .formula import build_design


class MixedModelSpec:
    """The parts of a model specification that do not depend on the family.

    Attributes
    ----------
    design : formula.Design
        y, X, the random-effects terms as the formula gave them, weights, offset.
    reterms : list of ReTerm
        The terms in decreasing order of their number of levels (θ's order, lme4's too).
    system : BlockedSystem
        The workspace: cross-products and their factorization at θ.
    """

    def __init__(self, formula, data, *, weights=None, offset=None, contrasts=None,
                 na_action="drop"):
        self._t0 = time.perf_counter()   # set-up time: the subclasses finish the clock
        self.formula = formula
        self.design = design = build_design(formula, data, contrasts=contrasts, weights=weights,
                                            offset=offset, na_action=na_action)
        if not design.reterms:
            raise ValueError(f"formula {formula!r} has no random-effects term like (1 | g); "
                             "fit a fixed-effects model with another library")
        order = term_order([t.nlevels for t in design.reterms])
        self.reterms = [design.reterms[i] for i in order]
        self.system = BlockedSystem([t.codes for t in self.reterms], [t.z for t in self.reterms],
                                    [t.nlevels for t in self.reterms],
                                    [bool(t.zerocorr) for t in self.reterms])
        self.layout = self.system.layout

    def _setup_done(self):
        """Record ``setup_seconds``: formula, design, block pattern, symbolic analysis,
        cross-products — everything before the first objective evaluation."""
        self.setup_seconds = time.perf_counter() - self._t0

    @property
    def n(self):
        return len(self.design.y)

    @property
    def p(self):
        return self.design.X.shape[1]

    @property
    def path(self):
        """'block-diagonal' or 'cholmod': how the random-effects block is factored."""
        return self.system.path

    @cached_property
    def Z(self):
        return random_effects_matrix(self.reterms, self.system.pattern)

    def describe(self):
        """One line on the structure of the model and the factorization it uses."""
        return self.system.describe()

    def _check_theta(self, theta):
        theta = np.asarray(theta, dtype=float).ravel()
        if theta.shape != (self.layout.ntheta,):
            raise ValueError(f"theta has {theta.size} values; this model has {self.layout.ntheta}")
        return theta

"""Formulas to model matrices: lme4-style random-effects terms over patsy.

``build_design(formula, data)`` returns a :class:`Design` holding the response, the
fixed-effects matrix (columns in lme4's order, named as MixedModels.jl names them) and
one :class:`ReTerm` per random-effects term.  Contrast codings follow MixedModels.jl.
Formulas are read as R reads them: ``^`` is a power inside a call and crossing outside,
names may hold dots or be quoted in backticks, ``offset(expr)`` terms add to the offset
and ``cbind(successes, failures)`` is a binomial response.  The data may be a pandas
DataFrame, a dict of columns, or any data frame narwhals reads (polars, pyarrow, ...).
"""
from ._contrasts import DummyCoding, EffectsCoding, Grouping, HelmertCoding
from ._design import Design, ReTerm, abs2, build_design
from ._parse import ParsedFormula, RandomTerm, parse_formula

__all__ = [
    "build_design",
    "Design",
    "ReTerm",
    "parse_formula",
    "ParsedFormula",
    "RandomTerm",
    "DummyCoding",
    "EffectsCoding",
    "HelmertCoding",
    "Grouping",
    "abs2",
]

"""Contrast codings for categorical columns, named and behaving as in MixedModels.jl.

Each coding is a small immutable object that patsy can call back with the sorted
levels of a factor.  patsy asks for one of two matrices:

``code_without_intercept(levels)``
    The factor is redundant with an intercept (or a lower-order margin) already in
    the model, so it gets ``k - 1`` columns: this is where the codings differ.
``code_with_intercept(levels)``
    Nothing earlier in the model spans the factor's mean, so it needs ``k`` columns.
    Like StatsModels.jl we then use one indicator per level whatever coding was
    requested, so that ``0 + f`` always reads as "one coefficient per level".

The column suffixes of the returned :class:`patsy.ContrastMatrix` are the bare level
labels; the design layer turns them into MixedModels.jl names such as ``urban: Y``.
"""
import re

import numpy as np
from patsy import ContrastMatrix

__all__ = [
    "DummyCoding",
    "EffectsCoding",
    "HelmertCoding",
    "Grouping",
    "is_grouping",
    "normalize_coding",
    "clean_suffix",
]


class _Coding:
    """Shared behaviour: an optional base level and an optional level order."""

    def __init__(self, base=None, levels=None):
        self.base = base
        self.levels = None if levels is None else tuple(levels)

    def __repr__(self):
        args = []
        if self.base is not None:
            args.append(f"base={self.base!r}")
        if self.levels is not None:
            args.append(f"levels={list(self.levels)!r}")
        return f"{type(self).__name__}({', '.join(args)})"

    def __eq__(self, other):
        return (type(self) is type(other) and self.base == other.base
                and self.levels == other.levels)

    def __hash__(self):
        return hash((type(self).__name__, self.base, self.levels))

    def _base_index(self, levels):
        if self.base is None:
            return 0
        labels = [str(lev) for lev in levels]
        key = _label(self.base)
        if key not in labels:
            raise ValueError(f"base level {key!r} of {self!r} is not one of the levels {labels}")
        return labels.index(key)

    def code_with_intercept(self, levels):
        """Full indicator coding: one column per level.

        Parameters
        ----------
        levels : sequence
            The factor's levels in model order.

        Returns
        -------
        patsy.ContrastMatrix
        """
        return ContrastMatrix(np.eye(len(levels)), [str(lev) for lev in levels])

    def code_without_intercept(self, levels):
        """Reduced-rank coding: ``len(levels) - 1`` columns.

        Parameters
        ----------
        levels : sequence
            The factor's levels in model order.

        Returns
        -------
        patsy.ContrastMatrix
        """
        k = len(levels)
        base = self._base_index(levels)
        matrix = self._matrix(k, base)
        names = [str(lev) for i, lev in enumerate(levels) if i != base]
        return ContrastMatrix(matrix, names)

    def matrix(self, levels):
        """The reduced-rank contrast matrix alone, rows in level order.

        Parameters
        ----------
        levels : sequence
            The factor's levels.

        Returns
        -------
        numpy.ndarray of shape (len(levels), len(levels) - 1)
        """
        return np.asarray(self.code_without_intercept(levels).matrix)

    def _matrix(self, k, base):
        raise NotImplementedError


def _label(value):
    # Level labels are strings; bools print in Julia's lower case so that a base of
    # True matches the level "true".
    if type(value) is str:
        return value
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


class DummyCoding(_Coding):
    """Treatment (dummy) coding: each non-base level against the base level.

    The default for every categorical column.

    Parameters
    ----------
    base : optional
        The reference level; the first level (in sorted order) when omitted.
    levels : sequence, optional
        The order of the levels; sorted order when omitted.

    Examples
    --------
    >>> DummyCoding().matrix(["a", "b", "c"])
    array([[0., 0.],
           [1., 0.],
           [0., 1.]])
    """

    def _matrix(self, k, base):
        return np.delete(np.eye(k), base, axis=1)


class EffectsCoding(_Coding):
    """Effects (sum-to-zero) coding: the base level's row is all -1.

    With two levels the single column is -1 for the base level and +1 for the other.

    Parameters
    ----------
    base : optional
        The level coded -1; the first level when omitted.
    levels : sequence, optional
        The order of the levels; sorted order when omitted.

    Examples
    --------
    >>> EffectsCoding().matrix(["a", "b", "c"])
    array([[-1., -1.],
           [ 1.,  0.],
           [ 0.,  1.]])
    """

    def _matrix(self, k, base):
        mat = np.delete(np.eye(k), base, axis=1)
        mat[base, :] = -1.0
        return mat


class HelmertCoding(_Coding):
    """Helmert coding as in MixedModels.jl: each level against the mean of those before.

    For levels ``1..k``, column ``j`` (``j = 1..k-1``) is -1 for levels ``1..j``,
    ``j`` for level ``j + 1`` and 0 afterwards.  With two levels the column is -1, +1.

    Parameters
    ----------
    base : optional
        A level to move to the front of the order before coding.
    levels : sequence, optional
        The order of the levels; sorted order when omitted.

    Examples
    --------
    >>> HelmertCoding().matrix(["a", "b", "c"])
    array([[-1., -1.],
           [ 1., -1.],
           [ 0.,  2.]])
    """

    def _matrix(self, k, base):
        order = [base] + [i for i in range(k) if i != base]
        mat = np.zeros((k, k - 1))
        for j in range(1, k):
            mat[order[:j], j - 1] = -1.0
            mat[order[j], j - 1] = float(j)
        return mat


class Grouping:
    """Marker for a column used only as a grouping factor of random effects.

    It builds no columns.  MixedModels.jl uses it to skip the (possibly huge)
    contrast matrix of a grouping factor; here grouping factors never get one, so the
    marker only asserts that the column stays out of the model matrices.
    """

    def __repr__(self):
        return "Grouping()"

    def __eq__(self, other):
        return isinstance(other, Grouping)

    def __hash__(self):
        return hash("Grouping")


def is_grouping(coding):
    """Whether ``coding`` is the :class:`Grouping` marker (class or instance)."""
    return isinstance(coding, Grouping) or coding is Grouping


def normalize_coding(coding):
    """Turn a user-supplied coding into an object patsy accepts.

    Parameters
    ----------
    coding : coding instance or class, patsy contrast, ContrastMatrix or 2-d array
        Classes (``DummyCoding``, ``patsy.Sum``) are instantiated with no arguments.

    Returns
    -------
    object
        Something :func:`patsy.contrasts.code_contrast_matrix` understands.
    """
    if is_grouping(coding):
        return Grouping()
    if isinstance(coding, type):
        return coding()
    if isinstance(coding, ContrastMatrix):
        return coding
    if hasattr(coding, "code_with_intercept") and hasattr(coding, "code_without_intercept"):
        return coding
    arr = np.asarray(coding)
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.number):
        return arr.astype(float)
    raise ValueError(f"cannot use {coding!r} as a contrast coding")


# patsy names its own contrast columns "[T.b]", "[S.b]", "[H.b]", "[b]", ".Linear",
# "[custom0]"; we want the bare label after "factor: ".
_PATSY_SUFFIX = re.compile(r"^\[(?:[A-Za-z]+\.)?(.*)\]$")


def clean_suffix(suffix):
    """Strip patsy's decoration from a contrast column suffix.

    Parameters
    ----------
    suffix : str

    Returns
    -------
    str
    """
    m = _PATSY_SUFFIX.match(suffix)
    if m:
        return m.group(1)
    return suffix.lstrip(".")

"""The blocked penalized least-squares system, for a given θ and weights.

    [ Λ'Z'WZΛ + I   Λ'Z'WX   Λ'Z'Wy ]          [ L     0    0  ] [ L'  RZX  rzy ]
    [ X'WZΛ         X'WX     X'Wy   ]   =      [ RZX'  RX'  0  ] [ 0   RX   rxy ]
    [ y'WZΛ         y'WX     y'Wy   ]          [ rzy'  rxy' r  ] [ 0   0    r   ]

(up to the fill-reducing permutation P of the first block row). The cross-products of
[Z X y] are accumulated once per set of weights (once for an LMM, once per PIRLS
iteration for a GLMM); each θ then costs one congruence update of the Z'Z blocks, one
factorization of the random-effects block, one forward solve with the p + 1 columns of
Λ'Z'W[X y], and a dense Cholesky of the (p+1)-square Schur complement. r² is the
penalized weighted residual sum of squares, log det(L) and log det(RX) the rest of the
profiled deviance.

Two paths, chosen from the structure of the model and reported by ``path``:
- "block-diagonal": one random-effects term, so the first block is block diagonal with
  one k-by-k block per level, factored level by level in _blocked.pyx;
- "cholmod": several (crossed or nested) terms; the lower triangle of the first block is
  a sparse matrix with a fixed pattern, analysed once by CHOLMOD and refactorized in
  place for every θ (supernodal where fill-in makes dense blocks worthwhile);
- "dense-tail": several terms whose trailing block fills in: the same values, factored
  with the first term level by level and the rest as one dense LAPACK Cholesky
  (_densetail.pyx), chosen by flop count against CHOLMOD's (``DENSE_TAIL`` = False
  keeps CHOLMOD, for comparisons).
"""
import functools
import math
import time

import numpy as np

from . import _blocked
from ._cholmod import SparseCholesky
from ._densetail import DenseTailFactor
from ._pattern import build_pattern


# The dense tail is chosen while its flops are at most this many times CHOLMOD's: LAPACK's
# dense Cholesky ran ~20 GFlop/s on one thread here, CHOLMOD's supernodal code on
# insteval's narrower supernodes ~6 (19.8 against 42.6 ms for 1.9 times the flops), and its
# simplicial code on small models is overhead-bound (penicillin: 3 against 5 µs).
DENSE_TAIL = True
_DENSE_TAIL_FLOPS = 3.0
_DENSE_TAIL_MAX = 4000        # r: the dense block is r² doubles (128 MB at 4,000)
_DENSE_TAIL_FREE = 1e5        # flops that cost less than CHOLMOD's analysis and call overhead


def faster_factor(indptr, indices, mx, k0=None, q0=None):
    """The factor of this pattern: the dense tail (term 0 by levels, the rest dense; see
    _densetail.pyx) where its flops are within a few times CHOLMOD's, else CHOLMOD's,
    simplicial or supernodal, whichever is faster.

    CHOLMOD picks supernodal when the flop count per nonzero of L is high, but where the
    supernodes are narrow (a two-column random slope on 1,000 levels crossed with 500
    levels) the supernodal factorization measured 2.6 times slower than the simplicial
    one, while on insteval it is twice as fast. The work depends on the pattern only, so
    where the choice is not clear-cut both are timed once here on M = I written into the
    pattern, and the faster is kept. Above 350 flops per nonzero of L (insteval: 439; the
    slope model above: 190) the dense supernodes win outright and the trial is skipped.
    """
    tail_flops = None
    if q0 is not None and DENSE_TAIL:
        if _dense_tail_surely_free(len(indptr) - 1, int(k0), int(q0)):
            return DenseTailFactor(indptr, indices, mx, int(k0), int(q0))
        tail_flops = _dense_tail_flops(indptr, k0, q0)
        if tail_flops is not None and tail_flops <= _DENSE_TAIL_FREE:
            # below CHOLMOD's own overhead whatever its count: no need to analyse
            return DenseTailFactor(indptr, indices, mx, int(k0), int(q0))
    mx[:] = 0.0
    mx[indptr[:-1]] = 1.0                # sorted CSC lower triangle: the diagonal comes first
    auto = SparseCholesky(indptr, indices, mx)
    if tail_flops is not None and tail_flops <= _DENSE_TAIL_FLOPS * auto.flops + _DENSE_TAIL_FREE:
        return DenseTailFactor(indptr, indices, mx, int(k0), int(q0))
    if not auto.is_supernodal or auto.flops > 350.0 * auto.nnz_factor:
        return auto
    simplicial = SparseCholesky(indptr, indices, mx, mode="simplicial")

    def seconds(factor):
        t0 = time.perf_counter()
        factor.factorize()
        return time.perf_counter() - t0

    return simplicial if seconds(simplicial) < seconds(auto) else auto


def _dense_tail_surely_free(q, k0, q0):
    """Whether the dense tail's flops are at most ``_DENSE_TAIL_FREE`` by a bound that needs
    no pass over the pattern: a level of term 0 meets at most all r tail rows, so
    Σ n_l² k₀ <= q₀ r², and :func:`_dense_tail_flops`, computed in the same floating-point
    operations on numbers no larger, is at most the bound (rounding is monotone)."""
    r = q - q0
    if r > _DENSE_TAIL_MAX or q0 == 0:
        return False
    return r ** 3 / 3.0 + float(q0 * r * r) + q0 * k0 * k0 <= _DENSE_TAIL_FREE


def _dense_tail_flops(indptr, k0, q0):
    """The flops of a dense-tail factorization of this pattern, or None when its tail is
    too large to hold densely."""
    q = len(indptr) - 1
    r = q - q0
    if r > _DENSE_TAIL_MAX or q0 == 0:
        return None
    # n_l: the other levels that level l of term 0 meets (the rows below its block)
    met = (indptr[1:q0 + 1:k0] - (indptr[0:q0:k0] + k0)).astype(float)
    # a sum of squares of integers, exact in any order below 2**53
    return r ** 3 / 3.0 + float(np.dot(met, met)) * k0 + q0 * k0 * k0


@functools.lru_cache(maxsize=256)
def _layout_arrays(kk, zerocorr):
    """What :class:`ThetaLayout` holds, for one tuple of term sizes and ``||`` flags
    (the same for every model of that shape, so computed once)."""
    lam_off = np.concatenate([[0], np.cumsum([k * k for k in kk])[:-1]]).astype(np.int64)
    index, lower, names, term_of = [], [], [], []
    for t, (k, zc) in enumerate(zip(kk, zerocorr)):
        for a in range(k):
            rows = [a] if zc else range(a, k)
            for e in rows:
                index.append(lam_off[t] + e + a * k)
                lower.append(0.0 if e == a else -np.inf)
                names.append((t, e, a))
                term_of.append(t)
    return (lam_off, np.array(index, dtype=np.int64), np.array(lower), tuple(names),
            np.array(term_of), int(sum(k * k for k in kk)))


class ThetaLayout:
    """How θ fills the lower-triangular templates T_t of Λ, term by term.

    A correlated term with k columns has k(k+1)/2 parameters, T's lower triangle by
    columns (lme4's order); an uncorrelated (``||``) term has its k diagonal entries.
    Diagonal entries are bounded below by zero.
    """

    def __init__(self, kk, zerocorr):
        self.kk = list(map(int, kk))
        lam_off, index, lower, names, term_of, nlam = _layout_arrays(
            tuple(self.kk), tuple(map(bool, zerocorr)))
        # copies of the remembered arrays: each layout owns its own
        self.lam_off = lam_off.copy()
        self.index = index.copy()
        self.lower = lower.copy()
        self.entries = list(names)
        self.term_of = term_of.copy()
        self.nlam = nlam

    @property
    def ntheta(self):
        return len(self.index)

    def initial(self):
        """1 on the diagonal, 0 elsewhere: Λ = I, as lme4 and MixedModels.jl start."""
        return np.array([1.0 if math.isfinite(v) else 0.0 for v in self.lower.tolist()])

    def lam(self, theta, out=None):
        """The templates' entries, flat (column-major per term)."""
        if out is None:
            out = np.zeros(self.nlam)
        out[self.index] = theta
        return out

    def templates(self, theta):
        """The lower-triangular T_t as a list of k-by-k arrays."""
        lam = self.lam(theta)
        return [lam[o:o + k * k].reshape(k, k, order="F").copy()
                for o, k in zip(self.lam_off, self.kk)]


class BlockedSystem:
    """Workspace for one model: cross-products of [Z X y] and their factorization at θ.

    Parameters
    ----------
    codes, z, nlevels : per random-effects term (in term order)
    zerocorr : per term, whether its Λ block is diagonal
    layout : ThetaLayout, optional
        The model's own layout of these terms, to share rather than make again.
    """

    def __init__(self, codes, z, nlevels, zerocorr, layout=None):
        self._setup(build_pattern(codes, z, nlevels), zerocorr, layout)

    @classmethod
    def from_structure(cls, structure, zerocorr):
        """A workspace over a level-only block structure, with no rows behind it.

        Parameters
        ----------
        structure : _pattern.BlockStructure
            Which level pairs share a row (learned chunk by chunk: see mixedmodels.scale).
        zerocorr : per term, whether its Λ block is diagonal

        Its cross-products come whole from :meth:`set_crossproducts` (sums over chunks
        of rows); everything per θ is the in-memory workspace's own code. What needs the
        rows (:meth:`set_products`, :meth:`linear_predictor`) raises.
        """
        self = cls.__new__(cls)
        self._setup(structure, zerocorr)
        return self

    def _setup(self, pat, zerocorr, layout=None):
        self.pattern = pat
        self.layout = layout = ThetaLayout(pat.kk, zerocorr) if layout is None else layout
        self.q = pat.q
        self.ztxy = self.xtxy = None
        self.rzxy = self._r = None
        if pat.blockdiagonal:
            self.path = "block-diagonal"
            self._k = int(pat.kk[0])
            # one compiled call where four np.zeros were four NumPy calls of set-up
            self.avals, self._lam, self._empty, self._lblocks = _blocked.zero_vectors(
                pat.nvals, layout.nlam, 0, pat.nvals)
            self.factor = None
            self._theta_step = _blocked.ThetaFactorizer(
                pat, layout, self.avals, self._lam, self._lblocks, self._empty, None)
            return
        self.path = "cholmod"
        self.avals, self._lam, self._empty, self._mx = _blocked.zero_vectors(
            pat.nvals, layout.nlam, 0, len(pat.indices))
        self.factor = faster_factor(pat.indptr, pat.indices, self._mx,
                                    int(pat.kk[0]), int(pat.uoff[1]))
        if isinstance(self.factor, DenseTailFactor):
            self.path = "dense-tail"
        self._theta_step = _blocked.ThetaFactorizer(
            pat, layout, self.avals, self._lam, self._empty, self._mx, self.factor)
        if isinstance(self.factor, SparseCholesky) and not self.factor.is_supernodal:
            # the compiled PIRLS refactors a simplicial CHOLMOD pattern itself between the
            # factorizations the workspace keeps (_blocked.SimplicialFactor)
            self._theta_step.allow_small(pat.indptr, pat.indices)

    # -- cross-products -------------------------------------------------------------
    def set_products(self, xy, weights=None, *, y=None):
        """Accumulate Z'WZ, Z'W[X y] and [X y]'W[X y] for the columns ``xy`` (n-by-m).

        With ``y`` (length n), ``xy`` is X alone and y its last column: [X y] is stacked
        here in one compiled call (``_blocked.stack_columns``), where the caller's
        ``numpy.column_stack`` cost a small model more, cold, than the sums."""
        pat = self.pattern
        if not hasattr(pat, "zcat"):
            raise ValueError("this workspace was built from a block structure without rows; "
                             "give it its cross-products with set_crossproducts")
        stacked = None if y is None else _blocked.stack_columns(xy, y)
        if stacked is not None:
            xy = stacked
        else:
            xy = np.ascontiguousarray(xy if y is None else np.column_stack([xy, y]),
                                      dtype=np.float64)
        w = self._empty if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
        # accumulate_blocks, accumulate_zt and weighted_crossprod in one call (the same
        # bits), the products made and bound there when their width changes: on a small
        # model the separate calls' argument unpacking cost more than the sums
        made = self._theta_step.accumulate(pat, xy, w)
        if made is not None:
            self.ztxy, self.rzxy, self.xtxy, self._r = made

    @property
    def nfactorized(self):
        """Factorizations made so far (by any caller of the factorizer): a result kept
        from one is current while this has not moved."""
        return self._theta_step.count

    @property
    def factorizer(self):
        """The compiled per-θ step (_blocked.ThetaFactorizer), bound to this workspace's
        arrays: the compiled PIRLS (_kernels._glm.PirlsKernel) drives it directly."""
        return self._theta_step

    def bind_products(self, m):
        """Make the cross-product arrays (ztxy, rzxy, xtxy) those of m columns of [X y]."""
        self._bind_products(m)

    def _bind_products(self, m):
        """Arrays for m columns of [X y], bound to the factorizer (which holds views of
        them), allocated again only when m changes."""
        if self.ztxy is None or self.ztxy.shape[1] != m:
            self.ztxy, self.rzxy, self.xtxy, self._r = self._theta_step.new_products(self.q, m)

    def set_crossproducts(self, avals, ztxy, xtxy):
        """Take the cross-products whole: sums over chunks of rows, made elsewhere.

        Parameters
        ----------
        avals : (nvals,) float64
            The blocks of Z'WZ in the structure's layout (what ``accumulate_blocks``
            writes for the rows).
        ztxy : (q, m) float64
            Z'W[X y].
        xtxy : (m, m) float64
            [X y]'W[X y].
        """
        avals = np.asarray(avals, dtype=np.float64)
        if avals.shape != self.avals.shape:
            raise ValueError(f"avals has {avals.size} values; the structure has {self.avals.size}")
        ztxy = np.asarray(ztxy, dtype=np.float64)
        m = ztxy.shape[1]
        if ztxy.shape[0] != self.q or np.shape(xtxy) != (m, m):
            raise ValueError(f"ztxy must be ({self.q}, m) and xtxy (m, m); got "
                             f"{ztxy.shape} and {np.shape(xtxy)}")
        # in place: the factorizer holds views of these arrays
        self.avals[:] = avals
        self._bind_products(m)
        self.ztxy[:, :] = ztxy
        self.xtxy[:, :] = xtxy

    # -- factorization at θ -----------------------------------------------------------
    def factorize(self, theta, schur=True):
        """Factor the system at θ.

        Returns
        -------
        logdet_l : float
            log det(L) (half the log-determinant of Λ'Z'WZΛ + I).
        r : (m, m) ndarray
            Upper-triangular Cholesky factor of the Schur complement
            [X y]'W[X y] - RZXy'RZXy; r[-1, -1]**2 is the penalized RSS.

        Afterwards ``self.rzxy`` holds L⁻¹PΛ'Z'W[X y]. With ``schur=False`` the dense
        Schur complement is skipped (PIRLS over u alone needs only L) and r is None.
        """
        logdet, status = self._theta_step.factorize(theta, schur)
        if not np.isfinite(logdet):
            raise np.linalg.LinAlgError("random-effects block not positive definite")
        if not schur:
            return logdet, None
        if status:
            raise np.linalg.LinAlgError(
                f"fixed-effects block not positive definite at column {status}: the columns of X "
                "are numerically collinear")
        return logdet, self._r

    def backward(self, b):
        """In place: b <- P' L'⁻¹ b (q-by-m, Fortran), with the last factorization."""
        if self.factor is None:
            _blocked.blockdiag_backward(self._lblocks, self._k, b)
        else:
            self.factor.backward(b)
        return b

    def blockdiag_diagonal(self):
        """The level-wise factor of a one-term model (its diagonal, for a scalar term).

        The compiled PIRLS writes the factor at the modes straight into it."""
        if self.factor is not None:
            raise ValueError("only a model with one random-effects term has a level-wise factor")
        return self._lblocks

    def inverse_diagonal_blocks(self, max_bytes=1 << 20):
        """The level blocks on the diagonal of M⁻¹ = (Λ'Z'WZΛ + I)⁻¹, at the last factorization.

        Parameters
        ----------
        max_bytes : int
            Target size of the dense block of the CHOLMOD path (q rows by a batch of
            columns, at least 16 columns): the work does not depend on it, only how it
            is cut up; blocks that stay in cache ran fastest (insteval: 1 MB, 1.1 s,
            against 2-3 s at 32 MB).

        Returns
        -------
        list of ndarray
            Per term (in term order), an array (levels, k, k): the k-by-k block of M⁻¹
            that belongs to each level, levels in u's order.

        Notes
        -----
        With P M P' = L L', M⁻¹ = (L⁻¹P)'(L⁻¹P), so the block of the index set S is
        X_S'X_S with X_S = L⁻¹ P E_S, E_S the unit columns of S. One term: M is block
        diagonal with M_l = L_l L_l', and the block is L_l⁻ᵀ L_l⁻¹. Several terms: the
        forward solves run on batches of whole levels, q·nnz(L) work in all (insteval,
        q = 4114, nnz(L) = 590,304: about a second). A selected inversion (Takahashi's
        recurrence on the pattern of L) would cost about one factorization instead, but
        needs the factor's supernodes, which the CHOLMOD shim does not expose.
        """
        pat = self.pattern
        if self.factor is None:
            k, nlev = self._k, int(pat.nlev[0])
            # each level's factor is stored column-major: as a C-ordered (k, k) array it
            # reads as L_l', so transpose back
            lower = self._lblocks[:nlev * k * k].reshape(nlev, k, k).transpose(0, 2, 1)
            linv = np.linalg.inv(lower)
            return [np.einsum("lai,laj->lij", linv, linv)]
        q = self.q
        # fewer than 16 columns per solve leaves the supernodal solve's dense kernels idle
        width = max(16, int(max_bytes) // (8 * q))
        out = []
        for t in range(pat.nterm):
            k, nlev, off = int(pat.kk[t]), int(pat.nlev[t]), int(pat.uoff[t])
            blocks = np.empty((nlev, k, k))
            step = max(1, width // k)
            for first in range(0, nlev, step):
                nl = min(step, nlev - first)
                m = nl * k
                e = np.zeros((q, m), order="F")
                e[off + first * k + np.arange(m), np.arange(m)] = 1.0
                self.factor.forward(e)
                # column a + k*l of e is level first + l, column a of the term
                x = e.reshape(q, k, nl, order="F")
                blocks[first:first + nl] = np.einsum("ial,ibl->lab", x, x)
            out.append(blocks)
        return out

    def linear_predictor(self, theta, u, base, out):
        """out <- base + Z Λ u."""
        pat = self.pattern
        if not hasattr(pat, "zcat"):
            raise ValueError("this workspace was built from a block structure without rows")
        b = self.lambda_times(theta, u)
        _blocked.z_times(pat.zcat, pat.codes, pat.uoff, pat.zoff, pat.kk, b, base, out)
        return out

    def lambda_times(self, theta, u):
        """b = Λ u for a vector or q-by-m block."""
        u2 = np.asfortranarray(u.reshape(self.q, -1), dtype=np.float64)
        out = np.empty_like(u2, order="F")
        pat = self.pattern
        _blocked.lambda_apply(u2, pat.uoff, pat.kk, pat.nlev, self.layout.lam(theta),
                              self.layout.lam_off, False, out)
        return out.reshape(u.shape)

    def describe(self):
        """A line saying which path this model takes, for users and logs."""
        pat = self.pattern
        if self.factor is None:
            return f"block-diagonal: one term, {pat.nlev[0]} levels of {pat.kk[0]}-by-{pat.kk[0]} blocks"
        if isinstance(self.factor, DenseTailFactor):
            return (f"dense tail: {pat.nterm} terms, the first ({pat.nlev[0]} levels) "
                    f"block diagonal, the other {self.factor.r} random effects one dense "
                    "block")
        kind = "supernodal" if self.factor.is_supernodal else "simplicial"
        return (f"cholmod ({kind}): {pat.nterm} terms, q = {self.q}, "
                f"nnz(M lower) = {len(pat.indices)}, nnz(L) = {self.factor.nnz_factor}")

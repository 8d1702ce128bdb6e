"""The dense-tail factor's kernels on tails wider than their panels (_densetail.pyx).

- ``blocked_cholesky`` (the right-looking Cholesky by panels that factors S) against its
  twin numpy.linalg.cholesky, on sizes around the panel width, with the strict upper
  triangle untouched and dpotrf's status for a matrix that is not positive definite.
- ``blocked_triangular_inverse`` (L_S⁻¹, on the way to S⁻¹) against numpy.linalg.inv.
- ``DenseTailFactor`` on crossed designs whose tail (r = 100-180) spans several panels of
  the Cholesky (48), the tail solves and the inverse (64): log det, L⁻¹b, L'⁻¹b, S⁻¹ and
  M⁻¹ on M's pattern against the dense Cholesky factor and inverse of M built from the
  design (tests/test_blocked.py and test_gradient_selinv.py cover small tails, one panel).
"""
import numpy as np
import pytest
from conftest import KERNEL

from mixedmodels._linalg import _twins
from mixedmodels._linalg._densetail import (
    DenseTailFactor,
    blocked_cholesky,
    blocked_triangular_inverse,
)
from mixedmodels._linalg.system import BlockedSystem


def spd(n, seed):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, n))
    return g @ g.T / n + np.eye(n)


@pytest.mark.parametrize("n", [1, 5, 47, 48, 49, 130, 300])
@pytest.mark.parametrize("nb", [0, 1, 7, 48, 64])
def test_blocked_cholesky_is_the_dense_cholesky(n, nb):
    a = spd(n, n)
    work = np.asfortranarray(a.copy())
    upper = np.triu_indices(n, 1)
    work[upper] = 7.0                       # the kernel reads and writes the lower triangle only
    assert blocked_cholesky(work, nb) == 0
    np.testing.assert_allclose(np.tril(work), np.linalg.cholesky(a), rtol=KERNEL, atol=KERNEL)
    assert np.all(work[upper] == 7.0)


@pytest.mark.parametrize("nb", [0, 16, 48])
def test_blocked_cholesky_reports_the_first_failing_minor(nb):
    """Status j: the leading j-by-j block is not positive definite (LAPACK's info), also
    when j falls inside a later panel."""
    a = spd(130, 3)
    a[60, 60] = -1.0                        # minor 61 fails, those before it do not
    work = np.asfortranarray(a.copy())
    assert blocked_cholesky(work, nb) == 61
    with pytest.raises(ValueError):
        blocked_cholesky(np.zeros((3, 4), order="F"))


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 130, 300])
@pytest.mark.parametrize("nb", [0, 1, 7, 48, 64])
def test_blocked_triangular_inverse_is_the_dense_inverse(n, nb):
    lower = np.linalg.cholesky(spd(n, n + 1))
    work = np.asfortranarray(lower.copy())
    upper = np.triu_indices(n, 1)
    work[upper] = 7.0
    assert blocked_triangular_inverse(work, nb) == 0
    np.testing.assert_allclose(np.tril(work), np.linalg.inv(lower), rtol=KERNEL, atol=KERNEL)
    assert np.all(work[upper] == 7.0)


def test_blocked_triangular_inverse_reports_a_zero_diagonal():
    lower = np.linalg.cholesky(spd(130, 5))
    lower[70, 70] = 0.0
    assert blocked_triangular_inverse(np.asfortranarray(lower), 16) == 71
    with pytest.raises(ValueError):
        blocked_triangular_inverse(np.zeros((3, 4), order="F"))


def crossed_m(nlevels, kk, n, seed):
    """A BlockedSystem's pattern and the dense M = Λ'Z'ZΛ + I at a random θ, with M's values
    in its lower CSC layout."""
    rng = np.random.default_rng(seed)
    codes, z = [], []
    for nl, k in zip(nlevels, kk):
        c = rng.integers(0, nl, n).astype(np.int32)
        c[:nl] = np.arange(nl)              # every level present
        codes.append(c)
        z.append(np.column_stack([np.ones(n)] + [rng.standard_normal(n) for _ in range(k - 1)]))
    system = BlockedSystem(codes, z, nlevels, [False] * len(kk))
    pat = system.pattern
    theta = rng.uniform(0.3, 1.5, system.layout.ntheta)
    off = ~np.isfinite(system.layout.lower)
    theta[off] = rng.uniform(-0.5, 0.5, off.sum())
    lam = _twins.dense_lambda(pat, system.layout.templates(theta))
    zd = _twins.dense_z(pat)
    m = lam.T @ zd.T @ zd @ lam + np.eye(pat.q)
    mx = np.concatenate([m[pat.indices[pat.indptr[j]:pat.indptr[j + 1]], j]
                         for j in range(pat.q)])
    return pat, m, mx, rng


# (levels per term, columns per term, rows): tails of 120, 100 and 180 columns
WIDE_TAILS = {
    "three scalar terms": ([150, 90, 30], [1, 1, 1], 900),
    "vector first term": ([60, 80, 20], [2, 1, 1], 700),
    "vector later term": ([200, 60], [1, 3], 1200),
}

# tails of at most _SMALL_TAIL (32) columns run plain loops instead of BLAS and LAPACK;
# tails of 6, 32 and 33 columns (the last one BLAS again), a run of the tail for the
# selected inverse's BLAS branch (every level meets every tail row) among them
SMALL_TAILS = {
    "penicillin-like": ([24, 6], [1, 1], 144),
    "at the limit": ([40, 32], [1, 1], 400),
    "just over": ([40, 33], [1, 1], 400),
    "vector first term, short tail": ([30, 8], [2, 1], 300),
    "vector tail term": ([25, 5], [1, 3], 250),
}


@pytest.mark.parametrize("name", sorted(WIDE_TAILS) + sorted(SMALL_TAILS))
def test_tail_factor_is_the_dense_cholesky(name):
    wide = name in WIDE_TAILS
    nlevels, kk, n = WIDE_TAILS[name] if wide else SMALL_TAILS[name]
    pat, m, mx, rng = crossed_m(nlevels, kk, n, seed=11 if wide else 21)
    k0, q0 = int(pat.kk[0]), int(pat.uoff[1])
    factor = DenseTailFactor(pat.indptr, pat.indices, mx, k0, q0)
    assert factor.r > 96 if wide else factor.r <= 33     # several panels; plain loops
    factor.factorize()
    rtol = 1e-9 if wide else 1e-10
    chol = np.linalg.cholesky(m)
    assert factor.logdet() == pytest.approx(np.sum(np.log(np.diag(chol))), rel=KERNEL)
    for ncol in (1, 3, 9):
        b = np.asfortranarray(rng.standard_normal((pat.q, ncol)))
        fwd = np.asarray(factor.forward(b.copy(order="F")))
        np.testing.assert_allclose(fwd, np.linalg.solve(chol, b), rtol=rtol, atol=KERNEL)
        bwd = np.asarray(factor.backward(b.copy(order="F")))
        np.testing.assert_allclose(bwd, np.linalg.solve(chol.T, b), rtol=rtol, atol=KERNEL)
    minv = np.linalg.inv(m)
    np.testing.assert_allclose(factor.tail_inverse(), minv[q0:, q0:], rtol=rtol, atol=KERNEL)
    selected = np.zeros(len(pat.indices))
    factor.selected_inverse(selected)
    cols = np.repeat(np.arange(pat.q), np.diff(pat.indptr))
    np.testing.assert_allclose(selected, minv[pat.indices, cols], rtol=rtol, atol=KERNEL)


def test_wide_tail_not_positive_definite_raises():
    nlevels, kk, n = WIDE_TAILS["three scalar terms"]
    pat, m, mx, _ = crossed_m(nlevels, kk, n, seed=12)
    factor = DenseTailFactor(pat.indptr, pat.indices, mx, int(pat.kk[0]), int(pat.uoff[1]))
    factor.factorize()
    tail_col = int(pat.uoff[1]) + 70        # a diagonal entry in the tail's second panel
    mx[pat.indptr[tail_col]] = -1.0
    with pytest.raises(np.linalg.LinAlgError):
        factor.factorize()
    assert not factor.factored




@pytest.mark.parametrize("n, bad", [(6, 3), (32, 32), (2, 1)])
def test_small_cholesky_reports_the_first_failing_minor(n, bad):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n))
    spd = a @ a.T + n * np.eye(n)
    spd[bad - 1, bad - 1] = -1.0
    assert blocked_cholesky(np.asfortranarray(spd)) == bad

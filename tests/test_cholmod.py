"""Our CHOLMOD wrapper against a dense inverse and against scikit-sparse's CHOLMOD."""
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import KERNEL

from mixedmodels._linalg._cholmod import SparseCholesky


def spd(n, seed, density=0.08):
    a = sp.random(n, n, density=density, random_state=seed)
    return (a @ a.T + sp.identity(n)).tocsc()


@pytest.mark.parametrize("mode", ["auto", "simplicial", "supernodal"])
def test_solves_and_logdet_against_dense(mode):
    m = spd(80, 3)
    lower = sp.tril(m).tocsc()
    lower.sort_indices()
    values = lower.data.copy()
    f = SparseCholesky(lower.indptr, lower.indices, values, mode=mode)
    f.factorize()
    dense = m.toarray()
    assert f.logdet() == pytest.approx(0.5 * np.linalg.slogdet(dense)[1], rel=KERNEL)
    b = np.asfortranarray(np.random.default_rng(0).standard_normal((80, 3)))
    x = b.copy(order="F")
    f.forward(x)
    # ||L^{-1} P b||^2 = b' M^{-1} b, whatever the permutation
    np.testing.assert_allclose(np.sum(x * x, axis=0),
                               np.einsum("ij,ij->j", b, np.linalg.solve(dense, b)), rtol=KERNEL)
    f.backward(x)
    np.testing.assert_allclose(x, np.linalg.solve(dense, b), rtol=1e-9, atol=KERNEL)


def test_refactorize_in_place_with_new_values():
    m = spd(60, 4)
    lower = sp.tril(m).tocsc()
    lower.sort_indices()
    values = lower.data.copy()
    f = SparseCholesky(lower.indptr, lower.indices, values)
    f.factorize()
    values *= 2.0          # same pattern, new values: no new analysis
    f.factorize()
    assert f.logdet() == pytest.approx(0.5 * np.linalg.slogdet(2.0 * m.toarray())[1], rel=KERNEL)


def test_against_scikit_sparse():
    from sksparse import cholmod   # a test dependency: a missing install must fail, not skip
    m = spd(100, 5)
    lower = sp.tril(m).tocsc()
    lower.sort_indices()
    f = SparseCholesky(lower.indptr, lower.indices, lower.data.copy())
    f.factorize()
    theirs = cholmod.cholesky(m)
    assert 2 * f.logdet() == pytest.approx(theirs.logdet(), rel=KERNEL)
    b = np.asfortranarray(np.random.default_rng(1).standard_normal((100, 2)))
    x = b.copy(order="F")
    f.forward(x)
    f.backward(x)
    np.testing.assert_allclose(x, theirs(b), rtol=1e-9, atol=KERNEL)


def test_not_positive_definite_raises_a_python_error():
    m = sp.csc_matrix(np.array([[1.0, 0.0], [2.0, 1.0]]))   # lower triangle of [[1,2],[2,1]]
    f = SparseCholesky(m.indptr, m.indices, m.data.copy())
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        f.factorize()


def test_borrowed_values_must_be_writeable_float64():
    m = sp.csc_matrix(np.eye(3))
    with pytest.raises(TypeError, match="writeable, contiguous float64"):
        SparseCholesky(m.indptr, m.indices, m.data.astype(np.float32))

"""The LAPACK-free kernels of ``_kernels._dense`` against their twins: numpy.linalg.qr for
the Householder QR, and the NumPy/LAPACK convergence check (``_derivs._check_python``)
for the compiled one."""
import re

import numpy as np
import pytest

import mixedmodels
from mixedmodels import _derivs, _fixed
from mixedmodels._derivs import _check, _check_python, cholesky_lower, cholesky_lower_lapack
from mixedmodels._fixed import householder_qr, numpy_qr
from mixedmodels._kernels import _dense
from mixedmodels.formula import build_design
from mixedmodels.formula._design import _aliased_columns, _qr_if_clearly_not_aliased

EPS = np.finfo(float).eps


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- Householder QR ----------------------------------------------------------------------

def _assert_qr_twin(X, q, r, rtol=1e-13):
    """q r = X, q orthonormal, r upper triangular and numpy.linalg.qr's r (column j to
    rtol of ‖X_j‖), q's columns numpy's where R's diagonal says they are determined."""
    n, p = X.shape
    q0, r0 = np.linalg.qr(X)
    assert q.shape == (n, p) and r.shape == (p, p)
    assert q.flags.c_contiguous and r.flags.c_contiguous
    assert (np.tril(r, -1) == 0).all()
    # scaled first: the squares of 1e-300 underflow
    amax = np.maximum(np.abs(X).max(axis=0), 1e-300)
    norms = np.linalg.norm(X / amax, axis=0) * amax
    assert (np.abs(q @ r - X).max(axis=0) <= 1e-13 * np.maximum(norms, 1e-300)).all()
    assert np.abs(q.T @ q - np.eye(p)).max() < 1e-13
    assert (np.abs(r - r0).max(axis=0) <= rtol * norms).all()
    # column j of q moves with the conditioning of the first j + 1 columns: compare it
    # where that leaves 1e-10
    for j in range(p):
        cond = np.linalg.cond(X[:, :j + 1])
        if cond < 1e3:
            assert np.abs(q[:, j] - q0[:, j]).max() < 1e-13, j
        elif cond < 1e5:
            assert np.abs(q[:, j] - q0[:, j]).max() < 1e-10, j


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (7, 1), (180, 1), (180, 2), (56, 4),
                                   (30, 7), (5, 5), (64, 64), (100, 64), (3000, 9)])
def test_qr_is_numpy_qr_on_random_matrices(shape):
    rng = np.random.default_rng(sum(shape))
    X = rng.standard_normal(shape) * np.logspace(-3, 6, shape[1])
    _assert_qr_twin(X, *householder_qr(X))


def test_qr_signs_are_lapacks():
    # dlarfg: R_jj has the sign opposite to the pivot entry's, except in the last row of
    # a square matrix (a reflector of one entry is the identity)
    for X in (np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]]),
              np.array([[-1.0, 2.0], [3.0, -4.0], [5.0, 7.0]]),
              np.array([[0.0, 1.0], [1.0, 0.0]]),
              np.array([[2.0, 1.0], [0.0, 3.0]]),          # nothing below the pivot
              np.array([[2.0, 1.0], [0.0, -3.0]])):
        q, r = householder_qr(X)
        q0, r0 = np.linalg.qr(X)
        assert (np.sign(np.diag(r)) == np.sign(np.diag(r0))).all()
        np.testing.assert_allclose(r, r0, rtol=0, atol=1e-15 * np.abs(X).max())
        np.testing.assert_allclose(q, q0, rtol=0, atol=1e-15)


def test_qr_ill_conditioned_and_rank_deficient():
    rng = np.random.default_rng(5)
    n = 120
    a = rng.standard_normal(n)
    days = np.arange(n) % 10.0
    vander = np.vander(np.linspace(0, 1, n), 9, increasing=True)    # cond ~ 1e7
    cases = [
        np.column_stack([np.ones(n), days + 1e8]),                    # shifted predictor
        np.column_stack([np.ones(n), a, a + 1e-9 * rng.standard_normal(n)]),
        np.column_stack([np.ones(n), days, 2.0 * days]),              # exactly aliased
        np.column_stack([np.ones(n), np.zeros(n), a]),                # a zero column
        np.column_stack([np.ones(n), days, np.ones(n), a]),           # a repeated column
        vander,
        np.column_stack([a * 1e-300, a[::-1] * 1e-300, np.ones(n) * 1e-301]),   # dlarfg's
        np.column_stack([a * 1e300, a[::-1] * 1e300, days * 1e299]),            # rescaling
    ]
    for X in cases:
        q, r = householder_qr(X)
        _assert_qr_twin(X, q, r)


def test_qr_takes_any_strides():
    rng = np.random.default_rng(9)
    big = rng.standard_normal((90, 8))
    for X in (big[::3, 1:6], np.asfortranarray(big), big.T[:, :7].T[:, :5]):
        q, r = householder_qr(X)
        q1, r1 = householder_qr(np.ascontiguousarray(X))
        assert _same(q, q1) and _same(r, r1)
        _assert_qr_twin(X, q, r)


def test_qr_falls_back_to_numpy_where_it_should():
    rng = np.random.default_rng(4)
    # wider than tall, wider than 64, not float64: numpy's path, bit for bit
    for X in (rng.standard_normal((3, 5)), rng.standard_normal((200, 65)),
              rng.standard_normal((20, 3)).astype(np.float32)):
        q, r = householder_qr(X)
        q0, r0 = np.linalg.qr(X)
        assert _same(q, q0) and _same(r, r0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_qr_of_a_non_finite_matrix_is_numpys(bad):
    # no error, as numpy.linalg.qr: the LAPACK path takes it, so the same nan and inf
    X = np.random.default_rng(2).standard_normal((6, 3))
    X[2, 1] = bad
    assert _dense.householder_qr(X) is None
    q, r = householder_qr(X)
    q0, r0 = numpy_qr(X)
    assert _same(q, q0) and _same(r, r0)
    assert not np.isfinite(r).all()


def _designs():
    rng = np.random.default_rng(12)
    n = 50
    out = []
    for eps in (1.0, 1e-3, 1e-5, 1e-6, 2e-7, 1e-7, 1e-8, 1e-9, 1e-12, 0.0):
        a = rng.standard_normal(n)
        out.append(np.column_stack([np.ones(n), a, a + eps * rng.standard_normal(n)]))
        out.append(np.column_stack([np.ones(n), 1e8 + a, 1e8 + a * (1 + eps)]))
    out.append(np.column_stack([np.ones(n), np.zeros(n), rng.standard_normal(n)]))
    return out


def test_aliasing_decisions_are_those_of_the_lapack_qr(monkeypatch):
    def decisions():
        out = []
        for X in _designs():
            qr = _qr_if_clearly_not_aliased(X)
            out.append(_aliased_columns(X) if qr is None else "clear")
        return out
    compiled = decisions()
    monkeypatch.setattr(_fixed, "COMPILED_QR", False)
    assert decisions() == compiled
    assert "clear" in compiled and [2] in compiled


def test_design_drops_the_same_columns_with_either_qr(monkeypatch):
    data = mixedmodels.dataset("sleepstudy").assign(
        twice=lambda d: 2.0 * d["days"], near=lambda d: d["days"] * (1 + 1e-12),
        shifted=lambda d: d["days"] + 1e8)
    formulas = ("reaction ~ 1 + days + twice + (1 | subj)",
                "reaction ~ 1 + days + near + (1 | subj)",
                "reaction ~ 1 + shifted + (1 | subj)",
                "reaction ~ 1 + days + (days | subj)")
    dropped = {}
    for compiled in (True, False):
        monkeypatch.setattr(_fixed, "COMPILED_QR", compiled)
        with pytest.warns(UserWarning, match="rank deficient"):
            dropped[compiled] = [build_design(f, data).dropped for f in formulas]
    assert dropped[True] == dropped[False] == [["twice"], ["near"], [], []]


# -- Cholesky, solve, eigenvalues --------------------------------------------------------

def _spd(rng, n, cond=1e3):
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return (Q * np.logspace(0, np.log10(cond), n)) @ Q.T


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 40])
def test_cholesky_is_lapacks(n):
    rng = np.random.default_rng(n)
    A = _spd(rng, n)
    L, L0 = cholesky_lower(A), cholesky_lower_lapack(A)
    assert L.flags.f_contiguous and (np.triu(L, 1) == 0).all()
    np.testing.assert_allclose(L, L0, rtol=0, atol=1e-13 * np.abs(L0).max())
    # the lower triangle only is read
    upper_junk = A + np.triu(np.full((n, n), 7.0), 1)
    assert _same(cholesky_lower(upper_junk), L)
    # not positive definite: None, as LAPACK
    B = A.copy()
    B[-1, -1] = -1.0
    assert cholesky_lower(B) is None and cholesky_lower_lapack(B) is None


def test_cholesky_of_singular_and_nan_matrices():
    for A in (np.ones((2, 2)), np.zeros((1, 1)), np.array([[1.0, 2.0], [2.0, 4.0]]),
              np.array([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])):
        assert cholesky_lower(A) is None and cholesky_lower_lapack(A) is None
    # a nan pivot: None (OpenBLAS's dpotrf returns a nan factor; no caller passes one)
    assert cholesky_lower(np.array([[np.nan]])) is None
    assert cholesky_lower(np.array([[4.0, np.nan], [np.nan, 4.0]])) is None


def test_cholesky_solve_is_dposv():
    from scipy.linalg import lapack
    rng = np.random.default_rng(3)
    for n in (1, 3, 8):
        A = _spd(rng, n)
        b = rng.standard_normal(n)
        x, info = _dense.cholesky_solve(A, b)
        _, x0, info0 = lapack.dposv(A, b, lower=1)
        assert info == info0 == 0
        np.testing.assert_allclose(x, x0, rtol=1e-12, atol=0)
        A[0, 0] = -1.0
        assert _dense.cholesky_solve(A, b)[1] == lapack.dposv(A, b, lower=1)[2] == 1


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12, 40])
def test_jacobi_eigenvalues_are_eigvalsh(n):
    rng = np.random.default_rng(100 + n)
    A = rng.standard_normal((n, n))
    for M in (A + A.T, _spd(rng, n, 1e10), -_spd(rng, n, 1e4),
              np.diag(np.logspace(-8, 8, n)) + 1e-3 * (A + A.T),
              1e-200 * (A + A.T), 1e200 * (A + A.T)):
        w0 = np.linalg.eigvalsh(M)
        w = _dense.symmetric_eigenvalues(M)
        assert np.abs(w - w0).max() <= 20 * n * EPS * np.abs(w0).max()
    assert (_dense.symmetric_eigenvalues(np.zeros((n, n))) == 0).all()


def test_jacobi_keeps_the_small_eigenvalues_of_a_graded_definite_matrix():
    # D A D with A well conditioned: eigenvalues known to relative accuracy (Demmel and
    # Veselić), the smallest 1e-12 of the largest
    rng = np.random.default_rng(8)
    A = _spd(rng, 4, 10.0)
    d = np.logspace(0, -6, 4)
    M = A * d[:, None] * d[None, :]
    w = _dense.symmetric_eigenvalues(M)
    # the exact ones through the congruence: a well-conditioned generalized problem
    from scipy.linalg import eigh
    w_ref = eigh(A, np.diag(1.0 / d ** 2), eigvals_only=True)
    np.testing.assert_allclose(w, w_ref, rtol=1e-10)


# -- the convergence check ---------------------------------------------------------------

_NUMBER = re.compile(r"(smallest eigenvalue |eigenvalue ratio )(-?[0-9.e+-]+|nan|inf)")


def _assert_check_twin(g, H, boundary=None, grad_tol=2e-3, hess_tol=1e-6, exact=True):
    scaled, messages = _check(g, H, boundary, grad_tol, hess_tol)
    scaled0, messages0 = _check_python(g, H, boundary, grad_tol, hess_tol)
    assert scaled.shape == scaled0.shape
    assert (np.isnan(scaled) == np.isnan(scaled0)).all()
    ok = ~np.isnan(scaled0)
    if ok.any():
        # s solves R s = g with R = chol(H)': R's forward error is up to cond(H)
        # roundings, and so is s's (relative to ‖s‖)
        Hf = 0.5 * (H + H.T)[np.ix_(ok, ok)]
        tol = 10 * ok.sum() * EPS * np.linalg.cond(Hf) * np.abs(scaled0[ok]).max()
        assert np.abs(scaled[ok] - scaled0[ok]).max() <= tol
    if exact:
        assert messages == messages0
        return messages
    # an eigenvalue that is zero in exact arithmetic: rounding (LAPACK's or Jacobi's)
    # decides its digits; the rest of the message is the same
    assert [_NUMBER.sub(r"\1#", m) for m in messages] == \
        [_NUMBER.sub(r"\1#", m) for m in messages0]
    scale = np.abs(H).max()
    for m, m0 in zip(messages, messages0):
        for a, b in zip(_NUMBER.findall(m), _NUMBER.findall(m0)):
            assert abs(float(a[1]) - float(b[1])) <= 1e-13 * scale
    return messages


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 10, 20, 40])
def test_check_is_its_twin_on_random_matrices(n):
    rng = np.random.default_rng(n)
    seen = set()
    for trial in range(40):
        kind = trial % 4
        if kind == 0:                                   # definite, small gradient
            H, g = _spd(rng, n, 10 ** rng.uniform(0, 5)), 1e-4 * rng.standard_normal(n)
        elif kind == 1:                                 # definite, large gradient
            H, g = _spd(rng, n, 10 ** rng.uniform(0, 8)), rng.standard_normal(n)
        elif kind == 2:                                 # indefinite
            A = rng.standard_normal((n, n))
            H, g = A + A.T, rng.standard_normal(n)
        else:                                           # nearly unidentifiable
            H, g = _spd(rng, n, 1e8), 1e-6 * rng.standard_normal(n)
        # differenced Hessians are not exactly symmetric
        H = H + 1e-9 * rng.standard_normal((n, n))
        boundary = None if trial % 3 else rng.random(n) < 0.3
        messages = _assert_check_twin(g, H, boundary)
        seen.update(m.split(":")[0] for m in messages)
    if n >= 3:
        assert {"failed to converge", "gradient not scaled"} <= seen


def test_check_message_kinds():
    I3 = np.eye(3)
    # converged
    assert _assert_check_twin(np.zeros(3), I3) == []
    # a large scaled gradient, at the first of equal maxima
    assert _assert_check_twin(np.array([0.5, -0.5, 0.1]), I3) == [
        "failed to converge: max |scaled gradient| = 0.5 at parameter 0 (tolerance 0.002)"]
    # not positive definite, with negative eigenvalues
    msgs = _assert_check_twin(np.array([0.1, -0.3, 0.2]), np.diag([1.0, -2.0, -1e-3]))
    assert msgs[0] == ("gradient not scaled: the Hessian is not positive definite "
                       "(max |gradient| = 0.3 at parameter 1)")
    assert msgs[1].startswith("failed to converge: degenerate Hessian with 2 negative "
                              "eigenvalues (smallest eigenvalue -2,")
    # nearly unidentifiable
    assert _assert_check_twin(np.zeros(2), np.diag([1e-5, 1e3])) == [
        "nearly unidentifiable: very large eigenvalue ratio 1e+08 (limit 1e+06); "
        "consider rescaling the predictors"]
    # on the boundary: indices into the full gradient
    boundary = np.array([True, False, False])
    assert _assert_check_twin(np.array([9.0, 0.0, 0.5]), I3, boundary) == [
        "failed to converge: max |scaled gradient| = 0.5 at parameter 2 (tolerance 0.002)"]
    scaled, _ = _check(np.array([9.0, 0.0, 0.5]), 2.0 * I3, boundary, 2e-3, 1e-6)
    np.testing.assert_allclose(scaled, [np.nan, 0.0, 0.5 / np.sqrt(2.0)])
    # all on the boundary: nothing to check
    scaled, msgs = _check(np.ones(2), I3[:2, :2], [True, True], 2e-3, 1e-6)
    assert msgs == [] and np.isnan(scaled).all()
    _assert_check_twin(np.ones(2), I3[:2, :2], [True, True])


def test_check_of_singular_hessians():
    # exactly singular: the zero eigenvalue is rounding's, so compared to 1e-13 of |H|
    for g, H in ((np.array([1e-4, 1e-4]), np.ones((2, 2))),
                 (np.array([0.0, 1.0, 0.0]), np.array([[2.0, 1.0, 0.0], [1.0, 0.5, 0.0],
                                                       [0.0, 0.0, 3.0]])),
                 (np.zeros(3), np.zeros((3, 3))),
                 (np.array([1e-4, 0.0]), np.array([[1.0, 0.0], [0.0, 0.0]]))):
        msgs = _assert_check_twin(g, H, exact=False)
        assert any("degenerate Hessian with 0 negative eigenvalues" in m for m in msgs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_of_non_finite_derivatives(bad):
    H = np.eye(4)
    g = np.zeros(4)
    g[2] = bad
    assert _assert_check_twin(g, H) == [
        "convergence not checked: the derivatives are inf or nan for parameter(s) [2]"]
    H2 = np.eye(4)
    H2[1, 3] = bad                                   # after symmetrizing: rows 1 and 3
    assert _assert_check_twin(np.zeros(4), H2) == [
        "convergence not checked: the derivatives are inf or nan for parameter(s) [1, 3]"]
    # a non-finite derivative of a parameter on its bound is not looked at
    _assert_check_twin(g, H, np.array([False, False, True, False]))
    _assert_check_twin(np.zeros(4), H2, np.array([False, True, False, False]))


def test_check_of_entries_that_overflow_when_symmetrized():
    H = np.diag([1e308, 1.0])
    H[0, 1] = H[1, 0] = 1e308
    with np.errstate(over="ignore"):            # the twin's 0.5 (H + H')
        _assert_check_twin(np.zeros(2), H)
    assert _check(np.zeros(2), H, None, 2e-3, 1e-6)[1] == [
        "convergence not checked: the derivatives are inf or nan for parameter(s) [0, 1]"]


def test_check_errors_are_its_twins():
    for args in ((np.zeros(2), np.eye(3), None, 2e-3, 1e-6),
                 (np.zeros(2), np.eye(2), None, -1.0, 1e-6),
                 (np.zeros(2), np.eye(2), [True], 2e-3, 1e-6)):
        with pytest.raises(ValueError) as got:
            _check(*args)
        with pytest.raises(ValueError) as want:
            _check_python(*args)
        assert str(got.value) == str(want.value)


def test_check_above_forty_parameters_is_lapacks():
    rng = np.random.default_rng(41)
    H, g = _spd(rng, 41), rng.standard_normal(41)
    s, m = _check(g, H, None, 2e-3, 1e-6)
    s0, m0 = _check_python(g, H, None, 2e-3, 1e-6)
    assert _same(s, s0) and m == m0


def test_switches_route_to_the_twins(monkeypatch):
    rng = np.random.default_rng(1)
    H, g = _spd(rng, 3), rng.standard_normal(3)
    monkeypatch.setattr(_derivs, "COMPILED", False)
    s, m = _check(g, H, None, 2e-3, 1e-6)
    s0, m0 = _check_python(g, H, None, 2e-3, 1e-6)
    assert _same(s, s0) and m == m0
    assert _same(cholesky_lower(H), cholesky_lower_lapack(H))


def test_fits_converge_the_same_with_either_path(monkeypatch):
    data = mixedmodels.dataset("sleepstudy")
    fits = {}
    for compiled in (True, False):
        monkeypatch.setattr(_derivs, "COMPILED", compiled)
        monkeypatch.setattr(_fixed, "COMPILED_QR", compiled)
        fits[compiled] = mixedmodels.fit("reaction ~ 1 + days + (1 + days | subj)", data,
                                         REML=False)
    a, b = fits[True], fits[False]
    np.testing.assert_allclose(a.loglik, b.loglik, rtol=1e-12)
    np.testing.assert_allclose(a.fixef, b.fixef, rtol=1e-9)
    assert isinstance(a.optsum.derivs, _derivs.ConvergenceCheck)
    assert a.optsum.derivs.messages == b.optsum.derivs.messages
    np.testing.assert_allclose(a.optsum.derivs.scaled_gradient,
                               b.optsum.derivs.scaled_gradient, rtol=1e-6, atol=1e-12)

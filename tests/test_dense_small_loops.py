"""The compiled small-loop kernels of ``_kernels._dense`` against their Python twins, bit
for bit: the same IEEE operations in the same order (the module is built without FMA)."""
import math

import numpy as np
import pytest

from mixedmodels import _fixed

_dense = pytest.importorskip("mixedmodels._kernels._dense")


def _same(a, b):
    """Bit-for-bit equality of float arrays, signed zeros and nans included."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _twin_basis(r, q, scale):
    """The Python-float path of ``FixedEffectsBasis._from_qr`` (the current code, spelled
    out): R̃, R̃⁻¹, |diag R̃|, the verdict, and X̃."""
    p = r.shape[0]
    rl = r.tolist()
    signs = [-1.0 if rl[i][i] < 0 else 1.0 for i in range(p)]
    Rl = [[(v * s) / scale for v in row] for row, s in zip(rl, signs)]
    ad = [abs(Rl[i][i]) for i in range(p)]
    Rinv = _fixed._upper_inverse(Rl, np.array(Rl))
    far = _fixed._rows_far_from_aliased(Rl, ad)
    X = q * np.array([s * scale for s in signs])
    return np.array(Rl), Rinv, np.array(ad), far, X


def _random_r(rng, p, kind):
    r = np.triu(rng.standard_normal((p, p)))
    if kind == 1:      # badly scaled columns
        r *= 10.0 ** rng.integers(-8, 9, size=p)
    elif kind == 2:    # nearly aliased: tiny diagonal entries
        d = rng.integers(0, p)
        r[d, d] *= 10.0 ** rng.integers(-12, -3)
    elif kind == 3:    # integers: exact zeros and ties in the solve
        r = np.triu(rng.integers(-3, 4, size=(p, p)).astype(float))
        r[np.diag_indices(p)] = rng.choice([-2.0, -1.0, 1.0, 3.0], size=p)
    return r


@pytest.mark.parametrize("p", range(1, 9))
def test_fixed_basis_is_the_python_floats_bit_for_bit(p):
    rng = np.random.default_rng(100 + p)
    for trial in range(300):
        r = _random_r(rng, p, trial % 4)
        if trial % 5 == 0:
            r = np.asfortranarray(r)       # any strides for r
        n = p + int(rng.integers(0, 30))
        q = rng.standard_normal((n, p))
        scale = math.sqrt(n)
        want = _twin_basis(r, q, scale)
        q2 = q.copy()
        got = _dense.fixed_basis(r, q2, scale, _fixed.NEAR_ALIAS)
        assert got is not None
        R, Rinv, absdiag, far = got
        assert _same(R, want[0]) and _same(Rinv, want[1]) and _same(absdiag, want[2])
        assert far is want[3]
        assert _same(q2, want[4])
        # and the per-column solve of _blocked.upper_solve gives the same R̃⁻¹
        assert _same(Rinv, _fixed._upper_solve_inverse(R))
        assert R.flags.c_contiguous and Rinv.flags.c_contiguous


def test_fixed_basis_inverse_is_an_inverse():
    # an independent check of what the twin computes: R̃ R̃⁻¹ = I to rounding
    rng = np.random.default_rng(7)
    for p in range(1, 9):
        r = np.triu(rng.standard_normal((p, p))) + 3 * np.eye(p)
        R, Rinv, absdiag, far = _dense.fixed_basis(r, np.ones((p, p)), 2.0, 1e-6)
        np.testing.assert_allclose(R @ Rinv, np.eye(p), atol=1e-13)
        np.testing.assert_allclose(R, r * np.where(np.diag(r) < 0, -1.0, 1.0)[:, None] / 2)
        assert (np.diag(R) > 0).all() and far


def test_fixed_basis_near_alias_verdict():
    # column 1 is 1e-7 of its norm away from column 0: not clearly far (threshold 2e-6)
    r = np.array([[1.0, 1.0], [0.0, 1e-7]])
    assert _dense.fixed_basis(r, np.ones((3, 2)), 1.0, 1e-6)[3] is False
    r[1, 1] = 1e-5
    assert _dense.fixed_basis(r, np.ones((3, 2)), 1.0, 1e-6)[3] is True
    r[1, 1] = np.nan
    got = _dense.fixed_basis(r, np.ones((3, 2)), 1.0, 1e-6)
    assert got[3] is False and _same(got[1], _twin_basis(r, np.ones((3, 2)), 1.0)[1])


def test_fixed_basis_declines_and_leaves_q_alone():
    r = np.array([[2.0, 1.0], [0.0, 0.0]])        # a zero pivot: the caller's solve raises
    q = np.ones((3, 2))
    assert _dense.fixed_basis(r, q, 1.0, 1e-6) is None and (q == 1.0).all()
    r = np.eye(2)
    assert _dense.fixed_basis(r, np.ones((2, 3))[:, :2], 1.0, 1e-6) is None   # strided q
    assert _dense.fixed_basis(r, np.ones((3, 2), dtype=np.float32), 1.0, 1e-6) is None
    frozen = np.ones((3, 2))
    frozen.flags.writeable = False
    assert _dense.fixed_basis(r, frozen, 1.0, 1e-6) is None
    assert _dense.fixed_basis(np.eye(9), np.ones((9, 9)), 1.0, 1e-6) is None
    assert _dense.fixed_basis(np.ones((2, 3)), np.ones((3, 3)), 1.0, 1e-6) is None


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_fixed_effects_basis_compiled_equals_python(p, monkeypatch):
    rng = np.random.default_rng(p)
    X = rng.standard_normal((50, p)) * 10.0 ** rng.integers(-3, 4, size=p)
    X[:, 0] = 1.0
    if p > 1:
        X[:, 1] += 1e4
    compiled = _fixed.FixedEffectsBasis(X.copy(), warn=False)
    monkeypatch.setattr(_fixed, "COMPILED_BASIS", False)
    python = _fixed.FixedEffectsBasis(X.copy(), warn=False)
    for name in ("X", "R", "Rinv"):
        assert _same(getattr(compiled, name), getattr(python, name)), name
    assert compiled.logabsdet == python.logabsdet
    assert compiled.X.flags.c_contiguous


def test_near_aliased_column_still_warns():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(40)
    X = np.column_stack([np.ones(40), x, x + 1e-9 * rng.standard_normal(40)])
    with pytest.warns(UserWarning, match="nearly collinear"):
        _fixed.FixedEffectsBasis(X, names=["a", "b", "c"])


# -- the convergence check's arithmetic: _dense.forward_hessian / hessian_steps -------------

from mixedmodels import _optimize  # noqa: E402


def _quadratic(A, b, calls):
    """The value and gradient of ½x'Ax - b'x (A not symmetric, so the symmetrization
    counts), recording the points it is called at."""
    def value_and_grad(x):
        calls.append(x)
        return 0.5 * x @ A @ x - b @ x, A @ x - b
    return value_and_grad


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_forward_hessian_is_the_python_floats_bit_for_bit(n):
    rng = np.random.default_rng(n)
    for trial in range(60):
        A = rng.standard_normal((n, n)) * 10.0 ** rng.integers(-3, 4)
        b = rng.standard_normal(n)
        x = rng.standard_normal(n)
        x[rng.random(n) < 0.2] = -0.0
        step = _optimize._hessian_steps_floats(x)
        k = int(rng.integers(0, n + 1)) if trial % 2 else 0
        block = rng.standard_normal((k, k))
        known = None if k == 0 else (k, block if trial % 4 == 1 else block.tolist())
        grad = A @ x - b
        calls_c, calls_p = [], []
        got = _dense.forward_hessian(_quadratic(A, b, calls_c), x, step, grad, k, known)
        want = _optimize._forward_hessian_floats(_quadratic(A, b, calls_p), x, step, grad,
                                                 k, known)
        assert got[1] == want[1] == n - k
        assert _same(got[0], want[0]) and got[0].flags.c_contiguous
        assert len(calls_c) == len(calls_p)
        for pc, pp in zip(calls_c, calls_p):
            assert type(pc) is np.ndarray and pc.dtype == np.float64 and _same(pc, pp)


def test_forward_hessian_against_the_numpy_loop():
    # the NumPy loop of gradient_hessian (the forward stencil with grad None) and the
    # algebra: for a quadratic the differences are A to rounding
    rng = np.random.default_rng(11)
    A = rng.standard_normal((4, 4))
    A = A @ A.T + 4 * np.eye(4)
    b = rng.standard_normal(4)
    x = rng.standard_normal(4)
    step = np.full(4, 1e-3)
    calls = []
    vg = _quadratic(A, b, calls)
    loop, spent = _optimize.gradient_hessian(vg, x, step, np.full(4, -np.inf), "forward")
    got, spent_c = _dense.forward_hessian(vg, x, step, A @ x - b, 0, None)
    np.testing.assert_allclose(got, loop, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, A, rtol=1e-8)
    assert spent_c == 4 and spent == 5


def test_forward_hessian_declines_a_zero_step():
    calls = []
    vg = _quadratic(np.eye(2), np.zeros(2), calls)
    assert _dense.forward_hessian(vg, np.ones(2), np.array([1e-3, 0.0]), np.ones(2), 0,
                                  None) is None
    assert not calls
    # a zero step inside the known block does not matter
    got = _dense.forward_hessian(vg, np.ones(2), np.array([0.0, 1e-3]), np.ones(2), 1,
                                 (1, [[2.0]]))
    assert got[1] == 1 and got[0][0, 0] == 2.0


def test_forward_hessian_passes_on_errors():
    def boom(x):
        raise FloatingPointError("boom")
    with pytest.raises(FloatingPointError):
        _dense.forward_hessian(boom, np.ones(2), np.full(2, 1e-3), np.ones(2), 0, None)


def test_hessian_steps_is_the_python_floats_bit_for_bit():
    rng = np.random.default_rng(5)
    special = [0.0, -0.0, 0.05, -0.05, 0.04999, np.nan, np.inf, -np.inf, 1e300, -7.0]
    for trial in range(200):
        n = int(rng.integers(0, 9))
        x = rng.standard_normal(n) * 10.0 ** rng.integers(-4, 4)
        if n:
            x[rng.integers(0, n)] = special[trial % len(special)]
        m = int(rng.integers(0, n + 3))
        se = np.abs(rng.standard_normal(m))
        if m:
            se[rng.integers(0, m)] = special[(trial // 3) % len(special)]
        for s in (None, se, se.tolist()):
            for xx in (x, x.tolist()):
                got = _dense.hessian_steps(xx, s)
                want = _optimize._hessian_steps_floats(xx, s)
                assert _same(got, want)
    # a scalar and a matrix x are read flattened, as np.asarray(x).reshape(-1)
    assert _same(_dense.hessian_steps(2.0, None), _optimize._hessian_steps_floats(2.0))
    X = rng.standard_normal((2, 3))
    assert _same(_dense.hessian_steps(X, [1.0]), _optimize._hessian_steps_floats(X, [1.0]))


def test_hessian_steps_algebra():
    got = _dense.hessian_steps(np.array([0.01, -2.0, 3.0, 4.0]), [0.2, np.nan, -1.0])
    np.testing.assert_array_equal(got, [0.05 * 0.2, 2e-3, 3e-3, 4e-3])

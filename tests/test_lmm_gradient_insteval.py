"""The exact LMM gradient on insteval (73,421 rows, q = 4,114: the dense tail's S is
1,142-square), held to Richardson differences of the objective and, for its
log-determinant part, to an identity of scalar terms: with Λ diagonal, Λ'CΛ = M - I, so

    Σ_m K_mm over term t = tr(P_t CΛM⁻¹ P_t) = (q_t - tr(P_t M⁻¹ P_t)) / θ_t,

with M⁻¹'s diagonal from forward solves with the factor (``inverse_diagonal_blocks``), a
computation that shares nothing with the gradient's. Slow (a few seconds to load and a
second of solves): run with -m slow.
"""
import time

import numpy as np
import pytest

import mixedmodels as mm
from mixedmodels._lmm_gradient import _ROUTES, gradient_route, lmm_value_and_gradient
from test_lmm_gradient import _richardson

pytestmark = pytest.mark.slow

FORMULA = "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)"


@pytest.fixture(scope="module")
def insteval():
    return mm.dataset("insteval")


@pytest.mark.parametrize("reml", [False, True])
def test_insteval_gradient(insteval, reml):
    m = mm.LinearMixedModel(FORMULA, insteval, REML=reml)
    ws = m.workspace
    assert gradient_route(ws) == "dense-tail" and ws.factor.r == 1142
    th = np.array([0.32, 0.51, 0.17])
    lmm_value_and_gradient(m, th)                # the first call sets up
    t0 = time.perf_counter()
    m.objective(th)
    t1 = time.perf_counter()
    val, grad = lmm_value_and_gradient(m, th)
    t2 = time.perf_counter()
    print(f"\ninsteval value {1e3 * (t1 - t0):.0f} ms, "
          f"value and gradient {1e3 * (t2 - t1):.0f} ms")
    assert val == m.objective(th)
    ref = _richardson(m.objective, th)
    assert np.max(np.abs(grad - ref)) < 2e-6 * max(1.0, np.max(np.abs(ref)))
    if reml:
        return
    lmm_value_and_gradient(m, th)
    ktrace = _ROUTES[ws].kernel.sums[0][m.layout.index]
    minv_diag = ws.inverse_diagonal_blocks()
    pat = ws.pattern
    for t in range(pat.nterm):
        want = (int(pat.nlev[t]) - float(np.sum(minv_diag[t]))) / th[t]
        assert ktrace[t] == pytest.approx(want, rel=1e-9)

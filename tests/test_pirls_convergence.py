"""Where PIRLS stops: Newton's exit for the canonical links, Fisher scoring's for the rest.

Tiers. Algebra: the family/link pairs _glm.pirls_is_newton calls Newton's are those whose
working weight is the observed information (½ d²dev/dη² by finite differences). An
independent dense NumPy PIRLS (the NumPy twin of the family's pass, dense Z and Λ): on
cbpp (Binomial logit) it takes Newton's exit (the penalized deviance's change, or a step
below STEP_TOL) after as many steps as the compiled loop and the Python loop; for Fisher
scoring (non-canonical links) it is iterated to the modes' rounding, and the modes PIRLS
returns are within MODE_TOL of those. Twins: the compiled loops (PirlsKernel, and
pirls_blockdiag for one term) take the Python loop's steps, extrapolations included.
Whole models: the warm-started Laplace objective repeats to its rounding whatever the
start (before, the modes stopped ~√1e-13 short and the objective carried 1e-8 noise).
"""
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import KERNEL

import mixedmodels as mm
from mixedmodels import _pirls
from mixedmodels import families as F
from mixedmodels._kernels import _glm
from mixedmodels._kernels import _glm_numpy as twin


# ------------------------------------------------------------------ which pairs are Newton

LINK_NAMES = ["logit", "probit", "cloglog", "log", "identity", "inverse", "sqrt",
              "inverse_square"]
FAMILY_MAKERS = {
    "Bernoulli": lambda link: F.Bernoulli(link=link),
    "Binomial": lambda link: F.Binomial(link=link),
    "Poisson": lambda link: F.Poisson(link=link),
    "Gamma": lambda link: F.Gamma(link=link),
    "InverseGaussian": lambda link: F.InverseGaussian(link=link),
    "Normal": lambda link: F.Normal(link=link),
    "NegativeBinomial": lambda link: F.NegativeBinomial(link=link, theta=2.5),
}


def _family_pairs():
    for fname, make in FAMILY_MAKERS.items():
        for lname in LINK_NAMES:
            try:
                make(lname)
            except ValueError:
                continue
            yield fname, lname


def _half_second_derivative(family, eta, y, h=1e-4):
    """½ d²dev/dη² per row by central differences of the family's deviance residuals."""
    n = eta.size

    def dev(e):
        out = [np.empty(n) for _ in range(5)]
        family.update(e, y, None, *out)
        return out[4]

    return 0.5 * (dev(eta + h) - 2.0 * dev(eta) + dev(eta - h)) / (h * h)


@pytest.mark.parametrize("fname,lname", list(_family_pairs()))
def test_newton_pairs_are_those_whose_working_weight_is_the_observed_information(fname,
                                                                                lname):
    family = FAMILY_MAKERS[fname](lname)
    binary = fname in ("Bernoulli", "Binomial")
    # μ inside every link's domain (the binary links' too)
    mu = (np.array([0.25, 0.4, 0.6, 0.7]) if binary or lname in ("logit", "probit", "cloglog")
          else np.array([0.6, 1.1, 1.7, 2.4]))
    # responses away from μ, where the observed information differs from the expected
    # one unless the link is canonical
    y = np.array([1.0, 0.0, 0.0, 1.0]) if binary else np.array([2.0, 0.3, 3.5, 1.0])
    eta = family.link.link(mu)
    out = [np.empty(4) for _ in range(5)]
    family.update(eta, y, None, *out)
    wrkwt = out[2]
    observed = _half_second_derivative(family, eta, y)
    same = np.allclose(wrkwt, observed, rtol=1e-5, atol=0.0)
    assert _glm.pirls_is_newton(family.code, family.link.code) == same
    if not same:
        # well apart, not a near miss of the finite differences
        assert np.max(np.abs(wrkwt - observed) / np.abs(wrkwt)) > 1e-2


# ------------------------------------------------------------------ a dense PIRLS

def _dense(model, theta):
    """(fixed part builder, ZΛ dense) of a model with scalar random-effects terms."""
    lam = np.concatenate([np.full(t.nlevels, th) for t, th in zip(model.reterms, theta)])
    zl = model.Z.toarray() * lam[None, :]
    return zl


def _dense_pirls(family, fixed, zl, y, w, u, rule, tol=1e-13, maxiter=100,
                 max_halving=30, step_tol=1e-9, mode_tol=1e-12, plain_steps=None):
    """PIRLS over u, dense: (u, steps, converged). ``rule`` "newton" is Newton's exit as
    _pirls documents it; ``plain_steps`` instead takes that many Fisher steps (stopping
    early only once the steps stop shrinking at the modes' rounding)."""
    n, q = zl.shape
    out = [np.empty(n) for _ in range(5)]

    def evaluate(u_):
        eta = fixed + zl @ u_
        return twin.update(family.code, family.link.code, eta, y, w, *out,
                           param=family.param), eta

    dev, eta = evaluate(u)
    pdev = dev + u @ u
    steps, converged, last = 0, False, np.inf
    for _ in range(plain_steps or maxiter):
        wrkwt, wrkresid = out[2], out[3]
        m = zl.T @ (wrkwt[:, None] * zl) + np.eye(q)
        unew = np.linalg.solve(m, zl.T @ (wrkwt * (zl @ u + wrkresid)))
        steps += 1
        step = np.max(np.abs(unew - u))
        usize = np.max(np.abs(u))
        new_dev, eta = evaluate(unew)
        new_pdev = new_dev + unew @ unew
        halvings = 0
        while not (new_pdev <= pdev * (1.0 + 1e-12) + 1e-12) and halvings < max_halving:
            unew = 0.5 * (u + unew)
            new_dev, eta = evaluate(unew)
            new_pdev = new_dev + unew @ unew
            halvings += 1
        if plain_steps is not None:
            u, pdev = unew, new_pdev
            if step < 1e-13 * (1.0 + usize) and step >= last:
                break
            last = step
            continue
        assert rule == "newton"
        converged = (abs(pdev - new_pdev) <= tol * abs(new_pdev) + tol
                     or (halvings == 0 and step <= step_tol * (1.0 + usize)))
        u, pdev = unew, new_pdev
        if converged:
            break
    return u, steps, converged


def _python_loop_steps(model, theta, beta, u0, monkeypatch):
    """The Python loop's modes and its number of steps (factorizations less the last, at
    the modes)."""
    ws = model.workspace
    count = [0]
    real = ws.factorize

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ws, "factorize", counting)
    u, _, logdet, dev, converged = _pirls.pirls(model, theta, beta, u0, compiled=False)
    monkeypatch.setattr(ws, "factorize", real)
    assert converged
    return u, count[0] - 1, logdet, dev


def _kernel_steps(model, theta, beta, u0):
    fam = model.family
    u = np.array(u0, dtype=float)
    pw = model.prior_w
    logdet, dev, steps, converged, exhausted = _pirls.row_kernel(model).pirls(
        fam.code, fam.link.code, fam.param,
        np.empty(0) if pw is None else np.ascontiguousarray(pw, dtype=float),
        np.ascontiguousarray(theta, dtype=float), u, 1e-13, 100, 30, _pirls.STEP_TOL,
        np.ascontiguousarray(beta, dtype=float), _pirls.MODE_TOL)
    assert converged and not exhausted
    return u, steps, logdet, dev


@pytest.fixture(scope="module")
def cbpp():
    return mm.dataset("cbpp")


@pytest.fixture(scope="module")
def grouse():
    g = mm.dataset("grouseticks")
    g["ch"] = g["height"] - g["height"].mean()
    return g


def test_canonical_pirls_keeps_newtons_exit_on_cbpp(cbpp, monkeypatch):
    """Binomial logit: the compiled loop, the Python loop and the dense PIRLS with
    Newton's exit take the same number of steps, from zero and from a warm start."""
    m = mm.GeneralizedLinearMixedModel("incid / hsz ~ 1 + period + (1 | herd)", cbpp,
                                       mm.Binomial(), weights="hsz")
    assert _glm.pirls_is_newton(m.family.code, m.family.link.code)
    beta = np.array([-1.40, -0.99, -1.13, -1.58])
    u0 = np.zeros(m.workspace.q)
    for theta in (np.array([0.64]), np.array([1.3])):
        zl = _dense(m, theta)
        fixed = m.X @ beta
        u_d, steps_d, conv_d = _dense_pirls(m.family, fixed, zl, m.y, m.prior_w, u0,
                                            "newton")
        u_k, steps_k, logdet_k, dev_k = _kernel_steps(m, theta, beta, u0)
        u_p, steps_p, logdet_p, dev_p = _python_loop_steps(m, theta, beta, u0, monkeypatch)
        assert conv_d and steps_k == steps_p == steps_d
        np.testing.assert_allclose(u_k, u_d, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(u_k, u_p, rtol=KERNEL, atol=KERNEL)
        # warm: from these modes at a nearby θ
        warm = theta * 1.05
        zl = _dense(m, warm)
        u_d, steps_d, conv_d = _dense_pirls(m.family, fixed, zl, m.y, m.prior_w, u_k,
                                            "newton")
        u_k2, steps_k, _, _ = _kernel_steps(m, warm, beta, u_k)
        _, steps_p, _, _ = _python_loop_steps(m, warm, beta, u_k, monkeypatch)
        assert conv_d and steps_k == steps_p == steps_d
        np.testing.assert_allclose(u_k2, u_d, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ Fisher scoring

def _gamma_one_term(seed=0, nlev=30, per=2, shape=0.5):
    """Gamma responses (log link) with a large dispersion and two rows a level: Fisher
    scoring converges slowly (rates above 0.5), so the extrapolation is exercised."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(nlev), per)
    x = rng.uniform(-1.0, 1.0, nlev * per)
    b = rng.normal(0.0, 1.0, nlev)
    mu = np.exp(0.3 + 0.4 * x + b[g])
    return pd.DataFrame({"g": pd.Categorical([f"g{v:02d}" for v in g]), "x": x,
                         "y": rng.gamma(shape, mu / shape)})


def _fisher_cases(cbpp, grouse):
    gamma = _gamma_one_term()
    return {
        "gamma-log one term": (
            mm.GeneralizedLinearMixedModel("y ~ 1 + x + (1 | g)", gamma, F.Gamma(link="log")),
            np.array([1.5]), np.array([0.3, 0.4])),
        "negative binomial crossed": (
            mm.GeneralizedLinearMixedModel(
                "ticks ~ 1 + year + ch + (1 | brood) + (1 | location)", grouse,
                F.NegativeBinomial(theta=3.0)),
            np.array([0.9, 0.5]), np.array([0.4, -0.5, 1.2, -0.03])),
        "binomial probit": (
            mm.GeneralizedLinearMixedModel("incid / hsz ~ 1 + period + (1 | herd)", cbpp,
                                           F.Binomial(link="probit"), weights="hsz"),
            np.array([0.35]), np.array([-0.85, -0.55, -0.6, -0.85])),
    }


@pytest.mark.parametrize("case", ["gamma-log one term", "negative binomial crossed",
                                  "binomial probit"])
def test_fisher_scoring_modes_are_within_mode_tol(case, cbpp, grouse, monkeypatch):
    m, theta, beta = _fisher_cases(cbpp, grouse)[case]
    assert not _glm.pirls_is_newton(m.family.code, m.family.link.code)
    fixed = m.X @ beta
    zl = _dense(m, theta)
    u0 = np.zeros(m.workspace.q)
    # the limit: plain Fisher steps until they stop shrinking at the modes' rounding
    limit, _, _ = _dense_pirls(m.family, fixed, zl, m.y, m.prior_w, u0, None,
                               plain_steps=2000)
    # MODE_TOL (1e-12) with a margin; the pdev test alone left them ~1e-7 short
    bound = 1e-11 * (1.0 + np.max(np.abs(limit)))
    u_k, steps_k, _, _ = _kernel_steps(m, theta, beta, u0)
    assert np.max(np.abs(u_k - limit)) <= bound
    # and warm, from modes at a nearby θ
    u_w, _, _, _ = _kernel_steps(m, theta * 1.1, beta, u0)
    u_k, _, _, _ = _kernel_steps(m, theta, beta, u_w)
    assert np.max(np.abs(u_k - limit)) <= bound
    u_p, _, _, _ = _python_loop_steps(m, theta, beta, u_w, monkeypatch)
    assert np.max(np.abs(u_p - limit)) <= bound


@pytest.mark.parametrize("case", ["gamma-log one term", "negative binomial crossed",
                                  "binomial probit"])
def test_compiled_fisher_scoring_takes_the_python_loops_steps(case, cbpp, grouse,
                                                              monkeypatch):
    m, theta, beta = _fisher_cases(cbpp, grouse)[case]
    tried = []
    real = _pirls._extrapolation

    def watched(step_vec, last_vec):
        factor = real(step_vec, last_vec)
        tried.append(factor is not None)
        return factor

    monkeypatch.setattr(_pirls, "_extrapolation", watched)
    u0 = np.zeros(m.workspace.q)
    for th, start in ((theta, u0), (theta * 1.1, None)):
        if start is None:
            start, _, _, _ = _kernel_steps(m, theta * 0.9, beta, u0)
        u_k, steps_k, logdet_k, dev_k = _kernel_steps(m, th, beta, start)
        u_p, steps_p, logdet_p, dev_p = _python_loop_steps(m, th, beta, start, monkeypatch)
        assert steps_k == steps_p
        np.testing.assert_allclose(u_k, u_p, rtol=KERNEL, atol=KERNEL)
        assert logdet_k == pytest.approx(logdet_p, rel=KERNEL)
        assert dev_k == pytest.approx(dev_p, rel=KERNEL)
        if len(m.reterms) == 1:
            # one term: pirls_blockdiag's loop too
            term, n = m.reterms[0], m.n
            outs = [np.empty(n) for _ in range(6)]
            u_b = np.array(start, dtype=float)
            logdet_b, dev_b, steps_b, conv_b = _glm.pirls_blockdiag(
                m.family.code, m.family.link.code, np.ascontiguousarray(m.X @ beta),
                np.ascontiguousarray(term.z, dtype=float).reshape(n, 1),
                np.ascontiguousarray(term.codes, dtype=np.intc), m.y,
                np.empty(0) if m.prior_w is None else m.prior_w,
                np.ascontiguousarray(th, dtype=float), u_b, np.empty(m.workspace.q),
                *outs, param=m.family.param, step_tol=_pirls.STEP_TOL,
                mode_tol=_pirls.MODE_TOL)
            assert conv_b and steps_b == steps_p
            np.testing.assert_allclose(u_b, u_p, rtol=KERNEL, atol=KERNEL)
            assert logdet_b == pytest.approx(logdet_p, rel=KERNEL)
            assert dev_b == pytest.approx(dev_p, rel=KERNEL)
    if case == "gamma-log one term":
        assert any(tried)           # the extrapolation was taken on this model


# ------------------------------------------------------------------ whole models

FITS = {
    "negative binomial": lambda d: mm.fit(
        "ticks ~ 1 + year + ch + (1 | brood) + (1 | location)", d["grouse"],
        family=mm.NegativeBinomial()),
    "binomial probit": lambda d: mm.fit(
        "incid / hsz ~ 1 + period + (1 | herd)", d["cbpp"], family=mm.Binomial(link="probit"),
        weights="hsz"),
    "gamma log": lambda d: mm.fit(
        "reaction ~ 1 + days + (1 | subj)", d["sleep"], family=mm.Gamma(link="log")),
}


@pytest.mark.parametrize("name", list(FITS))
def test_warm_started_objective_repeats_to_its_rounding(name, cbpp, grouse):
    data = {"grouse": grouse, "cbpp": cbpp, "sleep": mm.dataset("sleepstudy")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # no PIRLS left unconverged
        fit = FITS[name](data)
    model = fit.model
    x = np.array(fit.optsum.final)
    rng = np.random.default_rng(7)
    values = []
    for _ in range(12):
        # PIRLS warm-started from the modes at a point 1e-4 away, each time another
        model._joint_value(x * (1.0 + 1e-4 * rng.standard_normal(x.size)))
        values.append(model._joint_value(x))
    model._u = None
    values.append(model._joint_value(x))                    # and from u = 0
    # the modes ~1e-7 short left 1e-10 relative here, and steps below 1e-9 (without the
    # rate) 3e-13 (the log-determinant is first order in their error); now ~1e-15
    assert np.ptp(values) <= 1e-13 * abs(values[0])

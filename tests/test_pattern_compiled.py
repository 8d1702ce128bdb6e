"""The compiled block-pattern builder (_blocked.pattern_fields) against its NumPy twin.

``build_pattern`` takes the compiled builder where it applies and the NumPy construction
(``build_pattern_numpy``, the code it replaced) for the rest; the two must give the same
arrays bit for bit, with the same dtypes, shapes and memory order, and the same plain
values. Also the other compiled set-up calls (``zero_vectors``, ``stack_columns``) against
the NumPy calls they stand for.
"""
import dataclasses

import numpy as np
import pytest

import mixedmodels as mm
from mixedmodels._linalg import _blocked, _pattern
from mixedmodels._linalg._pattern import (BlockPattern, _OneTermPattern, build_pattern,
                                          build_pattern_numpy)
from mixedmodels._linalg.system import BlockedSystem


def _same_array(a, b):
    return (isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            and a.flags.c_contiguous == b.flags.c_contiguous and a.tobytes() == b.tobytes())


def _assert_same_pattern(fast, twin):
    assert type(fast) is type(twin)
    for field in dataclasses.fields(BlockPattern):
        a, b = getattr(fast, field.name), getattr(twin, field.name)
        if isinstance(b, np.ndarray):
            assert _same_array(a, b), field.name
        else:
            assert a == b and type(a) is type(b), field.name
    assert fast.q == twin.q and type(fast.q) is type(twin.q)


def _assert_compiled_is_twin(codes, z, nlevels):
    fields = _blocked.pattern_fields(codes, z, nlevels)
    assert fields is not None, "the compiled builder declined"
    fast = build_pattern(codes, z, nlevels)
    for name, value in fields.items():
        held = getattr(fast, name)
        assert (_same_array(held, value) if isinstance(value, np.ndarray)
                else held == value), name
    # the twin's shortcuts (one term, scalar terms) and its general code alike
    _assert_same_pattern(fast, build_pattern_numpy(codes, z, nlevels))
    general = build_pattern_numpy(codes, z, nlevels, general=True)
    for field in dataclasses.fields(BlockPattern):
        a, b = getattr(fast, field.name), getattr(general, field.name)
        assert _same_array(a, b) if isinstance(b, np.ndarray) else a == b, field.name
    return fast


# -- the reference models' terms -------------------------------------------------------

REFERENCE = [
    ("lmm", "diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin", {}),
    ("lmm", "reaction ~ 1 + days + (1 + days | subj)", "sleepstudy", {}),
    ("lmm", "reaction ~ 1 + days + (1 + days || subj)", "sleepstudy", {}),
    ("lmm", "strength ~ 1 + (1 | batch/cask)", "pastes", {}),
    ("lmm", "age ~ 1 + (1 | urban & dist)", "contra", {}),
    ("lmm", "age ~ 1 + (1 + age | dist)", "contra", {}),
    ("glmm", "incid ~ 1 + (1 | herd)", "cbpp", {"family": "poisson"}),
    ("glmm", "ticks ~ 1 + (1 | index) + (1 | brood) + (1 | location)", "grouseticks",
     {"family": "poisson"}),
    ("glmm", "r2 ~ 1 + (1 | subj) + (1 | item)", "verbagg", {"family": "bernoulli"}),
]


def _terms(kind, formula, data, kw):
    if kind == "lmm":
        model = mm.LinearMixedModel(formula, mm.dataset(data))
    else:
        family = {"poisson": mm.Poisson(), "bernoulli": mm.Bernoulli()}[kw["family"]]
        model = mm.GeneralizedLinearMixedModel(formula, mm.dataset(data), family=family)
    terms = model.reterms
    return [t.codes for t in terms], [t.z for t in terms], [t.nlevels for t in terms]


@pytest.mark.parametrize("case", range(len(REFERENCE)),
                         ids=[f"{r[2]}:{r[1]}" for r in REFERENCE])
def test_reference_models_compiled_pattern_is_the_numpy_twin(case):
    codes, z, nlevels = _terms(*REFERENCE[case])
    pat = _assert_compiled_is_twin(codes, z, nlevels)
    assert isinstance(pat, _OneTermPattern) == (len(codes) == 1)


def test_large_crossed_model():
    # insteval: students by lecturers would be a 3.4-million-entry presence table for
    # 73,421 rows, beyond the twin's 4n + 1024: both sort that pair's keys instead
    codes, z, nlevels = _terms("lmm", "y ~ 1 + (1 | s) + (1 | d) + (1 | dept)", "insteval", {})
    assert nlevels[0] * nlevels[1] > 4 * len(codes[0]) + 1024
    _assert_compiled_is_twin(codes, z, nlevels)


# -- random designs --------------------------------------------------------------------

def _design(rng, nlevels, kk, n, nested=False, code_dtype=np.int32, z_order="C"):
    codes = []
    for t, m in enumerate(nlevels):
        if nested and t > 0:
            # every level of the inner term (t - 1, more levels) in one level of term t
            codes.append((codes[t - 1] * m // nlevels[t - 1]).astype(code_dtype))
        else:
            codes.append(rng.integers(0, m, n).astype(code_dtype))
    z = []
    for k in kk:
        zt = np.column_stack([np.ones(n)] + [rng.standard_normal(n) for _ in range(k - 1)])
        z.append(np.asarray(zt, order=z_order))
    return codes, z, list(nlevels)


@pytest.mark.parametrize("seed", range(40))
def test_random_crossed_designs(seed):
    rng = np.random.default_rng(seed)
    nterm = int(rng.integers(1, 5))
    nlevels = sorted((int(rng.integers(1, 40)) for _ in range(nterm)), reverse=True)
    kk = [int(rng.integers(1, 4)) for _ in range(nterm)]
    n = int(rng.choice([0, 1, 2, 7, 60, 250]))
    codes, z, nl = _design(rng, nlevels, kk, n,
                           code_dtype=rng.choice([np.int32, np.int64]),
                           z_order=str(rng.choice(["C", "F"])))
    _assert_compiled_is_twin(codes, z, nl)


@pytest.mark.parametrize("seed", range(20))
def test_random_nested_designs(seed):
    rng = np.random.default_rng(100 + seed)
    inner = int(rng.integers(4, 60))
    nlevels = [inner, max(1, inner // int(rng.integers(2, 6)))]
    if rng.random() < 0.5:
        nlevels.append(max(1, nlevels[-1] // 2))
    kk = [int(rng.integers(1, 3)) for _ in nlevels]
    n = int(rng.integers(inner, 4 * inner))
    codes, z, nl = _design(rng, nlevels, kk, n, nested=True)
    codes[0][:inner] = np.arange(inner)          # every inner level seen
    _assert_compiled_is_twin(codes, z, nl)


@pytest.mark.parametrize("seed", range(10))
def test_random_designs_with_many_level_pairs(seed):
    # level pairs beyond the presence table's 4n + 1024 entries: the keys sorted
    rng = np.random.default_rng(200 + seed)
    nlevels = [int(rng.integers(60, 400)), int(rng.integers(30, 200))]
    if seed % 2:
        nlevels.append(int(rng.integers(2, 30)))
    kk = [int(rng.integers(1, 3)) for _ in nlevels]
    n = int(rng.integers(1, 400))
    codes, z, nl = _design(rng, nlevels, kk, n)
    assert nl[0] * nl[1] > 4 * n + 1024
    _assert_compiled_is_twin(codes, z, nl)


def test_unused_levels_and_strided_columns():
    rng = np.random.default_rng(7)
    n = 90
    # levels that no row has (the diagonal blocks still cover every level), codes and
    # columns that are strided views
    wide = rng.integers(0, 10, 2 * n).astype(np.int64)
    codes = [wide[::2], rng.integers(2, 5, n).astype(np.int32)]
    zfull = rng.standard_normal((n, 5))
    z = [zfull[:, ::2], zfull[:, 1:2]]
    pat = _assert_compiled_is_twin(codes, z, [14, 6])
    assert pat.zcat.flags.c_contiguous and pat.zcat.shape == (n, 4)


def test_levels_as_numpy_integers():
    rng = np.random.default_rng(3)
    codes, z, nl = _design(rng, [12, 5], [1, 2], 80)
    _assert_compiled_is_twin(codes, z, [np.int64(12), np.int32(5)])


@pytest.mark.parametrize("how", ["list codes", "float levels", "code too large",
                                 "negative code", "float32 columns", "row counts differ",
                                 "unsigned codes", "no columns"])
def test_declined_inputs_take_the_twin(how):
    rng = np.random.default_rng(11)
    codes, z, nl = _design(rng, [9, 4], [1, 1], 50)
    if how == "list codes":
        codes[1] = codes[1].tolist()
    elif how == "float levels":
        nl[0] = 9.0
    elif how == "code too large":
        nl[1] = int(codes[1].max())
    elif how == "negative code":
        codes[0] = codes[0].copy()
        codes[0][3] = -1
    elif how == "float32 columns":
        z[1] = z[1].astype(np.float32)
    elif how == "row counts differ":
        z[1] = z[1][:-1]
    elif how == "unsigned codes":
        codes[0] = codes[0].astype(np.uint32)
    elif how == "no columns":
        z[1] = z[1][:, :0]
    assert _blocked.pattern_fields(codes, z, nl) is None
    # whatever the twin does with them (a pattern or an error), build_pattern does too
    try:
        twin = build_pattern_numpy(codes, z, nl)
    except Exception as exc:          # noqa: BLE001 - the twin's own error, whichever
        with pytest.raises(type(exc)):
            build_pattern(codes, z, nl)
    else:
        _assert_same_pattern(build_pattern(codes, z, nl), twin)


def test_switch_off_builds_with_the_twin(monkeypatch):
    rng = np.random.default_rng(5)
    codes, z, nl = _design(rng, [20, 6], [2, 1], 120)
    monkeypatch.setattr(_pattern, "COMPILED", False)
    called = []
    monkeypatch.setattr(_blocked, "pattern_fields", lambda *a: called.append(a))
    _assert_same_pattern(build_pattern(codes, z, nl), build_pattern_numpy(codes, z, nl))
    assert not called


def test_workspaces_on_either_pattern_factor_alike(monkeypatch):
    # the whole per-θ path over the compiled pattern and over the twin's: the same bits
    rng = np.random.default_rng(9)
    for nlevels, kk in (([24, 6], [1, 1]), ([18], [2]), ([30, 8, 3], [2, 1, 1])):
        codes, z, nl = _design(rng, nlevels, kk, 200)
        xy = np.column_stack([np.ones(200), rng.standard_normal(200)])
        out = []
        for compiled in (True, False):
            monkeypatch.setattr(_pattern, "COMPILED", compiled)
            ws = BlockedSystem(codes, z, nl, [False] * len(nl))
            ws.set_products(xy)
            theta = ws.layout.initial() * 0.7
            logdet, r = ws.factorize(theta)
            out.append((ws.path, logdet, r.copy(), ws.rzxy.copy()))
        assert out[0][0] == out[1][0]
        assert out[0][1] == out[1][1]
        assert _same_array(out[0][2], out[1][2]) and _same_array(out[0][3], out[1][3])


# -- the other compiled set-up calls ---------------------------------------------------

def test_zero_vectors_are_numpy_zeros():
    got = _blocked.zero_vectors(5, 0, 1, 3)
    assert len(got) == 4
    for a, size in zip(got, (5, 0, 1, 3)):
        assert _same_array(a, np.zeros(size)) and a.flags.writeable and a.flags.owndata
    with pytest.raises(ValueError):
        _blocked.zero_vectors(-1)


def test_stack_columns_is_column_stack():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 6))
    y = rng.standard_normal(80)
    for xs, ys in ((x, y[:40]), (x[:, ::2], y[::2]), (np.asfortranarray(x), y[:40]),
                   (x[:, :0], y[:40]), (x[:0], y[:0])):
        # (what set_products made of it: column_stack keeps Fortran order, set_products
        # then took a C-ordered copy)
        assert _same_array(_blocked.stack_columns(xs, ys),
                           np.ascontiguousarray(np.column_stack([xs, ys])))
    # anything else: None, for the caller's numpy.column_stack
    assert _blocked.stack_columns(x, y) is None                       # row counts differ
    assert _blocked.stack_columns(x.astype(np.float32), y[:40]) is None
    assert _blocked.stack_columns(x, y[:40].tolist()) is None
    assert _blocked.stack_columns(x[:, 0], y[:40]) is None


def test_set_products_with_y_is_set_products_of_the_stack():
    rng = np.random.default_rng(4)
    codes, z, nl = _design(rng, [15, 4], [1, 1], 70)
    x = rng.standard_normal((70, 3))
    y = rng.standard_normal(70)
    w = rng.uniform(0.5, 2.0, 70)
    for weights in (None, w):
        for xs, ys in ((x, y), (x.astype(np.float32), y)):     # compiled, and declined
            a = BlockedSystem(codes, z, nl, [False, False])
            b = BlockedSystem(codes, z, nl, [False, False])
            a.set_products(xs, weights, y=ys)
            b.set_products(np.column_stack([xs, ys]), weights)
            for name in ("avals", "ztxy", "xtxy"):
                assert _same_array(getattr(a, name), getattr(b, name)), name

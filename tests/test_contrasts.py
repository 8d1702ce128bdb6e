"""Contrast codings: matrices by algebra, names, and their use in model matrices."""
import numpy as np
import patsy
import pytest

import mixedmodels
from mixedmodels.formula import (
    DummyCoding,
    EffectsCoding,
    Grouping,
    HelmertCoding,
    build_design,
)

LEVELS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def contra():
    data = mixedmodels.dataset("contra")
    data["children"] = data["livch"] != "0"
    return data


def _coded(d, name_prefix):
    cols = [j for j, n in enumerate(d.coef_names) if n.startswith(name_prefix)]
    return d.X[:, cols], [d.coef_names[j] for j in cols]


# --- the matrices -----------------------------------------------------------------

def test_dummy_matrix():
    cm = DummyCoding().code_without_intercept(LEVELS)
    np.testing.assert_array_equal(cm.matrix, np.eye(4)[:, 1:])
    assert cm.column_suffixes == ["b", "c", "d"]


def test_dummy_with_base():
    cm = DummyCoding(base="c").code_without_intercept(LEVELS)
    np.testing.assert_array_equal(cm.matrix, np.eye(4)[:, [0, 1, 3]])
    assert cm.column_suffixes == ["a", "b", "d"]


def test_effects_matrix():
    mat = EffectsCoding().matrix(LEVELS)
    expected = np.vstack([-np.ones(3), np.eye(3)])
    np.testing.assert_array_equal(mat, expected)
    np.testing.assert_array_equal(EffectsCoding().matrix(["false", "true"]), [[-1], [1]])


def test_effects_with_base():
    cm = EffectsCoding(base="b").code_without_intercept(LEVELS)
    expected = np.array([[1, 0, 0], [-1, -1, -1], [0, 1, 0], [0, 0, 1]], float)
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.column_suffixes == ["a", "c", "d"]


def test_helmert_matrix():
    mat = HelmertCoding().matrix(LEVELS)
    k = len(LEVELS)
    expected = np.zeros((k, k - 1))
    for j in range(1, k):          # column j: -1 on levels 1..j, j on level j+1
        expected[:j, j - 1] = -1
        expected[j, j - 1] = j
    np.testing.assert_array_equal(mat, expected)
    # Helmert columns are centred and mutually orthogonal.
    np.testing.assert_array_equal(mat.sum(axis=0), 0)
    gram = mat.T @ mat
    np.testing.assert_array_equal(gram, np.diag(np.diag(gram)))
    assert HelmertCoding().code_without_intercept(LEVELS).column_suffixes == ["b", "c", "d"]
    np.testing.assert_array_equal(HelmertCoding().matrix(["N", "Y"]), [[-1], [1]])


@pytest.mark.parametrize("coding", [DummyCoding(), EffectsCoding(), HelmertCoding()])
def test_full_rank_coding_is_indicators(coding):
    cm = coding.code_with_intercept(LEVELS)
    np.testing.assert_array_equal(cm.matrix, np.eye(4))
    assert cm.column_suffixes == LEVELS


def test_bad_base_is_an_error(contra):
    with pytest.raises(ValueError, match="base level 'Q'.*'urban'"):
        build_design("use ~ 1 + urban + (1 | dist)", contra,
                     contrasts={"urban": DummyCoding(base="Q")})


# --- in model matrices --------------------------------------------------------------

def test_helmert_urban_column(contra):
    d = build_design("use ~ 1 + urban + (1 | dist)", contra,
                     contrasts={"urban": HelmertCoding()})
    assert d.coef_names == ["(Intercept)", "urban: Y"]
    np.testing.assert_array_equal(d.X[:, 1], np.where(contra["urban"] == "Y", 1.0, -1.0))


def test_helmert_livch_rows_match_matrix(contra):
    d = build_design("use ~ 1 + livch + (1 | dist)", contra,
                     contrasts={"livch": HelmertCoding()})
    levels = sorted(contra["livch"].unique())
    X, names = _coded(d, "livch")
    assert names == [f"livch: {lev}" for lev in levels[1:]]
    mat = HelmertCoding().matrix(levels)
    idx = contra["livch"].map({lev: i for i, lev in enumerate(levels)}).to_numpy()
    np.testing.assert_array_equal(X, mat[idx])


def test_effects_children_and_interaction(contra):
    d = build_design("use ~ 1 + age * children + (1 | dist)", contra,
                     contrasts={"children": EffectsCoding()})
    assert d.coef_names == ["(Intercept)", "age", "children: true", "age & children: true"]
    c = np.where(contra["children"], 1.0, -1.0)
    np.testing.assert_array_equal(d.X[:, 2], c)
    np.testing.assert_allclose(d.X[:, 3], contra["age"].to_numpy() * c)


def test_dummy_base_changes_names_and_values(contra):
    d = build_design("use ~ 1 + urban + (1 | dist)", contra,
                     contrasts={"urban": DummyCoding(base="Y")})
    assert d.coef_names == ["(Intercept)", "urban: N"]
    np.testing.assert_array_equal(d.X[:, 1], (contra["urban"] == "N").astype(float))


def test_default_is_dummy_sorted_levels(contra):
    d = build_design("use ~ 1 + livch + (1 | dist)", contra)
    X, names = _coded(d, "livch")
    levels = sorted(contra["livch"].unique())
    assert names == [f"livch: {lev}" for lev in levels[1:]]
    expected = np.column_stack([(contra["livch"] == lev).to_numpy(float) for lev in levels[1:]])
    np.testing.assert_array_equal(X, expected)


@pytest.mark.parametrize("coding", [None, HelmertCoding(), EffectsCoding()])
def test_no_intercept_gives_one_column_per_level(contra, coding):
    contrasts = {} if coding is None else {"livch": coding}
    d = build_design("use ~ 0 + livch + (1 | dist)", contra, contrasts=contrasts)
    levels = sorted(contra["livch"].unique())
    assert d.coef_names == [f"livch: {lev}" for lev in levels]
    np.testing.assert_array_equal(d.X.sum(axis=1), 1.0)


def test_bool_levels_false_true(contra):
    d = build_design("use ~ 1 + children + (1 | dist)", contra)
    assert d.coef_names == ["(Intercept)", "children: true"]
    np.testing.assert_array_equal(d.X[:, 1], contra["children"].astype(float))


def test_coding_makes_numeric_column_categorical():
    sleep = mixedmodels.dataset("sleepstudy")
    d = build_design("reaction ~ 1 + days + (1 | subj)", sleep,
                     contrasts={"days": DummyCoding()})
    days = sorted(sleep["days"].unique())
    assert d.coef_names == ["(Intercept)"] + [f"days: {v}" for v in days[1:]]


def test_levels_order_from_coding(contra):
    d = build_design("use ~ 1 + livch + (1 | dist)", contra,
                     contrasts={"livch": DummyCoding(levels=["3+", "2", "1", "0"])})
    assert d.coef_names == ["(Intercept)", "livch: 2", "livch: 1", "livch: 0"]
    np.testing.assert_array_equal(d.X[:, 3], (contra["livch"] == "0").astype(float))


def test_contrasts_apply_in_random_terms(contra):
    d = build_design("use ~ 1 + (1 + urban | dist)", contra,
                     contrasts={"urban": HelmertCoding()})
    assert d.reterms[0].cnames == ["(Intercept)", "urban: Y"]
    np.testing.assert_array_equal(d.reterms[0].z[:, 1],
                                  np.where(contra["urban"] == "Y", 1.0, -1.0))


def test_contrasts_for_absent_columns_ignored(contra):
    d = build_design("use ~ 1 + age + (1 | dist)", contra,
                     contrasts={"nothere": HelmertCoding(), "livch": EffectsCoding()})
    assert d.coef_names == ["(Intercept)", "age"]


# --- Grouping -----------------------------------------------------------------------

def test_grouping_marker_accepted_for_grouping_factor(contra):
    d = build_design("use ~ 1 + age + (1 | dist)", contra, contrasts={"dist": Grouping()})
    assert d.reterms[0].nlevels == contra["dist"].nunique()


def test_grouping_marker_in_fixed_part_is_an_error(contra):
    with pytest.raises(ValueError, match="'dist'.*Grouping"):
        build_design("use ~ 1 + dist + (1 | dist)", contra, contrasts={"dist": Grouping()})


# --- patsy's own codings ------------------------------------------------------------

def test_patsy_sum(contra):
    d = build_design("use ~ 1 + livch + (1 | dist)", contra, contrasts={"livch": patsy.Sum})
    levels = sorted(contra["livch"].unique())
    X, names = _coded(d, "livch")
    assert names == [f"livch: {lev}" for lev in levels[:-1]]
    # patsy's Sum codes the last level -1 in every column.
    last = (contra["livch"] == levels[-1]).to_numpy()
    np.testing.assert_array_equal(X[last], -1.0)


def test_patsy_treatment_reference(contra):
    d = build_design("use ~ 1 + urban + (1 | dist)", contra,
                     contrasts={"urban": patsy.Treatment(reference="Y")})
    assert d.coef_names == ["(Intercept)", "urban: N"]
    np.testing.assert_array_equal(d.X[:, 1], (contra["urban"] == "N").astype(float))


def test_patsy_helmert(contra):
    d = build_design("use ~ 1 + urban + (1 | dist)", contra, contrasts={"urban": patsy.Helmert})
    np.testing.assert_array_equal(d.X[:, 1], np.where(contra["urban"] == "Y", 1.0, -1.0))


def test_contrast_matrix_and_array(contra):
    cm = patsy.ContrastMatrix(np.array([[-0.5], [0.5]]), ["Y-N"])
    d = build_design("use ~ 1 + urban + (1 | dist)", contra, contrasts={"urban": cm})
    assert d.coef_names == ["(Intercept)", "urban: Y-N"]
    np.testing.assert_array_equal(d.X[:, 1], np.where(contra["urban"] == "Y", 0.5, -0.5))
    d = build_design("use ~ 1 + urban + (1 | dist)", contra,
                     contrasts={"urban": np.array([[2.0], [3.0]])})
    np.testing.assert_array_equal(d.X[:, 1], np.where(contra["urban"] == "Y", 3.0, 2.0))


def test_unusable_coding_is_an_error(contra):
    with pytest.raises(ValueError, match="contrast coding"):
        build_design("use ~ 1 + urban + (1 | dist)", contra, contrasts={"urban": "helmert"})

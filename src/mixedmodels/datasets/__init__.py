"""The classic mixed-model data sets, bundled as gzip CSV (provenance in data/README.md).

Columns that are categorical keep string labels even where the labels look like numbers
(``cbpp.period``, ``grouseticks.year``, ``contra.livch`` ...): read as integers they would
enter a formula as one slope instead of a set of contrasts, and the fit would be a
different model.
"""
from importlib import resources

import pandas as pd

__all__ = ["dataset", "datasets"]

# Which columns hold categorical labels, per data set.
_CATEGORICAL = {
    "cbpp": ["herd", "period"],
    "chickweight": ["chick", "diet"],
    "contra": ["dist", "urban", "livch", "use"],
    "dyestuff": ["batch"],
    "dyestuff2": ["batch"],
    "ergostool": ["subject", "type"],
    "grouseticks": ["index", "brood", "location", "year"],
    "insteval": ["s", "d", "dept", "studage", "lectage", "service"],
    "pastes": ["batch", "cask"],
    "penicillin": ["plate", "sample"],
    "sleepstudy": ["subj"],
    "verbagg": ["subj", "item", "gender", "btype", "situ", "mode", "resp", "r2"],
}


def datasets():
    """Names of the bundled data sets, sorted.

    Returns
    -------
    list of str
    """
    return sorted(_CATEGORICAL)


def dataset(name):
    """Load a bundled data set as a pandas DataFrame.

    Parameters
    ----------
    name : str
        One of :func:`datasets` (case-insensitive).

    Returns
    -------
    pandas.DataFrame
        Categorical columns hold strings; numeric columns are int64 or float64.
    """
    key = str(name).lower()
    if key not in _CATEGORICAL:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(datasets())}")
    path = resources.files(__package__).joinpath("data", f"{key}.csv.gz")
    with path.open("rb") as fh:
        frame = pd.read_csv(fh, compression="gzip", dtype={c: str for c in _CATEGORICAL[key]})
    return frame

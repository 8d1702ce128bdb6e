"""mixedmodels: linear and generalized linear mixed-effects models over CHOLMOD."""
from .datasets import dataset, datasets

__version__ = "0.1.0"

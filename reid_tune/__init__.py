"""reid-tune: batch-hard triplet re-identification (Hermans et al. 2017) with distributed hyperparameter search."""

from reid_tune.errors import ReidTuneError

__version__ = "0.2.0"

__all__ = ["ReidTuneError", "__version__"]

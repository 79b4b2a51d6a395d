"""Hyperparameter search: a search-space YAML run as a Ray Tune + Optuna search of Ray Train trials."""

from reid_tune.search.space import SearchSpec, load_spec
from reid_tune.search.summary import SearchSummary, print_summary
from reid_tune.search.tuner import run_search

__all__ = ["SearchSpec", "SearchSummary", "load_spec", "print_summary", "run_search"]

"""Hyperparameter search: a search-space YAML run as a Ray Tune + Optuna search of Ray Train trials.

Import from the submodules (``reid_tune.search.tuner.run_search``, ``reid_tune.search.space.load_spec``);
the package itself imports nothing, so reading a YAML file does not start Ray or Optuna.
"""

"""MLflow tracking of a search and its champion, one module per job; import from the submodules.

``store`` finds and checks the tracking store, ``runs`` writes a search's parent and trial runs,
``registry`` logs and registers the champion model (whose code is ``serving``), ``plots`` draws CMC
curves and ``versioning`` names the code that ran. No Ray here: :mod:`reid_tune.search` feeds it.
"""

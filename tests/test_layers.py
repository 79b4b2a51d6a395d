"""The package's layers, checked in fresh interpreters: the re-ID core imports neither Ray nor MLflow,
the CLI and the search-space reader import nothing heavy, and every vocabulary is defined once."""

from __future__ import annotations

import ast
import json
import pkgutil
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import reid_tune
from reid_tune import vocabulary

# The layers that wrap the core: they may import Ray, Optuna and MLflow. `doctor` only inside the checks
# that use them: importing it stays light (its row below), so it also runs where they are not installed.
WRAPPERS = {"cli", "doctor", "promote", "search", "tracking"}
CORE = sorted(
    f"reid_tune.{m.name}" for m in pkgutil.iter_modules(reid_tune.__path__) if m.name not in WRAPPERS
)


def _imported(modules: list[str], roots: set[str]) -> list[str]:
    """The top-level packages among ``roots`` that importing ``modules`` pulls in (fresh interpreter)."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(roots)!r}))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_core_modules_are_the_expected_ones() -> None:
    for name in (
        "datasets",
        "sampler",
        "augmentation",
        "models",
        "losses",
        "distances",
        "train",
        "embed",
        "evaluate",
        "gpu_data",
        "checkpoints",
        "validation",
        "config",
    ):
        assert f"reid_tune.{name}" in CORE


def test_core_imports_neither_ray_nor_mlflow() -> None:
    assert _imported(CORE, {"ray", "mlflow", "optuna"}) == []


@pytest.mark.parametrize(
    ("module", "banned"),
    [
        ("reid_tune.cli", {"torch", "torchvision", "ray", "optuna", "mlflow", "h5py"}),
        ("reid_tune.config", {"torch", "ray", "optuna", "mlflow"}),
        ("reid_tune.search.space", {"torch", "torchvision", "ray", "optuna", "mlflow"}),
        ("reid_tune.checkpoints", {"ray", "mlflow", "rich"}),
        ("reid_tune.doctor", {"ray", "optuna", "mlflow", "pyarrow", "pydantic", "yaml", "click", "rich"}),
    ],
)
def test_light_modules_import_nothing_heavy(module: str, banned: set[str]) -> None:
    """`reid-tune --help` and a YAML error answer at once because these import no framework."""
    assert _imported([module], banned) == []


def test_loading_a_checkpoint_does_not_import_the_training_loop() -> None:
    code = "import reid_tune.checkpoints, sys; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert not loaded & {"reid_tune.train", "reid_tune.steps", "reid_tune.training_data", "rich"}


def test_each_vocabulary_is_implemented_exactly() -> None:
    """The modules' name -> implementation tables cover the vocabulary's words, no more, no less."""
    from reid_tune.augmentation import AGGREGATE
    from reid_tune.datasets import _CONVERTERS
    from reid_tune.export import _WRITERS
    from reid_tune.losses import MINERS
    from reid_tune.models import list_heads, list_networks
    from reid_tune.schedules import _DECAY
    from reid_tune.search.keys import SHORT_NAMES
    from reid_tune.search.schema import KNOWN_PARAMS

    assert tuple(AGGREGATE) == vocabulary.AGGREGATORS
    assert tuple(_CONVERTERS) == vocabulary.DATASET_KINDS
    assert tuple(MINERS) == vocabulary.LOSSES
    assert tuple(_DECAY) == vocabulary.SCHEDULES
    assert tuple(_WRITERS) == vocabulary.EXPORT_FORMATS
    assert set(SHORT_NAMES) == set(KNOWN_PARAMS)  # every space name has its column in the trial tables
    assert list_networks() == sorted(vocabulary.NETWORKS) and list_heads() == sorted(vocabulary.HEADS)
    assert set(vocabulary.CAMERA_EXCLUDERS) <= set(vocabulary.CONVENTIONS) <= set(vocabulary.EXCLUDERS)


# Import names whose distribution is named otherwise.
DISTRIBUTIONS = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "pydantic_core": "pydantic-core",
}
ROOT = Path(reid_tune.__file__).parents[1]
LOCAL = {
    path.stem for folder in ("reid_tune", "tests", "benchmarks") for path in (ROOT / folder).rglob("*.py")
}


def _third_party_imports(folder: str) -> set[str]:
    """The distributions that the Python files under ``folder`` import (top-level names, any depth)."""
    names = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    names -= set(sys.stdlib_module_names) | LOCAL | {"reid_tune"}
    return {DISTRIBUTIONS.get(name, name).lower() for name in names}


def _requirements(*, extras: bool) -> set[str]:
    """The installed package's declared distributions: its dependencies, or those of its extras."""
    found = metadata.requires("reid-tune") or []
    return {re.split(r"[<>=!~\[; ]", req)[0].lower() for req in found if ("extra ==" in req) == extras}


# Declared, never imported by us: a dependency imports it without declaring it.
INDIRECT = {"onnxscript"}  # torch.onnx.export(dynamo=True)


def test_dependencies_match_imports() -> None:
    """pyproject.toml declares exactly what the package imports; tests and benchmarks add test extras."""
    declared, extras = _requirements(extras=False) - INDIRECT, _requirements(extras=True)
    library = _third_party_imports("reid_tune")
    assert library <= declared, f"imported but not declared: {sorted(library - declared)}"
    used = library | _third_party_imports("tests") | _third_party_imports("benchmarks")
    assert declared <= used, f"declared but never imported: {sorted(declared - used)}"
    assert used - declared <= extras, f"tests import undeclared: {sorted(used - declared - extras)}"

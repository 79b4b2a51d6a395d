"""Shared fixtures: the real data beside the checkout, and small generated data sets."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TESTS = Path(__file__).resolve().parent
LOCAL = {path.stem for folder in (TESTS, TESTS.parent / "benchmarks") for path in folder.glob("*.py")}

# Test modules not collected because a package they import is not installed: the GPU machine has PyTorch
# but neither Ray, MLflow, Optuna nor ONNX, and `pytest -k "cuda or gpu"` must still run the core's GPU
# tests there. CI installs every dependency, so it collects everything (and says so if it does not).
_NOT_COLLECTED: dict[str, list[str]] = {}


def _module_imports(path: Path, seen: set[Path] | None = None) -> set[str]:
    """The third-party packages a Python file imports at module level, following ``helpers`` and the
    ``reid_tune`` modules it imports (their own module-level imports; imports inside functions are lazy)."""
    seen = set() if seen is None else seen
    seen.add(path)
    roots, local = set(), []
    for node in ast.parse(path.read_text()).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            roots.add(name.split(".")[0])
            local += [file for file in _local_files(name) if file not in seen]
    for file in local:
        if file not in seen:
            roots |= _module_imports(file, seen)
    return roots - LOCAL - {"reid_tune", "__future__"} - set(sys.stdlib_module_names)


def _local_files(name: str) -> list[Path]:
    """The file of ``helpers`` or of a ``reid_tune`` module or package named ``name`` (none for others)."""
    if name == "helpers":
        return [TESTS / "helpers.py"]
    if name.split(".")[0] != "reid_tune":
        return []
    base = TESTS.parent.joinpath(*name.split("."))
    return [file for file in (base.with_suffix(".py"), base / "__init__.py") if file.is_file()]


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip a test module whose imports are not installed (None: collect as usual)."""
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    imported = _module_imports(collection_path)
    missing = sorted(name for name in imported if importlib.util.find_spec(name) is None)
    if missing:
        _NOT_COLLECTED[collection_path.name] = missing
        return True
    return None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the modules left out for missing packages."""
    for name, missing in sorted(_NOT_COLLECTED.items()):
        terminalreporter.write_line(f"not collected: {name} (not installed: {', '.join(missing)})")


@pytest.fixture(scope="session", autouse=True)
def decoded_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$REID_TUNE_CACHE`` in this session's temporary folder: training with ``data_path: auto`` builds
    decoded caches, which must not land in the user's home nor be shared with another test session.
    Subprocesses and Ray trials inherit it."""
    from reid_tune.gpu_data import CACHE_ENV

    folder = tmp_path_factory.mktemp("decoded-cache")
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip cleanly on a fresh clone without it."""
    if not (SHARED_DATA / "cuhk03-labeled" / "val").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated Market-1501-style set with its CSVs (market1501_{train,query,test}.csv)."""
    from reid_tune.synthetic import generate_demo

    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, num_train_ids=12, num_test_ids=8, images_per_camera=2, num_cameras=2, seed=0)
    return out


@pytest.fixture()
def tiny_config(demo_data: Path):
    """Options for a few-second CPU training on the generated set."""
    from reid_tune.config import TrainConfig

    return TrainConfig(
        train_set=str(demo_data / "market1501_train.csv"), image_root=str(demo_data),
        network="lunet_small", batch_p=4, batch_k=2, input_height=64, input_width=32,
        pre_crop_height=72, pre_crop_width=36, train_iterations=6, decay_start_iteration=3,
        checkpoint_frequency=3, log_every=1, num_workers=0, device="cpu",
    )

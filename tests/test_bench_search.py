"""The search benchmark's smoke run: the paper's settings and a pruning-aware TPE search through the
product (real local Ray, SQLite MLflow, promote), its table, command lines, plot and figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_search.py"


@pytest.mark.slow
def test_smoke_run_prints_its_table_and_plot(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for method in ("paper", "tpe-pruned"):
        assert re.search(rf"^\| {method} \| 1 \| \d+ \| [\d.]+k \| [\d.]+% \[", out, re.MULTILINE), out
    assert re.search(r"^reid-tune train --train-set \S+ --image-root \S+ --run-dir runs/paper-s0 ", out, re.M)
    figures = json.loads((tmp_path / "out" / "search_efficiency.json").read_text())
    assert [run["method"] for run in figures["runs"]] == ["paper", "tpe-pruned"]
    assert all(0 <= run["test_mAP"] <= 1 and run["images"] > 0 for run in figures["runs"])
    assert (tmp_path / "out" / "search_efficiency.png").stat().st_size > 10_000

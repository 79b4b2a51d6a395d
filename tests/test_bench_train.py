"""The training benchmark's smoke run: every table prints, on the CPU, with PyTorch alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.mark.slow
def test_smoke_run_prints_its_tables(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("device cpu: no GPU; CPU: ")
    for title in ("One trial", "Trials sharing cpu", "Data paths", "Whole steps by data path (fp32, 4x2, eager"):
        assert title in out
    assert re.search(r"^fp32\s+4x2\s+eager\s+[\d,]+\s+[\d.]+\s+[\d.]+$", out, re.MULTILINE), out
    assert re.search(r"^2\s+[\d,]+ \([\d,]+ \+ [\d,]+\)\s", out, re.MULTILINE), out
    for path in ("device path: DeviceBatches.batch, cache on cpu", "cpu path: PKBatches"):
        assert re.search(rf"^{re.escape(path)}.*\s[\d,]+\s+[\d.]+\s+[\d.]+$", out, re.MULTILINE), out
    assert re.search(r"^bare step: a synthetic batch on cpu\s+[\d,]+\s+100%\s", out, re.MULTILINE), out
    for feed in ("decoded-cache path: DeviceBatches", "DataLoader path: JPEGs, 2 workers"):
        assert re.search(rf"^{re.escape(feed)}\s+[\d,]+\s+[\d,]+%\s+[\d.]+\s+[\d.]+$", out, re.MULTILINE), out


def test_unknown_table_is_refused() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--only", "steps,speed"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--only speed" in done.stderr

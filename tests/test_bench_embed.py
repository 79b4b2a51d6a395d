"""The embedding benchmark's smoke run: a row per runtime with its speed, ratio and difference from eager."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_embed.py"


@pytest.mark.slow
def test_smoke_run_prints_a_row_per_runtime(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--device", "cpu"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "batch 8, input 64x32, fp32" in done.stdout
    for runtime in ("PyTorch eager", "TorchScript", "ONNX Runtime"):
        row = rf"^lunet_small\s+cpu\s+{runtime}\s+[\d,]+\s+[\d.]+x\s+(\S+)$"
        found = re.search(row, done.stdout, re.MULTILINE)
        assert found and float(found.group(1)) <= 1e-4, done.stdout
    assert list(tmp_path.iterdir()) == []  # the exported files lived in a temporary folder

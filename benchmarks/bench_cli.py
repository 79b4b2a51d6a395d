"""How fast the ``reid-tune`` command answers when it has nothing heavy to do: ``--help`` of every
command and a bad search-space file, each in a fresh process as a user runs it.

    python benchmarks/bench_cli.py            # 5 runs each, median and worst
    python benchmarks/bench_cli.py --runs 2   # quicker

The target (issue #11) is 1.5 s on 2 CPU cores: Ray, Optuna, MLflow and torch are imported only by
the commands that need them. Baselines measured in the same run: a bare Python start and
``import torch`` (what every answer cost before). Exits non-zero when a case misses the target or
does not give the answer it should (exit status 0 for help, 2 for the bad file).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 1.5
ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "reid_tune.cli"]
COMMANDS = ("train", "embed", "evaluate", "prepare", "generate-demo", "search", "promote", "doctor")


def _cases(folder: Path) -> list[tuple[str, list[str], int]]:
    """(name, command line, expected exit status) of each measured answer."""
    syntax = folder / "syntax.yaml"
    syntax.write_text("experiment: x\ndata: [\n")
    unknown = folder / "unknown_key.yaml"
    unknown.write_text("experiment: x\nsearchh: {}\n")
    cases = [("reid-tune --help", [*CLI, "--help"], 0)]
    cases += [(f"reid-tune {name} --help", [*CLI, name, "--help"], 0) for name in COMMANDS]
    cases += [("YAML syntax error", [*CLI, str(syntax)], 2), ("YAML unknown key", [*CLI, str(unknown)], 2)]
    return cases


def _seconds(command: list[str], status: int) -> float:
    """Wall time of one run of ``command``; raises if it exits with another status."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if done.returncode != status:
        raise SystemExit(f"{' '.join(command)}: exit {done.returncode}, expected {status}: {done.stderr}")
    return elapsed


def main() -> None:
    """Measure every case ``--runs`` times and print median and worst against the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    baselines = [
        ("python -c pass (baseline)", [sys.executable, "-c", "pass"], 0),
        ("python -c 'import torch' (baseline)", [sys.executable, "-c", "import torch"], 0),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cases = _cases(Path(tmp))
        print(f"{'answer':<40} {'median s':>9} {'worst s':>8}")
        slow = []
        for name, command, status in baselines + cases:
            times = [_seconds(command, status) for _ in range(args.runs)]
            print(f"{name:<40} {statistics.median(times):9.2f} {max(times):8.2f}")
            if (name, command, status) in cases and max(times) > TARGET_S:
                slow.append(name)
    print(f"target: every answer within {TARGET_S} s; {'missed by: ' + ', '.join(slow) if slow else 'met'}")
    sys.exit(1 if slow else 0)


if __name__ == "__main__":
    main()

"""``reid-tune doctor``: whether this machine (or the Ray cluster it joins) can run a search, and how fast.

It reports the versions and devices, checks the search's places (Ray cluster, tracking store, storage,
data), compares the training paths on this machine (:mod:`reid_tune.doctor.checks`) and times the step
(:mod:`reid_tune.doctor.throughput`), for one trial: the search-space file's first, or without a file the
demo search's trial on generated data (:mod:`reid_tune.doctor.target`). Checks that need a GPU are SKIPPED
on a CPU-only machine, saying why. Ray, Optuna and MLflow are imported only by the checks that use them,
so the doctor also runs where they are not installed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from reid_tune.doctor import machine, report
from reid_tune.doctor.checks import run_checks
from reid_tune.doctor.target import build_target
from reid_tune.doctor.throughput import report_throughput


def run_doctor(
    space: Path | None,
    *,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    tracking_uri: str | None = None,
    steps: int = 10,
    quick: bool = False,
) -> int:
    """Print the report, each section when it is ready; the exit status: 1 if any check FAILed, else 0.

    ``overrides``: TrainConfig options replacing the trial's (``network``, ``batch_p``, ...); ``steps``:
    timed steps per throughput reading; ``quick``: no throughput. Bad input raises ReidTuneError.
    """
    with tempfile.TemporaryDirectory(prefix="reid-tune-doctor-") as scratch:
        target = build_target(space, Path(scratch), overrides=overrides or {}, device=device)
        print(f"reid-tune doctor: {target.describe()}")
        report.pairs("Versions", machine.versions())
        report.pairs("Devices", machine.devices(target))
        found = report.results("Search", machine.setup(target, tracking_uri))
        found += report.results("Checks", run_checks(target))
        if not quick:
            found += report_throughput(target, steps)
        return report.summary(found)

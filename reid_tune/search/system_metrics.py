"""System metrics of a trial, sampled where it trains (in its rank-0 Train worker, on that node), under
the names MLflow's own system metrics use, so that the run's System metrics tab shows them.

A background thread samples CPU and memory (psutil) and, on a CUDA device, GPU memory and utilisation
(utilisation needs NVML, through torch); each report to Ray carries the samples taken since the last.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch

from reid_tune.search.keys import SAMPLE_TIME, SYSTEM_CPU, SYSTEM_PREFIX


def sample(device: torch.device) -> dict[str, float]:
    """One sample: wall time in seconds, CPU and memory of the node, and the GPU of ``device``."""
    memory = psutil.virtual_memory()
    values = {
        SAMPLE_TIME: time.time(),
        SYSTEM_CPU: psutil.cpu_percent(),
        f"{SYSTEM_PREFIX}system_memory_usage_megabytes": memory.used / 1e6,
        f"{SYSTEM_PREFIX}system_memory_usage_percentage": memory.percent,
    }
    if device.type == "cuda":
        values.update(_gpu(device.index or 0))
    return values


def _gpu(index: int) -> dict[str, float]:
    free, total = torch.cuda.mem_get_info(index)
    values = {
        f"{SYSTEM_PREFIX}gpu_{index}_memory_usage_megabytes": (total - free) / 1e6,
        f"{SYSTEM_PREFIX}gpu_{index}_memory_usage_percentage": 100 * (total - free) / total,
    }
    try:
        values[f"{SYSTEM_PREFIX}gpu_{index}_utilization_percentage"] = float(torch.cuda.utilization(index))
    except (ModuleNotFoundError, RuntimeError):  # no NVML (pynvml) on this node: memory only
        pass
    return values


class SystemSampler:
    """Samples every ``every_s`` seconds in a daemon thread until ``stop``; ``drain`` hands them over."""

    def __init__(self, every_s: float, device: torch.device) -> None:
        self.every_s, self.device = every_s, device
        self._samples: list[dict[str, float]] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="reid-system-metrics", daemon=True)

    def start(self) -> SystemSampler:
        psutil.cpu_percent()  # the first reading of a process is meaningless: it starts the interval
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            taken = sample(self.device)
            with self._lock:
                self._samples.append(taken)

    def drain(self) -> list[dict[str, float]]:
        """The samples taken since the last call; one taken now if there are none yet (a report sooner
        than ``every_s`` still carries one)."""
        with self._lock:
            taken, self._samples = self._samples, []
        return taken or [sample(self.device)]

    def stop(self) -> None:
        self._stop.set()

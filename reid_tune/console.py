"""Terminal presentation of the command line: the training progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from reid_tune.train import TrainCallback


class TrainProgress(TrainCallback):
    """A rich progress bar of a training run: loss, lr, images/s and time left; pass it as the callback."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.task: TaskID | None = None

    @contextlib.contextmanager
    def running(self, start: int, total: int) -> Iterator[None]:
        """Show the bar, from ``start`` of ``total`` iterations, while the loop runs."""
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        with self.progress:
            yield

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Advance the bar to ``step`` with the latest statistics."""
        info = (
            f"loss {metrics['loss_mean']:.4f}  lr {metrics['lr']:.2e}  "
            f"{metrics['images_per_s']:.0f} img/s  active {metrics['active_fraction']:.0%}"
        )
        self.progress.update(self.task, completed=step, info=info)

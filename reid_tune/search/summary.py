"""The end-of-search report: the best trial against the paper's settings on the same validation split."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from reid_tune.search.callbacks import SHORT_NAMES, percent, short, wide_console
from reid_tune.search.tuner import SearchSummary, TrialSummary


def _row(label: str, trial: TrialSummary | None, keys: list[str]) -> list[str]:
    if trial is None:
        return [label, "(none)", *([""] * (len(keys) + 3))]
    return [
        label,
        trial.trial_id,
        *(short(trial.config.get(k)) for k in keys),
        percent(trial.val_mAP),
        percent(trial.val_rank1),
        short(trial.step),
    ]


def print_summary(summary: SearchSummary, *, console: Console | None = None) -> None:
    """Print the best trial and the paper's-settings trial side by side, and the MLflow parent run."""
    console = console or wide_console()
    keys = [k for k in SHORT_NAMES if any(k in t.config for t in summary.trials)]
    table = Table(
        title=f"search {summary.experiment}: best validation mAP per trial",
        title_justify="left",
        pad_edge=False,
    )
    for name in ["", "trial", *(SHORT_NAMES[k] for k in keys), "mAP", "R1", "iter"]:
        table.add_column(name, justify="left" if name in ("", "trial") else "right")
    table.add_row(*_row("best", summary.best, keys))
    table.add_row(*_row("paper", summary.paper, keys))
    console.print(table)
    failed = sum(t.status == "ERROR" for t in summary.trials)
    console.print(
        f"{len(summary.trials)} trials ({failed} failed); MLflow parent run {summary.parent_run_id}"
    )
    if summary.best is not None and summary.paper is not None and summary.paper.val_mAP is not None:
        gain = summary.best.val_mAP - summary.paper.val_mAP
        console.print(f"best vs the paper's settings on the same validation split: {gain:+.2%} mAP")

"""The end-of-search report: the best trial against the paper's settings (and any other baseline) on the
same validation split, with a gain claimed only between trials that trained the same, full budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from reid_tune.search.algorithms import is_baseline, matches_point
from reid_tune.search.callbacks import percent, short, wide_console
from reid_tune.search.keys import (
    GAIN_TAG,
    METRIC,
    SHORT_NAMES,
    TIME_ATTR,
    VAL_RANK1,
    VERDICT_TAG,
    trial_fact_tag,
)
from reid_tune.search.schema import SearchSpec


@dataclass(frozen=True)
class TrialSummary:
    """One trial's outcome: its sampled settings, best validation numbers and how long it trained."""

    trial_id: str
    status: str  # TERMINATED or ERROR
    config: dict[str, Any]
    val_mAP: float | None  # the best validation mAP over its reports
    val_rank1: float | None  # rank-1 at that report
    step: int | None  # the iteration of that report
    iterations: int = 0  # iterations trained (its last report)
    full_budget: bool = False  # trained every iteration of the search's budget, without error
    baseline: bool = False  # the paper's settings or a start point marked baseline


@dataclass(frozen=True)
class SearchSummary:
    """How a search ended: every trial, the best ones, the baselines, and the verdict against the paper."""

    experiment: str
    parent_run_id: str
    trials: list[TrialSummary]
    interrupted: bool
    best: TrialSummary | None  # the highest validation mAP of any trial (what promote registers)
    paper: TrialSummary | None
    budget: int = 0  # training iterations of a full trial
    best_full: TrialSummary | None = None  # the highest validation mAP among full-budget trials
    browse: str = ""  # how to open the search's runs in the MLflow UI

    @property
    def failed(self) -> int:
        """Trials that ended in an error."""
        return sum(t.status == "ERROR" for t in self.trials)

    @property
    def stopped_early(self) -> int:
        """Trials that ended without error before the full budget."""
        return sum(t.status != "ERROR" and not t.full_budget for t in self.trials)

    @property
    def gain(self) -> float | None:
        """Validation mAP of the best full-budget trial minus the paper's, when both trained it all."""
        if self.best_full is None or self.paper is None or not self.paper.full_budget:
            return None
        return self.best_full.val_mAP - self.paper.val_mAP

    @property
    def verdict(self) -> str:
        """One sentence: the gain over the paper's settings at equal budgets, or why none is claimed."""
        if self.gain is not None:
            return (
                f"best full-budget trial {self.best_full.trial_id} vs the paper's settings, both trained "
                f"{self.budget} iterations, on the same validation split: {self.gain:+.2%} mAP"
            )
        return f"no gain over the paper's settings claimed: {self._why_no_gain()}"

    def _why_no_gain(self) -> str:
        if self.paper is None:
            return "they are not a start point of this search"
        how = "failed" if self.paper.status == "ERROR" else "was interrupted"
        return f"its trial {how} after {self.paper.iterations} of {self.budget} iterations"


def _trial_summary(result: Any, spec: SearchSpec) -> TrialSummary:
    """Best validation numbers and iterations of one trial (a ResultGrid entry)."""
    frame = result.metrics_dataframe
    scored = frame is not None and METRIC in frame and not frame[METRIC].isna().all()
    best = frame.loc[frame[METRIC].idxmax()] if scored else None
    iterations = int(frame[TIME_ATTR].max()) if scored else 0
    status = "ERROR" if result.error else "TERMINATED"
    config = dict(result.config or {})
    return TrialSummary(
        trial_id=(result.metrics or {}).get("trial_id") or Path(result.path).name,
        status=status,
        config=config,
        val_mAP=None if best is None else float(best[METRIC]),
        val_rank1=None if best is None else float(best[VAL_RANK1]),
        step=None if best is None else int(best[TIME_ATTR]),
        iterations=iterations,
        full_budget=status == "TERMINATED" and iterations >= spec.train.train_iterations,
        baseline=is_baseline(config, spec),
    )


def summarize(spec: SearchSpec, results: Any, parent_run_id: str, *, interrupted: bool) -> SearchSummary:
    """Rank the trials by their best validation mAP; pick out the full-budget best and the paper's trial."""
    trials = [_trial_summary(result, spec) for result in results]
    scored = [t for t in trials if t.val_mAP is not None]
    return SearchSummary(
        experiment=spec.experiment,
        parent_run_id=parent_run_id,
        trials=trials,
        interrupted=interrupted,
        best=max(scored, key=lambda t: t.val_mAP, default=None),
        paper=next((t for t in trials if matches_point(t.config, spec.paper_point())), None),
        budget=spec.train.train_iterations,
        best_full=max((t for t in scored if t.full_budget), key=lambda t: t.val_mAP, default=None),
    )


def summary_tags(summary: SearchSummary) -> dict[str, str]:
    """The parent run's end-of-search facts as tags (a summary, not one-point metric charts): the best
    and the paper's trials, their iterations and validation numbers, and the verdict."""
    tags = {VERDICT_TAG: summary.verdict}
    for label, trial in (
        ("best", summary.best),
        ("best_full_budget", summary.best_full),
        ("paper", summary.paper),
    ):
        if trial is not None:
            tags[trial_fact_tag(label, "trial_id")] = trial.trial_id
            tags[trial_fact_tag(label, "iterations")] = str(trial.iterations)
            if trial.val_mAP is not None:
                tags[trial_fact_tag(label, "val_mAP")] = f"{trial.val_mAP:.4f}"
                tags[trial_fact_tag(label, "val_rank1")] = f"{trial.val_rank1:.4f}"
    if summary.gain is not None:
        tags[GAIN_TAG] = f"{summary.gain:+.4f}"
    return tags


def describe_search(spec: SearchSpec) -> str:
    """The parent run's description while the search runs: what is searched, how, on which data."""
    searched = [name for name, param in spec.params.items() if param.searched]
    options = spec.search
    scheduler = "ASHA" if options.scheduler.type == "asha" else "no early stopping"
    budget = f", at most {options.max_images:,} training images" if options.max_images else ""
    return (
        f"Search {spec.experiment}: {options.searcher.upper()} (Optuna) with {scheduler} over "
        f"{', '.join(searched)}; up to {options.num_samples} trials of {spec.train.train_iterations} "
        f"iterations{budget}. Trains on {spec.data.train}; the objective is validation mAP on "
        f"{spec.validation.identities} held-out training identities."
    )


def summary_note(summary: SearchSummary, spec: SearchSpec, names: dict[str, str]) -> str:
    """The parent run's description at the end: the search, its best trial (``names``: trial id ->
    run name), the verdict against the paper's settings and the command that promotes the best."""
    ended = "Interrupted (continue with --resume)." if summary.interrupted else "Finished."
    lines = [
        describe_search(spec),
        f"{ended} {len(summary.trials)} trials: "
        f"{summary.stopped_early} stopped early, {summary.failed} failed.",
    ]
    if summary.best is not None:
        best = summary.best
        lines.append(
            f"Best trial: {names.get(best.trial_id, best.trial_id)}, validation mAP {best.val_mAP:.2%} "
            f"(rank-1 {best.val_rank1:.2%}) at iteration {best.step} (trained {best.iterations} of "
            f"{summary.budget}). Promote it: reid-tune promote {spec.tracking_experiment}"
        )
    lines.append(summary.verdict[0].upper() + summary.verdict[1:] + ".")
    return "\n\n".join(lines)


# ---------------------------------------------------------------- console


def _ended(trial: TrialSummary) -> str:
    if trial.status == "ERROR":
        return "failed"
    return "full budget" if trial.full_budget else "stopped early"


def _row(label: str, trial: TrialSummary | None, keys: list[str], budget: int) -> list[str]:
    if trial is None:
        return [label, "(none)", *([""] * (len(keys) + 5))]
    return [
        label,
        trial.trial_id,
        *(short(trial.config.get(k)) for k in keys),
        f"{trial.iterations}/{budget}",
        _ended(trial),
        percent(trial.val_mAP),
        percent(trial.val_rank1),
        short(trial.step),
    ]


def _rows(summary: SearchSummary) -> list[tuple[str, TrialSummary | None]]:
    """The best trial, the best full-budget one when it differs, the paper's, then other baselines."""
    rows = [("best", summary.best)]
    if summary.best_full is not summary.best:
        rows.append(("best full budget", summary.best_full))
    rows.append(("paper", summary.paper))
    rows += [("baseline", t) for t in summary.trials if t.baseline and t is not summary.paper]
    return rows


def print_summary(summary: SearchSummary, *, console: Console | None = None) -> None:
    """Print the best trials and the baselines side by side with their iterations, the verdict against
    the paper's settings, and the MLflow parent run."""
    console = console or wide_console()
    keys = [k for k in SHORT_NAMES if any(k in t.config for t in summary.trials)]
    table = Table(
        title=f"search {summary.experiment}: best validation mAP per trial",
        title_justify="left",
        pad_edge=False,
    )
    for name in ["", "trial", *(SHORT_NAMES[k] for k in keys), "iters", "ended", "mAP", "R1", "at iter"]:
        table.add_column(name, justify="left" if name in ("", "trial", "ended") else "right")
    for label, trial in _rows(summary):
        table.add_row(*_row(label, trial, keys, summary.budget))
    console.print(table)
    console.print(
        f"{len(summary.trials)} trials ({summary.stopped_early} stopped early, {summary.failed} failed); "
        f"MLflow parent run {summary.parent_run_id}"
    )
    if summary.browse:
        console.print(f"browse the runs: {summary.browse}", soft_wrap=True)
    console.print(summary.verdict)

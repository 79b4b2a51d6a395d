"""Search-level analysis for the MLflow parent run: what each trial reached, for what compute.

:func:`write_analysis` turns the trials' records into four files: ``history.png`` (every validation
against the search's cumulative training images, with the best-so-far line and the early stops),
``importance.png`` (Optuna's hyperparameter importances), ``parallel.png`` (parallel coordinates of the
searched values coloured by validation mAP) and ``trials.csv`` (one row per trial). No Ray here: the
search's callback gathers the records (:class:`TrialRecord`) from Tune, Optuna and MLflow.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from reid_tune.search.keys import HISTORY_PNG, IMPORTANCE_PNG, PARALLEL_PNG, TRIALS_CSV
from reid_tune.vocabulary import is_number


@dataclass(frozen=True)
class Report:
    """One validation of one trial: the training step, validation mAP and rank-1, and when (ms)."""

    step: int
    mAP: float
    rank1: float
    time_ms: int


def reports_from_history(mAP: Sequence[Any], rank1: Sequence[Any]) -> list[Report]:
    """A trial's validations, in step order, from MLflow metric histories (``step``, ``value``,
    ``timestamp``) of its validation mAP and rank-1."""
    rank1_at = {m.step: m.value for m in rank1}
    ordered = sorted(mAP, key=lambda m: m.step)
    return [Report(m.step, m.value, rank1_at.get(m.step, math.nan), m.timestamp) for m in ordered]


@dataclass(frozen=True)
class TrialRecord:
    """Everything the analysis knows of one trial."""

    trial_id: str
    run_id: str
    params: dict[str, Any]  # the searched values
    batch_size: int  # training images per iteration (P x K)
    reports: list[Report]  # in step order
    tune_status: str  # PENDING, RUNNING, TERMINATED, ERROR
    optuna_state: str  # RUNNING, COMPLETE, PRUNED, FAIL
    baseline: bool = False
    budget: int = 0  # the search's training iterations per trial

    @property
    def iterations(self) -> int:
        """Training iterations behind the last validation."""
        return self.reports[-1].step if self.reports else 0

    @property
    def best(self) -> Report | None:
        """The validation with the highest mAP (the later one on ties)."""
        return max(self.reports, key=lambda r: (r.mAP, r.step), default=None)

    @property
    def stopped_early(self) -> bool:
        """Ended without error before its full budget (ASHA's stop, or the search's end)."""
        return self.tune_status == "TERMINATED" and self.iterations < self.budget


@dataclass(frozen=True)
class BudgetPoint:
    """A validation placed on the search's clock: the training images all trials had trained by then."""

    images: int
    trial_id: str
    mAP: float
    best_so_far: float


@dataclass
class _Clock:
    images: int = 0
    last_step: dict[str, int] = field(default_factory=dict)


def budget_curve(records: Sequence[TrialRecord]) -> list[BudgetPoint]:
    """Every validation in the order the search received it, at the cumulative training images of the
    whole search (each report adds the images its trial trained since its previous one)."""
    events = sorted(
        ((report, record) for record in records for report in record.reports),
        key=lambda item: (item[0].time_ms, item[0].step),
    )
    clock, points, best = _Clock(), [], -math.inf
    for report, record in events:
        clock.images += (report.step - clock.last_step.get(record.trial_id, 0)) * record.batch_size
        clock.last_step[record.trial_id] = report.step
        best = max(best, report.mAP)
        points.append(BudgetPoint(clock.images, record.trial_id, report.mAP, best))
    return points


def images_to_reach(curve: Sequence[BudgetPoint], target: float) -> int | None:
    """The search's training images when its best-so-far validation mAP first reached ``target``."""
    return next((point.images for point in curve if point.best_so_far >= target), None)


# ---------------------------------------------------------------- files


def write_analysis(
    records: Sequence[TrialRecord], study: optuna.Study | None, folder: Path, *, title: str
) -> list[Path]:
    """The four analysis files of a search in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in (TRIALS_CSV, HISTORY_PNG, IMPORTANCE_PNG, PARALLEL_PNG)]
    write_trials_csv(records, paths[0])
    plot_history(records, paths[1], title=title)
    plot_importance(study, paths[2], title=title)
    plot_parallel(records, paths[3], title=title)
    return paths


def write_trials_csv(records: Sequence[TrialRecord], path: Path) -> None:
    """One row per trial: ids, searched values, iterations, best validation numbers and both states."""
    names = sorted({name for record in records for name in record.params})
    header = [
        "trial_id", "mlflow_run_id", *names, "iterations", "best_val_mAP", "best_val_rank1",
        "best_step", "baseline", "tune_status", "optuna_state",
    ]  # fmt: skip
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for record in records:
            best = record.best
            writer.writerow([
                record.trial_id, record.run_id, *(record.params.get(name, "") for name in names),
                record.iterations, "" if best is None else f"{best.mAP:.6f}",
                "" if best is None else f"{best.rank1:.6f}", "" if best is None else best.step,
                str(record.baseline).lower(), record.tune_status, record.optuna_state,
            ])  # fmt: skip


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on a search driver or CI
    import matplotlib.pyplot as plt

    return plt


def _images_label(value: float, _position: Any = None) -> str:
    """1,234,567 -> '1.2M', 45,000 -> '45k', 2,400 -> '2.4k'."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.0f}k" if abs(value) >= 1e4 else f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def plot_history(records: Sequence[TrialRecord], path: Path, *, title: str) -> None:
    """Each trial's validation mAP against the search's cumulative training images, the best-so-far
    line, and a cross where a trial was stopped early."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    curve = budget_curve(records)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for record in records:
        points = [p for p in curve if p.trial_id == record.trial_id]
        if not points:
            continue
        style = (
            {"color": "tab:orange", "linewidth": 2}
            if record.baseline
            else {"color": "tab:blue", "alpha": 0.6}
        )
        ax.plot([p.images for p in points], [100 * p.mAP for p in points], marker=".", **style)
        if record.stopped_early:
            ax.plot(points[-1].images, 100 * points[-1].mAP, "x", color="tab:red", markersize=9, mew=2)
    if curve:
        ax.step([p.images for p in curve], [100 * p.best_so_far for p in curve], where="post", color="black")
    handles = [
        plt.Line2D([], [], color="black", label="best so far"),
        plt.Line2D([], [], color="tab:blue", marker=".", label="a trial"),
    ]
    if any(record.baseline for record in records):
        handles.append(
            plt.Line2D([], [], color="tab:orange", linewidth=2, label="baseline (paper's settings)")
        )
    if any(record.stopped_early for record in records):
        handles.append(
            plt.Line2D([], [], color="tab:red", marker="x", linestyle="", mew=2, label="stopped early")
        )
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.xaxis.set_major_formatter(FuncFormatter(_images_label))
    ax.set(
        xlabel="training images of the whole search (cumulative)",
        ylabel="validation mAP (%)",
        title=f"{title}: validation mAP against compute ({len(records)} trials)",
    )
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)


def _importances(study: optuna.Study | None) -> tuple[dict[str, float], int, str]:
    """Optuna's fANOVA importances over the COMPLETE trials, their count, and why none when empty."""
    complete = (
        [] if study is None else study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    )
    if len(complete) < 2:
        return {}, len(complete), f"needs 2+ trials that trained their full budget, has {len(complete)}"
    if len({t.value for t in complete}) < 2:
        return {}, len(complete), "every full-budget trial has the same validation mAP"
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return optuna.importance.get_param_importances(study, evaluator=evaluator), len(complete), ""


def plot_importance(study: optuna.Study | None, path: Path, *, title: str) -> None:
    """A bar per searched parameter: its share of the variance of validation mAP (fANOVA)."""
    plt = _pyplot()
    importances, count, why = _importances(study)
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(importances), 4) + 1.5), dpi=110)
    if importances:
        names = list(importances)[::-1]
        shares = [100 * importances[name] for name in names]
        ax.barh(names, shares, color="tab:blue")
        for y, share in enumerate(shares):
            ax.text(share, y, f" {share:.0f}%", va="center", fontsize=9)
        ax.set_xlim(0, max(shares) * 1.15 + 1)
    else:
        ax.text(0.5, 0.5, f"no importances yet:\n{why}", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set(
        xlabel="importance for validation mAP (% of explained variance)",
        title=f"{title}: hyperparameter importance\n"
        f"evaluator: fANOVA (Optuna), on {count} full-budget trials",
    )
    _save(fig, path)


def _axis_values(values: list[Any]) -> tuple[list[float], list[tuple[float, str]]]:
    """Values of one parameter placed on [0, 1], and (position, label) ticks: numbers linearly (or on a
    log scale when they span 10x or more, as a learning rate does), anything else as categories."""
    if len({str(v) for v in values}) == 1:
        return [0.5] * len(values), [(0.5, _short(values[0]) if is_number(values[0]) else str(values[0]))]
    if all(is_number(v) for v in values):
        low, high = min(values), max(values)
        log = low > 0 and high / low >= 10
        scale = (lambda v: math.log10(v)) if log else (lambda v: v)
        span = (scale(high) - scale(low)) or 1.0
        positions = [(scale(v) - scale(low)) / span for v in values]
        return positions, [(0.0, _short(low)), (1.0, _short(high))]
    categories = sorted({str(v) for v in values})
    step = 1 / max(len(categories) - 1, 1)
    where = {c: i * step for i, c in enumerate(categories)}
    return [where[str(v)] for v in values], [(where[c], c) for c in categories]


def _short(value: float) -> str:
    return f"{value:.3g}" if 1e-2 <= abs(value) < 1e4 or value == 0 else f"{value:.1e}"


def plot_parallel(records: Sequence[TrialRecord], path: Path, *, title: str) -> None:
    """Parallel coordinates: one line per validated trial through its searched values, coloured by its
    best validation mAP (dashed: stopped early)."""
    plt = _pyplot()
    scored = [r for r in records if r.best is not None]
    names = sorted({name for record in scored for name in record.params})
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 4, 4.8), dpi=110)
    if not scored:
        ax.text(0.5, 0.5, "no validated trial yet", ha="center", va="center", transform=ax.transAxes)
        _save(fig, path)
        return
    maps = [100 * r.best.mAP for r in scored]
    axes = [_axis_values([r.params[name] for r in scored]) for name in names]
    axes.append(_axis_values(maps))
    norm = plt.Normalize(min(maps), max(maps) if max(maps) > min(maps) else min(maps) + 1)
    cmap = plt.get_cmap("viridis")
    for j in sorted(range(len(scored)), key=lambda j: maps[j]):  # the best drawn last, on top
        style = "--" if scored[j].stopped_early else "-"
        ys = [positions[j] for positions, _ in axes]
        ax.plot(range(len(ys)), ys, color=cmap(norm(maps[j])), linestyle=style, alpha=0.85)
    for x, (_, ticks) in enumerate(axes):
        ax.axvline(x, color="grey", linewidth=0.8)
        for y, label in ticks:
            ax.text(x, y, f" {label}", fontsize=8, va="center")
    ax.set_xticks(range(len(axes)), [*names, "val mAP (%)"])
    ax.set_yticks([])
    ax.set(xlim=(-0.2, len(axes) - 0.6), ylim=(-0.05, 1.05))
    colorbar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
    colorbar.set_label("best validation mAP (%)")
    ax.set_title(f"{title}: searched values of {len(scored)} trials (dashed: stopped early)")
    _save(fig, path)

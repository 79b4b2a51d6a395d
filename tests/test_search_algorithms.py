"""The search's algorithms and reports without a Ray cluster: the Optuna searcher that tells early stops
as PRUNED, ASHA that spares the baselines, the analysis files and the end-of-search summary."""

from __future__ import annotations

import csv
import dataclasses
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from helpers import search_document
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from rich.console import Console

from reid_tune.search import analysis
from reid_tune.search.algorithms import (
    BaselineASHA,
    ImageBudget,
    PruningOptunaSearch,
    build_scheduler,
    build_searcher,
    matches_point,
    optuna_state,
)
from reid_tune.search.analysis import BudgetPoint, Report, TrialRecord, budget_curve, images_to_reach
from reid_tune.search.keys import IMAGES_KEY, METRIC, TIME_ATTR
from reid_tune.search.schema import PAPER_POINT, SearchSpec
from reid_tune.search.summary import SearchSummary, TrialSummary, print_summary, summary_note, summary_tags
from reid_tune.search.tuner import param_space

BUDGET = 20  # train_iterations of helpers.search_document
OTHER_POINT = {**PAPER_POINT, "batch_p": 6, "batch_k": 3}  # a complete start point inside the space


def _spec(**search: Any) -> SearchSpec:
    """The test search (20 iterations, ASHA grace 10, factor 2); ``search`` updates its ``search:``.
    Its data folder does not exist: nothing here reads it."""
    return SearchSpec.model_validate(search_document(Path("/nowhere"), "algorithms", search=search))


# ---------------------------------------------------------------- PruningOptunaSearch


def _searcher(**search: Any) -> PruningOptunaSearch:
    """The searcher of :func:`build_searcher`, given its space as Tune gives it."""
    spec = _spec(**search)
    searcher = build_searcher(spec)
    searcher.set_search_properties(METRIC, "max", param_space(spec))
    return searcher


def _result(step: int, mAP: float | None, *, batch: int = 72, iteration: int | None = None) -> dict[str, Any]:
    """A trial's report at training ``step`` with ``batch`` images per iteration; ``iteration`` is Tune's
    own counter (default: one per validation every 10 steps, as a first try counts)."""
    result = {TIME_ATTR: step, IMAGES_KEY: step * batch, "training_iteration": iteration or step // 10}
    return result if mAP is None else {**result, METRIC: mAP}


def _run(
    searcher: PruningOptunaSearch, trial_id: str, results: list[dict[str, Any]], *, error: bool = False
) -> FrozenTrial:
    """Tune's calls for one trial: suggest, its results, then its end (with its last result, or none
    on error, as Tune calls it); returns its Optuna trial."""
    searcher.suggest(trial_id)
    for result in results:
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, None if error or not results else results[-1], error=error)
    return searcher.optuna_trial(trial_id)


@pytest.mark.parametrize(
    ("results", "error", "state", "value"),
    [
        ([_result(10, 0.3), _result(20, 0.5)], False, TrialState.COMPLETE, 0.5),  # its full budget
        ([_result(10, 0.3)], False, TrialState.PRUNED, 0.3),  # ASHA's stop (Optuna keeps the last value)
        ([_result(10, 0.3), _result(15, None)], False, TrialState.PRUNED, 0.3),  # no validation at 15
        ([], False, TrialState.PRUNED, None),  # stopped before any validation
        ([_result(10, 0.3)], True, TrialState.FAIL, None),
    ],
    ids=["full-budget", "stopped", "unvalidated-last", "never-validated", "error"],
)
def test_trial_end_is_told_by_its_training(
    results: list[dict[str, Any]], error: bool, state: TrialState, value: float | None
) -> None:
    trial = _run(_searcher(), "t1", results, error=error)
    assert trial.state == state
    assert trial.value == (None if value is None else pytest.approx(value))
    assert trial.intermediate_values == {r[TIME_ATTR]: r[METRIC] for r in results if METRIC in r}


def test_intermediate_values_at_the_training_step_each_once() -> None:
    searcher = _searcher()
    searcher.suggest("t1")
    retried = [_result(10, 0.3), _result(10, 0.31, iteration=1), _result(20, 0.5, iteration=2)]
    with warnings.catch_warnings():  # Optuna warns when a step is reported twice
        warnings.filterwarnings("error", message=".*already reported")
        for result in retried:
            searcher.on_trial_result("t1", result)
        searcher.on_trial_complete("t1", retried[-1])  # Tune ends it with the result already seen
    trial = searcher.optuna_trial("t1")
    assert trial.intermediate_values == {10: 0.3, 20: 0.5}
    assert (trial.state, trial.value) == (TrialState.COMPLETE, 0.5)


def test_stopped_as_complete_keeps_rays_behaviour() -> None:
    trial = _run(_searcher(stopped_as="complete"), "t1", [_result(10, 0.3)])
    assert (trial.state, trial.value) == (TrialState.COMPLETE, 0.3)  # a stopped trial taken as final
    assert trial.intermediate_values == {1: 0.3}  # at Tune's iteration counter


def test_max_images_finishes_the_search_once_spent() -> None:
    searcher = _searcher(max_images=1500)
    assert searcher.suggest("t1") == PAPER_POINT  # P * K = 72 images per iteration
    for result in (_result(10, 0.3), _result(20, 0.4), _result(10, 0.3)):  # the last one: a retry
        searcher.on_trial_result("t1", result)
    assert searcher.images_spent == 20 * 72  # a trial counts its most images, not their sum
    assert isinstance(searcher.suggest("t2"), dict)
    searcher.on_trial_result("t2", _result(10, 0.2, batch=8))
    assert searcher.images_spent == 20 * 72 + 10 * 8
    assert searcher.suggest("t3") == Searcher.FINISHED


def test_without_max_images_it_never_finishes() -> None:
    searcher = _searcher()
    searcher.suggest("t1")
    searcher.on_trial_result("t1", _result(20, 0.4, batch=10**9))
    assert isinstance(searcher.suggest("t2"), dict)


def test_image_budget_stops_running_trials_but_the_baselines() -> None:
    spec = _spec(max_images=1000, start_points=["paper", OTHER_POINT])
    searcher = build_searcher(spec)
    searcher.set_search_properties(METRIC, "max", param_space(spec))
    stopper = ImageBudget(searcher, spec.baseline_points())
    paper, other = searcher.suggest("paper"), searcher.suggest("other")
    # Tune asks the stopper first, with the trial's config in the result
    assert not stopper("paper", {**_result(10, 0.3), "config": paper})  # 720 images
    assert not stopper("other", {**_result(10, 0.2, batch=18), "config": other})  # 720 + 180
    assert stopper("other", {**_result(20, 0.2, batch=18), "config": other})  # 720 + 360: spent
    assert not stopper("paper", {**_result(20, 0.4), "config": paper})  # a baseline trains its budget
    assert searcher.images_spent == 20 * 72 + 20 * 18 and not stopper.stop_all()
    assert searcher.suggest("next") == Searcher.FINISHED


def test_start_points_are_suggested_first() -> None:
    searcher = _searcher(start_points=["paper", {**OTHER_POINT, "baseline": True}])
    assert [searcher.suggest("t1"), searcher.suggest("t2")] == [PAPER_POINT, OTHER_POINT]
    sampled = searcher.suggest("t3")
    assert set(sampled) == set(PAPER_POINT) and sampled not in (PAPER_POINT, OTHER_POINT)


@pytest.mark.parametrize(
    ("result", "error", "state"),
    [
        ({TIME_ATTR: 20, METRIC: 0.5}, False, TrialState.COMPLETE),
        ({TIME_ATTR: 25, METRIC: 0.5}, False, TrialState.COMPLETE),
        ({TIME_ATTR: 19, METRIC: 0.5}, False, TrialState.PRUNED),
        ({TIME_ATTR: 20}, False, TrialState.PRUNED),
        (None, False, TrialState.PRUNED),
        ({TIME_ATTR: 20, METRIC: 0.5}, True, TrialState.FAIL),
    ],
)
def test_optuna_state(result: dict[str, Any] | None, error: bool, state: TrialState) -> None:
    assert optuna_state(result, budget=BUDGET, error=error) == state


@pytest.mark.parametrize(
    ("config", "point", "matches"),
    [
        (PAPER_POINT, PAPER_POINT, True),
        ({**PAPER_POINT, "lr": 3e-4 * (1 + 1e-12)}, PAPER_POINT, True),  # a float up to rounding
        ({**PAPER_POINT, "lr": 3.1e-4}, PAPER_POINT, False),
        ({"batch_p": 18}, PAPER_POINT, False),  # a key of the point missing
        (PAPER_POINT, None, False),
        (PAPER_POINT, {}, False),
    ],
)
def test_matches_point(config: dict[str, Any], point: dict[str, Any] | None, matches: bool) -> None:
    assert matches_point(config, point) is matches


# ---------------------------------------------------------------- BaselineASHA

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP

# (trial, its config, step, val mAP, plain ASHA's decision, BaselineASHA's decision); rungs at 10 and 20
SCHEDULE = [
    ("strong", {**PAPER_POINT, "batch_p": 8}, 10, 0.5, CONTINUE, CONTINUE),  # first at the rung
    ("paper", PAPER_POINT, 10, 0.1, STOP, CONTINUE),  # below the median of {0.5}: a baseline goes on
    ("weak", {**PAPER_POINT, "batch_p": 9}, 10, 0.1, STOP, STOP),  # below the median of {0.5, 0.1}
    ("fair", {**PAPER_POINT, "batch_p": 10}, 10, 0.2, CONTINUE, CONTINUE),  # above the median 0.1 of
    # {0.5, 0.1, 0.1}: the baseline's result counts in the rung
    ("paper", PAPER_POINT, 20, 0.2, STOP, STOP),  # max_t: every trial ends
    ("strong", {**PAPER_POINT, "batch_p": 8}, 20, 0.6, STOP, STOP),
]


def _decisions(scheduler: TrialScheduler) -> list[str]:
    """What ``scheduler`` decides on each result of :data:`SCHEDULE`."""
    scheduler.set_search_properties(METRIC, "max")
    trials: dict[str, SimpleNamespace] = {}
    actions = []
    for name, config, step, mAP, *_ in SCHEDULE:
        if name not in trials:
            trials[name] = SimpleNamespace(trial_id=name, config=config)
            scheduler.on_trial_add(None, trials[name])
        actions.append(scheduler.on_trial_result(None, trials[name], {TIME_ATTR: step, METRIC: mAP}))
    return actions


def test_baseline_asha_decides_as_asha_but_spares_the_baselines() -> None:
    plain = ASHAScheduler(time_attr=TIME_ATTR, max_t=BUDGET, grace_period=10, reduction_factor=2)
    spared = build_scheduler(_spec())
    assert isinstance(spared, BaselineASHA) and spared.baselines == [PAPER_POINT]
    assert _decisions(plain) == [row[4] for row in SCHEDULE]
    assert _decisions(spared) == [row[5] for row in SCHEDULE]


def test_no_scheduler() -> None:
    assert build_scheduler(_spec(scheduler={"type": "none"})) is None


# ---------------------------------------------------------------- analysis


def _record(
    trial_id: str,
    batch_size: int,
    reports: list[tuple[int, float, int]],
    *,
    params: dict[str, Any] | None = None,
    status: str = "TERMINATED",
    state: str = "COMPLETE",
    baseline: bool = False,
) -> TrialRecord:
    """A trial's record from (step, mAP, time in ms) reports; rank-1 is mAP + 0.1."""
    return TrialRecord(
        trial_id=trial_id,
        run_id=f"run-{trial_id}",
        params=params or {"batch_p": batch_size // 4, "batch_k": 4, "lr": 3e-4, "margin": "soft"},
        batch_size=batch_size,
        reports=[Report(step, mAP, mAP + 0.1, time_ms) for step, mAP, time_ms in reports],
        tune_status=status,
        optuna_state=state,
        baseline=baseline,
        budget=BUDGET,
    )


# two trials validating in turn: a (8 images per iteration) then b (72), then a, then b
SMALL = _record("a", 8, [(10, 0.2, 100), (20, 0.4, 300)])
LARGE = _record("b", 72, [(10, 0.3, 200), (20, 0.35, 400)], baseline=True)


def test_budget_curve_adds_each_trials_images_in_time_order() -> None:
    assert budget_curve([LARGE, SMALL]) == [
        BudgetPoint(images=80, trial_id="a", mAP=0.2, best_so_far=0.2),
        BudgetPoint(images=80 + 720, trial_id="b", mAP=0.3, best_so_far=0.3),
        BudgetPoint(images=80 + 720 + 80, trial_id="a", mAP=0.4, best_so_far=0.4),
        BudgetPoint(images=80 + 720 + 80 + 720, trial_id="b", mAP=0.35, best_so_far=0.4),
    ]
    assert budget_curve([]) == []


@pytest.mark.parametrize(("target", "images"), [(0.1, 80), (0.3, 800), (0.4, 880), (0.41, None)])
def test_images_to_reach(target: float, images: int | None) -> None:
    assert images_to_reach(budget_curve([SMALL, LARGE]), target) == images


def _study(states: list[tuple[TrialState, float | None]]) -> optuna.Study:
    """An in-memory study with one trial per (state, value), their parameters spread over the space."""
    study = optuna.create_study(direction="maximize")
    distributions = {
        "batch_p": IntDistribution(4, 18),
        "lr": FloatDistribution(1e-4, 1e-3, log=True),
        "margin": CategoricalDistribution(["soft", 0.2]),
    }
    for i, (state, value) in enumerate(states):
        params = {"batch_p": 4 + 2 * i, "lr": 1e-4 * (1.5**i), "margin": ["soft", 0.2][i % 2]}
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value,
                params=params,
                distributions=distributions,
                intermediate_values={10: value or 0.1},
            )
        )
    return study


@pytest.fixture()
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The texts of every figure the analysis saves, by file name."""
    texts: dict[str, list[str]] = {}
    save = analysis._save

    def recording(fig: Any, path: Path) -> None:
        from matplotlib.text import Text

        save(fig, path)  # drawn: the tick labels are set
        texts[path.name] = [t.get_text() for t in fig.findobj(Text)]

    monkeypatch.setattr(analysis, "_save", recording)
    return texts


CSV_HEADER = [
    "trial_id", "mlflow_run_id", "batch_k", "batch_p", "lr", "margin", "iterations", "best_val_mAP",
    "best_val_rank1", "best_step", "baseline", "tune_status", "optuna_state",
]  # fmt: skip


def _write(records: list[TrialRecord], study: optuna.Study | None, folder: Path) -> list[dict[str, str]]:
    """Write the analysis; check its four files are there and not empty; trials.csv's rows."""
    paths = analysis.write_analysis(records, study, folder, title="search t")
    assert [p.name for p in paths] == ["trials.csv", "history.png", "importance.png", "parallel.png"]
    assert all(p.parent == folder and p.stat().st_size > 0 for p in paths)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths[1:])
    with paths[0].open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == CSV_HEADER or not records
    return rows


def test_write_analysis_with_a_study(tmp_path: Path, drawn: dict[str, list[str]]) -> None:
    stopped = _record("c", 24, [(10, 0.1, 500)], state="PRUNED")
    failed = _record("d", 24, [], status="ERROR", state="FAIL")
    study = _study(
        [(TrialState.COMPLETE, 0.4), (TrialState.COMPLETE, 0.35), (TrialState.COMPLETE, 0.2)]
        + [(TrialState.PRUNED, None)]
    )
    rows = _write([SMALL, LARGE, stopped, failed], study, tmp_path)
    assert [row["trial_id"] for row in rows] == ["a", "b", "c", "d"]
    assert rows[0] == {
        "trial_id": "a", "mlflow_run_id": "run-a", "batch_k": "4", "batch_p": "2", "lr": "0.0003",
        "margin": "soft", "iterations": "20", "best_val_mAP": "0.400000", "best_val_rank1": "0.500000",
        "best_step": "20", "baseline": "false", "tune_status": "TERMINATED", "optuna_state": "COMPLETE",
    }  # fmt: skip
    assert (rows[1]["baseline"], rows[1]["best_step"], rows[1]["best_val_mAP"]) == ("true", "20", "0.350000")
    assert (rows[2]["iterations"], rows[2]["optuna_state"]) == ("10", "PRUNED")
    assert (rows[3]["iterations"], rows[3]["best_val_mAP"], rows[3]["tune_status"]) == ("0", "", "ERROR")
    assert {"batch_p", "lr", "margin"} <= set(drawn["importance.png"])  # a bar per parameter
    assert "on 3 full-budget trials" in "".join(drawn["importance.png"])


NONE_COMPLETE = "needs 2+ trials that trained their full budget, has 0"


@pytest.mark.parametrize(
    ("study", "why"),
    [
        (lambda: None, NONE_COMPLETE),
        (lambda: _study([(TrialState.PRUNED, None)] * 3), NONE_COMPLETE),
        (lambda: _study([(TrialState.COMPLETE, 0.3)] * 2), "every full-budget trial has the same validation"),
    ],
    ids=["no-study", "only-pruned", "equal-values"],
)
def test_importance_says_why_it_has_none(
    study: Callable[[], optuna.Study | None], why: str, tmp_path: Path, drawn: dict[str, list[str]]
) -> None:
    rows = _write([SMALL, LARGE], study(), tmp_path)
    assert len(rows) == 2
    assert any(text.startswith(f"no importances yet:\n{why}") for text in drawn["importance.png"])


def test_write_analysis_before_any_trial(tmp_path: Path, drawn: dict[str, list[str]]) -> None:
    assert _write([], None, tmp_path) == []
    assert "no validated trial yet" in drawn["parallel.png"]


def test_one_validated_trial_draws_without_layout_warnings(tmp_path: Path) -> None:
    """One trial puts every parallel axis at one value: drawn mid-height, inside the figure."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Tight layout not applied")
        _write([SMALL], None, tmp_path)


# ---------------------------------------------------------------- summary

SUMMARY_BUDGET = 150


def _trial(
    trial_id: str, mAP: float | None, iterations: int, *, status: str = "TERMINATED", paper: bool = False
) -> TrialSummary:
    """A trial's summary: the paper's settings or others, its best mAP at its last iteration."""
    return TrialSummary(
        trial_id=trial_id,
        status=status,
        config=PAPER_POINT if paper else {**PAPER_POINT, "batch_p": 8, "lr": 5e-4},
        val_mAP=mAP,
        val_rank1=None if mAP is None else mAP + 0.1,
        step=None if mAP is None else iterations,
        iterations=iterations,
        full_budget=status == "TERMINATED" and iterations >= SUMMARY_BUDGET,
        baseline=paper,
    )


def _summary(*trials: TrialSummary) -> SearchSummary:
    """The summary of ``trials`` (the paper's trial is the one marked baseline)."""
    scored = [t for t in trials if t.val_mAP is not None]
    return SearchSummary(
        experiment="s",
        parent_run_id="parent",
        trials=list(trials),
        interrupted=False,
        best=max(scored, key=lambda t: t.val_mAP, default=None),
        paper=next((t for t in trials if t.baseline), None),
        budget=SUMMARY_BUDGET,
        best_full=max((t for t in scored if t.full_budget), key=lambda t: t.val_mAP, default=None),
    )


BEST_STOPPED = _trial("t1", 0.5, 100)  # the highest mAP, stopped early
BEST_FULL = _trial("t2", 0.45, 150)
PAPER = _trial("t3", 0.4, 150, paper=True)


def test_gain_is_claimed_between_full_budget_trials() -> None:
    summary = _summary(BEST_STOPPED, BEST_FULL, PAPER)
    assert summary.best is BEST_STOPPED and summary.best_full is BEST_FULL
    assert summary.gain == pytest.approx(0.05)
    assert summary.verdict == (
        "best full-budget trial t2 vs the paper's settings, both trained 150 iterations, on the same "
        "validation split: +5.00% mAP"
    )
    assert summary_tags(summary) == {
        "reid_tune.verdict": summary.verdict,
        "reid_tune.best_trial_id": "t1",
        "reid_tune.best_iterations": "100",
        "reid_tune.best_val_mAP": "0.5000",
        "reid_tune.best_val_rank1": "0.6000",
        "reid_tune.best_full_budget_trial_id": "t2",
        "reid_tune.best_full_budget_iterations": "150",
        "reid_tune.best_full_budget_val_mAP": "0.4500",
        "reid_tune.best_full_budget_val_rank1": "0.5500",
        "reid_tune.paper_trial_id": "t3",
        "reid_tune.paper_iterations": "150",
        "reid_tune.paper_val_mAP": "0.4000",
        "reid_tune.paper_val_rank1": "0.5000",
        "reid_tune.gain_val_mAP": "+0.0500",
    }
    note = summary_note(summary, _spec(), {"t1": "t01-t1"}).split("\n\n")
    assert note[0].startswith("Search algorithms: TPE (Optuna) with ASHA over batch_p, batch_k, margin,")
    assert note[1:] == [
        "Finished. 3 trials: 1 stopped early, 0 failed.",
        "Best trial: t01-t1, validation mAP 50.00% (rank-1 60.00%) at iteration 100 (trained 100 of 150). "
        "Promote it: reid-tune promote algorithms",
        f"B{summary.verdict[1:]}.",
    ]


@pytest.mark.parametrize(
    ("summary", "why"),
    [
        (
            _summary(BEST_FULL, _trial("t3", 0.2, 50, status="ERROR", paper=True)),
            "its trial failed after 50 of 150 iterations",
        ),
        (_summary(BEST_FULL, _trial("t3", 0.2, 100, paper=True)), "its trial was interrupted after 100 of"),
        (_summary(BEST_STOPPED, BEST_FULL), "they are not a start point of this search"),
        (_summary(BEST_STOPPED, _trial("t3", 0.3, 100, paper=True)), "its trial was interrupted after 100"),
    ],
    ids=["paper-failed", "paper-fewer-iterations", "no-paper", "no-full-budget-trial"],
)
def test_no_gain_claimed(summary: SearchSummary, why: str) -> None:
    assert summary.gain is None
    assert summary.verdict.startswith(f"no gain over the paper's settings claimed: {why}")
    assert "reid_tune.gain_val_mAP" not in summary_tags(summary)
    assert summary_tags(summary)["reid_tune.verdict"] == summary.verdict


def test_print_summary_shows_iterations_and_the_verdict() -> None:
    failed = _trial("t4", None, 0, status="ERROR")
    summary = _summary(BEST_STOPPED, BEST_FULL, PAPER, failed)
    out = io.StringIO()
    print_summary(summary, console=Console(file=out, width=200))
    lines = out.getvalue().splitlines()
    cells = [[cell.strip() for cell in line.strip("│").split("│")] for line in lines if line.startswith("│")]
    rows = {row[0]: row[1:] for row in cells}  # label -> trial, settings, iters, ended, mAP, R1, at iter
    assert {label: (row[0], *row[-5:-3]) for label, row in rows.items()} == {
        "best": ("t1", "100/150", "stopped early"),
        "best full budget": ("t2", "150/150", "full budget"),
        "paper": ("t3", "150/150", "full budget"),
    }
    assert "4 trials (1 stopped early, 1 failed); MLflow parent run parent" in lines
    assert lines[-1] == summary.verdict
    out = io.StringIO()
    browse = "http://mlflow:5000/#/experiments/1"
    print_summary(dataclasses.replace(summary, browse=browse), console=Console(file=out))
    assert "browse the runs: http://mlflow:5000/#/experiments/1" in out.getvalue().splitlines()

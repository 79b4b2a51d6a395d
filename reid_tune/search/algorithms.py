"""The searcher and the scheduler of a search: Optuna told the truth about early stops, and ASHA that
never stops a baseline.

Ray's ``OptunaSearch`` reports each result to Optuna at Tune's own iteration counter (which restarts
when a trial is retried) and tells Optuna that a trial ASHA stopped early COMPLETED with its last value,
so TPE learns from short runs as if they were final. :class:`PruningOptunaSearch` reports validation mAP
at the training step, tells a stopped trial as PRUNED and only a trial that trained its whole budget as
COMPLETE. :class:`BaselineASHA` decides every stop as ASHA does, except that it lets the baselines (the
paper's settings and the start points marked ``baseline``) train their full budget, so the search's
verdict compares full-budget trials.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from reid_tune.search.keys import IMAGES_KEY, METRIC, TIME_ATTR
from reid_tune.search.schema import SearchSpec

STOPPED_AS = ("pruned", "complete")  # how a trial stopped early is told to Optuna (search.stopped_as)


def matches_point(config: dict[str, Any], point: dict[str, Any] | None) -> bool:
    """Whether a trial's sampled ``config`` is the starting ``point`` (floats up to rounding)."""
    if not point:
        return False
    return all(k in config and _same(config[k], v) for k, v in point.items())


def _same(value: Any, expected: Any) -> bool:
    if value == expected:
        return True
    number = isinstance(expected, float) and isinstance(value, (int, float))
    return number and math.isclose(value, expected, rel_tol=1e-9)


def is_baseline(config: dict[str, Any], spec: SearchSpec) -> bool:
    """Whether a trial runs the settings of one of the search's baselines."""
    return any(matches_point(config, point) for point in spec.baseline_points())


def optuna_state(result: dict[str, Any] | None, *, budget: int, error: bool) -> TrialState:
    """The state a finished trial has for Optuna: FAIL on error, COMPLETE when its last validation was
    at the full ``budget`` of iterations, else PRUNED (stopped early, or it never validated)."""
    if error:
        return TrialState.FAIL
    trained = (result or {}).get(TIME_ATTR)
    full = trained is not None and trained >= budget and (result or {}).get(METRIC) is not None
    return TrialState.COMPLETE if full else TrialState.PRUNED


class PruningOptunaSearch(OptunaSearch):
    """Ray Tune's OptunaSearch that reports validation mAP at the training step and tells a trial
    stopped before ``budget`` iterations as PRUNED; ``stopped_as="complete"`` keeps Ray's behaviour
    (for comparison only). With ``max_images`` it suggests no new trial once the trials have trained
    that many images (:class:`ImageBudget` stops the running ones). Its study and image count survive
    ``--resume`` inside Tune's searcher checkpoint."""

    def __init__(
        self, *, budget: int, stopped_as: str = "pruned", max_images: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.budget, self.stopped_as, self.max_images = budget, stopped_as, max_images
        self.images: dict[str, int] = {}  # trial id -> training images so far

    @property
    def images_spent(self) -> int:
        """Training images of all trials so far."""
        return sum(self.images.values())

    @property
    def budget_spent(self) -> bool:
        """Whether the trials have trained the search's ``max_images`` (never without one)."""
        return self.max_images is not None and self.images_spent >= self.max_images

    def count_images(self, trial_id: str, result: dict) -> None:
        """Record a trial's training images from a result (its most so far: a retry re-reports)."""
        self.images[trial_id] = max(self.images.get(trial_id, 0), int(result.get(IMAGES_KEY, 0)))

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.budget_spent:
            return Searcher.FINISHED
        return super().suggest(trial_id)

    @property
    def study(self) -> optuna.Study | None:
        """The Optuna study (None until Tune has given the search space)."""
        return self._ot_study

    def optuna_trial(self, trial_id: str) -> FrozenTrial | None:
        """The Optuna trial that Tune's trial ``trial_id`` runs, as the study holds it now."""
        trial = self._ot_trials.get(trial_id)
        return None if trial is None else self._ot_study.get_trials(deepcopy=False)[trial.number]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.count_images(trial_id, result)
        if self.stopped_as == "complete":
            super().on_trial_result(trial_id, result)
            return
        if trial_id in self._completed_trials or result.get(METRIC) is None:
            return
        step = int(result[TIME_ATTR])
        if step not in self.optuna_trial(trial_id).intermediate_values:  # a retry re-reports none twice
            self._ot_trials[trial_id].report(float(result[METRIC]), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.stopped_as == "complete" or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        if result:
            self.on_trial_result(trial_id, result)
        state = optuna_state(result, budget=self.budget, error=error)
        value = float(result[METRIC]) if state == TrialState.COMPLETE else None
        self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        self._completed_trials.add(trial_id)


class BaselineASHA(ASHAScheduler):
    """ASHA whose stops spare the baseline trials: their results still fill the rungs, which the other
    trials are measured against, but they always train ``max_t`` iterations."""

    def __init__(self, *, baselines: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.baselines = baselines

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        protected = any(matches_point(trial.config, point) for point in self.baselines)
        if action == TrialScheduler.STOP and protected and result.get(TIME_ATTR, 0) < self._max_t:
            return TrialScheduler.CONTINUE
        return action


class ImageBudget(Stopper):
    """Makes ``max_images`` a hard budget: once the trials have trained that many images, each running
    trial stops at its next report, except the baselines, which still train their full budget. The
    count is the searcher's, so it survives ``--resume`` with it."""

    def __init__(self, searcher: PruningOptunaSearch, baselines: list[dict[str, Any]]) -> None:
        self.searcher, self.baselines = searcher, baselines

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.searcher.count_images(trial_id, result)  # Tune asks the stopper before the searcher
        protected = any(matches_point(result.get("config", {}), point) for point in self.baselines)
        return self.searcher.budget_spent and not protected

    def stop_all(self) -> bool:
        return False  # the searcher starts no new trial and the baselines finish


def build_searcher(spec: SearchSpec) -> PruningOptunaSearch:
    """The seeded TPE (or random) sampler behind :class:`PruningOptunaSearch`, from the start points."""
    seed = spec.search.seed
    sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.search.startup_trials)
        if spec.search.searcher == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    return PruningOptunaSearch(
        budget=spec.train.train_iterations,
        stopped_as=spec.search.stopped_as,
        max_images=spec.search.max_images,
        sampler=sampler,
        points_to_evaluate=spec.start_points() or None,
    )


def build_scheduler(spec: SearchSpec) -> BaselineASHA | None:
    """ASHA on validation mAP with the training iteration as its clock (baselines spared), or None."""
    scheduler = spec.search.scheduler
    if scheduler.type == "none":
        return None
    return BaselineASHA(
        baselines=spec.baseline_points(),
        time_attr=TIME_ATTR,
        max_t=spec.train.train_iterations,
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )

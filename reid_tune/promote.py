"""Promote a search's champion: the best trial by validation mAP, tested once, registered as ``@champion``.

The test lists are used here and only here, after the search has chosen; the test embeddings go to
the chosen trial's run, the model (checkpoint with its architecture and preprocessing options) is
logged on that run as an MLflow model carrying the test metrics, and becomes a new version of the
registered model, with a description and tags; earlier versions are kept.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from reid_tune.augmentation import Preprocessing
from reid_tune.checkpoints import find_checkpoint, load_model
from reid_tune.datasets import load_csv
from reid_tune.devices import resolve_device
from reid_tune.embed import embed_dataset, embeds_in_bf16
from reid_tune.errors import TrackingError
from reid_tune.evaluate import EvalResult, evaluate_files
from reid_tune.search.keys import (
    BEST_METRIC,
    CHAMPION_TAG,
    CHECKPOINT_ARTIFACTS,
    CMC_PLOT,
    DATASET_TAG,
    LEGACY_BEST_METRIC,
    MODEL_NAME_TAG,
    ROLE_TAG,
    SEARCH_TAG,
    TEST_ARTIFACTS,
    TEST_FILE,
    TEST_PREFIX,
    TRIAL_TAG,
)
from reid_tune.tracking.plots import cmc_plot
from reid_tune.tracking.registry import log_champion, register_model
from reid_tune.tracking.store import client_for


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` registered, and the champion's test numbers."""

    name: str
    version: str
    run_id: str
    trial_id: str
    test: EvalResult

    def summary(self) -> str:
        """One line per fact: the model version and alias, and the test mAP/CMC."""
        return (
            f"registered {self.name} version {self.version} (alias champion) from trial {self.trial_id}, "
            f"run {self.run_id}\ntest {self.test.summary()}\n"
            f"use it: reid-tune embed --model models:/{self.name}@champion ..."
        )


def find_search(client: MlflowClient, search: str) -> Run:
    """The parent run of a search: by run id, or the newest search of an experiment name."""
    if re.fullmatch(r"[0-9a-f]{32}", search):
        run = client.get_run(search)
        if run.data.tags.get(ROLE_TAG) != "search":
            raise TrackingError(f"promote {search}: run is not a reid-tune search (no {ROLE_TAG}=search tag)")
        return run
    experiment = client.get_experiment_by_name(search)
    runs = (
        []
        if experiment is None
        else client.search_runs(
            [experiment.experiment_id],
            f"tags.`{ROLE_TAG}` = 'search'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    )
    if not runs:
        raise TrackingError(
            f"promote {search}: no reid-tune search in MLflow experiment {search!r} "
            f"(tracking URI {client.tracking_uri})"
        )
    return runs[0]


def best_validation(run: Run) -> float | None:
    """A trial's best validation mAP (under its name before reid-tune 0.2 too), None if never validated."""
    metrics = run.data.metrics
    return metrics.get(BEST_METRIC, metrics.get(LEGACY_BEST_METRIC))


def best_trial(client: MlflowClient, parent: Run) -> Run:
    """The search's trial run with the highest best validation mAP (the first trial of equal ones)."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{SEARCH_TAG}` = '{parent.data.tags[SEARCH_TAG]}' and tags.`{ROLE_TAG}` = 'trial'",
        order_by=["attributes.start_time ASC"],
    )
    scored = [run for run in runs if best_validation(run) is not None]
    if not scored:
        raise TrackingError(
            f"promote: search run {parent.info.run_id} has no trial with a validated checkpoint"
        )
    return max(scored, key=best_validation)


def test_lists(parent: Run) -> tuple[Path, Path, Path, str]:
    """The test query and gallery CSVs, image root and camera convention the search was given."""
    params = parent.data.params
    query, gallery = params.get("data.test_query", "None"), params.get("data.test_gallery", "None")
    if "None" in (query, gallery):
        raise TrackingError(
            f"promote: search run {parent.info.run_id} has no data.test_query/test_gallery; "
            "add them to the search-space file"
        )
    return Path(query), Path(gallery), Path(params["data.image_root"]), params["data.convention"]


def test_champion(checkpoint: Path, parent: Run, out: Path, *, device: str) -> EvalResult:
    """Embed the test query and gallery once and evaluate them (triplet-reid's files in ``out``)."""
    query_csv, gallery_csv, image_root, convention = test_lists(parent)
    dev = resolve_device(device)
    model, cfg = load_model(checkpoint, device=dev)
    files = {}
    for role, csv in (("query", query_csv), ("gallery", gallery_csv)):
        files[role] = embed_dataset(
            model, Preprocessing.of(cfg), csv, image_root, out / f"test_{role}.h5", num_workers=0, device=dev,
            bf16=embeds_in_bf16(cfg, dev),
        )
    return evaluate_files(
        query_csv,
        files["query"],
        gallery_csv,
        files["gallery"],
        excluder=convention,
        metric=cfg.metric,
        out_json=out / TEST_FILE,
        device=dev,
    )


def promote(
    search: str, *, name: str | None = None, tracking_uri: str | None = None, device: str = "auto"
) -> Promotion:
    """Test the best trial of ``search`` on the test lists, log it as an MLflow model with the test
    metrics and register it as ``name@champion``."""
    client = client_for(tracking_uri, existing=True)
    parent = find_search(client, search)
    best = best_trial(client, parent)
    run_id = best.info.run_id
    name = name or parent.data.tags.get(MODEL_NAME_TAG) or parent.info.run_name
    with tempfile.TemporaryDirectory(prefix="reid-promote-") as tmp:
        folder = Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACTS, tmp))
        checkpoint = find_checkpoint(folder)
        out = Path(tmp) / TEST_ARTIFACTS
        out.mkdir()
        result = test_champion(checkpoint, parent, out, device=device)
        cmc_plot(json.loads((out / TEST_FILE).read_text())["CMC"], out / CMC_PLOT, title="test CMC")
        client.log_artifacts(run_id, str(out), TEST_ARTIFACTS)
        facts = champion_tags(parent, best, result)
        model_id = log_champion(
            client, best, checkpoint, example=example_images(parent), metrics=test_metrics(result), tags=facts
        )
        version = register_model(
            client, name, model_id, description=champion_note(parent, best, result), tags=facts
        )
    client.set_tag(parent.info.run_id, CHAMPION_TAG, f"{name}/{version}")
    return Promotion(
        name=name, version=version, run_id=run_id, trial_id=best.data.tags.get(TRIAL_TAG, ""), test=result
    )


def test_metrics(result: EvalResult) -> dict[str, float]:
    """The champion's test numbers under ``test/``, as logged on its run and its model."""
    return {
        f"{TEST_PREFIX}mAP": result.mAP,
        f"{TEST_PREFIX}rank1": result.rank(1),
        f"{TEST_PREFIX}rank5": result.rank(5),
        f"{TEST_PREFIX}rank10": result.rank(10),
        f"{TEST_PREFIX}mINP": result.mINP,
    }


def champion_tags(parent: Run, best: Run, result: EvalResult) -> dict[str, str]:
    """What the registered version says of itself: data set, test mAP and rank-1, search and trial."""
    return {
        "dataset": parent.data.tags.get(DATASET_TAG, ""),
        "test_mAP": f"{result.mAP:.4f}",
        "test_rank1": f"{result.rank(1):.4f}",
        "search": f"{parent.info.run_name} ({parent.info.run_id})",
        "trial": f"{best.info.run_name} ({best.info.run_id})",
    }


def champion_note(parent: Run, best: Run, result: EvalResult) -> str:
    """The registered version's description: where it comes from and how it tested."""
    query, gallery, _, _ = test_lists(parent)
    val = best_validation(best)
    return (
        f"Best trial {best.info.run_name} of search {parent.info.run_name} by validation mAP ({val:.2%}), "
        f"tested once on {query.name} against {gallery.name}: {result.summary()}. "
        "Input: image file paths; output: one embedding per image."
    )


def example_images(parent: Run) -> list[str]:
    """An input example for the model: two test query images, as paths."""
    query, _, image_root, _ = test_lists(parent)
    return [str(image_root / fid) for fid in load_csv(query).fids[:2]]

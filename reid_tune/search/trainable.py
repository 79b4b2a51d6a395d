"""One trial: a Tune function that fits a Ray Train ``TorchTrainer`` of the core training loop.

The Tune function turns the sampled config dict into a :class:`TrainConfig` and fits a TorchTrainer
named after the trial, so a retried or resumed trial restores the newest checkpoint of its Train run
from the search's storage (any node's). The validation split travels with the trial, so a node needs
only the images. Each Train worker runs :func:`reid_tune.train.train`; at every checkpoint
(``validate_every``) rank 0 validates on the held-out identities and reports the training statistics
since the last report, validation mAP/CMC and a checkpoint folder (weights, options, validation
embeddings and CMC).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from reid_tune.checkpoints import CONFIG_FILE, checkpoint_path
from reid_tune.config import TrainConfig, config_from_dict
from reid_tune.datasets import write_csv
from reid_tune.devices import Fallback, resolve_device
from reid_tune.models import ReidModel
from reid_tune.rerank import Rerank
from reid_tune.search import storage
from reid_tune.search.keys import (
    FALLBACKS_KEY,
    IMAGES_KEY,
    METRIC,
    NODE_KEY,
    SPLIT_ARTIFACT,
    STATE_FILE,
    SYSTEM_KEY,
    TIME_ATTR,
    TRAIN_LOG_KEY,
    VALIDATION_FILE,
    VALIDATION_KEYS,
    fallback_tag,
)
from reid_tune.search.schema import SearchSpec
from reid_tune.search.space import train_config
from reid_tune.search.system_metrics import SystemSampler
from reid_tune.train import TrainCallback, train
from reid_tune.validation import SPLIT_FILES, ValidationSplit, validate


@dataclass(frozen=True)
class SearchPaths:
    """Where a search keeps its files: ``<storage>/<experiment>``, a local folder or a URI (see storage)."""

    storage: str
    experiment: str

    @property
    def root(self) -> str:
        """The search's folder: Tune's experiment, the Train runs and reid-tune's state."""
        return storage.join(self.storage, self.experiment)

    @property
    def train_runs(self) -> str:
        """Ray Train storage: one run per trial, named by the trial id."""
        return storage.join(self.root, "train")

    @property
    def state(self) -> str:
        """reid-tune's own record of the search (its MLflow parent run), read by ``--resume``."""
        return storage.join(self.root, STATE_FILE)


def trial_config(spec: SearchSpec, sampled: dict[str, Any]) -> TrainConfig:
    """The full TrainConfig of a trial with these sampled values; its ``train_set`` names the parent
    run's artifact of the split (each Train worker trains on its own copy of the same rows).

    Workers without a GPU train on the CPU: ``device: auto`` would take a GPU Ray never reserved.
    """
    cfg = train_config(spec, sampled, Path(SPLIT_ARTIFACT) / SPLIT_FILES["train"])
    return cfg.replace(device="cpu") if spec.resources.gpus_per_worker == 0 and cfg.device == "auto" else cfg


def gpu_share(spec: SearchSpec) -> float:
    """The part of a GPU each Train worker holds (a fractional ``gpus_per_worker`` shares one)."""
    return min(spec.resources.gpus_per_worker, 1.0) or 1.0


# ---------------------------------------------------------------- Train workers


class _Reporter(TrainCallback):
    """Collects the logged statistics; at each checkpoint validates (rank 0) and reports to Ray Train."""

    def __init__(
        self, cfg: TrainConfig, split: ValidationSplit, sampler: SystemSampler | None, *, rerank: bool
    ) -> None:
        self.cfg, self.split, self.sampler = cfg, split, sampler
        self.rerank = Rerank() if rerank else None  # validation.rerank: k-reciprocal re-ranking
        self.records: list[dict[str, float]] = []
        self.fallbacks: dict[str, str] = {}  # MLflow tag -> value, since the last report

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.records.append({TIME_ATTR: step, **metrics})

    def on_fallback(self, fallback: Fallback) -> None:
        self.fallbacks[fallback_tag(fallback.feature)] = str(fallback)

    def on_checkpoint(self, step: int, path: Path, model: ReidModel) -> None:
        metrics: dict[str, Any] = {
            **(self.records[-1] if self.records else {}),
            TIME_ATTR: step,
            TRAIN_LOG_KEY: json.dumps(self.records),
            NODE_KEY: ray.get_runtime_context().get_node_id(),
            IMAGES_KEY: step * self.cfg.batch_size,
            SYSTEM_KEY: json.dumps(self.sampler.drain() if self.sampler else []),
            **({FALLBACKS_KEY: json.dumps(self.fallbacks)} if self.fallbacks else {}),
        }
        self.records, self.fallbacks = [], {}
        if ray.train.get_context().get_world_rank() != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="reid-checkpoint-") as folder:
            result = validate(
                model,
                self.cfg,
                self.split,
                device=resolve_device(self.cfg.device),
                out_dir=Path(folder),
                rerank=self.rerank,
            )
            shutil.copy2(path, Path(folder) / path.name)
            self.cfg.save(Path(folder) / CONFIG_FILE)
            summary = {TIME_ATTR: step, **result.to_json()}
            (Path(folder) / VALIDATION_FILE).write_text(json.dumps(summary) + "\n")
            metrics.update(validation_metrics(summary))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def validation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The reported validation numbers of a ``validation.json``: mAP, rank-1/5/10, mINP."""
    return {ours: summary[theirs] for theirs, ours in VALIDATION_KEYS.items()}


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: train (or resume from the restored checkpoint) with validation reports."""
    cfg = config_from_dict(config["train_config"], source="trial")
    split: ValidationSplit = config["split"]
    every_s = config["system_metrics_every_s"]
    rank0 = ray.train.get_context().get_world_rank() == 0
    sampler = SystemSampler(every_s, resolve_device(cfg.device)).start() if every_s and rank0 else None
    run_dir = Path(tempfile.mkdtemp(prefix="reid-trial-"))
    try:
        write_csv(run_dir / SPLIT_FILES["train"], split.train.pids, split.train.fids)
        local = cfg.replace(train_set=str(run_dir / SPLIT_FILES["train"]))
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as folder:
                step = json.loads((Path(folder) / VALIDATION_FILE).read_text())[TIME_ATTR]
                shutil.copy2(checkpoint_path(folder, step), checkpoint_path(run_dir, step))
            local.save(run_dir / CONFIG_FILE)
        train(
            None if restored else local,
            run_dir,
            resume=restored is not None,
            callback=_Reporter(cfg, split, sampler, rerank=config["rerank"]),
            gpu_share=config["gpu_share"],
        )
    finally:
        if sampler is not None:
            sampler.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------- the Tune function


def run_trial(config: dict[str, Any], *, spec: SearchSpec, split: ValidationSplit) -> None:
    """Tune trainable: fit one TorchTrainer with the sampled ``config`` (a plain dict of space values)
    on the search's validation ``split``."""
    paths = SearchPaths(spec.storage, spec.experiment)
    resources = spec.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "train_config": trial_config(spec, config).to_dict(),
            "split": split,
            "rerank": spec.validation.rerank,
            "gpu_share": gpu_share(spec),
            "system_metrics_every_s": spec.mlflow.system_metrics_every_s
            if spec.mlflow.system_metrics
            else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=tune.get_context().get_trial_id(),
            storage_path=paths.train_runs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.search.keep_checkpoints,
                checkpoint_score_attribute=METRIC,
                checkpoint_score_order="max",
            ),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()

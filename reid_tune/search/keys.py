"""The search's names, each defined once: what a trial reports to Ray, the MLflow metrics and tags of its
runs, and the artifacts and files it writes, shared by the search, its tracking and promote.

Imports nothing, so tools and tests read the names without Ray, MLflow or torch.
"""

from __future__ import annotations

# ---------------------------------------------------------------- what a trial reports to Ray Tune

METRIC = "val_mAP"  # the search objective, maximised
VAL_RANK1 = "val_rank1"  # validation rank-1, reported beside it
TIME_ATTR = "step"  # training iterations, the scheduler's clock
TRAIN_LOG_KEY = "train_log"  # per-iteration statistics since the previous report, as JSON text
NODE_KEY = "node_id"  # the Ray node whose rank-0 worker made the report: where the trial trained
IMAGES_KEY = "train_images"  # training images of the trial so far (iterations x P x K): its compute
SYSTEM_KEY = "system_samples"  # rank 0's system samples since the previous report, as JSON text
FALLBACKS_KEY = "gpu_fallbacks"  # the GPU features the trial went without, as JSON text {tag: value}
SAMPLE_TIME = "time"  # in each system sample: when it was taken (seconds since the epoch)
VALIDATION_KEYS = {
    "mAP": METRIC,
    "rank-1": VAL_RANK1,
    "rank-5": "val_rank5",
    "rank-10": "val_rank10",
    "mINP": "val_mINP",
}  # validation.json key -> reported metric

# ---------------------------------------------------------------- MLflow metrics

# Validation metrics under eval/: MLflow's UI shows a run's metric sections in alphabetical order, so they
# come before test/ (the champion's) and train/ (training statistics).
VAL_PREFIX = "eval/"
TRAIN_PREFIX = "train/"
SYSTEM_PREFIX = "system/"  # system samples, under the names MLflow's own system metrics use
TEST_PREFIX = "test/"  # the champion's test numbers, on its run and its logged model
VAL_MAP = f"{VAL_PREFIX}mAP"
VAL_RANK1_NAME = f"{VAL_PREFIX}rank1"
BEST_METRIC = f"{VAL_PREFIX}best_mAP"  # a trial's best validation mAP so far, what promote ranks by
LEGACY_BEST_METRIC = "val/best_mAP"  # BEST_METRIC of searches logged by reid-tune before 0.2
SYSTEM_CPU = f"{SYSTEM_PREFIX}cpu_utilization_percentage"  # one of MLflow's own system metric names

# ---------------------------------------------------------------- MLflow tags

SEARCH_TAG = "reid_tune.search"  # the search id, on the parent run and every trial run
ROLE_TAG = "reid_tune.role"  # "search" or "trial"
TRIAL_TAG = "reid_tune.trial_id"
DATASET_TAG = "reid_tune.dataset"
CODE_TAG = "reid_tune.code_version"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI
KIND_TAG = "mlflow.experimentKind"  # the experiment view MLflow 3's UI opens on
TRAINING_KIND = "custom_model_development"  # its runs table, not the GenAI overview
MODEL_NAME_TAG = "reid_tune.registered_model"  # on the parent run: the name promote registers under
STORAGE_TAG = "reid_tune.storage"  # on the parent run: the search's folder (or URI) in the storage
VERDICT_TAG = "reid_tune.verdict"  # on the parent run: the best trial against the paper's settings
GAIN_TAG = "reid_tune.gain_val_mAP"  # on the parent run: that gain in validation mAP, when claimed
CHAMPION_TAG = "reid_tune.champion"  # on the parent run: the registered NAME/VERSION promote made of it
BEST_TAG = "reid_tune.best"  # "true" on the search's best trial (what promote registers)
PAPER_TAG = "reid_tune.paper_settings"  # "true" on the trial that ran the paper's settings
BASELINE_TAG = "reid_tune.baseline"  # "true" on trials that run a baseline's settings (trained to the end)
OUTCOME_TAG = "reid_tune.outcome"  # full_budget, stopped_early or failed
STOPPED_AT_TAG = "reid_tune.stopped_at"  # the iteration a trial stopped early (or failed) at
BEST_STEP_TAG = "reid_tune.best_step"  # on a trial run: the iteration of its best validation
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: the registered versions made from it


def fallback_tag(feature: str) -> str:
    """A trial run's tag for a GPU feature it went without (``reid_tune.devices.Fallback.feature``), e.g.
    ``reid_tune.cuda_graph`` = ``fallback to eager (RuntimeError: ...)``."""
    return f"reid_tune.{feature}"


def trial_fact_tag(label: str, fact: str) -> str:
    """A parent-run tag of the search's summary: ``fact`` (trial_id, iterations, val_mAP, val_rank1) of
    the trial ``label`` (best, best_full_budget, paper), e.g. ``reid_tune.best_val_mAP``."""
    return f"reid_tune.{label}_{fact}"


# ---------------------------------------------------------------- artifacts and files

CHECKPOINT_ARTIFACTS = "checkpoint"  # weights (checkpoint-NNNNNN.pt) and config.json of the best step
VALIDATION_ARTIFACTS = "validation"  # val_query.h5, val_gallery.h5, validation.json, cmc.png
TEST_ARTIFACTS = "test"  # the champion's test_query.h5, test_gallery.h5, test.json, cmc.png
EXPORT_ARTIFACTS = "export"  # the champion exported by `reid-tune export --model` (ONNX, TorchScript)
SPLIT_ARTIFACT = "validation_split"  # the parent run's artifact folder of the split's CSVs
ANALYSIS_ARTIFACTS = "search"  # the parent run's folder of history.png, importance.png, ...
MODEL_ARTIFACT = "model"  # the logged model's name: a pyfunc wrapping the checkpoint
VALIDATION_FILE = "validation.json"  # in each checkpoint folder: step, mAP, CMC, ...
TEST_FILE = "test.json"  # the champion's test mAP, CMC, ...
CMC_PLOT = "cmc.png"  # a CMC curve, beside the validation or test numbers it draws
STATE_FILE = "reid_tune_search.json"  # in the search's folder: its MLflow parent run and tracking URI
HISTORY_PNG = "history.png"  # the search analysis: validation mAP against the search's compute
IMPORTANCE_PNG = "importance.png"  # Optuna's hyperparameter importances
PARALLEL_PNG = "parallel.png"  # parallel coordinates of the searched values
TRIALS_CSV = "trials.csv"  # one row per trial

# ---------------------------------------------------------------- the console

SHORT_NAMES = {
    "batch_p": "P",
    "batch_k": "K",
    "margin": "margin",
    "lr": "lr",
    "decay_start": "decay@",
    "decay_factor": "decay*",
    "embedding_dim": "dim",
    "head": "head",
    "network": "network",
    "warmup": "warmup",
    "schedule": "schedule",
    "warmup_factor": "warm*",
    "weight_decay": "wd",
    "id_loss_weight": "id",
    "label_smoothing": "smooth",
    "bnneck": "bnneck",
    "last_stride": "stride",
    "random_erasing": "erase",
    "center_loss_weight": "center",
}  # a searched parameter's column in the trial tables and its name in trial descriptions (every space name)

"""Does the search earn its cost? The paper's settings against three searches, at the same budget of
training images, on real data.

    python benchmarks/bench_search.py            # CUHK03 from ../shared/data, about 45 min on 2 cores
    python benchmarks/bench_search.py --smoke    # generated data, tiny trials, (a) and (d) only (CI)

Every run goes through the product: a search-space YAML variant, ``run_search`` (real local Ray, SQLite
MLflow) and ``promote`` (the final choice tested once). The methods, all on the same data, validation
split, network, iterations per trial and training seed:

  (a) paper       the paper's settings (P18 K4, soft margin, lr 3e-4, decay from 60% to 0.001), one trial
                  trained the full budget: the reference;
  (b) random      Optuna random sampling with ASHA;
  (c) tpe-ray     TPE with ASHA as Ray's OptunaSearch reports it (a stopped trial is COMPLETE);
  (d) tpe-pruned  TPE with ASHA, stopped trials told as PRUNED (reid-tune's default).

(b)-(d) each get the same ``max_images`` budget, run with several searcher seeds, and start from no
point (the paper's settings are (a), not a free first trial). TPE samples its first 4 trials at random
(``startup_trials``; Optuna's default of 10 would leave a search of this size almost all random), and
with the same seed those 4 are the random search's first 4. The objective is mAP on the search's own
validation split of training identities; the final choice (what ``promote`` registers: the trial of
highest validation mAP) is tested once on CUHK03 ``val/``, camera A queries against the camera B gallery.
Printed: the best validation mAP reached against the images spent (median and range over seeds), the
images each method needed to reach the paper's full-budget validation mAP, and the test mAP of each
final choice with its settings as a ``reid-tune train`` command line. Plot and figures go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's reid_tune, uninstalled

from reid_tune.cli import train_command  # noqa: E402
from reid_tune.config import TrainConfig  # noqa: E402
from reid_tune.datasets import prepare  # noqa: E402
from reid_tune.promote import promote  # noqa: E402
from reid_tune.search.analysis import (  # noqa: E402
    BudgetPoint,
    TrialRecord,
    budget_curve,
    images_to_reach,
    reports_from_history,
)
from reid_tune.search.keys import VAL_MAP, VAL_RANK1_NAME  # noqa: E402
from reid_tune.search.schema import PAPER_POINT  # noqa: E402
from reid_tune.search.space import load_spec  # noqa: E402
from reid_tune.search.summary import SearchSummary  # noqa: E402
from reid_tune.search.trainable import trial_config  # noqa: E402
from reid_tune.search.tuner import run_search, start_local_ray  # noqa: E402
from reid_tune.tracking.runs import SearchTracker  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk03-labeled"
METHODS = {  # name -> search options (the paper is one trial of its settings, no scheduler)
    "paper": {"searcher": "tpe", "start_points": ["paper"], "num_samples": 1, "scheduler": {"type": "none"}},
    "random": {"searcher": "random", "stopped_as": "pruned"},
    "tpe-ray": {"searcher": "tpe", "stopped_as": "complete", "startup_trials": 4},
    "tpe-pruned": {"searcher": "tpe", "stopped_as": "pruned", "startup_trials": 4},
}


@dataclass(frozen=True)
class Setup:
    """One benchmark size: data, trials, space and budget."""

    train: dict[str, Any]  # fixed training options
    space: dict[str, Any]
    validation_ids: int
    grace_period: int
    reduction_factor: int
    budget_papers: float  # each search's max_images, in full-budget trials of the paper's settings
    seeds: tuple[int, ...]
    num_samples: int  # an upper bound: the image budget ends each search first
    methods: tuple[str, ...]  # of METHODS, "paper" first
    data: str = "CUHK03"

    @property
    def paper_images(self) -> int:
        """Training images of one full-budget trial of the paper's settings (P18 x K4)."""
        return self.train["train_iterations"] * PAPER_POINT["batch_p"] * PAPER_POINT["batch_k"]

    @property
    def max_images(self) -> int:
        return round(self.budget_papers * self.paper_images)


SPACE = {
    "batch_p": {"int": [8, 24]},
    "batch_k": {"int": [2, 6]},
    "margin": {"choice": ["soft", 0.1, 0.2, 0.5]},
    "lr": {"loguniform": [1.0e-4, 3.0e-3]},
    "decay_start": {"uniform": [0.3, 0.9]},
    "decay_factor": {"loguniform": [1.0e-4, 1.0e-1]},
}
TRAIN = {
    "network": "lunet_small", "embedding_dim": 128, "input_height": 64, "input_width": 32,
    "pre_crop_height": 72, "pre_crop_width": 36, "precision": "fp32", "seed": 0, "num_workers": 0,
}  # fmt: skip
FULL = Setup(
    train={**TRAIN, "train_iterations": 300, "validate_every": 100, "log_every": 50},
    space=SPACE,
    validation_ids=100,
    grace_period=100,
    reduction_factor=3,
    budget_papers=3.0,
    seeds=(0, 1, 2),
    num_samples=200,
    methods=tuple(METHODS),
)
SMOKE = Setup(
    train={**TRAIN, "train_iterations": 10, "validate_every": 5, "log_every": 5},
    space={**SPACE, "batch_p": {"int": [4, 18]}, "batch_k": {"int": [2, 4]}},
    validation_ids=3,
    grace_period=5,
    reduction_factor=2,
    budget_papers=1.5,
    seeds=(0,),
    num_samples=2,
    methods=("paper", "tpe-pruned"),  # the other two differ only in two YAML keys
    data="generated data",
)


# ---------------------------------------------------------------- data and search files


def cuhk03_lists(root: Path, out: Path) -> dict[str, Any]:
    """The ``data:`` section for CUHK03: train on train_resized/, test on val/ cross-camera."""
    prepare("cuhk03", root, out)
    return {
        "train": str(out / "cuhk03_train_resized.csv"),
        "image_root": str(root),
        "convention": "cuhk03",
        "test_query": str(out / "cuhk03_val_query.csv"),
        "test_gallery": str(out / "cuhk03_val_gallery.csv"),
    }


def demo_lists(out: Path) -> dict[str, Any]:
    """The ``data:`` section for a small generated Market-1501-style set (the smoke run)."""
    from reid_tune.synthetic import generate_demo

    generate_demo(out, num_train_ids=24, num_test_ids=4, size=(64, 32), junk=0, distractors=2)
    return {
        "train": str(out / "market1501_train.csv"),
        "image_root": str(out),
        "convention": "market1501",
        "test_query": str(out / "market1501_query.csv"),
        "test_gallery": str(out / "market1501_test.csv"),
    }


def search_file(work: Path, setup: Setup, data: dict[str, Any], method: str, seed: int) -> Path:
    """The YAML of one method and searcher seed; its storage and MLflow store live in ``work``."""
    options = {
        "seed": seed,
        "start_points": [],
        "scheduler": {
            "type": "asha",
            "grace_period": setup.grace_period,
            "reduction_factor": setup.reduction_factor,
        },
        "num_samples": setup.num_samples,
        "max_images": setup.max_images,
        "max_concurrent_trials": 2,
        "max_failures": 1,
        "keep_checkpoints": 1,
        **METHODS[method],
    }
    name = f"{method}-s{seed}"
    document = {
        "experiment": name,
        "data": data,
        "validation": {"identities": setup.validation_ids, "seed": 0},
        "train": setup.train,
        "space": setup.space,
        "search": options,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "storage": str(work / "ray_results"),
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "registered_model": name},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# ---------------------------------------------------------------- one run


@dataclass(frozen=True)
class Outcome:
    """One method and seed: its validation curve on the search's clock, and its final choice."""

    method: str
    seed: int
    curve: list[BudgetPoint]
    images: int  # spent in all (past max_images by what the running trials trained until their next report)
    trials: int
    val_mAP: float  # the final choice's best validation mAP
    test_mAP: float
    test_rank1: float
    command: str  # the final choice as a reid-tune train command line
    minutes: float


def records(spec_file: Path, summary: SearchSummary) -> list[TrialRecord]:
    """Each trial's validations (from MLflow, as the search logged them) and batch size."""
    spec = load_spec(spec_file, prepare_data=False)
    tracker = SearchTracker.open(spec.mlflow.tracking_uri, spec.tracking_experiment, summary.parent_run_id)
    histories = tracker.trial_histories((VAL_MAP, VAL_RANK1_NAME))
    out = []
    for trial in summary.trials:
        run_id, history = histories.get(trial.trial_id, ("", {}))
        out.append(
            TrialRecord(
                trial_id=trial.trial_id,
                run_id=run_id,
                params=trial.config,
                batch_size=trial_config(spec, trial.config).batch_size,
                reports=reports_from_history(history.get(VAL_MAP, []), history.get(VAL_RANK1_NAME, [])),
                tune_status=trial.status,
                optuna_state="",
                budget=spec.train.train_iterations,
            )
        )
    return out


def final_choice(spec_file: Path, summary: SearchSummary, data: dict[str, Any]) -> tuple[float, float, str]:
    """Test mAP and rank-1 of what ``promote`` registers, and its training command line."""
    spec = load_spec(spec_file, prepare_data=False)
    chosen = promote(summary.parent_run_id, tracking_uri=spec.mlflow.tracking_uri, device="cpu")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec.mlflow.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.load(Path(client.download_artifacts(chosen.run_id, "checkpoint/config.json", tmp)))
    retrain = cfg.replace(train_set=data["train"], image_root=data["image_root"], keep_checkpoints=0)
    return chosen.test.mAP, chosen.test.rank(1), train_command(retrain, f"runs/{spec.experiment}")


def run_one(work: Path, setup: Setup, data: dict[str, Any], method: str, seed: int) -> Outcome:
    """Search (or train the paper's settings), then test the final choice."""
    start = time.monotonic()
    spec_file = search_file(work, setup, data, method, seed)
    summary = run_search(spec_file)
    trials = records(spec_file, summary)
    curve = budget_curve(trials)
    test_mAP, test_rank1, command = final_choice(spec_file, summary, data)
    return Outcome(
        method=method,
        seed=seed,
        curve=curve,
        images=curve[-1].images if curve else 0,
        trials=len(trials),
        val_mAP=summary.best.val_mAP,
        test_mAP=test_mAP,
        test_rank1=test_rank1,
        command=command,
        minutes=(time.monotonic() - start) / 60,
    )


# ---------------------------------------------------------------- figures


def best_at(curve: list[BudgetPoint], images: float) -> float:
    """The best validation mAP the run had reached once it had trained ``images`` (0 before any)."""
    return max((p.best_so_far for p in curve if p.images <= images), default=0.0)


def spread(values: list[float]) -> str:
    """'median [min, max]' of percentages."""
    if not values:
        return "-"
    return f"{100 * statistics.median(values):.1f}% [{100 * min(values):.1f}, {100 * max(values):.1f}]"


def reach(outcomes: list[Outcome], target: float) -> str:
    """Images each run needed to reach ``target`` validation mAP: median of those that did, and how many."""
    needed = [images_to_reach(o.curve, target) for o in outcomes]
    done = [n for n in needed if n is not None]
    if not done:
        return f"never (0/{len(needed)})"
    return f"{statistics.median(done) / 1e3:.0f}k ({len(done)}/{len(needed)} runs)"


def table(outcomes: list[Outcome], setup: Setup) -> list[dict[str, str]]:
    """One row per method: budget, validation mAP within it, images to the paper's level, test mAP."""
    paper = next(o for o in outcomes if o.method == "paper")
    rows = []
    for method in setup.methods:
        runs = [o for o in outcomes if o.method == method]
        rows.append({
            "method": method,
            "runs": str(len(runs)),
            "trials per run": f"{statistics.median(o.trials for o in runs):.0f}",
            "images spent (median)": f"{statistics.median(o.images for o in runs) / 1e3:.0f}k",
            f"best val mAP within {setup.max_images / 1e3:.0f}k images": spread(
                [best_at(o.curve, setup.max_images) for o in runs]
            ),
            "images to reach the paper's val mAP": reach(runs, paper.val_mAP),
            "test mAP of the final choice": spread([o.test_mAP for o in runs]),
            "test rank-1": spread([o.test_rank1 for o in runs]),
        })  # fmt: skip
    return rows


def print_table(rows: list[dict[str, str]]) -> None:
    """A markdown table (pasted into the README as it is)."""
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row[key] for key in header) + " |")


def plot(outcomes: list[Outcome], setup: Setup, path: Path) -> None:
    """Best validation mAP against images spent: median line and min-max band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paper = next(o for o in outcomes if o.method == "paper")
    end = max(o.images for o in outcomes)
    grid = np.linspace(0, end, 200)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colors = {"paper": "black", "random": "tab:green", "tpe-ray": "tab:red", "tpe-pruned": "tab:blue"}
    for method in setup.methods:
        runs, color = [o for o in outcomes if o.method == method], colors[method]
        values = np.array([[100 * best_at(o.curve, x) for x in grid] for o in runs])
        label = f"{method} ({len(runs)} run{'s' if len(runs) > 1 else ''})"
        ax.plot(grid / 1e3, np.median(values, axis=0), color=color, label=label, drawstyle="steps-post")
        if len(runs) > 1:
            ax.fill_between(grid / 1e3, values.min(0), values.max(0), color=color, alpha=0.15, step="post")
    ax.axhline(100 * paper.val_mAP, color="black", linestyle=":", label="paper's settings, full budget")
    ax.axvline(setup.max_images / 1e3, color="grey", linestyle="--", label="search budget")
    ax.set(
        xlabel="training images spent (thousands)",
        ylabel="best validation mAP so far (%)",
        title=f"Search efficiency on {setup.data}: best validation mAP against compute\n"
        "(median over searcher seeds, band: min-max)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def hardware() -> str:
    """The machine, in a line: processor, cores, Python and torch versions, date."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if cpuinfo.exists()
        else []
    )
    return (
        f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="generated data, tiny trials, one seed (CI)")
    parser.add_argument(
        "--out", type=Path, help="folder of the plot and figures (default: benchmarks/results)"
    )
    parser.add_argument("--cuhk03", type=Path, default=SHARED, help=f"CUHK03 folder (default: {SHARED})")
    parser.add_argument("--work", type=Path, help="folder for the searches' files (default: a temporary one)")
    args = parser.parse_args()
    if not args.smoke and not (args.cuhk03 / "val").is_dir():
        sys.exit(f"bench_search: CUHK03 not found at {args.cuhk03} (run with --smoke for generated data)")
    setup = SMOKE if args.smoke else FULL
    out = args.out or (Path(tempfile.mkdtemp()) if args.smoke else Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = demo_lists(work / "data") if args.smoke else cuhk03_lists(args.cuhk03, work / "lists")
        os.environ.setdefault("REID_TUNE_CACHE", str(work / "cache"))
        start_local_ray(num_cpus=os.cpu_count() or 2)
        runs = [("paper", 0)] + [(m, s) for m in setup.methods[1:] for s in setup.seeds]
        outcomes = []
        for method, seed in runs:
            outcomes.append(run_one(work, setup, data, method, seed))
            done = outcomes[-1]
            print(
                f"{method} seed {seed}: {done.trials} trials, {done.images / 1e3:.0f}k images, val mAP "
                f"{done.val_mAP:.1%}, test mAP {done.test_mAP:.1%}, {done.minutes:.1f} min",
                flush=True,
            )
    rows = table(outcomes, setup)
    print(
        f"\n{hardware()}; budget per search {setup.max_images:,} images "
        f"({setup.budget_papers:g} full-budget trials of the paper's settings)\n"
    )
    print_table(rows)
    print("\nfinal choices as reid-tune train command lines:")
    for o in outcomes:
        print(f"# {o.method} seed {o.seed}: val mAP {o.val_mAP:.1%}, test mAP {o.test_mAP:.1%}\n{o.command}")
    plot(outcomes, setup, out / "search_efficiency.png")
    figures = {
        "hardware": hardware(),
        "setup": asdict(setup),
        "rows": rows,
        "runs": [{k: v for k, v in asdict(o).items() if k != "curve"} for o in outcomes],
    }
    (out / "search_efficiency.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nplot and figures: {out}/search_efficiency.png, search_efficiency.json")


if __name__ == "__main__":
    main()

"""The ``reid-tune`` command: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from reid_tune import vocabulary
from reid_tune.config import TrainConfig, config_from_dict
from reid_tune.errors import ConfigError, ReidTuneError

# Training options that are no plain command-line values, or are given by their own option.
_NOT_FLAGS = {"train_set", "image_root"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reid-tune")
def cli() -> None:
    """Batch-hard triplet re-ID training, evaluation and hyperparameter search.

    `reid-tune SPACE.yaml` is short for `reid-tune search SPACE.yaml`.
    """


# ---------------------------------------------------------------- data


@cli.command()
@click.argument("kind", type=click.Choice(vocabulary.DATASET_KINDS))
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the CSV lists.")
def prepare(kind: str, src: Path, out: Path) -> None:
    """Write triplet-reid CSV lists (pid,path) for an unpacked data set."""
    from reid_tune.datasets import prepare as run

    for path in run(kind, src, out):
        click.echo(path)


@cli.command("generate-demo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--train-ids", default=40, show_default=True, help="Training identities.")
@click.option("--test-ids", default=20, show_default=True, help="Test identities (query + gallery).")
@click.option("--seed", default=0, show_default=True)
def generate_demo(out: Path, train_ids: int, test_ids: int, seed: int) -> None:
    """Generate the small synthetic data set (Market-1501 layout and CSVs) used by the demo."""
    from reid_tune.synthetic import generate_demo as run

    for path in run(out, num_train_ids=train_ids, num_test_ids=test_ids, seed=seed):
        click.echo(path)


# ---------------------------------------------------------------- train


def _flag_type(name: str) -> type:
    """The click type of a TrainConfig field: its own, the non-None one of an optional, else text (margin)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, bool, str) else str


def _training_options(command: Any) -> Any:
    """Add one ``--option`` per TrainConfig field (default: the dataclass's, shown in --help)."""
    for field in reversed(fields(TrainConfig)):
        if field.name in _NOT_FLAGS:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field.name)
        if kind is bool:
            flag = f"{flag}/--no-{field.name.replace('_', '-')}"
        command = click.option(flag, field.name, type=kind, default=None,
                               help=f"[default: {field.default}]")(command)
    return command


def train_command(cfg: TrainConfig, run_dir: str | Path) -> str:
    """The ``reid-tune train`` command line that trains ``cfg`` again: every option that differs from
    its default, spelled as :func:`_training_options` defines it."""
    words = ["reid-tune train", f"--train-set {cfg.train_set}", f"--image-root {cfg.image_root}",
             f"--run-dir {run_dir}"]
    for field in fields(TrainConfig):
        value = getattr(cfg, field.name)
        if field.name in _NOT_FLAGS or value == field.default:
            continue
        flag = field.name.replace("_", "-")
        if isinstance(value, tuple):
            value = ",".join(f"{v:g}" for v in value)
        words.append(f"--{'' if value else 'no-'}{flag}" if isinstance(value, bool) else f"--{flag} {value}")
    return " ".join(words)


def _coerce(name: str, value: Any) -> Any:
    """Text options: a margin number becomes a float ('soft'/'none' stay words), milestones '0.5,0.75' a
    tuple of floats."""
    if name == "margin":
        return vocabulary.parse_margin(value)
    if name == "milestones":
        try:
            return tuple(float(part) for part in value.split(","))
        except ValueError:
            raise ConfigError(f"--milestones={value!r}: expected fractions like 0.5,0.75") from None
    return value


@cli.command()
@click.option("--train-set", type=click.Path(path_type=Path), help="Training CSV (pid,path).")
@click.option("--image-root", type=click.Path(path_type=Path), help="Folder the CSV paths are relative to.")
@click.option("--run-dir", required=True, type=click.Path(path_type=Path), help="Folder for options, "
              "checkpoints and logs.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --run-dir with its stored options.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_training_options
def train(train_set: Path | None, image_root: Path | None, run_dir: Path, resume: bool, quiet: bool,
          **options: Any) -> None:
    """Train one model; defaults are the paper's Market-1501 settings (P=18, K=4, soft margin, 25k its)."""
    from reid_tune.console import TrainProgress
    from reid_tune.train import train as run

    given = {k: _coerce(k, v) for k, v in options.items() if v is not None}
    if train_set is not None:
        given["train_set"] = str(train_set)
    if image_root is not None:
        given["image_root"] = str(image_root)
    if resume and given:
        raise ConfigError(f"--{next(iter(given)).replace('_', '-')}: --resume takes the stored options, "
                          "expected no training option")
    if not resume and not (train_set and image_root):
        raise ConfigError("train: --train-set and --image-root missing, expected both (unless --resume)")
    cfg = None if resume else config_from_dict(given, source="command line")
    result = run(cfg, run_dir, resume=resume, callback=None if quiet else TrainProgress())
    click.echo(f"{'interrupted' if result.interrupted else 'finished'} at iteration {result.step}; "
               f"checkpoint {result.checkpoint}")
    if result.interrupted:
        sys.exit(130)


# ---------------------------------------------------------------- embed and evaluate


def _checkpoint_of(run_dir: Path | None, model_uri: str | None, checkpoint: int | None,
                   tracking_uri: str | None = None) -> Path:
    """The checkpoint file that --run-dir (with --checkpoint) or else --model names."""
    from reid_tune.checkpoints import find_checkpoint

    if model_uri is None:
        return find_checkpoint(run_dir, checkpoint)
    if checkpoint is not None:
        raise ConfigError("--checkpoint: only with --run-dir, expected no --checkpoint with --model")
    from reid_tune.tracking.registry import download_checkpoint

    return download_checkpoint(model_uri, tracking_uri=tracking_uri)


def _one_source(command: str, **given: object) -> None:
    """Exactly one of the model sources ``given`` (option name -> value or None), else a one-line error."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
    if len(named) != 1:
        raise ConfigError(f"{command}: {', '.join(named) or 'no model'} given, expected exactly one of "
                          f"{', '.join('--' + name.replace('_', '-') for name in given)}")


@cli.command()
@click.option("--run-dir", type=click.Path(path_type=Path), help="A training run folder.")
@click.option("--model", "model_uri", help="A registered model instead of a run folder, e.g. models:/NAME@champion.")
@click.option("--onnx", type=click.Path(path_type=Path), help="A file of `reid-tune export` instead, run by "
              "ONNX Runtime (preprocessing from its metadata; no PyTorch weights).")
@click.option("--torchscript", type=click.Path(path_type=Path), help="A TorchScript file instead.")
@click.option("--checkpoint", type=int, help="Iteration of the checkpoint (default: the newest).")
@click.option("--dataset", required=True, type=click.Path(path_type=Path), help="CSV (pid,path) to embed.")
@click.option("--image-root", required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output .h5 (or .csv with --format csv).")
@click.option("--flip-augment", is_flag=True, help="Also embed the horizontal flip.")
@click.option("--crop-augment", type=click.Choice(vocabulary.CROP_AUGMENTS), help="Test-time crops.")
@click.option("--aggregator", type=click.Choice(vocabulary.AGGREGATORS), help="How views are combined.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--format", "fmt", type=click.Choice(vocabulary.EMBED_FORMATS), default="h5", show_default=True)
@click.option("--device", default="auto", show_default=True)
def embed(run_dir: Path | None, model_uri: str | None, onnx: Path | None, torchscript: Path | None,
          checkpoint: int | None, dataset: Path, image_root: Path, out: Path, flip_augment: bool,
          crop_augment: str | None, aggregator: str | None, batch_size: int, fmt: str, device: str) -> None:
    """Embed a data set with a trained or exported network (triplet-reid's HDF5 layout)."""
    from reid_tune.devices import resolve_device
    from reid_tune.embed import embed_dataset

    _one_source("embed", run_dir=run_dir, model=model_uri, onnx=onnx, torchscript=torchscript)
    dev = resolve_device(device)
    if onnx is None and torchscript is None:
        from reid_tune.augmentation import Preprocessing
        from reid_tune.checkpoints import load_model
        from reid_tune.embed import embeds_in_bf16

        model, cfg = load_model(_checkpoint_of(run_dir, model_uri, checkpoint), device=dev)
        prep, bf16 = Preprocessing.of(cfg), embeds_in_bf16(cfg, dev)
    else:
        from reid_tune.export import load_exported

        if crop_augment == "avgpool" or checkpoint is not None:
            option = "--checkpoint" if checkpoint is not None else "--crop-augment avgpool"
            raise ConfigError(f"{option}: not with an exported model (it takes its input size only), "
                              "expected --crop-augment center or five")
        model = load_exported(onnx or torchscript, "onnx" if onnx else "torchscript", device=dev)
        prep, bf16 = model.preprocessing(), False
        dev = dev if torchscript else "cpu"  # ONNX Runtime places the work on its own device
    embed_dataset(model, prep, dataset, image_root, out, crop_augment=crop_augment, flip_augment=flip_augment,
                  aggregator=aggregator, batch_size=batch_size, fmt=fmt, device=dev, bf16=bf16)
    click.echo(f"wrote {out}")


@cli.command()
@click.option("--model", "model_uri", help="A registered model, e.g. models:/NAME@champion (the file is also "
              "logged on its run).")
@click.option("--run-dir", type=click.Path(path_type=Path), help="A training run folder instead.")
@click.option("--checkpoint", type=int, help="Iteration of --run-dir's checkpoint (default: the newest).")
@click.option("--format", "fmt", type=click.Choice(vocabulary.EXPORT_FORMATS),
              help="What to write (default: from --out's suffix, .onnx or .pt).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The file to write.")
@click.option("--dataset", type=click.Path(path_type=Path), help="CSV (pid,path) whose first images check "
              "parity (default: generated person images).")
@click.option("--image-root", type=click.Path(path_type=Path), help="Folder of --dataset's paths.")
@click.option("--parity-images", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images the parity check embeds.")
@click.option("--tracking-uri", help="MLflow tracking URI of --model (default: sqlite:///mlflow.db here).")
def export(model_uri: str | None, run_dir: Path | None, checkpoint: int | None, fmt: str | None, out: Path,
           dataset: Path | None, image_root: Path | None, parity_images: int,
           tracking_uri: str | None) -> None:
    """Export the embedding network to ONNX or TorchScript, preprocessing in its metadata, parity checked."""
    from reid_tune.export import check_output, export_checkpoint, format_of

    _one_source("export", model=model_uri, run_dir=run_dir)
    fmt = fmt or format_of(out)
    check_output(out)
    client = version = source = None
    if model_uri is not None:  # a registry that lacks the version answers before any work
        from reid_tune.tracking.registry import model_version
        from reid_tune.tracking.store import client_for

        client = client_for(tracking_uri, existing=True)
        version = model_version(client, model_uri)
        source = f"{model_uri} (version {version.version})"
    path = _checkpoint_of(run_dir, model_uri, checkpoint, tracking_uri)
    result = export_checkpoint(path, out, fmt=fmt, source=source, dataset=dataset, image_root=image_root,
                               count=parity_images)
    click.echo(result.summary())
    if version is not None:
        from reid_tune.tracking.registry import log_export

        click.echo(f"{'logged':<11}{log_export(client, version, out, fmt)}")


@cli.command()
@click.option("--query-dataset", required=True, type=click.Path(path_type=Path))
@click.option("--query-embeddings", required=True, type=click.Path(path_type=Path))
@click.option("--gallery-dataset", required=True, type=click.Path(path_type=Path))
@click.option("--gallery-embeddings", required=True, type=click.Path(path_type=Path))
@click.option("--excluder", required=True,
              type=click.Choice(vocabulary.EXCLUDERS),
              help="Which gallery entries a query ignores (same pid and camera, junk).")
@click.option("--metric", default="euclidean", show_default=True,
              type=click.Choice(vocabulary.METRICS))
@click.option("--market-ap", is_flag=True, help="The official Market-1501 (MATLAB) trapezoid AP.")
@click.option("--out", type=click.Path(path_type=Path), help="JSON with mAP, CMC, aps, mINP.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--rerank", is_flag=True, help="k-reciprocal re-ranking (Zhong et al. 2017).")
@click.option("--k1", default=20, show_default=True, type=click.IntRange(min=1), help="Re-ranking: k1.")
@click.option("--k2", default=6, show_default=True, type=click.IntRange(min=1), help="Re-ranking: k2.")
@click.option("--lambda-value", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="Re-ranking: weight of the original distance.")
def evaluate(query_dataset: Path, query_embeddings: Path, gallery_dataset: Path, gallery_embeddings: Path,
             excluder: str, metric: str, market_ap: bool, out: Path | None, device: str | None, rerank: bool,
             k1: int, k2: int, lambda_value: float) -> None:
    """CMC, mAP and mINP of query embeddings against a gallery, as triplet-reid's evaluate.py."""
    from reid_tune.evaluate import evaluate_files
    from reid_tune.rerank import Rerank

    options = Rerank(k1, k2, lambda_value) if rerank else None
    result = evaluate_files(query_dataset, query_embeddings, gallery_dataset, gallery_embeddings,
                            excluder=excluder, metric=metric, market_ap=market_ap, out_json=out, device=device,
                            rerank=options)
    click.echo(result.summary())


# ---- search and promote


@cli.command()
@click.argument("space", type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True,
              help="Continue the interrupted search of this file (keeps finished trials).")
@click.option("--smoke", is_flag=True, help="Shrink the search to CI size (two 10-iteration trials).")
@click.option("--tracking-uri",
              help="MLflow tracking URI (default: the file's, else sqlite:///mlflow.db here).")
def search(space: Path, resume: bool, smoke: bool, tracking_uri: str | None) -> None:
    """Run the Optuna-guided Ray Tune search of a search-space YAML, tracked in MLflow."""
    from reid_tune.search.space import load_spec

    spec = load_spec(space)  # a bad file answers before Ray, Optuna and MLflow are imported
    from reid_tune.search.summary import print_summary
    from reid_tune.search.tuner import run_search

    summary = run_search(space, spec=spec, resume=resume, smoke_test=smoke, tracking_uri=tracking_uri)
    print_summary(summary)
    if summary.interrupted:
        click.echo(f"interrupted; continue with: reid-tune {space} --resume", err=True)
        sys.exit(130)


@cli.command()
@click.argument("search_name", metavar="SEARCH")
@click.option("--name", help="Registered model name (default: the search file's mlflow.registered_model).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here).")
@click.option("--device", default="auto", show_default=True)
def promote(search_name: str, name: str | None, tracking_uri: str | None, device: str) -> None:
    """Test the best trial of SEARCH (experiment name or parent run id) once, register it as @champion."""
    from reid_tune.promote import promote as run

    result = run(search_name, name=name, tracking_uri=tracking_uri, device=device)
    click.echo(result.summary())


@cli.command()
@click.argument("space", required=False, type=click.Path(path_type=Path))
@click.option("--experiment", help="The experiment to open (default: SPACE's; without either: the list).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: SPACE's, else sqlite:///mlflow.db here).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the UI listens on.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
def ui(space: Path | None, experiment: str | None, tracking_uri: str | None, host: str, port: int) -> None:
    """Start the MLflow UI on a search's store, opening on its runs table (Ctrl-C stops it).

    MLflow's UI, with a browser that has not chosen a view starting in "Model training" (MLflow 3 starts
    in its GenAI view); on a tracking server, prints the runs page's URL instead.
    """
    from reid_tune.search.space import read_spec
    from reid_tune.tracking.ui import serve_ui

    if space is not None:
        spec = read_spec(space)
        tracking_uri = tracking_uri or spec.mlflow.tracking_uri
        experiment = experiment or spec.tracking_experiment
    serve_ui(tracking_uri, experiment, host=host, port=port, echo=click.echo)


@cli.command()
@click.argument("space", required=False, type=click.Path(path_type=Path))
@click.option("--network", type=click.Choice(vocabulary.NETWORKS), help="Instead of the trial's network.")
@click.option("--batch-p", type=int, help="Instead of the trial's P.")
@click.option("--batch-k", type=int, help="Instead of the trial's K.")
@click.option("--precision", type=click.Choice(vocabulary.PRECISIONS), help="Instead of the trial's.")
@click.option("--device", help="Device of the checks (default: the trial's; auto: the GPU if there is one).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the file's, else sqlite:///mlflow.db).")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed steps per throughput reading, at least (repeated for 2 s on a fast device).")
@click.option("--quick", is_flag=True, help="No throughput: versions, devices, search and checks only.")
def doctor(space: Path | None, network: str | None, batch_p: int | None, batch_k: int | None,
           precision: str | None, device: str | None, tracking_uri: str | None, steps: int,
           quick: bool) -> None:
    """Check that this machine (or the Ray cluster it joins) can run SPACE's search, and how fast.

    Without SPACE: the demo search's trial on generated data. Exit status 1 when a check fails.
    """
    from reid_tune.doctor import run_doctor

    given = {"network": network, "batch_p": batch_p, "batch_k": batch_k, "precision": precision}
    sys.exit(run_doctor(space, overrides={k: v for k, v in given.items() if v is not None}, device=device,
                        tracking_uri=tracking_uri, steps=steps, quick=quick))


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Console script: run the CLI, printing our errors as one line with a non-zero exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].endswith((".yaml", ".yml")):
        args.insert(0, "search")
    try:
        cli.main(args=args, prog_name="reid-tune", standalone_mode=False)
    except ReidTuneError as err:
        _fail(str(err))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:  # a bad option or argument: click's message, on one line
        _fail(f"{_command(args)}: {err.format_message()}")
    except OSError as err:  # the system refused a file or folder the user named
        _fail(f"{err.filename or ''}: {err.strerror or err}".lstrip(": "))


def _command(args: list[str]) -> str:
    """The subcommand of ``args`` (for messages), or the program's name."""
    return next((f"reid-tune {word}" for word in args if word in cli.commands), "reid-tune")


def _fail(message: str) -> None:
    """Print ``message`` as one ``error:`` line and exit with status 2 (bad input)."""
    click.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()

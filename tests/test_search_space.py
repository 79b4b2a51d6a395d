"""The search-space file: the shipped files parse, and each kind of mistake is one located error."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port, search_document, write_yaml

from reid_tune.cli import main
from reid_tune.datasets import camera_ids, load_csv
from reid_tune.errors import ConfigError, SpaceError
from reid_tune.models import create_model
from reid_tune.search.checks import (
    SpecFile,
    check_gpus,
    check_points,
    check_pretrained,
    check_space,
    check_train,
)
from reid_tune.search.schema import PAPER_POINT, SearchSpec, parse_param
from reid_tune.search.space import load_spec, parse_spec, read_yaml, train_config
from reid_tune.synthetic import generate_demo
from reid_tune.validation import hold_out, load_split, write_split

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Market-1501-style set: 12 training identities, 3 cameras x 3 images each."""
    out = tmp_path_factory.mktemp("space") / "data"
    generate_demo(out, num_train_ids=12, num_test_ids=4, junk=0, distractors=0)
    return out


def _document(data: Path) -> dict:
    return search_document(
        data,
        "t",
        train={"pre_crop_height": 72, "pre_crop_width": 36},
        space={"batch_p": {"int": [2, 6]}, "decay_factor": 0.001},
        search={
            "start_points": [{"batch_p": 4, "batch_k": 2, "margin": "soft", "lr": 3e-4, "decay_start": 0.6}]
        },
    )


def _write(tmp_path: Path, document: dict) -> Path:
    return write_yaml(tmp_path / "space.yaml", document)


def _line_of(path: Path, text: str) -> int:
    """1-based line of the first line of ``path`` containing ``text``."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize("name", ["market.yaml", "duke.yaml", "demo.yaml"])
def test_shipped_files_parse(name: str) -> None:
    path = SPACES / name
    document, file = read_yaml(path)
    spec = parse_spec(document, file)
    check_train(spec, file)
    check_space(spec, file)
    check_points(spec, file)
    assert spec.start_points()[0] == PAPER_POINT  # the paper's settings are tried first


def test_market_bot_starts_from_bots_settings(demo_data: Path) -> None:
    """market_bot.yaml: its first trial is BoT's recipe (a baseline), every trick on; the trial's
    TrainConfig is BoT's (multi-step at epochs 40 and 70 of 120, warm-up over 10 epochs)."""
    document, file = read_yaml(SPACES / "market_bot.yaml")
    spec = parse_spec(document, file)
    for check in (check_train, check_space, check_points):
        check(spec, file)
    point = spec.start_points()[0]
    fixed = {name: param.values[0] for name, param in spec.params.items() if not param.searched}
    cfg = train_config(spec, {**fixed, **point}, demo_data / "market1501_train.csv")
    assert (cfg.batch_p, cfg.batch_k, cfg.margin, cfg.learning_rate) == (16, 4, 0.3, 3.5e-4)
    assert (cfg.schedule, cfg.milestones, cfg.decay_factor) == ("multistep", (0.333, 0.583), 0.1)
    assert (cfg.warmup_iterations, cfg.warmup_factor, cfg.weight_decay) == (1992, 0.1, 5e-4)
    assert (cfg.id_loss_weight, cfg.label_smoothing, cfg.bnneck, cfg.last_stride) == (1.0, 0.1, True, 1)
    assert cfg.random_erasing == 0.5


def test_market_centres_on_the_paper() -> None:
    path = SPACES / "market.yaml"
    spec = parse_spec(*read_yaml(path))
    for name, paper in PAPER_POINT.items():
        param = spec.params[name]
        low, high = param.bounds
        centre = (low * high) ** 0.5 if param.kind == "loguniform" else (low + high) / 2
        assert param.contains(paper)
        if param.kind != "choice":
            assert centre == pytest.approx(paper, rel=0.06), name


def test_valid_file_loads_with_absolute_paths(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = _document(data)
    monkeypatch.chdir(data.parent)
    document["data"]["train"] = "data/market1501_train.csv"
    spec = load_spec(_write(tmp_path, document))
    assert Path(spec.data.train).is_absolute() and Path(spec.storage).is_absolute()
    cfg = train_config(
        spec,
        {"batch_p": 4, "batch_k": 3, "margin": 0.2, "lr": 3e-4, "decay_start": 0.5},
        Path("/x/train.csv"),
    )
    assert (cfg.batch_p, cfg.batch_k, cfg.margin, cfg.learning_rate) == (4, 3, 0.2, 3e-4)
    assert (cfg.decay_start_iteration, cfg.decay_factor, cfg.checkpoint_frequency) == (10, 0.001, 10)


@pytest.mark.parametrize(
    ("edit", "anchor", "message"),
    [
        (lambda d: d["train"].update(learning_rat=1), "learning_rat", "unknown option 'learning_rat'"),
        (lambda d: d.update(colour="red"), "colour", "unknown key"),
        (lambda d: d["search"].update(num_samples="many"), "num_samples", "valid integer"),
        (lambda d: d["train"].update(input_height="tall"), "input_height", "input_height='tall'"),
        (lambda d: d["space"].update(lr={"loguniform": [1e-3, 1e-4]}), "lr:", "empty range"),
        (lambda d: d["space"].update(batch_k={"uniform": [2, 4]}), "batch_k:", "integers"),
        (lambda d: d["space"].update(margin={"choice": ["hard"]}), "margin:", ">= 0, 'soft' or 'none'"),
        (lambda d: d["space"].update(margin=-1), "margin:", "margin=-1: expected a number"),
        (lambda d: d["space"].update(momentum={"int": [1, 2]}), "momentum", "unknown parameter"),
        (lambda d: d["train"].update(schedule="multistep"), "decay_start:", "not used by schedule multistep"),
        (lambda d: d["train"].update(milestones=[0.3, 0.6]), "milestones", "with multistep only"),
        (
            lambda d: (d["space"].pop("decay_start"), d["space"].update(schedule={"choice": ["cosine"]})),
            "space:",
            "missing decay_start, which schedule cosine reads",
        ),
        (lambda d: d["space"].update(bnneck={"uniform": [0, 1]}), "bnneck:", "takes bool values"),
        (lambda d: d["space"].update(label_smoothing=1.5), "label_smoothing:", "must be in [0, 1)"),
        (lambda d: d["space"].update(schedule={"choice": ["step"]}), "schedule:", "schedule='step': unknown"),
        (lambda d: d["space"].pop("lr"), "space:", "missing lr"),
        (lambda d: d["space"].update(decay_start={"normal": [0, 1]}), "decay_start:", "expected one of"),
        (
            lambda d: d["space"].update(head="fc2048"),
            "head:",
            "'fc2048': expected one of",
        ),
        (lambda d: d["train"].update(network="resnet5O"), "network", "'resnet5O': expected one of"),
        (lambda d: d["train"].update(batch_p=4), "batch_p: 4", "not under train"),
        (
            lambda d: d["validation"].update(fraction=0.2),
            "validation:",
            "exactly one of identities and fraction",
        ),
        (lambda d: d["data"].update(test_query="/nowhere/query.csv"), "test_query", "file not found"),
        (lambda d: d["data"].update(image_root="/nowhere"), "image_root", "folder not found"),
        (
            lambda d: d.update(resources={"max_batch_size": 16}),
            "batch_p:",
            "6 * 4 = 24: expected <= resources.max_batch_size=16",
        ),
        (lambda d: d["space"].update(batch_p={"int": [2, 10]}), "batch_p:", "only 9 identities"),
        (lambda d: d["validation"].update(identities=11), "identities", "cannot hold out 11"),
        (lambda d: d["search"].update(start_points=["paper"]), "- paper", "the paper's batch_p=18: outside"),
        (lambda d: d["search"].update(start_points=[{"lr": 1.0}]), "lr: 1.0", "outside space.lr"),
        (
            lambda d: d["search"].update(scheduler={"type": "asha", "grace_period": 50}),
            "grace_period",
            "<= train",
        ),
        (
            lambda d: d["search"].update(start_points=[{"batch_p": 4, "batch_k": 2, "baseline": "yes"}]),
            "baseline:",
            "search.start_points.0.baseline: 'yes': expected true or false",
        ),
        (
            lambda d: d["search"].update(start_points=[{"batch_p": 9, "batch_k": 2, "baseline": True}]),
            "batch_p: 9",
            "batch_p=9: outside space.batch_p = int [2, 6]",
        ),
        (lambda d: d["search"].update(stopped_as="maybe"), "stopped_as", "'pruned' or 'complete'"),
        (
            lambda d: d["search"].update(start_points=[{"batch_p": 4, "batch_k": 2}]),
            "- batch_p: 4",
            "start point gives no margin, lr, decay_start: it needs every searched value",
        ),
        (lambda d: d["search"].update(max_images=0), "max_images", "greater than or equal to 1"),
        (
            lambda d: d.update(resources={"workers": 2, "gpus_per_worker": 0.5}),
            "gpus_per_worker",
            "0.5: expected a whole number of GPUs (0, 1, 2, ...) with resources.workers=2",
        ),
        (
            lambda d: d.update(resources={"workers": 2}),
            "batch_p:",
            "int [2, 6]: with resources.workers=2 each worker takes batch_p / 2 identities, but an int range "
            "gives every integer; use {choice: [2, 4, 6]}",
        ),
        (
            lambda d: (d.update(resources={"workers": 2}), d["space"].update(batch_p={"choice": [4, 5]})),
            "batch_p:",
            "space.batch_p: 5: expected a multiple of 2",
        ),
        (
            lambda d: (d.update(resources={"workers": 3}), d["space"].update(batch_p=4)),
            "batch_p:",
            "space.batch_p: 4: expected a multiple of 3",
        ),
    ],
)
def test_each_mistake_is_one_located_error(
    data: Path, tmp_path: Path, edit, anchor: str, message: str
) -> None:
    document = _document(data)
    edit(document)
    path = _write(tmp_path, document)
    with pytest.raises(SpaceError) as caught:
        load_spec(path)
    text = str(caught.value)
    assert "\n" not in text
    assert message in text
    assert text.startswith(f"{path}:{_line_of(path, anchor)}:"), text


def test_several_workers_take_whole_gpus_and_a_choice_of_even_batches(data: Path, tmp_path: Path) -> None:
    document = _document(data)
    document["resources"] = {"workers": 2, "gpus_per_worker": 1}
    document["space"]["batch_p"] = {"choice": [2, 4, 6]}
    spec = load_spec(_write(tmp_path, document))
    assert spec.resources.workers == 2 and spec.params["batch_p"].values == (2, 4, 6)


@pytest.mark.parametrize(
    ("workers", "gpus_per_worker", "gpus", "message"),
    [
        (
            1,
            0.5,
            0,
            "0.5: this machine has no GPU and no Ray cluster is given; set gpus_per_worker: 0 to train on "
            "the CPU, or resources.address to join a Ray cluster that has GPUs",
        ),
        (1, 2, 1, "2: this machine has only 1 GPU(s) and no Ray cluster is given; set gpus_per_worker x"),
        (2, 1, 1, "1 x 2 workers = 2 GPUs a trial: this machine has only 1 GPU(s)"),
        (1, 0.5, 1, None),
        (2, 1, 2, None),
        (1, 0, 0, None),
    ],
)
def test_a_local_search_asks_for_no_more_gpus_than_the_machine_has(
    data: Path, tmp_path: Path, workers: int, gpus_per_worker: float, gpus: int, message: str | None
) -> None:
    document = _document(data)
    document["resources"] = {"workers": workers, "gpus_per_worker": gpus_per_worker}
    document["space"]["batch_p"] = {"choice": [2, 4, 6]}
    path = _write(tmp_path, document)
    if message is None:
        check_gpus(*_checked(path), gpus)
        return
    with pytest.raises(SpaceError) as caught:
        check_gpus(*_checked(path), gpus)
    line = _line_of(path, "gpus_per_worker")
    assert str(caught.value).startswith(f"{path}:{line}: resources.gpus_per_worker: {message}"), caught.value


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No reachable internet (every HTTPS request goes to a closed local port) and an empty torch.hub
    cache; returns the cache's checkpoints folder."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_pretrained_weights_that_cannot_be_had_are_one_error(
    data: Path, tmp_path: Path, offline: Path
) -> None:
    document = _document(data)
    document["train"].update(network="resnet18", pretrained="imagenet")
    path = _write(tmp_path, document)
    started = time.monotonic()
    with pytest.raises(SpaceError) as caught:
        check_pretrained(*_checked(path))
    assert time.monotonic() - started < 30
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert str(caught.value) == (
        f"{path}:{_line_of(path, 'pretrained')}: train.pretrained: 'imagenet': could not download {url} "
        f"(URLError); fetch it elsewhere and pass its local path, or put it at {offline / Path(url).name}"
    )


@pytest.mark.parametrize(
    ("file_name", "networks", "error"),
    [
        ("lunet.pth", ["lunet_small"], None),
        ("none.pth", ["lunet_small"], "no such file; lunet_small has no published weights"),
        ("lunet.pth", ["lunet_small", "resnet18"], "does not fit resnet18"),
    ],
)
def test_pretrained_file_is_loaded_into_every_network_of_the_space(
    data: Path, tmp_path: Path, file_name: str, networks: list[str], error: str | None
) -> None:
    torch.save(create_model("lunet_small").trunk.state_dict(), tmp_path / "lunet.pth")
    document = _document(data)
    document["train"]["pretrained"] = str(tmp_path / file_name)
    document["train"].pop("network")
    document["space"]["network"] = {"choice": networks}
    path = _write(tmp_path, document)
    if error is None:
        check_pretrained(*_checked(path))
        return
    with pytest.raises(SpaceError) as caught:
        check_pretrained(*_checked(path))
    where = f"{path}:{_line_of(path, 'pretrained')}: train.pretrained: '{tmp_path / file_name}': {error}"
    assert str(caught.value).startswith(where), caught.value


def _checked(path: Path) -> tuple[SearchSpec, SpecFile]:
    """The file parsed, and its line map: for one check at a time."""
    raw, file = read_yaml(path)
    return parse_spec(raw, file), file


def test_baseline_points_are_the_papers_and_the_marked_ones(data: Path, tmp_path: Path) -> None:
    """The paper's point and a point marked ``baseline: true`` are baselines; others are not, and no start
    point keeps the ``baseline`` key."""
    marked, unmarked, unmarked_too = ({**PAPER_POINT, "batch_p": p} for p in (6, 8, 10))
    document = search_document(
        data,
        "t",
        search={
            "start_points": [
                {**marked, "baseline": True},
                "paper",
                unmarked,
                {**unmarked_too, "baseline": False},
            ]
        },
    )
    path = _write(tmp_path, document)
    raw, file = read_yaml(path)
    spec = parse_spec(raw, file)
    check_points(spec, file)  # `baseline: false` is allowed too
    assert spec.baseline_points() == [marked, PAPER_POINT]
    assert spec.start_points() == [marked, PAPER_POINT, unmarked, unmarked_too]  # no `baseline` key
    assert spec.paper_point() == PAPER_POINT


@pytest.mark.parametrize(
    ("networks", "error"),
    [
        (["lunet_small", "resnet50"], None),
        (["lunet_small", "resnet18"], "the paper's network='resnet50': outside"),
    ],
)
def test_the_papers_point_is_trinet_when_the_architecture_is_searched(
    data: Path, tmp_path: Path, networks: list[str], error: str | None
) -> None:
    document = search_document(
        data, "t", space={**search_document(data, "t")["space"], "network": {"choice": networks}}
    )
    document["train"].pop("network")
    path = _write(tmp_path, document)
    raw, file = read_yaml(path)
    spec = parse_spec(raw, file)
    if error:
        with pytest.raises(SpaceError, match=error):
            check_points(spec, file)
        return
    check_points(spec, file)
    assert spec.start_points() == [{**PAPER_POINT, "network": "resnet50"}]


def test_a_loadable_start_point_starts_the_searcher(data: Path, tmp_path: Path) -> None:
    from reid_tune.search.algorithms import build_searcher
    from reid_tune.search.tuner import param_space

    spec = load_spec(_write(tmp_path, _document(data)))
    build_searcher(spec).set_search_properties("val_mAP", "max", param_space(spec))  # Ray accepts the point


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="search-space file not found"):
        load_spec(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: [unclosed\n")
    with pytest.raises(SpaceError, match=r"bad.yaml:\d+: not valid YAML"):
        load_spec(bad)


def test_cli_prints_one_error_line_and_exits_2(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = _document(data)
    document["space"]["lr"] = {"loguniform": [0, 1e-3]}
    path = _write(tmp_path, document)
    with pytest.raises(SystemExit) as caught:
        main([str(path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"error: {re.escape(str(path))}:\d+: space.lr: .*low > 0", err[0])


@pytest.mark.parametrize(
    ("raw", "kind", "values"),
    [
        (0.2, "constant", (0.2,)),
        ({"uniform": [0.1, 0.9]}, "uniform", (0.1, 0.9)),
        ({"choice": ["soft", 0.5]}, "choice", ("soft", 0.5)),
    ],
)
def test_parse_param(raw: object, kind: str, values: tuple) -> None:
    param = parse_param("margin", raw)
    assert (param.kind, param.values) == (kind, values)
    assert param.searched == (kind != "constant")


def test_parse_param_names_what_it_expected() -> None:
    with pytest.raises(ConfigError, match=r"'fast': expected a number > 0"):
        parse_param("lr", {"choice": [1e-3, "fast"]})


def test_space_is_parsed_once() -> None:
    path = SPACES / "market.yaml"
    spec = parse_spec(*read_yaml(path))
    assert spec.params is spec.params
    assert set(spec.params) == set(spec.space)


@pytest.mark.parametrize(
    "text",
    [
        "experiment: [unclosed\n",
        "experiment: t\ncolour: red\n",
        "experiment: t\ndata: {train: a.csv, image_root: ., convention: none}\n"
        "validation: {identities: 2}\ntrain: {train_iterations: 10, validate_every: 5, network: resnet50}\n"
        "space: {batch_p: 4, batch_k: 2, margin: hard, lr: 0.1, decay_start: 0.5, decay_factor: 0.1}\n",
    ],
)
def test_a_bad_file_answers_without_importing_torch(tmp_path: Path, text: str) -> None:
    """YAML, schema and value errors come before anything that imports torch (they print at once)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code = (
        "import sys\nfrom reid_tune.errors import SpaceError\nfrom reid_tune.search.space import load_spec\n"
        f"try:\n    load_spec({str(bad)!r})\nexcept SpaceError as err:\n    print(err)\n"
        "print(sorted(m for m in ('torch', 'ray', 'optuna', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith(f"{bad}:") and out.splitlines()[1] == "[]", out


def test_hold_out_is_seeded_and_queries_across_cameras(data: Path, tmp_path: Path) -> None:
    dataset = load_csv(data / "market1501_train.csv")
    split = hold_out(dataset, "market1501", identities=3, seed=1)
    again = hold_out(dataset, "market1501", identities=3, seed=1)
    assert list(split.query.fids) == list(again.query.fids)
    held = set(split.query.pids.tolist())
    assert len(held) == 3 and held == set(split.gallery.pids.tolist())
    assert held.isdisjoint(split.train.pids.tolist())
    assert len(split.train) + len(split.query) + len(split.gallery) == len(dataset)
    for pid in held:  # one query per camera, each with gallery images of the other cameras
        cams = camera_ids(split.query.fids[split.query.pids == pid], "market1501")
        assert len(cams) == len(set(cams.tolist())) == 3
    write_split(split, tmp_path)
    assert list(load_split(tmp_path, "market1501").query.fids) == list(split.query.fids)


def test_bot_tricks_and_schedules_are_search_dimensions(tmp_path: Path, demo_data: Path) -> None:
    """BoT's tricks searched as choices and ranges, the schedule searched as a choice: a trial's TrainConfig
    takes the sampled values (warm-up as a fraction of the iterations, milestones fixed under train:)."""
    document = search_document(demo_data, "bot", train={"milestones": [0.3, 0.6], "train_iterations": 100})
    document["search"]["start_points"] = []
    document["space"].update(
        batch_p={"int": [2, 6]},
        schedule={"choice": ["exponential", "multistep"]},
        bnneck={"choice": [True, False]},
        id_loss_weight={"choice": [0, 1]},
        label_smoothing={"uniform": [0.0, 0.2]},
        random_erasing=0.5,
        warmup=0.1,
    )
    spec = load_spec(write_yaml(tmp_path / "bot.yaml", document))
    sampled = {"batch_p": 4, "batch_k": 2, "margin": "soft", "lr": 3e-4, "decay_start": 0.5,
               "decay_factor": 0.1, "schedule": "multistep", "bnneck": True, "id_loss_weight": 1,
               "label_smoothing": 0.1}
    cfg = train_config(spec, sampled, demo_data / "market1501_train.csv")
    assert (cfg.schedule, cfg.milestones, cfg.decay_factor) == ("multistep", (0.3, 0.6), 0.1)
    assert (cfg.bnneck, cfg.id_loss_weight, cfg.label_smoothing, cfg.random_erasing) == (True, 1.0, 0.1, 0.5)
    assert cfg.warmup_iterations == 10 and cfg.decay_start_iteration == 50

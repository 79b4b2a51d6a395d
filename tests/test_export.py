"""Export to ONNX and TorchScript: the file embeds as the PyTorch network does (checked here with the
runtimes' own APIs, not the export's check), carries its preprocessing, keeps the batch size dynamic,
holds only the embedding network, and an embedding from it equals the PyTorch path's."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import reid_tune

from reid_tune import export as export_module
from reid_tune.augmentation import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from reid_tune.checkpoints import find_checkpoint, load_model
from reid_tune.config import TrainConfig
from reid_tune.errors import ReidTuneError
from reid_tune.evaluate import evaluate_files
from reid_tune.export import export_model, load_exported, parity_images
from reid_tune.models import ReidModel, create_model
from reid_tune.train import train

# the tests load TorchScript files as a deployment would; PyTorch warns that TorchScript is deprecated
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit.*:FutureWarning")

SMALL = {"input_height": 64, "input_width": 32, "pre_crop_height": 72, "pre_crop_width": 36}


def _config(network: str, **options: object) -> TrainConfig:
    return TrainConfig(train_set="train.csv", image_root="images", network=network, **SMALL, **options)


def _model(network: str, *, bnneck: bool = False) -> ReidModel:
    """Random weights, and a BNNeck whose statistics matter (not the identity it starts as)."""
    torch.manual_seed(0)
    model = create_model(network, "fc1024", embedding_dim=32, bnneck=bnneck).eval()
    if bnneck:
        model.neck.running_mean.normal_()
        model.neck.running_var.uniform_(0.5, 2.0)
    return model


def _run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    """The file run by ONNX Runtime's own API, as a deployment would."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def _run_torchscript(path: Path, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.jit.load(str(path))(images).numpy()


RUNNERS = {"onnx": _run_onnx, "torchscript": _run_torchscript}
NETWORKS = [("lunet_small", False), ("resnet18", False), ("resnet18", True)]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize(("network", "bnneck"), NETWORKS, ids=["lunet_small", "resnet18", "resnet18-bnneck"])
def test_the_exported_file_embeds_as_pytorch_at_any_batch_size(
    tmp_path: Path, fmt: str, network: str, bnneck: bool
) -> None:
    model, cfg = _model(network, bnneck=bnneck), _config(network, bnneck=bnneck)
    images, where = parity_images(Preprocessing.of(cfg), count=6)
    done = export_model(model, cfg, tmp_path / f"m.{fmt}", fmt=fmt, source="test", step=7, images=images,
                        checked_on=where)
    assert done.parity <= 1e-4 and done.path.is_file() and list(tmp_path.iterdir()) == [done.path]
    with torch.no_grad():
        expected = model(images).numpy()
    for batch in (images, images[:1], images[:5]):  # traced with 2: other sizes run too
        got = RUNNERS[fmt](done.path, batch)
        assert got.shape == (len(batch), 32)
        np.testing.assert_allclose(got, expected[: len(batch)], atol=1e-4, rtol=0)
    if bnneck:  # eval mode: retrieval's feature is the one after the neck
        with torch.no_grad():
            before_neck = model.forward_head(model.forward_features(images)).numpy()
        assert np.abs(RUNNERS[fmt](done.path, images) - before_neck).max() > 1e-2


def test_onnx_metadata_and_input_say_how_to_feed_it(tmp_path: Path) -> None:
    model, cfg = _model("lunet_small"), _config("lunet_small", metric="sqeuclidean")
    images, _ = parity_images(Preprocessing.of(cfg), count=2)
    export_model(model, cfg, tmp_path / "m.onnx", fmt="onnx", source="models:/x@champion", images=images)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    meta = {prop.key: json.loads(prop.value) for prop in proto.metadata_props}
    assert meta["input_size"] == [64, 32] and meta["pre_crop_size"] == [72, 36]
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD)
    assert (meta["resize"], meta["channel_order"], meta["pixel_scale"]) == ("bilinear", "RGB", 1 / 255)
    assert (meta["network"], meta["head"], meta["embedding_dim"], meta["metric"]) == (
        "lunet_small", "fc1024", 32, "sqeuclidean",
    )  # fmt: skip
    assert meta["source"] == "models:/x@champion"
    (given,), (taken,) = proto.graph.input, proto.graph.output
    dims = [d.dim_param or d.dim_value for d in given.type.tensor_type.shape.dim]
    assert given.name == "images" and isinstance(dims[0], str) and dims[1:] == [3, 64, 32]
    assert taken.name == "embeddings"
    loaded = load_exported(tmp_path / "m.onnx", "onnx")
    assert loaded.preprocessing() == Preprocessing((64, 32), (72, 36)) and loaded.metadata == meta


def test_torchscript_carries_the_same_metadata(tmp_path: Path) -> None:
    model, cfg = _model("lunet_small"), _config("lunet_small")
    images, _ = parity_images(Preprocessing.of(cfg), count=2)
    export_model(model, cfg, tmp_path / "m.pt", fmt="torchscript", source="run", step=3, images=images)
    extra = {"reid_tune.json": ""}
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    meta = json.loads(extra["reid_tune.json"])
    assert meta["input_size"] == [64, 32] and meta["step"] == 3 and meta["batch_size"] == "dynamic"
    assert load_exported(tmp_path / "m.pt", "torchscript").metadata == meta


def test_a_failed_parity_check_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # no export can pass
    model, cfg = _model("lunet_small"), _config("lunet_small")
    images, _ = parity_images(Preprocessing.of(cfg), count=2)
    with pytest.raises(ReidTuneError, match="away from PyTorch.*nothing written"):
        export_model(model, cfg, tmp_path / "m.onnx", fmt="onnx", source="test", images=images)
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_file_of_another_tool_is_refused_in_one_line(tmp_path: Path) -> None:
    model = _model("lunet_small")
    torch.onnx.export(model, (torch.zeros(2, 3, 64, 32),), str(tmp_path / "plain.onnx"), dynamo=True)
    with pytest.raises(ReidTuneError, match="plain.onnx: no input_size in its metadata"):
        load_exported(tmp_path / "plain.onnx", "onnx")


@pytest.fixture(scope="module")
def bot_run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """A short run with BoT's training-only parts (classifier, centers) beside the network."""
    run_dir = tmp_path_factory.mktemp("bot_run")
    cfg = TrainConfig(train_set=str(demo_data / "market1501_train.csv"), image_root=str(demo_data),
                      network="lunet_small", batch_p=4, batch_k=2, **SMALL, train_iterations=3,
                      checkpoint_frequency=3, num_workers=0, device="cpu", embedding_dim=16, bnneck=True,
                      id_loss_weight=1.0, label_smoothing=0.1, center_loss_weight=0.0005)
    train(cfg, run_dir)
    return run_dir


def _embed(demo_data: Path, out: Path, *source: object) -> np.ndarray:
    """Every view's embeddings of the demo query through the CLI, from ``source``'s options."""
    done = reid_tune("embed", *source, "--dataset", demo_data / "market1501_query.csv", "--image-root",
                     demo_data, "--out", out, "--flip-augment", "--crop-augment", "five", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    with h5py.File(out, "r") as f:
        return f["emb_aug"][()]


@pytest.mark.slow
def test_export_then_embed_from_the_file_alone(bot_run: Path, demo_data: Path, tmp_path: Path) -> None:
    query = demo_data / "market1501_query.csv"
    done = reid_tune("export", "--run-dir", bot_run, "--out", tmp_path / "bot.onnx", "--dataset", query,
                     "--image-root", demo_data)
    assert done.returncode == 0, done.stderr
    assert "lunet_small + fc1024 + BNNeck" in done.stdout and "iteration 3" in done.stdout
    assert f"16 images of {query}" in done.stdout and "within 0.0001" in done.stdout
    done = reid_tune("export", "--run-dir", bot_run, "--out", tmp_path / "bot.pt")
    assert done.returncode == 0 and "generated person images" in done.stdout, done.stderr
    # only the embedding network: neither the classifier nor the centers of the identity losses
    identity = torch.load(find_checkpoint(bot_run), weights_only=True)["identity"]
    shapes = {tuple(t.dims) for t in onnx.load(str(tmp_path / "bot.onnx")).graph.initializer}
    assert identity and not {tuple(t.shape) for t in identity.values()} & shapes
    # embedding with the ONNX file equals the PyTorch path, and evaluates the same
    pytorch = _embed(demo_data, tmp_path / "q_pt.h5", "--run-dir", bot_run)
    np.testing.assert_allclose(_embed(demo_data, tmp_path / "q_onnx.h5", "--onnx", tmp_path / "bot.onnx"),
                               pytorch, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_embed(demo_data, tmp_path / "q_ts.h5", "--torchscript", tmp_path / "bot.pt"),
                               pytorch, atol=1e-4, rtol=0)
    files = [tmp_path / f"q_{kind}.h5" for kind in ("pt", "onnx")]
    pt, ox = (evaluate_files(query, f, query, f, excluder="market1501", metric="euclidean", device="cpu")
              for f in files)
    assert pt.mAP == pytest.approx(ox.mAP, abs=1e-6)


@pytest.mark.slow
def test_embedding_an_exported_file_refuses_avgpool(bot_run: Path, demo_data: Path, tmp_path: Path) -> None:
    model, cfg = load_model(find_checkpoint(bot_run))
    images, _ = parity_images(Preprocessing.of(cfg), count=2)
    export_model(model, cfg, tmp_path / "m.onnx", fmt="onnx", source="run", images=images)
    done = reid_tune("embed", "--onnx", tmp_path / "m.onnx", "--dataset", demo_data / "market1501_query.csv",
                     "--image-root", demo_data, "--out", tmp_path / "q.h5", "--crop-augment", "avgpool")
    assert done.returncode == 2 and done.stderr.startswith("error: --crop-augment avgpool")
    assert not (tmp_path / "q.h5").exists()

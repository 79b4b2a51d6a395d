"""Networks, heads and their registry: shapes, gradients, pretrained loading, errors, trainability."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from reid_tune import models
from reid_tune.errors import ConfigError, ReidTuneError
from reid_tune.models import create_model, list_heads, list_networks, model_args

FEATURE_DIMS = {
    "lunet_small": 256,
    "mobilenet_v2": 1280,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
}
HEADS = ["direct", "direct_normalize", "fc1024", "fc1024_normalize"]
EMBEDDING_DIM = 16


def _images(batch: int = 2, height: int = 64, width: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_registries_list_every_variant() -> None:
    assert list_networks() == sorted(FEATURE_DIMS)
    assert list_heads() == HEADS


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("network", sorted(FEATURE_DIMS))
def test_forward_backward(network: str, head: str) -> None:
    model = create_model(network, head, embedding_dim=EMBEDDING_DIM).train()
    x = _images()
    features = model.forward_features(x)
    emb = model.forward_head(features)
    assert features.shape == (2, FEATURE_DIMS[network]) == (2, model.feature_dim)
    assert emb.shape == (2, EMBEDDING_DIM) == (2, model.embedding_dim)
    if head.endswith("_normalize"):
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    (emb * torch.randn_like(emb)).sum().backward()
    first_conv = next(p for p in model.trunk.parameters() if p.dim() == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


@pytest.mark.parametrize("network", sorted(FEATURE_DIMS))
def test_channels_last_and_any_input_size(network: str) -> None:
    model = create_model(network, "direct", embedding_dim=EMBEDDING_DIM).eval()
    x = _images(height=96, width=48)  # e.g. the avgpool view's bigger pre-crop image
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    assert expected.shape == (2, EMBEDDING_DIM)
    scale = expected.abs().max().item()  # deep random-init nets give large outputs
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * scale)


def test_fc1024_matches_triplet_reid_head() -> None:
    head = create_model("lunet_small", "fc1024", embedding_dim=EMBEDDING_DIM).head
    linear, batch_norm, _ = head.hidden
    assert linear.bias is None and linear.weight.shape == (1024, 256)
    assert batch_norm.momentum == 0.1 and batch_norm.eps == 1e-5
    w = head.emb.weight  # orthogonal init: orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(EMBEDDING_DIM), rtol=0, atol=1e-5)
    assert not head.emb.bias.any()


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"network": "resnet51"}, "network='resnet51'"),
        ({"head": "fc2048"}, "head='fc2048'"),
        ({"embedding_dim": 0}, "embedding_dim=0"),
    ],
)
def test_invalid_arguments_name_the_culprit(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit) as info:
        create_model(**{"network": "lunet_small", **kwargs})
    assert "\n" not in str(info.value)


def test_register_network_as_decorator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_NETWORKS", dict(models._NETWORKS))

    @models.register_network
    def tiny(*, pretrained: str | None = None) -> torch.nn.Module:
        return models.LuNet(stem_width=8, widths=(8,), depths=(1,))

    assert "tiny" in list_networks()
    assert create_model("tiny", "direct", embedding_dim=4)(_images()).shape == (2, 4)
    with pytest.raises(ValueError, match="name='tiny'"):
        models.register_network(tiny)


@pytest.mark.parametrize("network", ["resnet18", "mobilenet_v2"])
def test_local_torchvision_state_dict_round_trip(network: str, tmp_path) -> None:
    reference = torchvision.models.get_model(network, weights=None).eval()
    path = tmp_path / f"{network}.pth"
    torch.save(reference.state_dict(), path)  # includes the ImageNet classifier, which is dropped
    model = create_model(network, pretrained=str(path)).eval()
    for key, value in model.trunk.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], rtol=0, atol=0)
    classifier = models._TORCHVISION_TRUNKS[network]
    setattr(reference, classifier, torch.nn.Identity())
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(_images()), reference(_images()))


def test_lunet_state_dict_round_trip(tmp_path) -> None:
    source = create_model("lunet_small")
    path = tmp_path / "lunet.pt"
    torch.save(source.trunk.state_dict(), path)
    loaded = create_model("lunet_small", pretrained=str(path))
    torch.testing.assert_close(loaded.trunk.state_dict(), source.trunk.state_dict(), rtol=0, atol=0)


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(ReidTuneError, match="nope.pth") as info:
        create_model("resnet18", pretrained=str(path))
    assert "IMAGENET1K_V1" in str(info.value)


def test_mismatching_state_dict_is_a_reid_tune_error(tmp_path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ReidTuneError, match="does not fit resnet34") as info:
        create_model("resnet34", pretrained=str(path))
    assert "\n" not in str(info.value)


def test_not_a_state_dict_is_a_reid_tune_error(tmp_path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ReidTuneError, match="expected a state_dict"):
        create_model("lunet_small", pretrained=str(path))


def test_lunet_has_no_published_weights() -> None:
    with pytest.raises(ReidTuneError, match="lunet_small has no published weights"):
        create_model("lunet_small", pretrained="imagenet")


def test_imagenet_without_internet_says_to_pass_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, *args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(ReidTuneError, match="resnet50-11ad3fa6.pth.*local path"):
        create_model("resnet50", pretrained="imagenet")  # DEFAULT is IMAGENET1K_V2
    with pytest.raises(ReidTuneError, match="resnet50-0676ba61.pth"):
        create_model("resnet50", pretrained="IMAGENET1K_V1")


def test_model_args_rebuild_the_architecture() -> None:
    model = create_model("lunet_small", "fc1024_normalize", embedding_dim=32)
    args = model_args(model)
    assert args == {"network": "lunet_small", "head": "fc1024_normalize", "embedding_dim": 32,
                    "bnneck": False, "last_stride": 2}
    create_model(**args).load_state_dict(model.state_dict())  # strict: same architecture


def test_lunet_small_trains() -> None:
    torch.manual_seed(0)
    model = create_model("lunet_small", "direct", embedding_dim=8).train()
    x, target = _images(batch=8), torch.randn(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _last_stage_size(model: torch.nn.Module, height: int, width: int) -> tuple[int, int]:
    """(H, W) of the trunk's last stage output for one image of ``height`` x ``width``."""
    sizes = []
    model.trunk.layer4.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[-2:])))
    model.eval()(torch.zeros(1, 3, height, width))
    return sizes[0]


@pytest.mark.parametrize("network", ["resnet18", "resnet50"])
def test_last_stride_one_doubles_the_last_feature_map(network: str) -> None:
    """BoT's last stride 1: a 256x128 input ends in 16x8 instead of 8x4; the weights are the same tensors."""
    assert _last_stage_size(create_model(network, "direct", embedding_dim=8), 256, 128) == (8, 4)
    strided = create_model(network, "direct", embedding_dim=8, last_stride=1)
    assert _last_stage_size(strided, 256, 128) == (16, 8)
    assert create_model(**model_args(strided)).trunk.layer4[0].downsample[0].stride == (1, 1)


def test_last_stride_needs_a_resnet() -> None:
    with pytest.raises(ConfigError, match="last_stride=1: lunet_small has no ResNet last stage"):
        create_model("lunet_small", last_stride=1)


def test_bnneck_trains_before_and_retrieves_after_its_batchnorm() -> None:
    """Training mode: the head's embedding (the triplet feature); eval: that embedding through the
    BatchNorm with its running statistics, whose bias stays 0 (frozen)."""
    torch.manual_seed(0)
    model = create_model("lunet_small", "fc1024", embedding_dim=16, bnneck=True)
    images = torch.randn(6, 3, 64, 32)
    before = model.train()(images)
    torch.testing.assert_close(before, model.head(model.trunk(images)))
    neck = model.neck
    assert not neck.bias.requires_grad and torch.count_nonzero(neck.bias) == 0
    neck(before)  # as the training step does on the batch: the statistics follow the embeddings
    after = model.eval()(images)
    plain = model.head(model.trunk(images))
    expected = (plain - neck.running_mean) / torch.sqrt(neck.running_var + neck.eps) * neck.weight
    torch.testing.assert_close(after, expected)
    assert model_args(model)["bnneck"] and create_model(**model_args(model)).neck is not None

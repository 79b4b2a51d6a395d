"""Networks (trunks) and embedding heads by name, timm-style, joined into a :class:`ReidModel`.

A trunk maps images (B, 3, H, W) of any size to a globally average-pooled feature (B, F) and
exposes ``feature_dim``; a head maps that feature to the embedding (B, E) and exposes
``embedding_dim``. Heads follow triplet-reid's ``heads/*.py``, including their initialisation.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from reid_tune.errors import ConfigError, ReidTuneError
from reid_tune.vocabulary import is_int, one_line

if TYPE_CHECKING:  # torchvision takes seconds to import: only the builders that need it do
    import torchvision

_NETWORKS: dict[str, Callable[..., nn.Module]] = {}
_HEADS: dict[str, Callable[..., nn.Module]] = {}


def _register(
    registry: dict[str, Callable[..., nn.Module]], fn: Callable[..., nn.Module], name: str | None
) -> Callable[..., nn.Module]:
    """Add ``fn`` to ``registry`` under ``name`` (default: its ``__name__``); names are unique."""
    name = name or fn.__name__
    if name in registry:
        raise ConfigError(f"name={name!r}: already registered")
    registry[name] = fn
    return fn


def register_network(fn: Callable[..., nn.Module], *, name: str | None = None) -> Callable[..., nn.Module]:
    """Register a trunk builder ``fn(*, pretrained) -> nn.Module``; usable as a decorator."""
    return _register(_NETWORKS, fn, name)


def register_head(fn: Callable[..., nn.Module], *, name: str | None = None) -> Callable[..., nn.Module]:
    """Register a head builder ``fn(feature_dim, *, embedding_dim) -> nn.Module``; usable as a decorator."""
    return _register(_HEADS, fn, name)


def list_networks() -> list[str]:
    """Names accepted by ``create_model(network=...)``, sorted."""
    return sorted(_NETWORKS)


def list_heads() -> list[str]:
    """Names accepted by ``create_model(head=...)``, sorted."""
    return sorted(_HEADS)


def _lookup(registry: dict[str, Callable[..., nn.Module]], kind: str, name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``, or a one-line ``ConfigError`` listing the choices."""
    if name not in registry:
        raise ConfigError(f"{kind}={name!r}: unknown; expected one of {', '.join(sorted(registry))}")
    return registry[name]


# --- pretrained weights ----------------------------------------------------------------------------


def _download(weights: torchvision.models.WeightsEnum, pretrained: str) -> dict[str, torch.Tensor]:
    """torchvision's state_dict for ``weights`` (from torch.hub's cache, else the internet)."""
    try:
        return weights.get_state_dict(progress=False)
    except OSError as exc:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise ReidTuneError(
            f"pretrained={pretrained!r}: could not download {weights.url} ({type(exc).__name__}); "
            f"fetch it elsewhere and pass its local path, or put it at {cached}"
        ) from exc


def check_pretrained(network: str, pretrained: str, *, timeout_s: float = 30.0) -> None:
    """Load ``pretrained`` into ``network``'s trunk once, downloading it into torch.hub's cache when need be
    (a stalled connection fails after ``timeout_s``): a search checks its weights before any trial."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        _lookup(_NETWORKS, "network", network)(pretrained=pretrained)
    finally:
        socket.setdefaulttimeout(previous)


def _read_state_dict(pretrained: str, choices: Sequence[str], network: str) -> dict[str, torch.Tensor]:
    """The state_dict saved in the local file ``pretrained``."""
    path = Path(pretrained).expanduser()
    if not path.is_file():
        hint = f"choose from {', '.join(choices)} or" if choices else f"{network} has no published weights;"
        raise ReidTuneError(
            f"pretrained={pretrained!r}: no such file; {hint} pass a local .pth/.pt state_dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a file that is not a state_dict
        raise ReidTuneError(
            f"pretrained={pretrained!r}: not a readable state_dict ({one_line(exc)})"
        ) from exc
    if not isinstance(state, dict):
        raise ReidTuneError(
            f"pretrained={pretrained!r}: holds a {type(state).__name__}, expected a state_dict"
        )
    return state


def _load_pretrained(
    trunk: nn.Module,
    pretrained: str,
    *,
    network: str,
    weights_enum: type[torchvision.models.WeightsEnum] | None = None,
    classifier: str | None = None,
) -> None:
    """Load ``pretrained`` (``"imagenet"``, a torchvision weights name, or a file) strictly into ``trunk``.

    ``classifier`` names the torchvision classifier's key prefix, dropped because the trunk has none.
    """
    named = {"imagenet": weights_enum.DEFAULT, **{w.name: w for w in weights_enum}} if weights_enum else {}
    if pretrained in named:
        state = _download(named[pretrained], pretrained)
    else:
        state = _read_state_dict(pretrained, list(named), network)
    if classifier is not None:
        state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    try:
        trunk.load_state_dict(state)
    except RuntimeError as exc:
        raise ReidTuneError(f"pretrained={pretrained!r}: does not fit {network} ({one_line(exc)})") from exc


# --- torchvision trunks ----------------------------------------------------------------------------

# network -> attribute holding torchvision's ImageNet classifier, replaced by Identity so that the
# model returns its globally average-pooled feature.
_TORCHVISION_TRUNKS = {  # with _LUNET_VARIANTS: vocabulary.NETWORKS
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "resnet101": "fc",
    "mobilenet_v2": "classifier",
}


def _torchvision_trunk(network: str, classifier: str, *, pretrained: str | None = None) -> nn.Module:
    """torchvision's ``network`` without its classifier: (B, 3, H, W) -> pooled feature (B, F)."""
    import torchvision

    model = torchvision.models.get_model(network, weights=None)
    last_linear = [m for m in getattr(model, classifier).modules() if isinstance(m, nn.Linear)][-1]
    setattr(model, classifier, nn.Identity())
    model.feature_dim = last_linear.in_features
    if pretrained is not None:
        weights_enum = torchvision.models.get_model_weights(network)
        _load_pretrained(model, pretrained, network=network, weights_enum=weights_enum, classifier=classifier)
    return model


for _network, _classifier in _TORCHVISION_TRUNKS.items():
    register_network(functools.partial(_torchvision_trunk, _network, _classifier), name=_network)


# --- LuNet -----------------------------------------------------------------------------------------

# network -> LuNet arguments. Like the paper's LuNet (residual blocks, leaky ReLU, BatchNorm), but
# slimmer: every stage after the first halves the resolution, and global average pooling ends it.
_LUNET_VARIANTS = {  # with _TORCHVISION_TRUNKS: vocabulary.NETWORKS
    "lunet_small": {"stem_width": 32, "widths": (32, 64, 128, 256), "depths": (1, 1, 1, 1)},
}

# LuNet's leaky ReLU slope.
LEAKY_SLOPE = 0.3


def _conv_bn(in_width: int, out_width: int, *, kernel: int, stride: int) -> nn.Sequential:
    """A bias-free convolution followed by BatchNorm."""
    conv = nn.Conv2d(in_width, out_width, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_width))


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with leaky ReLU, plus a (projected when the shape changes) shortcut."""

    def __init__(self, in_width: int, out_width: int, *, stride: int = 1) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            _conv_bn(in_width, out_width, kernel=3, stride=stride),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            _conv_bn(out_width, out_width, kernel=3, stride=1),
        )
        reshapes = stride != 1 or in_width != out_width
        self.shortcut = _conv_bn(in_width, out_width, kernel=1, stride=stride) if reshapes else nn.Identity()
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.branch(x) + self.shortcut(x))


class LuNet(nn.Module):
    """A small residual network in the spirit of the paper's LuNet, meant to train from scratch."""

    def __init__(self, *, stem_width: int, widths: Sequence[int], depths: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            _conv_bn(3, stem_width, kernel=3, stride=2),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        in_width = stem_width
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for block in range(depth):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(ResidualBlock(in_width, width, stride=stride))
                in_width = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.feature_dim = in_width
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _lunet_trunk(network: str, *, pretrained: str | None = None) -> nn.Module:
    """The LuNet variant ``network``; ``pretrained`` may only be a local state_dict file."""
    model = LuNet(**_LUNET_VARIANTS[network])
    if pretrained is not None:
        _load_pretrained(model, pretrained, network=network)
    return model


for _network in _LUNET_VARIANTS:
    register_network(functools.partial(_lunet_trunk, _network), name=_network)


# --- heads -----------------------------------------------------------------------------------------


class EmbeddingHead(nn.Module):
    """triplet-reid's heads: [Linear(F, hidden) + BN + ReLU] + Linear(., E), optionally L2-normalised.

    Initialised as TF-slim did: Xavier-uniform, bias-free hidden layer (its BatchNorm supplies the
    shift; decay 0.9 is momentum 0.1), orthogonal embedding weights with zero bias.
    """

    def __init__(
        self, feature_dim: int, *, embedding_dim: int, hidden_dim: int | None, normalize: bool
    ) -> None:
        super().__init__()
        if hidden_dim is None:
            self.hidden: nn.Module = nn.Identity()
        else:
            linear = nn.Linear(feature_dim, hidden_dim, bias=False)
            nn.init.xavier_uniform_(linear.weight)
            batch_norm = nn.BatchNorm1d(hidden_dim, eps=1e-5, momentum=0.1)
            self.hidden = nn.Sequential(linear, batch_norm, nn.ReLU(inplace=True))
        self.emb = nn.Linear(hidden_dim or feature_dim, embedding_dim)
        nn.init.orthogonal_(self.emb.weight)
        nn.init.zeros_(self.emb.bias)
        self.embedding_dim = embedding_dim
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        emb = self.emb(self.hidden(features))
        # eps=1e-6 is tf.nn.l2_normalize's 1e-12 floor on the squared norm.
        return F.normalize(emb, dim=-1, eps=1e-6) if self.normalize else emb


# head -> (hidden width, L2-normalise), as triplet-reid's heads/<name>.py
_HEAD_VARIANTS = {  # vocabulary.HEADS
    "fc1024": (1024, False),
    "fc1024_normalize": (1024, True),
    "direct": (None, False),
    "direct_normalize": (None, True),
}

for _head, (_hidden, _normalize) in _HEAD_VARIANTS.items():
    register_head(functools.partial(EmbeddingHead, hidden_dim=_hidden, normalize=_normalize), name=_head)


# --- the model -------------------------------------------------------------------------------------


class BNNeck(nn.BatchNorm1d):
    """BoT's BNNeck (Luo et al. 2019): BatchNorm of the embedding with its bias frozen at 0, so the
    triplet loss sees the feature before it and retrieval (and an ID loss) the normalised one after it."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.bias.requires_grad_(False)


class ReidModel(nn.Module):
    """A trunk and an embedding head (and optionally a BNNeck), remembering how they were created."""

    def __init__(
        self,
        trunk: nn.Module,
        head: nn.Module,
        *,
        network: str,
        head_name: str,
        bnneck: bool = False,
        last_stride: int = 2,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.neck = BNNeck(head.embedding_dim) if bnneck else None
        self.network = network
        self.head_name = head_name
        self.last_stride = last_stride
        self.feature_dim: int = trunk.feature_dim
        self.embedding_dim: int = head.embedding_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) of any size -> globally pooled features (B, F)."""
        return self.trunk(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, F) -> embeddings (B, E)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding to train the triplet loss on (before the BNNeck) in training mode, the retrieval
        embedding (after it) in eval mode. The training step runs ``neck`` on the (all-gathered) batch."""
        embeddings = self.forward_head(self.forward_features(x))
        return embeddings if self.neck is None or self.training else self.neck(embeddings)


def create_model(
    network: str = "resnet50",
    head: str = "fc1024",
    *,
    embedding_dim: int = 128,
    pretrained: str | None = None,
    bnneck: bool = False,
    last_stride: int = 2,
) -> ReidModel:
    """Build ``network`` + ``head`` by name, with BoT's BNNeck after the head and the last ResNet stage's
    stride (1 keeps its resolution, as BoT) when asked.

    ``pretrained`` initialises the trunk: None (random), ``"imagenet"`` (torchvision's default
    weights for ``network``), a torchvision weights name such as ``"IMAGENET1K_V2"``, or the path of
    a local torchvision classification state_dict (its classifier keys are dropped).
    """
    build_trunk = _lookup(_NETWORKS, "network", network)
    build_head = _lookup(_HEADS, "head", head)
    if not is_int(embedding_dim) or embedding_dim <= 0:
        raise ConfigError(f"embedding_dim={embedding_dim!r}: must be a positive integer")
    trunk = build_trunk(pretrained=pretrained)
    if last_stride != 2:
        _set_last_stride(trunk, network, last_stride)
    embedding_head = build_head(trunk.feature_dim, embedding_dim=embedding_dim)
    return ReidModel(
        trunk, embedding_head, network=network, head_name=head, bnneck=bnneck, last_stride=last_stride
    )


def _set_last_stride(trunk: nn.Module, network: str, stride: int) -> None:
    """The stride of a ResNet's last stage (its first block's strided convolution and shortcut)."""
    if not hasattr(trunk, "layer4"):
        raise ConfigError(f"last_stride={stride}: {network} has no ResNet last stage, expected a resnet")
    block = trunk.layer4[0]
    strided = block.conv2 if hasattr(block, "conv3") else block.conv1  # bottleneck (v1.5) or basic block
    strided.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def model_args(model: ReidModel) -> dict[str, Any]:
    """Architecture arguments to store beside the weights; ``create_model(**model_args(m))`` rebuilds it."""
    return {
        "network": model.network,
        "head": model.head_name,
        "embedding_dim": model.embedding_dim,
        "bnneck": model.neck is not None,
        "last_stride": model.last_stride,
    }

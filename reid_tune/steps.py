"""The update of one PK batch: forward, batch-hard loss, backward and Adam, eager or as one CUDA graph.

On a GPU with one worker the step is one CUDA graph replay (:class:`GraphedTrainStep`, bf16 autocast,
channels_last); elsewhere, or with ``cuda_graph=False``, it runs eagerly (:class:`TrainStep`). A graph that
fails to capture leaves the step eager (``fallback`` says why), its weights and Adam state untouched.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from reid_tune.config import TrainConfig
from reid_tune.devices import CUDA_GRAPH, Fallback, configure_gpu, fall_back, resolve_precision
from reid_tune.distributed import gather_batch, rank_and_world, wrap_model
from reid_tune.errors import ReidTuneError
from reid_tune.id_losses import IdentityLosses, identity_losses
from reid_tune.losses import TripletLoss
from reid_tune.models import ReidModel, create_model


class TrainStep:
    """Forward, loss, backward and Adam step of one PK batch; returns the loss statistics (device tensors).

    ``model`` is the plain network (what checkpoints hold); ``net`` is what runs it: DDP when
    distributed, compiled when asked.
    """

    graphed = False  # whether the update runs as one CUDA graph replay
    fallback: Fallback | None = None  # why a graphed step runs eagerly instead

    def __init__(
        self,
        model: ReidModel,
        loss_fn: TripletLoss,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        bf16: bool,
        channels_last: bool,
        compile: bool = False,
        identity: IdentityLosses | None = None,
        center_lr: float = 0.5,
    ) -> None:
        self.model, self.net, self.loss_fn, self.optimizer = model, model, loss_fn, optimizer
        self.device, self.bf16, self.channels_last, self.compile = device, bf16, channels_last, compile
        self.identity = identity  # BoT's training-only classifier and centers (checkpointed apart)
        centers = [identity.centers] if identity is not None and identity.centers is not None else []
        self.center_optimizer = torch.optim.SGD(centers, lr=center_lr) if centers else None
        # what a rollback or a checkpoint restores: the network and the training-only parts
        self.trained = nn.ModuleList([model] + ([identity] if identity is not None else []))

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of image batches the network gets."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def distribute(self) -> None:
        """Make ``net``: data-parallel across the initialised process group (if any), compiled if asked.

        Call once, after loading weights.
        """
        net = wrap_model(self.model, self.device)
        self.net = torch.compile(net) if self.compile else net

    def load_state(self, state: dict[str, Any]) -> None:
        """Weights and Adam state of a checkpoint; this step's optimizer options (lr tensor, fused) stay."""
        self.model.load_state_dict(state["model"])
        if self.identity is not None:
            self.identity.load_state_dict(state["identity"])
        options = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, kept in zip(self.optimizer.param_groups, options):
            group.update(kept)
        _laid_out_like_params(self.optimizer)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step; a tensor lr is filled in place (no host sync, graph-safe)."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of the (global) batch and its gradients in ``.grad``; mining spans every worker's share."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        # no autocast weight cache: CUDA graph capture requires it, and each weight is cast once anyway
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            embeddings = self.net(images)
        embeddings, labels = gather_batch(embeddings.float(), labels)
        loss, stats = self.loss_fn(embeddings, labels)
        neck = getattr(self.model, "neck", None)  # a ReidModel's BNNeck (any network trains)
        retrieval = embeddings if neck is None else neck(embeddings)
        if self.identity is not None:
            extra, extra_stats = self.identity(embeddings, retrieval, labels)
            loss = loss + extra
            stats = {**stats, **extra_stats, "total_loss": loss.detach()}
        self.optimizer.zero_grad(set_to_none=True)
        if self.center_optimizer is not None:
            self.center_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, stats

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward_backward`, then the optimizer step at the current learning rate."""
        _, stats = self.forward_backward(images, labels)
        self.optimizer.step()
        if self.center_optimizer is not None:  # BoT: the centers learn at their own rate, unweighted
            self.identity.centers.grad.mul_(1 / self.identity.center_weight)
            self.center_optimizer.step()
        return stats

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        self.set_lr(lr)
        return self.update(images, labels)


class GraphedTrainStep(TrainStep):
    """:class:`TrainStep` replayed as one CUDA graph: forward, loss, backward and Adam in a single launch.

    At P=18 K=4 an eager step is launch-bound; a replay is not. The first call warms up on a side
    stream (cuDNN autotuning, lazy allocations, Adam's state), captures one step reading static batch
    buffers, and rolls the warm-up back; Adam is capturable with its lr a device tensor, so the
    schedule needs no re-capture. The returned statistics are static tensors, overwritten by every call.
    If the capture fails, the step warns once and runs eagerly (``fallback``).
    """

    WARMUP_STEPS = 3  # eager steps before capture, as PyTorch's whole-network capture example

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graph: torch.cuda.CUDAGraph | None = None

    @property
    def graphed(self) -> bool:
        """Whether the update is captured (False before the first call and after a failed capture)."""
        return self.graph is not None

    def load_state(self, state: dict[str, Any]) -> None:
        """As :meth:`TrainStep.load_state`, before the capture only: the graph holds the current tensors."""
        if self.graph is not None:
            raise ReidTuneError("load_state: after the CUDA graph's capture, expected before the first step")
        super().load_state(state)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        if self.graph is None and self.fallback is None:
            self._capture_or_fall_back(images, labels)
        if self.graph is None:
            return super().__call__(images, labels, lr)
        self.set_lr(lr)
        self.static_images.copy_(images, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.static_stats

    def _capture_or_fall_back(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """:meth:`_capture`; if anything in it fails, warn once and run eagerly from now on (``fallback``)."""
        try:
            self._capture(images, labels)
        except Exception as err:  # noqa: BLE001 - training must not die of a CUDA graph alone
            for group in self.optimizer.param_groups:
                group["capturable"] = False  # as the eager step's Adam (no warning about capturable steps)
            self.fallback = fall_back(CUDA_GRAPH, "eager", err)

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Static buffers shaped like this batch, warm-up and the capture of one update, both rolled back;
        the step's graph and buffers are set only once all of it succeeded."""
        static_images = torch.empty(images.shape, device=self.device, memory_format=self.memory_format)
        static_labels = torch.empty(labels.shape, dtype=labels.dtype, device=self.device)
        static_images.copy_(images)
        static_labels.copy_(labels)
        with rolled_back(self.trained, self.optimizer), warnings.catch_warnings():
            # Adam says capturable=True is slow outside a graph; the warm-up must run outside one
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            with _side_stream(self.device):
                for _ in range(self.WARMUP_STEPS):
                    self.update(static_images, static_labels)
            graph, stats = self._record(static_images, static_labels)
        self.static_images, self.static_labels = static_images, static_labels
        self.static_stats, self.graph = stats, graph

    def _record(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, dict]:
        """One update of the static ``images`` and ``labels`` captured as a new graph; its static statistics.

        Errors stay thread-local: a DataLoader's pin-memory thread may copy while this thread captures.
        """
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            stats = self.update(images, labels)
        return graph, stats


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """The block on a new stream, ordered after the current one's work and before its next (graph warm-up)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        torch.cuda.current_stream(device).wait_stream(side)


@contextlib.contextmanager
def rolled_back(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Undo the block's training steps in place: weights, buffers and optimizer state as before.

    State the block created (Adam's first moments and step count) is zeroed, which is Adam's fresh state.
    Tensors keep their storage, so a graph captured in the block sees the restored values; a block that
    raises is undone too.
    """
    weights = [t.clone() for t in model.state_dict().values()]
    moments = {p: {k: v.clone() for k, v in state.items()} for p, state in optimizer.state.items()}
    try:
        yield
    finally:
        _restore(model, optimizer, weights, moments)


def _restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: list[torch.Tensor],
    moments: dict[torch.Tensor, dict[str, torch.Tensor]],
) -> None:
    """Copy the saved ``weights`` and ``moments`` back in place; zero optimizer state made since."""
    with torch.no_grad():
        for tensor, saved in zip(model.state_dict().values(), weights):
            tensor.copy_(saved)
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if param in moments:
                    value.copy_(moments[param][key])
                else:
                    value.zero_()


def _laid_out_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Each state tensor shaped like its parameter (Adam's moments) in the parameter's memory layout.

    A run started on the CPU (contiguous) and resumed on a GPU (channels_last) loads contiguous moments;
    fused Adam pairs a parameter's and its moments' elements by memory position.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def use_cuda_graph(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the step runs as a CUDA graph: ``None`` means on a GPU with one worker (DDP stays eager)."""
    world = rank_and_world()[1]
    if cfg.cuda_graph is None:
        return device.type == "cuda" and world == 1
    if cfg.cuda_graph and device.type != "cuda":
        raise ReidTuneError(f"cuda_graph=True: needs a CUDA device, not device={cfg.device!r}")
    if cfg.cuda_graph and world > 1:
        raise ReidTuneError(f"cuda_graph=True: runs with one worker only, not {world}; use cuda_graph=null")
    return cfg.cuda_graph


def _adam(
    model: ReidModel,
    cfg: TrainConfig,
    device: torch.device,
    *,
    graphed: bool,
    identity: IdentityLosses | None,
) -> torch.optim.Adam:
    """triplet-reid's Adam (with BoT's weight decay when set); on a GPU fused, with a device-tensor lr,
    capturable when graphed."""
    classifier = identity.classifier if identity is not None else None
    trained = [*model.parameters(), *(classifier.parameters() if classifier is not None else [])]
    params = [p for p in trained if p.requires_grad]  # not the BNNeck's frozen bias; centers use SGD
    if device.type != "cuda":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr = torch.tensor(cfg.learning_rate, device=device)
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=True, capturable=graphed)


def build_step(cfg: TrainConfig, device: torch.device, *, num_ids: int = 0) -> TrainStep:
    """Seeded model, loss and Adam for ``cfg`` on ``device``, graphed or eager (see ``cfg.cuda_graph``);
    with BoT's identity losses, a classifier over ``num_ids`` training identities and their centers."""
    graphed = use_cuda_graph(cfg, device)
    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.network,
        cfg.head,
        embedding_dim=cfg.embedding_dim,
        pretrained=cfg.pretrained,
        bnneck=cfg.bnneck,
        last_stride=cfg.last_stride,
    )
    if model.neck is not None and not cfg.id_loss_weight:
        model.neck.weight.requires_grad_(False)  # only an ID loss trains the neck (DDP: no unused params)
    identity = identity_losses(cfg, model.embedding_dim, num_ids)
    on_gpu = device.type == "cuda"
    channels_last = on_gpu if cfg.channels_last is None else cfg.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if identity is not None:
        identity.to(device)
    loss_fn = TripletLoss(margin=cfg.margin, metric=cfg.metric, mining=cfg.loss, precision_k=cfg.batch_k - 1)
    precision = resolve_precision(cfg, device)
    if on_gpu:
        configure_gpu(device, precision)
    kind = GraphedTrainStep if graphed else TrainStep
    return kind(
        model,
        loss_fn,
        _adam(model, cfg, device, graphed=graphed, identity=identity),
        device=device,
        bf16=precision == "bf16",
        channels_last=channels_last,
        compile=cfg.compile,
        identity=identity,
        center_lr=cfg.center_lr,
    )

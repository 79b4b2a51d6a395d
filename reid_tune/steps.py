"""The update of one PK batch: forward, batch-hard loss, backward and Adam, eager or as one CUDA graph.

On a GPU with one worker the step is one CUDA graph replay (:class:`GraphedTrainStep`, bf16 autocast,
channels_last); elsewhere, or with ``cuda_graph=False``, it runs eagerly (:class:`TrainStep`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from reid_tune.config import TrainConfig
from reid_tune.devices import configure_gpu, resolve_precision
from reid_tune.distributed import gather_batch, rank_and_world, wrap_model
from reid_tune.errors import ReidTuneError
from reid_tune.losses import TripletLoss
from reid_tune.models import ReidModel, create_model


class TrainStep:
    """Forward, loss, backward and Adam step of one PK batch; returns the loss statistics (device tensors).

    ``model`` is the plain network (what checkpoints hold); ``net`` is what runs it: DDP when
    distributed, compiled when asked.
    """

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
    ) -> None:
        self.model, self.net, self.loss_fn, self.optimizer = model, model, loss_fn, optimizer
        self.device, self.bf16, self.channels_last, self.compile = device, bf16, channels_last, compile

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
        options = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, kept in zip(self.optimizer.param_groups, options):
            group.update(kept)

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
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, stats

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward_backward`, then the optimizer step at the current learning rate."""
        _, stats = self.forward_backward(images, labels)
        self.optimizer.step()
        return stats

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        self.set_lr(lr)
        return self.update(images, labels)


class GraphedTrainStep(TrainStep):
    """:class:`TrainStep` replayed as one CUDA graph: forward, loss, backward and Adam in a single launch.

    At P=18 K=4 an eager step is launch-bound; a replay is not. The first call warms up on a side
    stream (cuDNN autotuning, lazy allocations, Adam's state), rolls those steps back, and captures
    one step reading static batch buffers; Adam is capturable with its lr a device tensor, so the
    schedule needs no re-capture. The returned statistics are static tensors, overwritten by every call.
    """

    WARMUP_STEPS = 3  # eager steps before capture, as PyTorch's whole-network capture example

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        if self.graph is None:
            self._capture(images, labels)
        self.set_lr(lr)
        self.static_images.copy_(images, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.static_stats

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Static buffers shaped like this batch, warm-up (rolled back), then the capture of one update."""
        self.static_images = torch.empty(images.shape, device=self.device, memory_format=self.memory_format)
        self.static_labels = torch.empty(labels.shape, dtype=labels.dtype, device=self.device)
        self.static_images.copy_(images)
        self.static_labels.copy_(labels)
        with rolled_back(self.model, self.optimizer), warnings.catch_warnings():
            # Adam says capturable=True is slow outside a graph; the warm-up must run outside one
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_STEPS):
                    self.update(self.static_images, self.static_labels)
            torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_stats = self.update(self.static_images, self.static_labels)


@contextlib.contextmanager
def rolled_back(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Undo the block's training steps in place: weights, buffers and optimizer state as before.

    State the block created (Adam's first moments and step count) is zeroed, which is Adam's fresh state.
    Tensors keep their storage, so a graph captured afterwards sees the restored values.
    """
    weights = [t.clone() for t in model.state_dict().values()]
    moments = {p: {k: v.clone() for k, v in state.items()} for p, state in optimizer.state.items()}
    yield
    with torch.no_grad():
        for tensor, saved in zip(model.state_dict().values(), weights):
            tensor.copy_(saved)
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if param in moments:
                    value.copy_(moments[param][key])
                else:
                    value.zero_()


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


def _adam(model: ReidModel, cfg: TrainConfig, device: torch.device, *, graphed: bool) -> torch.optim.Adam:
    """triplet-reid's Adam; on a GPU fused, with a device-tensor lr, capturable when graphed."""
    if device.type != "cuda":
        return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    lr = torch.tensor(cfg.learning_rate, device=device)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=graphed)


def build_step(cfg: TrainConfig, device: torch.device) -> TrainStep:
    """Seeded model, loss and Adam for ``cfg`` on ``device``, graphed or eager (see ``cfg.cuda_graph``)."""
    graphed = use_cuda_graph(cfg, device)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.network, cfg.head, embedding_dim=cfg.embedding_dim, pretrained=cfg.pretrained)
    on_gpu = device.type == "cuda"
    channels_last = on_gpu if cfg.channels_last is None else cfg.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    loss_fn = TripletLoss(margin=cfg.margin, metric=cfg.metric, mining=cfg.loss, precision_k=cfg.batch_k - 1)
    precision = resolve_precision(cfg, device)
    if on_gpu:
        configure_gpu(device, precision)
    kind = GraphedTrainStep if graphed else TrainStep
    return kind(
        model,
        loss_fn,
        _adam(model, cfg, device, graphed=graphed),
        device=device,
        bf16=precision == "bf16",
        channels_last=channels_last,
        compile=cfg.compile,
    )

"""The update step: a failed CUDA-graph capture falls back to the eager step, unharmed; checkpoint state loads
into the step's layout, and never under a captured graph."""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import RecordFallbacks, weights

from reid_tune import gpu_data, steps
from reid_tune import train as train_module
from reid_tune.checkpoints import read_checkpoint
from reid_tune.config import TrainConfig
from reid_tune.devices import CUDA_GRAPH, DATA_CACHE
from reid_tune.errors import ReidTuneError
from reid_tune.steps import GraphedTrainStep, TrainStep, build_step
from reid_tune.train import train

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def graphed_on_cpu(step: TrainStep) -> GraphedTrainStep:
    """The graphed kind of ``step`` (same network, loss and Adam), on the CPU, where its capture must fail."""
    return GraphedTrainStep(
        step.model,
        step.loss_fn,
        step.optimizer,
        device=step.device,
        bf16=step.bf16,
        channels_last=step.channels_last,
    )


@contextlib.contextmanager
def same_stream(device: torch.device) -> Iterator[None]:
    """The warm-up on the current stream (the CPU has no streams)."""
    yield


@contextlib.contextmanager
def broken_stream(device: torch.device) -> Iterator[None]:
    """A side stream that fails once the warm-up ran (its steps changed the weights and Adam)."""
    yield
    raise RuntimeError("side stream failed")


def failing_record(self: GraphedTrainStep, images: torch.Tensor, labels: torch.Tensor) -> tuple:
    """A capture that ran part of an update before it failed."""
    self.update(images, labels)
    raise RuntimeError("operation not permitted when stream is capturing")


def out_of_memory(*args: object, **kwargs: object) -> None:
    """A cache that cannot be mapped: the host has no memory left for it."""
    raise MemoryError


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 64, 32, generator=gen), torch.arange(4).repeat_interleave(2)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("failing", ["warm-up", "capture"])
def test_a_failed_capture_falls_back_to_the_eager_step(
    tiny_config: TrainConfig, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """Warned once; the failed warm-up or capture is rolled back, so it trains exactly as the eager step."""
    monkeypatch.setattr(steps, "_side_stream", broken_stream if failing == "warm-up" else same_stream)
    monkeypatch.setattr(GraphedTrainStep, "_record", failing_record)
    eager = build_step(tiny_config, CPU)
    graphed = graphed_on_cpu(build_step(tiny_config, CPU))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed, lr in enumerate((3e-4, 2e-4, 1e-4)):
            a, b = graphed(*batch(seed), lr), eager(*batch(seed), lr)
            assert a["loss_mean"] == b["loss_mean"]
    fallbacks = [w for w in caught if f"{CUDA_GRAPH}: fallback to eager" in str(w.message)]
    assert len(fallbacks) == 1 and fallbacks[0].category is RuntimeWarning
    assert not graphed.graphed and graphed.fallback is not None and graphed.fallback.feature == CUDA_GRAPH
    assert "RuntimeError" in graphed.fallback.reason and not hasattr(graphed, "static_images")
    assert_same_weights(graphed.model, eager.model)


def test_a_run_whose_gpu_features_fail_trains_as_without_them(
    tiny_config: TrainConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A cache that cannot be mapped and a graph that fails to capture: the run trains on the cpu path,
    eagerly, to the weights of a run that asked for neither, and tells its callbacks of both."""
    plain = train(tiny_config.replace(data_path="cpu"), tmp_path / "plain")
    monkeypatch.setattr(steps, "_side_stream", same_stream)
    monkeypatch.setattr(GraphedTrainStep, "_record", failing_record)
    monkeypatch.setattr(
        train_module, "build_step", lambda cfg, device, **kw: graphed_on_cpu(build_step(cfg, device, **kw))
    )
    monkeypatch.setattr(gpu_data, "decode_cache", out_of_memory)
    record = RecordFallbacks()
    with pytest.warns(RuntimeWarning):
        failed = train(tiny_config.replace(data_path="device"), tmp_path / "failed", callback=record)
    assert [f.feature for f in record.fallbacks] == [DATA_CACHE, CUDA_GRAPH]
    a, b = weights(plain.checkpoint), weights(failed.checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_step_without_a_graph_reports_no_fallback(tiny_config: TrainConfig) -> None:
    step = build_step(tiny_config, CPU)
    step(*batch(0), 3e-4)
    assert not step.graphed and step.fallback is None


def test_adam_moments_load_in_the_layout_of_their_parameters(
    tiny_config: TrainConfig, tmp_path: Path
) -> None:
    """A run saved with contiguous weights resumes channels_last (as from the CPU onto a GPU)."""
    run = train(tiny_config.replace(train_iterations=2, checkpoint_frequency=2), tmp_path)
    state = read_checkpoint(run.checkpoint)
    step = build_step(tiny_config.replace(channels_last=True), CPU)
    step.load_state(state)
    convs = 0
    for param, moments in step.optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert moments[key].stride() == param.stride(), key
        convs += param.dim() == 4 and not param.is_contiguous()
    assert convs, "some parameters should be channels_last"
    saved = [moments["exp_avg"] for moments in state["optimizer"]["state"].values()]
    loaded = [moments["exp_avg"] for moments in step.optimizer.state.values()]
    for want, got in zip(saved, loaded):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    step(*batch(0), 3e-4)


def test_state_cannot_load_under_a_captured_graph(
    tiny_config: TrainConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The graph holds the weights' and moments' tensors: loading would leave it updating orphans."""
    run = train(tiny_config.replace(train_iterations=1, checkpoint_frequency=1), tmp_path)
    monkeypatch.setattr(steps, "_side_stream", same_stream)
    monkeypatch.setattr(
        GraphedTrainStep,
        "_record",
        lambda self, images, labels: (
            types.SimpleNamespace(replay=lambda: None),
            self.update(images, labels),
        ),
    )
    step = graphed_on_cpu(build_step(tiny_config, CPU))
    step.load_state(read_checkpoint(run.checkpoint))  # before the capture: fine
    step(*batch(0), 3e-4)
    assert step.graphed
    with pytest.raises(ReidTuneError, match="load_state: after the CUDA graph's capture"):
        step.load_state(read_checkpoint(run.checkpoint))


# ---------------------------------------------------------------- GPU only


@needs_cuda
def test_cuda_moments_of_a_cpu_run_resume_channels_last(tiny_config: TrainConfig, tmp_path: Path) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    run = train(tiny_config.replace(device="cpu", train_iterations=2, checkpoint_frequency=2), tmp_path)
    step = build_step(tiny_config.replace(device="cuda"), device)
    step.load_state(read_checkpoint(run.checkpoint, device=device))
    for param, moments in step.optimizer.state.items():
        assert (
            moments["exp_avg"].stride() == param.stride() and moments["exp_avg_sq"].stride() == param.stride()
        )
    images, labels = (t.to(device) for t in batch(0))
    losses = [float(step(images, labels, 1e-3)["loss_mean"]) for _ in range(5)]
    assert step.graphed and losses[-1] < losses[0]
    with pytest.raises(ReidTuneError, match="load_state: after the CUDA graph's capture"):
        step.load_state(read_checkpoint(run.checkpoint, device=device))


def test_weight_decay_reaches_adam_and_the_frozen_bnneck_bias_does_not(tiny_config: TrainConfig) -> None:
    step = build_step(tiny_config.replace(weight_decay=5e-4, bnneck=True), torch.device("cpu"))
    (group,) = step.optimizer.param_groups
    assert group["weight_decay"] == 5e-4
    assert all(p is not step.model.neck.bias for p in group["params"])

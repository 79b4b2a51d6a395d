"""The device data path and the fast step: decoded cache built once, device batches, graph-safe training."""

from __future__ import annotations

import errno
import itertools
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import InterruptAt, RecordFallbacks, weights

from reid_tune import gpu_data
from reid_tune.augmentation import IMAGENET_MEAN, IMAGENET_STD, resized, train_augment
from reid_tune.config import TrainConfig, config_from_dict
from reid_tune.datasets import load_csv, load_image
from reid_tune.devices import DATA_CACHE, Fallback
from reid_tune.errors import ReidTuneError
from reid_tune.gpu_data import GIB, DeviceBatches, cache_fits, decode_cache, place_cache, resolve_data_path
from reid_tune.losses import TripletLoss
from reid_tune.models import create_model
from reid_tune.steps import build_step, rolled_back
from reid_tune.train import train
from reid_tune.training_data import PKBatches, open_batches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SIZE = (72, 36)


def _fids(demo_data: Path) -> np.ndarray:
    return load_csv(demo_data / "market1501_train.csv").fids


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the rows decoded from now on (the real decoder still runs)."""
    decoded: list[int] = []
    real = gpu_data._decode_into

    def decode(cache: np.ndarray, index: int, path: Path, size: tuple[int, int]) -> None:
        decoded.append(index)
        real(cache, index, path, size)

    monkeypatch.setattr(gpu_data, "_decode_into", decode)
    return decoded


# ---------------------------------------------------------------- the cache


def test_cache_holds_each_image_resized_as_the_cpu_path(demo_data: Path, tmp_path: Path) -> None:
    fids = _fids(demo_data)
    cache = decode_cache(fids, demo_data, SIZE, cache_dir=tmp_path)
    assert cache.shape == (len(fids), 3, *SIZE) and cache.dtype == np.uint8
    for i in (0, len(fids) - 1):
        want = resized(load_image(demo_data / fids[i]), SIZE).transpose(2, 0, 1)
        np.testing.assert_array_equal(cache[i], want)


def test_second_call_maps_without_decoding(demo_data: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fids = _fids(demo_data)
    decoded = _counting(monkeypatch)
    first = decode_cache(fids, demo_data, SIZE, cache_dir=tmp_path)
    assert sorted(decoded) == list(range(len(fids)))
    again = decode_cache(fids, demo_data, SIZE, cache_dir=tmp_path)
    assert len(decoded) == len(fids) and isinstance(again, np.memmap)
    np.testing.assert_array_equal(first, again)
    decode_cache(fids, demo_data, (64, 32), cache_dir=tmp_path)  # another size is another cache
    assert len(decoded) == 2 * len(fids)


def test_a_changed_image_makes_a_new_cache(demo_data: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "images"
    fids = _fids(demo_data)[:6]
    for fid in fids:
        (root / fid).parent.mkdir(parents=True, exist_ok=True)
        (root / fid).write_bytes((demo_data / fid).read_bytes())
    decode_cache(fids, root, SIZE, cache_dir=tmp_path / "cache")
    decoded = _counting(monkeypatch)
    stat = (root / fids[2]).stat()
    os.utime(root / fids[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    decode_cache(fids, root, SIZE, cache_dir=tmp_path / "cache")
    assert len(decoded) == len(fids)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_a_failed_build_leaves_no_cache(demo_data: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fids = _fids(demo_data)
    real = gpu_data._decode_into

    def broken(cache: np.ndarray, index: int, path: Path, size: tuple[int, int]) -> None:
        assert not list(tmp_path.glob("*.npy")), "the cache appeared before it was complete"
        if index == 5:
            raise OSError("disk gone")
        real(cache, index, path, size)

    monkeypatch.setattr(gpu_data, "_decode_into", broken)
    with pytest.raises(ReidTuneError, match=r"cannot write \(disk gone\)"):
        decode_cache(fids, demo_data, SIZE, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(gpu_data, "_decode_into", real)
    assert decode_cache(fids, demo_data, SIZE, cache_dir=tmp_path).shape[0] == len(fids)


def _build_concurrently(fids: np.ndarray, root: str, cache_dir: str, log: str,
                        barrier: multiprocessing.synchronize.Barrier) -> None:
    """A trial process: counts its decodes in ``log`` (slowly, so the builds would overlap)."""
    import time

    real = gpu_data._decode_into

    def decode(cache: np.ndarray, index: int, path: Path, size: tuple[int, int]) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {index}\n")
        time.sleep(0.02)
        real(cache, index, path, size)

    gpu_data._decode_into = decode
    barrier.wait()
    decode_cache(fids, root, SIZE, cache_dir=cache_dir, workers=1)


@pytest.mark.slow
def test_concurrent_trials_build_the_cache_once(demo_data: Path, tmp_path: Path) -> None:
    fids, log = _fids(demo_data), tmp_path / "decodes.log"
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(2)
    trials = [spawn.Process(target=_build_concurrently,
                            args=(fids, str(demo_data), str(tmp_path / "cache"), str(log), barrier))
              for _ in range(2)]
    for trial in trials:
        trial.start()
    for trial in trials:
        trial.join(timeout=300)
        assert trial.exitcode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == len(fids) and len({line.split()[0] for line in lines}) == 1
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


# ---------------------------------------------------------------- batches


@pytest.fixture()
def device_config(tiny_config: TrainConfig, tmp_path: Path) -> TrainConfig:
    return tiny_config.replace(data_path="device", cache_dir=str(tmp_path / "cache"))


def _batches(cfg: TrainConfig, device: str = "cpu", **options: int) -> DeviceBatches:
    return DeviceBatches.from_dataset(load_csv(cfg.train_set), cfg, torch.device(device), **options)


def test_device_batches_are_pk_batches_of_the_sampler(device_config: TrainConfig) -> None:
    batches = _batches(device_config)
    images, labels = batches.batch(3)
    assert images.shape == (8, 3, 64, 32) and images.dtype == torch.float32 and images.is_contiguous()
    sampler = batches.sampler
    np.testing.assert_array_equal(labels.numpy(), sampler.labels(sampler.batch(3)))
    again, _ = _batches(device_config).batch(3)
    torch.testing.assert_close(images, again, rtol=0, atol=0)
    assert not torch.equal(images, batches.batch(4)[0])
    assert [step for step, _, _ in batches.stream(4)] == [4, 5]


def test_unaugmented_device_batches_equal_the_cpu_path(device_config: TrainConfig) -> None:
    cfg = device_config.replace(crop_augment=False, flip_augment=False)
    batches = _batches(cfg)
    images, _ = batches.batch(0)
    dataset = load_csv(cfg.train_set)
    rng = np.random.default_rng(0)
    want = torch.stack([train_augment(load_image(Path(cfg.image_root) / dataset.fids[i]), rng, crop=False,
                                      flip=False, input_size=cfg.input_size, pre_crop_size=cfg.pre_crop_size)
                        for i in batches.sampler.batch(0)])
    torch.testing.assert_close(images, want, rtol=0, atol=1e-6)


class _Draws:
    """A stand-in for the CPU path's numpy generator that draws the given flip, then top, then left."""

    def __init__(self, flip: bool, top: int, left: int) -> None:
        self.flip, self.offsets = flip, [top, left]

    def random(self) -> float:
        return 0.0 if self.flip else 0.9  # train_augment flips when random() < 0.5

    def integers(self, low: int, high: int) -> int:
        return self.offsets.pop(0)


def _window(image: torch.Tensor, base: np.ndarray) -> tuple[bool, int, int]:
    """(flipped, top, left) of the crop of ``base`` (H0, W0, 3) that ``image`` (3, H, W) normalises."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = torch.round((image * std + mean) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    height, width = pixels.shape[:2]
    for flipped, top, left in itertools.product((False, True), range(base.shape[0] - height + 1),
                                                range(base.shape[1] - width + 1)):
        if np.array_equal((base[:, ::-1] if flipped else base)[top:top + height, left:left + width], pixels):
            return flipped, top, left
    raise AssertionError("the sample is no flip and crop of its image")


def test_augmented_device_batches_are_flips_and_crops_of_the_cpu_path(device_config: TrainConfig) -> None:
    """Each sample is exactly what the CPU path makes of its image for some flip and crop; all occur."""
    cfg, batches = device_config, _batches(device_config)
    fids, seen = load_csv(cfg.train_set).fids, set()
    for step in range(10):
        images, _ = batches.batch(step)
        for image, index in zip(images, batches.sampler.batch(step)):
            source = load_image(Path(cfg.image_root) / fids[index])
            draws = _window(image, resized(source, cfg.pre_crop_size))
            want = train_augment(source, _Draws(*draws), input_size=cfg.input_size,
                                 pre_crop_size=cfg.pre_crop_size)
            torch.testing.assert_close(image, want, rtol=0, atol=1e-6)
            seen.add(draws)
    assert {flipped for flipped, _, _ in seen} == {False, True}
    assert {top for _, top, _ in seen} == set(range(cfg.pre_crop_height - cfg.input_height + 1))
    assert {left for _, _, left in seen} == set(range(cfg.pre_crop_width - cfg.input_width + 1))


def test_each_worker_gets_its_share_of_the_global_batch(device_config: TrainConfig) -> None:
    images, labels = _batches(device_config).batch(2)
    for rank in range(2):
        mine, my_labels = _batches(device_config, rank=rank, world_size=2).batch(2)
        torch.testing.assert_close(mine, images[rank * 4:(rank + 1) * 4], rtol=0, atol=0)
        assert torch.equal(my_labels, labels[rank * 4:(rank + 1) * 4])


def test_auto_takes_the_device_path_for_caches_within_the_limit(tiny_config: TrainConfig) -> None:
    assert resolve_data_path(tiny_config, 48) == "device"  # 48 x 3 x 72 x 36 bytes, on a GPU or the CPU
    assert resolve_data_path(tiny_config.replace(cache_limit_gib=0.0), 48) == "cpu"
    assert resolve_data_path(tiny_config.replace(cache_limit_gib=48 * 3 * 72 * 36 / 2**30), 48) == "device"
    assert resolve_data_path(tiny_config.replace(cache_limit_gib=47 * 3 * 72 * 36 / 2**30), 48) == "cpu"
    assert resolve_data_path(tiny_config.replace(data_path="cpu"), 48) == "cpu"
    assert resolve_data_path(tiny_config.replace(data_path="device", cache_limit_gib=0.0), 48) == "device"


# ---------------------------------------------------------------- falling back


@pytest.mark.parametrize(("free", "used", "share", "fits"), [
    (80, 0, 1.0, True),  # 10 GiB cache + 16 GiB headroom in 80 GiB free
    (25, 0, 1.0, False),  # not in 25 GiB free
    (80, 0, 0.5, True),  # half of an 80 GiB GPU
    (80, 0, 0.25, False),  # not in a quarter
    (80, 20, 0.5, False),  # nor in the half this process already holds 20 GiB of
])
def test_a_cache_must_fit_the_share_of_the_gpu_it_holds(free: int, used: int, share: float,
                                                         fits: bool) -> None:
    got = cache_fits(10 * GIB, free=free * GIB, total=80 * GIB, used=used * GIB, headroom_gib=16, share=share)
    assert got == fits


def test_two_half_gpu_trials_checking_at_once_stay_within_the_gpu() -> None:
    """Both see the whole GPU free; each counts only its half, so they cannot both place 30 GiB + 16."""
    check = {"free": 80 * GIB, "total": 80 * GIB, "used": 0, "headroom_gib": 16}
    assert cache_fits(30 * GIB, **check) and not cache_fits(30 * GIB, **check, share=0.5)
    assert cache_fits(20 * GIB, **check, share=0.5)  # two of these fit: 2 x (20 + 16) <= 80


@pytest.fixture()
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """A GPU with 1 GiB free of 2 to the memory checks; the pinned copies shipped to it, recorded only."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GIB, 2 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    shipped: list[torch.Tensor] = []
    monkeypatch.setattr(gpu_data, "_moved", lambda tensor, device: shipped.append(tensor) or tensor)
    return shipped


def _failing_copies(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Copies to a GPU raise ``error``."""
    real = torch.Tensor.to

    def to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)


@pytest.mark.parametrize("cause", ["no room", "out of memory"])
def test_a_cache_that_does_not_fit_the_gpu_stays_in_host_memory(
    fake_gpu: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch, cause: str
) -> None:
    cache = np.arange(4 * 3 * 2 * 2, dtype=np.uint8).reshape(4, 3, 2, 2)
    _failing_copies(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 48 B"))
    told: list[Fallback] = []
    headroom = 1.5 if cause == "no room" else 0.0
    with pytest.warns(RuntimeWarning, match=f"{DATA_CACHE}: fallback to host memory") as caught:
        placed = place_cache(cache, torch.device("cuda", 0), headroom_gib=headroom, on_fallback=told.append)
    assert len(caught) == 1 and [f.feature for f in told] == [DATA_CACHE]
    assert ("OutOfMemoryError" in told[0].reason) == (cause == "out of memory")
    assert placed.device.type == "cpu" and np.shares_memory(placed.numpy(), cache)
    assert len(fake_gpu) == 1, "one pinned copy tried before training"


def test_a_failed_copy_that_is_not_memory_is_an_error(fake_gpu: list[torch.Tensor],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_copies(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        place_cache(np.zeros((4, 3, 2, 2), np.uint8), torch.device("cuda", 0), headroom_gib=0.0)


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("CUDA error: out of memory (cudaHostAlloc)"),
    OSError(errno.ENOMEM, "Cannot allocate memory"),
])
def test_a_cache_that_cannot_be_held_falls_back_to_the_dataloader(
    device_config: TrainConfig, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Unpinned (pinned copies may be what failed); its batches are the cpu path's."""
    def failing(*args: object, **kwargs: object) -> DeviceBatches:
        raise error

    monkeypatch.setattr(DeviceBatches, "from_dataset", failing)
    dataset, told = load_csv(device_config.train_set), []
    for device in ("cpu", "cuda"):
        with pytest.warns(RuntimeWarning, match=f"{DATA_CACHE}: fallback to the cpu path's DataLoader"):
            source = open_batches(dataset, device_config, torch.device(device), on_fallback=told.append)
        assert source.keywords["pin"] is False
    assert [f.feature for f in told] == [DATA_CACHE, DATA_CACHE]
    assert "other augmentation draws" in told[0].instead  # a resume on the other path is not the same run
    step, images, labels = next(source(2))
    _, want_images, want_labels = PKBatches(dataset, device_config)[2]
    assert step == 2 and torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_a_cache_that_cannot_be_read_is_an_error(device_config: TrainConfig,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only memory or room runs out on the device path alone; a bad file would fail the cpu path too."""
    def failing(*args: object, **kwargs: object) -> DeviceBatches:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(DeviceBatches, "from_dataset", failing)
    with pytest.raises(OSError, match="Input/output error"):
        open_batches(load_csv(device_config.train_set), device_config, torch.device("cpu"))


@pytest.mark.parametrize(("data", "message"), [
    ({"data_path": "gpu"}, "data_path='gpu': must be one of auto, cpu, device"),
    ({"cache_headroom_gib": -1}, "cache_headroom_gib=-1.0: must be >= 0"),
    ({"cuda_graph": "yes"}, "cuda_graph='yes': expected"),
])
def test_bad_speed_options_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ReidTuneError, match=message):
        config_from_dict(data)


def test_a_cuda_graph_needs_a_gpu(tiny_config: TrainConfig, tmp_path: Path) -> None:
    with pytest.raises(ReidTuneError, match="cuda_graph=True: needs a CUDA device"):
        train(tiny_config.replace(cuda_graph=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- training


def test_eager_step_is_plain_pytorch(tiny_config: TrainConfig) -> None:
    """The eager step (cuda_graph=False) is forward, triplet loss, backward and Adam at the given lr."""
    cfg = tiny_config.replace(cuda_graph=False)
    step = build_step(cfg, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.network, cfg.head, embedding_dim=cfg.embedding_dim)
    adam = torch.optim.Adam(model.parameters(), lr=1.0)
    loss_fn = TripletLoss(margin=cfg.margin, precision_k=cfg.batch_k - 1)
    gen = torch.Generator().manual_seed(1)
    for lr in (3e-4, 1e-4):
        images, labels = torch.randn(8, 3, 64, 32, generator=gen), torch.arange(4).repeat_interleave(2)
        stats = step(images, labels, lr)
        loss, want = loss_fn(model(images), labels)
        adam.zero_grad()
        loss.backward()
        adam.param_groups[0]["lr"] = lr
        adam.step()
        assert stats["loss_mean"] == want["loss_mean"]
    for got, ref in zip(step.model.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_rolled_back_warm_up_leaves_no_trace(tiny_config: TrainConfig) -> None:
    """The graph's warm-up steps are undone: training after them equals training without them."""
    images, labels = torch.randn(8, 3, 64, 32), torch.arange(4).repeat_interleave(2)
    plain, warmed = build_step(tiny_config, torch.device("cpu")), build_step(tiny_config, torch.device("cpu"))
    plain(images, labels, 3e-4)
    for step in (plain, warmed):  # a fresh optimizer (state created inside) and a used one
        with rolled_back(step.model, step.optimizer):
            for _ in range(3):
                step(images.flip(0), labels, 1e-2)
    assert warmed.optimizer.state, "the warm-up should have created Adam's state"
    warmed(images, labels, 3e-4)
    for step in (plain, warmed):
        step(images, labels, 2e-4)
    for a, b in zip(plain.model.state_dict().values(), warmed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- GPU only


@pytest.fixture()
def same_kernels() -> Iterator[None]:
    """cuDNN's deterministic algorithms, chosen by heuristics: two runs of one step give the same numbers."""
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = before


@needs_cuda
def test_host_and_device_caches_give_the_same_batches(device_config: TrainConfig) -> None:
    on_gpu = _batches(device_config, "cuda")
    with pytest.warns(RuntimeWarning, match=f"{DATA_CACHE}: fallback to host memory"):
        in_host = _batches(device_config.replace(cache_headroom_gib=1e9), "cuda")
    assert on_gpu.images.is_cuda and not in_host.images.is_cuda
    for step in (0, 7):
        a, b = on_gpu.batch(step), in_host.batch(step)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert torch.equal(a[1], b[1]) and a[0].is_cuda and a[1].is_cuda


@needs_cuda
@pytest.mark.parametrize(("precision", "loss"), [("fp32", "batch_hard"), ("bf16", "batch_hard"),
                                                 ("fp32", "batch_all")])
def test_graphed_step_equals_the_eager_step(tiny_config: TrainConfig, precision: str, loss: str,
                                            same_kernels: None) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = tiny_config.replace(device="cuda", precision=precision, loss=loss)
    graphed, eager = build_step(cfg, device), build_step(cfg.replace(cuda_graph=False), device)
    torch.backends.cudnn.benchmark = False  # build_step turned autotuning on: its picks may differ per run
    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.arange(4, device=device).repeat_interleave(2)
    for lr in (3e-4, 2e-4, 1e-4, 5e-5):
        images = torch.randn(8, 3, 64, 32, generator=gen, device=device)
        a, b = graphed(images, labels, lr), eager(images, labels, lr)
        torch.testing.assert_close(a["loss_mean"], b["loss_mean"], rtol=1e-3, atol=1e-5)
    assert graphed.graphed and graphed.fallback is None and not eager.graphed
    for x, y in zip(graphed.model.state_dict().values(), eager.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=2e-3)


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("data_path", ["device", "cpu"])
def test_graphed_run_resumes_exactly(device_config: TrainConfig, tmp_path: Path, data_path: str,
                                     same_kernels: None) -> None:
    cfg = device_config.replace(device="cuda", precision="fp32", data_path=data_path)
    whole = train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "cut", callback=InterruptAt(4))
    resumed = train(None, tmp_path / "cut", resume=True)
    a, b = weights(whole.checkpoint), weights(resumed.checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@needs_cuda
def test_cuda_graph_captures_while_the_dataloader_pins_batches(device_config: TrainConfig) -> None:
    """The cpu path's pin-memory thread copies during the capture (thread-local capture errors)."""
    cfg = device_config.replace(device="cuda", data_path="cpu", num_workers=2, train_iterations=4)
    record = RecordFallbacks()
    train(cfg, Path(device_config.cache_dir).parent / "run", callback=record)
    assert record.fallbacks == []


@needs_cuda
@pytest.mark.slow
def test_compiled_network_in_a_graph_trains(tiny_config: TrainConfig) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    step = build_step(tiny_config.replace(device="cuda", compile=True), device)
    step.distribute()
    images = torch.randn(8, 3, 64, 32, device=device)
    labels = torch.arange(4, device=device).repeat_interleave(2)
    losses = [float(step(images, labels, 1e-3)["loss_mean"]) for _ in range(5)]
    assert step.graph is not None and losses[-1] < losses[0]

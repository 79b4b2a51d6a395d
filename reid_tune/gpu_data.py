"""The device data path: the training set decoded once into a uint8 cache, PK batches augmented on the device.

Decoding Market-1501's JPEGs costs about one CPU core per 5,000 images/s, more than a fast GPU step
leaves, and on a CPU-only machine the decoding workers take cores from the step itself. So every image
is decoded and resized to the pre-crop size once, into a node-local ``.npy`` file that concurrent
trials build once (under a file lock, written atomically) and then map. A GPU trial holds the cache on
its GPU (or, when that lacks room, in host memory, shipping uint8 batches); a CPU trial maps the file.
Trials sharing a GPU each count only their share of its memory; a cache that does not fit stays in host
memory, and one that cannot be built or mapped gives way to the cpu path (each a warned :class:`Fallback`).
Each PK batch is gathered, flipped, cropped and normalised by a few tensor operations on the device:
no decoding per step. The pixels equal the CPU path's for the same flip and crop, but the random draws
come from a torch generator seeded by (seed, step), not numpy's per-image streams: a run keeps one path
throughout (``TrainConfig.data_path``), so resume stays exact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from reid_tune.atomic import atomic_path, remove_stale_temps
from reid_tune.augmentation import batch_train_augment, resized
from reid_tune.config import TrainConfig
from reid_tune.datasets import ReidDataset, load_image
from reid_tune.devices import DATA_CACHE, OnFallback, fall_back
from reid_tune.errors import ReidTuneError
from reid_tune.sampler import PKSampler, shard_batch

CACHE_ENV = "REID_TUNE_CACHE"  # overrides the default cache folder, like cfg.cache_dir
CACHE_FORMAT = 1  # part of every cache key: bump when the file layout or the resize changes
GIB = 2**30


# ---------------------------------------------------------------- choosing the path


def cache_folder(cache_dir: str) -> Path:
    """``cache_dir``, else ``$REID_TUNE_CACHE``, else ``~/.cache/reid-tune``: node-local, shared by trials."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reid-tune")


def cache_image_size(cfg: TrainConfig) -> tuple[int, int]:
    """(H, W) the cache stores: what the CPU path resizes to, so the device only flips and crops."""
    return cfg.pre_crop_size if cfg.crop_augment else cfg.input_size


def cache_bytes(num_images: int, size: tuple[int, int]) -> int:
    """Bytes of a uint8 (N, 3, H, W) cache."""
    return num_images * 3 * size[0] * size[1]


def resolve_data_path(cfg: TrainConfig, num_images: int) -> str:
    """``cpu`` or ``device``; ``auto`` is ``device`` (on a GPU and on the CPU) when the cache is at most
    ``cache_limit_gib``. A function of the options and the set's size only, so a resumed run takes the same
    path.
    """
    if cfg.data_path != "auto":
        return cfg.data_path
    return "device" if cache_bytes(num_images, cache_image_size(cfg)) <= cfg.cache_limit_gib * GIB else "cpu"


# ---------------------------------------------------------------- the decoded cache


def decode_cache(fids: Sequence[str] | np.ndarray, image_root: str | Path, size: tuple[int, int], *,
                 cache_dir: str | Path, workers: int = 0) -> np.ndarray:
    """Every image of ``fids`` resized to ``size`` (H, W), as a read-mapped uint8 array (N, 3, H, W).

    The first caller on a node decodes (``workers`` threads, 0 = one per available core) into
    ``cache_dir``; callers at the same time wait for it, later ones just map the file. The file is
    keyed by the list, the size and each image's size and mtime, so a changed image makes a new one.
    """
    folder = Path(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReidTuneError(f"cache_dir={str(folder)!r}: cannot create it ({err.strerror})") from None
    key = _cache_key(fids, Path(image_root), size)
    path = folder / f"{key}.npy"
    if not path.exists():
        with _locked(folder / f"{key}.lock"):
            if not path.exists():  # another process may have built it while we waited
                _build(path, fids, Path(image_root), size, workers=workers or len(os.sched_getaffinity(0)))
    return np.load(path, mmap_mode="c")  # copy-on-write: writable for torch, pages shared between trials


def _cache_key(fids: Sequence[str] | np.ndarray, root: Path, size: tuple[int, int]) -> str:
    """A hash of the format, root, size and every file's name, byte size and modification time."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{root.resolve()}|{size[0]}x{size[1]}".encode())
    for fid in fids:
        stat = (root / fid).stat()
        digest.update(f"|{fid}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return f"{len(fids)}x3x{size[0]}x{size[1]}-{digest.hexdigest()[:24]}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` while the block runs (released by the kernel if we die)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(path: Path, fids: Sequence[str] | np.ndarray, root: Path, size: tuple[int, int], *,
           workers: int) -> None:
    """Decode into a temporary file beside ``path``, then rename it: readers never see a partial cache."""
    remove_stale_temps(path)  # left by a builder that was killed (we hold the cache's lock)
    with atomic_path(path) as temp:
        cache = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8, shape=(len(fids), 3, *size))
        _decode_all(cache, fids, root, size, workers=workers)
        cache.flush()
        del cache  # unmapped before the rename


def _decode_all(cache: np.ndarray, fids: Sequence[str] | np.ndarray, root: Path, size: tuple[int, int], *,
                workers: int) -> None:
    """Every row of the cache, decoded in ``workers`` threads (PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda i: _decode_into(cache, i, root / fids[i], size), range(len(fids))))  # raises


def _decode_into(cache: np.ndarray, index: int, path: Path, size: tuple[int, int]) -> None:
    """Row ``index`` of the cache: the image resized exactly as the CPU path resizes it, channels first."""
    cache[index] = resized(load_image(path), size).transpose(2, 0, 1)


def cache_fits(nbytes: int, *, free: int, total: int, used: int, headroom_gib: float,
               share: float = 1.0) -> bool:
    """Whether a cache of ``nbytes`` leaves ``headroom_gib`` free in this process's part of a GPU.

    ``free``/``total``: the GPU's memory; ``used``: what this process holds there already. A process
    that holds a ``share`` of the GPU (Ray's fractional ``gpus_per_worker``) counts only that share, so
    trials that share a GPU and check at the same time cannot each take the same free memory.
    """
    room = min(free, total * share - used)
    return nbytes + headroom_gib * GIB <= room


def place_cache(cache: np.ndarray, device: torch.device, *, headroom_gib: float, share: float = 1.0,
                on_fallback: OnFallback | None = None) -> torch.Tensor:
    """The cache as a tensor on ``device`` if it fits there (:func:`cache_fits`), else in host memory.

    The host copy is the mapped file itself, shared between the trials of a node through the page
    cache; each batch is then gathered on the host and shipped as uint8 through pinned memory.
    """
    host = torch.from_numpy(cache)
    if device.type != "cuda":
        return host
    free, total = torch.cuda.mem_get_info(device)
    if not cache_fits(cache.nbytes, free=free, total=total, used=torch.cuda.memory_reserved(device),
                      headroom_gib=headroom_gib, share=share):
        room = f"{share:.0%} of {device}'s {total / GIB:.0f} GiB, {free / GIB:.1f} GiB free"
        cause = f"a {cache.nbytes / GIB:.2f} GiB cache would leave less than {headroom_gib:g} GiB of {room}"
        return _in_host_memory(host, device, cause, on_fallback)
    try:
        return host.to(device)
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError, or an allocation's "out of memory"
        if "out of memory" not in str(err):
            raise
        return _in_host_memory(host, device, err, on_fallback)


def _in_host_memory(host: torch.Tensor, device: torch.device, cause: BaseException | str,
                    on_fallback: OnFallback | None) -> torch.Tensor:
    """``host``, once warned why it is not on ``device`` and one pinned copy of it was made.

    A failed pinned copy raises here, before training, for the caller to fall back to the cpu path.
    """
    fall_back(DATA_CACHE, "host memory", cause, on_fallback)
    _moved(host[:1], device)
    return host


# ---------------------------------------------------------------- batches


def step_seed(seed: int, step: int) -> int:
    """The augmentation generator's seed for ``step``: well mixed, a pure function of (seed, step)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; host-to-GPU copies go through pinned memory and do not block."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DeviceBatches:
    """Batch ``step`` (augmented images on ``device``, labels) gathered from a uint8 cache tensor.

    A pure function of (seed, step) whatever the worker count: the whole PK batch is augmented with
    one generator seeded by :func:`step_seed`, and worker ``rank`` keeps its identities' share.
    """

    def __init__(self, images: torch.Tensor, pids: Sequence[str] | np.ndarray, cfg: TrainConfig,
                 device: torch.device, *, rank: int = 0, world_size: int = 1) -> None:
        self.images, self.cfg, self.device = images, cfg, device
        self.sampler = PKSampler(pids, cfg.batch_p, cfg.batch_k, seed=cfg.seed)
        share = shard_batch(np.arange(cfg.batch_size), batch_p=cfg.batch_p, batch_k=cfg.batch_k,
                            rank=rank, world_size=world_size)
        self.share = slice(int(share[0]), int(share[-1]) + 1)  # identity-major: one contiguous run
        self.generator = torch.Generator(device=device)

    @classmethod
    def from_dataset(cls, dataset: ReidDataset, cfg: TrainConfig, device: torch.device, *, rank: int = 0,
                     world_size: int = 1, gpu_share: float = 1.0,
                     on_fallback: OnFallback | None = None) -> DeviceBatches:
        """Decode (or map) the node's cache of ``dataset``; place it for ``device`` (:func:`place_cache`)."""
        cache = decode_cache(dataset.fids, cfg.image_root, cache_image_size(cfg),
                             cache_dir=cache_folder(cfg.cache_dir))
        images = place_cache(cache, device, headroom_gib=cfg.cache_headroom_gib, share=gpu_share,
                             on_fallback=on_fallback)
        return cls(images, dataset.pids, cfg, device, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return self.cfg.train_iterations

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images (B, 3, H, W) and int64 labels (B,), both on the device."""
        cfg, indices = self.cfg, self.sampler.batch(step)
        uint8 = self.images.index_select(0, _moved(torch.from_numpy(indices), self.images.device))
        self.generator.manual_seed(step_seed(cfg.seed, step))
        images = batch_train_augment(_moved(uint8, self.device), self.generator, input_size=cfg.input_size,
                                     pre_crop_size=cfg.pre_crop_size, crop=cfg.crop_augment,
                                     flip=cfg.flip_augment, erasing=cfg.random_erasing)
        labels = _moved(torch.from_numpy(self.sampler.labels(indices)), self.device)
        return images[self.share], labels[self.share]

    def stream(self, start: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, images, labels) for steps ``start .. train_iterations-1``, as the DataLoader path yields."""
        return ((step, *self.batch(step)) for step in range(start, len(self)))

"""Embedding a data set with a trained network, written in triplet-reid's HDF5 layout (or its CSV)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from reid_tune.atomic import atomic_path
from reid_tune.augmentation import AGGREGATE, Preprocessing, view_names
from reid_tune.config import TrainConfig
from reid_tune.datasets import load_csv, load_image
from reid_tune.errors import InputError
from reid_tune.vocabulary import AGGREGATORS, EMBED_FORMATS, choose


class _Views(torch.utils.data.Dataset):
    """Item i: every test-time view of image i, (V, 3, H, W)."""

    def __init__(
        self, paths: list[Path], prep: Preprocessing, crop_augment: str | None, flip_augment: bool
    ) -> None:
        self.paths, self.prep = paths, prep
        self.crop_augment, self.flip_augment = crop_augment, flip_augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.prep.views(load_image(self.paths[i]), crop_augment=self.crop_augment,
                               flip_augment=self.flip_augment)


def embeds_in_bf16(cfg: TrainConfig, device: str | torch.device) -> bool:
    """Whether a run's network embeds under bf16 autocast: on a GPU, unless it trained in exact fp32."""
    return torch.device(device).type == "cuda" and cfg.precision != "fp32"


@torch.no_grad()
def embed_images(model: torch.nn.Module, paths: list[Path], prep: Preprocessing, *,
                 crop_augment: str | None = None, flip_augment: bool = False, batch_size: int = 256,
                 num_workers: int = 2, device: str | torch.device = "cpu", bf16: bool = False) -> np.ndarray:
    """Embeddings of every view of every image, float32 (V, N, D), preprocessed by ``prep``. ``model`` is
    a network or an exported one (:mod:`reid_tune.export`): any module from images to embeddings."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        _Views(paths, prep, crop_augment, flip_augment), batch_size=batch_size, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    model = model.to(device).eval()
    out = []
    for views in loader:
        b, v = views.shape[:2]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = model(views.flatten(0, 1).to(device, non_blocking=True))  # (B*V, D)
        out.append(emb.float().view(b, v, -1).cpu())
    if not out:
        raise InputError("embed: the data set is empty")
    return torch.cat(out).transpose(0, 1).numpy()  # (V, N, D)


def aggregate(views: np.ndarray, aggregator: str | None) -> np.ndarray:
    """One embedding per image: the only view, or the views combined (``mean`` unless told otherwise)."""
    if len(views) == 1:
        return views[0]
    return np.asarray(AGGREGATE[aggregator or "mean"](views), np.float32)


def write_h5(path: Path, views: np.ndarray, names: list[str], aggregator: str | None) -> None:
    """triplet-reid's layout: ``emb`` [N, D]; with several views also ``emb_aug`` [A, N, D]; always
    ``augmentation_types``. Written to a temporary file first, so no half-written output remains."""
    emb = aggregate(views, aggregator)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        if len(views) > 1:
            f.create_dataset("emb_aug", data=views)
        f.create_dataset("emb", data=emb)
        f.create_dataset("augmentation_types", data=np.asarray(names, dtype="S"))


def write_csv_embeddings(path: Path, fids: np.ndarray, emb: np.ndarray) -> None:
    """``path,v1,v2,...`` per image, as triplet-reid's trinet_embed.py printed them."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for fid, row in zip(fids, emb):
            f.write(f"{fid}," + ",".join(f"{x:.8e}" for x in row) + "\n")


def embed_dataset(model: torch.nn.Module, prep: Preprocessing, dataset_csv: str | Path,
                  image_root: str | Path, out: str | Path, *, crop_augment: str | None = None,
                  flip_augment: bool = False, aggregator: str | None = None, batch_size: int = 256,
                  fmt: str = "h5", num_workers: int = 2, device: str | torch.device = "cpu",
                  bf16: bool = False) -> Path:
    """Embed every image of a triplet-reid CSV into ``out`` (HDF5 or CSV); returns ``out``."""
    choose("format", fmt, EMBED_FORMATS)
    if aggregator is not None:
        choose("aggregator", aggregator, AGGREGATORS)
    dataset = load_csv(dataset_csv, image_root=image_root, check_images=True)
    paths = [Path(image_root) / fid for fid in dataset.fids]
    views = embed_images(model, paths, prep, crop_augment=crop_augment, flip_augment=flip_augment,
                         batch_size=batch_size, num_workers=num_workers, device=device, bf16=bf16)
    names = view_names(crop_augment=crop_augment, flip_augment=flip_augment)
    out = Path(out)
    if fmt == "csv":
        write_csv_embeddings(out, dataset.fids, aggregate(views, aggregator))
    else:
        write_h5(out, views, names, aggregator)
    return out

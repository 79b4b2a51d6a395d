"""Datasets and converters in triplet-reid's CSV format.

A data set is a header-less CSV with one ``pid,relative/path`` row per image; the paths are
relative to an image root. Person ids stay strings exactly as written ('0002', '-1' junk,
'0000' distractors), because the Market-1501 evaluation compares them as strings.
The converters write the lists triplet-reid shipped for Market-1501 and DukeMTMC-reID, a
cross-camera protocol for CUHK03, and one list for a folder-per-identity tree.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from reid_tune.atomic import write_text, write_texts
from reid_tune.errors import ConfigError, InputError
from reid_tune.vocabulary import CONVENTIONS, DATASET_KINDS, choose, one_line

# Matched against the file name without its last extension, as triplet-reid's excluders do:
# Market's real '1488_c1s6_023021_00.jpg.jpg' becomes '1488_c1s6_023021_00.jpg' and still matches.
_NAME_PATTERNS = {
    "market1501": re.compile(r"(\S+)_c(\d+)s(\d+)_.*"),
    "duke": re.compile(r"(\S+)_c(\d+)_.*"),
    "cuhk03": re.compile(r"(\S+)_(0\d)"),
}
# CUHK03 slots 00-04 are camera A (0), slots 05-09 camera B (1).
_CUHK03_SLOTS_PER_CAMERA = 5

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp"}
)

# What PIL raises on a missing, truncated or foreign file.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

_BOUNDING_BOX_SPLITS = (("train", "bounding_box_train"), ("query", "query"), ("test", "bounding_box_test"))


@dataclass(frozen=True, eq=False)
class ReidDataset:
    """Person ids and image paths (both string arrays), and the CSV they came from, for messages."""

    pids: np.ndarray
    fids: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if len(self.pids) != len(self.fids):
            raise ConfigError(f"{self.source}: {len(self.pids)} pids but {len(self.fids)} fids")

    def __len__(self) -> int:
        return len(self.fids)


# Loading and writing lists
###


def load_csv(
    csv_path: str | Path, *, image_root: str | Path | None = None, check_images: bool = False
) -> ReidDataset:
    """Read a ``pid,path`` CSV; with ``check_images`` every image must open (under ``image_root``,
    by default the CSV's folder), so a bad row fails here rather than hours into training."""
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"{path}: file not found, expected a 'pid,path' CSV")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text at byte {exc.start}, expected a 'pid,path' CSV"
        ) from None
    rows = [_parse_row(line, where=f"{path}:{n}") for n, line in enumerate(_lines(text), start=1)]
    if not rows:
        raise InputError(f"{path}: no rows, expected one 'pid,path' row per image")
    pids, fids = zip(*rows)
    dataset = ReidDataset(np.array(pids), np.array(fids), str(path))
    if check_images:
        _check_images(dataset, Path(image_root) if image_root is not None else path.parent)
    return dataset


def _lines(text: str) -> list[str]:
    """Lines of ``text`` without their '\\n' or '\\r\\n' ending; a final newline adds no line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _parse_row(line: str, *, where: str) -> tuple[str, str]:
    """One ``pid,path`` row, or an error naming ``where`` (file:line) and the offending text."""
    fields = line.split(",")
    if len(fields) != 2:
        raise InputError(f"{where}: expected 'pid,path', got {line!r}")
    pid, fid = (field.strip() for field in fields)
    if not pid or not fid:
        raise InputError(f"{where}: empty {'pid' if not pid else 'path'} in {line!r}, expected 'pid,path'")
    return pid, fid


def _check_images(dataset: ReidDataset, image_root: Path) -> None:
    """Raise naming the CSV row of the first image that is missing or does not open."""
    for row, fid in enumerate(dataset.fids, start=1):
        problem = _image_problem(image_root / fid)
        if problem:
            raise InputError(f"{dataset.source}:{row}: image {image_root / fid}: {problem}")


def _image_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image, or None: a cheap header check, no decoding."""
    if not path.is_file():
        return "not found"
    try:
        with Image.open(path) as image:
            image.verify()
    except _PIL_ERRORS as exc:
        return f"not readable as an image ({one_line(exc)})"
    return None


def check_trainable(dataset: ReidDataset, *, min_images: int = 2) -> None:
    """Every identity needs ``min_images`` images: batch-hard triplets need a positive pair."""
    pids = dataset.pids.tolist()
    counts = Counter(pids)
    for row, (pid, fid) in enumerate(zip(pids, dataset.fids), start=1):
        if counts[pid] < min_images:
            raise InputError(
                f"{dataset.source}:{row}: identity {pid!r} has {counts[pid]} image(s) ({fid}), "
                f"expected at least {min_images} to train on"
            )


def write_csv(path: str | Path, pids: Sequence[str] | np.ndarray, fids: Sequence[str] | np.ndarray) -> None:
    """Write a ``pid,path`` CSV atomically ."""
    write_text(path, _csv_text(pids, fids, name=str(path)))


def _csv_text(pids: Sequence[str] | np.ndarray, fids: Sequence[str] | np.ndarray, *, name: str) -> str:
    """The CSV text, refusing values the comma-separated format cannot hold."""
    if len(pids) != len(fids):
        raise InputError(f"{name}: {len(pids)} pids but {len(fids)} paths, expected one pid per path")
    for row, (pid, fid) in enumerate(zip(pids, fids), start=1):
        for value in (str(pid), str(fid)):
            if not value or any(char in value for char in ",\r\n"):
                raise InputError(
                    f"{name}:{row}: cannot write {value!r}, expected a non-empty value without ','"
                    " or newlines"
                )
    return "".join(f"{pid},{fid}\n" for pid, fid in zip(pids, fids))


# Images and camera conventions
###


def load_image(path: str | Path) -> Image.Image:
    """Decode an image as RGB (grayscale PGM faces included), or raise naming the path."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except _PIL_ERRORS as exc:
        raise InputError(
            f"{path}: cannot read image ({one_line(exc)}), expected a JPEG/PNG/PGM file"
        ) from None


def _check_convention(convention: str) -> None:
    choose("convention", convention, CONVENTIONS)


def _parse_names(fids: Sequence[str] | np.ndarray, convention: str) -> list[re.Match[str]]:
    """Match every file name (no folder, no last extension) against ``convention``'s pattern."""
    pattern = _NAME_PATTERNS[convention]
    matches = []
    for fid in fids:
        name = os.path.splitext(os.path.basename(fid))[0]
        match = pattern.fullmatch(name)
        if match is None:
            raise InputError(
                f"{fid}: file name {name!r} does not match the {convention} convention {pattern.pattern!r}"
            )
        matches.append(match)
    return matches


def camera_ids(fids: Sequence[str] | np.ndarray, convention: str) -> np.ndarray:
    """Camera of each image (int64) read from its file name; -1 for every image under 'none'."""
    _check_convention(convention)
    if convention == "none":
        return np.full(len(fids), -1, dtype=np.int64)
    cameras = [int(match.group(2)) for match in _parse_names(fids, convention)]
    if convention == "cuhk03":
        cameras = [slot // _CUHK03_SLOTS_PER_CAMERA for slot in cameras]
    return np.array(cameras, dtype=np.int64)


def pids_from_names(fids: Sequence[str] | np.ndarray, convention: str) -> np.ndarray:
    """Person id of each image as written in its file name ('0002', '-1', '0000')."""
    _check_convention(convention)
    if convention == "none":
        raise InputError(
            "camera convention 'none' has no person ids in file names, expected market1501, duke or cuhk03"
        )
    return np.array([match.group(1) for match in _parse_names(fids, convention)], dtype=str)


# Converters
###


def prepare(kind: str, src: str | Path, out: str | Path) -> list[Path]:
    """Write the CSV lists of the data set at ``src`` into ``out``; all of them or, on any error, none."""
    choose("kind", kind, DATASET_KINDS)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InputError(f"{src}: no such folder, expected the unpacked {kind} data set")
    lists = _CONVERTERS[kind](src)
    paths = [out / name for name in lists]
    write_texts({out / name: _csv_text(ds.pids, ds.fids, name=name) for name, ds in lists.items()})
    return paths


def _image_fids(src: Path, sub: str) -> np.ndarray:
    """Sorted paths (relative to ``src``) of the readable images directly in ``src/sub``."""
    folder = src / sub
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder, expected a folder of images")
    names = sorted(entry.name for entry in os.scandir(folder) if _is_image(entry))
    if not names:
        endings = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError(f"{folder}: no images, expected files ending in {endings}")
    for name in names:
        problem = _image_problem(folder / name)
        if problem:
            raise InputError(f"{folder / name}: {problem}")
    return np.array([f"{sub}/{name}" if sub else name for name in names], dtype=str)


def _is_image(entry: os.DirEntry[str]) -> bool:
    return entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS


def _sub_folders(src: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``src``."""
    return sorted(
        entry.name for entry in os.scandir(src) if entry.is_dir() and not entry.name.startswith(".")
    )


def _named(fids: np.ndarray, convention: str, name: str) -> ReidDataset:
    """A list whose person ids come from the file names."""
    return ReidDataset(pids_from_names(fids, convention), fids, name)


def _subset(dataset: ReidDataset, keep: np.ndarray, name: str) -> ReidDataset:
    """The rows selected by ``keep``; an empty selection is an error naming the list."""
    if not keep.any():
        raise InputError(
            f"{name}: no images would be listed (from {dataset.source}), expected at least one"
        )
    return ReidDataset(dataset.pids[keep], dataset.fids[keep], name)


def _bounding_box_lists(src: Path, *, prefix: str, convention: str) -> dict[str, ReidDataset]:
    """triplet-reid's train/query/test lists of a Market-1501 style tree, junk and distractors kept."""
    lists = {
        f"{prefix}_{split}.csv": _named(_image_fids(src, sub), convention, f"{prefix}_{split}.csv")
        for split, sub in _BOUNDING_BOX_SPLITS
    }
    check_trainable(lists[f"{prefix}_train.csv"])
    return lists


def _market1501(src: Path) -> dict[str, ReidDataset]:
    return _bounding_box_lists(src, prefix="market1501", convention="market1501")


def _duke(src: Path) -> dict[str, ReidDataset]:
    return _bounding_box_lists(src, prefix="dukeMTMC", convention="duke")


def _cuhk03_splits(src: Path) -> list[tuple[str, str]]:
    """(split name, sub-folder) pairs: the images in ``src`` itself ('all'), else one per sub-folder."""
    has_images = any(_is_image(entry) for entry in os.scandir(src))
    subs = _sub_folders(src)
    if has_images and subs:
        raise InputError(
            f"{src}: holds both images and sub-folders ({', '.join(subs)}), expected one or the other"
        )
    if has_images:
        return [("all", "")]
    if not subs:
        raise InputError(f"{src}: no images and no split sub-folders, expected PPPP_NN.jpg files")
    return [(sub, sub) for sub in subs]


def _cuhk03(src: Path) -> dict[str, ReidDataset]:
    """Per split: all images (to train on), camera A as queries, camera B as the gallery."""
    lists = {}
    for split, sub in _cuhk03_splits(src):
        everything = _named(_image_fids(src, sub), "cuhk03", f"cuhk03_{split}.csv")
        check_trainable(everything)
        cameras = camera_ids(everything.fids, "cuhk03")
        lists[everything.source] = everything
        for camera, role in ((0, "query"), (1, "gallery")):
            name = f"cuhk03_{split}_{role}.csv"
            lists[name] = _subset(everything, cameras == camera, name)
    return lists


def _folder(src: Path) -> dict[str, ReidDataset]:
    """One list for a tree with one sub-folder of images per identity (pid = sub-folder name)."""
    name = f"{src.resolve().name}.csv"
    identities = _sub_folders(src)
    if not identities:
        raise InputError(f"{src}: no sub-folders, expected one sub-folder of images per identity")
    fids = [_image_fids(src, identity) for identity in identities]
    pids = np.concatenate([np.full(len(group), identity) for identity, group in zip(identities, fids)])
    dataset = ReidDataset(pids.astype(str), np.concatenate(fids), name)
    check_trainable(dataset)
    return {name: dataset}


_CONVERTERS: dict[str, Callable[[Path], dict[str, ReidDataset]]] = {  # vocabulary.DATASET_KINDS
    "market1501": _market1501,
    "duke": _duke,
    "cuhk03": _cuhk03,
    "folder": _folder,
}

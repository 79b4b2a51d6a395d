"""Image preprocessing with triplet-reid's semantics (train.py's crop/flip, embed.py's test-time views).

Images become float (3, H, W) tensors normalised with torchvision's ImageNet mean/std. Training
randomness comes only from an explicit generator, so a resumed run sees the same pixels. As in
triplet-reid, a flip applies to the whole pre-crop image and the crop is taken afterwards. Random
erasing (Zhong et al. 2017, as BoT) then blanks a box of the crop to the mean pixel, alike on both paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reid_tune.errors import ConfigError
from reid_tune.vocabulary import CROP_AUGMENTS, choose, is_int

if TYPE_CHECKING:
    from reid_tune.config import TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Random erasing as BoT's RandomErasing: a box of area U(0.02, 0.4) of the image and aspect U(0.3, 1/0.3),
# the first of the attempts that fits. BoT tries up to 100 times; both paths here try ERASE_ATTEMPTS (a
# fixed count, so the device path draws fixed-size tensors): at 256x128 about 1 in 10^4 images then stays
# unerased where BoT would find a box. The box becomes 0 after normalisation: the ImageNet mean pixel.
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = 0.3
ERASE_ATTEMPTS = 10

# crop_augment -> embed.py's view suffixes, in its order.
_CROP_VIEWS = {
    None: ("_resize",),
    "center": ("_center",),
    "five": ("_center", "_top_left", "_top_right", "_bottom_left", "_bottom_right"),
    "avgpool": ("_avgpool",),
}

# crop view -> (row, col) offset in halves of the margin (image size - crop size), as embed.py's
# five_crops: the centre is floor(margin / 2). Views not listed use the whole image.
_CROP_ANCHORS = {
    "_center": (1, 1),
    "_top_left": (0, 0),
    "_top_right": (0, 2),
    "_bottom_left": (2, 0),
    "_bottom_right": (2, 2),
}

Size = tuple[int, int]
# aggregators take and return numpy arrays (as triplet-reid's) or torch tensors alike
Embeddings = TypeVar("Embeddings", np.ndarray, torch.Tensor)


# --- checks and conversions ------------------------------------------------------------------------


def _check_size(name: str, size: Sequence[int]) -> Size:
    """``size`` as an (H, W) tuple of positive ints, else a one-line ``ConfigError``."""
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or any(not is_int(s) or s <= 0 for s in size)
    ):
        raise ConfigError(f"{name}={size!r}: expected (height, width), two positive integers")
    return int(size[0]), int(size[1])


def _check_sizes(input_size: Sequence[int], pre_crop_size: Sequence[int], *, crop: bool) -> tuple[Size, Size]:
    """Validated (input_size, pre_crop_size); cropping needs a pre-crop image at least as big as the input."""
    input_hw = _check_size("input_size", input_size)
    pre_crop_hw = _check_size("pre_crop_size", pre_crop_size)
    if crop and (pre_crop_hw[0] < input_hw[0] or pre_crop_hw[1] < input_hw[1]):
        raise ConfigError(f"pre_crop_size={pre_crop_hw}: must be at least input_size={input_hw} to crop from")
    return input_hw, pre_crop_hw


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Pixel values in [0, 255] (uint8 or float, channels at dim -3) as float32 images normalised with the
    ImageNet mean/std: one new tensor, scaled and normalised in place."""
    images = pixels.to(torch.float32, copy=True).div_(255.0)
    mean = images.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = images.new_tensor(IMAGENET_STD)[:, None, None]
    return images.sub_(mean).div_(std)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 array as a normalised float (3, H, W) tensor."""
    return normalize_pixels(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))


def resized(image: Image.Image, size: Size) -> np.ndarray:
    """``image`` as RGB, bilinearly resized to ``size`` (H, W), as an (H, W, 3) uint8 array."""
    scaled = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.array(scaled)  # a writable copy: torch.from_numpy warns on read-only arrays


# --- training --------------------------------------------------------------------------------------


def train_augment(
    image: Image.Image,
    rng: np.random.Generator,
    *,
    input_size: Sequence[int] = (256, 128),
    pre_crop_size: Sequence[int] = (288, 144),
    crop: bool = True,
    flip: bool = True,
    erasing: float = 0.0,
) -> torch.Tensor:
    """triplet-reid's training input (3, H, W): resize, random horizontal flip (p=0.5), random crop, then
    random erasing with probability ``erasing``.

    With ``crop`` the image is resized to ``pre_crop_size`` and a uniformly placed ``input_size``
    window is cut out; without, it is resized straight to ``input_size``. All randomness comes from
    ``rng``, drawn in a fixed order (flip, crop row, crop column, then the erasing's draws if on).
    """
    input_hw, pre_crop_hw = _check_sizes(input_size, pre_crop_size, crop=crop)
    array = resized(image, pre_crop_hw if crop else input_hw)
    if flip and rng.random() < 0.5:
        array = array[:, ::-1]
    if crop:
        top = int(rng.integers(0, pre_crop_hw[0] - input_hw[0] + 1))
        left = int(rng.integers(0, pre_crop_hw[1] - input_hw[1] + 1))
        array = array[top : top + input_hw[0], left : left + input_hw[1]]
    tensor = to_tensor(array)
    box = _erasure(rng, *input_hw, erasing) if erasing else None
    if box is not None:
        top, left, height, width = box
        tensor[:, top : top + height, left : left + width] = 0.0
    return tensor


def _erasure(rng: np.random.Generator, height: int, width: int, probability: float) -> tuple[int, ...] | None:
    """(top, left, height, width) of the box random erasing blanks in one image, or None (no erasing)."""
    if rng.random() >= probability:
        return None
    area = rng.uniform(*ERASE_AREA, ERASE_ATTEMPTS) * height * width
    aspect = rng.uniform(ERASE_ASPECT, 1 / ERASE_ASPECT, ERASE_ATTEMPTS)
    heights, widths = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = (heights < height) & (widths < width)
    if not fits.any():
        return None
    box_h, box_w = int(heights[fits.argmax()]), int(widths[fits.argmax()])
    return int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1)), box_h, box_w


def batch_train_augment(
    images_uint8: torch.Tensor,
    generator: torch.Generator,
    *,
    input_size: Sequence[int] = (256, 128),
    pre_crop_size: Sequence[int] = (288, 144),
    crop: bool = True,
    flip: bool = True,
    erasing: float = 0.0,
) -> torch.Tensor:
    """:func:`train_augment` for a uint8 batch (B, 3, H0, W0) on any device -> normalised (B, 3, H, W).

    Resizes the whole batch (bilinear, antialiased) unless it already has the size to crop from, then
    flips and crops each sample by index arithmetic and normalises only the crops: the same pixels as
    normalising first, with less work. Random numbers are drawn on ``generator``'s device (flips, then
    rows, then columns, then the erasing's boxes), so a seed gives the same augmentation wherever the
    images live; the boxes follow :func:`train_augment`'s distribution, drawn as tensors.
    """
    input_hw, pre_crop_hw = _check_sizes(input_size, pre_crop_size, crop=crop)
    if images_uint8.dim() != 4 or images_uint8.shape[1] != 3 or images_uint8.dtype != torch.uint8:
        raise ConfigError(
            f"images_uint8: got {images_uint8.dtype} {tuple(images_uint8.shape)}; expected uint8 (B, 3, H, W)"
        )
    size = pre_crop_hw if crop else input_hw
    pixels = images_uint8
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(
            pixels.float(), size=size, mode="bilinear", align_corners=False, antialias=True
        )
    batch, device = pixels.shape[0], pixels.device
    flipped = _draw_flips(batch, generator, enabled=flip).to(device)
    tops = _draw_offsets(batch, size[0] - input_hw[0], generator, enabled=crop).to(device)
    lefts = _draw_offsets(batch, size[1] - input_hw[1], generator, enabled=crop).to(device)
    cols = lefts[:, None] + torch.arange(input_hw[1], device=device)  # (B, W) in the (maybe flipped) image
    cols = torch.where(flipped[:, None], size[1] - 1 - cols, cols)  # ... as columns of the unflipped image
    crops = normalize_pixels(_crops(pixels, tops, cols, height=input_hw[0]))
    return _erased(crops, generator, erasing) if erasing else crops


def _erased(images: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """``images`` (B, C, H, W) with each one's random-erasing box (as :func:`_erasure` draws it) set to 0."""
    batch, _, height, width = images.shape
    device = generator.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, device=device, dtype=torch.float64)

    erase = uniform(0, 1, batch) < probability
    area = uniform(*ERASE_AREA, batch, ERASE_ATTEMPTS) * height * width
    aspect = uniform(ERASE_ASPECT, 1 / ERASE_ASPECT, batch, ERASE_ATTEMPTS)
    heights, widths = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (heights < height) & (widths < width)
    first = fits.int().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    keep = (erase & fits.any(1)).double()
    box_h, box_w = heights.gather(1, first)[:, 0] * keep, widths.gather(1, first)[:, 0] * keep
    top = torch.floor(uniform(0, 1, batch) * (height - box_h + 1))
    left = torch.floor(uniform(0, 1, batch) * (width - box_w + 1))
    rows = torch.arange(height, device=device, dtype=torch.float64)[None, :]
    cols = torch.arange(width, device=device, dtype=torch.float64)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (B, W)
    box = (in_rows[:, :, None] & in_cols[:, None, :]).to(images.device)
    return images.masked_fill(box[:, None], 0.0)


def _crops(pixels: torch.Tensor, tops: torch.Tensor, cols: torch.Tensor, *, height: int) -> torch.Tensor:
    """Rows ``tops[b]`` .. ``tops[b] + height - 1`` and columns ``cols[b]`` of each sample b: (B, C, height, W).

    A sample's rows are one contiguous block, indexed whole through a window view; only the columns,
    which may run backwards, are gathered pixel by pixel (a third of the time of indexing both).
    """
    batch, channels, _, width = pixels.shape
    blocks = pixels.flatten(2).unfold(2, height * width, width)  # (B, C, top, height * width), a view
    rows = blocks[torch.arange(batch, device=pixels.device), :, tops].view(batch, channels, height, width)
    return rows.gather(3, cols[:, None, None, :].expand(-1, channels, height, -1))


def _draw_flips(batch: int, generator: torch.Generator, *, enabled: bool) -> torch.Tensor:
    """(B,) bools, each True with probability 0.5 when ``enabled``; all False otherwise."""
    if not enabled:
        return torch.zeros(batch, dtype=torch.bool, device=generator.device)
    return torch.rand(batch, generator=generator, device=generator.device) < 0.5


def _draw_offsets(batch: int, margin: int, generator: torch.Generator, *, enabled: bool) -> torch.Tensor:
    """(B,) crop offsets uniform in [0, margin] when ``enabled``; all 0 otherwise."""
    if not enabled:
        return torch.zeros(batch, dtype=torch.long, device=generator.device)
    return torch.randint(0, margin + 1, (batch,), generator=generator, device=generator.device)


# --- test time -------------------------------------------------------------------------------------


def _check_crop_augment(crop_augment: str | None) -> str | None:
    """``crop_augment`` if it is None (resize) or one of :data:`CROP_AUGMENTS`, else a one-line error."""
    if crop_augment is not None:
        choose("crop_augment", crop_augment, CROP_AUGMENTS)
    return crop_augment


def _flip_views(flip_augment: bool) -> tuple[str, ...]:
    """embed.py's flip suffixes: the original first, then its mirror image."""
    return ("", "_flip") if flip_augment else ("",)


def view_names(*, crop_augment: str | None = None, flip_augment: bool = False) -> list[str]:
    """embed.py's ``augmentation_types`` for these options, in the order :func:`eval_views` stacks them."""
    crops = _CROP_VIEWS[_check_crop_augment(crop_augment)]
    return [f"original{flipped}{cropped}" for flipped in _flip_views(flip_augment) for cropped in crops]


def _crop_view(array: np.ndarray, view: str, size: Size) -> np.ndarray:
    """The ``view`` crop of ``size`` from ``array`` (H, W, 3), or all of it for uncropped views."""
    if view not in _CROP_ANCHORS:
        return array
    row_halves, col_halves = _CROP_ANCHORS[view]
    top = (array.shape[0] - size[0]) * row_halves // 2
    left = (array.shape[1] - size[1]) * col_halves // 2
    return array[top : top + size[0], left : left + size[1]]


def eval_views(
    image: Image.Image,
    *,
    input_size: Sequence[int] = (256, 128),
    pre_crop_size: Sequence[int] = (288, 144),
    crop_augment: str | None = None,
    flip_augment: bool = False,
) -> torch.Tensor:
    """embed.py's test-time views of ``image``, (V, 3, h, w), named by :func:`view_names`.

    None resizes to ``input_size``; ``center``/``five`` crop ``input_size`` windows from the image
    resized to ``pre_crop_size``; ``avgpool`` keeps that whole pre-crop image (so h, w are
    ``pre_crop_size``), relying on the network's global pooling. Flips mirror the whole image first.
    """
    crops = _CROP_VIEWS[_check_crop_augment(crop_augment)]
    input_hw, pre_crop_hw = _check_sizes(input_size, pre_crop_size, crop=crop_augment is not None)
    array = resized(image, input_hw if crop_augment is None else pre_crop_hw)
    bases = [array[:, ::-1] if flip_suffix else array for flip_suffix in _flip_views(flip_augment)]
    return torch.stack([to_tensor(_crop_view(base, view, input_hw)) for base in bases for view in crops])


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input at test time: RGB, bilinearly resized to ``input_size``
    (to ``pre_crop_size`` first for test-time crops), scaled to [0, 1], normalised with ImageNet's
    mean/std, channels first. What an exported model records, so another runtime can feed it."""

    input_size: Size
    pre_crop_size: Size

    @classmethod
    def of(cls, cfg: TrainConfig) -> Preprocessing:
        """The preprocessing a run's network was trained with."""
        return cls(cfg.input_size, cfg.pre_crop_size)

    def views(
        self, image: Image.Image, *, crop_augment: str | None = None, flip_augment: bool = False
    ) -> torch.Tensor:
        """:func:`eval_views` of ``image`` with these sizes."""
        return eval_views(image, input_size=self.input_size, pre_crop_size=self.pre_crop_size,
                          crop_augment=crop_augment, flip_augment=flip_augment)

    def describe(self) -> dict[str, Any]:
        """Every step as plain values (JSON-ready), for a file's metadata."""
        return {
            "input_size": list(self.input_size),
            "pre_crop_size": list(self.pre_crop_size),
            "resize": "bilinear",
            "channel_order": "RGB",
            "pixel_scale": 1 / 255,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        }


# --- aggregation -----------------------------------------------------------------------------------


def mean(embs: Embeddings, *, axis: int = 0) -> Embeddings:
    """The mean embedding over the views ``axis`` (embed.py's layout is (V, N, D), axis 0)."""
    return embs.mean(axis)


def normalized_mean(embs: Embeddings, *, axis: int = 0) -> Embeddings:
    """:func:`mean`, then divided by its L2 norm along the embedding (last) axis, as triplet-reid."""
    averaged = mean(embs, axis=axis)
    return averaged / ((averaged * averaged).sum(-1) ** 0.5)[..., None]


AGGREGATE: dict[str, Callable[..., Embeddings]] = {  # vocabulary.AGGREGATORS
    "mean": mean,
    "normalized_mean": normalized_mean,
}

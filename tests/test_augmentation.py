"""Training crops/flips and embed.py's test-time views: shapes, determinism, geometry, names."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from reid_tune.augmentation import (
    AGGREGATE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    batch_train_augment,
    eval_views,
    to_tensor,
    train_augment,
    view_names,
)

# Odd margins (9, 5) check that the centre crop floors half the margin, as embed.py does.
INPUT = (32, 16)
PRE_CROP = (41, 21)
SIZES = {"input_size": INPUT, "pre_crop_size": PRE_CROP}


def _coordinate_array(height: int = PRE_CROP[0], width: int = PRE_CROP[1]) -> np.ndarray:
    """(H, W, 3) uint8 whose red channel is the row and green the column of each pixel."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)


def _coordinate_image() -> Image.Image:
    return Image.fromarray(_coordinate_array())  # already pre-crop size: resizing keeps it exact


def _pixels(image: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (..., 3, H, W) floats -> integer pixel values."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return torch.round((image * std + mean) * 255).to(torch.int64).numpy()


def _window(image: torch.Tensor) -> tuple[int, int, bool]:
    """(top, left, flipped) of a crop of the coordinate image, asserting it is one rigid window."""
    red, green = _pixels(image)[:2]
    top, first_col = int(red[0, 0]), int(green[0, 0])
    height, width = red.shape
    flipped = width > 1 and green[0, 1] < first_col
    cols = first_col - np.arange(width) if flipped else first_col + np.arange(width)
    np.testing.assert_array_equal(red, np.broadcast_to((top + np.arange(height))[:, None], red.shape))
    np.testing.assert_array_equal(green, np.broadcast_to(cols[None, :], green.shape))
    left = PRE_CROP[1] - 1 - first_col if flipped else first_col  # offset within the mirrored image
    return top, left, bool(flipped)


# --- train_augment ---------------------------------------------------------------------------------


def test_train_augment_shapes() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 50, 3), dtype=np.uint8))
    rng = np.random.default_rng(0)
    out = train_augment(image, rng)
    assert out.shape == (3, 256, 128) and out.dtype == torch.float32
    assert train_augment(image.convert("L"), rng, input_size=(64, 32), crop=False).shape == (3, 64, 32)


def test_train_augment_is_deterministic_given_the_rng() -> None:
    image = _coordinate_image()
    first = [train_augment(image, np.random.default_rng(7), **SIZES) for _ in range(2)]
    torch.testing.assert_close(first[0], first[1], rtol=0, atol=0)
    others = [train_augment(image, np.random.default_rng(seed), **SIZES) for seed in range(8)]
    assert len({_window(o) for o in others}) > 1


def test_train_crops_cover_the_pre_crop_image_and_flip_half_the_time() -> None:
    rng = np.random.default_rng(0)
    windows = [_window(train_augment(_coordinate_image(), rng, **SIZES)) for _ in range(400)]
    tops, lefts, flips = zip(*windows)
    assert set(tops) == set(range(PRE_CROP[0] - INPUT[0] + 1))
    assert set(lefts) == set(range(PRE_CROP[1] - INPUT[1] + 1))
    assert 0.4 < np.mean(flips) < 0.6


def test_train_augment_without_crop_or_flip_is_a_plain_resize() -> None:
    image = _coordinate_image()
    out = train_augment(image, np.random.default_rng(0), input_size=INPUT, crop=False, flip=False)
    expected = to_tensor(np.array(image.resize((INPUT[1], INPUT[0]), Image.Resampling.BILINEAR)))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"input_size": (0, 16)}, "input_size=(0, 16)"),
        ({"input_size": (32,)}, "input_size=(32,)"),
        ({"pre_crop_size": 41}, "pre_crop_size=41"),
        ({"input_size": (64, 16), "pre_crop_size": PRE_CROP}, "pre_crop_size=(41, 21)"),
    ],
)
def test_invalid_sizes_name_the_culprit(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        train_augment(_coordinate_image(), np.random.default_rng(0), **kwargs)


# --- batch_train_augment ---------------------------------------------------------------------------


def _coordinate_batch(batch: int) -> torch.Tensor:
    return torch.from_numpy(_coordinate_array()).permute(2, 0, 1).expand(batch, -1, -1, -1).contiguous()


def test_batch_train_augment_shapes_and_determinism() -> None:
    images = torch.randint(0, 256, (5, 3, 50, 30), dtype=torch.uint8)
    first, second = (batch_train_augment(images, torch.Generator().manual_seed(3), **SIZES) for _ in range(2))
    assert first.shape == (5, 3, *INPUT) and first.dtype == torch.float32
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    other = batch_train_augment(images, torch.Generator().manual_seed(4), **SIZES)
    assert not torch.equal(first, other)


def test_batch_crops_and_flips_match_the_single_image_semantics() -> None:
    out = batch_train_augment(_coordinate_batch(400), torch.Generator().manual_seed(0), **SIZES)
    tops, lefts, flips = zip(*(_window(sample) for sample in out))
    assert set(tops) == set(range(PRE_CROP[0] - INPUT[0] + 1))
    assert set(lefts) == set(range(PRE_CROP[1] - INPUT[1] + 1))
    assert 0.4 < np.mean(flips) < 0.6


def test_batch_without_crop_or_flip_is_close_to_the_pil_resize() -> None:
    array = np.random.default_rng(0).integers(0, 256, (80, 40, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    pil = train_augment(Image.fromarray(array), rng, input_size=INPUT, crop=False, flip=False)
    batch = torch.from_numpy(array).permute(2, 0, 1)[None]
    out = batch_train_augment(batch, torch.Generator(), input_size=INPUT, crop=False, flip=False)
    assert (out[0] - pil).abs().max() < 0.04  # ~2 uint8 levels: both antialiased bilinear, PIL rounds


def test_batch_train_augment_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="images_uint8"):
        batch_train_augment(torch.zeros(2, 3, 41, 21), torch.Generator(), **SIZES)


# --- test-time views -------------------------------------------------------------------------------

FIVE = ["_center", "_top_left", "_top_right", "_bottom_left", "_bottom_right"]
EXPECTED_NAMES = {  # embed.py's augmentation_types
    (None, False): ["original_resize"],
    (None, True): ["original_resize", "original_flip_resize"],
    ("center", False): ["original_center"],
    ("center", True): ["original_center", "original_flip_center"],
    ("five", False): ["original" + c for c in FIVE],
    ("five", True): ["original" + c for c in FIVE] + ["original_flip" + c for c in FIVE],
    ("avgpool", False): ["original_avgpool"],
    ("avgpool", True): ["original_avgpool", "original_flip_avgpool"],
}
# view -> (top, left) of the crop in the (maybe mirrored) pre-crop image; margins are (9, 5).
CROP_WINDOWS = {
    "_center": (4, 2),
    "_top_left": (0, 0),
    "_top_right": (0, 5),
    "_bottom_left": (9, 0),
    "_bottom_right": (9, 5),
}


@pytest.mark.parametrize(("crop_augment", "flip_augment"), list(EXPECTED_NAMES))
def test_view_names_match_embed_py(crop_augment: str | None, flip_augment: bool) -> None:
    names = view_names(crop_augment=crop_augment, flip_augment=flip_augment)
    assert names == EXPECTED_NAMES[crop_augment, flip_augment]


@pytest.mark.parametrize(("crop_augment", "flip_augment"), list(EXPECTED_NAMES))
def test_eval_views_geometry(crop_augment: str | None, flip_augment: bool) -> None:
    views = eval_views(_coordinate_image(), **SIZES, crop_augment=crop_augment, flip_augment=flip_augment)
    names = view_names(crop_augment=crop_augment, flip_augment=flip_augment)
    expected_hw = PRE_CROP if crop_augment == "avgpool" else INPUT
    assert views.shape == (len(names), 3, *expected_hw)
    for name, view in zip(names, views):
        crop = name.removeprefix("original").removeprefix("_flip")
        if crop in CROP_WINDOWS:
            assert _window(view) == (*CROP_WINDOWS[crop], "_flip" in name)
        elif crop == "_avgpool":
            assert _window(view) == (0, 0, "_flip" in name)  # the whole pre-crop image


def test_eval_views_resize_flip_is_the_mirror_image() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 40, 3), dtype=np.uint8))
    original, flipped = eval_views(image, **SIZES, flip_augment=True)
    torch.testing.assert_close(flipped, original.flip(-1), rtol=0, atol=0)


def test_unknown_crop_augment_names_the_choices() -> None:
    message = "crop_augment='six': unknown; expected one of center, five, avgpool"
    with pytest.raises(ValueError, match=message):
        view_names(crop_augment="six")


# --- aggregators -----------------------------------------------------------------------------------


@pytest.mark.parametrize("as_numpy", [False, True])
def test_aggregators_reduce_the_views_axis(as_numpy: bool) -> None:
    embs = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))  # (V, N, D) as embed.py
    averaged = embs.mean(0)
    unit = averaged / averaged.norm(dim=1, keepdim=True)
    given = embs.numpy() if as_numpy else embs
    for name, expected in [("mean", averaged), ("normalized_mean", unit)]:
        got = AGGREGATE[name](given)
        assert isinstance(got, type(given))
        torch.testing.assert_close(torch.as_tensor(got), expected)
    swapped = AGGREGATE["normalized_mean"](given.swapaxes(0, 1), axis=1)  # (N, V, D)
    torch.testing.assert_close(torch.as_tensor(swapped), unit)


# --- random erasing ---------------------------------------------------------------------------------


def _bot_erasure(rng: random.Random, height: int, width: int, probability: float) -> tuple[int, int] | None:
    """BoT's RandomErasing (Zhong et al. 2017) as its code reads: (box height, width) or None."""
    if rng.uniform(0, 1) >= probability:
        return None
    for _ in range(100):
        area = rng.uniform(0.02, 0.4) * height * width
        aspect = rng.uniform(0.3, 1 / 0.3)
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
            return h, w
    return None


def _erased_fractions(masks: torch.Tensor) -> np.ndarray:
    """The erased fraction of each image (B, H, W) boolean masks."""
    return masks.flatten(1).double().mean(1).numpy()


def _statistics_agree(got: np.ndarray, want: np.ndarray) -> None:
    """Same probability of erasing and the same distribution of erased areas (two-sample checks)."""
    assert abs((got > 0).mean() - (want > 0).mean()) < 0.03
    got, want = got[got > 0], want[want > 0]
    assert got.min() >= 0.01 and got.max() <= 0.45  # areas 0.02-0.4 of the image, sides rounded to pixels
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(got, q) - np.quantile(want, q)) < 0.02, q


def _reference_fractions(count: int, height: int, width: int, probability: float) -> np.ndarray:
    rng = random.Random(0)
    boxes = [_bot_erasure(rng, height, width, probability) for _ in range(count)]
    return np.array([0.0 if box is None else box[0] * box[1] / (height * width) for box in boxes])


def test_cpu_random_erasing_follows_bot() -> None:
    """train_augment's boxes: BoT's probability and areas, aspect within [0.3, 1/0.3], filled with 0 (the
    normalised mean pixel), inside the image."""
    image = Image.fromarray(np.full((64, 32, 3), 255, dtype=np.uint8))  # white: normalised values > 0
    count, rng = 3000, np.random.default_rng(0)
    views = torch.stack([
        train_augment(image, rng, input_size=(64, 32), pre_crop_size=(64, 32), crop=False, flip=False,
                      erasing=0.5)
        for _ in range(count)
    ])
    masks = (views == 0).all(1)
    _statistics_agree(_erased_fractions(masks), _reference_fractions(count, 64, 32, 0.5))
    for mask in masks[masks.flatten(1).any(1)][:200]:  # each erased region is one axis-aligned box
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
        assert 0.25 <= len(rows) / len(cols) <= 1 / 0.25


def test_device_random_erasing_has_the_cpu_statistics() -> None:
    """batch_train_augment's boxes, drawn as tensors, follow the same distribution as the CPU path's."""
    count = 3000
    images = torch.full((count, 3, 64, 32), 255, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    views = batch_train_augment(images, generator, input_size=(64, 32), pre_crop_size=(64, 32), crop=False,
                                flip=False, erasing=0.5)
    masks = (views == 0).all(1)
    _statistics_agree(_erased_fractions(masks), _reference_fractions(count, 64, 32, 0.5))


def test_random_erasing_off_draws_nothing() -> None:
    """With erasing 0 both paths give today's pixels and leave their generators where they were."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 40, 3), dtype=np.uint8))
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    plain, off = train_augment(image, a, **SIZES), train_augment(image, b, **SIZES, erasing=0.0)
    torch.testing.assert_close(plain, off)
    assert a.random() == b.random()
    batch = torch.randint(0, 256, (4, 3, 80, 40), dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(batch_train_augment(batch, g1, **SIZES),
                               batch_train_augment(batch, g2, **SIZES, erasing=0.0))
    assert torch.equal(g1.get_state(), g2.get_state())

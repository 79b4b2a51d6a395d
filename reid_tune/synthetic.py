"""A small generated re-ID data set in the Market-1501 layout, so the demo and tests need no download.

Each identity has a fixed, learnable appearance (clothing colours from a shared palette, a striped or
plain top, sleeves, a bag, hair, build); each camera changes it (colour cast, brightness, light
direction, background) and each image jitters it (position, scale, stance, side, clutter, noise).
Only combinations of attributes identify a person and colours shift between cameras, so matching
raw colours across cameras is not enough, yet a small CNN learns it in a few hundred iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from reid_tune.atomic import atomic_path
from reid_tune.datasets import prepare
from reid_tune.errors import ReidTuneError

# Clothing colours (RGB). Few enough that every colour is shared by several identities.
_PALETTE = np.array(
    [
        [200, 30, 30], [30, 60, 190], [30, 150, 50], [230, 210, 40], [240, 240, 240], [25, 25, 25],
        [120, 120, 120], [240, 130, 20], [130, 40, 160], [110, 70, 30], [90, 200, 210], [230, 120, 170],
    ],
    dtype=np.float32,
)
_SKINS = np.array([[240, 200, 170], [200, 150, 110], [140, 95, 60], [90, 60, 40]], dtype=np.float32)
_HAIRS = np.array([[20, 15, 10], [90, 55, 25], [200, 170, 90], [150, 150, 150]], dtype=np.float32)
_PATTERNS = ("plain", "horizontal", "vertical")
# Distinct outfits: plain tops ignore the stripe colour, which differs from the top's colour.
_OUTFITS = len(_PALETTE) ** 2 * (1 + (len(_PATTERNS) - 1) * (len(_PALETTE) - 1))

# Body layout in units of the body height: 0 is the top of the head, 1 the soles.
_HEAD_CENTER, _HEAD_RADII = 0.075, (0.055, 0.075)
_SHOULDER_Y, _SOLE_Y = 0.15, 0.95
_ARM_WIDTH = 0.04
_NOISE_STD = 6.0
_JPEG_QUALITY = 90


@dataclass(frozen=True)
class _Person:
    """What makes one identity recognisable in every camera."""

    upper: np.ndarray
    lower: np.ndarray
    stripe: np.ndarray
    pattern: str
    period: float
    long_sleeves: bool
    skin: np.ndarray
    hair: np.ndarray
    shoes: np.ndarray
    waist: float
    shoulder: float
    bag: np.ndarray | None


@dataclass(frozen=True)
class _Camera:
    """How one camera sees everybody: colour cast, brightness, light direction and background."""

    gain: np.ndarray
    offset: float
    shade: float
    background: np.ndarray


def generate_demo(
    out: str | Path,
    *,
    num_train_ids: int = 40,
    num_test_ids: int = 20,
    images_per_camera: int = 3,
    num_cameras: int = 3,
    size: tuple[int, int] = (128, 64),
    seed: int = 0,
    junk: int = 6,
    distractors: int = 10,
) -> list[Path]:
    """Write a fake Market-1501 tree (``size`` is height, width) and its triplet-reid CSVs into ``out``.

    ``out`` must be new or empty; the tree is built beside it and renamed into place, so a failure
    leaves nothing behind. Returns the paths of the train, query and test CSVs.
    """
    _check_options(num_train_ids, num_test_ids, images_per_camera, num_cameras, size, junk, distractors)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReidTuneError(f"{out}: already exists and is not empty, expected a new or empty folder")
    with atomic_path(out) as build:
        build.mkdir()
        _write_tree(
            build,
            _Generator(np.random.default_rng(seed), size, num_cameras),
            num_train_ids=num_train_ids,
            num_test_ids=num_test_ids,
            images_per_camera=images_per_camera,
            junk=junk,
            distractors=distractors,
        )
        csvs = prepare("market1501", build, build)
    return [out / csv.name for csv in csvs]


def person_images(
    count: int, size: tuple[int, int], *, seed: int = 0, num_cameras: int = 2
) -> list[Image.Image]:
    """``count`` rendered images of new identities (``size`` is height, width), in memory: test input
    when no data set is at hand (an export's parity check)."""
    generator = _Generator(np.random.default_rng(seed), size, num_cameras)
    return [
        Image.fromarray(generator.render(generator.person(), generator.cameras[i % num_cameras]))
        for i in range(count)
    ]


def _check_options(
    num_train_ids: int,
    num_test_ids: int,
    images_per_camera: int,
    num_cameras: int,
    size: tuple[int, int],
    junk: int,
    distractors: int,
) -> None:
    """One-line errors for options that cannot make a usable data set."""
    minimums = {
        "num_train_ids": (num_train_ids, 2, "batch-hard triplets need two identities"),
        "num_test_ids": (num_test_ids, 1, "the evaluation needs a query"),
        "images_per_camera": (images_per_camera, 2, "each test camera needs a query and a gallery image"),
        "num_cameras": (num_cameras, 2, "queries are matched across cameras"),
        "size[0]": (size[0], 32, "the height; smaller images cannot show a person"),
        "size[1]": (size[1], 16, "the width; smaller images cannot show a person"),
        "junk": (junk, 0, "it is a count"),
        "distractors": (distractors, 0, "it is a count"),
    }
    for key, (value, minimum, why) in minimums.items():
        if value < minimum:
            raise ReidTuneError(f"{key}={value}: expected at least {minimum} ({why})")
    if num_train_ids + num_test_ids > 9999:
        raise ReidTuneError(
            f"num_train_ids + num_test_ids = {num_train_ids + num_test_ids}: expected at most 9999 "
            "(Market-1501 names hold four-digit ids)"
        )


def _write_tree(
    root: Path,
    generator: _Generator,
    *,
    num_train_ids: int,
    num_test_ids: int,
    images_per_camera: int,
    junk: int,
    distractors: int,
) -> None:
    """Train identities, then test identities (first image per camera is the query), junk, distractors."""
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (root / folder).mkdir()
    for pid in range(1, num_train_ids + num_test_ids + 1):
        person = generator.person()
        is_train = pid <= num_train_ids
        for camera in range(1, generator.num_cameras + 1):
            for shot in range(images_per_camera):
                folder = "bounding_box_train" if is_train else "query" if shot == 0 else "bounding_box_test"
                generator.save(root / folder, f"{pid:04d}", person, camera)
    for pid, count, partial in (("-1", junk, True), ("0000", distractors, False)):
        for _ in range(count):
            camera = int(generator.rng.integers(1, generator.num_cameras + 1))
            generator.save(root / "bounding_box_test", pid, generator.person(), camera, partial=partial)


class _Generator:
    """Draws identities and cameras from one random stream and renders numbered frames."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int], num_cameras: int) -> None:
        self.rng = rng
        self.size = size
        self.num_cameras = num_cameras
        self.cameras = [self._camera() for _ in range(num_cameras)]
        self.frame = 0
        self._outfits: set[tuple[int, int, int, int]] = set()

    def person(self) -> _Person:
        """A new identity; the clothing combination is unique among this data set's identities."""
        rng = self.rng
        upper, lower, stripe, pattern = self._outfit()
        return _Person(
            upper=_PALETTE[upper],
            lower=_PALETTE[lower],
            stripe=_PALETTE[stripe],
            pattern=_PATTERNS[pattern],
            period=float(rng.uniform(0.03, 0.06)),
            long_sleeves=bool(rng.random() < 0.5),
            skin=_SKINS[rng.integers(0, len(_SKINS))],
            hair=_HAIRS[rng.integers(0, len(_HAIRS))],
            shoes=_PALETTE[rng.integers(0, len(_PALETTE))] * 0.5,
            waist=float(rng.uniform(0.45, 0.55)),
            shoulder=float(rng.uniform(0.085, 0.125)),
            bag=_PALETTE[rng.integers(0, len(_PALETTE))] if rng.random() < 0.4 else None,
        )

    def _outfit(self) -> tuple[int, int, int, int]:
        """Palette indices of top, trousers and stripes, and the pattern: new while combinations last."""
        rng = self.rng
        while True:
            upper, lower, shift = (int(rng.integers(0, len(_PALETTE))) for _ in range(3))
            stripe = (upper + 1 + shift % (len(_PALETTE) - 1)) % len(_PALETTE)
            pattern = int(rng.integers(0, len(_PATTERNS)))
            outfit = (upper, lower, stripe if pattern else -1, pattern)
            if outfit not in self._outfits or len(self._outfits) == _OUTFITS:
                self._outfits.add(outfit)
                return upper, lower, stripe, pattern

    def _camera(self) -> _Camera:
        """A colour cast and brightness, a light direction, and a textured wall-and-floor background."""
        rng = self.rng
        height, width = self.size
        wall, floor = rng.uniform(40, 210, (2, 3))
        horizon = int(height * rng.uniform(0.55, 0.8))
        background = np.empty((height, width, 3), dtype=np.float32)
        background[:horizon], background[horizon:] = wall, floor
        blocks = rng.normal(0, 18, (height // 8 + 1, width // 8 + 1, 3))
        background += np.kron(blocks, np.ones((8, 8, 1)))[:height, :width]
        return _Camera(
            gain=np.exp(rng.normal(0, 0.22, 3)).astype(np.float32),
            offset=float(rng.uniform(-30, 30)),
            shade=float(rng.uniform(-0.4, 0.4)),
            background=background,
        )

    def save(self, folder: Path, pid: str, person: _Person, camera: int, *, partial: bool = False) -> None:
        """Render the next frame of ``person`` in ``camera`` as a Market-1501 named JPEG."""
        self.frame += 1
        pixels = self.render(person, self.cameras[camera - 1], partial=partial)
        name = f"{pid}_c{camera}s1_{self.frame:06d}_00.jpg"
        Image.fromarray(pixels).save(folder / name, quality=_JPEG_QUALITY)

    def render(self, person: _Person, camera: _Camera, *, partial: bool = False) -> np.ndarray:
        """One jittered view (uint8 HxWx3); ``partial`` crops it like a bad detection (junk)."""
        rng = self.rng
        height, width = self.size
        scale = rng.uniform(1.6, 2.4) if partial else rng.uniform(0.82, 1.0)
        top = rng.uniform(-0.8, -0.2) * scale if partial else rng.uniform(0.0, 0.07)
        centre = 0.5 + rng.uniform(-0.08, 0.08)
        v = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
        u = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
        y = (v - top) / (0.92 * scale)
        x = (u - centre) * (width / height) / (0.92 * scale) * rng.choice([-1.0, 1.0])
        image = np.roll(camera.background, int(rng.integers(0, width)), axis=1).copy()
        self._clutter(image)
        for mask, colour in _body(person, y, x, stride=float(rng.uniform(0.0, 0.035))):
            image[mask] = colour
        light = rng.uniform(0.85, 1.15) * (1 + camera.shade * (u[..., None] - 0.5))
        image = image * camera.gain * light + camera.offset + rng.normal(0, _NOISE_STD, image.shape)
        return np.clip(image, 0, 255).astype(np.uint8)

    def _clutter(self, image: np.ndarray) -> None:
        """Half of the images get a random box in the background, so backgrounds do not identify cameras."""
        rng = self.rng
        if rng.random() < 0.5:
            height, width = image.shape[:2]
            y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
            box_height = int(rng.integers(height // 8, height // 2))
            box_width = int(rng.integers(4, width // 2))
            image[y0 : y0 + box_height, x0 : x0 + box_width] = rng.uniform(0, 255, 3)


def _body(
    person: _Person, y: np.ndarray, x: np.ndarray, *, stride: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask, colour) pairs painting ``person`` back to front, in body coordinates ``y`` (down) and ``x``."""
    reach = np.abs(x)
    torso_rows = (y >= _SHOULDER_Y) & (y < person.waist)
    torso = torso_rows & (reach < person.shoulder)
    leg_gap = person.shoulder * 0.45 + stride
    legs = (y >= person.waist) & (y < _SOLE_Y) & (np.abs(reach - leg_gap) < person.shoulder * 0.4)
    shoes = (y >= _SOLE_Y) & (y < 1.0) & (np.abs(reach - leg_gap) < person.shoulder * 0.45)
    arm_rows = (y >= _SHOULDER_Y + 0.01) & (y < person.waist + 0.08)
    arms = arm_rows & (reach >= person.shoulder) & (reach < person.shoulder + _ARM_WIDTH)
    forearms = arms & (y >= (_SHOULDER_Y + person.waist) / 2)
    head = ((x / _HEAD_RADII[0]) ** 2 + ((y - _HEAD_CENTER) / _HEAD_RADII[1]) ** 2) <= 1
    parts = [(legs, person.lower), (shoes, person.shoes), (torso, person.upper)]
    if person.pattern != "plain":
        along = y - _SHOULDER_Y if person.pattern == "horizontal" else x
        parts.append((torso & ((along / person.period) % 1 < 0.5), person.stripe))
    parts += [(arms, person.upper), (forearms, person.upper if person.long_sleeves else person.skin)]
    if person.bag is not None:
        bag = (y >= person.waist - 0.1) & (y < person.waist + 0.08)
        parts.append((bag & (x >= person.shoulder + 0.03) & (x < person.shoulder + 0.12), person.bag))
    parts += [(head, person.skin), (head & (y < _HEAD_CENTER - 0.02), person.hair)]
    return parts

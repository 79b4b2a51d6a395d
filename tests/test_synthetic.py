"""The generated demo data set: a deterministic fake Market-1501 tree with triplet-reid CSVs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_tune.datasets import camera_ids, check_trainable, load_csv
from reid_tune.errors import ReidTuneError
from reid_tune.synthetic import generate_demo

SMALL = dict(
    num_train_ids=4, num_test_ids=3, images_per_camera=3, num_cameras=2, size=(64, 32), junk=2, distractors=3
)
MARKET_NAME = re.compile(r"(-1|\d{4})_c(\d)s1_(\d{6})_00\.jpg")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "market"
    generate_demo(out, seed=3, **SMALL)
    return out


def test_demo_is_deterministic_in_the_seed(demo: Path, tmp_path: Path) -> None:
    generate_demo(tmp_path / "again", seed=3, **SMALL)
    assert _files(tmp_path / "again") == _files(demo)
    generate_demo(tmp_path / "other", seed=4, **SMALL)
    assert len(_files(tmp_path / "other")) == len(_files(demo))
    assert _files(tmp_path / "other") != _files(demo)


def test_demo_layout_and_names(demo: Path) -> None:
    assert sorted(p.name for p in demo.iterdir()) == [
        "bounding_box_test", "bounding_box_train", "market1501_query.csv", "market1501_test.csv",
        "market1501_train.csv", "query",
    ]
    names = {folder: sorted(p.name for p in (demo / folder).iterdir())
             for folder in ("bounding_box_train", "query", "bounding_box_test")}
    assert all(MARKET_NAME.fullmatch(name) for group in names.values() for name in group)
    pids = {folder: {name.split("_")[0] for name in group} for folder, group in names.items()}
    assert pids["bounding_box_train"] == {"0001", "0002", "0003", "0004"}
    assert pids["query"] == {"0005", "0006", "0007"}
    assert pids["bounding_box_test"] == {"0005", "0006", "0007", "-1", "0000"}
    assert len(names["bounding_box_train"]) == 4 * 2 * 3
    assert len(names["query"]) == 3 * 2  # one per test identity and camera
    assert len(names["bounding_box_test"]) == 3 * 2 * 2 + 2 + 3
    frames = [MARKET_NAME.fullmatch(name).group(3) for group in names.values() for name in group]
    assert len(set(frames)) == len(frames)
    with Image.open(demo / "query" / names["query"][0]) as image:
        assert image.size == (32, 64) and image.mode == "RGB"


def test_demo_csvs_load_and_cameras_parse(demo: Path) -> None:
    train, query, test = (
        load_csv(demo / f"market1501_{split}.csv", check_images=True) for split in ("train", "query", "test")
    )
    check_trainable(train)
    assert (len(train), len(query), len(test)) == (24, 6, 17)
    assert set(camera_ids(train.fids, "market1501")) == {1, 2}
    assert {"-1", "0000"} <= set(test.pids)


def test_every_query_has_a_gallery_match_in_another_camera(demo: Path) -> None:
    query, test = (load_csv(demo / f"market1501_{split}.csv") for split in ("query", "test"))
    query_cams, test_cams = camera_ids(query.fids, "market1501"), camera_ids(test.fids, "market1501")
    for pid, cam in zip(query.pids, query_cams):
        assert np.any((test.pids == pid) & (test_cams != cam)), pid
        assert np.any((test.pids == pid) & (test_cams == cam)), pid


def test_identities_look_alike_across_their_images(demo: Path) -> None:
    """Same identity in the same camera: closer in mean colour of the body than other identities."""
    query, test = (load_csv(demo / f"market1501_{split}.csv") for split in ("query", "test"))

    def body_colour(fid: str) -> np.ndarray:
        with Image.open(demo / fid) as image:
            return np.asarray(image, dtype=np.float32)[16:56, 10:22].reshape(-1, 3).mean(0)

    query_cams, test_cams = camera_ids(query.fids, "market1501"), camera_ids(test.fids, "market1501")
    hits = 0
    for fid, pid, cam in zip(query.fids, query.pids, query_cams):
        same_cam = (test_cams == cam) & ~np.isin(test.pids, ["-1", "0000"])
        distances = [np.abs(body_colour(g) - body_colour(fid)).sum() for g in test.fids[same_cam]]
        hits += test.pids[same_cam][int(np.argmin(distances))] == pid
    assert hits >= len(query) - 1


def test_demo_refuses_a_used_folder_and_bad_options(demo: Path, tmp_path: Path) -> None:
    before = _files(demo)
    with pytest.raises(ReidTuneError, match="already exists and is not empty"):
        generate_demo(demo, **SMALL)
    assert _files(demo) == before
    with pytest.raises(ReidTuneError, match=r"num_cameras=1: expected at least 2"):
        generate_demo(tmp_path / "x", num_cameras=1)
    with pytest.raises(ReidTuneError, match=r"images_per_camera=1: expected at least 2"):
        generate_demo(tmp_path / "x", images_per_camera=1)
    assert not (tmp_path / "x").exists()
    (tmp_path / "empty").mkdir()
    paths = generate_demo(tmp_path / "empty", **SMALL)
    assert [p.name for p in paths] == ["market1501_train.csv", "market1501_query.csv", "market1501_test.csv"]
    assert all(p.parent == tmp_path / "empty" for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary folder left

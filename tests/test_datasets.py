"""CSV lists, camera conventions and the data set converters (triplet-reid's exact list format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_tune.datasets import (
    ReidDataset,
    camera_ids,
    check_trainable,
    load_csv,
    load_image,
    pids_from_names,
    prepare,
    write_csv,
)
from reid_tune.errors import ReidTuneError
from reid_tune.vocabulary import CONVENTIONS


def _image(path: Path, *, mode: str = "RGB") -> Path:
    """A tiny real image file (its format follows the extension, JPEG for '.jpg.jpg')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 8), 128).save(path, format="JPEG" if ".jp" in path.name else None)
    return path


def _tree(root: Path, files: dict[str, list[str]]) -> Path:
    """Images under ``root/<folder>/`` plus a Windows Thumbs.db in each folder, as real Market has."""
    for folder, names in files.items():
        for name in names:
            _image(root / folder / name)
        (root / folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not an image")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# load_csv, check_trainable, write_csv
###


def test_load_csv_keeps_pids_as_strings(tmp_path: Path) -> None:
    csv = tmp_path / "list.csv"
    csv.write_text("0002,a/0002_c1.jpg\r\n-1,a/-1_c1.jpg\r\n0000,a/0000_c2.jpg\n")
    dataset = load_csv(csv)
    assert dataset.pids.tolist() == ["0002", "-1", "0000"]
    assert dataset.fids.tolist() == ["a/0002_c1.jpg", "a/-1_c1.jpg", "a/0000_c2.jpg"]
    assert dataset.source == str(csv) and len(dataset) == 3


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("1,a.jpg\nabc\n", 2, "expected 'pid,path', got 'abc'"),
        ("1,a.jpg\n1,b.jpg\n2,c.jpg,extra\n", 3, "got '2,c.jpg,extra'"),
        (",a.jpg\n", 1, "empty pid"),
        ("1,a.jpg\n2, \n", 2, "empty path"),
        ("1,a.jpg\n\n2,b.jpg\n", 2, "got ''"),
    ],
)
def test_load_csv_names_file_and_line_of_a_bad_row(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text(text)
    with pytest.raises(ReidTuneError, match=f"^{csv}:{line}: ") as error:
        load_csv(csv)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_load_csv_rejects_missing_empty_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ReidTuneError, match="nope.csv: file not found"):
        load_csv(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ReidTuneError, match="empty.csv: no rows"):
        load_csv(tmp_path / "empty.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ReidTuneError, match="binary.csv: not UTF-8"):
        load_csv(tmp_path / "binary.csv")


def test_load_csv_checks_images_under_the_root(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a.jpg")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    csv = tmp_path / "list.csv"
    csv.write_text("1,a.jpg\n1,missing.jpg\n")
    assert len(load_csv(csv, image_root=tmp_path / "images")) == 2  # no check asked for
    with pytest.raises(ReidTuneError, match=r"list.csv:2: image .*missing.jpg: not found"):
        load_csv(csv, image_root=tmp_path / "images", check_images=True)
    csv.write_text("1,a.jpg\n1,broken.jpg\n")
    with pytest.raises(ReidTuneError, match=r"list.csv:2: image .*broken.jpg: not readable as an image"):
        load_csv(csv, image_root=tmp_path / "images", check_images=True)
    (tmp_path / "images" / "here.csv").write_text("1,a.jpg\n")
    assert len(load_csv(tmp_path / "images" / "here.csv", check_images=True)) == 1  # root: the CSV's folder


def test_check_trainable_names_the_lonely_identity_and_its_row() -> None:
    dataset = ReidDataset(np.array(["1", "2", "1", "3"]), np.array(["a", "b", "c", "d"]), "train.csv")
    with pytest.raises(ReidTuneError, match=r"^train.csv:2: identity '2' has 1 image\(s\) \(b\)"):
        check_trainable(dataset)
    check_trainable(dataset, min_images=1)
    with pytest.raises(ReidTuneError, match="train.csv:1: identity '1' has 2 image"):
        check_trainable(dataset, min_images=3)


def test_write_csv_round_trips_atomically(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.csv"
    write_csv(path, ["0002", "-1"], ["x/0002_c1.jpg", "x/-1_c2.jpg"])
    assert path.read_text() == "0002,x/0002_c1.jpg\n-1,x/-1_c2.jpg\n"
    assert load_csv(path).pids.tolist() == ["0002", "-1"]
    with pytest.raises(ReidTuneError, match=r"out.csv:2: cannot write 'a,b'"):
        write_csv(path, ["1", "2"], ["ok.jpg", "a,b"])
    with pytest.raises(ReidTuneError, match="2 pids but 1 paths"):
        write_csv(path, ["1", "2"], ["ok.jpg"])
    assert path.read_text() == "0002,x/0002_c1.jpg\n-1,x/-1_c2.jpg\n"  # untouched by the failures
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.csv"]  # no temporary files left


# Images and camera conventions
###


def test_load_image_gives_rgb_and_names_unreadable_files(tmp_path: Path) -> None:
    face = _image(tmp_path / "face.pgm", mode="L")
    image = load_image(face)
    assert image.mode == "RGB" and image.size == (4, 8)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ReidTuneError, match=r"bad.jpg: cannot read image"):
        load_image(tmp_path / "bad.jpg")


def test_market1501_convention_reads_cameras_like_the_excluder() -> None:
    fids = ["query/0001_c1s1_001051_00.jpg", "bounding_box_test/-1_c3s1_000401_03.jpg",
            "query/1488_c6s3_094992_00.jpg.jpg", "0000_c2s2_000151_01.jpg"]
    assert camera_ids(fids, "market1501").tolist() == [1, 3, 6, 2]
    assert camera_ids(fids, "market1501").dtype == np.int64
    assert pids_from_names(fids, "market1501").tolist() == ["0001", "-1", "1488", "0000"]


def test_duke_cuhk03_and_none_conventions() -> None:
    assert camera_ids(["q/0005_c2_f0046985.jpg", "0019_c8_f0051470.jpg"], "duke").tolist() == [2, 8]
    assert pids_from_names(["q/0005_c2_f0046985.jpg"], "duke").tolist() == ["0005"]
    slots = [f"val/0007_{slot:02d}.jpg" for slot in range(10)]
    assert camera_ids(slots, "cuhk03").tolist() == [0] * 5 + [1] * 5
    assert pids_from_names(slots[:1], "cuhk03").tolist() == ["0007"]
    assert camera_ids(["s1/1.pgm", "s2/3.pgm"], "none").tolist() == [-1, -1]
    assert set(CONVENTIONS) == {"market1501", "duke", "cuhk03", "none"}


def test_convention_errors_name_the_file_and_the_choices() -> None:
    mismatch = r"x/0001_c1_f00.jpg: file name '0001_c1_f00' does not match the market1501 convention"
    with pytest.raises(ReidTuneError, match=mismatch):
        camera_ids(["ok/0001_c1s1_000001_00.jpg", "x/0001_c1_f00.jpg"], "market1501")
    with pytest.raises(ReidTuneError, match="0001_10.jpg.*cuhk03"):
        camera_ids(["0001_10.jpg"], "cuhk03")
    with pytest.raises(ReidTuneError, match="convention='viper': unknown; expected one of market1501, duke"):
        camera_ids(["a.jpg"], "viper")
    with pytest.raises(ReidTuneError, match="'none' has no person ids"):
        pids_from_names(["a.jpg"], "none")


# Converters
###

MARKET = {
    "bounding_box_train": ["0007_c2s3_070952_01.jpg", "0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg",
                           "0007_c1s6_028546_01.jpg"],
    "query": ["1488_c1s6_023021_00.jpg.jpg", "0001_c1s1_001051_00.jpg"],
    "bounding_box_test": ["0001_c2s1_000301_01.jpg", "1488_c2s3_065527_02.jpg.jpg", "0000_c1s1_000151_01.jpg",
                          "-1_c1s1_000401_03.jpg", "1488_c1s6_023021_02.jpg.jpg"],
}
# Rows as in triplet-reid's data/market1501_*.csv: sorted, pids as named, junk and distractors kept.
MARKET_ROWS = {
    "market1501_train.csv": "0002,bounding_box_train/0002_c1s1_000451_03.jpg\n"
                            "0002,bounding_box_train/0002_c2s1_000301_01.jpg\n"
                            "0007,bounding_box_train/0007_c1s6_028546_01.jpg\n"
                            "0007,bounding_box_train/0007_c2s3_070952_01.jpg\n",
    "market1501_query.csv": "0001,query/0001_c1s1_001051_00.jpg\n"
                            "1488,query/1488_c1s6_023021_00.jpg.jpg\n",
    "market1501_test.csv": "-1,bounding_box_test/-1_c1s1_000401_03.jpg\n"
                           "0000,bounding_box_test/0000_c1s1_000151_01.jpg\n"
                           "0001,bounding_box_test/0001_c2s1_000301_01.jpg\n"
                           "1488,bounding_box_test/1488_c1s6_023021_02.jpg.jpg\n"
                           "1488,bounding_box_test/1488_c2s3_065527_02.jpg.jpg\n",
}


def test_prepare_market1501_writes_the_original_lists(tmp_path: Path) -> None:
    src = _tree(tmp_path / "Market-1501-v15.09.15", MARKET)
    written = prepare("market1501", src, tmp_path / "lists")
    assert written == [tmp_path / "lists" / name for name in MARKET_ROWS]
    assert {path.name: path.read_text() for path in written} == MARKET_ROWS
    test = load_csv(tmp_path / "lists" / "market1501_test.csv", image_root=src, check_images=True)
    assert camera_ids(test.fids, "market1501").tolist() == [1, 1, 2, 1, 2]


def test_prepare_duke_writes_the_original_lists(tmp_path: Path) -> None:
    src = _tree(tmp_path / "DukeMTMC-reID", {
        "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg", "0003_c1_f0044278.jpg",
                               "0003_c1_f0044158.jpg"],
        "query": ["0005_c2_f0046985.jpg"],
        "bounding_box_test": ["0005_c5_f0051901.jpg", "0002_c1_f0044158.jpg"],
    })
    written = prepare("duke", src, tmp_path)
    names = ["dukeMTMC_train.csv", "dukeMTMC_query.csv", "dukeMTMC_test.csv"]
    assert [path.name for path in written] == names
    assert [path.read_text() for path in written] == [
        "0001,bounding_box_train/0001_c2_f0046182.jpg\n0001,bounding_box_train/0001_c5_f0051341.jpg\n"
        "0003,bounding_box_train/0003_c1_f0044158.jpg\n0003,bounding_box_train/0003_c1_f0044278.jpg\n",
        "0005,query/0005_c2_f0046985.jpg\n",
        "0002,bounding_box_test/0002_c1_f0044158.jpg\n0005,bounding_box_test/0005_c5_f0051901.jpg\n",
    ]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda src: (src / "bounding_box_train" / "0007_c1s6_028546_01.jpg").unlink(),
         r"market1501_train.csv:3: identity '0007' has 1 image\(s\) "
         r"\(bounding_box_train/0007_c2s3_070952_01.jpg\)"),
        (lambda src: (src / "query" / "0001_c1s1_001051_00.jpg").write_bytes(b"truncated"),
         r"query/0001_c1s1_001051_00.jpg: not readable as an image"),
        (lambda src: _image(src / "bounding_box_test" / "holiday.jpg"),
         r"bounding_box_test/holiday.jpg: file name 'holiday' does not match the market1501 convention"),
        (lambda src: [p.unlink() for p in (src / "query").glob("*.jpg*")],
         r"query: no images, expected files ending in"),
        (lambda src: [p.unlink() for p in (src / "query").iterdir()] and (src / "query").rmdir(),
         r"query: no such folder"),
    ],
)
def test_prepare_fails_with_one_line_and_writes_nothing(tmp_path: Path, damage, message: str) -> None:
    src = _tree(tmp_path / "market", MARKET)
    damage(src)
    out = tmp_path / "lists"
    out.mkdir()
    (out / "market1501_train.csv").write_text("old list\n")
    with pytest.raises(ReidTuneError, match=message) as error:
        prepare("market1501", src, out)
    assert "\n" not in str(error.value)
    assert _snapshot(out) == {"market1501_train.csv": b"old list\n"}
    with pytest.raises(ReidTuneError):
        prepare("market1501", src, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_prepare_rejects_unknown_kind_and_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ReidTuneError, match="kind='viper': unknown; expected one of market1501, duke, cuh"):
        prepare("viper", tmp_path, tmp_path)
    with pytest.raises(ReidTuneError, match="nowhere: no such folder"):
        prepare("cuhk03", tmp_path / "nowhere", tmp_path)


def test_prepare_cuhk03_splits_sub_folders_by_camera(tmp_path: Path) -> None:
    src = _tree(tmp_path / "cuhk03", {
        "val": ["0001_00.jpg", "0001_06.jpg", "0002_01.jpg", "0002_05.jpg", "0002_09.jpg"],
        "train": ["1000_00.jpg", "1000_05.jpg"],
    })
    (src / "README.md").write_text("not an image\n")
    written = prepare("cuhk03", src, tmp_path / "lists")
    assert [path.name for path in written] == [
        "cuhk03_train.csv", "cuhk03_train_query.csv", "cuhk03_train_gallery.csv",
        "cuhk03_val.csv", "cuhk03_val_query.csv", "cuhk03_val_gallery.csv",
    ]
    lists = {path.name: path.read_text() for path in written}
    assert lists["cuhk03_val_query.csv"] == "0001,val/0001_00.jpg\n0002,val/0002_01.jpg\n"
    assert lists["cuhk03_val_gallery.csv"] == (
        "0001,val/0001_06.jpg\n0002,val/0002_05.jpg\n0002,val/0002_09.jpg\n"
    )
    assert lists["cuhk03_train.csv"] == "1000,train/1000_00.jpg\n1000,train/1000_05.jpg\n"


def test_prepare_cuhk03_flat_folder_is_split_all(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    for name in ("0003_02.jpg", "0003_07.jpg"):
        _image(src / name)
    written = prepare("cuhk03", src, src)
    assert [path.name for path in written] == [f"cuhk03_all{role}.csv" for role in ("", "_query", "_gallery")]
    assert written[0].read_text() == "0003,0003_02.jpg\n0003,0003_07.jpg\n"
    _image(src / "extra" / "0004_01.jpg")
    with pytest.raises(ReidTuneError, match="holds both images and sub-folders"):
        prepare("cuhk03", src, tmp_path / "out")


def test_prepare_cuhk03_needs_both_cameras_and_pairs(tmp_path: Path) -> None:
    _tree(tmp_path / "one_camera", {"val": ["0001_00.jpg", "0001_01.jpg"]})
    with pytest.raises(ReidTuneError, match="cuhk03_val_gallery.csv: no images would be listed"):
        prepare("cuhk03", tmp_path / "one_camera", tmp_path / "out")
    _tree(tmp_path / "lonely", {"val": ["0001_00.jpg", "0001_05.jpg", "0002_00.jpg"]})
    with pytest.raises(ReidTuneError, match=r"cuhk03_val.csv:3: identity '0002' has 1 image"):
        prepare("cuhk03", tmp_path / "lonely", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_folder_uses_sub_folder_names_as_pids(tmp_path: Path) -> None:
    src = _tree(tmp_path / "faces", {"s2": ["1.pgm", "10.pgm"], "s10": ["2.pgm", "1.pgm"]})
    (written,) = prepare("folder", src, tmp_path / "lists")
    assert written == tmp_path / "lists" / "faces.csv"
    assert written.read_text() == "s10,s10/1.pgm\ns10,s10/2.pgm\ns2,s2/1.pgm\ns2,s2/10.pgm\n"
    (src / "s10" / "2.pgm").unlink()
    with pytest.raises(ReidTuneError, match=r"faces.csv:1: identity 's10' has 1 image"):
        prepare("folder", src, tmp_path / "other")


def test_prepare_real_cuhk03(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "cuhk03-labeled"
    written = prepare("cuhk03", src, tmp_path)
    assert sorted(path.name for path in written) == sorted(
        f"cuhk03_{split}{role}.csv"
        for split in ("val", "train_resized")
        for role in ("", "_query", "_gallery")
    )
    val = load_csv(tmp_path / "cuhk03_val.csv", image_root=src)
    assert len(val) == 938 and len(set(val.pids)) == 100
    assert np.bincount(camera_ids(val.fids, "cuhk03")).tolist() == [451, 487]
    assert len(load_csv(tmp_path / "cuhk03_val_query.csv")) == 451
    assert len(load_csv(tmp_path / "cuhk03_val_gallery.csv")) == 487
    assert len(load_csv(tmp_path / "cuhk03_train_resized.csv")) == 7239
    assert val.fids[0] == "val/0000_00.jpg" and (src / val.fids[0]).is_file()


def test_prepare_real_orl_faces(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "orl-faces"
    (written,) = prepare("folder", src, tmp_path)
    faces = load_csv(written, image_root=src, check_images=True)
    assert written.name == "orl-faces.csv" and len(faces) == 400 and len(set(faces.pids)) == 40
    assert (faces.pids[0], faces.fids[0]) == ("s1", "s1/1.pgm")
    assert load_image(src / faces.fids[0]).mode == "RGB"
    assert camera_ids(faces.fids, "none").tolist() == [-1] * 400

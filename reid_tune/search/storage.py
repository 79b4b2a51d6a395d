"""The search's storage: a local folder or a URI (``s3://``, ``gs://``, ...) that every node shares.

Ray Tune and Ray Train reach it through pyarrow's file systems; so does reid-tune for its own few files
(the search's state and the trials' kept checkpoints), so a search runs the same on a laptop folder, a
shared file system mounted on every node, or a bucket.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from reid_tune import atomic
from reid_tune.errors import ReidTuneError

STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # pyarrow's file systems


def is_uri(location: str) -> bool:
    """Whether ``location`` names a file system by scheme (``s3://...``, ``file:///...``)."""
    return "://" in location


def absolute(location: str) -> str:
    """A URI as it is; a local path made absolute (trials and Ray workers run in other folders)."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """``location`` with ``parts`` appended to its path; a URI keeps its query (``?endpoint_override=``)."""
    if not is_uri(location):
        return str(Path(location, *parts))
    scheme, netloc, path, query, fragment = urlsplit(location)
    path = "/".join([path.rstrip("/"), *parts])
    return urlunsplit((scheme, netloc, path, query, fragment))


def file_system(location: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's file system of ``location`` and the path within it, as Ray resolves them."""
    try:
        return pafs.FileSystem.from_uri(absolute(location))
    except (pafs.ArrowInvalid, pafs.ArrowNotImplementedError, OSError, ValueError) as err:
        raise ReidTuneError(f"storage {location}: {err}") from None


def read_text(location: str) -> str | None:
    """The text of the file at ``location``, or None when there is none."""
    fs, path = file_system(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str, text: str) -> None:
    """Write ``text`` to the file at ``location``, creating its folder; readers see all of it or nothing
    (an object store commits on close; a local file is written beside and renamed)."""
    fs, path = file_system(location)
    if isinstance(fs, pafs.LocalFileSystem):
        atomic.write_text(path, text)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def entries(location: str) -> list[str]:
    """Names of the files and folders directly under ``location`` (none when it does not exist)."""
    fs, path = file_system(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


@contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local folder with the contents of the folder ``location``: itself when local, else a download
    that is removed afterwards."""
    fs, path = file_system(location)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    folder = Path(tempfile.mkdtemp(prefix="reid-tune-download-"))
    try:
        pafs.copy_files(
            path, str(folder), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)

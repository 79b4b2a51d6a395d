"""Atomic output: a file appears whole or not at all, so a failure never leaves half-written output.

The one way reid-tune writes a file: CSV lists, options, checkpoints, embeddings, decoded caches,
reports and the generated demo folder all go through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from reid_tune.errors import InputError


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (a file, or a folder the caller makes); renamed over
    ``path`` on success, removed on failure."""
    path = Path(path)
    temp = path.with_name(f"{_temp_prefix(path)}{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temp
        os.replace(temp, path)
    except OSError as exc:
        raise InputError(f"{exc.filename or path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


def remove_stale_temps(path: str | Path) -> None:
    """Remove the temporary files a killed writer of ``path`` left (call it holding the writer's lock)."""
    path = Path(path)
    for stale in path.parent.glob(f"{_temp_prefix(path)}*.tmp"):
        stale.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_texts({Path(path): text})


def write_texts(files: Mapping[Path, str]) -> None:
    """Write all ``files`` or none: every text is written to its temporary file before any is renamed."""
    with contextlib.ExitStack() as stack:
        for path, text in files.items():
            temp = stack.enter_context(atomic_path(path))
            temp.write_text(text, encoding="utf-8", newline="\n")

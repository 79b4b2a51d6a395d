"""The version of the code that ran, as runs record it: the package version and its git commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import reid_tune


def code_version() -> str:
    """The package version, with the git commit when running from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(reid_tune.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return reid_tune.__version__
    return f"{reid_tune.__version__}+g{commit}"

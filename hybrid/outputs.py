"""Checks on the directories a command will write, made before any work is done."""

from __future__ import annotations

import os
from pathlib import Path


def require_output_dir(path: str | Path, where: str) -> Path:
    """``path`` as a Path, failing with one line naming ``where`` if it (or a parent) exists
    and is not a directory, or if the nearest existing directory is not writable.

    Nothing is created: the command makes the directory when it writes.
    """
    path = Path(path)
    for part in [path, *path.parents]:
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                what = "it" if part == path else f"its parent {part}"
                raise ValueError(f"{where}: {path}: {what} is a file, not a directory")
            if not os.access(part, os.W_OK | os.X_OK):
                raise ValueError(f"{where}: {path}: {part} is not writable")
            break
    return path

"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one,
never a partial one.

Every file the project writes for later use (checkpoints, caches, results, tokenizers, model
directories, tokenized data) goes through :func:`atomic_write`: the content is written to a
temporary file in the target's own directory (so the rename never crosses a filesystem),
flushed to disk, renamed onto the target, and the directory entry is flushed too. On any
failure, including ``KeyboardInterrupt``, the temporary file is removed and the target is left
as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path``: ``.NAME.<pid>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


def stale_temporaries(directory: str | Path, name_pattern: str = "*") -> list[Path]:
    """Temporary files that a killed write of a file matching ``name_pattern`` left in
    ``directory`` (e.g. ``stale_temporaries(dir, "*.ckpt")``)."""
    return sorted(Path(directory).glob(f".{name_pattern}.*{TEMPORARY_SUFFIX}"))


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable where the platform allows it (POSIX)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on a clean exit it replaces
    ``path`` durably, on an exception it is removed and ``path`` is untouched.

    The parent directory is created if needed. The new file gets the permissions a plain
    ``open`` gives under the process's umask (0644 under 022), whatever wrote it: safetensors
    creates its files 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~current_umask())
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Run ``write(temporary_path)`` and move the result onto ``path`` atomically; returns
    ``path``."""
    with atomic_path(path) as temporary:
        write(temporary)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda temporary: temporary.write_bytes(data))

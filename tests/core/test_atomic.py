"""The one atomic writer: a target is always the old file or the new one, never partial, and a
failed or killed write leaves nothing but a temporary file that can be found and removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid.atomic import (
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    stale_temporaries,
    temporary_name,
)


def test_writes_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "new" / "dir" / "results.json"
    assert atomic_write_text(target, "first\n") == target
    assert target.read_text() == "first\n"
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, failure):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def half_then_fail(temporary: Path) -> None:
        temporary.write_bytes(b"new but incomplete")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_writer_that_never_creates_the_file_fails_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "cache.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        atomic_write(target, lambda temporary: None)
    assert target.read_bytes() == b"old"


def test_the_new_file_has_the_permissions_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_written_0600_by_their_writer_follow_the_umask(tmp_path, umask):
    """safetensors creates its files 0600; checkpoints, model files and caches must not."""
    import torch
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain"
        plain.write_text("x")
        atomic_write(tmp_path / "w.safetensors", lambda t: save_file({"a": torch.ones(1)}, t))
        atomic_write(tmp_path / "w.pt", lambda t: torch.save({"a": 1}, t))
    finally:
        os.umask(previous)
    assert (plain.stat().st_mode & 0o777) == 0o666 & ~umask
    for name in ("w.safetensors", "w.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_temporaries_sit_beside_the_target_hidden_and_unique(tmp_path):
    target = tmp_path / "last.ckpt"
    names = {temporary_name(target) for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.parent == tmp_path
        assert name.name.startswith(".last.ckpt.") and name.name.endswith(".tmp")
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and not temporary.exists()
        temporary.write_text("done")
    assert target.read_text() == "done"


def test_a_killed_write_leaves_the_old_file_and_a_findable_temporary(tmp_path):
    """kill -9 in the middle of a write: the target is untouched; the leftover temporary is
    what :func:`stale_temporaries` finds (and only it: other hidden files are not listed)."""
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous checkpoint")
    (tmp_path / ".gitignore").write_text("*")
    started = tmp_path / "started"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from hybrid.atomic import atomic_write\n"
        "def slow(temporary):\n"
        "    temporary.write_bytes(b'half')\n"
        f"    Path({str(started)!r}).touch()\n"
        "    time.sleep(60)\n"
        f"atomic_write(Path({str(target)!r}), slow)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert process.poll() is None and time.monotonic() < deadline, "writer never started"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert target.read_bytes() == b"previous checkpoint"
    leftovers = stale_temporaries(tmp_path, "*.ckpt")
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"half"
    assert stale_temporaries(tmp_path, "*.json") == []


def test_the_package_writes_files_only_through_the_atomic_writer():
    """No ``path.write_text`` / ``write_bytes`` / ``open(path, "w")`` in hybrid/ outside
    hybrid/atomic.py: every file a later step reads is written whole or not at all."""
    import ast

    root = Path(__file__).resolve().parents[2] / "hybrid"
    plain = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "atomic.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            function = node.func
            name = (
                function.attr
                if isinstance(function, ast.Attribute)
                else getattr(function, "id", "")
            )
            mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), "r")
            if name in ("write_text", "write_bytes") or (
                name == "open" and isinstance(mode, str) and any(c in mode for c in "wax")
            ):
                plain.append(f"{path.relative_to(root.parent)}:{node.lineno} {name}")
    assert plain == []

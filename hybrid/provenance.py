"""Where results come from: the git commit of the source tree that produced them, and the
CPU that ran them."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def source_commit() -> str | None:
    """The git commit of the ``hybrid`` source tree (``-dirty`` with uncommitted changes to
    tracked files), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def cpu_description() -> str:
    """The CPU as timings should name it: its model (from /proc/cpuinfo on Linux), the vector
    instructions torch's CPU kernels dispatch to (AVX2, AVX512, ...) and the thread count, e.g.
    ``CPU x86_64 AMD EPYC (AVX2), 2 threads``. Compiled code and matmul rates differ most
    between vector widths, so results from different ones do not compare."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = f"{platform.machine()} {model}".strip()
    return (
        f"CPU {name} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"
    )

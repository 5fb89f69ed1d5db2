"""Where results come from: the git commit of the source tree that produced them, and the
CPU that ran them."""

from __future__ import annotations

import os
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


def cpu_description(threads: int | None = None) -> str:
    """The CPU as timings should name it: its model (from /proc/cpuinfo on Linux), the vector
    instructions torch's CPU kernels dispatch to (AVX2, AVX512, ...) and the thread count
    (``threads``, or torch's own), e.g. ``CPU x86_64 AMD EPYC (AVX2), 2 threads``. Compiled code
    and matmul rates differ most between vector widths, so results from different ones do not
    compare."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = f"{platform.machine()} {model}".strip()
    threads = torch.get_num_threads() if threads is None else threads
    return f"CPU {name} ({torch.backends.cpu.get_cpu_capability()}), {threads} threads"


def allocator_settings() -> dict[str, str]:
    """The glibc ``malloc`` tunables set in the environment (``MALLOC_*``, ``GLIBC_TUNABLES``).

    With glibc's defaults, large temporaries are mapped fresh and page-faulted on every call, and
    CPU timings spread by up to ±40% between processes; ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` set high keep them in the heap. Timings taken with and without
    these settings do not compare, so benchmarks record them."""
    return {
        key: value
        for key, value in sorted(os.environ.items())
        if key.startswith("MALLOC_") or key == "GLIBC_TUNABLES"
    }

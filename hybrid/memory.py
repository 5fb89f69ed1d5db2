"""Refusing work that cannot fit in memory before anything is allocated.

A size typed wrong (``--max-new-tokens`` in the billions, ``model.d_model`` in the millions)
otherwise ends in the allocator's traceback, or worse, in the machine swapping. The estimates
here are of the large tensors only (parameters, inference caches, logits); a refusal names the
estimate, what it is for, and the memory the device has free.
"""

from __future__ import annotations

import os

import torch

from hybrid.units import human_bytes


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory of ``device`` in bytes (CPU: the kernel's MemAvailable), or None if unknown
    (meta tensors, other devices, no /proc)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_fits(nbytes: int, what: str, device: torch.device | str = "cpu") -> None:
    """Fail with one line if ``nbytes`` exceed the free memory of ``device``.

    Raises:
        ValueError: ``"{what}: needs about X, more than the Y free on DEVICE"``.
    """
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise ValueError(
            f"{what}: needs about {human_bytes(nbytes)}, more than the {human_bytes(free)} "
            f"free on {torch.device(device)}"
        )

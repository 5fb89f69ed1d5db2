"""Lazy access to the optional CUDA kernels (mamba-ssm, causal-conv1d).

Both packages ship compiled CUDA extensions that fail to import on CPU-only machines (missing
libcudart, undefined symbols, no triton, ...). Nothing here imports them at module import time;
the loaders try once, cache the outcome, and return ``None`` when the kernels are unusable so
callers fall back to the pure PyTorch implementations.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

__all__ = ["causal_conv1d_ops", "mamba_ssm_ops", "needs_autograd", "use_kernels"]

_DISABLE_ENV = "HYBRID_DISABLE_KERNELS"


@functools.cache
def mamba_ssm_ops() -> SimpleNamespace | None:
    """Return the mamba-ssm kernels, or ``None`` if they cannot be imported.

    Attributes: ``mamba_chunk_scan_combined``, ``selective_scan_fn``, ``selective_state_update``.
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, OSError from missing CUDA libs, triton errors, ...
        return None
    return SimpleNamespace(
        mamba_chunk_scan_combined=mamba_chunk_scan_combined,
        selective_scan_fn=selective_scan_fn,
        selective_state_update=selective_state_update,
    )


@functools.cache
def causal_conv1d_ops() -> SimpleNamespace | None:
    """Return the causal-conv1d kernels, or ``None`` if they cannot be imported.

    Attributes: ``causal_conv1d_fn``, ``causal_conv1d_update``.
    """
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:
        return None
    return SimpleNamespace(
        causal_conv1d_fn=causal_conv1d_fn,
        causal_conv1d_update=causal_conv1d_update,
    )


def use_kernels(*tensors: torch.Tensor | None) -> bool:
    """True if every given tensor lives on CUDA and kernels are not disabled.

    ``None`` entries (absent optional arguments) are ignored. Setting the environment variable
    ``HYBRID_DISABLE_KERNELS=1`` forces the PyTorch reference paths, e.g. to debug or to compare.
    """
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):
        return False  # decided before the (slower) environment lookup: CPU decode calls this
    return os.environ.get(_DISABLE_ENV) != "1"


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True if autograd would record ops on any of the given tensors.

    The one-token update kernels (``selective_state_update``, ``causal_conv1d_update``) are
    plain functions without a backward, so the step functions only call them when this is
    False (inference: ``torch.no_grad`` / ``torch.inference_mode``, or no input requiring grad).
    """
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

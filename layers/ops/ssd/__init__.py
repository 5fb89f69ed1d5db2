"""Mamba-2's state space duality (SSD) scan: dispatch, chunked and one-token paths, reference.

Per head ``h`` (using B/C group ``h // (nheads // ngroups)``), with ``a_t = exp(dt_t * A_h)``:

    state_t = a_t * state_{t-1} + dt_t * outer(x_t, B_t)     # (headdim, d_state)
    y_t     = state_t @ C_t + D_h * x_t

- ``dispatch.py``: :func:`ssd_scan`, :func:`ssd_step` and :func:`ssd_update` (in place), the
  functions blocks call; they run mamba_ssm's kernels on CUDA when those import, else the
  PyTorch paths;
- ``chunk.py``: :func:`ssd_chunked_torch`, the chunked scan over a whole sequence;
- ``step.py``: :func:`ssd_step_torch` and :func:`ssd_update_torch`, one token of the recurrence;
- ``naive.py``: :func:`ssd_naive`, the recurrence token by token in float64 (the reference).
"""

from .chunk import ssd_chunked_torch
from .dispatch import TORCH_MAX_CHUNK, ssd_scan, ssd_step, ssd_update
from .naive import ssd_naive
from .step import ssd_step_torch, ssd_update_torch

__all__ = [
    "TORCH_MAX_CHUNK",
    "ssd_chunked_torch",
    "ssd_naive",
    "ssd_scan",
    "ssd_step",
    "ssd_step_torch",
    "ssd_update",
    "ssd_update_torch",
]

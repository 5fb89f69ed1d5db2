"""Mamba-1's selective scan: dispatch, chunked and one-token paths, reference.

Per channel ``d`` and state ``n`` (B/C shared by all channels, or per channel group):

    h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[n] * u_t[d]
    y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]

- ``dispatch.py``: :func:`selective_scan`, :func:`selective_scan_step` and
  :func:`selective_scan_update` (in place), the functions blocks call; they run mamba_ssm's
  kernels on CUDA when those import, else the PyTorch paths;
- ``chunk.py``: :func:`selective_scan_torch`, the chunked scan with a hand-written backward;
- ``step.py``: :func:`selective_scan_step_torch` and :func:`selective_scan_update_torch`, one
  token of the recurrence;
- ``naive.py``: :func:`selective_scan_naive`, the recurrence token by token in float64 (the
  reference).
"""

from .chunk import selective_scan_torch
from .dispatch import selective_scan, selective_scan_step, selective_scan_update
from .naive import selective_scan_naive
from .step import selective_scan_step_torch, selective_scan_update_torch

__all__ = [
    "selective_scan",
    "selective_scan_naive",
    "selective_scan_step",
    "selective_scan_step_torch",
    "selective_scan_torch",
    "selective_scan_update",
    "selective_scan_update_torch",
]

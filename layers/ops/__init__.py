"""Numerical core of the SSM blocks: causal conv, Mamba-2 SSD scan, Mamba-1 selective scan.

One folder per op (``conv/``, ``ssd/``, ``selective_scan/``), each with the dispatch that the
blocks call (the mamba-ssm / causal-conv1d CUDA kernels when the tensors are on CUDA and the
kernels import, else PyTorch), the PyTorch paths over a sequence and for one token
(differentiable, CPU), and ``naive.py``: the recurrence written plainly in float64, the
reference the other paths are tested against.
"""

from ._common import NO_LIMIT, document_index, document_starts, effective_dt
from .conv import causal_conv1d, causal_conv1d_naive, causal_conv1d_step, causal_conv1d_update
from .kernels import causal_conv1d_ops, mamba_ssm_ops, use_kernels
from .selective_scan import (
    selective_scan,
    selective_scan_naive,
    selective_scan_step,
    selective_scan_torch,
    selective_scan_update,
)
from .ssd import ssd_chunked_torch, ssd_naive, ssd_scan, ssd_step, ssd_update

__all__ = [
    "NO_LIMIT",
    "causal_conv1d",
    "causal_conv1d_naive",
    "causal_conv1d_ops",
    "causal_conv1d_step",
    "causal_conv1d_update",
    "document_index",
    "document_starts",
    "effective_dt",
    "mamba_ssm_ops",
    "selective_scan",
    "selective_scan_naive",
    "selective_scan_step",
    "selective_scan_torch",
    "selective_scan_update",
    "ssd_chunked_torch",
    "ssd_naive",
    "ssd_scan",
    "ssd_step",
    "ssd_update",
    "use_kernels",
]

"""Depthwise causal 1-d convolution (the short conv in front of Mamba's SSM): dispatch, the
sequence and one-token paths, reference.

Layout follows causal-conv1d: channels first, ``x`` is (batch, dim, seqlen) and ``weight`` is
(dim, width). The conv state carried between calls is the last ``width - 1`` *inputs*, so a
sequence can be processed in pieces (prefill then per-token decoding) with identical results.

- ``dispatch.py``: :func:`causal_conv1d`, :func:`causal_conv1d_step` and
  :func:`causal_conv1d_update` (in place), the functions blocks call; they run
  causal-conv1d's kernels on CUDA when those import, else the PyTorch paths;
- ``sequence.py``: :func:`causal_conv1d_torch`, the conv over a whole sequence;
- ``step.py``: :func:`causal_conv1d_step_torch` and :func:`causal_conv1d_update_torch`, one
  token;
- ``naive.py``: :func:`causal_conv1d_naive`, the conv tap by tap in float64 (the reference).
"""

from .dispatch import causal_conv1d, causal_conv1d_step, causal_conv1d_update
from .naive import causal_conv1d_naive
from .sequence import causal_conv1d_torch
from .step import causal_conv1d_step_torch, causal_conv1d_update_torch

__all__ = [
    "causal_conv1d",
    "causal_conv1d_naive",
    "causal_conv1d_step",
    "causal_conv1d_step_torch",
    "causal_conv1d_torch",
    "causal_conv1d_update",
    "causal_conv1d_update_torch",
]

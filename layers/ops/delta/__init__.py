"""The gated delta rule (Gated DeltaNet's recurrence): dispatch, chunked and one-token paths,
reference.

- ``dispatch.py``: :func:`gated_delta_rule` and :func:`gated_delta_step`, what blocks call;
  flash-linear-attention's kernels on CUDA when they import, else PyTorch;
- ``chunk.py``: :func:`gated_delta_chunked_torch`, the chunked WY-form scan over a sequence;
- ``step.py``: :func:`gated_delta_step_torch`, one token of the recurrence;
- ``naive.py``: :func:`gated_delta_naive`, the recurrence token by token in float64.
"""

from .chunk import gated_delta_chunked_torch
from .dispatch import fla_ops, gated_delta_rule, gated_delta_step
from .naive import gated_delta_naive
from .step import gated_delta_step_torch

__all__ = [
    "fla_ops",
    "gated_delta_chunked_torch",
    "gated_delta_naive",
    "gated_delta_rule",
    "gated_delta_step",
    "gated_delta_step_torch",
]

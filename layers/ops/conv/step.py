"""One token of the causal depthwise conv in plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import as_dtype
from .sequence import _check_activation

__all__ = ["causal_conv1d_step_torch", "causal_conv1d_update_torch"]


def causal_conv1d_step_torch(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of the causal conv in plain PyTorch: what :func:`causal_conv1d_step`
    runs when the kernel does not. Functional (``conv_state`` is not modified), so autograd
    can go through it.

    Same arguments and results as :func:`causal_conv1d_step`: x (batch, dim), conv_state
    (batch, dim, width - 1) -> y like x, new_state like conv_state.
    """
    silu = _check_activation(activation)
    window = torch.cat([conv_state.to(weight.dtype), x.to(weight.dtype).unsqueeze(-1)], dim=-1)
    y = torch.einsum("bdw,dw->bd", window, weight)
    if bias is not None:
        y = y + bias
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), window[..., 1:].to(conv_state.dtype)


def causal_conv1d_update_torch(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> torch.Tensor:
    """:func:`causal_conv1d_step_torch` shifting ``conv_state`` in place (decoding, no
    autograd). x (batch, dim), conv_state (batch, dim, width - 1) -> y (batch, dim) in x's
    dtype."""
    silu = _check_activation(activation)
    dtype = weight.dtype
    window = torch.cat([as_dtype(conv_state, dtype), as_dtype(x, dtype).unsqueeze(-1)], dim=-1)
    conv_state.copy_(window[..., 1:])
    y = torch.linalg.vecdot(window, weight)  # (batch, dim)
    if bias is not None:
        y = y.add_(bias)
    if silu:
        y = F.silu(y, inplace=True)
    return as_dtype(y, x.dtype)

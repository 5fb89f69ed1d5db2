"""The causal depthwise conv written plainly, tap by tap in float64: the specification.

    y[:, d, t] = bias[d] + sum_k weight[d, k] * xx[:, d, t + k],   xx = initial_state | x

The sequence and one-token paths are tested against it.
"""

from __future__ import annotations

import torch

__all__ = ["causal_conv1d_naive"]


def causal_conv1d_naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One multiply-add per filter tap over the whole sequence, in float64.

    Arguments as :func:`layers.ops.causal_conv1d` (x (batch, dim, seqlen), weight (dim, width),
    initial_state (batch, dim, width - 1) or None for zeros). Computes in float64 whatever the
    inputs' dtype, differentiably.

    Returns:
        y: (batch, dim, seqlen) and the final state, the last ``width - 1`` inputs of
        ``initial_state | x``: (batch, dim, width - 1), both float64.
    """
    x, weight = x.double(), weight.double()
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if initial_state is None:
        initial_state = torch.zeros(batch, dim, width - 1, dtype=torch.float64, device=x.device)
    xx = torch.cat([initial_state.double(), x], dim=-1)
    y = torch.zeros(batch, dim, seqlen, dtype=torch.float64, device=x.device)
    for k in range(width):
        y += weight[:, k, None] * xx[:, :, k : k + seqlen]
    if bias is not None:
        y += bias.double()[:, None]
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y, xx[:, :, xx.shape[-1] - (width - 1) :]

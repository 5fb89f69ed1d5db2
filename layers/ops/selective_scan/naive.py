"""The selective-scan recurrence written plainly, one token at a time in float64: the
specification.

Per channel ``d`` and state ``n`` (B/C of channel ``d``'s group):

    h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[n] * u_t[d]
    y_t[d]    = (sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]) * silu(z_t[d])

The chunked and one-token paths are tested against it; it is far too slow for anything else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_naive"]


def selective_scan_naive(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ; y_t = C_t . h_t + D u_t, token by token.

    Arguments as :func:`layers.ops.selective_scan` (B, C (batch, d_state, seqlen) or
    (batch, ngroups, d_state, seqlen)). Computes in float64 whatever the inputs' dtype,
    differentiably.

    Returns:
        y: (batch, dim, seqlen) and the final state (batch, dim, d_state), both float64.
    """
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, seqlen = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    group = torch.arange(dim, device=u.device) // (dim // B.shape[1])  # group of each channel
    B, C = B[:, group], C[:, group]  # (batch, dim, d_state, seqlen)
    if initial_state is None:
        h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64, device=u.device)
    else:
        h = initial_state.double().clone()
    ys = []
    for t in range(seqlen):
        h = (
            torch.exp(delta[:, :, t, None] * A) * h
            + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        )
        y = (h * C[..., t]).sum(-1)
        if D is not None:
            y = y + D.double() * u[:, :, t]
        if z is not None:
            y = y * F.silu(z[:, :, t].double())
        ys.append(y)
    return torch.stack(ys, -1), h

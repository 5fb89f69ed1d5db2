"""The SSD recurrence written plainly, one token at a time in float64: the specification.

Per head ``h`` (B/C group ``g = h // (nheads // ngroups)``), with ``a_t = exp(dt_t * A_h)``:

    state_t = a_t * state_{t-1} + dt_t * outer(x_t, B_t[g])     # (headdim, d_state)
    y_t     = (state_t @ C_t[g] + D_h * x_t) * silu(z_t)

The chunked and one-token paths are tested against it; it is far too slow for anything else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ssd_naive"]


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t, one token at a time.

    Arguments as :func:`layers.ops.ssd_scan` (the time step transformed the same way), without
    a chunk size. Computes in float64 whatever the inputs' dtype, differentiably.

    Returns:
        y: (batch, seqlen, nheads, headdim) and the final state (batch, nheads, headdim,
        d_state), both float64.
    """
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    batch, seqlen, nheads, headdim = x.shape
    group = torch.arange(nheads, device=x.device) // (nheads // B.shape[2])  # group of each head
    if initial_state is None:
        h = torch.zeros(batch, nheads, headdim, B.shape[-1], dtype=torch.float64, device=x.device)
    else:
        h = initial_state.double().clone()
    ys = []
    for t in range(seqlen):
        Bt, Ct = B[:, t, group], C[:, t, group]  # (batch, nheads, d_state)
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        y = (h * Ct[:, :, None, :]).sum(-1)
        if D is not None:
            Dd = D.double()
            y = y + x[:, t] * (Dd[:, None] if Dd.dim() == 1 else Dd)
        if z is not None:
            y = y * F.silu(z[:, t].double())
        ys.append(y)
    return torch.stack(ys, 1), h

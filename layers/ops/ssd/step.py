"""One token of the SSD recurrence in plain PyTorch (decoding on CPU, or with autograd)."""

from __future__ import annotations

import torch

from .._common import NO_LIMIT, compute_dtype, effective_dt, skip_and_gate
from .chunk import _decay, _head_skip

__all__ = ["ssd_step_torch"]


def ssd_step_torch(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the SSD recurrence in plain PyTorch: what :func:`ssd_step` runs when the
    kernel does not (CPU, autograd, float64, dt_limit). Functional: ``state`` is not modified.

    Same arguments and results as :func:`ssd_step`: state (batch, nheads, headdim, d_state),
    x (batch, nheads, headdim) -> y like x, new_state like state. Computes in float32 (float64
    for float64 inputs) with autocast disabled.
    """
    batch, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    rep = nheads // ngroups
    dtype = compute_dtype(state, x, dt, A, B, C)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.to(dtype)
        dtf = effective_dt(dt.to(dtype), dt_bias, dt_softplus, dt_limit)
        decay = _decay(dtf * A.to(dtype)).view(batch, nheads, 1, 1)
        xdt = (xf * dtf.unsqueeze(-1)).view(batch, ngroups, rep, headdim, 1)
        inp = (xdt * B.to(dtype).view(batch, ngroups, 1, 1, d_state)).view_as(state)
        new_state = torch.addcmul(inp, state.to(dtype), decay)
        grouped = new_state.view(batch, ngroups, rep * headdim, d_state)
        y = torch.matmul(grouped, C.to(dtype).unsqueeze(-1)).view(batch, nheads, headdim)
        y = skip_and_gate(y, xf, _head_skip(D), z).to(x.dtype)
    return y, new_state.to(state.dtype)

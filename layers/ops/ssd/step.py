"""One token of the SSD recurrence in plain PyTorch (decoding on CPU, or with autograd)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import NO_LIMIT, as_dtype, compute_dtype, effective_dt, exp_floor, skip_and_gate
from .chunk import _decay, _head_skip

__all__ = ["ssd_step_torch", "ssd_update_torch"]


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


def ssd_update_torch(
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
) -> torch.Tensor:
    """:func:`ssd_step_torch` updating ``state`` in place, for decoding without autograd.

    Computes in ``state``'s dtype (float32, or float64), which must be at least as wide as the
    inputs, with ``state`` contiguous; :func:`ssd_update` checks both. One decay and one fused
    multiply-add over the state, no new state tensor: the per-token cost is a dozen small ops.
    Shapes as in :func:`ssd_step_torch`; returns y (batch, nheads, headdim) in x's dtype.
    """
    batch, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    rep, dtype = nheads // ngroups, state.dtype
    xf = as_dtype(x, dtype)
    dtf = effective_dt(as_dtype(dt, dtype), dt_bias, dt_softplus, dt_limit)  # (batch, nheads)
    decay = (dtf * as_dtype(A, dtype)).clamp_(min=exp_floor(dtype), max=0.0).exp_()
    state.mul_(decay.view(batch, nheads, 1, 1))
    state.view(batch, ngroups, rep, headdim, d_state).addcmul_(
        (xf * dtf.unsqueeze(-1)).view(batch, ngroups, rep, headdim, 1),
        as_dtype(B, dtype).view(batch, ngroups, 1, 1, d_state),
    )
    y = torch.matmul(
        state.view(batch, ngroups, rep * headdim, d_state),
        as_dtype(C, dtype).view(batch, ngroups, d_state, 1),
    ).view(batch, nheads, headdim)
    if D is not None:
        y.addcmul_(xf, as_dtype(D, dtype).view(nheads, -1))
    if z is not None:
        y.mul_(F.silu(as_dtype(z, dtype)))
    return y.to(x.dtype)

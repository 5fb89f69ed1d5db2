"""One token of the selective-scan recurrence in plain PyTorch (decoding on CPU, or with
autograd)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import (
    as_dtype,
    clamped_exp,
    compute_dtype,
    effective_dt,
    exp_floor,
    skip_and_gate,
)

__all__ = ["selective_scan_step_torch", "selective_scan_update_torch"]


def selective_scan_step_torch(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the selective-scan recurrence in plain PyTorch: what
    :func:`selective_scan_step` runs when the kernel does not (CPU, autograd, float64).
    Functional: ``state`` is not modified.

    Same arguments and results as :func:`selective_scan_step`: state (batch, dim, d_state),
    u (batch, dim) -> y like u, new_state like state. Computes in float32 (float64 for float64
    inputs) with autocast disabled.
    """
    batch, dim = u.shape
    d_state = A.shape[-1]
    Bg = B.unsqueeze(1) if B.dim() == 2 else B
    Cg = C.unsqueeze(1) if C.dim() == 2 else C
    ngroups = Bg.shape[1]
    rep = dim // ngroups
    dtype = compute_dtype(state, u, delta, A, B, C)
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf = u.to(dtype)
        dl = effective_dt(delta.to(dtype), delta_bias, delta_softplus)
        decay = clamped_exp(dl.unsqueeze(-1) * A.to(dtype), inplace=True)  # (b, d, n)
        inp = (dl * uf).view(batch, ngroups, rep, 1) * Bg.to(dtype).unsqueeze(2)
        new_state = torch.addcmul(inp.view(batch, dim, d_state), decay, state.to(dtype))
        grouped = new_state.view(batch, ngroups, rep, d_state)
        y = torch.matmul(grouped, Cg.to(dtype).unsqueeze(-1)).view(batch, dim)
        y = skip_and_gate(y, uf, D, z).to(u.dtype)
    return y, new_state.to(state.dtype)


def selective_scan_update_torch(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """:func:`selective_scan_step_torch` updating ``state`` in place (decoding, no autograd).

    Computes in ``state``'s dtype, which must be at least as wide as the inputs, with
    ``state`` contiguous (:func:`selective_scan_update` checks both). Shapes as in
    :func:`selective_scan_step_torch`; returns y (batch, dim) in u's dtype.
    """
    batch, dim = u.shape
    d_state = A.shape[-1]
    Bg = B.unsqueeze(1) if B.dim() == 2 else B
    Cg = C.unsqueeze(1) if C.dim() == 2 else C
    ngroups = Bg.shape[1]
    dtype = state.dtype
    uf = as_dtype(u, dtype)
    dl = effective_dt(as_dtype(delta, dtype), delta_bias, delta_softplus)  # (batch, dim)
    # exp out of place: measured 2-3x faster than exp_ on these small tensors
    state.mul_(torch.exp((dl.unsqueeze(-1) * as_dtype(A, dtype)).clamp_(min=exp_floor(dtype))))
    grouped = state.view(batch, ngroups, dim // ngroups, d_state)
    grouped.addcmul_((dl * uf).view(batch, ngroups, -1, 1), as_dtype(Bg, dtype).unsqueeze(2))
    y = torch.matmul(grouped, as_dtype(Cg, dtype).unsqueeze(-1)).view(batch, dim)
    if D is not None:
        y.addcmul_(uf, as_dtype(D, dtype))
    if z is not None:
        y.mul_(F.silu(as_dtype(z, dtype)))
    return y.to(u.dtype)

"""One token of the gated delta rule in plain PyTorch: the decode step."""

from __future__ import annotations

import torch

from .._common import compute_dtype

__all__ = ["gated_delta_step_torch"]


def gated_delta_step_torch(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Advance ``state`` by one token, in place, and return the token's output.

    Args:
        state: (batch, nv_heads, head_k_dim, head_v_dim), float32 or float64, updated in place.
        q, k: (batch, nk_heads, head_k_dim); v: (batch, nv_heads, head_v_dim).
        g: (batch, nv_heads) log-decay, or (batch, nv_heads, head_k_dim) per key channel.
        beta: (batch, nv_heads) write strength.
        scale: output scale; None: head_k_dim ** -0.5.

    Returns:
        o: (batch, nv_heads, head_v_dim) in v's dtype.
    """
    dtype = compute_dtype(state, q, k, v, g, beta)
    nv, dk = v.shape[1], k.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    repeat = nv // k.shape[1]
    q, k = (t.to(dtype).repeat_interleave(repeat, 1) for t in (q, k))
    vf = v.to(dtype)
    work = state if state.dtype == dtype else state.to(dtype)
    decay = g.to(dtype).exp()
    work.mul_(decay[..., None] if g.dim() == 3 else decay[..., None, None])
    read = (k.unsqueeze(-2) @ work).squeeze(-2)  # (batch, nv, dv): what k reads now
    delta = (vf - read).mul_(beta.to(dtype).unsqueeze(-1))
    work.add_(k.unsqueeze(-1) * delta.unsqueeze(-2))
    out = (q.unsqueeze(-2) @ work).squeeze(-2).mul_(scale)
    if work is not state:
        state.copy_(work)
    return out.to(v.dtype)

"""RMSNorm and the gated, grouped RMSNorm that closes a Mamba-2 block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or unchanged when it is already float32 or wider (float64 tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32.

    Shapes: (..., dim) -> (..., dim), in the input's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(upcast(hidden), (hidden.shape[-1],), upcast(self.weight), self.eps)
        return normed.to(hidden.dtype)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x * silu(gate))`` normalised within ``n_groups`` equal groups of channels.

    This is Mamba-2's output norm (norm_before_gate=False) with mamba_ssm's and transformers'
    group size ``dim // n_groups``. Shapes: x, gate (..., dim) -> (..., dim).
    """

    def __init__(self, dim: int, n_groups: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.n_groups = n_groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        gated = upcast(hidden) * F.silu(upcast(gate))
        grouped = rearrange(gated, "... (g c) -> ... g c", g=self.n_groups)
        normed = F.rms_norm(grouped, (grouped.shape[-1],), eps=self.eps)
        return (rearrange(normed, "... g c -> ... (g c)") * upcast(self.weight)).to(hidden.dtype)

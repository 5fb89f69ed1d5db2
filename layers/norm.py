"""RMSNorm and the gated, grouped RMSNorm that closes a Mamba-2 block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.ops.kernels import needs_autograd


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or unchanged when it is already float32 or wider (float64 tests)."""
    if x.dtype == torch.float32 or x.dtype == torch.float64:
        return x  # without a call: this runs several times per sublayer in a decode step
    return x.to(torch.promote_types(x.dtype, torch.float32))


# Up to this many elements (decode steps: a few tokens) a norm runs as one fused
# ``F.rms_norm`` call: there the number of operations costs more than the passes over memory.
SMALL = 1 << 14


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32.

    Shapes: (..., dim) -> (..., dim), in the input's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, weight = upcast(hidden), upcast(self.weight)
        if x.numel() <= SMALL or needs_autograd(x, weight):
            normed = F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        else:  # the input is not ours to overwrite: one new tensor, scaled in place
            normed = torch.mul(x, weight).mul_(_inverse_rms(x, self.eps))
        return normed.to(hidden.dtype)


class GatedRMSNorm(nn.Module):
    """``rmsnorm(x * silu(gate))`` normalised within ``n_groups`` equal groups of channels.

    This is Mamba-2's output norm (norm_before_gate=False) with mamba_ssm's and transformers'
    group size ``dim // n_groups``; ``norm_before_gate=True`` gives ``rmsnorm(x) *
    silu(gate)`` (Falcon-H1's option). Shapes: x, gate (..., dim) -> (..., dim).
    """

    def __init__(
        self, dim: int, n_groups: int = 1, eps: float = 1e-5, norm_before_gate: bool = False
    ) -> None:
        super().__init__()
        self.eps = eps
        self.n_groups = n_groups
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x, gate, weight = upcast(hidden), upcast(gate), upcast(self.weight)
        grouped = (*x.shape[:-1], self.n_groups, x.shape[-1] // self.n_groups)
        if self.norm_before_gate:
            normed = F.rms_norm(x.reshape(grouped), (grouped[-1],), eps=self.eps)
            normed = normed.reshape(x.shape) * weight * F.silu(gate)
        elif x.numel() <= SMALL or needs_autograd(x, gate, weight):
            gated = (x * F.silu(gate)).reshape(grouped)
            normed = F.rms_norm(gated, (grouped[-1],), eps=self.eps).reshape(x.shape) * weight
        else:  # in place on the one new tensor: four passes instead of six, one allocation
            gated = F.silu(gate).mul_(x).reshape(grouped)
            scale = _inverse_rms(gated, self.eps)
            normed = gated.mul_(weight.view(grouped[-2:])).mul_(scale)
        return normed.reshape(x.shape).to(hidden.dtype)


class SiluGate(nn.Module):
    """``x * silu(gate)`` with no norm (a Mamba-2 block with ``rmsnorm: false``, as
    mamba_ssm's option and Falcon-H1's default). Shapes: x, gate (..., dim) -> (..., dim)."""

    def forward(self, hidden: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (upcast(hidden) * F.silu(upcast(gate))).to(hidden.dtype)


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2, -1) + eps), the mean from one reduction pass (vector_norm; no autograd).

    Shapes: (..., d) -> (..., 1).
    """
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
    return mean_square.add_(eps).rsqrt_()


class HeadRMSNormGated(nn.Module):
    """``rmsnorm(x) * weight * act(gate)`` per head: the norm before the gate, one weight
    shared by all heads (Gated DeltaNet's output norm with ``act = silu``, as in
    flash-linear-attention's ``FusedRMSNormGated`` and transformers' Qwen3-Next; Kimi Delta
    Attention's with ``act = sigmoid``).

    Shapes: x, gate (..., heads, head_dim) -> same; ``gate`` None: the norm alone.
    """

    def __init__(self, head_dim: int, eps: float = 1e-6, activation: str = "silu") -> None:
        super().__init__()
        self.eps = eps
        self.activation = {"silu": F.silu, "sigmoid": torch.sigmoid}[activation]
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, hidden: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        x = upcast(hidden)
        normed = F.rms_norm(x, (x.shape[-1],), upcast(self.weight), self.eps)
        if gate is not None:
            normed = normed * self.activation(upcast(gate))
        return normed.to(hidden.dtype)

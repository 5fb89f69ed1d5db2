"""Helpers shared by the scan implementations (private)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kernels import needs_autograd

__all__ = [
    "NO_LIMIT",
    "as_dtype",
    "clamped_exp",
    "compute_dtype",
    "document_index",
    "document_starts",
    "effective_dt",
    "exp_floor",
    "skip_and_gate",
]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: scans never run in half precision."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is already ``dtype`` (decode steps make many of
    these, each a microsecond or two)."""
    return t if t.dtype == dtype else t.to(dtype)


def exp_floor(dtype: torch.dtype) -> float:
    """Lower clamp for decay exponents.

    exp(-40) ~ 4e-18 (float32) and exp(-200) ~ 1e-87 (float64) are far below the precision of
    anything they are added to, yet products of them with activations stay normal floats.
    Denormals, and exp arguments that underflow, hit slow paths costing 10-100x on x86 CPUs.
    """
    return -200.0 if dtype == torch.float64 else -40.0


class _ClampedExp(torch.autograd.Function):
    """exp(clamp(x, floor, upper)) whose backward is simply ``grad * out``.

    Treating the clamp as transparent in the backward is exact where it does not bite, off by
    at most exp(floor) where the floor bites, and the upper clamp is only used where callers
    either guarantee x <= 0 or mask the clamped entries. It saves autograd's clamp masks: less
    memory and several passes fewer over the largest tensors of the scans.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, upper: float | None
    ) -> torch.Tensor:
        out = x.clamp(min=exp_floor(x.dtype), max=upper).exp_()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        return grad * out, None


def clamped_exp(
    x: torch.Tensor, upper: float | None = None, *, inplace: bool = False
) -> torch.Tensor:
    """exp(x) with x clamped to [exp_floor, upper]: fast on CPU and never overflowing if upper.

    ``inplace=True`` lets the function overwrite ``x`` when no gradient is needed (pass it for
    temporaries only).
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        # Same values without the autograd.Function overhead, which matters in step loops.
        out = x if inplace else x.clone()
        return out.clamp_(min=exp_floor(x.dtype), max=upper).exp_()
    return _ClampedExp.apply(x, upper)


NO_LIMIT = (0.0, math.inf)


def effective_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float] = NO_LIMIT,
) -> torch.Tensor:
    """The time step the recurrence uses: softplus(dt + dt_bias) (each optional), clamped to
    ``dt_limit`` unless it is (0, inf). dt (..., channels), dt_bias (channels,)."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def skip_and_gate(
    y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> torch.Tensor:
    """The scans' output ``(y + D * x) * silu(z)``, each term optional.

    y, x, z: one shape; D broadcasts against it, so the caller lines its channels up with x's
    (Mamba-1: (dim,) for channels-last x; Mamba-2: (nheads, 1) or (nheads, headdim)). In place
    on ``y``, which must be a fresh tensor, when autograd is off: one pass and no allocation.
    """
    inplace = not needs_autograd(y, x, D, z)
    if D is not None:
        D = D.to(y.dtype)
        y = y.addcmul_(x, D) if inplace else torch.addcmul(y, x, D)
    if z is not None:
        gate = F.silu(z.to(y.dtype))
        y = y.mul_(gate) if inplace else y * gate
    return y


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) bool: True where a token begins a new document of its row.

    ``seq_idx`` (batch, seqlen) integer: the document of each token, as mamba_ssm's and
    causal-conv1d's ``seq_idx``. A change of value between neighbours starts a document; the
    first token never does (it continues whatever state the scan starts from).
    """
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def document_index(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) int64 0, 0, 1, 1, 1, 2, ...: the canonical form of ``seq_idx``, counting
    document starts (so labels that come back later, e.g. 0 1 0, are distinct documents)."""
    return document_starts(seq_idx).cumsum(1)

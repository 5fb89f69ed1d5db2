"""Where the gated delta rule runs: flash-linear-attention's Triton kernels on CUDA when they
import, else the PyTorch paths."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from .._common import compute_dtype, document_starts
from ..kernels import needs_autograd, use_kernels
from .chunk import gated_delta_chunked_torch
from .step import gated_delta_step_torch

__all__ = ["fla_ops", "gated_delta_rule", "gated_delta_step"]


@functools.cache
def fla_ops() -> SimpleNamespace | None:
    """flash-linear-attention's gated delta rule kernels (``fla-core``), or None when they do
    not import (no triton, no CUDA, not installed).

    Attributes: ``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule`` (a decay per
    head), ``chunk_kda``, ``fused_recurrent_kda`` (a decay per key channel; None in an fla
    without them).
    """
    try:
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule,
        )
    except Exception:  # ImportError, triton or CUDA errors
        return None
    try:
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except Exception:
        chunk_kda = fused_recurrent_kda = None
    return SimpleNamespace(
        chunk_gated_delta_rule=chunk_gated_delta_rule,
        fused_recurrent_gated_delta_rule=fused_recurrent_gated_delta_rule,
        chunk_kda=chunk_kda,
        fused_recurrent_kda=fused_recurrent_kda,
    )


def _cu_seqlens(seq_idx: torch.Tensor) -> torch.Tensor:
    """int32 (n + 1,) offsets of the documents of the flattened (1, batch * seqlen) rows: every
    row start and every document start begins a sequence (fla's varlen form)."""
    starts = document_starts(seq_idx)
    starts[:, 0] = True
    offsets = starts.flatten().nonzero().squeeze(1)
    end = torch.tensor([seq_idx.numel()], device=seq_idx.device)
    return torch.cat([offsets, end]).to(torch.int32)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a sequence (see :mod:`layers.ops.delta.naive`).

    Args:
        q, k: (batch, seqlen, nk_heads, head_k_dim), normalised by the caller (Gated DeltaNet
            L2-normalises them).
        v: (batch, seqlen, nv_heads, head_v_dim); nv_heads a multiple of nk_heads (value
            head h reads key head h // (nv_heads // nk_heads)).
        g: (batch, seqlen, nv_heads) log-decay, <= 0, or (batch, seqlen, nv_heads,
            head_k_dim): a decay per key channel (Kimi Delta Attention; fla's ``chunk_kda``).
        beta: (batch, seqlen, nv_heads).
        chunk_size: tokens per chunk (speed only).
        scale: output scale; None: head_k_dim ** -0.5.
        initial_state: (batch, nv_heads, head_k_dim, head_v_dim) or None (zeros).
        return_final_state: also return the state after the last token.
        seq_idx: (batch, seqlen) document of each token (packed rows), or None: the state
            restarts at every document start.

    Returns:
        o: (batch, seqlen, nv_heads, head_v_dim) in v's dtype; with ``return_final_state``
        also the final state (batch, nv_heads, head_k_dim, head_v_dim), float32 (float64 for
        float64 inputs).
    """
    ops = fla_ops() if use_kernels(q, k, v, g, beta) else None
    channel = g.dim() == 4
    chunk_kernel = None
    if ops is not None:
        chunk_kernel = ops.chunk_kda if channel else ops.chunk_gated_delta_rule
    varlen_ok = seq_idx is None or (initial_state is None and not return_final_state)
    # fla computes in float32 (its kernels fail on float64 operands): float64 stays here.
    fp32 = compute_dtype(q, k, v, g, beta, initial_state) == torch.float32
    if chunk_kernel is not None and varlen_ok and fp32:
        repeat = v.shape[2] // k.shape[2]
        qr, kr = (t.repeat_interleave(repeat, 2) for t in (q, k))
        extra = {}
        if seq_idx is not None:  # documents: one flattened row, a sequence per document
            batch = v.shape[0]
            qr, kr, vr, gr, br = (t.flatten(0, 1).unsqueeze(0) for t in (qr, kr, v, g, beta))
            extra["cu_seqlens"] = _cu_seqlens(seq_idx)
        else:
            vr, gr, br = v, g, beta
        # fla's chunk_kda asserts a float32 initial state (a bfloat16 state cache passes its
        # state as it is); chunk_gated_delta_rule reads any dtype in float32 anyway.
        h0 = None if initial_state is None else initial_state.float()
        o, final = chunk_kernel(
            qr, kr, vr, gr.float(), br, scale=scale, initial_state=h0,
            output_final_state=return_final_state, **extra,
        )  # fmt: skip
        if seq_idx is not None:
            o = o.view(batch, -1, *o.shape[2:])
        return (o, final.float()) if return_final_state else o
    return gated_delta_chunked_torch(
        q, k, v, g, beta, chunk_size=chunk_size, scale=scale, initial_state=initial_state,
        return_final_state=return_final_state, seq_idx=seq_idx,
    )  # fmt: skip


def gated_delta_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One token: updates ``state`` in place and returns the output (see
    :func:`~layers.ops.delta.step.gated_delta_step_torch` for shapes). On CUDA, without
    autograd and with no float64 input, it runs fla's ``fused_recurrent_gated_delta_rule`` on
    the one token (``fused_recurrent_kda`` for a decay per key channel, g (batch, nv_heads,
    head_k_dim))."""
    ops = fla_ops() if use_kernels(state, q, k, v) else None
    step_kernel = None
    if ops is not None:
        channel = g.dim() == 3
        step_kernel = ops.fused_recurrent_kda if channel else ops.fused_recurrent_gated_delta_rule
    fp32 = compute_dtype(state, q, k, v, g, beta) == torch.float32
    if step_kernel is not None and fp32 and not needs_autograd(q, k, v, g, beta):
        repeat = v.shape[1] // k.shape[1]
        qr, kr = (t.repeat_interleave(repeat, 1).unsqueeze(1) for t in (q, k))
        # g and beta by name: fla's signature is (q, k, v, g, gk, gv, beta, scale, ...).
        o, final = step_kernel(
            qr, kr, v.unsqueeze(1), g=g.float().unsqueeze(1), beta=beta.unsqueeze(1),
            scale=scale, initial_state=state, output_final_state=True,
        )  # fmt: skip
        state.copy_(final)
        return o.squeeze(1)
    return gated_delta_step_torch(state, q, k, v, g, beta, scale=scale)

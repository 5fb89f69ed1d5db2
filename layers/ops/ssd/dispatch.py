"""Where the SSD runs: mamba_ssm's Triton kernels on CUDA when they import, else PyTorch."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .._common import NO_LIMIT, compute_dtype
from ..kernels import mamba_ssm_ops, needs_autograd, use_kernels
from .chunk import ssd_chunked_torch
from .step import ssd_step_torch, ssd_update_torch

__all__ = ["TORCH_MAX_CHUNK", "ssd_scan", "ssd_step", "ssd_update"]

# The chunk size changes only the speed, never the result. The PyTorch path's (Q, Q) work per
# head makes chunks above 128 slower on CPU (1.3-3x at 256, measured), so the dispatcher caps
# them there; the Triton kernel keeps the configured size.
TORCH_MAX_CHUNK = 128


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD scan with the semantics of mamba_ssm's ``mamba_chunk_scan_combined``.

    Args:
        x: (batch, seqlen, nheads, headdim).
        dt: (batch, seqlen, nheads), raw; effective dt = softplus(dt + dt_bias) if dt_softplus
            else dt + dt_bias, then clamped to dt_limit unless it is (0, inf).
        A: (nheads,), negative.
        B, C: (batch, seqlen, ngroups, d_state); head h uses group h // (nheads // ngroups).
        chunk_size: chunk length of the chunked algorithm (does not change the result; the
            PyTorch path uses at most TORCH_MAX_CHUNK).
        D: (nheads,) or (nheads, headdim) skip connection, or None.
        z: (batch, seqlen, nheads, headdim) gate, y * silu(z), or None.
        dt_bias: (nheads,) or None.
        initial_state: (batch, nheads, headdim, d_state) or None (zeros).
        return_final_state: also return the state after the last token.
        seq_idx: (batch, seqlen) integer document of each token (packed rows), or None. The
            state restarts from zero wherever the value changes; ``initial_state`` belongs to
            the first document. Passed to the Triton kernel as int32.

    Returns:
        y: (batch, seqlen, nheads, headdim) in x's dtype, and if requested final_state:
        (batch, nheads, headdim, d_state) in float32 (float64 for float64 inputs).
    """
    ops = mamba_ssm_ops() if use_kernels(x, dt, A, B, C) else None
    if ops is not None:
        return ops.mamba_chunk_scan_combined(
            x,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            z=z,
            dt_bias=dt_bias,
            initial_states=initial_state,
            dt_softplus=dt_softplus,
            dt_limit=dt_limit,
            return_final_states=return_final_state,
            **({} if seq_idx is None else {"seq_idx": seq_idx.to(torch.int32).contiguous()}),
        )
    return ssd_chunked_torch(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=min(chunk_size, TORCH_MAX_CHUNK),
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        initial_state=initial_state,
        return_final_state=return_final_state,
        seq_idx=seq_idx,
    )


def ssd_step(
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
    """One decoding step of :func:`ssd_scan` (functional: ``state`` is not modified).

    On CUDA, without autograd, with dt_limit = (0, inf) and no float64 input, this calls
    mamba_ssm's ``selective_state_update`` (which has no dt_limit clamp) on a copy of ``state``.

    Args:
        state: (batch, nheads, headdim, d_state), float32 (or float64).
        x: (batch, nheads, headdim).
        dt: (batch, nheads), raw (same transform as ssd_scan).
        A: (nheads,).
        B, C: (batch, ngroups, d_state).
        D, z, dt_bias, dt_softplus, dt_limit: as in :func:`ssd_scan`; z is (batch, nheads, headdim).

    Returns:
        y: (batch, nheads, headdim) in x's dtype, new_state: like ``state`` (same dtype), a new
        tensor.
    """
    tensors = (state, x, dt, A, B, C, D, z, dt_bias)
    if (
        tuple(dt_limit) == NO_LIMIT
        and use_kernels(*tensors)
        and compute_dtype(*tensors) == torch.float32
        and not needs_autograd(*tensors)
    ):
        ops = mamba_ssm_ops()
        if ops is not None:
            return _ssd_step_kernel(ops, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return ssd_step_torch(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit,
    )  # fmt: skip


def ssd_update(
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
    """:func:`ssd_step` that updates ``state`` in place (a cache's fixed buffer) and returns y.

    What decoding calls: on CUDA (the conditions of :func:`ssd_step`) ``selective_state_update``
    runs on ``state`` itself, with no copy; on CPU :func:`ssd_update_torch`, a dozen small ops
    without a new state tensor. With autograd on (or autocast, or a state narrower than the
    inputs, or not contiguous) it computes :func:`ssd_step` and copies the new state in.
    Shapes as in :func:`ssd_step`; returns y (batch, nheads, headdim) in x's dtype.
    """
    tensors = (state, x, dt, A, B, C, D, z, dt_bias)
    if needs_autograd(*tensors) or torch.is_autocast_enabled(x.device.type):
        y, new_state = ssd_step(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            dt_limit=dt_limit,
        )  # fmt: skip
        state.copy_(new_state)
        return y
    dtype = compute_dtype(*tensors)
    if tuple(dt_limit) == NO_LIMIT and dtype == torch.float32 and use_kernels(*tensors):
        ops = mamba_ssm_ops()
        if ops is not None:
            return _ssd_update_kernel(ops, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if state.dtype != dtype or not state.is_contiguous():
        y, new_state = ssd_step_torch(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
            dt_limit=dt_limit,
        )  # fmt: skip
        state.copy_(new_state)
        return y
    return ssd_update_torch(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit,
    )  # fmt: skip


def _ssd_step_kernel(
    ops: SimpleNamespace,
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ssd_step` through ``selective_state_update`` in its multi-head form.

    Per-head scalars are broadcast over headdim (and d_state) with stride-0 expands, as
    mamba_ssm's ``Mamba2.step`` does: the kernel detects them and loads one dt and A per head.
    Shapes passed: state (batch, nheads, headdim, d_state), x/dt/z (batch, nheads, headdim),
    A (nheads, headdim, d_state), B/C (batch, ngroups, d_state), D/dt_bias (nheads, headdim).
    """
    new_state = state.clone()  # the kernel updates its state argument in place
    return _ssd_update_kernel(ops, new_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus), new_state


def _ssd_update_kernel(
    ops: SimpleNamespace,
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
) -> torch.Tensor:
    """``selective_state_update`` on ``state`` itself (in place); shapes as in
    :func:`_ssd_step_kernel`. Returns y."""
    batch, nheads, headdim = x.shape
    d_state = state.shape[-1]
    # Some mamba_ssm 2.x releases raise a TypeError for D=None or dt_bias=None (their stride
    # arguments unpack ``*... else 0``); zeros are exact no-ops.
    if D is None:
        D = x.new_zeros(nheads)
    if dt_bias is None:
        dt_bias = dt.new_zeros(nheads)
    return ops.selective_state_update(
        state,
        x,
        dt.unsqueeze(-1).expand(batch, nheads, headdim),
        A.float().view(nheads, 1, 1).expand(nheads, headdim, d_state),
        B,
        C,
        D=D.unsqueeze(-1).expand(nheads, headdim) if D.dim() == 1 else D,
        z=z,
        dt_bias=dt_bias.unsqueeze(-1).expand(nheads, headdim),
        dt_softplus=dt_softplus,
    )

"""Mamba-1 selective scan: two-level chunked PyTorch implementation and dispatch.

Per channel ``d`` and state ``n`` (B/C shared by all channels, or per channel group):

    h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[n] * u_t[d]
    y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]

A has a separate decay per (d, n), so there is no matmul form as for SSD. Instead the sequence is
cut into ``nchunks`` chunks of ``T ~ sqrt(L)`` steps and scanned in three passes, each vectorised
over all chunks: (1) local scans from a zero state, stepping the ``T`` positions; (2) a loop over
chunks carrying the true state across chunk boundaries; (3) the carried-in state's contribution,
``C_t . (exp(A * cumsum(delta)) * H_prev)``. That is ~2T + L/T Python iterations instead of L,
with O(L * dim * d_state) work.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ._common import clamped_exp, compute_dtype, effective_dt, exp_floor
from .kernels import mamba_ssm_ops, needs_autograd, use_kernels

__all__ = ["selective_scan", "selective_scan_step", "selective_scan_torch"]

_MIN_CHUNK, _MAX_CHUNK = 16, 256
# Largest number of state elements (batch * chunks * steps * dim * d_state) materialised at once
# by the differentiable pass 3: keeps temporaries cache-sized.
_PASS3_BLOCK_ELEMS = 1 << 19


def _skip_and_gate(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> torch.Tensor:
    """y + D * u, then * silu(z); channels last: y, u, z (..., dim), D (dim,)."""
    if D is not None:
        y = torch.addcmul(y, u, D.to(y.dtype))
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _default_chunk(seqlen: int) -> int:
    return max(_MIN_CHUNK, min(_MAX_CHUNK, round(math.sqrt(seqlen))))


def _local_scans(
    dl: torch.Tensor, du: torch.Tensor, B: torch.Tensor, C: torch.Tensor, A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1, differentiable: scan every chunk from a zero state, all chunks at once.

    Args (``c`` chunks of ``T`` steps, ``g`` groups of ``r`` channels, ``n`` states):
        dl, du: (b, c, T, g, 1, r) delta and delta * u.
        B: (T, b, c, g, n, 1); C: (T, b, c, g, 1, n), step-major; A: (g, n, r).

    Returns:
        y: (T, b, c, g, 1, r) local outputs C_t . h_t; h: (b, c, g, n, r) local end states.
    """
    h = du[:, :, 0] * B[0]  # from a zero state the first step is just the input
    ys = [torch.matmul(C[0], h)]
    for t in range(1, dl.shape[2]):
        decay = clamped_exp(dl[:, :, t] * A, inplace=True)
        h = torch.addcmul(du[:, :, t] * B[t], decay, h)
        ys.append(torch.matmul(C[t], h))
    return torch.stack(ys), h


def _local_scans_inplace(
    dl: torch.Tensor,
    du: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    clamp: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 without autograd: :func:`_local_scans` in two preallocated buffers.

    The steps are memory bound; reusing cache-resident buffers instead of allocating fresh
    ones per step avoids page faults and cache misses, their main cost. ``clamp=False`` skips
    the exponent clamp when the caller has checked that nothing can underflow.
    """
    b, c, T, g = dl.shape[:4]
    n, r = A.shape[-2:]
    h = dl.new_zeros(b, c, g, n, r)
    decay = torch.empty_like(h)
    y = dl.new_empty(T, b, c, g, 1, r)
    floor = exp_floor(dl.dtype)
    for t in range(T):
        torch.mul(dl[:, :, t], A, out=decay)
        if clamp:
            decay.clamp_(min=floor)
        h.mul_(decay.exp_()).addcmul_(du[:, :, t], B[t])
        torch.matmul(C[t], h, out=y[t])
    return y, h


def _carried_in(
    dl: torch.Tensor, C: torch.Tensor, A: torch.Tensor, H: torch.Tensor
) -> torch.Tensor:
    """Pass 3, differentiable: output due to the state carried into each chunk.

    Args:
        dl: (b, c, T, g, 1, r) delta; C: (T, b, c, g, 1, n); A: (g, n, r).
        H: (b, c, g, n, r), the true state entering each chunk.

    Returns:
        (T, b, c, g, 1, r): C_t . (exp(A * cumsum(delta)_t) * H), cumsum from the chunk start.
    """
    cum = dl.cumsum(2).movedim(2, 0)
    T = cum.shape[0]
    block = max(1, _PASS3_BLOCK_ELEMS // H.numel())
    out = []
    for t0 in range(0, T, block):
        decay = clamped_exp(cum[t0 : t0 + block] * A, inplace=True)
        out.append(torch.matmul(C[t0 : t0 + block], decay * H))
    return torch.cat(out)


def _carried_in_inplace(
    dl: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    H: torch.Tensor,
    y: torch.Tensor,
    clamp: bool,
) -> None:
    """Pass 3 without autograd: add :func:`_carried_in` to ``y`` in place."""
    decay = torch.empty_like(H)
    cum = torch.zeros_like(dl[:, :, 0])
    tmp = torch.empty_like(y[0])
    floor = exp_floor(dl.dtype)
    for t in range(dl.shape[2]):
        cum += dl[:, :, t]
        torch.mul(cum, A, out=decay)
        if clamp:
            decay.clamp_(min=floor)
        decay.exp_().mul_(H)
        y[t] += torch.matmul(C[t], decay, out=tmp)


def selective_scan_torch(
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
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan in plain PyTorch (differentiable; CPU and reference path).

    Same arguments and results as :func:`selective_scan`, plus ``chunk_size`` (steps per chunk,
    default ~sqrt(seqlen) clamped to [16, 256]; does not change the result). Computes in
    float32 (float64 for float64 inputs) with autocast disabled; without autograd it runs an
    allocation-free in-place variant of the same passes.

    Internally everything is channels-last (batch, seqlen, dim): the innermost, vectorised
    dimension is then the long channel axis. y is returned as a (batch, dim, seqlen) transposed
    view of that memory, free to turn back into (batch, seqlen, dim) for an output projection.
    """
    batch, dim, seqlen = u.shape
    d_state = A.shape[-1]
    Bg = B.unsqueeze(1) if B.dim() == 3 else B  # (b, g, n, L)
    Cg = C.unsqueeze(1) if C.dim() == 3 else C
    ngroups = Bg.shape[1]
    if dim % ngroups != 0:
        raise ValueError(f"dim ({dim}) must be a multiple of ngroups ({ngroups})")
    if seqlen == 0:
        raise ValueError("selective_scan_torch needs seqlen >= 1")
    rep = dim // ngroups
    dtype = compute_dtype(u, delta, A, B, C, initial_state)

    T = min(chunk_size or _default_chunk(seqlen), seqlen)
    nchunks = -(-seqlen // T)
    T = -(-seqlen // nchunks)  # balance chunk lengths to minimise tail padding
    pad = nchunks * T - seqlen

    with torch.autocast(device_type=u.device.type, enabled=False):
        # Channels last. contiguous() is free when the caller's tensors are transposed views
        # of (batch, seqlen, dim) activations, as they typically are.
        uf = u.transpose(1, 2).to(dtype).contiguous()
        dl = effective_dt(delta.transpose(1, 2).to(dtype), delta_bias, delta_softplus)
        dl = dl.contiguous()
        du = dl * uf
        Bf, Cf = Bg.to(dtype), Cg.to(dtype)  # (b, g, n, L)
        init = None if initial_state is None else initial_state.to(dtype)
        if pad:
            # delta = 0 is exactly neutral: decay exp(0) = 1 and no input.
            dl, du = F.pad(dl, (0, 0, 0, pad)), F.pad(du, (0, 0, 0, pad))
            Bf, Cf = F.pad(Bf, (0, pad)), F.pad(Cf, (0, pad))
        dl_c = dl.view(batch, nchunks, T, ngroups, 1, rep)
        du_c = du.view(batch, nchunks, T, ngroups, 1, rep)
        # B and C are small: step-major copies make every per-step slice contiguous (bmm
        # falls back to a slow per-matrix loop on strided batches).
        B_c = Bf.view(batch, ngroups, d_state, nchunks, T).permute(4, 0, 3, 1, 2).contiguous()
        B_c = B_c.unsqueeze(-1)  # (T, b, c, g, n, 1)
        C_c = Cf.view(batch, ngroups, d_state, nchunks, T).permute(4, 0, 3, 1, 2).contiguous()
        C_c = C_c.unsqueeze(-2)  # (T, b, c, g, 1, n)
        Af = A.to(dtype).view(ngroups, rep, d_state).transpose(1, 2).contiguous()  # (g, n, r)
        inplace = not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (dl, du, Bf, Cf, Af, init)
        )

        # Pass 1: local scans from zero, vectorised over all chunks. Without autograd, skip
        # the exponent clamps when the most negative exponent possible cannot reach the floor.
        chunk_delta = dl_c.sum(2)  # (b, c, g, 1, r)
        if inplace:
            # Largest |cumsum(delta)| within a chunk bounds every exponent of passes 1 and 3.
            bound = chunk_delta if delta_softplus else dl_c.abs().sum(2)
            most_negative = float(Af.min()) * float(bound.max())
            clamp = not most_negative > exp_floor(dtype)  # also True for NaN
            y, h = _local_scans_inplace(dl_c, du_c, B_c, C_c, Af, clamp)
        else:
            y, h = _local_scans(dl_c, du_c, B_c, C_c, Af)
        # y: (T, b, c, g, 1, r), h: (b, c, g, n, r)

        # Pass 2: carry the true state across chunks, H_c = exp(A * sum delta) H_{c-1} + h_c.
        chunk_decay = clamped_exp(chunk_delta * Af, inplace=True)  # (b, c, g, n, r)
        if init is None:
            carry = h.new_zeros(batch, ngroups, d_state, rep)
        else:
            carry = init.reshape(batch, ngroups, rep, d_state).transpose(2, 3)
        prev = []
        for c in range(nchunks):
            prev.append(carry)
            carry = torch.addcmul(h[:, c], chunk_decay[:, c], carry)
        final = carry.transpose(2, 3).reshape(batch, dim, d_state)

        # Pass 3: add C_t . (exp(A * cumsum(delta)_t) * H_prev). Nothing is carried into the
        # first chunk unless there is an initial state, so skip it then.
        first = 0 if init is not None else 1
        if nchunks > first:
            H_prev = torch.stack(prev[first:], dim=1)  # (b, c', g, n, r)
            args = (dl_c[:, first:], C_c[:, :, first:], Af, H_prev)
            if inplace:
                _carried_in_inplace(*args, y[:, :, first:], clamp)
            else:
                corr = _carried_in(*args)
                if first:
                    corr = torch.cat([torch.zeros_like(corr[:, :, :1]), corr], dim=2)
                y = y + corr

        # (T, b, c, ..., r) -> (b, c * T, dim): moves whole contiguous rows of channels.
        y = y.view(T, batch, nchunks, dim).permute(1, 2, 0, 3).reshape(batch, -1, dim)
        if pad:
            y = y[:, :seqlen]
        zf = None if z is None else z.transpose(1, 2)
        y = _skip_and_gate(y, uf, D, zf).to(u.dtype).transpose(1, 2)
    if return_final_state:
        return y, final
    return y


def selective_scan(
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
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan with the semantics of mamba_ssm's ``selective_scan_fn``.

    Args:
        u: (batch, dim, seqlen).
        delta: (batch, dim, seqlen), raw; effective delta = softplus(delta + delta_bias) if
            delta_softplus else delta + delta_bias.
        A: (dim, d_state), negative.
        B, C: (batch, d_state, seqlen), or (batch, ngroups, d_state, seqlen) where channel d
            uses group d // (dim // ngroups).
        D: (dim,) skip connection, or None.
        z: (batch, dim, seqlen) gate, y * silu(z), or None.
        delta_bias: (dim,) or None.
        initial_state: (batch, dim, d_state) or None (zeros). The CUDA kernel has no initial
            state, so passing one always takes the PyTorch path.
        return_final_state: also return the state after the last step.

    Returns:
        y: (batch, dim, seqlen) in u's dtype (possibly a transposed view, see
        :func:`selective_scan_torch`), and if requested final_state: (batch, dim, d_state) in
        float32 (float64 for float64 inputs).
    """
    ops = None
    if initial_state is None and use_kernels(u, delta, A, B, C):
        ops = mamba_ssm_ops()
    if ops is not None:
        # The kernel expects fp32 parameters (as mamba_ssm's own Mamba block passes them).
        return ops.selective_scan_fn(
            u,
            delta,
            A.float(),
            B,
            C,
            D=None if D is None else D.float(),
            z=z,
            delta_bias=None if delta_bias is None else delta_bias.float(),
            delta_softplus=delta_softplus,
            return_last_state=return_final_state,
        )
    return selective_scan_torch(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        return_final_state=return_final_state,
    )


def selective_scan_step(
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
    """One decoding step of :func:`selective_scan` (functional: ``state`` is not modified).

    On CUDA, without autograd and with no float64 input, this calls mamba_ssm's
    ``selective_state_update`` on a copy of ``state``.

    Args:
        state: (batch, dim, d_state), float32 (or float64).
        u, delta: (batch, dim); z: (batch, dim) or None.
        A: (dim, d_state).
        B, C: (batch, d_state) or (batch, ngroups, d_state).
        D, delta_bias, delta_softplus: as in :func:`selective_scan`.

    Returns:
        y: (batch, dim) in u's dtype, new_state: like ``state`` (same dtype), a new tensor.
    """
    tensors = (state, u, delta, A, B, C, D, z, delta_bias)
    if (
        use_kernels(*tensors)
        and compute_dtype(*tensors) == torch.float32
        and not needs_autograd(*tensors)
    ):
        ops = mamba_ssm_ops()
        if ops is not None:
            return _selective_scan_step_kernel(
                ops, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus
            )
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
        y = _skip_and_gate(y, uf, D, z).to(u.dtype)
    return y, new_state.to(state.dtype)


def _selective_scan_step_kernel(
    ops: SimpleNamespace,
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_scan_step` through ``selective_state_update``.

    Shared B/C use the kernel's single-head form: state (batch, dim, d_state), u/delta/z
    (batch, dim), A (dim, d_state), B/C (batch, d_state), D/delta_bias (dim,). Grouped B/C
    (batch, ngroups, d_state) use the multi-head form with one "head" per group: state
    (batch, ngroups, dim // ngroups, d_state), and so on; the state is a view of the copy.
    """
    batch, dim = u.shape
    d_state = A.shape[-1]
    # Some mamba_ssm 2.x releases raise a TypeError for D=None or dt_bias=None (their stride
    # arguments unpack ``*... else 0``); zeros are exact no-ops.
    if D is None:
        D = u.new_zeros(dim)
    if delta_bias is None:
        delta_bias = delta.new_zeros(dim)
    # The kernel updates its state argument in place; contiguous so that it can be viewed.
    new_state = state.clone(memory_format=torch.contiguous_format)
    A = A.float()
    if B.dim() == 2:
        y = ops.selective_state_update(
            new_state, u, delta, A, B, C, D=D, z=z, dt_bias=delta_bias, dt_softplus=delta_softplus
        )
        return y, new_state
    ngroups = B.shape[1]
    heads = (batch, ngroups, dim // ngroups)
    y = ops.selective_state_update(
        new_state.view(*heads, d_state),
        u.reshape(heads),
        delta.reshape(heads),
        A.reshape(*heads[1:], d_state),
        B,
        C,
        D=D.reshape(heads[1:]),
        z=None if z is None else z.reshape(heads),
        dt_bias=delta_bias.reshape(heads[1:]),
        dt_softplus=delta_softplus,
    )
    return y.reshape(batch, dim), new_state

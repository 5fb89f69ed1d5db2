"""The chunked SSD scan in plain PyTorch: prefill, training and the CPU path.

The sequence splits into chunks of ``Q`` tokens. Inside a chunk the recurrence is unrolled into
a masked (Q, Q) "attention" matrix ``(C_i . B_j) * exp(cs_i - cs_j)`` (``cs`` = cumulative sum
of ``dt * A``) applied to ``dt * x`` with a matmul; across chunks only the (headdim, d_state)
states are carried. Memory is O(seqlen * Q), never O(seqlen^2).

For heads whose decay over a chunk is moderate, exp(cs_i - cs_j) is split into per-position
factors so the within-chunk part becomes one large matmul per chunk shared by all heads of a
group (see _intra_factored); heads with fast decay use the masked segment-sum matrix, which is
safe for any range. Exponents are clamped to [-40, 0] (float32) before exp: values below are
~0 anyway, and on CPU exp of underflowing arguments and the denormals they produce run 10-100x
slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import (
    NO_LIMIT,
    clamped_exp,
    compute_dtype,
    document_index,
    effective_dt,
    exp_floor,
    skip_and_gate,
)
from ..kernels import needs_autograd

__all__ = ["ssd_chunked_torch"]

# Largest within-chunk decay range (max - min of cumsum(dt * A)) of a head for which the
# factorised within-chunk path is used: its factors exp(+-range / 2) stay far from overflow and
# underflow (float32: e^30 ~ 1e13). Heads with faster decay take the segment-sum path.
_FACTOR_RANGE = {torch.float32: 60.0, torch.float64: 600.0}


def _head_skip(D: torch.Tensor | None) -> torch.Tensor | None:
    """D (nheads,) or (nheads, headdim), shaped to scale (..., nheads, headdim) tensors."""
    return D.unsqueeze(-1) if D is not None and D.dim() == 1 else D


def _decay(log_decay: torch.Tensor) -> torch.Tensor:
    """exp of a log-decay that should be <= 0, clamped to [floor, 0] before exp.

    On CPU, exp of arguments that underflow (or of -inf) takes a slow path 10-50x slower than
    normal values; the max=0 clamp means out-of-range differences (e.g. the upper triangle of a
    segment sum) can never overflow. Like the CUDA kernels (which use exp(min(x, 0))), this
    assumes dt * A <= 0.
    """
    return clamped_exp(log_decay, 0.0)


class _SegsumDecay(torch.autograd.Function):
    """exp(clamp(cs[..., i] - cs[..., j], floor, 0)) with a lean hand-written backward.

    Autograd through sub -> clamp -> exp would spend four extra passes over the (T, T) tensor
    building clamp masks. Here the backward uses d out / d seg = out everywhere, which is exact
    on the unclamped lower triangle, off by at most exp(floor) where the floor clamps, and
    irrelevant above the diagonal because every caller masks those entries (their incoming
    gradient is zero).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, cs: torch.Tensor) -> torch.Tensor:
        seg = cs.unsqueeze(-1) - cs.unsqueeze(-2)
        out = seg.clamp_(min=exp_floor(seg.dtype), max=0.0).exp_()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        g = grad * out
        return g.sum(-1) - g.sum(-2)


def _segsum_decay(cs: torch.Tensor) -> torch.Tensor:
    """Decay between positions from a cumulative log-decay, NOT masked.

    cs: (..., T) -> (..., T, T) with entry [i, j] = exp(cs[i] - cs[j]) for i >= j. Entries above
    the diagonal are garbage in [0, 1]: the caller must mask them (it is cheaper to mask the
    smaller per-group tensor this gets multiplied with), and must not pass them gradient.
    """
    return _SegsumDecay.apply(cs)


def _pass_states(
    states: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry states across chunks: H_c = exp(log_decay_c) H_{c-1} + S_c.

    Args:
        states: (b, c, g, n, rep, p), S_c: each chunk's contribution from a zero state.
        log_decay: (b, c, g, rep), log of each head's decay over each whole chunk.
        initial_state: (b, g, n, rep, p), the state before the first chunk.
        keep: (b, c) 0 / 1, 0 where a document starts inside chunk c (the state entering it
            does not reach its end), or None.

    Returns:
        prev: (b, c, g, n, rep, p), the state entering each chunk; final: (b, g, n, rep, p).
    """
    b, c, g, _, r, _ = states.shape
    decay = _decay(log_decay).view(b, c, g, 1, r, 1)
    if keep is not None:
        decay = decay * keep.view(b, c, 1, 1, 1, 1)
    prev = []
    state = initial_state
    # unbind, not states[:, i]: the backward of c selects would build c zero-filled
    # full-size gradients (quadratic in the number of chunks); unbind's is one stack.
    for contribution, chunk_decay in zip(states.unbind(1), decay.unbind(1), strict=True):
        prev.append(state)
        state = torch.addcmul(contribution, state, chunk_decay)
    return torch.stack(prev, dim=1), state


def _intra_factored(
    x: torch.Tensor, dt: torch.Tensor, cs: torch.Tensor, CB: torch.Tensor, heads: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-chunk output for the heads in ``heads`` via a factorised decay; zero elsewhere.

    With m the mid-range of cs over a chunk, exp(cs_i - cs_j) = exp(cs_i - m) * exp(m - cs_j),
    both factors within exp(+-range / 2), so ((C B^T) * decay) @ (dt x) = u * (tril(C B^T) @
    (v * dt x)): one matmul per chunk and group covering all of the group's heads, instead of
    a masked (Q, Q) decay matrix and a small matmul per head. Only safe for heads whose decay
    range within every chunk is bounded (see _FACTOR_RANGE); the others are zeroed here.

    Args:
        x: (b, c, Q, h, p); dt, cs: (b, c, Q, h); CB: (b, c, g, Q, Q), tril(C B^T).
        heads: (h,) bool, the heads to compute.

    Returns:
        y: (b, c, g, Q, r * p) to be scaled by u, u: (b, c, Q, h).
    """
    b, c, Q, h, p = x.shape
    g = CB.shape[2]
    # Other heads get cs = 0 (factors 1) and v = 0: no overflow, no contribution, no gradient.
    cs = torch.where(heads, cs, 0.0)
    # The mid-range shift cancels exactly, so no gradient needs to flow through it.
    m = 0.5 * (cs.amax(2, keepdim=True) + cs.amin(2, keepdim=True)).detach()
    v = (m - cs).exp() * heads * dt  # per (position, head): one pass over x below
    xv = (x * v.unsqueeze(-1)).view(b, c, Q, g, h // g * p).transpose(2, 3)
    return torch.matmul(CB, xv), (cs - m).exp()


def _intra_segsum(
    xdt: torch.Tensor, cs: torch.Tensor, CB: torch.Tensor, heads: torch.Tensor | None
) -> torch.Tensor:
    """Within-chunk output with an explicit masked (Q, Q) decay matrix per head.

    Args:
        xdt: (b, c, Q, h, p); cs: (b, c, Q, h); CB: (b, c, g, Q, Q), tril(C B^T).
        heads: (k,) int64 indices of the heads to compute, or None for all of them.

    Returns:
        (b, c, g, r, Q, p) for all heads, else (b, c, k, Q, p).
    """
    b, c, Q, h, p = xdt.shape
    g = CB.shape[2]
    if heads is None:
        # contiguous: from a transposed cs the (Q, Q) tensors would be laid out heads
        # innermost, and the matmul would copy the product into its own layout first.
        seg = _segsum_decay(cs.transpose(2, 3).contiguous()).view(b, c, g, h // g, Q, Q)
        xs = xdt.view(b, c, Q, g, h // g, p).permute(0, 1, 3, 4, 2, 5)
        return torch.matmul(seg * CB.unsqueeze(3), xs)
    seg = _segsum_decay(cs[..., heads].transpose(2, 3).contiguous())  # (b, c, k, Q, Q)
    # One group broadcasts; otherwise gather each selected head's group.
    CBh = CB if g == 1 else CB[:, :, heads // (h // g)]
    return torch.matmul(seg * CBh, xdt[..., heads, :].transpose(2, 3))


def _scan_chunks(
    x: torch.Tensor,
    dt: torch.Tensor,
    cs: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    init: torch.Tensor,
    docs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD on chunked inputs.

    Args (``c`` chunks of ``Q`` steps; heads split as ``g`` groups x ``r``):
        x: (b, c, Q, h, p); dt: (b, c, Q, h); cs: (b, c, Q, h) cumulative log-decay.
        B, C: (b, c, Q, g, n); init: (b, g, n, r, p), the initial state transposed.
        docs: (b, c, Q) int64 canonical document index (see :func:`document_index`) or None.
            Documents are applied as exact 0 / 1 masks, never through the decays, so the
            factorised path and its precision are unchanged: a token's input reaches the
            chunk's end state only from the chunk's last document, the carried-in state
            reaches only the tokens before the chunk's first document start, the chunk's
            decay is zeroed when a document starts inside it, and C B^T is block-diagonal.

    Returns:
        y: (b, c, Q, h, p); final: (b, g, n, r, p), transposed like ``init``.

    States are kept transposed, (d_state, heads of the group * headdim), so the state matmuls
    read and write the natural (seqlen, nheads, headdim) layout without copies.
    """
    b, c, Q, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    Bt, Ct = B.transpose(2, 3), C.transpose(2, 3)  # (b, c, g, Q, n)

    def per_head(t: torch.Tensor) -> torch.Tensor:
        """(b, c, Q', h) -> (b, c, g, Q', r, 1), to scale (b, c, g, Q', r, p) tensors."""
        return t.view(*t.shape[:3], g, r).transpose(2, 3).unsqueeze(-1)

    # 1. Each chunk's state from zero, B^T @ (exp(cs_end - cs) dt x), carried across chunks.
    # Per-(position, head) factors are combined first: one pass over x, not two.
    to_end = from_start = keep = same = None
    if docs is not None:
        before = torch.cat([docs[:, :1, 0], docs[:, :-1, -1]], 1)  # (b, c): token before
        to_end = (docs == docs[:, :, -1:]).to(x.dtype).unsqueeze(-1)  # (b, c, Q, 1)
        from_start = (docs == before[..., None]).to(x.dtype).unsqueeze(-1)
        keep = (docs[:, :, -1] == before).to(x.dtype)  # (b, c)
        same = docs.unsqueeze(-1) == docs.unsqueeze(-2)  # (b, c, Q, Q)
    weight = _decay(cs[:, :, -1:] - cs) * dt
    if to_end is not None:
        weight = weight * to_end
    xe = (x * weight.unsqueeze(-1)).view(b, c, Q, g, r * p)
    states = torch.matmul(Bt.transpose(-1, -2), xe.transpose(2, 3)).view(b, c, g, n, r, p)
    prev, final = _pass_states(states, cs[:, :, -1].view(b, c, g, r), init, keep)

    # 2. Output from the carried-in state: exp(cs_i) * C_i . H_prev.
    y = torch.matmul(Ct, prev.view(b, c, g, n, r * p)).view(b, c, g, Q, r, p)
    entering = _decay(cs) if from_start is None else _decay(cs) * from_start
    decay = per_head(entering)
    y = y * decay if needs_autograd(y, decay) else y.mul_(decay)

    # 3. Output from within the chunk: ((C B^T) * decay) @ (dt x). The causal mask goes on
    # C B^T, which is per group. Heads whose decay range allows it take the factorised path.
    CB = torch.matmul(Ct, Bt.transpose(-1, -2)).tril_()  # (b, c, g, Q, Q)
    if same is not None:
        CB = CB * same.unsqueeze(2)  # block-diagonal: no token sees an earlier document
    span = cs.amax(2) - cs.amin(2)  # (b, c, h)
    factor = span.detach().flatten(0, 1).amax(0) <= _FACTOR_RANGE[cs.dtype]  # (h,)
    n_factor = int(factor.sum())
    if 2 * n_factor < h:
        # Gathering many remaining heads for the segment-sum path costs more than it saves.
        n_factor = 0
    # In place below is autograd-safe: mul's and matmul's backward do not need their outputs.
    if n_factor:
        y_in, u = _intra_factored(x, dt, cs, CB, factor)
        y.addcmul_(y_in.view(b, c, g, Q, r, p), per_head(u))
    xdt = x * dt.unsqueeze(-1) if n_factor < h else None
    if n_factor == 0:
        y += _intra_segsum(xdt, cs, CB, None).transpose(3, 4)
    y = y.transpose(2, 3).reshape(b, c, Q, h, p)  # a view when g == 1
    if 0 < n_factor < h:
        rest = (~factor).nonzero().squeeze(1)
        y.index_add_(3, rest, _intra_segsum(xdt, cs, CB, rest).transpose(2, 3))
    return y, final


def ssd_chunked_torch(
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
    """Chunked SSD scan in plain PyTorch (differentiable; CPU prefill and reference path).

    Same arguments and results as :func:`ssd_scan`. Computes in float32 (float64 for float64
    inputs) with autocast disabled; y is returned in x's dtype.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2:]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    if seqlen == 0:
        raise ValueError("ssd_chunked_torch needs seqlen >= 1")
    dtype = compute_dtype(x, dt, A, B, C, initial_state)
    g, r, p, n = ngroups, nheads // ngroups, headdim, d_state

    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.to(dtype)
        dtf = effective_dt(dt.to(dtype), dt_bias, dt_softplus, dt_limit)
        dA = dtf * A.to(dtype)
        # Same number of chunks as chunk_size gives, but balanced lengths: less tail padding
        # and no (chunk_size x chunk_size) work for sequences shorter than one chunk.
        nchunks = -(-seqlen // chunk_size)
        Q = -(-seqlen // nchunks)
        pad = nchunks * Q - seqlen
        xp, Bf, Cf = xf, B.to(dtype), C.to(dtype)
        if pad:
            # dt = 0 makes padded steps the identity on the state (decay 1, no input).
            xp = F.pad(xp, (0, 0, 0, 0, 0, pad))
            dtf, dA = F.pad(dtf, (0, 0, 0, pad)), F.pad(dA, (0, 0, 0, pad))
            Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
            Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
        chunked = (batch, nchunks, Q)
        docs = None
        if seq_idx is not None:
            docs = document_index(seq_idx)
            if pad:  # padded steps belong to the last document (and are identities anyway)
                docs = torch.cat([docs, docs[:, -1:].expand(-1, pad)], 1)
            docs = docs.view(chunked)
        cs = dA.view(*chunked, nheads).cumsum(2)  # cumulative log-decay within each chunk
        if initial_state is None:
            init = xf.new_zeros(batch, g, n, r, p)
        else:  # kept transposed, (d_state, heads, headdim): see _scan_chunks
            init = initial_state.to(dtype).reshape(batch, g, r, p, n).permute(0, 1, 4, 2, 3)
        y, final = _scan_chunks(
            xp.view(*chunked, nheads, headdim),
            dtf.view(*chunked, nheads),
            cs,
            Bf.view(*chunked, g, n),
            Cf.view(*chunked, g, n),
            init,
            docs,
        )
        y = y.reshape(batch, nchunks * Q, nheads, headdim)
        if pad:
            y = y[:, :seqlen]
        y = skip_and_gate(y, xf, _head_skip(D), z).to(x.dtype)
        final = final.permute(0, 1, 3, 4, 2).reshape(batch, nheads, headdim, d_state)
    if return_final_state:
        return y, final
    return y

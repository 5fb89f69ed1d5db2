"""The two-level chunked selective scan in plain PyTorch: prefill, training and the CPU path.

A has a separate decay per (d, n), so there is no matmul form as for SSD: the work is a walk
over time on (d, n) states. The sequence may be cut into ``c`` chunks of ``T`` steps, every
step vectorised over all chunks: (1) local scans from zero (the first chunk from the initial
state); (2) a loop over chunks carrying the true state across chunk boundaries; (3) the
carried-in state's contribution, ``C_t . (exp(A * cumsum(delta)) * H)``. :func:`_chunk_count`
uses one chunk (no passes 2 and 3) whenever a step's state is big enough to keep every thread
busy, and more only to shorten the Python loop for small states.

Within a chunk the steps go in segments: the decays exp(delta_t A), the inputs delta_t u_t B_t
and the outputs C_t . h_t are computed for a whole segment in batched ops, and only the
recurrence itself is stepped, one in-place op per step.

The backward (:class:`_SelectiveScanFn`) is written by hand, as mamba_ssm's kernel is: the
forward saves the state entering each segment; the backward carries the state gradient back
across chunks, then walks the segments in reverse, recomputing each one's states from its
checkpoint, stepping the reverse-time scan ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}``
through it, and reading all the input gradients off ``g_t`` and ``h_t`` in batched ops.
Autograd through the unrolled loop would record ~10 ops per step and keep every intermediate
(several (batch, seqlen, dim, d_state) tensors) alive.

Document boundaries (``seq_idx``) enter as ``reset``: a constant added to the decay exponent
``delta_t A`` at each document's first token, twice the exponent floor, so that the clamp
turns every decay across a boundary into exp(floor) (~4e-18 in float32): the state restarts.
Being constant, it changes no gradient formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

from .._common import (
    clamped_exp,
    compute_dtype,
    document_starts,
    effective_dt,
    exp_floor,
    skip_and_gate,
)

__all__ = ["selective_scan_torch"]

# Elements per thread of one step's (batch, chunks, dim, d_state) tensors, below which several
# chunks are stepped together: PyTorch splits an elementwise op across threads in pieces of
# at least 32768 elements, and below a few thousand the per-op overhead dominates.
_STEP_ELEMS_PER_THREAD = 1 << 15
# Elements of each of a segment's (steps, batch, chunks, dim, d_state) buffers. Within a segment
# only the recurrence itself is stepped (one in-place op per step); everything else is batched
# over the segment's steps. The backward keeps one state checkpoint per segment.
_SEGMENT_ELEMS = 1 << 20
_MIN_CHUNK = 16


def _chunk_count(batch: int, seqlen: int, state_size: int) -> int:
    """Number of chunks for a scan over ``seqlen`` steps of (batch, state_size) states.

    One when a step's state alone gives every thread a share of _STEP_ELEMS_PER_THREAD
    elements (e.g. batch 8, dim 512, d_state 16 on 2 threads): extra chunks then only add
    passes 2 and 3. Smaller states are stepped several chunks at a time, up to ~sqrt(seqlen)
    chunks of at least _MIN_CHUNK steps, which also bounds the Python loop for long sequences.
    """
    target = _STEP_ELEMS_PER_THREAD * torch.get_num_threads()
    by_size = max(1, target // (batch * state_size))
    by_loop = max(1, min(round(math.sqrt(seqlen)), seqlen // _MIN_CHUNK))
    return min(by_size, by_loop)


def _segments(steps: int, segment: int) -> list[tuple[int, int]]:
    """[(t0, t1), ...] covering range(steps) in blocks of ``segment`` steps."""
    return [(t0, min(steps, t0 + segment)) for t0 in range(0, steps, segment)]


def _segment_steps(step_elems: int, steps: int) -> int:
    """Steps per segment: a segment's (S, b, c, g, n, r) buffers hold ~_SEGMENT_ELEMS elements.

    The forward and the backward both call this, with a step's state size and the steps per
    chunk, and must segment alike (the checkpoints are per segment).
    """
    return max(1, min(steps, _SEGMENT_ELEMS // step_elems))


def _decays(
    dl: torch.Tensor,
    A: torch.Tensor,
    clamp: bool,
    out: torch.Tensor,
    reset: torch.Tensor | None = None,
) -> torch.Tensor:
    """exp(delta_t * A + reset_t) for a segment: dl (S, b, c, g, 1, r), A (g, n, r), reset
    (S, b, c, 1, 1, 1) or None -> out (S, b, c, g, n, r).

    ``clamp``: clamp the exponents to exp_floor (False when they cannot reach it; always True
    with a reset).
    """
    torch.mul(dl, A, out=out)
    if reset is not None:
        out.add_(reset)
    if clamp:
        out.clamp_(min=exp_floor(out.dtype))
    return out.exp_()


def _segment_states(
    dl: torch.Tensor,
    du: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    clamp: bool,
    states: torch.Tensor,
    decays: torch.Tensor,
    reset: torch.Tensor | None = None,
) -> None:
    """Step one segment of S steps of the recurrence h_t = a_t h_{t-1} + du_t B_t.

    dl, du: (S, b, c, g, 1, r); B: (S, b, c, g, n, 1). ``states`` (at least S + 1 slots of
    (b, c, g, n, r)) holds the entering state in slot 0 and receives h_t in slots 1..S;
    ``decays`` receives a_t = exp(delta_t A) in slots 0..S-1. The inputs du_t B_t and the decays
    are computed for the whole segment at once, so that each step is one in-place op.
    """
    S = dl.shape[0]
    _decays(dl, A, clamp, decays[:S], reset)
    torch.mul(du, B, out=states[1 : S + 1])
    for s in range(S):
        states[s + 1].addcmul_(decays[s], states[s])


def _local_scans(
    dl: torch.Tensor,
    du: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    init: torch.Tensor | None,
    clamp: bool,
    segment: int,
    checkpoints: torch.Tensor | None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: scan every chunk, the first from ``init`` and the others from zero.

    Args (``T`` steps, ``c`` chunks, ``g`` groups of ``r`` channels, ``n`` states; step-major):
        dl, du: (T, b, c, g, 1, r) delta and delta * u.
        B: (T, b, c, g, n, 1); C: (T, b, c, g, 1, n); A: (g, n, r).
        init: (b, g, n, r) or None (zeros).
        clamp: clamp the exponents delta * A to exp_floor (False when they cannot reach it).
        segment: steps per segment (see :func:`_segment_states`).
        checkpoints: (K, b, c, g, n, r) or None; if given, receives the local state entering
            each of the K segments.
        reset: (T, b, c, 1, 1, 1) added exponents at document starts, or None.

    Returns:
        y: (T, b, c, g, 1, r) local outputs C_t . h_t; h: (b, c, g, n, r) local end states.
    """
    T, b, c, g = dl.shape[:4]
    n, r = A.shape[-2:]
    states = dl.new_zeros(segment + 1, b, c, g, n, r)  # slot 0: the state entering a segment
    if init is not None:
        states[0, :, 0] = init
    decays = dl.new_empty(segment, b, c, g, n, r)
    y = dl.new_empty(T, b, c, g, 1, r)
    for k, (t0, t1) in enumerate(_segments(T, segment)):
        if k:  # the previous segment, a full one, ended in the last slot
            states[0] = states[segment]
        if checkpoints is not None:
            checkpoints[k] = states[0]
        _segment_states(
            dl[t0:t1], du[t0:t1], B[t0:t1], A, clamp, states, decays, _part(reset, t0, t1)
        )
        torch.matmul(C[t0:t1], states[1 : t1 - t0 + 1], out=y[t0:t1])
    return y, states[t1 - t0].clone()


def _part(reset: torch.Tensor | None, t0: int, t1: int) -> torch.Tensor | None:
    return None if reset is None else reset[t0:t1]


def _carried_in(
    dl: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    H: torch.Tensor,
    y: torch.Tensor,
    segment: int,
    reset_sum: torch.Tensor | None = None,
) -> None:
    """Pass 3: add C_t . (exp(A * cumsum(delta)_t) * H) to ``y`` in place, segment by segment.

    dl: (T, b, c, g, 1, r); C: (T, b, c, g, 1, n); A: (g, n, r); H: (b, c, g, n, r), the state
    entering each chunk; y: (T, b, c, g, 1, r). cumsum runs from the chunk start, as does
    ``reset_sum`` (T, b, c, 1, 1, 1), the resets' cumulative sum (or None).
    """
    decays = dl.new_empty(segment, *H.shape)
    before = torch.zeros_like(dl[0])  # cumsum(delta) up to the segment
    for t0, t1 in _segments(dl.shape[0], segment):
        cum = dl[t0:t1].cumsum(0).add_(before)
        before = cum[-1]
        # Cumulative exponents reach the floor quickly: always clamp.
        decay = _decays(cum, A, True, decays[: t1 - t0], _part(reset_sum, t0, t1)).mul_(H)
        y[t0:t1] += torch.matmul(C[t0:t1], decay)


def _scan_forward(
    dl: torch.Tensor,
    du: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    init: torch.Tensor | None,
    clamp: bool,
    for_backward: bool,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The chunked scan on step-major inputs (shapes as in :func:`_local_scans`).

    Returns:
        y: (T, b, c, g, 1, r); final: (b, g, n, r), the state after the last step; and if
        ``for_backward``, checkpoints: (K, b, c, g, n, r), the true state entering each of the
        K segments of every chunk (else None).
    """
    T, b, nchunks, g = dl.shape[:4]
    n, r = A.shape[-2:]
    segment = _segment_steps(b * nchunks * g * n * r, T)
    checkpoints = dl.new_empty(-(-T // segment), b, nchunks, g, n, r) if for_backward else None
    y, h = _local_scans(dl, du, B, C, A, init, clamp, segment, checkpoints, reset)
    if nchunks == 1:  # chunk 0 started from init: exact already
        return y, h[:, 0], checkpoints
    # Pass 2: H_c = exp(A * sum delta over chunk c - 1) H_{c-1} + h_{c-1}.
    chunk_decay = _chunk_decay(dl, A, reset)  # (b, c, g, n, r)
    entering = torch.empty_like(h[:, 1:])
    carry = h[:, 0]
    for i in range(1, nchunks):
        entering[:, i - 1] = carry
        carry = torch.addcmul(h[:, i], chunk_decay[:, i], carry)
    reset_sum = None if reset is None else reset[:, :, 1:].cumsum(0)
    _carried_in(dl[:, :, 1:], C[:, :, 1:], A, entering, y[:, :, 1:], segment, reset_sum)
    if checkpoints is not None:
        # The later chunks' checkpoints started from zero: add the carried-in state's share.
        K = checkpoints.shape[0]
        starts = dl[: segment * (K - 1), :, 1:]
        cum = starts.unflatten(0, (-1, segment)).sum(1).cumsum(0)  # (K - 1, b, c - 1, g, 1, r)
        exponent = cum * A
        if reset is not None:
            # The resets before each segment start: exclusive of the segment's own steps.
            kept = reset[: segment * (K - 1), :, 1:].unflatten(0, (-1, segment)).sum(1)
            exponent = exponent + kept.cumsum(0)
        checkpoints[0, :, 1:] = entering
        checkpoints[1:, :, 1:].addcmul_(clamped_exp(exponent, inplace=True), entering)
    return y, carry, checkpoints


def _chunk_decay(dl: torch.Tensor, A: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    """exp(A * sum of delta over each chunk, plus its resets).

    dl (T, b, c, g, 1, r) -> (b, c, g, n, r)."""
    exponent = dl.sum(0) * A
    if reset is not None:
        exponent = exponent.add_(reset.sum(0))
    return clamped_exp(exponent, inplace=True)


def _segment_grads(
    dy: torch.Tensor,
    C: torch.Tensor,
    decays: torch.Tensor,
    carry: torch.Tensor,
    grads: torch.Tensor,
) -> None:
    """Step the state gradient back through one segment of S steps.

    g_t = C_t^T dy_t + a_{t+1} g_{t+1}, where a_{t+1} g_{t+1} after the segment's last step is
    ``carry`` (b, c, g, n, r), the gradient w.r.t. that step's state from the steps after it.
    dy: (S, b, c, g, 1, r); C: (S, b, c, g, 1, n); decays: a_t in slots 0..S-1. Writes g_t to
    grads[0..S-1]. As in :func:`_segment_states`, each step is one in-place op.
    """
    S = dy.shape[0]
    torch.mul(C.transpose(-1, -2), dy, out=grads[:S])
    grads[S - 1] += carry
    for s in range(S - 2, -1, -1):
        grads[s].addcmul_(decays[s + 1], grads[s + 1])


def _grad_leaving_chunks(
    dy: torch.Tensor,
    dfinal: torch.Tensor,
    dl: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    clamp: bool,
    segment: int,
    reset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. each chunk's end state through what comes after it.

    The last chunk's is ``dfinal``; chunk c - 1's is chunk c's local gradient w.r.t. its
    entering state (a reverse scan from zero over the chunk) plus exp(A * sum delta) times
    chunk c's. Shapes: dy (T, b, c, g, 1, r), dfinal (b, g, n, r) -> (b, c, g, n, r).
    """
    T, b, nchunks, g = dl.shape[:4]
    leaving = dl.new_empty(b, nchunks, g, *A.shape[-2:])
    leaving[:, -1] = dfinal
    if nchunks == 1:
        return leaving
    local = torch.zeros_like(leaving)  # d loss / d h_{t0 - 1}, from the chunk's steps t0..
    decays = dl.new_empty(segment, *local.shape)
    grads = torch.empty_like(decays)
    for t0, t1 in reversed(_segments(T, segment)):
        _decays(dl[t0:t1], A, clamp, decays[: t1 - t0], _part(reset, t0, t1))
        _segment_grads(dy[t0:t1], C[t0:t1], decays, local, grads)
        torch.mul(decays[0], grads[0], out=local)
    chunk_decay = _chunk_decay(dl, A, reset)
    for i in range(nchunks - 1, 0, -1):
        leaving[:, i - 1] = torch.addcmul(local[:, i], chunk_decay[:, i], leaving[:, i])
    return leaving


def _scan_backward(
    dy: torch.Tensor,
    dfinal: torch.Tensor,
    dl: torch.Tensor,
    du: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    checkpoints: torch.Tensor,
    clamp: bool,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`_scan_forward` (step-major shapes as there).

    With g_t = d loss / d h_t = C_t^T dy_t + a_{t+1} g_{t+1} (a_t = exp(delta_t A)) and
    x_t = g_t a_t h_{t-1} = d loss / d (delta_t A):
    d du_t = B_t^T g_t, dB_t = g_t du_t^T, dC_t = h_t dy_t^T, d delta_t = sum_n A x_t,
    dA = sum_t delta_t x_t, d init = a_0 g_0 of the first chunk.

    The walk goes backwards segment by segment: recompute the segment's states from its
    checkpoint, step g_t back through it, then read all the gradients of the segment off its
    states and g_t in a few batched ops.

    Returns d dl, d du, dB, dC (shaped like the inputs), dA (g, n, r), d init (b, g, n, r).
    """
    T = dl.shape[0]
    segment = _segment_steps(checkpoints[0].numel(), T)  # as in the forward
    d_dl, d_du = torch.empty_like(dl), torch.empty_like(du)
    dB = torch.empty_like(C)  # (T, b, c, g, 1, n): B's gradient, transposed
    dC = torch.empty_like(C)
    dA = torch.zeros_like(A)
    states = dl.new_empty(segment + 1, *checkpoints.shape[1:])
    decays = dl.new_empty(segment, *checkpoints.shape[1:])
    grads = torch.empty_like(decays)
    # d loss / d (state before the steps still to walk), through the steps already walked.
    carry = _grad_leaving_chunks(dy, dfinal, dl, C, A, clamp, segment, reset)
    for k, (t0, t1) in reversed(list(enumerate(_segments(T, segment)))):
        S, steps = t1 - t0, slice(t0, t1)
        states[0] = checkpoints[k]
        _segment_states(
            dl[steps], du[steps], B[steps], A, clamp, states, decays, _part(reset, t0, t1)
        )
        torch.matmul(dy[steps], states[1 : S + 1].transpose(-1, -2), out=dC[steps])
        _segment_grads(dy[steps], C[steps], decays, carry, grads)
        grad_h = grads[:S]
        torch.matmul(B[steps].transpose(-1, -2), grad_h, out=d_du[steps])
        # (1, r) @ (r, n): several times faster than (n, r) @ (r, 1) in bmm.
        torch.matmul(du[steps], grad_h.transpose(-1, -2), out=dB[steps])
        grad_prev = decays[:S].mul_(grad_h)  # a_t g_t = d loss / d h_{t-1}
        carry.copy_(grad_prev[0])
        x = grad_prev.mul_(states[:S])
        dA += torch.mul(x, dl[steps], out=grad_h).sum((0, 1, 2))
        torch.sum(x.mul_(A), dim=-2, keepdim=True, out=d_dl[steps])
    return d_dl, d_du, dB.view_as(B), dC, dA, carry[:, 0]


class _SelectiveScanFn(torch.autograd.Function):
    """:func:`_scan_forward` with the hand-written backward :func:`_scan_backward`.

    Saves the inputs and one state checkpoint per segment; the backward recomputes the
    states between checkpoints, as mamba_ssm's kernel recomputes them within its chunks.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        dl: torch.Tensor,
        du: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        A: torch.Tensor,
        init: torch.Tensor | None,
        clamp: bool,
        reset: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for_backward = any(ctx.needs_input_grad)
        y, final, checkpoints = _scan_forward(dl, du, B, C, A, init, clamp, for_backward, reset)
        if for_backward:
            ctx.save_for_backward(dl, du, B, C, A, checkpoints, reset)
            ctx.clamp, ctx.has_init = clamp, init is not None
        return y, final

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, dy: torch.Tensor, dfinal: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        *saved, reset = ctx.saved_tensors
        grads = _scan_backward(dy.contiguous(), dfinal, *saved, ctx.clamp, reset)
        d_init = grads[-1] if ctx.has_init else None
        return *grads[:-1], d_init, None, None


def _step_major(x: torch.Tensor, batch: int, nchunks: int, steps: int) -> torch.Tensor:
    """(batch, nchunks * steps, ...) -> (steps, batch, nchunks, ...), contiguous."""
    x = x.reshape(batch, nchunks, steps, *x.shape[2:])
    return x.movedim(2, 0).contiguous()


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
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan in plain PyTorch (differentiable; CPU and reference path).

    Same arguments and results as :func:`selective_scan`, plus ``chunk_size`` (steps per chunk,
    default from :func:`_chunk_count`; does not change the result). Computes in float32
    (float64 for float64 inputs) with autocast disabled.

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

    if chunk_size:
        nchunks = -(-seqlen // min(chunk_size, seqlen))
    else:
        nchunks = _chunk_count(batch, seqlen, dim * d_state)
    T = -(-seqlen // nchunks)  # balanced chunk lengths: the least tail padding
    pad = nchunks * T - seqlen

    with torch.autocast(device_type=u.device.type, enabled=False):
        uf = u.transpose(1, 2).to(dtype)  # channels last: (b, L, dim)
        dl = effective_dt(delta.transpose(1, 2).to(dtype), delta_bias, delta_softplus)
        du = dl * uf
        Bf, Cf = Bg.to(dtype), Cg.to(dtype)  # (b, g, n, L)
        Af = A.to(dtype).view(ngroups, rep, d_state).transpose(1, 2).contiguous()  # (g, n, r)
        init = None
        if initial_state is not None:
            init = initial_state.to(dtype).view(batch, ngroups, rep, d_state).transpose(2, 3)
        # Skip the exponent clamps when the most negative exponent possible cannot reach the
        # floor: per step max |delta| * max |A|, per chunk (pass 3) at least that.
        with torch.no_grad():
            most_negative = float(Af.min()) * float(torch.linalg.vector_norm(dl, float("inf")))
        clamp = not most_negative > exp_floor(dtype)  # also True for NaN
        reset = None
        if seq_idx is not None:
            clamp = True
            reset = document_starts(seq_idx).to(dtype) * (2 * exp_floor(dtype))  # (b, L)
            if pad:
                reset = F.pad(reset, (0, pad))
            reset = _step_major(reset.view(batch, nchunks * T, 1, 1, 1), batch, nchunks, T)
        if pad:
            # delta = 0 is exactly neutral: decay exp(0) = 1 and no input.
            dl, du = F.pad(dl, (0, 0, 0, pad)), F.pad(du, (0, 0, 0, pad))
            Bf, Cf = F.pad(Bf, (0, pad)), F.pad(Cf, (0, pad))
        chunked = (batch, nchunks, T)
        per_group = (batch, nchunks * T, ngroups, 1, rep)
        dl_s = _step_major(dl.view(per_group), *chunked)  # (T, b, c, g, 1, r)
        du_s = _step_major(du.view(per_group), *chunked)
        # (b, g, n, L) -> (T, b, c, g, n, 1) and (T, b, c, g, 1, n)
        B_s = _step_major(Bf.permute(0, 3, 1, 2), *chunked).unsqueeze(-1)
        C_s = _step_major(Cf.permute(0, 3, 1, 2), *chunked).unsqueeze(-2)
        y, final = _SelectiveScanFn.apply(dl_s, du_s, B_s, C_s, Af, init, clamp, reset)
        final = final.transpose(2, 3).reshape(batch, dim, d_state)

        # (T, b, c, ..., r) -> (b, c * T, dim): moves whole contiguous rows of channels.
        y = y.view(T, batch, nchunks, dim).permute(1, 2, 0, 3).reshape(batch, -1, dim)
        if pad:
            y = y[:, :seqlen]
        zf = None if z is None else z.transpose(1, 2)
        y = skip_and_gate(y, uf, D, zf).to(u.dtype).transpose(1, 2)
    if return_final_state:
        return y, final
    return y

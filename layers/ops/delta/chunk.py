"""The chunked gated delta rule in plain PyTorch: prefill, training and the CPU path.

The sequence splits into chunks of ``Q`` tokens. Inside a chunk the delta-rule updates are
condensed with the WY / UT transform (Yang et al., 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length"): with ``cs`` the cumulative log-decay of the chunk
and ``L[i, j] = beta_i (k_i . k_j) exp(cs_i - cs_j)`` for ``j < i``, one unit lower-triangular
solve of ``(I + L)`` gives

    U = (I + L)^-1 (beta v)                 # the values each token writes from a zero state
    W = (I + L)^-1 (beta k exp(cs))         # how much each token's write reads the old state

and then, chunk by chunk, with ``S`` the state entering the chunk (head_k_dim, head_v_dim):

    V' = U - W S
    S  = exp(cs_end) S + (k exp(cs_end - cs))^T V'

The Python loop carries only these two products; the outputs of every chunk follow from the
stacked entering states and V' in two batched matmuls:

    O  = (q exp(cs)) S + ((q k^T) * exp(cs_i - cs_j), j <= i) V'

With grouped value heads (nv = r * nk) q, k and ``k k^T``, ``q k^T`` are formed once per key
head and broadcast over its r value heads, never repeated into memory.

Only (Q, Q) matrices per chunk and head and the states are formed: memory is linear in the
sequence length, and the Python loop runs once per chunk, never per token. Every exponent is
<= 0 (the decay g <= 0), clamped below before exp (see :func:`~layers.ops._common.exp_floor`).

With a decay per key channel (Kimi Delta Attention: ``g`` of shape (..., head_k_dim)), ``cs``
has a channel dimension, ``exp(cs)`` multiplies channel-wise, and the two decayed products
``sum_d x_id y_jd exp(cs_id - cs_jd)`` (for L and for q k^T) are no longer a matmul times a
(Q, Q) mask. :func:`_channel_decayed_products` forms them from matmuls whose factors stay
in range: where the decay spans little across a block of tokens, both factors refer to the
block's midpoint (``exp(cs_i - m) exp(m - cs_j)``, exponents within +-20 in float32); between
a block and the tokens before it both refer to the block's first token, so that every
exponent is <= 0 (``exp(cs_i - r) exp(r - cs_j)``, j < r <= i), as flash-linear-attention's
KDA kernels split their chunks. The block is the whole chunk when the decay allows, and only
blocks of 8 tokens that still span too much are computed exactly, element by element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .._common import clamped_exp, compute_dtype, document_index, exp_floor

__all__ = ["gated_delta_chunked_torch"]


def _document_masks(
    docs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """0 / 1 masks of packed documents in chunked form, as the SSD scan uses them.

    docs: (b, c, Q) canonical document index. Returns, broadcasting over heads:
    same (b, 1, c, Q, Q): i and j in one document; from_start (b, 1, c, Q, 1): the token is in
    the document of the state entering the chunk; to_end (b, 1, c, Q, 1): the token is in the
    chunk's last document (its write reaches the chunk's end state); keep (b, 1, c): no document
    starts inside the chunk (the entering state reaches its end).
    """
    before = torch.cat([docs[:, :1, 0], docs[:, :-1, -1]], 1)  # (b, c): the token before
    same = (docs.unsqueeze(-1) == docs.unsqueeze(-2)).unsqueeze(1)
    from_start = (docs == before[..., None]).unsqueeze(1).unsqueeze(-1)
    to_end = (docs == docs[:, :, -1:]).unsqueeze(1).unsqueeze(-1)
    keep = (docs[:, :, -1] == before).unsqueeze(1)
    return same, from_start, to_end, keep


def _factored_products(x: torch.Tensor, y: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """``sum_d x[i, d] y[j, d] exp(cs[i, d] - cs[j, d])`` for all i, j as one matmul.

    x, y, cs: (..., S, d). Both factors refer to the midpoint of each channel's range,
    ``m = (cs[0] + cs[-1]) / 2``: ``(x exp(cs - m)) (y exp(m - cs))^T``, whose exponents lie in
    [-span / 2, span / 2] (span = cs[0] - cs[-1]). Callers make sure span <= :func:`_span_limit`.
    """
    mid = (cs[..., :1, :] + cs[..., -1:, :]) / 2
    return (x * torch.exp(cs - mid)) @ (y * torch.exp(mid - cs)).transpose(-1, -2)


def _span_limit(dtype: torch.dtype) -> float:
    """The largest decay span across a block for which :func:`_factored_products` is used:
    its factors stay within exp(+-20) in float32 (exp(+-100) in float64), normal floats whose
    products are exact to rounding."""
    return -exp_floor(dtype)


def product_blocks(cs: torch.Tensor) -> tuple[int, bool]:
    """How :func:`_channel_decayed_products` splits chunks with cumulative log-decays ``cs``
    (..., Q, d): (block size S, whether blocks take :func:`_factored_products`). S is the
    largest of Q, 32, 16, 8 whose every block, in every channel, spans a decay of at most
    :func:`_span_limit`; (8, False) when none does."""
    Q = cs.shape[-2]
    limit = _span_limit(cs.dtype)
    for S in [Q] + [size for size in (32, 16, 8) if size < Q]:
        ends = cs[..., S - 1 :: S, :]  # each block's last token, and a short last block's
        if Q % S:
            ends = torch.cat([ends, cs[..., -1:, :]], -2)
        if (cs[..., ::S, :] - ends).max() <= limit:
            return S, True
    return min(8, Q), False


def _channel_decayed_products(x: torch.Tensor, y: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """``M[i, j] = sum_d x[i, d] y[j, d] exp(cs[i, d] - cs[j, d])`` for ``j <= i``.

    x, y, cs: (..., Q, d), ``cs`` non-increasing along Q (a cumulative log-decay). Returns
    (..., Q, Q); entries above the diagonal are finite and meaningless (callers mask them).

    Blocks of S tokens (the largest of Q, 32, 16, 8 whose decay span, the largest over all
    blocks and channels, is at most :func:`_span_limit`) take :func:`_factored_products`; so
    does the whole chunk at once when it fits, one matmul. Each block against the tokens
    before it is one matmul with both factors referred to the block's first token ``r``,
    ``exp(cs_i - r) exp(r - cs_j)`` for j < r <= i, every exponent <= 0. Where even blocks of
    8 span more (decays of more than e^-5 per token on average), those blocks are computed
    exactly, an (..., 8, 8, d) product.
    """
    Q = x.shape[-2]
    S, factored = product_blocks(cs)
    if S == Q and factored:
        return _factored_products(x, y, cs)
    n = -(-Q // S)
    pad = n * S - Q
    if pad:  # zero rows; cs continues flat, so the padding's exponents stay <= 0
        x, y = (F.pad(t, (0, 0, 0, pad)) for t in (x, y))
        cs = torch.cat([cs, cs[..., -1:, :].expand(*cs.shape[:-2], pad, cs.shape[-1])], -2)
    P = n * S
    xb, yb, cb = (t.unflatten(-2, (n, S)) for t in (x, y, cs))  # (..., n, S, d)
    if factored:
        inner = _factored_products(xb, yb, cb)  # (..., n, S, S)
    else:  # exact, (..., n, S, S, d) at once
        inner = clamped_exp(cb.unsqueeze(-2) - cb.unsqueeze(-3), 0.0, inplace=True)
        inner = (xb.unsqueeze(-2) * yb.unsqueeze(-3) * inner).sum(-1)
    # Block I against the tokens before it, referred to the block's first token r_I: only
    # those I * S columns are formed, the rest of the row of blocks is zero.
    rows = xb * clamped_exp(cb - cb[..., :1, :], 0.0, inplace=True)  # (..., n, S, d)
    blocks = [F.pad(inner[..., 0, :, :], (0, P - S))]
    for block in range(1, n):
        start = block * S
        ref = cs[..., start : start + 1, :]
        cols = y[..., :start, :] * clamped_exp(ref - cs[..., :start, :], 0.0, inplace=True)
        cross = rows[..., block, :, :] @ cols.transpose(-1, -2)  # (..., S, start)
        blocks.append(F.pad(torch.cat([cross, inner[..., block, :, :]], -1), (0, P - start - S)))
    return torch.cat(blocks, -2)[..., :Q, :Q]


def gated_delta_chunked_torch(
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
    """Chunked gated delta rule in plain PyTorch (differentiable; CPU prefill and training).

    Same arguments and results as :func:`~layers.ops.delta.gated_delta_rule`. Computes in
    float32 (float64 for float64 inputs) with autocast off; the output is in v's dtype, the
    final state in the compute dtype.
    """
    batch, seqlen, nv, dv = v.shape
    nk, dk = k.shape[-2:]
    if nv % nk != 0:
        raise ValueError(f"value heads ({nv}) must be a multiple of key heads ({nk})")
    channel = g.dim() == 4  # a decay per key channel (Kimi Delta Attention)
    if seqlen == 0:
        raise ValueError("gated_delta_chunked_torch needs seqlen >= 1")
    dtype = compute_dtype(q, k, v, g, beta, initial_state)
    out_dtype = v.dtype
    scale = dk**-0.5 if scale is None else scale
    with torch.autocast(device_type=v.device.type, enabled=False):
        # Balanced chunks (as the SSD scan): the configured count, the least tail padding.
        nchunks = -(-seqlen // chunk_size)
        Q = -(-seqlen // nchunks)
        pad = nchunks * Q - seqlen  # g = 0, beta = 0, k = 0 there: the state stays as it is

        def chunked(t: torch.Tensor, groups: int, factor: float = 1.0) -> torch.Tensor:
            """(b, l, heads, ...) -> (b, groups, heads / groups, c, Q, ...) * factor, in the
            compute dtype, contiguous."""
            t = t.to(dtype)
            t = F.pad(t * factor if factor != 1.0 else t, (0, 0) * (t.dim() - 2) + (0, pad))
            t = t.unflatten(1, (nchunks, Q)).movedim(3, 1).contiguous()
            return t.unflatten(1, (groups, -1))

        # Value heads as (key head, value head of that key head): q and k stay once per key
        # head, (b, nk, 1, c, Q, dk), and broadcast over its nv / nk value heads.
        q, k = chunked(q, nk, scale), chunked(k, nk)
        v, g, beta = (chunked(t, nk) for t in (v, g, beta))  # (b, nk, r, c, Q[, d])

        masks = None
        if seq_idx is not None:
            docs = document_index(seq_idx)
            if pad:
                docs = torch.cat([docs, docs[:, -1:].expand(-1, pad)], 1)
            masks = [m.unsqueeze(1) for m in _document_masks(docs.view(batch, nchunks, Q))]

        cs = g.cumsum(4)  # (b, nk, r, c, Q[, dk])
        causal = torch.ones(Q, Q, dtype=torch.bool, device=v.device).tril()
        if masks is not None:
            causal = causal & masks[0]
        k_beta = k * beta.unsqueeze(-1)  # (b, nk, r, c, Q, dk)
        if channel:
            lower = (_channel_decayed_products(k_beta, k, cs) * causal).tril(-1)
            attn = _channel_decayed_products(q, k, cs) * causal
            enter = clamped_exp(cs, 0.0)  # (b, nk, r, c, Q, dk)
            to_end = clamped_exp(cs[..., -1:, :] - cs, 0.0, inplace=True)
            chunk_decay = clamped_exp(cs[..., -1, :], 0.0)  # (b, nk, r, c, dk)
        else:
            # exp(cs_i - cs_j) for j <= i (same document), else 0; the clamp keeps the masked
            # upper triangle finite. k k^T and q k^T once per key head.
            decay = clamped_exp(cs.unsqueeze(-1) - cs.unsqueeze(-2), 0.0, inplace=True) * causal
            kk = k @ k.transpose(-1, -2)  # (b, nk, 1, c, Q, Q)
            lower = (kk * decay * beta.unsqueeze(-1)).tril(-1)
            attn = q @ k.transpose(-1, -2) * decay  # (b, nk, r, c, Q, Q)
            enter = clamped_exp(cs, 0.0).unsqueeze(-1)  # (b, nk, r, c, Q, 1)
            to_end = clamped_exp(cs[..., -1:] - cs, 0.0, inplace=True).unsqueeze(-1)
            chunk_decay = clamped_exp(cs[..., -1], 0.0).unsqueeze(-1)  # (b, nk, r, c, 1)
        if masks is not None:
            enter = enter * masks[1]
            to_end = to_end * masks[2]
            chunk_decay = chunk_decay * masks[3].unsqueeze(-1)
        # From here on value heads are one dimension again: (b, nv, c, Q, ...).

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(1, 2)

        lower, attn, chunk_decay = heads(lower), heads(attn), heads(chunk_decay)
        eye = torch.eye(Q, dtype=dtype, device=v.device)
        # (I + L)^-1 once, then U and W by matmul: cheaper than solving for both right-hand
        # sides (LAPACK copies them into its own layout).
        solve = torch.linalg.solve_triangular(
            lower + eye, eye.expand_as(lower), upper=False, unitriangular=True
        )
        U = solve @ heads(v * beta.unsqueeze(-1))
        W = solve @ heads(k_beta * enter)
        k_end = heads(k * to_end).transpose(-1, -2)  # (b, nv, c, dk, Q)
        q_enter = heads(q * enter)

        state = v.new_zeros(batch, nv, dk, dv) if initial_state is None else initial_state
        state = state.to(dtype)
        # The loop carries the state only; the outputs of all chunks follow in two batched
        # matmuls. unbind, not [:, :, i]: c selects would each get a zero-filled full-size
        # gradient.
        entering, written = [], []
        for U_c, W_c, k_c, a_c in zip(
            U.unbind(2), W.unbind(2), k_end.unbind(2), chunk_decay.unbind(2), strict=True
        ):
            v_new = U_c - W_c @ state
            entering.append(state)
            written.append(v_new)
            state = torch.addcmul(k_c @ v_new, state, a_c[..., None])
        o = q_enter @ torch.stack(entering, 2) + attn @ torch.stack(written, 2)
        o = rearrange(o, "b h c q d -> b (c q) h d")[:, :seqlen].to(out_dtype)
    if return_final_state:
        return o, state
    return o

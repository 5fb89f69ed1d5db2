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
    O  = (q exp(cs)) S + ((q k^T) * exp(cs_i - cs_j), j <= i) V'
    S  = exp(cs_end) S + (k exp(cs_end - cs))^T V'

Only (Q, Q) matrices per chunk and head and the states are formed: memory is linear in the
sequence length, and the Python loop runs once per chunk, never per token. Every exponent is
<= 0 (the decay g <= 0), clamped below before exp (see :func:`~layers.ops._common.exp_floor`).

With a decay per key channel (Kimi Delta Attention: ``g`` of shape (..., head_k_dim)), ``cs``
has a channel dimension, ``exp(cs)`` multiplies channel-wise, and the two decayed products
``sum_d x_id y_jd exp(cs_id - cs_jd)`` (for L and for q k^T) are no longer a matmul times a
(Q, Q) mask. :func:`_channel_decayed_products` forms them as flash-linear-attention's KDA
kernels do: the chunk splits into sub-chunks of ``SUB`` tokens; between a sub-chunk and the
tokens before it one matmul, both factors referred to the sub-chunk's first token so that
every exponent stays <= 0 (``exp(cs_i - r) exp(r - cs_j)``, j < r <= i); inside a sub-chunk
the exact (SUB, SUB, head_k_dim) product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import clamped_exp, compute_dtype, document_index

__all__ = ["gated_delta_chunked_torch"]

SUB = 16  # tokens per sub-chunk of the per-channel decayed products


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


def _channel_decayed_products(x: torch.Tensor, y: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """``M[i, j] = sum_d x[i, d] y[j, d] exp(cs[i, d] - cs[j, d])`` for ``j <= i``.

    x, y, cs: (..., Q, d), ``cs`` non-increasing along Q (a cumulative log-decay). Returns
    (..., Q, Q); entries above the diagonal are finite and meaningless (callers mask them).
    Every exponent is clamped to <= 0, and only exponents that are <= 0 anyway are used.
    """
    Q = x.shape[-2]
    n = -(-Q // SUB)
    pad = n * SUB - Q
    if pad:  # zero rows; cs continues flat, so the padding's exponents stay <= 0
        x, y = (F.pad(t, (0, 0, 0, pad)) for t in (x, y))
        cs = torch.cat([cs, cs[..., -1:, :].expand(*cs.shape[:-2], pad, cs.shape[-1])], -2)
    P = n * SUB
    xb, yb, cb = (t.unflatten(-2, (n, SUB)) for t in (x, y, cs))  # (..., n, SUB, d)
    # Inside each sub-chunk: exact, (..., n, SUB, SUB, d) at once.
    inner = clamped_exp(cb.unsqueeze(-2) - cb.unsqueeze(-3), 0.0)
    inner = (xb.unsqueeze(-2) * yb.unsqueeze(-3) * inner).sum(-1)  # (..., n, SUB, SUB)
    # Sub-chunk I against every earlier token, referred to the sub-chunk's first token r_I.
    ref = cb[..., :1, :]  # (..., n, 1, d)
    rows = xb * clamped_exp(cb - ref, 0.0)
    cols = y.unsqueeze(-3) * clamped_exp(ref - cs.unsqueeze(-3), 0.0)  # (..., n, P, d)
    before = torch.arange(P, device=x.device) < torch.arange(0, P, SUB, device=x.device)[:, None]
    cross = rows @ cols.transpose(-1, -2) * before[:, None, :]  # (..., n, SUB, P)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)[:, None, :, None]
    diagonal = inner.unsqueeze(-2) * eye  # (..., n, SUB, n, SUB)
    out = cross + diagonal.flatten(-2)
    return out.flatten(-3, -2)[..., :Q, :Q]


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
        repeat = nv // nk
        # (b, l, h, d) -> (b, h, l, d), key heads repeated for their value heads.
        q, k = (t.to(dtype).repeat_interleave(repeat, 2).transpose(1, 2) for t in (q, k))
        v = v.to(dtype).transpose(1, 2)
        g, beta = (t.to(dtype).transpose(1, 2) for t in (g, beta))  # g: (b, h, l[, dk])
        # Balanced chunks (as the SSD scan): the configured count, the least tail padding.
        nchunks = -(-seqlen // chunk_size)
        Q = -(-seqlen // nchunks)
        pad = nchunks * Q - seqlen
        if pad:  # g = 0, beta = 0, k = 0: padded steps leave the state as it is
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            g = F.pad(g, (0, 0, 0, pad) if channel else (0, pad))
            beta = F.pad(beta, (0, pad))
        q, k, v = (t.reshape(batch, nv, nchunks, Q, -1) for t in (q, k, v))
        g = g.reshape(batch, nv, nchunks, Q, *g.shape[3:])
        beta = beta.reshape(batch, nv, nchunks, Q)

        masks = None
        if seq_idx is not None:
            docs = document_index(seq_idx)
            if pad:
                docs = torch.cat([docs, docs[:, -1:].expand(-1, pad)], 1)
            masks = _document_masks(docs.view(batch, nchunks, Q))

        cs = g.cumsum(3)  # (b, h, c, Q[, dk])
        causal = torch.ones(Q, Q, dtype=torch.bool, device=v.device).tril()
        if masks is not None:
            causal = causal & masks[0]
        k_beta = k * beta.unsqueeze(-1)
        if channel:
            lower = (_channel_decayed_products(k_beta, k, cs) * causal).tril(-1)
            attn = _channel_decayed_products(q, k, cs) * causal
            enter = clamped_exp(cs, 0.0)  # (b, h, c, Q, dk)
            to_end = clamped_exp(cs[..., -1:, :] - cs, 0.0)
            chunk_decay = clamped_exp(cs[..., -1, :], 0.0)  # (b, h, c, dk)
        else:
            # exp(cs_i - cs_j) for j <= i (same document), else 0; the clamp keeps the masked
            # upper triangle finite.
            decay = clamped_exp(cs.unsqueeze(-1) - cs.unsqueeze(-2), 0.0) * causal
            lower = (k_beta @ k.transpose(-1, -2) * decay).tril(-1)
            attn = q @ k.transpose(-1, -2) * decay  # (b, h, c, Q, Q)
            enter = clamped_exp(cs, 0.0).unsqueeze(-1)  # (b, h, c, Q, 1)
            to_end = clamped_exp(cs[..., -1:] - cs, 0.0).unsqueeze(-1)
            chunk_decay = clamped_exp(cs[..., -1], 0.0).unsqueeze(-1)  # (b, h, c, 1)
        eye = torch.eye(Q, dtype=dtype, device=v.device)
        if masks is not None:
            enter = enter * masks[1]
        # (I + L)^-1 once, then U and W by matmul: cheaper than solving for both right-hand
        # sides (LAPACK copies them into its own layout).
        solve = torch.linalg.solve_triangular(
            lower + eye, eye.expand_as(lower), upper=False, unitriangular=True
        )
        U = solve @ (v * beta.unsqueeze(-1))
        W = solve @ (k_beta * enter)
        q_enter = q * enter
        if masks is not None:
            to_end = to_end * masks[2]
            chunk_decay = chunk_decay * masks[3].unsqueeze(-1)
        k_end = k * to_end

        state = v.new_zeros(batch, nv, dk, dv) if initial_state is None else initial_state.to(dtype)
        outputs = []
        # unbind, not [:, :, i]: c selects would each get a zero-filled full-size gradient.
        for U_c, W_c, q_c, attn_c, k_c, a_c in zip(
            U.unbind(2), W.unbind(2), q_enter.unbind(2), attn.unbind(2), k_end.unbind(2),
            chunk_decay.unbind(2), strict=True,
        ):  # fmt: skip
            v_new = U_c - W_c @ state
            outputs.append(q_c @ state + attn_c @ v_new)
            state = torch.addcmul(k_c.transpose(-1, -2) @ v_new, state, a_c[..., None])
        o = torch.stack(outputs, 2).reshape(batch, nv, nchunks * Q, dv)[:, :, :seqlen]
        o = (o * scale).transpose(1, 2).to(out_dtype)
    if return_final_state:
        return o, state
    return o

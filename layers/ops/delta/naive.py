"""The gated delta rule written plainly, one token at a time in float64: the specification.

Per value head ``h`` (reading key head ``h // (nv_heads // nk_heads)``), with the state
``S`` of shape (head_k_dim, head_v_dim) and ``a_t = exp(g_t)``:

    S_t = a_t * S_{t-1}            # a_t a scalar, or one factor per key channel (row of S)
    S_t = S_t + k_t outer (beta_t * (v_t - S_t^T k_t))      # the delta rule: correct the
    o_t = scale * S_t^T q_t                                 # value k_t currently reads

This is Gated DeltaNet (Yang, Kautz and Hatamizadeh, 2024) as flash-linear-attention's
``fused_recurrent_gated_delta_rule`` and transformers' Qwen3-Next compute it (q and k are
normalised by the caller). With ``g`` per key channel it is Kimi Delta Attention (Kimi Team,
2025; fla's ``chunk_kda``): ``a_t`` scales row ``d`` of ``S`` by ``exp(g_t[d])``. The chunked and
one-token paths are tested against it.
"""

from __future__ import annotations

import torch

__all__ = ["gated_delta_naive"]


def gated_delta_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence above, token by token, in float64 (differentiable).

    Args:
        q, k: (batch, seqlen, nk_heads, head_k_dim).
        v: (batch, seqlen, nv_heads, head_v_dim), nv_heads a multiple of nk_heads.
        g: (batch, seqlen, nv_heads) log-decay (<= 0), or (batch, seqlen, nv_heads,
            head_k_dim) for a decay per key channel; beta: (batch, seqlen, nv_heads).
        scale: multiplies the output; None: head_k_dim ** -0.5.
        initial_state: (batch, nv_heads, head_k_dim, head_v_dim) or None (zeros).
        seq_idx: (batch, seqlen) document of each token, or None: the state restarts from
            zero where the document changes (the initial state belongs to the first one).

    Returns:
        o: (batch, seqlen, nv_heads, head_v_dim) and the final state, both float64.
    """
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    batch, seqlen, nv, dv = v.shape
    dk = k.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    repeat = nv // k.shape[2]
    q, k = q.repeat_interleave(repeat, 2), k.repeat_interleave(repeat, 2)
    if initial_state is None:
        state = torch.zeros(batch, nv, dk, dv, dtype=torch.float64, device=v.device)
    else:
        state = initial_state.double().clone()
    outputs = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).double().view(batch, 1, 1, 1)
            state = state * same
        decay = g[:, t].exp()  # (b, h) or (b, h, dk)
        state = state * (decay[..., None] if g.dim() == 4 else decay[..., None, None])
        read = torch.einsum("bhk,bhkv->bhv", k[:, t], state)
        delta = beta[:, t, :, None] * (v[:, t] - read)
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, 1), state

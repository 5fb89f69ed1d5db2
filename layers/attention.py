"""Causal self-attention: MHA / GQA / MQA, RoPE or none, optional sliding window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from layers.base import Block, dtype_bytes, require, require_positive_int
from layers.registry import register_block
from layers.rope import RotaryEmbedding


@dataclass
class AttentionOptions:
    """Options of the ``attention`` block.

    Attributes:
        n_heads: query heads; None gives ``max(1, d_model // 64)``.
        n_kv_heads: key/value heads (GQA; 1 is MQA); None gives ``n_heads``.
        head_dim: per-head width; None gives ``d_model // n_heads``.
        rope: rotary position embeddings on queries and keys (False: no positional encoding,
            as in Jamba and Nemotron-H).
        rope_theta: RoPE base.
        rope_fraction: share of each head's channels that rotate (Bamba uses 0.5).
        window: sliding-window size (each query sees itself and ``window - 1`` earlier keys);
            None is full causal attention.
        qkv_bias: biases on the q, k, v projections.
        out_bias: bias on the output projection.
    """

    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    rope: bool = True
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0
    window: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False

    def resolve(self, d_model: int, where: str) -> AttentionOptions:
        n_heads = self.n_heads if self.n_heads is not None else max(1, d_model // 64)
        require_positive_int(n_heads, f"{where}.n_heads")
        n_kv_heads = self.n_kv_heads if self.n_kv_heads is not None else n_heads
        require_positive_int(n_kv_heads, f"{where}.n_kv_heads")
        require(
            n_heads % n_kv_heads == 0,
            f"{where}.n_kv_heads",
            f"must divide n_heads={n_heads}; got {n_kv_heads}",
        )
        if self.head_dim is None:
            require(
                d_model % n_heads == 0,
                f"{where}.n_heads",
                f"must divide d_model={d_model} (or set head_dim); got {n_heads}",
            )
        head_dim = self.head_dim if self.head_dim is not None else d_model // n_heads
        require_positive_int(head_dim, f"{where}.head_dim")
        require(
            0.0 < self.rope_fraction <= 1.0,
            f"{where}.rope_fraction",
            f"must be in (0, 1]; got {self.rope_fraction}",
        )
        require(
            int(head_dim * self.rope_fraction) % 2 == 0,
            f"{where}.rope_fraction",
            f"head_dim * rope_fraction must be even; got {head_dim} * {self.rope_fraction}",
        )
        require(self.rope_theta > 0, f"{where}.rope_theta", f"must be > 0; got {self.rope_theta}")
        if self.window is not None:
            require(
                isinstance(self.window, int) and self.window > 0,
                f"{where}.window",
                f"must be a positive integer or null; got {self.window!r}",
            )
        return AttentionOptions(
            n_heads, n_kv_heads, head_dim, self.rope, float(self.rope_theta),
            self.rope_fraction, self.window, self.qkv_bias, self.out_bias,
        )  # fmt: skip


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """Causal attention aligned bottom-right, with an optional sliding window.

    Query ``i`` sits at absolute position ``lk - lq + i``: the queries are the last ``lq``
    positions of the key sequence, as when continuing from a cache. It sees key ``j`` iff
    ``j <= pos`` and, with a window, ``j > pos - window``.

    Shapes: q (batch, n_heads, lq, head_dim); k, v (batch, n_kv_heads, lk, head_dim) with
    n_kv_heads dividing n_heads -> (batch, n_heads, lq, head_dim).

    Masked cases run over query blocks of ``block_size`` so memory stays
    O(block_size * keys_in_view), never lq x lk at once.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    offset = lk - lq
    gqa = k.shape[1] != q.shape[1]
    full_view = window is None or window >= lk
    if full_view and offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if full_view and lq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    outputs = []
    for start in range(0, lq, block_size):
        stop = min(lq, start + block_size)
        query_pos = torch.arange(offset + start, offset + stop, device=q.device)
        key_lo = 0 if full_view else max(0, offset + start - window + 1)
        key_pos = torch.arange(key_lo, offset + stop, device=q.device)
        visible = key_pos[None, :] <= query_pos[:, None]
        if not full_view:
            visible &= key_pos[None, :] > query_pos[:, None] - window
        outputs.append(
            F.scaled_dot_product_attention(
                q[..., start:stop, :],
                k[..., key_lo : offset + stop, :],
                v[..., key_lo : offset + stop, :],
                attn_mask=visible,
                scale=scale,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outputs, dim=-2)


@register_block("attention", symbol="*", options=AttentionOptions)
class Attention(Block):
    """Self-attention sublayer. Shapes: (batch, seqlen, d_model) -> same.

    Uses ``scaled_dot_product_attention``, so flash / memory-efficient kernels on GPU and the
    fused CPU kernel for plain causal attention.
    """

    def __init__(self, d_model: int, options: AttentionOptions, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        heads, kv_heads, head_dim = options.n_heads, options.n_kv_heads, options.head_dim
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=options.qkv_bias)
        self.k_proj = nn.Linear(d_model, kv_heads * head_dim, bias=options.qkv_bias)
        self.v_proj = nn.Linear(d_model, kv_heads * head_dim, bias=options.qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=options.out_bias)
        self.rotary = (
            RotaryEmbedding(head_dim, int(head_dim * options.rope_fraction), options.rope_theta)
            if options.rope
            else None
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        opts = self.options
        q = rearrange(self.q_proj(hidden), "b l (h d) -> b l h d", d=opts.head_dim)
        k = rearrange(self.k_proj(hidden), "b l (h d) -> b l h d", d=opts.head_dim)
        v = rearrange(self.v_proj(hidden), "b l (h d) -> b l h d", d=opts.head_dim)
        if self.rotary is not None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            cos, sin = self.rotary.cos_sin(positions, q.dtype)
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        out = causal_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window=opts.window
        )
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))

    @classmethod
    def inference_state_bytes(
        cls, d_model: int, options: AttentionOptions, context: int, dtype: torch.dtype
    ) -> int:
        kept = context if options.window is None else min(context, options.window)
        return 2 * options.n_kv_heads * options.head_dim * kept * dtype_bytes(dtype)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.o_proj]

"""Causal self-attention: MHA / GQA / MQA; RoPE, ALiBi, sinusoidal or no positions; optional
sliding window."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import Block, CacheEntry, TokenContext, dtype_bytes
from layers.norm import RMSNorm
from layers.options import require, require_finite_number, require_positive_int
from layers.positions import alibi_mask, alibi_slopes
from layers.registry import register_block
from layers.rope import RotaryEmbedding
from layers.rope_scaling import check_scaling

POSITIONS = ("rope", "none", "alibi", "sinusoidal")
QK_NORM_SCOPES = ("head", "projection")


@dataclass
class AttentionOptions:
    """Options of the ``attention`` block.

    Attributes:
        n_heads: query heads; None gives ``max(1, d_model // 64)``.
        n_kv_heads: key/value heads (GQA; 1 is MQA); None gives ``n_heads``.
        head_dim: per-head width; None gives ``d_model // n_heads``.
        position: how attention knows where tokens are: ``rope`` (rotary embeddings on
            queries and keys, the default), ``none`` (no positional encoding, as in Jamba and
            Nemotron-H: order comes from causality and the SSM layers), ``alibi`` (per-head
            linear biases on the scores, Press et al. 2022) or ``sinusoidal`` (the original
            Transformer's absolute encoding; it is added once to the embeddings by the model,
            see :class:`hybrid.model.HybridLM`, so every attention sublayer must then say
            ``sinusoidal``). None: from ``rope``.
        rope: the older switch: False is ``position: none``; ignored when ``position`` is set.
        rope_theta: RoPE base.
        rope_fraction: share of each head's channels that rotate (Bamba uses 0.5).
        rope_scaling: None, or transformers' ``rope_parameters`` of a context-extending
            scaling: ``{"rope_type": "linear", "factor": 4}``, ``dynamic`` (NTK: factor,
            original_max_position_embeddings), ``yarn`` (factor,
            original_max_position_embeddings, optional beta_fast / beta_slow /
            attention_factor / mscale / mscale_all_dim / truncate) or ``llama3`` (factor,
            original_max_position_embeddings, low_freq_factor, high_freq_factor); see
            :mod:`layers.rope_scaling`.
        window: sliding-window size (each query sees itself and ``window - 1`` earlier keys);
            None is full causal attention.
        qkv_bias: biases on the q, k, v projections.
        out_bias: bias on the output projection.
        qk_norm: RMSNorm the queries and keys before RoPE (Qwen3, Qwen3-Next, OLMo 2).
        qk_norm_scope: what one of those norms spans: ``head`` (each head on its own, one
            weight of head_dim for q and one for k: Qwen3, Qwen3-Next) or ``projection`` (the
            whole q projection, n_heads * head_dim channels, and the whole k projection,
            n_kv_heads * head_dim: OLMo 2 and OLMo hybrid).
        qk_norm_eps: epsilon of those norms.
        output_gate: multiply the attention output by sigmoid(gate_proj(x)), one gate per
            channel of every head (Qwen3-Next's gated attention).
        softmax_scale: the factor of q.k before the softmax; None: 1 / sqrt(head_dim)
            (Granite's attention_multiplier sets it).
    """

    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    rope: bool = True
    position: str | None = None
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0
    rope_scaling: dict | None = None
    window: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    qk_norm_eps: float = 1e-6
    output_gate: bool = False
    softmax_scale: float | None = None

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
        position = self.position
        if position is None:
            position = "rope" if self.rope else "none"
        require(
            position in POSITIONS,
            f"{where}.position",
            f"must be one of {', '.join(POSITIONS)}; got {position!r}",
        )
        require(
            position != "rope" or self.rope is not False,
            f"{where}.rope",
            "false contradicts position: rope (set one of them)",
        )
        require(
            0.0 < self.rope_fraction <= 1.0,
            f"{where}.rope_fraction",
            f"must be in (0, 1]; got {self.rope_fraction}",
        )
        require(
            position != "rope" or int(head_dim * self.rope_fraction) % 2 == 0,
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
        for name in ("qkv_bias", "out_bias", "qk_norm", "output_gate"):
            value = getattr(self, name)
            require(
                isinstance(value, bool), f"{where}.{name}", f"must be true or false; got {value!r}"
            )
        require(
            self.qk_norm_eps > 0, f"{where}.qk_norm_eps", f"must be > 0; got {self.qk_norm_eps}"
        )
        require(
            self.qk_norm_scope in QK_NORM_SCOPES,
            f"{where}.qk_norm_scope",
            f"must be one of {', '.join(QK_NORM_SCOPES)}; got {self.qk_norm_scope!r}",
        )
        if self.softmax_scale is not None:
            scale = require_finite_number(self.softmax_scale, f"{where}.softmax_scale")
            require(scale > 0, f"{where}.softmax_scale", f"must be > 0 or null; got {scale}")
        scaling = check_scaling(self.rope_scaling, f"{where}.rope_scaling")
        require(
            scaling is None or position == "rope",
            f"{where}.rope_scaling",
            f"scales RoPE; it needs position: rope, got {position!r}",
        )
        return dataclasses.replace(
            self, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
            rope=position == "rope", position=position, rope_theta=float(self.rope_theta),
            rope_scaling=scaling,
        )  # fmt: skip


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
    block_size: int = 1024,
    slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention aligned bottom-right, with an optional sliding window and ALiBi.

    Query ``i`` sits at absolute position ``lk - lq + i``: the queries are the last ``lq``
    positions of the key sequence, as when continuing from a cache. It sees key ``j`` iff
    ``j <= pos`` and, with a window, ``j > pos - window``.

    Shapes: q (batch, n_heads, lq, head_dim); k, v (batch, n_kv_heads, lk, head_dim) with
    n_kv_heads dividing n_heads -> (batch, n_heads, lq, head_dim). ``slopes`` (n_heads,):
    ALiBi's, adding ``-slope * (query - key)`` to the scores.

    Masked cases run over query blocks of ``block_size`` so memory stays
    O(block_size * keys_in_view), never lq x lk at once.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    offset = lk - lq
    gqa = k.shape[1] != q.shape[1]
    full_view = window is None or window >= lk
    if full_view and offset == 0 and slopes is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if full_view and lq == 1 and slopes is None:
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
        mask = visible
        if slopes is not None:
            mask = alibi_mask(visible, query_pos[:, None], key_pos[None, :], slopes, q.dtype)
        outputs.append(
            F.scaled_dot_product_attention(
                q[..., start:stop, :],
                k[..., key_lo : offset + stop, :],
                v[..., key_lo : offset + stop, :],
                attn_mask=mask,
                scale=scale,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outputs, dim=-2)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
    block_size: int = 1024,
    slopes: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over keys identified by absolute index, with padding, window and
    ALiBi ``slopes`` (n_heads,) as in :func:`causal_attention`.

    Query ``i`` (at absolute index ``query_index[i]``) sees key ``j`` iff the key slot is
    filled (``key_index >= 0``), not in the future, inside the window, and a real token. A
    padding query also sees itself, so that it never has an empty row (which would give NaN
    and poison later layers through 0 * NaN).

    Shapes: q (batch, n_heads, n, head_dim); k, v (batch, n_kv_heads, K, head_dim);
    query_index (n,); key_index, key_valid (batch, K) -> (batch, n_heads, n, head_dim).
    ``documents`` (batch, n), only when the keys are the queries' own sequence (n == K): the
    document of each token; a query then sees only keys of its document (block-diagonal
    causal attention for packed rows). Runs over query blocks of ``block_size``, so the mask
    is never larger than (batch, block_size, K).
    """
    gqa = k.shape[1] != q.shape[1]
    keys = key_index[:, None, :]  # (b, 1, K)
    outputs = []
    for start in range(0, q.shape[-2], block_size):
        queries = query_index[start : start + block_size, None]  # (qb, 1)
        visible = (keys >= 0) & (keys <= queries)
        if window is not None:
            visible &= keys > queries - window
        visible &= key_valid[:, None, :] | (keys == queries)
        if documents is not None:
            visible &= documents[:, None, :] == documents[:, start : start + block_size, None]
        mask = visible[:, None]
        if slopes is not None:
            mask = alibi_mask(visible, queries[None], keys, slopes, q.dtype)
        outputs.append(
            F.scaled_dot_product_attention(
                q[..., start : start + block_size, :],
                k,
                v,
                attn_mask=mask,
                scale=scale,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outputs, dim=-2)


@dataclass
class KVCache(CacheEntry):
    """Keys and values of one attention sublayer.

    Full attention keeps every position: absolute index ``t`` lives in slot ``t``. Sliding
    window attention keeps a ring of ``window`` slots, index ``t`` in slot ``t % window``, so
    its memory is bounded by the window whatever the context length.

    Attributes:
        keys, values: (batch, n_kv_heads, capacity, head_dim), keys already rotated.
        key_index: (batch, capacity) int64, the absolute index a slot holds (-1: empty).
        valid: (batch, capacity) bool, the slot holds a real token (not left padding).
        window: the ring size, or None for full attention.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_index: torch.Tensor
    valid: torch.Tensor
    window: int | None = None
    int8_type: ClassVar[type | None] = None
    """The int8 cache class of this kind for ``kv_dtype="int8"`` (its ``like`` makes one);
    None: :class:`~layers.kv_int8.Int8KVCache`."""

    @classmethod
    def empty(
        cls,
        batch_size: int,
        max_seqlen: int,
        window: int | None,
        n_kv_heads: int,
        key_dim: int,
        value_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seqlen`` tokens: every
        slot, or a ring of ``window`` slots when the window is shorter; keys of ``key_dim``
        and values of ``value_dim`` channels per head."""
        capacity = max_seqlen if window is None else min(window, max_seqlen)
        ring = None if window is None or window >= max_seqlen else window
        shape = (batch_size, n_kv_heads, capacity)
        return cls(
            keys=torch.zeros(*shape, key_dim, dtype=dtype, device=device),
            values=torch.zeros(*shape, value_dim, dtype=dtype, device=device),
            key_index=torch.full((batch_size, capacity), -1, dtype=torch.long, device=device),
            valid=torch.zeros(batch_size, capacity, dtype=torch.bool, device=device),
            window=ring,
        )  # fmt: skip

    def checkpoint(self) -> KVCache | None:
        # Full attention needs nothing: after a rollback the next call overwrites the slots
        # from the restored length on before it reads up to its own end, so stale slots are
        # never seen. A ring overwrites old keys that a rollback must bring back.
        return None if self.window is None else self.copy()

    def fill_random(self, length: int, generator: torch.Generator) -> None:
        """Random keys and values in the slots of absolute indices ``0..length-1`` still kept
        (slot ``t % window`` in a ring), with ``key_index`` and ``valid`` set there."""
        capacity = self.keys.shape[2]
        index = torch.arange(max(0, length - capacity), length, device=self.keys.device)
        slots = index % capacity if self.window is not None else index
        self.store(slots, *self.random_keys_values(index.numel(), generator))
        self.key_index[:, slots] = index
        self.valid[:, slots] = True

    def random_keys_values(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normal(0, 1) keys and values of ``n`` tokens, (batch, n_kv_heads, n, width), for
        :meth:`fill_random`; each drawn at its own width."""
        return tuple(
            torch.randn((*t.shape[:2], n, t.shape[3]), generator=generator).to(t.device)
            for t in (self.keys, self.values)
        )

    def store(self, slots: slice | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys / values (batch, n_kv_heads, n, head_dim) into ``slots`` (a slice, or
        (n,) int64 indices) of the capacity dimension, in the cache's dtype."""
        self.keys[:, :, slots] = k.to(self.keys.dtype)
        self.values[:, :, slots] = v.to(self.values.dtype)

    def store_at(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """:meth:`store` of one token at ``slot`` ((1,) int64) with ``index_copy_``, whose
        addresses and shapes never change (what CUDA graphs capture)."""
        self.keys.index_copy_(2, slot, k.to(self.keys.dtype))
        self.values.index_copy_(2, slot, v.to(self.values.dtype))

    def read(self, end: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``[0, end)`` (None: every slot) in ``dtype``."""
        keys, values = (self.keys, self.values) if end is None else (
            self.keys[:, :, :end], self.values[:, :, :end]
        )  # fmt: skip
        return keys.to(dtype), values.to(dtype)

    def round_trip(
        self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``k``, ``v`` as :meth:`read` would return them after :meth:`store`, in ``dtype``."""
        return k.to(self.keys.dtype).to(dtype), v.to(self.values.dtype).to(dtype)

    def attend_static(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        position: torch.Tensor,
        slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One new token per row at absolute index ``position`` (0-d int64), shapes fixed.

        Writes the key/value in place and attends over the whole buffer with a mask, so the
        same operations run at every step. Shapes: q (batch, n_heads, 1, head_dim); k, v
        (batch, n_kv_heads, 1, head_dim); ``slopes`` (n_heads,) for ALiBi.
        """
        slot = (position if self.window is None else position % self.window).view(1)
        self.store_at(slot, k, v)
        # index_copy_, not index_fill_ with a tensor value: that one reads the value back to
        # the host (.item()), a sync that CUDA-graph capture forbids.
        self.key_index.index_copy_(1, slot, position.view(1, 1).expand(self.key_index.shape[0], 1))
        self.valid.index_fill_(1, slot, True)
        visible = (self.key_index >= 0) & (self.key_index <= position) & self.valid
        if self.window is not None:
            visible &= self.key_index > position - self.window
        mask = visible[:, None, None, :]
        if slopes is not None:
            query = position.view(1, 1, 1)
            mask = alibi_mask(visible[:, None], query, self.key_index[:, None], slopes, q.dtype)
        keys, values = self.read(None, q.dtype)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.keys.shape[1] != q.shape[1]
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        context: TokenContext,
        slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Store the new keys/values and attend the new queries over everything in view.

        Shapes: q (batch, n_heads, n, head_dim); k, v (batch, n_kv_heads, n, head_dim);
        ``slopes`` (n_heads,) for ALiBi.
        """
        n, start = q.shape[-2], context.start
        new_index = torch.arange(start, start + n, device=q.device)
        new_valid = (
            context.valid
            if context.valid is not None
            else torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device)
        )
        if self.window is None and n == 1 and context.valid is None:
            # A decode step: every slot before ``start`` is filled, so the real-token flags
            # are the whole mask.
            self.store(slice(start, start + 1), k, v)
            self.key_index[:, start] = start
            self.valid[:, start] = True
            mask = self.valid[:, None, None, : start + 1]
            if slopes is not None:
                keys = torch.arange(start + 1, device=q.device).view(1, 1, -1)
                query = torch.full((1, 1, 1), start, device=q.device)
                mask = alibi_mask(mask[:, 0], query, keys, slopes, q.dtype)
            keys, values = self.read(start + 1, q.dtype)
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=self.keys.shape[1] != q.shape[1]
            )
        if self.window is None:
            end = start + n
            self.store(slice(start, end), k, v)
            self.key_index[:, start:end] = new_index
            self.valid[:, start:end] = new_valid
            keys, values = self.read(end, q.dtype)
            key_index, key_valid = self.key_index[:, :end], self.valid[:, :end]
        else:
            # The ring before this call's writes, then the new keys as a read would give them.
            kept_keys, kept_values = self.read(None, q.dtype)
            new_keys, new_values = self.round_trip(k, v, q.dtype)
            keys = torch.cat([kept_keys, new_keys], dim=2)
            values = torch.cat([kept_values, new_values], dim=2)
            key_index = torch.cat([self.key_index, new_index.expand(q.shape[0], n)], dim=1)
            key_valid = torch.cat([self.valid, new_valid], dim=1)
            kept = slice(max(0, n - self.window), n)  # the newest tokens that fit the ring
            slots = new_index[kept] % self.window
            self.store(slots, k[:, :, kept], v[:, :, kept])
            self.key_index[:, slots] = new_index[kept]
            self.valid[:, slots] = new_valid[:, kept]
        return masked_attention(
            q,
            keys,
            values,
            query_index=new_index,
            key_index=key_index,
            key_valid=key_valid,
            window=self.window,
            slopes=slopes,
        )


@register_block("attention", symbol="*", options=AttentionOptions)
class Attention(Block):
    """Self-attention sublayer. Shapes: (batch, seqlen, d_model) -> same.

    Uses ``scaled_dot_product_attention``, so flash / memory-efficient kernels on GPU and the
    fused CPU kernel for plain causal attention.
    """

    separates_documents = True

    def __init__(self, d_model: int, options: AttentionOptions, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        heads, kv_heads, head_dim = options.n_heads, options.n_kv_heads, options.head_dim
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=options.qkv_bias)
        self.k_proj = nn.Linear(d_model, kv_heads * head_dim, bias=options.qkv_bias)
        self.v_proj = nn.Linear(d_model, kv_heads * head_dim, bias=options.qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=options.out_bias)
        if options.output_gate:
            self.gate_proj = nn.Linear(d_model, heads * head_dim, bias=options.qkv_bias)
        if options.qk_norm:
            whole = options.qk_norm_scope == "projection"
            self.q_norm = RMSNorm(heads * head_dim if whole else head_dim, options.qk_norm_eps)
            self.k_norm = RMSNorm(kv_heads * head_dim if whole else head_dim, options.qk_norm_eps)
        self.rotary = (
            RotaryEmbedding(
                head_dim,
                int(head_dim * options.rope_fraction),
                options.rope_theta,
                options.rope_scaling,
            )
            if options.position == "rope"
            else None
        )
        self._slopes: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def alibi_slopes(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """ALiBi's slopes (n_heads,) in float32 (float64 for float64), None without ALiBi.

        Kept per device and dtype outside the buffers, like RoPE's frequencies."""
        if self.options.position != "alibi":
            return None
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        cached = None if torch.compiler.is_compiling() else self._slopes.get((device, dtype))
        if cached is None:
            cached = torch.tensor(alibi_slopes(self.options.n_heads), dtype=dtype, device=device)
            if not torch.compiler.is_compiling():
                self._slopes[(device, dtype)] = cached
        return cached

    def forward(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None = None,
        context: TokenContext | None = None,
    ) -> torch.Tensor:
        opts = self.options
        heads = (-1, opts.head_dim)  # (b, l, h * d) -> (b, l, h, d)
        q, k = self.q_proj(hidden), self.k_proj(hidden)
        if opts.qk_norm and opts.qk_norm_scope == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.unflatten(-1, heads), k.unflatten(-1, heads)
        v = self.v_proj(hidden).unflatten(-1, heads)
        if opts.qk_norm and opts.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            positions = None if context is None else context.positions
            q, k = self.rotary.rotate_queries_and_keys(q, k, positions)
        if opts.softmax_scale is not None:  # the kernels' default 1/sqrt(d) times this factor
            q = q * (opts.softmax_scale * math.sqrt(opts.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        slopes = self.alibi_slopes(q.device, q.dtype)
        if cache is not None and context.static_start is not None:
            out = cache.attend_static(q, k, v, context.static_start, slopes)
        elif cache is not None:
            out = cache.attend(q, k, v, context, slopes)
        elif context is not None and (context.valid is not None or context.seq_idx is not None):
            index = torch.arange(hidden.shape[1], device=hidden.device)
            keys = index.expand(hidden.shape[0], -1)
            out = masked_attention(
                q,
                k,
                v,
                query_index=index,
                key_index=keys,
                key_valid=keys >= 0 if context.valid is None else context.valid,
                window=opts.window,
                slopes=slopes,
                documents=context.seq_idx,
            )
        else:
            out = causal_attention(q, k, v, window=opts.window, slopes=slopes)
        out = out.transpose(1, 2).flatten(2)  # (b, h, l, d) -> (b, l, h * d)
        if opts.output_gate:
            out = out * torch.sigmoid(self.gate_proj(hidden))
        return self.o_proj(out)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        opts = self.options
        return KVCache.empty(
            batch_size, max_seqlen, opts.window, opts.n_kv_heads, opts.head_dim, opts.head_dim,
            dtype, device,
        )  # fmt: skip

    @classmethod
    def inference_state_bytes(
        cls, d_model: int, options: AttentionOptions, context: int, dtype: torch.dtype
    ) -> int:
        kept = context if options.window is None else min(context, options.window)
        key_value = 2 * options.n_kv_heads * options.head_dim * dtype_bytes(dtype)
        bookkeeping = 8 + 1  # per slot: int64 absolute index, bool real-token flag
        return kept * (key_value + bookkeeping)

    def residual_weights(self) -> list[nn.Parameter]:
        return [self.o_proj.weight]

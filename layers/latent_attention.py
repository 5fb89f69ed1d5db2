"""Multi-head Latent Attention (MLA): DeepSeek-V2 / V3's attention, and Kimi Linear's full
attention layers (there without rotary embeddings).

Each token is compressed to one latent ``c = rmsnorm(x W_dkv)`` of ``kv_lora_rank`` channels
and one shared rotary key ``k_rot`` of ``qk_rope_head_dim`` channels (the two outputs of
``kv_a_proj_with_mqa``). ``kv_b_proj`` expands the latent to every head's non-rotary key and
value, ``k_h = [W_uk_h c ; k_rot]``, ``v_h = W_uv_h c``; queries are ``[q_nope_h ; q_rot_h]``,
from ``q_proj`` or from the low-rank ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``.
``position: rope`` rotates ``q_rot`` and ``k_rot`` (rotate-half RoPE, transformers'
``rope_interleave: false``); ``none`` leaves them as they are (Kimi Linear).

Without a cache the block attends in this expanded form, per head. An inference cache keeps
only the per-token latents (MLA's point: ``kv_lora_rank + qk_rope_head_dim`` numbers a token
whatever the number of heads), and the block attends in the absorbed form: since
``q_nope_h . W_uk_h c = (W_uk_h^T q_nope_h) . c``, every head is one query over the latents,
``[W_uk_h^T q_nope_h ; q_rot_h]`` against keys ``[c ; k_rot]`` with values ``c`` (multi-query
attention of one latent head), and ``out_h = W_uv_h (attention output over the latents)``.
Parameter names are transformers' (``KimiLinearAttention``, ``DeepseekV3Attention``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import einsum, rearrange
from torch import nn

from layers.attention import KVCache, causal_attention, masked_attention
from layers.base import Block, TokenContext, dtype_bytes
from layers.kv_int8 import Int8KVCache, dequantize_per_token, quantize_per_token
from layers.norm import RMSNorm
from layers.options import require, require_choice, require_finite_number, require_positive_int
from layers.registry import register_block
from layers.rope import RotaryEmbedding
from layers.rope_scaling import check_scaling, yarn_mscale

POSITIONS = ("rope", "none")


@dataclass
class LatentAttentionOptions:
    """Options of the ``latent_attention`` block.

    Attributes:
        n_heads: query heads; None gives ``max(1, d_model // 64)``.
        q_lora_rank: width of the low-rank query (``q_a_proj`` -> ``q_a_layernorm`` ->
            ``q_b_proj``, DeepSeek-V2 / V3); None: one full ``q_proj`` (Kimi Linear,
            DeepSeek-V2-Lite).
        kv_lora_rank: width of the per-token latent the keys and values are expanded from
            (what the cache keeps); None gives ``max(1, d_model // 2)``.
        qk_nope_head_dim: per-head query / key channels without rotary embedding; None gives
            ``d_model // n_heads``.
        qk_rope_head_dim: query channels per head, and key channels shared by all heads, that
            RoPE rotates (kept unrotated with ``position: none``); >= 0, and > 0 and even
            with ``position: rope``. None gives ``2 * (qk_nope_head_dim // 4)`` (DeepSeek's
            half of the non-rotary width, even).
        v_head_dim: per-head value channels; None gives ``d_model // n_heads``.
        position: ``rope`` (rotate-half rotary embeddings on the rotary parts, DeepSeek) or
            ``none`` (no positional encoding, Kimi Linear: order comes from causality and the
            linear-attention layers).
        rope_theta: RoPE base.
        rope_scaling: None, or transformers' ``rope_parameters`` of a context-extending
            scaling (see :mod:`layers.rope_scaling`); needs ``position: rope``. YaRN's
            ``mscale_all_dim`` also multiplies the default softmax scale by
            ``mscale(factor, mscale_all_dim) ** 2``, as DeepSeek-V3 does.
        window: sliding-window size (each query sees itself and ``window - 1`` earlier keys);
            None is full causal attention.
        attention_bias: biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``
            (transformers' ``attention_bias``; ``q_proj``, ``q_b_proj`` and ``kv_b_proj``
            never have one).
        softmax_scale: the factor of q.k before the softmax; None:
            ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5`` (times YaRN's, see above).
        norm_eps: epsilon of ``q_a_layernorm`` and ``kv_a_layernorm`` (transformers uses its
            RMSNorm default 1e-6 there, not the model's ``rms_norm_eps``).
    """

    n_heads: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    window: int | None = None
    attention_bias: bool = False
    softmax_scale: float | None = None
    norm_eps: float = 1e-6

    def resolve(self, d_model: int, where: str) -> LatentAttentionOptions:
        n_heads = self.n_heads if self.n_heads is not None else max(1, d_model // 64)
        require_positive_int(n_heads, f"{where}.n_heads")
        if self.qk_nope_head_dim is None or self.v_head_dim is None:
            require(
                d_model % n_heads == 0,
                f"{where}.n_heads",
                f"must divide d_model={d_model} (or set qk_nope_head_dim and v_head_dim); "
                f"got {n_heads}",
            )
        head_dim = d_model // n_heads
        nope = self.qk_nope_head_dim if self.qk_nope_head_dim is not None else head_dim
        require_positive_int(nope, f"{where}.qk_nope_head_dim")
        v_head_dim = self.v_head_dim if self.v_head_dim is not None else head_dim
        require_positive_int(v_head_dim, f"{where}.v_head_dim")
        rope = self.qk_rope_head_dim if self.qk_rope_head_dim is not None else 2 * (nope // 4)
        require(
            isinstance(rope, int) and not isinstance(rope, bool) and rope >= 0,
            f"{where}.qk_rope_head_dim",
            f"must be an integer >= 0; got {rope!r}",
        )
        require_choice(self.position, POSITIONS, f"{where}.position")
        require(
            self.position != "rope" or (rope > 0 and rope % 2 == 0),
            f"{where}.qk_rope_head_dim",
            f"must be > 0 and even with position: rope; got {rope}",
        )
        kv_lora_rank = self.kv_lora_rank if self.kv_lora_rank is not None else max(1, d_model // 2)
        require_positive_int(kv_lora_rank, f"{where}.kv_lora_rank")
        if self.q_lora_rank is not None:
            require_positive_int(self.q_lora_rank, f"{where}.q_lora_rank")
        theta = require_finite_number(self.rope_theta, f"{where}.rope_theta")
        require(theta > 0, f"{where}.rope_theta", f"must be > 0; got {self.rope_theta}")
        if self.window is not None:
            require_positive_int(self.window, f"{where}.window")
        require(
            isinstance(self.attention_bias, bool),
            f"{where}.attention_bias",
            f"must be true or false; got {self.attention_bias!r}",
        )
        if self.softmax_scale is not None:
            scale = require_finite_number(self.softmax_scale, f"{where}.softmax_scale")
            require(scale > 0, f"{where}.softmax_scale", f"must be > 0 or null; got {scale}")
        eps = require_finite_number(self.norm_eps, f"{where}.norm_eps")
        require(eps > 0, f"{where}.norm_eps", f"must be > 0; got {self.norm_eps}")
        scaling = check_scaling(self.rope_scaling, f"{where}.rope_scaling")
        require(
            scaling is None or self.position == "rope",
            f"{where}.rope_scaling",
            f"scales RoPE; it needs position: rope, got {self.position!r}",
        )
        return dataclasses.replace(
            self, n_heads=n_heads, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=nope,
            qk_rope_head_dim=rope, v_head_dim=v_head_dim, rope_theta=theta,
            rope_scaling=scaling,
        )  # fmt: skip

    @property
    def qk_head_dim(self) -> int:
        """Query / key channels per head in the expanded form (of resolved options)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_key_dim(self) -> int:
        """Key channels of the latent cache, ``[c ; k_rot]`` (of resolved options)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def scale(self) -> float:
        """The factor of q.k before the softmax (of resolved options)."""
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        scale = self.qk_head_dim**-0.5
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
            scale *= yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"]) ** 2
        return scale


class _LatentViews:
    """What both latent caches share: ``values`` is a view of the keys' first channels (the
    latent ``c`` of ``[c ; k_rot]``) that follows every replacement of ``keys``, and only the
    keys count among :meth:`tensors` (bytes, saving and loading see the latent once)."""

    derived = ("values",)
    """Fields that are views of others: neither tensors of their own nor plain settings."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "values":  # the latent part of the keys, as wide as the tensor given
            value = self.keys[..., : value.shape[-1]]
        super().__setattr__(name, value)
        if name == "keys" and "values" in self.__dict__:
            super().__setattr__("values", value[..., : self.values.shape[-1]])

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().tensors()
        for name in self.derived:
            del tensors[name]
        return tensors

    def plain_fields(self) -> dict[str, object]:
        fields = super().plain_fields()
        for name in self.derived:
            del fields[name]
        return fields

    def random_keys_values(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random keys of ``n`` tokens, each value the latent part of its key."""
        shape = (*self.keys.shape[:2], n, self.keys.shape[3])
        keys = torch.randn(shape, generator=generator).to(self.keys.device)
        return keys, keys[..., : self.values.shape[3]]


@dataclass(kw_only=True)
class Int8LatentKVCache(_LatentViews, Int8KVCache):
    """:class:`LatentKVCache` in int8: the codes and per-token scales of ``[c ; k_rot]``.

    ``values`` is a view of the key codes' latent part and ``value_scale`` is ``key_scale``
    itself, so the value a token attends with is exactly the latent part of its dequantized
    key, as in the float cache, and the latent's codes are stored once. Shapes: keys
    (batch, 1, capacity, kv_lora_rank + qk_rope_head_dim) int8; key_scale (batch, 1,
    capacity, 1) float16.
    """

    derived = ("values", "value_scale")

    def __setattr__(self, name: str, value: object) -> None:
        if name == "value_scale":
            value = self.key_scale
        super().__setattr__(name, value)
        if name == "key_scale" and "value_scale" in self.__dict__:
            super().__setattr__("value_scale", value)

    def store(self, slots: slice | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize ``k`` = ``[c ; k_rot]`` per token; ``v`` (``c``) lands with it."""
        codes, scale = quantize_per_token(k)
        self.keys[:, :, slots] = codes
        self.key_scale[:, :, slots] = scale

    def store_at(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        codes, scale = quantize_per_token(k)
        self.keys.index_copy_(2, slot, codes)
        self.key_scale.index_copy_(2, slot, scale)

    def round_trip(
        self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = dequantize_per_token(*quantize_per_token(k), dtype)
        return keys, keys[..., : v.shape[-1]]


@dataclass
class LatentKVCache(_LatentViews, KVCache):
    """:class:`~layers.attention.KVCache` of one latent head, the latent stored once.

    ``keys`` (batch, 1, capacity, kv_lora_rank + qk_rope_head_dim) hold ``[c ; k_rot]``
    (``k_rot`` rotated); ``values`` is a view of their first kv_lora_rank channels, ``c``.
    Reads and attention are KVCache's (scaled dot-product attention takes values narrower
    than the keys). The view follows every replacement of ``keys`` (batch selection, copies,
    rollbacks, device and dtype moves), and only ``keys`` counts among :meth:`tensors`: bytes,
    saving and loading see the latent once.
    """

    int8_type: ClassVar[type] = Int8LatentKVCache

    def store(self, slots: slice | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k`` = ``[c ; k_rot]``; ``v`` (``c``, the same numbers) lands with it."""
        self.keys[:, :, slots] = k.to(self.keys.dtype)

    def store_at(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys.index_copy_(2, slot, k.to(self.keys.dtype))


@register_block("latent_attention", symbol="L", options=LatentAttentionOptions)
class LatentAttention(Block):
    """Multi-head latent attention sublayer. Shapes: (batch, seqlen, d_model) -> same.

    Without a cache: per-head keys and values expanded from the latents, then the causal
    (windowed, padded, packed) attention of :class:`~layers.attention.Attention`. With a
    cache (:class:`LatentKVCache`): the absorbed form over the cached latents.
    """

    separates_documents = True

    def __init__(self, d_model: int, options: LatentAttentionOptions, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        heads, bias, rope = options.n_heads, options.attention_bias, options.qk_rope_head_dim
        if options.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, heads * options.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, options.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(options.q_lora_rank, options.norm_eps)
            self.q_b_proj = nn.Linear(options.q_lora_rank, heads * options.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, options.latent_key_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(options.kv_lora_rank, options.norm_eps)
        kv_width = heads * (options.qk_nope_head_dim + options.v_head_dim)
        self.kv_b_proj = nn.Linear(options.kv_lora_rank, kv_width, bias=False)
        self.o_proj = nn.Linear(heads * options.v_head_dim, d_model, bias=bias)
        self.rotary = (
            RotaryEmbedding(rope, rope, options.rope_theta, options.rope_scaling)
            if options.position == "rope"
            else None
        )
        self.scale = options.scale()

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_uk`` (n_heads, qk_nope_head_dim, kv_lora_rank) and ``W_uv`` (n_heads,
        v_head_dim, kv_lora_rank): views of ``kv_b_proj.weight``, per head the maps from the
        normed latent to the non-rotary key and to the value."""
        opts = self.options
        weight = rearrange(self.kv_b_proj.weight, "(h d) r -> h d r", h=opts.n_heads)
        w_uk, w_uv = weight.split([opts.qk_nope_head_dim, opts.v_head_dim], dim=1)
        return w_uk, w_uv

    def forward(
        self,
        hidden: torch.Tensor,
        cache: LatentKVCache | None = None,
        context: TokenContext | None = None,
    ) -> torch.Tensor:
        opts = self.options
        if opts.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = rearrange(q, "b l (h d) -> b l h d", h=opts.n_heads)
        q_nope, q_rot = q.split([opts.qk_nope_head_dim, opts.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(hidden).split(
            [opts.kv_lora_rank, opts.qk_rope_head_dim], dim=-1
        )
        latent = self.kv_a_layernorm(latent)  # (b, l, kv_lora_rank)
        k_rot = k_rot.unsqueeze(2)  # (b, l, 1, rope): one key head shared by all query heads
        if self.rotary is not None:
            positions = None if context is None else context.positions
            q_rot, k_rot = self.rotary.rotate_queries_and_keys(q_rot, k_rot, positions)
        if cache is None:
            out = self.expanded_attention(q_nope, q_rot, latent, k_rot, context)
        else:
            out = self.absorbed_attention(q_nope, q_rot, latent, k_rot, cache, context)
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))

    def expanded_attention(
        self,
        q_nope: torch.Tensor,
        q_rot: torch.Tensor,
        latent: torch.Tensor,
        k_rot: torch.Tensor,
        context: TokenContext | None,
    ) -> torch.Tensor:
        """Attention with per-head keys ``[W_uk_h c ; k_rot]`` and values ``W_uv_h c``.

        Shapes: q_nope (b, l, h, nope); q_rot (b, l, h, rope); latent (b, l, kv_lora_rank);
        k_rot (b, l, 1, rope) -> (b, h, l, v_head_dim).
        """
        opts = self.options
        kv = rearrange(self.kv_b_proj(latent), "b l (h d) -> b h l d", h=opts.n_heads)
        k_nope, v = kv.split([opts.qk_nope_head_dim, opts.v_head_dim], dim=-1)
        k_rot = rearrange(k_rot, "b l 1 d -> b 1 l d").expand(-1, opts.n_heads, -1, -1)
        k = torch.cat([k_nope, k_rot], dim=-1)
        q = rearrange(torch.cat([q_nope, q_rot], dim=-1), "b l h d -> b h l d")
        if context is not None and (context.valid is not None or context.seq_idx is not None):
            index = torch.arange(q.shape[2], device=q.device)
            keys = index.expand(q.shape[0], -1)
            return masked_attention(
                q,
                k,
                v,
                query_index=index,
                key_index=keys,
                key_valid=keys >= 0 if context.valid is None else context.valid,
                window=opts.window,
                scale=self.scale,
                documents=context.seq_idx,
            )
        return causal_attention(q, k, v, window=opts.window, scale=self.scale)

    def absorbed_attention(
        self,
        q_nope: torch.Tensor,
        q_rot: torch.Tensor,
        latent: torch.Tensor,
        k_rot: torch.Tensor,
        cache: LatentKVCache,
        context: TokenContext,
    ) -> torch.Tensor:
        """Store the new latents in ``cache`` and attend every head over all latents in view.

        Shapes as :meth:`expanded_attention`; the cache attends queries (b, h, l,
        kv_lora_rank + rope) over keys (b, 1, K, kv_lora_rank + rope) and values (b, 1, K,
        kv_lora_rank).
        """
        w_uk, w_uv = self.absorbed_weights()
        q_latent = einsum(q_nope, w_uk, "b l h d, h d r -> b h l r")
        q = torch.cat([q_latent, rearrange(q_rot, "b l h d -> b h l d")], dim=-1)
        # The cache's kernels scale by 1 / sqrt(kv_lora_rank + rope); make that self.scale.
        q = q * (self.scale * math.sqrt(q.shape[-1]))
        k = rearrange(torch.cat([latent.unsqueeze(2), k_rot], dim=-1), "b l 1 d -> b 1 l d")
        v = rearrange(latent, "b l r -> b 1 l r")
        if context.static_start is not None:
            out = cache.attend_static(q, k, v, context.static_start)
        else:
            out = cache.attend(q, k, v, context)
        return einsum(out, w_uv, "b h l r, h d r -> b h l d")

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device: torch.device
    ) -> LatentKVCache:
        opts = self.options
        return LatentKVCache.empty(
            batch_size, max_seqlen, opts.window, 1, opts.latent_key_dim, opts.kv_lora_rank,
            dtype, device,
        )  # fmt: skip

    @classmethod
    def inference_state_bytes(
        cls, d_model: int, options: LatentAttentionOptions, context: int, dtype: torch.dtype
    ) -> int:
        """Per kept token: the latent and ``k_rot`` (:class:`LatentKVCache` stores the latent
        once), plus an int64 absolute index and a bool real-token flag."""
        kept = context if options.window is None else min(context, options.window)
        latents = (options.kv_lora_rank + options.qk_rope_head_dim) * dtype_bytes(dtype)
        return kept * (latents + 8 + 1)

    def residual_weights(self) -> list[nn.Parameter]:
        return [self.o_proj.weight]

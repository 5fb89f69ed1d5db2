"""Gated DeltaNet block: q/k/v/gate projections, short conv, the gated delta rule, gated norm.

Yang, Kautz and Hatamizadeh (2024), "Gated Delta Networks: Improving Mamba2 with Delta Rule",
laid out as Qwen3-Next's linear-attention layers: one in-projection to q, k, v, the output
gate z, beta and the decay input a; a depthwise causal conv + SiLU over [q, k, v]; q and k
L2-normalised per head; ``beta = sigmoid(b)``, ``g = -exp(A_log) * softplus(a + dt_bias)``;
the output normalised per head, gated by silu(z), projected back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from layers.base import Block, TokenContext
from layers.norm import HeadRMSNormGated, upcast
from layers.ops.delta import gated_delta_rule, gated_delta_step
from layers.options import require, require_positive_int
from layers.registry import register_block
from layers.ssm_cache import SSMCache, causal_conv_silu, depthwise_conv, state_matrix
from layers.ssm_init import init_dt_bias, mark_no_weight_decay


@dataclass
class GatedDeltaNetOptions:
    """Options of the ``gated_deltanet`` block.

    Attributes:
        n_heads: query / key heads; None: d_model // head_k_dim (at least 1).
        n_v_heads: value heads, a multiple of n_heads (Qwen3-Next uses 2x); None: n_heads.
        head_k_dim: channels per query / key head.
        head_v_dim: channels per value head; None: head_k_dim.
        d_conv: width of the short causal conv over q, k, v.
        conv_bias: bias on that conv (Qwen3-Next: none).
        output_gate: gate the normalised output with silu(z) (Qwen3-Next, fla: yes).
        allow_neg_eigval: ``beta = 2 * sigmoid(b)``, in (0, 2), so the state transition
            ``I - beta k k^T`` may have a negative eigenvalue (Grazzi et al. 2025; fla's and
            OLMo hybrid's ``allow_neg_eigval``); False: ``beta = sigmoid(b)``.
        chunk_size: tokens per chunk of the chunked scan (speed only).
        dt_min / dt_max / dt_init_floor: range of the initial decay time step (as Mamba).
        a_init_range: A initialised uniformly in this range (decay rate exp(A_log)).
        norm_eps: epsilon of the output norm.
    """

    n_heads: int | None = None
    n_v_heads: int | None = None
    head_k_dim: int = 64
    head_v_dim: int | None = None
    d_conv: int = 4
    conv_bias: bool = False
    output_gate: bool = True
    allow_neg_eigval: bool = False
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-6

    def resolve(self, d_model: int, where: str) -> GatedDeltaNetOptions:
        for name in ("head_k_dim", "d_conv", "chunk_size"):
            require_positive_int(getattr(self, name), f"{where}.{name}")
        for name in ("n_heads", "n_v_heads", "head_v_dim"):
            if getattr(self, name) is not None:
                require_positive_int(getattr(self, name), f"{where}.{name}")
        n_heads = self.n_heads or max(1, d_model // self.head_k_dim)
        n_v_heads = self.n_v_heads or n_heads
        require(
            n_v_heads % n_heads == 0,
            f"{where}.n_v_heads",
            f"must be a multiple of n_heads={n_heads}; got {n_v_heads}",
        )
        require(
            0 < self.dt_min <= self.dt_max,
            f"{where}.dt_min",
            f"need 0 < dt_min <= dt_max; got {self.dt_min}, {self.dt_max}",
        )
        low, high = self.a_init_range
        require(
            0 < low <= high, f"{where}.a_init_range", f"need 0 < low <= high; got {low}, {high}"
        )
        return dataclasses.replace(
            self, n_heads=n_heads, n_v_heads=n_v_heads,
            head_v_dim=self.head_v_dim or self.head_k_dim, a_init_range=(float(low), float(high)),
        )  # fmt: skip

    def widths(self) -> tuple[int, int]:
        """(key width n_heads * head_k_dim, value width n_v_heads * head_v_dim), resolved."""
        return self.n_heads * self.head_k_dim, self.n_v_heads * self.head_v_dim


@register_block("gated_deltanet", symbol="D", options=GatedDeltaNetOptions)
class GatedDeltaNet(Block):
    """Gated DeltaNet sublayer. Shapes: (batch, seqlen, d_model) -> same.

    The scan runs flash-linear-attention's chunked kernel on CUDA when ``fla`` imports, and
    our chunked gated delta rule in plain PyTorch otherwise. Its cache entry is the conv window
    over [q, k, v] and the (n_v_heads, head_k_dim, head_v_dim) state.
    """

    separates_documents = True

    gate_activation: ClassVar[str] = "silu"  # of the output norm's gate

    def __init__(self, d_model: int, options: GatedDeltaNetOptions, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        key_width, value_width = options.widths()
        self.key_width, self.value_width = key_width, value_width
        self.conv_dim = 2 * key_width + value_width
        self.build_projections(d_model, options)
        self.conv1d = depthwise_conv(self.conv_dim, options.d_conv, options.conv_bias)
        self.dt_bias = nn.Parameter(
            init_dt_bias(self.decay_channels(), options.dt_min, options.dt_max,
                         options.dt_init_floor)
        )  # fmt: skip
        low, high = options.a_init_range
        self.A_log = nn.Parameter(torch.empty(options.n_v_heads).uniform_(low, high).log())
        mark_no_weight_decay(self.dt_bias, self.A_log)
        self.norm = HeadRMSNormGated(options.head_v_dim, options.norm_eps, self.gate_activation)
        self.out_proj = nn.Linear(value_width, d_model, bias=False)

    def build_projections(self, d_model: int, options: GatedDeltaNetOptions) -> None:
        """The input projections: one ``in_proj`` to [q, k, v, z, b, a]."""
        gate_width = self.value_width if options.output_gate else 0
        # [q, k, v, z, b, a]: the conv reads the first conv_dim channels.
        self.split_sizes = [self.conv_dim, gate_width, options.n_v_heads, options.n_v_heads]
        self.in_proj = nn.Linear(d_model, sum(self.split_sizes), bias=False)

    def decay_channels(self) -> int:
        """Entries of ``dt_bias``: one decay per value head."""
        return self.options.n_v_heads

    def project(
        self, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(qkv (b, l, conv_dim), output gate z (b, l, value width) or None, beta's input b
        (b, l, n_v_heads), the decay's input a (b, l, n_v_heads))."""
        qkv, z, b, a = self.in_proj(hidden).split_with_sizes(self.split_sizes, -1)
        return qkv, z if z.shape[-1] else None, b, a

    def log_decay(self, a: torch.Tensor) -> torch.Tensor:
        """``g = -exp(A_log) * softplus(a + dt_bias)``, (b, l, n_v_heads), float32 or wider."""
        return state_matrix(self) * F.softplus(upcast(a) + upcast(self.dt_bias))

    def forward(
        self,
        hidden: torch.Tensor,
        cache: SSMCache | None = None,
        context: TokenContext | None = None,
    ) -> torch.Tensor:
        opts = self.options
        length = hidden.shape[1]
        valid = None if context is None or context.valid is None else context.valid[..., None]
        seq_idx = None if context is None else context.seq_idx
        qkv, z, b, a = self.project(hidden)
        step = cache is not None and length == 1 and valid is None
        qkv = causal_conv_silu(qkv, self.conv1d, cache, valid, step, seq_idx)
        q, k, v = qkv.split([self.key_width, self.key_width, self.value_width], -1)
        q = _l2norm(rearrange(q, "b l (h d) -> b l h d", d=opts.head_k_dim))
        k = _l2norm(rearrange(k, "b l (h d) -> b l h d", d=opts.head_k_dim))
        v = rearrange(v, "b l (h d) -> b l h d", d=opts.head_v_dim)
        beta = torch.sigmoid(b)
        if opts.allow_neg_eigval:
            beta = 2 * beta
        g = self.log_decay(a)  # (b, l, nv) or, per key channel, (b, l, nv, dk)
        if valid is not None:  # beta = 0, g = 0 at padding: the state does not change there
            beta, g = beta * valid, g * valid.view(*valid.shape[:2], *(1,) * (g.dim() - 2))
        if step:
            state = cache.working_state()
            o = gated_delta_step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
            cache.store_state(state)
            o = o[:, None]
        else:
            o = gated_delta_rule(
                q, k, v, g, beta, chunk_size=opts.chunk_size,
                initial_state=None if cache is None else cache.ssm_state,
                return_final_state=cache is not None, seq_idx=seq_idx,
            )  # fmt: skip
            if cache is not None:
                o, final_state = o
                cache.ssm_state.copy_(final_state)
        gate = None if z is None else rearrange(z, "b l (h d) -> b l h d", d=opts.head_v_dim)
        o = self.norm(o, gate)
        return self.out_proj(rearrange(o, "b l h d -> b l (h d)"))

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device: torch.device
    ) -> SSMCache:
        opts = self.options
        state_shape = (opts.n_v_heads, opts.head_k_dim, opts.head_v_dim)
        return SSMCache.zeros(batch_size, self.conv_dim, opts.d_conv, state_shape, dtype, device)

    @classmethod
    def inference_state_bytes(
        cls, d_model: int, options: GatedDeltaNetOptions, context: int, dtype: torch.dtype
    ) -> int:
        key_width, value_width = options.widths()
        state_size = options.n_v_heads * options.head_k_dim * options.head_v_dim
        conv_dim = 2 * key_width + value_width
        return SSMCache.sequence_bytes(conv_dim, options.d_conv, state_size, dtype)

    def residual_weights(self) -> list[nn.Parameter]:
        return [self.out_proj.weight]


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension, in float32 (fla's ``l2norm``)."""
    xf = upcast(x)
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)

"""Kimi Delta Attention block: Gated DeltaNet with a decay per key channel.

Kimi Team (2025), "Kimi Linear: An Expressive, Efficient Attention Architecture", laid out as
Kimi Linear's linear-attention layers (transformers' ``KimiLinearDeltaAttention``, fla's
``KimiDeltaAttention``): q, k, v projections and a depthwise causal conv + SiLU over them, q
and k L2-normalised per head, ``beta = sigmoid(b)``; the decay is per key channel through a
low-rank projection, ``g = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)`` of shape
(n_v_heads, head_k_dim), so each row of the (head_k_dim, head_v_dim) state forgets at its
own rate; the output is normalised per head and gated by ``sigmoid(g_b(g_a(x)))``, a
low-rank gate, then projected back.

Everything but the projections, the decay and the gate's sigmoid is Gated DeltaNet's
(:class:`~layers.gated_deltanet.GatedDeltaNet`): the same conv, cache entry and scan
dispatch, here with ``g`` per channel (:mod:`layers.ops.delta`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetOptions
from layers.norm import upcast
from layers.options import require_positive_int
from layers.registry import register_block
from layers.ssm_cache import state_matrix


@dataclass
class KimiDeltaOptions(GatedDeltaNetOptions):
    """Options of the ``kda`` block: those of ``gated_deltanet`` plus two ranks.

    Attributes:
        decay_rank: inner width of the low-rank decay projection ``f_b(f_a(x))``; None:
            head_k_dim (Kimi Linear).
        gate_rank: inner width of the low-rank output gate ``g_b(g_a(x))``; None: head_v_dim
            (Kimi Linear). Unused with ``output_gate: false``.

    The others are ``gated_deltanet``'s (n_heads, n_v_heads, head_k_dim, head_v_dim, d_conv,
    conv_bias, output_gate, allow_neg_eigval, chunk_size, dt_*, a_init_range, norm_eps);
    ``dt_bias`` has one entry per value head and key channel.
    """

    decay_rank: int | None = None
    gate_rank: int | None = None

    def resolve(self, d_model: int, where: str) -> KimiDeltaOptions:
        resolved = super().resolve(d_model, where)
        for name in ("decay_rank", "gate_rank"):
            if getattr(self, name) is not None:
                require_positive_int(getattr(self, name), f"{where}.{name}")
        return dataclasses.replace(
            resolved,
            decay_rank=self.decay_rank or resolved.head_k_dim,
            gate_rank=self.gate_rank or resolved.head_v_dim,
        )


@register_block("kda", symbol="K", options=KimiDeltaOptions)
class KimiDeltaAttention(GatedDeltaNet):
    """Kimi Delta Attention sublayer. Shapes: (batch, seqlen, d_model) -> same.

    ``in_proj`` gives [q, k, v, b, f_a, g_a] at once; ``f_b_proj`` and ``g_b_proj`` finish
    the low-rank decay and gate. The scan runs fla's ``chunk_kda`` on CUDA when ``fla``
    imports, our chunked rule with per-channel decay otherwise. The cache entry is Gated
    DeltaNet's: the conv window over [q, k, v] and the (n_v_heads, head_k_dim, head_v_dim)
    state.
    """

    gate_activation = "sigmoid"

    def build_projections(self, d_model: int, options: KimiDeltaOptions) -> None:
        """``in_proj`` to [q, k, v, b, f_a, g_a]; ``f_b_proj``, ``g_b_proj`` (no biases)."""
        gate_rank = options.gate_rank if options.output_gate else 0
        self.split_sizes = [self.conv_dim, options.n_v_heads, options.decay_rank, gate_rank]
        self.in_proj = nn.Linear(d_model, sum(self.split_sizes), bias=False)
        self.f_b_proj = nn.Linear(options.decay_rank, self.decay_channels(), bias=False)
        if options.output_gate:
            self.g_b_proj = nn.Linear(gate_rank, self.value_width, bias=False)

    def decay_channels(self) -> int:
        """Entries of ``dt_bias``: one decay per value head and key channel."""
        return self.options.n_v_heads * self.options.head_k_dim

    def project(
        self, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(qkv, output gate z or None, beta's input b, the decay's input
        ``f_b(f_a(x))`` (b, l, n_v_heads, head_k_dim))."""
        qkv, b, f_a, g_a = self.in_proj(hidden).split_with_sizes(self.split_sizes, -1)
        z = self.g_b_proj(g_a) if self.options.output_gate else None
        a = rearrange(self.f_b_proj(f_a), "b l (h d) -> b l h d", d=self.options.head_k_dim)
        return qkv, z, b, a

    def log_decay(self, a: torch.Tensor) -> torch.Tensor:
        """``g = -exp(A_log[h]) * softplus(a + dt_bias)``, (b, l, n_v_heads, head_k_dim)."""
        dt_bias = upcast(self.dt_bias).view(a.shape[-2:])
        return state_matrix(self)[:, None] * F.softplus(upcast(a) + dt_bias)

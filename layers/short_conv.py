"""LFM2's gated short convolution: ``out_proj(C * conv(B * x))`` with a depthwise causal conv.

Liquid AI's LFM2 interleaves these with attention. One in-projection gives B, C and x (each
d_model wide); the input gate B scales x, a short depthwise causal conv (width 3 in LFM2, no
activation) mixes a few neighbouring tokens, the output gate C scales the result. The only
state is the conv window, so its cache holds ``d_conv - 1`` inputs whatever the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layers.base import Block, TokenContext, dtype_bytes
from layers.options import require_positive_int
from layers.registry import register_block
from layers.ssm_cache import ConvCache, causal_conv_silu, depthwise_conv


@dataclass
class ShortConvOptions:
    """Options of the ``short_conv`` block (defaults are LFM2's).

    Attributes:
        d_conv: conv width (LFM2's ``conv_L_cache``).
        bias: biases on the projections and the conv (LFM2's ``conv_bias``).
    """

    d_conv: int = 3
    bias: bool = False

    def resolve(self, d_model: int, where: str) -> ShortConvOptions:
        require_positive_int(self.d_conv, f"{where}.d_conv")
        if not isinstance(self.bias, bool):
            raise ValueError(f"{where}.bias: must be true or false, got {self.bias!r}")
        return ShortConvOptions(self.d_conv, self.bias)


@register_block("short_conv", symbol="C", options=ShortConvOptions)
class ShortConv(Block):
    """Gated short convolution sublayer. Shapes: (batch, seqlen, d_model) -> same."""

    separates_documents = True

    def __init__(self, d_model: int, options: ShortConvOptions, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=options.bias)
        self.conv = depthwise_conv(d_model, options.d_conv, options.bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=options.bias)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: ConvCache | None = None,
        context: TokenContext | None = None,
    ) -> torch.Tensor:
        valid = None if context is None or context.valid is None else context.valid[..., None]
        seq_idx = None if context is None else context.seq_idx
        B, C, x = self.in_proj(hidden).chunk(3, -1)
        step = cache is not None and hidden.shape[1] == 1 and valid is None
        mixed = causal_conv_silu(B * x, self.conv, cache, valid, step, seq_idx, activation=None)
        return self.out_proj(C * mixed)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device: torch.device
    ) -> ConvCache:
        return ConvCache.zeros(batch_size, self.d_model, self.options.d_conv, dtype, device)

    @classmethod
    def inference_state_bytes(
        cls, d_model: int, options: ShortConvOptions, context: int, dtype: torch.dtype
    ) -> int:
        return d_model * (options.d_conv - 1) * dtype_bytes(dtype)

    def residual_weights(self) -> list[nn.Parameter]:
        return [self.out_proj.weight]

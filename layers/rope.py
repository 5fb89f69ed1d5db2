"""Rotary position embeddings (the rotate-half convention of Llama / transformers)."""

from __future__ import annotations

import torch
from torch import nn

from layers.rope_scaling import dynamic_inv_freq, scaled_inv_freq


class RotaryEmbedding(nn.Module):
    """Rotates the first ``rotary_dim`` channels of each head by position-dependent angles.

    ``rotary_dim`` below ``head_dim`` gives partial rotary embeddings (Bamba, GPT-NeoX);
    the remaining channels pass through unchanged.
    """

    def __init__(
        self, head_dim: int, rotary_dim: int, theta: float, scaling: dict | None = None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.scaling = scaling  # see layers.rope_scaling, or None
        self.attention_factor = scaled_inv_freq(rotary_dim, theta, scaling)[1]
        self._inv_freq: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def inv_freq(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """theta^(-2i / rotary_dim), (rotary_dim // 2,), computed in float64 then cast.

        Kept per device and dtype outside the module's buffers (so ``model.to(bfloat16)``
        cannot round it), which saves a decode step its recomputation; computed afresh while
        ``torch.compile`` traces.
        """
        key = (device, dtype)
        cached = None if torch.compiler.is_compiling() else self._inv_freq.get(key)
        if cached is None:
            inv_freq = scaled_inv_freq(self.rotary_dim, self.theta, self.scaling)[0]
            cached = inv_freq.to(device=device, dtype=dtype)
            if not torch.compiler.is_compiling():
                self._inv_freq[key] = cached
        return cached

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles for ``positions`` (..., seqlen) -> cos, sin of shape (..., seqlen, rotary_dim).

        Angles are computed in float32 (as transformers does), float64 for float64 inputs.
        """
        angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if self.scaling is not None and self.scaling["rope_type"] == "dynamic":
            seq_len = positions.max() + 1
            inv_freq = dynamic_inv_freq(self.rotary_dim, self.theta, self.scaling, seq_len)
            inv_freq = inv_freq.to(angle_dtype)
        else:
            inv_freq = self.inv_freq(positions.device, angle_dtype)
        angles = positions.to(angle_dtype).unsqueeze(-1) * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:  # YaRN's temperature
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def rotate_queries_and_keys(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` and ``k`` (batch, seqlen, heads, head_dim; their head counts may differ)
        rotated by ``positions`` ((batch, seqlen) or (seqlen,); None: 0 .. seqlen - 1)."""
        if positions is None:
            positions = torch.arange(q.shape[1], device=q.device)
        cos, sin = self.cos_sin(positions, q.dtype)
        return self(q, cos, sin), self(k, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (batch, seqlen, heads, head_dim) by cos/sin of shape (seqlen, rotary_dim)
        or (batch, seqlen, rotary_dim)."""
        rot, passthrough = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        rot = rot * cos + rotated_half * sin
        return torch.cat((rot, passthrough), dim=-1) if passthrough.shape[-1] else rot

"""Position encodings other than RoPE: ALiBi's per-head linear biases and the original
Transformer's sinusoidal encoding.

- ALiBi (Press et al. 2022, "Train Short, Test Long"): attention scores get
  ``-slope_h * (i - j)`` for query position ``i`` and key position ``j``; no position enters
  the queries, keys or embeddings. Head ``h`` of ``n`` (a power of two) has slope
  ``2 ** (-8 (h + 1) / n)``; other head counts take the slopes of the nearest lower power of
  two and every other slope of the next one, as the paper's code does.
- Sinusoidal (Vaswani et al. 2017): ``PE[p, 2i] = sin(p / base ** (2i / d))``,
  ``PE[p, 2i + 1] = cos(p / base ** (2i / d))``, added once to the (``sqrt(d)``-scaled) token
  embeddings, so it lives in the model, not in the attention layers.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_heads: int) -> list[float]:
    """The paper's per-head slopes, head 0 first (largest)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def alibi_mask(
    visible: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    slopes: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """An additive attention mask: ``-slope * (query - key)`` where visible, ``-inf`` elsewhere.

    Shapes: visible (..., nq, nk) bool; query_index (..., nq, 1) and key_index (..., 1, nk)
    broadcasting to it; slopes (n_heads,) -> (..., n_heads, nq, nk) of ``dtype``, with the
    head axis inserted before the last two.
    """
    distance = (query_index - key_index).unsqueeze(-3).to(slopes.dtype)  # (..., 1, nq, nk)
    bias = -slopes[:, None, None] * distance
    bias = bias.masked_fill(~visible.unsqueeze(-3), -math.inf)
    return bias.to(dtype)


def sinusoidal_encoding(positions: torch.Tensor, width: int, base: float = 10000.0) -> torch.Tensor:
    """The original Transformer's encoding of ``positions`` (...,) -> (..., width), float32
    (float64 for float64 positions), channels interleaved sin, cos."""
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    pairs = (width + 1) // 2
    exponents = torch.arange(pairs, dtype=torch.float64, device=positions.device) * 2 / width
    inv_freq = (1.0 / base**exponents).to(dtype)
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq  # (..., pairs)
    encoding = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # sin, cos, ...
    return encoding[..., :width]

"""An attention cache that keeps keys and values in int8 with per-token, per-head scales.

Each key (and value) vector of one head at one position is stored as ``q * scale`` with q in
[-127, 127] (int8) and one float16 ``scale = max|x| / 127``: quantized when written,
dequantized when read, so every read sees what a write stored and a sequence fed in pieces
attends over exactly the values a single call would. Bytes per token and head:
``head_dim + 2`` against ``2 * head_dim`` in bfloat16 (0.53x for head_dim 32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layers.attention import KVCache

QMAX = 127
SCALE_DTYPE = torch.float16
_TINY = torch.finfo(SCALE_DTYPE).tiny


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``x`` (..., head_dim) and their scales (..., 1), float16.

    ``|x - q * scale| <= scale / 2`` elementwise (up to float rounding of the scale).
    """
    amax = x.detach().abs().amax(-1, keepdim=True).float()
    scale = (amax / QMAX).clamp(min=_TINY).to(SCALE_DTYPE)
    q = torch.round(x.float() / scale.float()).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``; q (..., head_dim) int8, scale (..., 1)."""
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


@dataclass(kw_only=True)
class Int8KVCache(KVCache):
    """:class:`~layers.attention.KVCache` with int8 ``keys`` / ``values`` and their scales.

    Attributes (besides those of KVCache):
        key_scale, value_scale: (batch, n_kv_heads, capacity, 1) float16.
    """

    key_scale: torch.Tensor = field(default=None)  # type: ignore[assignment]
    value_scale: torch.Tensor = field(default=None)  # type: ignore[assignment]

    @classmethod
    def like(cls, cache: KVCache) -> Int8KVCache:
        """An empty int8 cache of ``cache``'s shapes (values may be narrower than keys, as in
        latent attention), window and device."""
        batch, heads, capacity, _ = cache.keys.shape
        device = cache.keys.device

        def codes(like: torch.Tensor) -> torch.Tensor:
            return torch.zeros(like.shape, dtype=torch.int8, device=device)

        def scales() -> torch.Tensor:
            return torch.zeros(batch, heads, capacity, 1, dtype=SCALE_DTYPE, device=device)

        return cls(
            keys=codes(cache.keys),
            values=codes(cache.values),
            key_index=torch.full_like(cache.key_index, -1),
            valid=torch.zeros_like(cache.valid),
            window=cache.window,
            key_scale=scales(),
            value_scale=scales(),
        )

    def store(self, slots: slice | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for codes, scales, x in (
            (self.keys, self.key_scale, k),
            (self.values, self.value_scale, v),
        ):
            q, scale = quantize_per_token(x)
            codes[:, :, slots] = q
            scales[:, :, slots] = scale

    def store_at(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for codes, scales, x in (
            (self.keys, self.key_scale, k),
            (self.values, self.value_scale, v),
        ):
            q, scale = quantize_per_token(x)
            codes.index_copy_(2, slot, q)
            scales.index_copy_(2, slot, scale)

    def read(self, end: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        part = slice(None) if end is None else slice(0, end)
        return (
            dequantize_per_token(self.keys[:, :, part], self.key_scale[:, :, part], dtype),
            dequantize_per_token(self.values[:, :, part], self.value_scale[:, :, part], dtype),
        )

    def round_trip(
        self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            dequantize_per_token(*quantize_per_token(k), dtype),
            dequantize_per_token(*quantize_per_token(v), dtype),
        )

    @staticmethod
    def token_bytes(n_kv_heads: int, head_dim: int) -> int:
        """Bytes of one token's keys and values (codes and scales), bookkeeping excluded."""
        return 2 * n_kv_heads * (head_dim + SCALE_DTYPE.itemsize)

"""RoPE frequency scalings that checkpoints use to extend their context: linear position
interpolation, dynamic NTK, YaRN and Llama 3's, with transformers' ``rope_parameters`` names.

Each gives the inverse frequencies theta^(-2i / d) rescaled per frequency, and an attention
factor that multiplies cos and sin (YaRN's temperature; 1 otherwise).

``dynamic`` (NTK-aware) raises the base with the length a forward call reaches: with
``L = max(position) + 1`` beyond ``original_max_position_embeddings`` (transformers reads the
config's ``max_position_embeddings``), ``theta' = theta * (factor * L / original - (factor -
1)) ** (d / (d - 2))``. The frequencies are a function of each call's positions (transformers
keeps the largest length seen in the module, so its results depend on earlier calls; ours do
not). With an inference cache the keys keep the rotation of the call that wrote them, as in
transformers' cache: chunked prefill beyond the original length is not the same as one call.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from layers.options import require

SCALINGS = ("linear", "dynamic", "yarn", "llama3")
KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


def check_scaling(scaling: Any, where: str) -> dict[str, Any] | None:
    """``attention.rope_scaling`` validated: None, or a mapping with ``rope_type`` one of
    :data:`SCALINGS` and that type's keys (one-line ValueError naming the key otherwise)."""
    if scaling is None:
        return None
    require(isinstance(scaling, dict), where, f"must be a mapping or null; got {scaling!r}")
    kind = scaling.get("rope_type")
    require(kind in SCALINGS, f"{where}.rope_type",
            f"must be one of {', '.join(SCALINGS)}; got {kind!r}")  # fmt: skip
    for key in scaling:
        require(key == "rope_type" or key in KEYS[kind], f"{where}.{key}",
                f"not an option of {kind} scaling; valid: {', '.join(KEYS[kind])}")  # fmt: skip
    for key in REQUIRED[kind]:
        require(key in scaling, f"{where}.{key}", f"required by {kind} scaling")
    for key, value in scaling.items():
        if key in ("rope_type", "truncate") or value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok and math.isfinite(value) and value > 0, f"{where}.{key}",
                f"must be a positive number; got {value!r}")  # fmt: skip
    if kind == "llama3":
        require(scaling["high_freq_factor"] > scaling["low_freq_factor"],
                f"{where}.high_freq_factor", "must exceed low_freq_factor")  # fmt: skip
    return dict(scaling)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def scaled_inv_freq(
    rotary_dim: int, theta: float, scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim // 2,) in float64 and the cos/sin attention factor."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    inv_freq = 1.0 / theta**exponents
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":  # positions divided by the factor
        return inv_freq / factor, 1.0
    if kind == "dynamic":  # the original frequencies up to the original length
        return inv_freq, 1.0
    original = float(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv_freq
        # Long wavelengths (beyond original / low) are interpolated by the factor, short ones
        # (below original / high) kept, and the band between blended linearly in 1 / wavelength.
        smooth = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0
    # YaRN: dimensions that turn fewer than beta_slow times over the original context are
    # interpolated, more than beta_fast times kept, a linear ramp between.
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention = yarn_mscale(factor)
    return inv_freq, float(attention)


def dynamic_inv_freq(
    rotary_dim: int, theta: float, scaling: dict[str, Any], seq_len: torch.Tensor
) -> torch.Tensor:
    """Dynamic NTK inverse frequencies (rotary_dim // 2,) in float64 for a call reaching
    ``seq_len`` (0-d tensor: ``max(position) + 1``); tensor operations only, so it traces."""
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    length = seq_len.to(torch.float64).clamp(min=original)
    base = theta * (factor * length / original - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=seq_len.device)
    return 1.0 / base ** (exponents / rotary_dim)

"""What the selective-scan blocks (Mamba-1 and Mamba-2) share: initialisation and cache entry."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from layers.base import CacheEntry


def inverse_softplus(values: torch.Tensor) -> torch.Tensor:
    """``y`` such that ``softplus(y) == values`` (for values > 0)."""
    return values + torch.log(-torch.expm1(-values))


def init_dt_bias(size: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """A time-step bias whose softplus is log-uniform in [dt_min, dt_max] (as in mamba_ssm)."""
    log_dt = torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    return inverse_softplus(torch.exp(log_dt).clamp(min=dt_init_floor))


def mark_no_weight_decay(*params: torch.nn.Parameter) -> None:
    """Flag SSM dynamics parameters that optimisers should not decay (mamba_ssm's convention)."""
    for param in params:
        param._no_weight_decay = True


@dataclass
class SSMCache(CacheEntry):
    """Inference state of one Mamba sublayer: the conv window and the recurrent state.

    Attributes:
        conv_state: (batch, conv_dim, d_conv - 1), the last inputs of the causal conv, in the
            model's dtype.
        ssm_state: float32; Mamba-2 (batch, nheads, headdim, d_state), Mamba-1
            (batch, d_inner, d_state).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

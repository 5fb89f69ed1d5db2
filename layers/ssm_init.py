"""Initialisation that the selective-scan blocks (Mamba-1 and Mamba-2) share, after mamba_ssm."""

from __future__ import annotations

import math

import torch


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

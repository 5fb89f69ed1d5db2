"""AdamW parameter groups and learning-rate schedules (warmup, then cosine / WSD / constant)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hybrid.recipe import OptimConfig, ScheduleConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with ``weight_decay``; norms, biases, embeddings and other
    vectors (SSM ``A_log``, ``D``, ``dt_bias``) without it.

    Embeddings are recognised as ``nn.Embedding`` weights (and the LM head when tied, which is
    the same tensor); every parameter lands in exactly one group.
    """
    embedding_ids = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)
    }
    decay, no_decay, seen = [], [], set()
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if parameter.ndim < 2 or id(parameter) in embedding_ids:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (fused on CUDA)."""
    fused = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(
        parameter_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        fused=fused or None,
    )


def lr_multiplier(schedule: ScheduleConfig, max_steps: int) -> Callable[[int], float]:
    """``step -> lr / peak_lr``: linear warmup over ``warmup_steps`` (from 1/warmup), then

    - ``cosine``: cosine from 1 down to ``min_lr_ratio`` at ``max_steps``;
    - ``wsd``: 1 until the last ``decay_fraction`` of the steps, then linear to ``min_lr_ratio``;
    - ``constant``: 1.
    """
    warmup, floor = schedule.warmup_steps, schedule.min_lr_ratio
    decay_start = max(warmup, round(max_steps * (1 - schedule.decay_fraction)))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule.kind == "constant":
            return 1.0
        if schedule.kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if step < decay_start:  # wsd
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1 - (1 - floor) * progress

    return multiplier

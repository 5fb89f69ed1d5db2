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


def apply_optim_changes(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    saved: dict,
    optim: OptimConfig,
) -> list[str]:
    """After a resume, give the restored optimizer and schedule the recipe's ``optim``
    settings where they differ from ``saved`` (the ``optim`` section the checkpoint was
    trained with): lr (peak; the schedule's multiplier of the current step applies), weight
    decay (of the decayed group), betas and eps. Returns one ``"optim.lr: 0.003 -> 0.001"``
    per change. (``grad_clip`` and the schedule are read from the recipe at every step.)
    """
    changes = []
    new = optim.model_dump()
    for key in ("lr", "weight_decay", "betas", "eps"):
        old = tuple(saved[key]) if key == "betas" else saved.get(key)
        value = tuple(new[key]) if key == "betas" else new[key]
        if old is None or old == value:
            continue
        changes.append(f"optim.{key}: {old} -> {value}")
        for group in optimizer.param_groups:
            if key == "lr":
                group["initial_lr"] = value
            elif key == "weight_decay":
                if group["weight_decay"] != 0:  # the no-decay group keeps 0
                    group["weight_decay"] = value
            else:
                group[key] = value
        if key == "lr":
            scheduler.base_lrs = [value for _ in optimizer.param_groups]
            step = scheduler.last_epoch
            for group, lmbda in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
                group["lr"] = value * lmbda(step)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return changes

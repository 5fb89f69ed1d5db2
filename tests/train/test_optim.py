"""AdamW parameter groups and the learning-rate schedules, against explicit formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.recipe import OptimConfig, ScheduleConfig
from hybrid.train.optim import build_optimizer, lr_multiplier, parameter_groups


@pytest.mark.parametrize("tied", [True, False])
def test_no_decay_on_norms_biases_embeddings(tied):
    config = HybridConfig(
        pattern="M*S-E",
        vocab_size=64,
        d_model=32,
        mamba2={"d_state": 8, "headdim": 8},
        attention={"n_heads": 2, "qkv_bias": True},
        moe={"n_experts": 2, "top_k": 1},
        tie_embeddings=tied,
    )
    model = HybridLM(config)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # tied: one entry per tensor
    decayed = {names[id(p)] for p in decay["params"]}
    free = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & free and decayed | free == set(names.values())
    assert "embedding.weight" in free
    assert ("lm_head.weight" in decayed) != tied  # an untied head is a matrix like any other
    for name in free - {"embedding.weight"}:
        assert model.get_parameter(name).ndim < 2, name  # norms, biases, A_log, D, dt_bias
    assert any("norm" in n for n in free) and any("bias" in n for n in free)
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_cosine_schedule():
    schedule = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    multiplier = lr_multiplier(schedule, 110)
    assert multiplier(0) == pytest.approx(0.1) and multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0)
    assert multiplier(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert multiplier(110) == pytest.approx(0.1) and multiplier(500) == pytest.approx(0.1)
    values = [multiplier(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_wsd_schedule():
    schedule = ScheduleConfig(kind="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    multiplier = lr_multiplier(schedule, 100)
    assert multiplier(4) == pytest.approx(1.0) and multiplier(2) == pytest.approx(0.6)
    assert multiplier(50) == 1.0 and multiplier(79) == 1.0
    assert multiplier(90) == pytest.approx(0.5) and multiplier(100) == pytest.approx(0.0)


def test_constant_schedule():
    multiplier = lr_multiplier(ScheduleConfig(kind="constant", warmup_steps=0), 10)
    assert [multiplier(s) for s in range(12)] == [1.0] * 12

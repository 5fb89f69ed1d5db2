"""Tiny transformers configs and random-weight models, one factory per model type, for the
tests that compare against transformers (tests/convert, tests/layers/test_vs_transformers.py).

Sizes are small and options sit away from both libraries' defaults (norm epsilons 1e-3, RoPE
thetas, GQA, a head_dim of its own, Mamba-2 chunks of 8 that the test lengths cross), so an
option a converter or block does not pass through fails a comparison. Each factory takes
overrides of its keyword arguments. Import after ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    BambaConfig,
    JambaConfig,
    LlamaConfig,
    Mamba2Config,
    NemotronHConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from tests.hf_testing import randomize

CHUNK = 8  # every Mamba-2 chunk size; the test lengths 13 and 21 cross it


def llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        rms_norm_eps=1e-3,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    return LlamaConfig(**{**values, **overrides})


def mamba2_config(**overrides) -> Mamba2Config:
    values = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=8,
        head_dim=8,
        expand=2,
        n_groups=2,
        state_size=16,
        conv_kernel=4,
        chunk_size=CHUNK,
        layer_norm_epsilon=1e-3,
    )
    return Mamba2Config(**{**values, **overrides})


def bamba_config(**overrides) -> BambaConfig:
    values = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        attn_layer_indices=[1],
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0},
        rms_norm_eps=1e-3,
        mamba_n_heads=16,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=CHUNK,
    )
    return BambaConfig(**{**values, **overrides})


def jamba_config(**overrides) -> JambaConfig:
    """Attention at odd layers, a 4-expert top-2 MoE at even ones, GQA, Mamba-1 dt rank 6."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=0,
        num_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-3,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_dt_rank=6,
    )
    return JambaConfig(**{**values, **overrides})


def nemotron_h_config(**overrides) -> NemotronHConfig:
    """``M - * E M``: Mamba-2 with 2 groups and an inner width that is no multiple of the
    hidden size, attention with a head_dim of its own, a squared-ReLU MLP, and a MoE with a
    shared expert, group-limited routing (4 groups, top 2) and routed scaling."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        layers_block_type=["linear_attention", "mlp", "full_attention", "moe", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,  # != hidden_size / heads
        intermediate_size=48,
        mlp_hidden_act="relu2",
        ssm_state_size=16,
        mamba_num_heads=6,  # inner width 48 != expand * hidden_size
        mamba_head_dim=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=CHUNK,
        time_step_min=0.05,  # the lower clamp of dt in transformers <= 5.24
        time_step_limit=(0.05, math.inf),  # and in 5.25: the same clamp in both
        layer_norm_epsilon=1e-3,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=40,
        moe_latent_size=None,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
    )
    return NemotronHConfig(**{**values, **overrides})


def random_model(
    model_class: type[PreTrainedModel], config: PretrainedConfig, seed: int
) -> PreTrainedModel:
    """``model_class(config)`` with :func:`~tests.hf_testing.randomize`'s weights, in eval mode."""
    torch.manual_seed(seed)
    return randomize(model_class(config), seed)

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
    FalconMambaConfig,
    JambaConfig,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
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


def mamba_config(**overrides) -> MambaConfig:
    """Mamba-1: dt rank 6 (not "auto": 2), d_state 8, conv width 3, untied head."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        expand=2,
        conv_kernel=3,
        time_step_rank=6,
        layer_norm_epsilon=1e-3,
        tie_word_embeddings=False,
    )
    return MambaConfig(**{**values, **overrides})


def falcon_mamba_config(**overrides) -> FalconMambaConfig:
    """:func:`mamba_config`'s sizes, with the mixer's weight-free norms at an epsilon of
    their own (1e-2, not layer_norm_epsilon's 1e-3)."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        expand=2,
        conv_kernel=3,
        time_step_rank=6,
        layer_norm_epsilon=1e-3,
        mixer_rms_eps=1e-2,
        tie_word_embeddings=False,
    )
    return FalconMambaConfig(**{**values, **overrides})


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


def falcon_h1_config(**overrides):
    """Three layers of attention + Mamba-2 side by side, every multiplier away from 1 (a
    different factor for each of the z, x, B, C, dt parts of the Mamba projection), GQA with a
    head_dim of its own, a Mamba inner width (mamba_d_ssm) that is no multiple of the hidden
    size, the gated RMSNorm on with the norm before the gate."""
    from transformers import FalconH1Config

    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        rms_norm_eps=1e-3,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0},
        mamba_d_ssm=48,
        mamba_n_heads=6,
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_chunk_size=CHUNK,
        mamba_rms_norm=True,
        mamba_norm_before_gate=True,
        embedding_multiplier=1.7,
        lm_head_multiplier=0.6,
        key_multiplier=0.8,
        attention_in_multiplier=1.3,
        attention_out_multiplier=0.7,
        ssm_in_multiplier=0.9,
        ssm_out_multiplier=1.2,
        ssm_multipliers=[0.5, 1.5, 0.8, 1.25, 0.6],
        mlp_multipliers=[1.4, 0.75],
    )
    return FalconH1Config(**{**values, **overrides})


def lfm2_config(**overrides):
    """Short convs and attention mixed (``C-C-*-C-``), GQA with a head_dim of its own (16, not
    hidden_size / heads = 12), and the MLP width auto-adjusted away from every default:
    int(2 * 100 / 3) = 66, times 1.3 = 85, rounded up to a multiple of 16: 96. Tied, as LFM2 is
    by default."""
    from transformers import Lfm2Config

    values = dict(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=100,
        block_auto_adjust_ff_dim=True,
        block_ffn_dim_multiplier=1.3,
        block_multiple_of=16,
        num_hidden_layers=4,
        layer_types=["conv", "conv", "full_attention", "conv"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        norm_eps=1e-3,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        conv_L_cache=3,
        conv_bias=False,
        tie_word_embeddings=True,
    )
    return Lfm2Config(**{**values, **overrides})


def qwen3_next_config(**overrides):
    """``D- D- *E DE``: Gated DeltaNet with two value heads per key head and a conv of 3, gated
    attention with a head_dim of its own (16, not hidden_size / heads = 8) and half of each head
    rotating (not the default quarter), dense MLPs where ``mlp_only_layers`` says (0 and 1) and
    a 4-expert top-2 MoE with unnormalised top-k weights and a shared expert of its own width
    elsewhere."""
    from transformers import Qwen3NextConfig

    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-3,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 3000.0,
            "partial_rotary_factor": 0.5,
        },
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=3,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[0, 1],
        tie_word_embeddings=False,
    )
    return Qwen3NextConfig(**{**values, **overrides})


def granitemoehybrid_config(**overrides):
    """``M E * E M E``: Mamba-2 with 2 groups, attention with RoPE, GQA and a head_dim of its
    own, a 4-expert top-2 MoE with a shared MLP of another width, and every multiplier away
    from 1 (attention_multiplier is the softmax scale)."""
    from transformers import GraniteMoeHybridConfig

    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        shared_intermediate_size=40,
        num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        position_embedding_type="rope",
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0},
        rms_norm_eps=1e-3,
        num_local_experts=4,
        num_experts_per_tok=2,
        mamba_n_heads=8,
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_chunk_size=CHUNK,
        embedding_multiplier=2.5,
        residual_multiplier=0.6,
        attention_multiplier=0.2,
        logits_scaling=1.8,
    )
    return GraniteMoeHybridConfig(**{**values, **overrides})


def olmo_hybrid_config(**overrides):
    """``D- *- D- D-``: Gated DeltaNet with two value heads per key head, value heads wider than
    key heads and a conv of 3, negative eigenvalues allowed (beta in (0, 2)); OLMo 2 attention
    (post-norms, q / k norms over whole projections) with GQA and RoPE."""
    from transformers import OlmoHybridConfig

    values = dict(
        vocab_size=64,
        pad_token_id=0,
        eos_token_id=1,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-3,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0},
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=3,
        linear_allow_neg_eigval=True,
        tie_word_embeddings=False,
    )
    return OlmoHybridConfig(**{**values, **overrides})


def kimi_linear_config(**overrides):
    """``K- LE KE L-``: Kimi Delta Attention (a decay per key channel, a conv of 3) and latent
    attention without positional encoding whose value heads (12) are wider than the keys' nope
    part (8) and whose shared key part is 4 wide; dense MLPs at 0 and 3 (``mlp_layer_types``),
    elsewhere DeepSeek-V3's MoE: sigmoid router with a score-correction bias, two groups of two
    experts (one eligible), unnormalised top-2 weights scaled by 2.5, two shared experts."""
    from transformers import KimiLinearConfig

    values = dict(
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "dense"],
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=12,
        linear_num_heads=2,
        linear_head_dim=8,
        linear_conv_kernel_dim=3,
        num_local_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        n_shared_experts=2,
        n_group=2,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=2.5,
        rms_norm_eps=1e-3,
        tie_word_embeddings=False,
    )
    return KimiLinearConfig(**{**values, **overrides})

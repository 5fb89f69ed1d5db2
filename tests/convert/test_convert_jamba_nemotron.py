"""Jamba and Nemotron-H checkpoints: tiny random transformers models through ``from_hf`` and
``to_hf`` (tests/convert/parity.py), our own models written as either type, and the options
we cannot express failing with their names."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

pytest.importorskip("transformers")
import transformers
from transformers import JambaForCausalLM, NemotronHForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from hybrid import HybridConfig, HybridLM
from hybrid.convert import jamba, nemotron_h, to_hf
from tests.convert.parity import check_parity, relative_error
from tests.hf_models import CHUNK, jamba_config, nemotron_h_config, random_model
from tests.hf_testing import needs_torch_ssm_path, randomize

# ---------------------------------------------------------------------------------------- Jamba


def jamba_model(seed: int = 0, **overrides) -> JambaForCausalLM:
    return random_model(JambaForCausalLM, jamba_config(**overrides), seed)


JAMBA_CASES = {
    # attention at 1 and 3, MoE (4 experts, top-2) at 0 and 2, GQA
    "period2-moe": {},
    # attention once at 2 of 3, MoE everywhere, MHA, biases in the Mamba projections, tied
    "offset2-allmoe-tied": dict(
        num_hidden_layers=3,
        attn_layer_period=3,
        attn_layer_offset=2,
        expert_layer_period=1,
        expert_layer_offset=0,
        num_key_value_heads=4,
        mamba_proj_bias=True,
        mamba_conv_bias=False,
        tie_word_embeddings=True,
    ),
}


@needs_torch_ssm_path
@pytest.mark.parametrize("case", list(JAMBA_CASES))
def test_jamba_parity(case, tmp_path):
    check_parity(jamba_model(**JAMBA_CASES[case]), tmp_path)


def test_jamba_attention_only_parity(tmp_path):
    """No Mamba layer (runs with the CUDA kernels installed too); dense MLPs, MQA, head_dim."""
    model = jamba_model(
        num_hidden_layers=2,
        attn_layer_period=1,
        attn_layer_offset=0,
        num_experts=1,
        num_key_value_heads=1,
        head_dim=12,
    )
    check_parity(model, tmp_path)


def test_jamba_config_round_trip():
    hf = jamba_model().config.to_dict()
    config = jamba.config_from_hf(hf)
    assert config.pattern_string == "SE*-SE*-"
    assert config.layer_options[1].normalize_top_k is False
    assert config.layer_options[1].router == "softmax"
    assert not config.layer_options[3].bias
    assert jamba.config_from_hf(jamba.config_to_hf(config)).fingerprint() == config.fingerprint()


@needs_torch_ssm_path
def test_jamba_from_our_model(tmp_path):
    """A model of ours written as Jamba: transformers computes our logits."""
    torch.manual_seed(0)
    config = HybridConfig(
        pattern="S-*E",
        vocab_size=64,
        d_model=32,
        attention={"n_heads": 4, "n_kv_heads": 2, "rope": False},
        mamba1={"d_state": 8, "inner_norms": True, "norm_eps": 1e-5},
        mlp={"hidden_size": 64},
        moe={"n_experts": 4, "top_k": 2, "expert_hidden_size": 64, "normalize_top_k": False},
    )
    ours = randomize(HybridLM(config), seed=1).eval()
    to_hf(ours, tmp_path, "jamba")
    theirs = JambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, ours(ids).logits) < 1e-4


def test_jamba_packed_module_state():
    """transformers' in-memory names (packed ``gate_up_proj`` experts) load as well."""
    hf_model = jamba_model(attn_layer_period=1, attn_layer_offset=0, tie_word_embeddings=True)
    hf = hf_model.config.to_dict()
    config = jamba.config_from_hf(hf)
    state = hf_model.state_dict()
    assert "model.layers.0.feed_forward.experts.gate_up_proj" in state
    ours = HybridLM(config).eval()
    weights = jamba.weights_from_hf(state, hf, config)
    missing, unexpected = ours.load_state_dict(weights, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied: it is the embedding
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, hf_model.eval()(ids).logits) < 1e-4


def jamba_dict(**overrides) -> dict:
    return {**jamba_model().config.to_dict(), **overrides}


@pytest.mark.parametrize(
    "option, value",
    [("hidden_act", "gelu"), ("sliding_window", 4)],
)
def test_jamba_unsupported_options(option, value):
    with pytest.raises(ValueError, match=f"jamba: config option {option}="):
        jamba.config_from_hf(jamba_dict(**{option: value}))


@pytest.mark.parametrize(
    "change, option",
    [
        ({"attention": {"n_heads": 4, "rope": True}}, "attention.position"),
        ({"mamba1": {"inner_norms": False}}, "mamba1.inner_norms"),
        ({"moe": {"n_experts": 4, "normalize_top_k": True}}, "moe.normalize_top_k"),
        ({"mlp": {"activation": "gelu"}}, "mlp.activation"),
        ({"pattern": "M-*E"}, "pattern"),
        ({"pattern": "*-*E", "layer_overrides": {2: {"n_kv_heads": 2}}}, "different options"),
    ],
)
def test_jamba_inexpressible(change, option):
    values = dict(
        pattern="S-*E",
        d_model=32,
        attention={"n_heads": 4, "rope": False},
        mamba1={"inner_norms": True, "norm_eps": 1e-5},
        moe={"n_experts": 4, "normalize_top_k": False},
    )
    with pytest.raises(ValueError, match=f"jamba: .*{option}"):
        jamba.config_to_hf(HybridConfig(**{**values, **change}))


# ------------------------------------------------------------------------------------ Nemotron-H


def nemotron_model(seed: int = 0, **overrides) -> NemotronHForCausalLM:
    return random_model(NemotronHForCausalLM, nemotron_h_config(**overrides), seed)


NEMOTRON_CASES = {
    # M - * E M: ngroups 2, MoE with a shared expert and group-limited routing (4 groups, top 2)
    "mixed": {},
    # legacy pattern string, one group, biases, unnormalised routing, MHA, "tied" (transformers
    # keeps the head separate anyway)
    "pattern-bias-tied": dict(
        layers_block_type=None,
        hybrid_override_pattern="M*EM-",
        use_bias=True,
        use_conv_bias=False,
        n_groups=1,
        norm_topk_prob=False,
        n_group=1,
        topk_group=1,
        num_key_value_heads=4,
        routed_scaling_factor=1.0,
        tie_word_embeddings=True,
    ),
}


@needs_torch_ssm_path
@pytest.mark.parametrize("case", list(NEMOTRON_CASES))
def test_nemotron_h_parity(case, tmp_path):
    check_parity(nemotron_model(**NEMOTRON_CASES[case]), tmp_path)


@needs_torch_ssm_path
@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.25"),
    reason="transformers before 5.25 clamps dt at time_step_min, not at time_step_limit",
)
def test_nemotron_h_dt_limit_is_time_step_limit(tmp_path):
    """As in released checkpoints: time_step_limit (0, inf) below time_step_min (the dt_bias
    initialisation range only), so dt is not clamped at time_step_min."""
    model = nemotron_model(time_step_limit=(0.0, math.inf))
    config = nemotron_h.config_from_hf(model.config.to_dict())
    assert config.layer_options[0].dt_limit == (0.0, math.inf)
    check_parity(model, tmp_path)


def test_nemotron_h_no_mamba_parity(tmp_path):
    """Attention, MLP with biases and silu, MoE-free (runs with the CUDA kernels installed)."""
    model = nemotron_model(
        layers_block_type=["full_attention", "mlp", "full_attention", "mlp"],
        mlp_hidden_act="silu",
        mlp_bias=True,
    )
    check_parity(model, tmp_path)


def test_nemotron_h_config_round_trip():
    hf = nemotron_model().config.to_dict()
    config = nemotron_h.config_from_hf(hf)
    assert config.pattern_string == "M-*EM"
    moe = config.layer_options[3]
    assert (moe.router, moe.n_groups, moe.topk_groups, moe.routed_scaling) == ("sigmoid", 4, 2, 2.5)
    assert config.layer_options[0].dt_limit == (0.05, math.inf)
    again = nemotron_h.config_from_hf(nemotron_h.config_to_hf(config))
    assert again.fingerprint() == config.fingerprint()


@needs_torch_ssm_path
@pytest.mark.parametrize("tied", [False, True])
def test_nemotron_h_from_our_model(tied, tmp_path):
    """A model of ours (no correction bias, default dt clamp) written as Nemotron-H; a tied
    head is written as a copy of the embedding (transformers never ties them)."""
    torch.manual_seed(0)
    config = HybridConfig(
        pattern="M*-E",
        tie_embeddings=tied,
        vocab_size=64,
        d_model=32,
        attention={"n_heads": 4, "rope": False},
        mamba2={"d_state": 16, "headdim": 8, "chunk_size": CHUNK, "ngroups": 2},
        mlp={"hidden_size": 48, "activation": "relu2"},
        moe={
            "n_experts": 4,
            "top_k": 2,
            "expert_hidden_size": 24,
            "activation": "relu2",
            "n_shared_experts": 1,
            "router": "sigmoid",
        },
    )
    ours = randomize(HybridLM(config), seed=1).eval()
    to_hf(ours, tmp_path, "nemotron_h")
    theirs = NemotronHForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, ours(ids).logits) < 1e-4


def test_nemotron_h_packed_module_state():
    """transformers' in-memory names (``model.*``, packed experts) load as well."""
    hf_model = nemotron_model(layers_block_type=["full_attention", "moe", "mlp"])
    hf = hf_model.config.to_dict()
    config = nemotron_h.config_from_hf(hf)
    state = hf_model.state_dict()
    assert "model.layers.1.mixer.experts.up_proj" in state
    ours = HybridLM(config).eval()
    ours.load_state_dict(nemotron_h.weights_from_hf(state, hf, config))
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, hf_model.eval()(ids).logits) < 1e-4


def nemotron_dict(**overrides) -> dict:
    return {**nemotron_model().config.to_dict(), **overrides}


@pytest.mark.parametrize(
    "option, value",
    [
        ("moe_latent_size", 16),
        ("num_nextn_predict_layers", 1),
        ("sliding_window", 4),
        ("attention_bias", True),
        ("mamba_hidden_act", "gelu"),
        ("mlp_hidden_act", "gelu"),  # exact gelu; ours is the tanh approximation
        ("mlp_bias", True),  # with MoE layers
        ("layers_block_type", ["linear_attention", "sparse_attention"]),
    ],
)
def test_nemotron_h_unsupported_options(option, value):
    with pytest.raises(ValueError, match=f"nemotron_h: config option {option}="):
        nemotron_h.config_from_hf(nemotron_dict(**{option: value}))


@pytest.mark.parametrize(
    "change, option",
    [
        ({"pattern": "MS"}, "pattern"),
        ({"attention": {"n_heads": 4}}, "attention.position"),
        ({"mlp": {"activation": "swiglu"}}, "mlp.activation"),
        ({"moe": {"n_experts": 4, "activation": "relu2", "router": "sigmoid"}}, "n_shared_experts"),
        ({"mamba2": {"dt_limit": (0.0, 1.0)}}, "mamba2.dt_limit"),
    ],
)
def test_nemotron_h_inexpressible(change, option):
    values = dict(
        pattern="M*-E",
        d_model=32,
        attention={"n_heads": 4, "rope": False},
        mamba2={"headdim": 8, "d_state": 16},
        mlp={"activation": "relu2"},
        moe={"n_experts": 4, "activation": "relu2", "router": "sigmoid", "n_shared_experts": 1},
    )
    with pytest.raises(ValueError, match=f"nemotron_h: .*{option}"):
        nemotron_h.config_to_hf(HybridConfig(**{**values, **change}))

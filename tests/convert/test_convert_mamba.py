"""Mamba and FalconMamba checkpoints: tiny random transformers models through ``from_hf`` and
``to_hf`` (tests/convert/parity.py), our own models written as either type, and the options
we cannot express failing with their names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from hybrid import HybridConfig, HybridLM
from hybrid.convert import falcon_mamba, jamba, mamba, to_hf
from tests.convert.parity import check_parity, relative_error
from tests.hf_models import falcon_mamba_config, mamba_config, random_model
from tests.hf_testing import needs_torch_ssm_path, randomize

# model_type -> (converter, transformers model, transformers config, tiny config factory)
TYPES = {
    "mamba": (mamba, MambaForCausalLM, MambaConfig, mamba_config),
    "falcon_mamba": (falcon_mamba, FalconMambaForCausalLM, FalconMambaConfig, falcon_mamba_config),
}


def hf_model(model_type: str, seed: int = 0, **overrides):
    _, model_class, _, factory = TYPES[model_type]
    return random_model(model_class, factory(**overrides), seed)


CASES = {
    # the factories' own: dt rank 6, conv width 3, conv bias, no projection biases, untied
    "rank6-untied": {},
    # three layers, dt rank "auto" (2), biases on the in/out projections but not the conv,
    # tied head, d_state 6 and expand 3
    "auto-bias-tied": dict(
        num_hidden_layers=3,
        time_step_rank="auto",
        use_bias=True,
        use_conv_bias=False,
        tie_word_embeddings=True,
        state_size=6,
        expand=3,
    ),
}


@needs_torch_ssm_path
@pytest.mark.parametrize("case", list(CASES))
def test_mamba_parity(case, tmp_path):
    check_parity(hf_model("mamba", **CASES[case]), tmp_path)


@needs_torch_ssm_path
@pytest.mark.parametrize("case", list(CASES))
def test_falcon_mamba_parity(case, tmp_path):
    check_parity(hf_model("falcon_mamba", **CASES[case]), tmp_path)


@pytest.mark.parametrize("model_type", list(TYPES))
def test_config_round_trip(model_type):
    converter = TYPES[model_type][0]
    config = converter.config_from_hf(hf_model(model_type).config.to_dict())
    assert config.pattern_string == "SS"
    assert config.norm_eps == 1e-3 and not config.tie_embeddings
    options = config.layer_options[0]
    assert (options.d_state, options.dt_rank, options.d_conv) == (8, 6, 3)
    assert (options.conv_bias, options.bias) == (True, False)
    if model_type == "falcon_mamba":
        assert (options.inner_norms, options.inner_norm_weights) == (True, False)
        assert options.norm_eps == 1e-2  # mixer_rms_eps, not layer_norm_epsilon
    else:
        assert not options.inner_norms
    hf = converter.config_to_hf(config)
    assert hf["model_type"] == model_type and hf["time_step_rank"] == 6
    again = converter.config_from_hf(hf)
    assert again.fingerprint() == config.fingerprint()
    assert (again.layer_options, again.norm_eps) == (config.layer_options, config.norm_eps)


@pytest.mark.parametrize("model_type", list(TYPES))
def test_config_defaults_are_transformers(model_type):
    """A config.json that leaves keys out reads as transformers' defaults (a tied head, dt rank
    "auto" = ceil(hidden_size / 16), its epsilons and time-step range)."""
    converter, _, config_class, _ = TYPES[model_type]
    sparse = converter.config_from_hf({"model_type": model_type, "num_hidden_layers": 2})
    full = converter.config_from_hf(config_class(num_hidden_layers=2).to_dict())
    assert sparse.tie_embeddings and sparse.layer_options[0].dt_rank == 48
    for field in ("layer_options", "norm_eps", "tie_embeddings", "vocab_size", "init_std"):
        assert getattr(sparse, field) == getattr(full, field), field


@needs_torch_ssm_path
@pytest.mark.parametrize("model_type", list(TYPES))
def test_from_our_model(model_type, tmp_path):
    """A model of ours written as ``model_type``: transformers computes our logits."""
    torch.manual_seed(0)
    mamba1 = {"d_state": 8, "dt_rank": 4, "d_conv": 3, "bias": True, "conv_bias": False}
    if model_type == "falcon_mamba":
        mamba1 |= {"inner_norms": True, "inner_norm_weights": False, "norm_eps": 1e-2}
    config = HybridConfig(
        pattern="SSS", vocab_size=64, d_model=32, norm_eps=1e-3, tie_embeddings=True, mamba1=mamba1
    )
    ours = randomize(HybridLM(config), seed=1).eval()
    to_hf(ours, tmp_path, model_type)
    theirs = TYPES[model_type][1].from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, ours(ids).logits) < 1e-4


@pytest.mark.parametrize("model_type", list(TYPES))
def test_module_state_and_mamba_ssm_embedding_name(model_type):
    """transformers' in-memory state dict loads, with mamba_ssm's ``backbone.embedding`` name
    for the embedding too (FalconMamba's norms hold no tensors)."""
    model = hf_model(model_type, tie_word_embeddings=True)
    hf = model.config.to_dict()
    converter = TYPES[model_type][0]
    config = converter.config_from_hf(hf)
    state = dict(model.state_dict())
    assert not [name for name in state if "layernorm" in name]
    state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    ours = HybridLM(config).eval()
    missing, unexpected = ours.load_state_dict(
        converter.weights_from_hf(state, hf, config), strict=False
    )
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied: it is the embedding
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, model(ids).logits) < 1e-4


@pytest.mark.parametrize("model_type", list(TYPES))
@pytest.mark.parametrize(
    "option, value",
    [
        ("hidden_act", "gelu"),
        ("hidden_act", "relu"),
        ("quantization_config", {"quant_method": "bitsandbytes"}),
    ],
)
def test_unsupported_options(model_type, option, value):
    converter = TYPES[model_type][0]
    hf = {**hf_model(model_type).config.to_dict(), option: value}
    with pytest.raises(ValueError, match=f"{model_type}: config option {option}="):
        converter.config_from_hf(hf)


OURS = dict(pattern="SS", d_model=32, mamba1={"d_state": 8})
FALCON_NORMS = {"d_state": 8, "inner_norms": True, "inner_norm_weights": False}


@pytest.mark.parametrize(
    "model_type, change, option",
    [
        ("mamba", {"pattern": "S*"}, "pattern"),
        ("mamba", {"pattern": "MM"}, "pattern"),
        ("mamba", {"pattern": "S-"}, "pattern"),
        ("mamba", {"mamba1": {"inner_norms": True}}, "mamba1.inner_norms"),
        ("mamba", {"layer_overrides": {1: {"d_state": 4}}}, "different options"),
        ("falcon_mamba", {}, "mamba1.inner_norms"),
        ("falcon_mamba", {"mamba1": {"inner_norms": True}}, "mamba1.inner_norm_weights"),
        ("falcon_mamba", {"pattern": "SM", "mamba1": FALCON_NORMS}, "pattern"),
        (
            "falcon_mamba",
            {"mamba1": FALCON_NORMS, "layer_overrides": {0: {"norm_eps": 1e-3}}},
            "different options",
        ),
    ],
)
def test_inexpressible(model_type, change, option):
    converter = TYPES[model_type][0]
    with pytest.raises(ValueError, match=f"{model_type}: .*{option}"):
        converter.config_to_hf(HybridConfig(**{**OURS, **change}))


def test_jamba_refuses_weight_free_inner_norms():
    """Jamba's dt / B / C norms have weights: FalconMamba's weight-free ones are not Jamba's."""
    config = HybridConfig(
        pattern="S-*E",
        d_model=32,
        attention={"n_heads": 4, "rope": False},
        mamba1={"inner_norms": True, "inner_norm_weights": False, "norm_eps": 1e-5},
        moe={"n_experts": 4, "normalize_top_k": False},
    )
    with pytest.raises(ValueError, match=r"jamba: .*mamba1\.inner_norm_weights"):
        jamba.config_to_hf(config)


@pytest.mark.parametrize("model_type", list(TYPES))
def test_multipliers_are_refused(model_type, tmp_path):
    """Neither type scales embeddings, residuals or logits: to_hf fails by the option's name."""
    mamba1 = FALCON_NORMS if model_type == "falcon_mamba" else {"d_state": 8}
    config = HybridConfig(**{**OURS, "mamba1": mamba1, "residual_multiplier": 0.5})
    with pytest.raises(ValueError, match=f"{model_type}: residual_multiplier="):
        to_hf(HybridLM(config), tmp_path, model_type)

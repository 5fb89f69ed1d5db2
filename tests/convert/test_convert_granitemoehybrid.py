"""Granite 4 (granitemoehybrid) checkpoints: Mamba-2 + attention + MoE with a shared MLP and
Granite's embedding / residual / attention / logit multipliers; tiny random transformers models
through ``from_hf`` and ``to_hf`` (tests/convert/parity.py), our own models written as Granite 4,
and the options we cannot express failing with their names."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import GraniteMoeHybridForCausalLM

from hybrid import HybridConfig, HybridLM
from hybrid.convert import from_hf, granitemoehybrid, to_hf
from tests.convert.parity import check_parity, relative_error
from tests.hf_models import granitemoehybrid_config, random_model
from tests.hf_testing import needs_torch_ssm_path

CASES = {
    # M E * E M E with RoPE and every multiplier
    "moe-rope": {},
    # no experts (the shared MLP alone), no positions, MHA, biases, tied, a time-step clamp
    "dense-nope-tied": dict(
        num_local_experts=0,
        position_embedding_type=None,
        num_key_value_heads=4,
        attention_bias=True,
        mamba_proj_bias=True,
        mamba_conv_bias=False,
        tie_word_embeddings=True,
        layer_types=["attention", "mamba", "mamba"],
        time_step_limit=(0.02, 4.0),
    ),
}


def granite_model(seed: int = 0, **overrides) -> GraniteMoeHybridForCausalLM:
    return random_model(GraniteMoeHybridForCausalLM, granitemoehybrid_config(**overrides), seed)


@needs_torch_ssm_path
@pytest.mark.parametrize("case", list(CASES))
def test_granitemoehybrid_parity(case, tmp_path):
    check_parity(granite_model(**CASES[case]), tmp_path)


def test_granitemoehybrid_layout():
    config = granitemoehybrid.config_from_hf(granitemoehybrid_config().to_dict())
    assert config.pattern_string == "ME*EME"
    assert (config.embedding_multiplier, config.residual_multiplier) == (2.5, 0.6)
    assert config.logit_multiplier == pytest.approx(1 / 1.8)
    attention = config.layer_options[2]
    assert (attention.softmax_scale, attention.position, attention.head_dim) == (0.2, "rope", 12)
    moe = config.layer_options[1]
    assert (moe.n_experts, moe.top_k, moe.expert_hidden_size) == (4, 2, 24)
    assert (moe.n_shared_experts, moe.shared_hidden_size, moe.shared_gate) == (1, 40, False)


def test_granitemoehybrid_module_state_reads():
    """The state dict of transformers' modules (experts.gate_up_proj, router.weight) reads
    as the stored checkpoint does."""
    hf = granitemoehybrid_config().to_dict()
    config = granitemoehybrid.config_from_hf(hf)
    source = granite_model()
    model = HybridLM(config).eval()
    model.load_state_dict(granitemoehybrid.weights_from_hf(dict(source.state_dict()), hf, config))
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        assert relative_error(model(ids).logits, source(ids).logits) < 1e-4


def test_granitemoehybrid_from_our_model(tmp_path):
    config = HybridConfig(
        pattern="M-*-", vocab_size=48, d_model=32, norm_eps=1e-4,
        attention={"n_heads": 4, "position": "none", "softmax_scale": 0.3},
        mamba2={"headdim": 8, "d_state": 8, "chunk_size": 8, "norm_eps": 1e-4},
        mlp={"hidden_size": 40},
        embedding_multiplier=4.0, residual_multiplier=0.5, logit_multiplier=0.25,
    )  # fmt: skip
    torch.manual_seed(0)
    model = HybridLM(config).eval()
    to_hf(model, tmp_path, "granitemoehybrid")
    theirs = GraniteMoeHybridForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(0, 48, (2, 19))
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, model(ids).logits) < 1e-4
    assert from_hf(tmp_path).config.fingerprint() == config.fingerprint()


BASE = granitemoehybrid_config().to_dict()


@pytest.mark.parametrize(
    "change, option",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"layer_types": ["mamba", "conv", "mamba"]}, "layer_types"),
        ({"layer_types": ["mamba"]}, "layer_types"),
        ({"position_embedding_type": "alibi"}, "position_embedding_type"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization"),
    ],
)
def test_granitemoehybrid_unsupported_options(tmp_path, change, option):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **change}))
    with pytest.raises(ValueError, match=rf"granitemoehybrid: config option .*{option}"):
        from_hf(tmp_path)


def tiny(pattern, **fields) -> HybridLM:
    fields = {"vocab_size": 32, "d_model": 32, "mamba2": {"headdim": 8, "d_state": 8},
              "moe": {"n_experts": 4, "top_k": 2, "n_shared_experts": 1}} | fields  # fmt: skip
    return HybridLM(HybridConfig(pattern=pattern, **fields))


@pytest.mark.parametrize(
    "model, message",
    [
        (tiny("M-*E"), "cannot express pattern"),
        (tiny("MM"), "cannot express pattern"),
        (tiny("[*M]-"), "cannot express pattern"),
        (tiny("ME", moe={"n_experts": 4, "top_k": 2}), "moe.n_shared_experts=0"),
        (
            tiny("ME", moe={"n_experts": 4, "n_shared_experts": 1, "router": "sigmoid"}),
            "moe.router='sigmoid'",
        ),
        (tiny("*-", attention={"window": 8}), "attention.window=8"),
        (tiny("*-", attention={"position": "alibi"}), "attention.position='alibi'"),
        (tiny("*-", attention={"qk_norm": True}), "attention.qk_norm=True"),
        (tiny("M-", mlp={"activation": "geglu"}), "mlp.activation='geglu'"),
        (tiny("M-", mamba2={"headdim": 8, "rmsnorm": False}), "mamba2.rmsnorm=False"),
        (tiny("M-", logit_multiplier=0.0), "logit_multiplier=0.0"),
    ],
)
def test_granitemoehybrid_inexpressible(tmp_path, model, message):
    with pytest.raises(ValueError, match=message):
        to_hf(model, tmp_path, "granitemoehybrid")
    assert not (tmp_path / "config.json").exists()

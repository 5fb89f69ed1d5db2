"""Qwen3-Next checkpoints: tiny random transformers models through ``from_hf`` and ``to_hf``
(tests/convert/parity.py), our own model written as Qwen3-Next, and the options we cannot
express failing with their names.

transformers runs its plain-PyTorch gated delta rule here (fla is not installed; its chunk is
64), ours chunks of :data:`~tests.hf_models.CHUNK` (8), so the test lengths 13 and 21 cross
our chunks and the two chunkings differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen3NextForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from hybrid import HybridConfig, HybridLM
from hybrid.convert import qwen3_next, to_hf
from tests.convert.parity import check_parity, relative_error
from tests.hf_models import CHUNK, qwen3_next_config, random_model
from tests.hf_testing import randomize


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Our Gated DeltaNet in chunks of 8 (Qwen3-Next configs have no chunk key)."""
    monkeypatch.setattr(qwen3_next, "CHUNK_SIZE", CHUNK)


def qwen3_next_model(seed: int = 0, **overrides) -> Qwen3NextForCausalLM:
    return random_model(Qwen3NextForCausalLM, qwen3_next_config(**overrides), seed)


CASES = {
    # D- D- *E DE: dense MLPs at 0 and 1 (mlp_only_layers), unnormalised top-k, conv of 3,
    # half of each attention head rotating
    "mlp-only-layers": {},
    # D- *E D- *-: full attention every 2nd layer (full_attention_interval), MoE every 2nd
    # (decoder_sparse_step) but layer 3 (mlp_only_layers), normalised top-k, value heads of
    # 12 channels (keys 8), conv of 4, biases on q (with the gate), k, v and o, YaRN on a
    # quarter of each head, tied
    "interval-sparse-step-bias-yarn-tied": dict(
        layer_types=None,
        full_attention_interval=2,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        norm_topk_prob=True,
        linear_value_head_dim=12,
        linear_conv_kernel_dim=4,
        attention_bias=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 3000.0,
            "factor": 2.0,
            "original_max_position_embeddings": 16,
            "partial_rotary_factor": 0.25,
        },
        tie_word_embeddings=True,
    ),
}
PATTERNS = {"mlp-only-layers": "D-D-*EDE", "interval-sparse-step-bias-yarn-tied": "D-*ED-*-"}


@pytest.mark.parametrize("case", list(CASES))
def test_qwen3_next_parity(case, tmp_path):
    check_parity(qwen3_next_model(**CASES[case]), tmp_path)


@pytest.mark.parametrize("case", list(CASES))
def test_qwen3_next_config_round_trip(case):
    hf = qwen3_next_model(**CASES[case]).config.to_dict()
    config = qwen3_next.config_from_hf(hf)
    assert config.pattern_string == PATTERNS[case]
    attention = config.layer_options[config.layers.index("attention")]
    assert (attention.qk_norm, attention.output_gate, attention.head_dim) == (True, True, 16)
    assert attention.qk_norm_eps == config.norm_eps == 1e-3
    deltanet = config.layer_options[0]
    assert (deltanet.n_heads, deltanet.n_v_heads, deltanet.chunk_size) == (2, 4, CHUNK)
    moe = config.layer_options[config.layers.index("moe")]
    assert (moe.router, moe.shared_gate, moe.shared_hidden_size) == ("softmax", True, 40)
    assert moe.normalize_top_k == hf["norm_topk_prob"]
    again = qwen3_next.config_from_hf(qwen3_next.config_to_hf(config))
    assert again.fingerprint() == config.fingerprint()


def test_qwen3_next_top_level_rope_keys():
    """The released checkpoints' config.json: rope_theta and partial_rotary_factor at the top
    level, a null rope_scaling, no layer_types; read as transformers reads them."""
    from transformers import Qwen3NextConfig

    keys = {"rope_theta": 1e7, "partial_rotary_factor": 0.5, "rope_scaling": None,
            "full_attention_interval": 2, "num_hidden_layers": 4, "head_dim": 16}  # fmt: skip
    config = qwen3_next.config_from_hf({"model_type": "qwen3_next", **keys})
    theirs = Qwen3NextConfig(**keys)
    attention = config.layer_options[2]
    assert attention.rope_theta == theirs.rope_parameters["rope_theta"] == 1e7
    assert attention.rope_fraction == theirs.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.pattern_string == "DE*EDE*E"


def test_qwen3_next_config_defaults():
    """A config.json with only the model type reads as transformers' defaults: 48 layers, full
    attention every 4th, MoE everywhere, a quarter of each head rotating."""
    config = qwen3_next.config_from_hf({"model_type": "qwen3_next"})
    assert config.pattern_string == "DEDEDE*E" * 12
    attention = config.layer_options[6]
    assert (attention.head_dim, attention.rope_fraction, attention.n_kv_heads) == (256, 0.25, 2)
    moe = config.layer_options[1]
    assert (moe.n_experts, moe.top_k, moe.expert_hidden_size) == (512, 10, 512)


# A model of ours that Qwen3-Next holds: D- D- *E, head_v_dim != head_k_dim.
ATTENTION = {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "rope_fraction": 0.25,
             "qk_norm": True, "qk_norm_eps": 1e-5, "output_gate": True}  # fmt: skip
DELTANET = {"n_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 12, "d_conv": 4,
            "chunk_size": CHUNK, "norm_eps": 1e-5}  # fmt: skip
MOE = {"n_experts": 4, "top_k": 2, "expert_hidden_size": 24, "n_shared_experts": 1,
       "shared_hidden_size": 40, "shared_gate": True}  # fmt: skip


def our_config(**changes) -> HybridConfig:
    values = dict(
        pattern="D-D-*E",
        vocab_size=64,
        d_model=32,
        norm_eps=1e-5,
        attention=ATTENTION,
        gated_deltanet=DELTANET,
        mlp={"hidden_size": 48},
        moe=MOE,
    )
    return HybridConfig(**{**values, **changes})


def test_qwen3_next_from_our_model(tmp_path):
    """A model of ours written as Qwen3-Next: transformers computes our logits."""
    torch.manual_seed(0)
    ours = randomize(HybridLM(our_config()), seed=1).eval()
    to_hf(ours, tmp_path, "qwen3_next")
    theirs = Qwen3NextForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.layer_types == ["linear_attention"] * 2 + ["full_attention"]
    assert theirs.config.mlp_only_layers == [0, 1]
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, ours(ids).logits) < 1e-4


def test_qwen3_next_packed_module_state():
    """transformers' in-memory names (packed ``gate_up_proj`` experts) load as well, and
    multi-token-prediction tensors are dropped as transformers drops them."""
    hf_model = qwen3_next_model(tie_word_embeddings=True)
    hf = hf_model.config.to_dict()
    config = qwen3_next.config_from_hf(hf)
    state = hf_model.state_dict() | {"mtp.fc.weight": torch.zeros(32, 64)}
    assert "model.layers.2.mlp.experts.gate_up_proj" in state
    ours = HybridLM(config).eval()
    weights = qwen3_next.weights_from_hf(state, hf, config)
    missing, unexpected = ours.load_state_dict(weights, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied: it is the embedding
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, hf_model.eval()(ids).logits) < 1e-4


def qwen3_next_dict(**overrides) -> dict:
    return {**qwen3_next_model().config.to_dict(), **overrides}


@pytest.mark.parametrize(
    "option, overrides",
    [
        ("hidden_act", {"hidden_act": "gelu"}),
        ("layer_types", {"layer_types": ["linear_attention", "sliding_attention"] * 2}),
        ("layer_types", {"layer_types": ["linear_attention", "full_attention"]}),  # too short
        ("full_attention_interval", {"layer_types": None, "full_attention_interval": 0}),
        ("decoder_sparse_step", {"decoder_sparse_step": 0}),
        ("shared_expert_intermediate_size", {"shared_expert_intermediate_size": 0}),
        ("quantization_config", {"quantization_config": {"quant_method": "fp8"}}),
        # 16 channels * 0.3125 = 5 rotating: an odd number
        ("partial_rotary_factor", {"rope_parameters": {"partial_rotary_factor": 0.3125}}),
        ("rope_parameters['rope_type']", {"rope_parameters": {"rope_type": "longrope"}}),
    ],
)
def test_qwen3_next_unsupported_options(option, overrides):
    with pytest.raises(ValueError, match=re.escape(f"qwen3_next: config option {option}=")):
        qwen3_next.config_from_hf(qwen3_next_dict(**overrides))


@pytest.mark.parametrize(
    "change, option",
    [
        ({"pattern": "M-D-"}, "pattern"),
        ({"pattern": "D*-E"}, "pattern"),
        ({"attention": {**ATTENTION, "qk_norm": False}}, "attention.qk_norm"),
        ({"attention": {**ATTENTION, "output_gate": False}}, "attention.output_gate"),
        ({"attention": {**ATTENTION, "window": 8}}, "attention.window"),
        ({"attention": {**ATTENTION, "position": "alibi"}}, "attention.position"),
        ({"attention": {**ATTENTION, "out_bias": True}}, "attention.out_bias"),
        ({"attention": {**ATTENTION, "qk_norm_eps": 1e-3}}, "attention.qk_norm_eps"),
        ({"gated_deltanet": {**DELTANET, "conv_bias": True}}, "gated_deltanet.conv_bias"),
        ({"gated_deltanet": {**DELTANET, "output_gate": False}}, "gated_deltanet.output_gate"),
        ({"gated_deltanet": {**DELTANET, "norm_eps": 1e-3}}, "gated_deltanet.norm_eps"),
        ({"mlp": {"activation": "gelu"}}, "mlp.activation"),
        ({"mlp": {"hidden_size": 48, "bias": True}}, "mlp.bias"),
        ({"moe": {**MOE, "shared_gate": False}}, "moe.shared_gate"),
        ({"moe": {**MOE, "router": "sigmoid"}}, "moe.router"),
        ({"moe": {**MOE, "routed_scaling": 2.0}}, "moe.routed_scaling"),
        ({"moe": {**MOE, "n_groups": 2}}, "moe.n_groups"),
        ({"pattern": "D-*-D-*-", "layer_overrides": {2: {"n_kv_heads": 4}}}, "different options"),
    ],
)
def test_qwen3_next_inexpressible(change, option):
    with pytest.raises(ValueError, match=f"qwen3_next: .*{re.escape(option)}"):
        qwen3_next.config_to_hf(our_config(**change))


@pytest.mark.parametrize(
    "change, option",
    [
        ({"attention": {**ATTENTION, "softmax_scale": 0.5}}, "attention.softmax_scale"),
        ({"logit_multiplier": 2.0}, "logit_multiplier"),
    ],
)
def test_qwen3_next_to_hf_refuses_options_it_has_not(change, option, tmp_path):
    model = HybridLM(our_config(**change))
    with pytest.raises(ValueError, match=f"qwen3_next: {re.escape(option)}=.* cannot be expressed"):
        to_hf(model, tmp_path, "qwen3_next")


def test_the_shared_gate_is_refused_by_types_without_one(tmp_path):
    """Nemotron-H's shared expert is ungated: writing ours there would drop the gate."""
    config = HybridConfig(
        pattern="*E",
        vocab_size=64,
        d_model=32,
        attention={"n_heads": 4, "rope": False},
        moe={"n_experts": 4, "activation": "relu2", "router": "sigmoid", "n_shared_experts": 1,
             "shared_gate": True},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"nemotron_h: moe.shared_gate=True cannot be expressed"):
        to_hf(HybridLM(config), tmp_path, "nemotron_h")

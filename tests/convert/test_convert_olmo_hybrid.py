"""OLMo hybrid checkpoints: tiny random transformers models through ``from_hf`` and ``to_hf``
(tests/convert/parity.py), our own model written as OLMo hybrid, and the options we cannot
express failing with their names.

transformers runs its plain-PyTorch gated delta rule here (fla is not installed; its chunk is
64), ours chunks of :data:`~tests.hf_models.CHUNK` (8), so the test lengths 13 and 21 cross
our chunks.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers.models.olmo_hybrid")  # transformers 5.23 and later
from transformers import OlmoHybridForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from hybrid import HybridConfig, HybridLM
from hybrid.convert import CONVERTERS, converter, olmo_hybrid, to_hf
from tests.convert.parity import check_parity, relative_error
from tests.hf_models import CHUNK, olmo_hybrid_config, random_model
from tests.hf_testing import randomize


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Our Gated DeltaNet in chunks of 8 (OLMo hybrid configs have no chunk key)."""
    monkeypatch.setattr(olmo_hybrid, "CHUNK_SIZE", CHUNK)


def olmo_hybrid_model(seed: int = 0, **overrides) -> OlmoHybridForCausalLM:
    return random_model(OlmoHybridForCausalLM, olmo_hybrid_config(**overrides), seed)


CASES = {
    # D- *- D- D-: RoPE, GQA, two value heads per key head, beta in (0, 2)
    "rope-gqa-neg-eigval": {},
    # D- *- D- D-: no positional encoding (the released checkpoints), MHA, one value head per
    # key head, beta in (0, 1), biases on q, k, v and o, tied
    "nope-bias-tied": dict(
        rope_parameters={"rope_type": "default", "rope_theta": None},
        num_key_value_heads=4,
        linear_num_value_heads=2,
        linear_allow_neg_eigval=False,
        attention_bias=True,
        tie_word_embeddings=True,
    ),
    # D- D- D- *-: the default layer types (full attention every 4th layer), YaRN
    "default-layer-types-yarn": dict(
        layer_types=None,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 3000.0,
            "factor": 2.0,
            "original_max_position_embeddings": 16,
        },
    ),
}
PATTERNS = {"rope-gqa-neg-eigval": "D-*-D-D-", "nope-bias-tied": "D-*-D-D-",
            "default-layer-types-yarn": "D-D-D-*-"}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_olmo_hybrid_parity(case, tmp_path):
    check_parity(olmo_hybrid_model(**CASES[case]), tmp_path)


def test_olmo_hybrid_nope_case_has_no_rotary():
    """The NoPE case is NoPE in transformers too (so the parity above compares NoPE)."""
    model = olmo_hybrid_model(**CASES["nope-bias-tied"])
    assert model.model.rotary_emb is None
    config = olmo_hybrid.config_from_hf(model.config.to_dict())
    assert config.layer_options[2].position == "none"


@pytest.mark.parametrize("case", list(CASES))
def test_olmo_hybrid_config_round_trip(case):
    hf = olmo_hybrid_model(**CASES[case]).config.to_dict()
    config = olmo_hybrid.config_from_hf(hf)
    assert config.pattern_string == PATTERNS[case]
    attention_at = config.layers.index("attention")
    assert config.post_norm_sublayers == [attention_at, attention_at + 1]
    attention = config.layer_options[attention_at]
    assert (attention.qk_norm, attention.qk_norm_scope, attention.head_dim) == (
        True, "projection", 8,
    )  # fmt: skip
    deltanet = config.layer_options[0]
    assert (deltanet.head_k_dim, deltanet.head_v_dim, deltanet.norm_eps) == (8, 12, 1e-5)
    assert deltanet.allow_neg_eigval == hf["linear_allow_neg_eigval"]
    again = olmo_hybrid.config_from_hf(olmo_hybrid.config_to_hf(config))
    assert again.fingerprint() == config.fingerprint()
    assert again.post_norm_sublayers == config.post_norm_sublayers


def test_olmo_hybrid_config_defaults():
    """A config.json with only the model type reads as transformers' defaults: 32 layers, full
    attention every 4th, 30 heads of 128, Gated DeltaNet heads of 96 keys and 192 values."""
    config = olmo_hybrid.config_from_hf({"model_type": "olmo_hybrid"})
    assert config.pattern_string == "D-D-D-*-" * 8
    attention = config.layer_options[6]
    assert (attention.n_heads, attention.n_kv_heads, attention.head_dim) == (30, 30, 128)
    deltanet = config.layer_options[0]
    assert (deltanet.n_heads, deltanet.n_v_heads) == (30, 30)
    assert (deltanet.head_k_dim, deltanet.head_v_dim, deltanet.allow_neg_eigval) == (96, 192, True)


def test_olmo_hybrid_top_level_null_rope_theta_is_nope():
    """The released checkpoints' config.json says ``"rope_theta": null``: no RoPE, as
    transformers reads it."""
    from transformers import OlmoHybridConfig, OlmoHybridModel

    keys = {"model_type": "olmo_hybrid", "rope_theta": None, "num_hidden_layers": 4,
            "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64, "pad_token_id": 0,
            "eos_token_id": 1}  # fmt: skip
    assert OlmoHybridModel(OlmoHybridConfig.from_dict(keys)).rotary_emb is None
    config = olmo_hybrid.config_from_hf(keys)
    assert config.layer_options[6].position == "none"


# A model of ours that OLMo hybrid holds: D- *- D-.
ATTENTION = {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "qk_norm_scope": "projection",
             "qk_norm_eps": 1e-5, "rope_theta": 5000.0}  # fmt: skip
DELTANET = {"n_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 12, "d_conv": 4,
            "chunk_size": CHUNK, "norm_eps": 1e-5, "allow_neg_eigval": True}  # fmt: skip


def our_config(**changes) -> HybridConfig:
    values = dict(
        pattern="D-*-D-",
        vocab_size=64,
        d_model=32,
        norm_eps=1e-5,
        post_norm_sublayers=[2, 3],
        attention=ATTENTION,
        gated_deltanet=DELTANET,
        mlp={"hidden_size": 48},
    )
    return HybridConfig(**{**values, **changes})


def test_olmo_hybrid_from_our_model(tmp_path):
    """A model of ours written as OLMo hybrid: transformers computes our logits."""
    torch.manual_seed(0)
    ours = randomize(HybridLM(our_config()), seed=1).eval()
    to_hf(ours, tmp_path, "olmo_hybrid")
    theirs = OlmoHybridForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, ours(ids).logits) < 1e-4


def test_olmo_hybrid_from_our_nope_model(tmp_path):
    """NoPE is written as a null rope_theta, which transformers reads as NoPE."""
    attention = {**ATTENTION, "position": "none"}
    ours = randomize(HybridLM(our_config(attention=attention)), seed=2).eval()
    to_hf(ours, tmp_path, "olmo_hybrid")
    theirs = OlmoHybridForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.model.rotary_emb is None
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, ours(ids).logits) < 1e-4


def olmo_hybrid_dict(**overrides) -> dict:
    return {**olmo_hybrid_model().config.to_dict(), **overrides}


@pytest.mark.parametrize(
    "option, overrides",
    [
        ("hidden_act", {"hidden_act": "gelu"}),
        ("layer_types", {"layer_types": ["linear_attention", "sliding_attention"] * 2}),
        ("layer_types", {"layer_types": ["linear_attention", "full_attention"]}),  # too short
        ("layer_types", {"layer_types": ["linear_attention"] * 4}),  # no attention
        ("quantization_config", {"quantization_config": {"quant_method": "fp8"}}),
        ("rope_parameters['rope_type']", {"rope_parameters": {"rope_type": "dynamic",
                                                              "rope_theta": 1e4, "factor": 2}}),
    ],
)  # fmt: skip
def test_olmo_hybrid_unsupported_options(option, overrides):
    with pytest.raises(ValueError, match=re.escape(f"olmo_hybrid: config option {option}=")):
        olmo_hybrid.config_from_hf(olmo_hybrid_dict(**overrides))


@pytest.mark.parametrize(
    "change, option",
    [
        ({"pattern": "D-D-"}, "pattern"),
        ({"pattern": "D*-E"}, "pattern"),
        ({"post_norm_sublayers": []}, "post_norm_sublayers"),
        ({"post_norm_sublayers": [2]}, "post_norm_sublayers"),
        ({"attention": {**ATTENTION, "qk_norm": False}}, "attention.qk_norm"),
        ({"attention": {**ATTENTION, "qk_norm_scope": "head"}}, "attention.qk_norm_scope"),
        ({"attention": {**ATTENTION, "output_gate": True}}, "attention.output_gate"),
        ({"attention": {**ATTENTION, "window": 8}}, "attention.window"),
        ({"attention": {**ATTENTION, "position": "alibi"}}, "attention.position"),
        ({"attention": {**ATTENTION, "rope_fraction": 0.5}}, "attention.rope_fraction"),
        ({"attention": {**ATTENTION, "head_dim": 16}}, "attention.head_dim"),
        ({"attention": {**ATTENTION, "out_bias": True}}, "attention.out_bias"),
        ({"attention": {**ATTENTION, "qk_norm_eps": 1e-3}}, "attention.qk_norm_eps"),
        ({"attention": {**ATTENTION, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0,
                                                      "original_max_position_embeddings": 16}}},
         "attention.rope_scaling"),
        ({"gated_deltanet": {**DELTANET, "conv_bias": True}}, "gated_deltanet.conv_bias"),
        ({"gated_deltanet": {**DELTANET, "output_gate": False}}, "gated_deltanet.output_gate"),
        ({"gated_deltanet": {**DELTANET, "norm_eps": 1e-6}}, "gated_deltanet.norm_eps"),
        ({"mlp": {"activation": "gelu"}}, "mlp.activation"),
        ({"mlp": {"hidden_size": 48, "bias": True}}, "mlp.bias"),
        ({"layer_overrides": {0: {"head_k_dim": 4}}}, "different options"),
    ],
)  # fmt: skip
def test_olmo_hybrid_inexpressible(change, option):
    with pytest.raises(ValueError, match=f"olmo_hybrid: .*{re.escape(option)}"):
        olmo_hybrid.config_to_hf(our_config(**change))


@pytest.mark.parametrize(
    "model_type, config, option",
    [
        ("qwen3_next", {"pattern": "D-*-", "post_norm_sublayers": [2, 3]}, "post_norm_sublayers"),
        ("lfm2", {"pattern": "*-", "attention": {"n_heads": 4, "qk_norm": True,
                                                 "qk_norm_scope": "projection"}},
         "attention.qk_norm_scope"),
        ("qwen3_next", {"pattern": "D-*-", "gated_deltanet": {"allow_neg_eigval": True}},
         "gated_deltanet.allow_neg_eigval"),
    ],
)  # fmt: skip
def test_other_types_refuse_the_olmo_options(model_type, config, option, tmp_path):
    """Post-norms, whole-projection q / k norms and negative eigenvalues fail by name where a
    model type has none of them, instead of being dropped on the way out."""
    values = {"vocab_size": 64, "d_model": 32, "attention": {"n_heads": 4}, **config}
    model = HybridLM(HybridConfig(**values))
    with pytest.raises(ValueError, match=f"{model_type}: {re.escape(option)}=.* cannot be expr"):
        to_hf(model, tmp_path, model_type)


@pytest.mark.parametrize("model_type", sorted(CONVERTERS))
def test_every_config_to_hf_refuses_the_options_it_does_not_write(model_type):
    """Called on its own (not through ``to_hf``), a converter's ``config_to_hf`` still fails by
    name on an extended option it has no counterpart for."""
    module = converter(model_type)
    # every type but those with multipliers lacks logit_multiplier; those lack post-norms
    if "logit_multiplier" in module.EXPRESSES:
        option, config = "post_norm_sublayers", our_config(post_norm_sublayers=[2, 3])
    else:
        option, config = "logit_multiplier", our_config(logit_multiplier=2.0)
    with pytest.raises(ValueError, match=f"{model_type}: {option}=.* cannot be expressed"):
        module.config_to_hf(config)

"""LFM2 checkpoints: parity with transformers both ways, its config keys, and clear errors.

Each parity case builds a tiny transformers LFM2 with random weights in ranges where every
term matters (norm weights away from 1, conv biases away from 0), saves it, loads it with
``from_hf`` and runs :func:`tests.convert.parity.check_parity` (forward, cached decode, greedy
generation, ``to_hf`` back into transformers).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Lfm2Config, Lfm2ForCausalLM
from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

from hybrid import HybridConfig, HybridLM
from hybrid.convert import from_hf, to_hf
from hybrid.convert import lfm2 as lfm2_converter
from tests.convert.parity import check_parity, relative_error
from tests.hf_models import lfm2_config, random_model
from tests.hf_testing import randomize

LFM2_CASES = {
    # C-C-*-C-, GQA, head_dim 16, MLP width auto-adjusted to 96, tied
    "auto-ff-tied": {},
    "fixed-ff-untied-convbias-width4-mqa": dict(
        layer_types=["full_attention", "conv", "full_attention", "conv"],
        block_auto_adjust_ff_dim=False,
        intermediate_size=80,
        conv_L_cache=4,
        conv_bias=True,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    ),
    "yarn-attention-last-untied": dict(
        layer_types=["conv", "full_attention", "conv", "full_attention"],
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 5000.0,
            "original_max_position_embeddings": 8,
        },
        max_position_embeddings=64,  # yarn's original length 8: the test lengths pass it
        block_ffn_dim_multiplier=0.7,
        tie_word_embeddings=False,
    ),
}


@pytest.mark.parametrize("case", list(LFM2_CASES))
def test_lfm2_parity(case, tmp_path):
    model = random_model(Lfm2ForCausalLM, lfm2_config(**LFM2_CASES[case]), seed=1)
    check_parity(model, tmp_path)


def test_lfm2_layout(tmp_path):
    """Every option of the factory's config lands where it belongs in ours."""
    model = Lfm2ForCausalLM(lfm2_config())
    model.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).config
    assert ours.pattern_string == "C-C-*-C-"
    attention = ours.layer_options[4]
    assert (attention.n_heads, attention.n_kv_heads, attention.head_dim) == (4, 2, 16)
    assert attention.qk_norm and attention.qk_norm_eps == 1e-3 and ours.norm_eps == 1e-3
    assert attention.rope_theta == 5000.0 and attention.rope_scaling is None
    assert (ours.layer_options[0].d_conv, ours.layer_options[0].bias) == (3, False)
    assert ours.layer_options[1].hidden_size == model.model.layers[0].feed_forward.w1.out_features
    assert ours.layer_options[1].hidden_size == 96 and ours.tie_embeddings


@pytest.mark.parametrize(
    "intermediate, adjust, multiplier, multiple_of",
    [
        (100, True, 1.3, 16),
        (12288, True, 1.0, 256),  # Lfm2Config's defaults: 8192
        (96, True, 2, 10),  # an integer multiplier
        (7000, True, 0.75, 100),
        (80, False, 1.3, 16),  # not adjusted: the size as it is
        (100, True, None, 16),  # no multiplier: two thirds, not rounded
    ],
)
def test_effective_ff_dim_is_transformers(intermediate, adjust, multiplier, multiple_of):
    """The MLP width is the one transformers' Lfm2MLP builds (its own float arithmetic). A
    null multiplier, which the modeling code handles but 5.25's config validation refuses,
    is checked against the modeling code alone."""
    keys = dict(
        hidden_size=8,
        intermediate_size=intermediate,
        block_auto_adjust_ff_dim=adjust,
        block_ffn_dim_multiplier=multiplier,
        block_multiple_of=multiple_of,
    )
    with torch.device("meta"):
        theirs = Lfm2MLP(SimpleNamespace(**keys)).w1.out_features
        if multiplier is not None:
            assert Lfm2MLP(Lfm2Config(**keys)).w1.out_features == theirs
    assert lfm2_converter.ff_dim(keys) == theirs


@pytest.mark.parametrize("case", list(LFM2_CASES))
def test_config_round_trip(case):
    """config_to_hf(config_from_hf(hf)) keeps what shapes the model: the layout, sizes, norms,
    conv, RoPE and tying, with the effective MLP width written as is; transformers builds the
    same tensors from both, and reading it again gives the same model."""
    hf = lfm2_config(**LFM2_CASES[case])
    ours = lfm2_converter.config_from_hf(hf.to_dict())
    written = lfm2_converter.config_to_hf(ours)
    back = Lfm2Config(**written)
    for key in ("layer_types", "num_hidden_layers", "hidden_size", "vocab_size", "head_dim",
                "num_attention_heads", "num_key_value_heads", "norm_eps", "conv_L_cache",
                "conv_bias", "tie_word_embeddings", "rope_parameters"):  # fmt: skip
        assert getattr(back, key) == getattr(hf, key), key
    assert written["block_auto_adjust_ff_dim"] is False
    assert written["intermediate_size"] == lfm2_converter.ff_dim(hf.to_dict())
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Lfm2ForCausalLM(hf).state_dict().items()}
        assert {k: v.shape for k, v in Lfm2ForCausalLM(back).state_dict().items()} == shapes
    assert lfm2_converter.config_from_hf(written).fingerprint() == ours.fingerprint()


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.5},
        {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16},
    ],
)
def test_rope_scaling_round_trip(scaling):
    """Dynamic NTK scales from max_position_embeddings, so that is where its original length
    is written; other scalings keep theirs in rope_parameters."""
    config = tiny("C-*-", attention={"rope_theta": 777.0, "rope_scaling": scaling})
    written = lfm2_converter.config_to_hf(config)
    dynamic = scaling["rope_type"] == "dynamic"
    assert written["max_position_embeddings"] == (16 if dynamic else 131072)
    assert written["rope_parameters"]["rope_theta"] == 777.0
    assert lfm2_converter.config_from_hf(written).fingerprint() == config.fingerprint()


def test_older_config_keys(tmp_path):
    """``full_attn_idxs`` without ``layer_types``, ``block_ff_dim`` and ``tie_embedding`` (which
    win over ``intermediate_size`` / ``tie_word_embeddings``): read as transformers reads them."""
    config = lfm2_config(tie_word_embeddings=False)
    model = random_model(Lfm2ForCausalLM, config, seed=2)
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["layer_types"]
    hf |= {"full_attn_idxs": [2], "block_ff_dim": 100, "intermediate_size": 7,
           "tie_word_embeddings": True, "tie_embedding": False}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf))
    theirs = Lfm2ForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.layer_types == config.layer_types
    ours = from_hf(tmp_path)
    assert ours.config.pattern_string == "C-C-*-C-" and not ours.config.tie_embeddings
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, theirs(ids).logits) < 1e-4
        assert relative_error(ours(ids).logits, model(ids).logits) < 1e-4


def test_defaults_are_transformers():
    """A config.json that names nothing is Lfm2Config's defaults: every layer attention, tied,
    RoPE theta 1e6, the auto-adjusted MLP width."""
    ours = lfm2_converter.config_from_hf({"model_type": "lfm2"})
    theirs = Lfm2Config()
    assert ours.layers == ["attention", "mlp"] * theirs.num_hidden_layers
    assert (ours.vocab_size, ours.d_model) == (theirs.vocab_size, theirs.hidden_size)
    assert ours.tie_embeddings and ours.norm_eps == theirs.norm_eps
    attention = ours.layer_options[0]
    assert attention.rope_theta == theirs.rope_parameters["rope_theta"] == 1e6
    assert (attention.n_heads, attention.n_kv_heads) == (32, 8)
    with torch.device("meta"):
        width = Lfm2MLP(theirs).w1.out_features
    assert ours.layer_options[1].hidden_size == width
    assert ours.short_conv.d_conv == theirs.conv_L_cache


# ------------------------------------------------------------------------- our models to LFM2


def tiny(pattern, attention=None, **fields) -> HybridConfig:
    """A small config LFM2 can hold, ``attention`` options merged over LFM2's q / k norms."""
    attention = {"n_heads": 4, "qk_norm": True, "qk_norm_eps": 1e-5} | (attention or {})
    return HybridConfig(pattern, vocab_size=64, d_model=32, attention=attention, **fields)


@pytest.mark.parametrize("tied", [False, True])
def test_our_model_to_lfm2(tmp_path, tied):
    """A HybridLM of ours, written with to_hf, is loaded by Lfm2ForCausalLM with equal logits
    (and cached generation), and reads back as the same model."""
    config = tiny(
        "C-*-C-",
        attention={"n_heads": 4, "n_kv_heads": 2, "head_dim": 12, "rope_theta": 777.0,
                   "qk_norm_eps": 1e-4},
        short_conv={"d_conv": 4, "bias": True},
        mlp={"hidden_size": 40},
        norm_eps=1e-4,
        tie_embeddings=tied,
    )  # fmt: skip
    ours = randomize(HybridLM(config), seed=3)
    to_hf(ours, tmp_path, "lfm2")
    theirs = Lfm2ForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.layer_types == ["conv", "full_attention", "conv"]
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, theirs(ids).logits) < 1e-4
        expected = theirs.generate(
            ids[:1, :9], attention_mask=torch.ones_like(ids[:1, :9]), max_new_tokens=8,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    assert ours.generate(ids[:1, :9], 8).tolist() == expected.tolist()
    back = from_hf(tmp_path)
    assert back.config.fingerprint() == config.fingerprint()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def test_conv_only_model(tmp_path):
    """A model without attention: the attention keys are unused but valid. transformers 5.25
    runs such an LFM2 only with use_cache=False (its cache has no attention layer to ask for a
    length), so only the forward is compared."""
    ours = randomize(HybridLM(tiny("C-C-", attention={"n_heads": 2})), seed=4)
    to_hf(ours, tmp_path, "lfm2")
    theirs = Lfm2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, theirs(ids, use_cache=False).logits) < 1e-4
    assert from_hf(tmp_path).config.fingerprint() == ours.config.fingerprint()


# --------------------------------------------------------------------------------------- errors

LFM2_DICT = lfm2_config().to_dict()


@pytest.mark.parametrize(
    "change, option",
    [
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"layer_types": ["conv", "sliding_attention", "conv", "conv"]}, "layer_types"),
        ({"layer_types": ["conv", "conv", "full_attention"]}, "layer_types"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 5000.0}}, "rope_type"),
    ],
)
def test_unsupported_option_is_named(tmp_path, change, option):
    (tmp_path / "config.json").write_text(json.dumps({**LFM2_DICT, **change}))
    with pytest.raises(ValueError, match=rf"^lfm2: config option .*{option}[^\n]*$"):
        from_hf(tmp_path)


@pytest.mark.parametrize(
    "config, message",
    [
        (tiny("M-*-", mamba2={"headdim": 8}), "cannot express pattern 'M-\\*-'"),
        (tiny("C*-"), "cannot express pattern 'C\\*-'"),
        (tiny("C-*E"), "mixer \\(C or \\*\\) then an MLP"),
        (tiny("*-", attention={"qk_norm": False}), "attention.qk_norm=False"),
        (tiny("*-", attention={"qk_norm_eps": 1e-3}), "attention.qk_norm_eps=0.001"),
        (tiny("*-", attention={"window": 8}), "attention.window=8"),
        (tiny("*-", attention={"rope_fraction": 0.5}), "attention.rope_fraction=0.5"),
        (tiny("*-", attention={"position": "none"}), "attention.position='none'"),
        (tiny("*-", attention={"qkv_bias": True}), "attention.qkv_bias=True"),
        (tiny("*-", attention={"out_bias": True}), "attention.out_bias=True"),
        (tiny("*-", attention={"output_gate": True}), "attention.output_gate=True"),
        (tiny("*-", attention={"softmax_scale": 0.1}), "attention.softmax_scale=0.1"),
        (tiny("C-", mlp={"activation": "geglu"}), "mlp.activation='geglu'"),
        (tiny("C-", mlp={"bias": True}), "mlp.bias=True"),
        (tiny("C-C-", layer_overrides={2: {"d_conv": 4}}), "short_conv sublayers have different"),
        (tiny("C-", embedding_multiplier=2.0), "embedding_multiplier=2.0"),
        (tiny("C-", residual_multiplier=0.5), "residual_multiplier=0.5"),
        (tiny("C-", logit_multiplier=0.5), "logit_multiplier=0.5"),
    ],
)
def test_to_hf_of_an_incompatible_model(tmp_path, config, message):
    with pytest.raises(ValueError, match=message) as error:
        to_hf(HybridLM(config), tmp_path, "lfm2")
    assert "\n" not in str(error.value) and str(error.value).startswith("lfm2: ")
    assert not (tmp_path / "config.json").exists()


def test_weights_that_do_not_fit():
    config = lfm2_converter.config_from_hf(LFM2_DICT)
    state = lfm2_converter.weights_to_hf(HybridLM(config).state_dict(), config)
    name = "model.layers.2.self_attn.q_layernorm.weight"
    with pytest.raises(ValueError, match=rf"missing tensor '{name}'"):
        lfm2_converter.weights_from_hf({k: v for k, v in state.items() if k != name}, {}, config)
    extra = {**state, "model.layers.0.conv.in_proj.bias": torch.zeros(144)}
    with pytest.raises(ValueError, match=r"conv\.in_proj\.bias have no place"):
        lfm2_converter.weights_from_hf(extra, LFM2_DICT, config)


def test_tied_checkpoint_with_a_stored_head():
    """A tied checkpoint that still stores lm_head.weight loads (the copy is dropped)."""
    config = lfm2_converter.config_from_hf(LFM2_DICT)
    state = lfm2_converter.weights_to_hf(HybridLM(config).state_dict(), config)
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    assert "final_norm.weight" in lfm2_converter.weights_from_hf(state, LFM2_DICT, config)

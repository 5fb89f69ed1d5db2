"""Llama, Mamba2 and Bamba checkpoints: parity with transformers both ways, and clear errors.

Each parity case builds a tiny transformers model with random weights in ranges where every
term matters (norm weights away from 1, biases away from 0, varied A and dt), saves it, loads
it with ``from_hf`` and runs :func:`tests.convert.parity.check_parity` (forward, cached decode,
greedy generation, ``to_hf`` back into transformers). Mamba-2 chunk sizes are 8, so the lengths
13 and 21 cross chunk boundaries.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import BambaConfig, BambaForCausalLM, LlamaForCausalLM, Mamba2ForCausalLM

from hybrid import HybridConfig, HybridLM
from hybrid.convert import converter, from_hf, to_hf
from hybrid.convert import llama as llama_converter
from tests.convert.parity import check_parity, relative_error
from tests.hf_models import bamba_config, llama_config, mamba2_config, random_model
from tests.hf_testing import needs_torch_ssm_path

# ---------------------------------------------------------------------------------------- Llama

LLAMA_CASES = {
    "gqa-head_dim-untied": dict(num_key_value_heads=2, head_dim=16),
    "mha-bias-tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mqa-geglu-tied": dict(
        num_key_value_heads=1, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True
    ),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_parity(case, tmp_path):
    model = random_model(LlamaForCausalLM, llama_config(**LLAMA_CASES[case]), seed=1)
    check_parity(model, tmp_path)


ROPE_SCALINGS = {  # original length 8: the parity lengths 13 and 21 go past it
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 3.0, "beta_fast": 16.0,
                              "beta_slow": 2.0, "attention_factor": 1.3,
                              "original_max_position_embeddings": 8},
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROPE_SCALINGS))
def test_llama_rope_scaling_parity(case, tmp_path):
    """Llama 3.x-style RoPE scalings: forward, cached decode, greedy generation and to_hf
    equal transformers' (which computes the frequencies itself), and the scaling matters."""
    rope = {**ROPE_SCALINGS[case], "rope_theta": 500.0}
    model = random_model(
        LlamaForCausalLM, llama_config(rope_parameters=rope, max_position_embeddings=64), seed=2
    )
    check_parity(model, tmp_path)
    ours = from_hf(tmp_path / "hf")
    assert ours.config.layer_options[0].rope_scaling["rope_type"] == rope["rope_type"]
    plain = HybridLM(dataclasses.replace(ours.config, attention={
        **dataclasses.asdict(ours.config.attention), "rope_scaling": None}))  # fmt: skip
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(0, ours.config.vocab_size, (1, 21))
    with torch.no_grad():
        assert relative_error(plain(ids).logits, ours(ids).logits) > 1e-3


def test_llama_dynamic_rope_parity(tmp_path):
    """Dynamic NTK RoPE (frequencies from each call's length past max_position_embeddings=8):
    forward at lengths below and past it, cached prefill + decode against transformers' cached
    decode, greedy generation and to_hf, each against a freshly loaded transformers model
    (its module keeps the longest length seen, ours depends on the call only)."""
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}
    # No end-of-sequence id: transformers' min_new_tokens would forbid a greedy pick of it.
    config = llama_config(rope_parameters=rope, max_position_embeddings=8, eos_token_id=None)
    random_model(LlamaForCausalLM, config, seed=3).save_pretrained(tmp_path / "hf")

    def fresh():
        return LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()

    ours = from_hf(tmp_path / "hf")
    assert ours.config.layer_options[0].rope_scaling == {
        "rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}  # fmt: skip
    plain = HybridLM(dataclasses.replace(ours.config, attention={
        **dataclasses.asdict(ours.config.attention), "rope_scaling": None}))  # fmt: skip
    plain.load_state_dict(ours.state_dict())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for length in (6, 13, 21):
            ids = torch.randint(0, config.vocab_size, (2, length), generator=generator)
            assert relative_error(ours(ids).logits, fresh()(ids).logits) < 1e-4, length
            differs = relative_error(plain(ids).logits, ours(ids).logits) > 1e-3
            assert differs == (length > 8), length
        hf, split = fresh(), 6
        out = hf(ids[:, :split], use_cache=True)
        theirs, past = [out.logits], out.past_key_values
        for i in range(split, ids.shape[1]):
            out = hf(ids[:, i : i + 1], past_key_values=past, use_cache=True)
            theirs.append(out.logits)
        cache = ours.allocate_cache(2, ids.shape[1])
        mine = [ours(ids[:, :split], cache=cache).logits]
        mine += [ours(ids[:, i : i + 1], cache=cache).logits for i in range(split, ids.shape[1])]
        assert relative_error(torch.cat(mine, 1), torch.cat(theirs, 1)) < 1e-4
        prompt = ids[:1, :7]
        expected = fresh().generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    assert ours.generate(prompt, 8).tolist() == expected.tolist()
    to_hf(ours, tmp_path / "back", "llama")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    assert back.config.max_position_embeddings == 8
    assert back.config.rope_parameters["rope_type"] == "dynamic"
    with torch.no_grad():
        assert relative_error(back(ids).logits, fresh()(ids).logits) < 1e-4


def test_rope_scaling_errors_name_the_key():
    for scaling, message in [
        ({"rope_type": "longrope", "factor": 2.0}, "rope_scaling.rope_type: must be one of"),
        ({"rope_type": "dynamic", "factor": 2.0}, "original_max_position_embeddings: required"),
        (
            {"rope_type": "yarn", "factor": 0, "original_max_position_embeddings": 8},
            "rope_scaling.factor: must be a positive",
        ),
        ({"rope_type": "linear"}, "rope_scaling.factor: required by linear"),
        ({"rope_type": "linear", "factor": -1}, "rope_scaling.factor: must be a positive"),
        ({"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0}, "rope_scaling.low_freq"),
    ]:
        with pytest.raises(ValueError, match=message):
            HybridConfig("*", d_model=16, vocab_size=8, attention={"rope_scaling": scaling})


def test_llama_layout(tmp_path):
    model = LlamaForCausalLM(llama_config(num_key_value_heads=2, head_dim=16))
    model.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.config.pattern_string == "*-*-"
    attention = ours.config.layer_options[0]
    assert (attention.n_heads, attention.n_kv_heads, attention.head_dim) == (4, 2, 16)
    assert attention.rope_theta == 5000.0 and ours.config.norm_eps == 1e-3


# --------------------------------------------------------------------------------------- Mamba2

MAMBA2_CASES = {
    "groups2-untied": {},
    "groups4-bias-noconvbias-tied": dict(
        head_dim=4,
        expand=1,
        n_groups=4,
        use_bias=True,
        use_conv_bias=False,
        tie_word_embeddings=True,
    ),
}


@needs_torch_ssm_path
@pytest.mark.parametrize("case", list(MAMBA2_CASES))
def test_mamba2_parity(case, tmp_path):
    model = random_model(Mamba2ForCausalLM, mamba2_config(**MAMBA2_CASES[case]), seed=2)
    check_parity(model, tmp_path)


@needs_torch_ssm_path
def test_mamba2_time_step_limit(tmp_path):
    """A binding time_step_limit, through the forward and back (transformers' own one-token
    decode step ignores the limit, so only the forward is compared)."""
    config = mamba2_config(time_step_limit=(0.05, 0.2))
    model = random_model(Mamba2ForCausalLM, config, seed=3)
    model.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    assert ours.config.layer_options[0].dt_limit == (0.05, 0.2)
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, model(ids).logits) < 1e-4
    to_hf(ours, tmp_path / "back", "mamba2")
    back = Mamba2ForCausalLM.from_pretrained(tmp_path / "back")
    assert tuple(back.config.time_step_limit) == (0.05, 0.2)


# ---------------------------------------------------------------------------------------- Bamba

BAMBA_CASES = {
    "attn1-of-3-untied": dict(num_hidden_layers=3, attn_layer_indices=[1]),
    "attn0,3-of-4-bias-rotary0.25-tied": dict(
        num_hidden_layers=4,
        attn_layer_indices=[0, 3],
        attention_bias=True,
        mlp_bias=True,
        mamba_proj_bias=True,
        mamba_conv_bias=False,
        mamba_n_groups=4,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 3000.0,
            "partial_rotary_factor": 0.25,
        },
    ),
}


@needs_torch_ssm_path
@pytest.mark.parametrize("case", list(BAMBA_CASES))
def test_bamba_parity(case, tmp_path):
    model = random_model(BambaForCausalLM, bamba_config(**BAMBA_CASES[case]), seed=4)
    check_parity(model, tmp_path)


@needs_torch_ssm_path
def test_bamba_without_attention(tmp_path):
    """transformers 5.23 runs a Bamba without attention layers only with use_cache=False
    (its cache then has no attention layer to ask for a length), so only the forward is
    compared, before and after ``to_hf``."""
    config = bamba_config(attn_layer_indices=None)
    model = random_model(BambaForCausalLM, config, seed=5)
    model.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf")
    assert ours.config.pattern_string == "M-M-"
    to_hf(ours, tmp_path / "back", "bamba")
    back = BambaForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        assert relative_error(ours(ids).logits, expected) < 1e-4
        assert relative_error(back(ids, use_cache=False).logits, expected) < 1e-4


def test_bamba_layout(tmp_path):
    config = bamba_config(**BAMBA_CASES["attn1-of-3-untied"])
    BambaForCausalLM(config).save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.config.pattern_string == "M-*-M-"
    assert ours.config.layer_options[2].rope_fraction == 0.5
    # A config.json without partial_rotary_factor (older ones): Bamba's hardcoded 0.5.
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["rope_parameters"]["partial_rotary_factor"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert BambaConfig.from_pretrained(tmp_path).rope_parameters["partial_rotary_factor"] == 0.5
    assert from_hf(tmp_path).config.layer_options[2].rope_fraction == 0.5
    mamba = ours.config.layer_options[0]
    assert (mamba.headdim, mamba.ngroups, mamba.chunk_size) == (8, 2, 8)


# --------------------------------------------------------------------------------------- errors


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: .*bamba"):
        from_hf(tmp_path)


LLAMA_DICT = llama_config().to_dict()
MAMBA2_DICT = mamba2_config().to_dict()
BAMBA_DICT = bamba_config().to_dict()
YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5000.0}


@pytest.mark.parametrize(
    "model_type, base, change, option",
    [
        ("llama", LLAMA_DICT, {"rope_parameters": {**YARN, "rope_type": "longrope"}}, "rope_type"),
        ("llama", LLAMA_DICT, {"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_type"),
        ("llama", LLAMA_DICT, {"hidden_act": "gelu"}, "hidden_act"),
        ("llama", LLAMA_DICT, {"quantization_config": {"quant_method": "gptq"}}, "quantization"),
        ("mamba2", MAMBA2_DICT, {"hidden_act": "relu"}, "hidden_act"),
        ("mamba2", MAMBA2_DICT, {"quantization_config": {"quant_method": "awq"}}, "quantization"),
        ("bamba", BAMBA_DICT, {"rope_parameters": YARN}, "rope_type"),
        ("bamba", BAMBA_DICT, {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_option_is_named(tmp_path, model_type, base, change, option):
    (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
    with pytest.raises(ValueError, match=rf"{model_type}: config option .*{option}"):
        from_hf(tmp_path)


def test_inconsistent_mamba2_sizes():
    with pytest.raises(ValueError, match="heads 8 \\* head_dim 4 must equal expand 2"):
        converter("mamba2").config_from_hf({**MAMBA2_DICT, "head_dim": 4})


def test_weights_that_do_not_fit():
    config = llama_converter.config_from_hf(LLAMA_DICT)
    state = llama_converter.weights_to_hf(HybridLM(config).state_dict(), config)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(
        ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
    ):
        llama_converter.weights_from_hf(missing, LLAMA_DICT, config)
    extra = {**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(12)}
    with pytest.raises(ValueError, match=r"q_norm\.weight have no place"):
        llama_converter.weights_from_hf(extra, LLAMA_DICT, config)


def tiny(pattern, **fields) -> HybridLM:
    fields = {"vocab_size": 32, "d_model": 32, "mamba2": {"headdim": 8, "d_state": 8}} | fields
    return HybridLM(HybridConfig(pattern=pattern, **fields))


@pytest.mark.parametrize(
    "model_type, model, message",
    [
        ("llama", tiny("M-*-"), "cannot express pattern 'M-\\*-'"),
        ("llama", tiny("*-*"), "needs the pattern"),
        ("llama", tiny("*-", attention={"window": 8}), "attention.window=8"),
        ("llama", tiny("*-", attention={"rope_fraction": 0.5}), "rope_fraction=0.5"),
        ("llama", tiny("*-", mlp={"activation": "relu2"}), "mlp.activation='relu2'"),
        ("llama", tiny("*-*-", layer_overrides={2: {"rope_theta": 500.0}}), "differ"),
        ("mamba2", tiny("M-"), "cannot express pattern 'M-'"),
        ("mamba2", tiny("M", mamba2={"headdim": 8, "n_heads": 3}), "inner width 24"),
        ("mamba2", tiny("M", mamba2={"headdim": 8, "norm_eps": 1e-3}), "norm_eps"),
        ("bamba", tiny("MM"), "mixer \\(M or \\*\\) then an MLP"),
        ("bamba", tiny("M-*-", attention={"rope": False}), "attention.position='none'"),
        ("bamba", tiny("M-", mlp={"activation": "geglu"}), "mlp.activation='geglu'"),
        # options of ours that these types do not have fail by name, never silently dropped
        ("llama", tiny("*-", embedding_multiplier=2.0), "embedding_multiplier=2.0"),
        ("llama", tiny("*-", residual_multiplier=0.5), "residual_multiplier=0.5"),
        ("llama", tiny("*-", logit_multiplier=0.5), "logit_multiplier=0.5"),
        ("llama", tiny("*-", attention={"softmax_scale": 0.1}), "attention.softmax_scale=0.1"),
        ("llama", tiny("*-", attention={"qk_norm": True}), "attention.qk_norm=True"),
        ("llama", tiny("*-", attention={"output_gate": True}), "attention.output_gate=True"),
        ("mamba2", tiny("M", mamba2={"headdim": 8, "rmsnorm": False}), "mamba2.rmsnorm=False"),
        (
            "bamba",
            tiny("M-", mamba2={"headdim": 8, "norm_before_gate": True}),
            "mamba2.norm_before_gate=True",
        ),
    ],
)
def test_to_hf_of_an_incompatible_model(tmp_path, model_type, model, message):
    with pytest.raises(ValueError, match=message):
        to_hf(model, tmp_path, model_type)
    assert not (tmp_path / "config.json").exists()


def test_to_hf_round_trips_our_config(tmp_path):
    """Written, read back: the same resolved model (all families' options)."""
    model = tiny(
        "M-*-M-",
        attention={"n_heads": 4, "n_kv_heads": 2, "head_dim": 12, "rope_fraction": 0.5,
                   "rope_theta": 777.0, "qkv_bias": True, "out_bias": True},
        mamba2={"headdim": 8, "d_state": 8, "ngroups": 2, "chunk_size": 16, "bias": True,
                "dt_limit": (0.01, 5.0), "norm_eps": 1e-4},
        mlp={"hidden_size": 40, "bias": True},
        norm_eps=1e-4,
        tie_embeddings=True,
    )  # fmt: skip
    to_hf(model, tmp_path, "bamba")
    assert from_hf(tmp_path).config.fingerprint() == model.config.fingerprint()

"""Falcon-H1 checkpoints: attention and Mamba-2 side by side in each layer (our ``parallel``
sublayer), with every multiplier Falcon-H1 has; tiny random transformers models through
``from_hf`` and ``to_hf`` (tests/convert/parity.py), our own models written as falcon_h1, and
the options we cannot express failing with their names."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import FalconH1ForCausalLM

from hybrid import HybridConfig, HybridLM
from hybrid.convert import falcon_h1, from_hf, to_hf
from tests.convert.parity import check_parity, relative_error
from tests.hf_models import falcon_h1_config, random_model
from tests.hf_testing import needs_torch_ssm_path

CASES = {
    # every multiplier away from 1, gated norm before the gate, untied
    "multipliers": {},
    # Falcon-H1's defaults for the norm (none: y * silu(z)), tied embeddings, biases, MHA
    "no-norm-tied-biases": dict(
        mamba_rms_norm=False,
        tie_word_embeddings=True,
        num_key_value_heads=4,
        attention_bias=True,
        mlp_bias=True,
        mamba_proj_bias=True,
        projectors_bias=True,
        mamba_conv_bias=False,
    ),
    # the norm after the gate (Mamba-2's own order), one group, a time-step clamp
    "norm-after-gate": dict(
        mamba_norm_before_gate=False, mamba_n_groups=1, time_step_limit=(0.02, 3.0)
    ),
}


def falcon_model(seed: int = 0, **overrides) -> FalconH1ForCausalLM:
    model = random_model(FalconH1ForCausalLM, falcon_h1_config(**overrides), seed)
    model.model.embed_tokens.weight.data *= 0.3  # the embedding multiplier scales them up
    return model


@needs_torch_ssm_path
@pytest.mark.parametrize("case", list(CASES))
def test_falcon_h1_parity(case, tmp_path):
    check_parity(falcon_model(**CASES[case]), tmp_path)


def test_falcon_h1_layout():
    config = falcon_h1.config_from_hf(falcon_h1_config().to_dict())
    assert config.layers == ["parallel", "mlp"] * 3
    options = config.layer_options[0]
    assert [name for name, _ in options.mixers] == ["attention", "mamba2"]
    assert options.input_multipliers == [1.3, 0.9]
    assert options.output_multipliers == [0.7, 1.2]
    assert (config.embedding_multiplier, config.logit_multiplier) == (1.7, 0.6)
    mamba = options.mixers[1][1]
    assert (mamba.d_inner(32), mamba.rmsnorm, mamba.norm_before_gate) == (48, True, True)


def test_falcon_h1_folds_multipliers_exactly():
    """The folded weights are the multiplied projections, tensor by tensor."""
    hf = falcon_h1_config().to_dict()
    config = falcon_h1.config_from_hf(hf)
    source = falcon_model()
    ours = falcon_h1.weights_from_hf(dict(source.state_dict()), hf, config)
    layer = source.model.layers[1]
    k = ours["sublayers.2.block.mixers.0.k_proj.weight"]
    torch.testing.assert_close(k, layer.self_attn.k_proj.weight * 0.8)
    in_proj = ours["sublayers.2.block.mixers.1.in_proj.weight"]
    torch.testing.assert_close(
        in_proj, layer.mamba.in_proj.weight * layer.mamba.mup_vector[0, 0, :, None]
    )
    gate = ours["sublayers.3.block.ffn.gate_proj.weight"]
    torch.testing.assert_close(gate, layer.feed_forward.gate_proj.weight * 1.4)


def test_falcon_h1_from_our_model(tmp_path):
    """Our own parallel model written as falcon_h1: transformers computes the same logits."""
    config = HybridConfig(
        pattern=[
            {"block": "parallel", "mixers": ["attention", "mamba2"],
             "input_multipliers": [0.5, 2.0], "output_multipliers": [1.5, 0.25]},
            "mlp",
        ] * 2,
        vocab_size=48, d_model=32, norm_eps=1e-4,
        attention={"n_heads": 4, "n_kv_heads": 2, "rope_theta": 500.0},
        mamba2={"headdim": 8, "d_state": 8, "n_heads": 8, "chunk_size": 8, "norm_eps": 1e-4,
                "rmsnorm": False},
        mlp={"hidden_size": 40},
        embedding_multiplier=3.0, logit_multiplier=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = HybridLM(config).eval()
    to_hf(model, tmp_path, "falcon_h1")
    theirs = FalconH1ForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(0, 48, (2, 19))
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, model(ids).logits) < 1e-4
    assert from_hf(tmp_path).config.fingerprint() == config.fingerprint()


BASE = falcon_h1_config().to_dict()


@pytest.mark.parametrize(
    "change, option",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"projectors_bias": True}, "projectors_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
        ({"ssm_multipliers": [1.0, 2.0]}, "ssm_multipliers"),
        ({"mlp_multipliers": 2.0}, "mlp_multipliers"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization"),
    ],
)
def test_falcon_h1_unsupported_options(tmp_path, change, option):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **change}))
    with pytest.raises(ValueError, match=rf"falcon_h1: config option .*{option}"):
        from_hf(tmp_path)


def tiny(pattern, **fields) -> HybridLM:
    fields = {"vocab_size": 32, "d_model": 32, "mamba2": {"headdim": 8, "d_state": 8}} | fields
    return HybridLM(HybridConfig(pattern=pattern, **fields))


@pytest.mark.parametrize(
    "model, message",
    [
        (tiny("M-*-"), "cannot express pattern"),
        (tiny("[M*]-"), "cannot express pattern"),
        (tiny("[*M]"), "cannot express pattern"),
        (tiny("[*M]-", residual_multiplier=0.5), "residual_multiplier=0.5"),
        (tiny("[*M]-", attention={"window": 8}), "attention.window=8"),
        (tiny("[*M]-", attention={"qk_norm": True}), "attention.qk_norm=True"),
        (tiny("[*M]-", mlp={"activation": "geglu"}), "mlp.activation='geglu'"),
        (tiny("[*M]-", mamba2={"headdim": 8, "d_state": 8, "norm_eps": 1e-3}), "norm_eps"),
    ],
)
def test_falcon_h1_inexpressible(tmp_path, model, message):
    with pytest.raises(ValueError, match=message):
        to_hf(model, tmp_path, "falcon_h1")
    assert not (tmp_path / "config.json").exists()

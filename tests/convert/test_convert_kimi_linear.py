"""Kimi Linear checkpoints: tiny random transformers models through ``from_hf`` and ``to_hf``
(tests/convert/parity.py), the original checkpoints' config keys, transformers' in-memory
names, our own model written as Kimi Linear, and the options we cannot express failing with
their names.

transformers runs its plain-PyTorch KDA here (fla is not installed; its chunk is 64), ours
chunks of :data:`~tests.hf_models.CHUNK` (8), so the test lengths 13 and 21 cross our chunks and
the two chunkings differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import KimiLinearConfig, KimiLinearForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from hybrid import HybridConfig, HybridLM
from hybrid.convert import kimi_linear, to_hf
from tests.convert.parity import check_parity, relative_error
from tests.hf_models import CHUNK, kimi_linear_config, random_model
from tests.hf_testing import randomize


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Our KDA in chunks of 8 (Kimi Linear configs have no chunk key)."""
    monkeypatch.setattr(kimi_linear, "CHUNK_SIZE", CHUNK)


def kimi_model(seed: int = 0, **overrides) -> KimiLinearForCausalLM:
    return random_model(KimiLinearForCausalLM, kimi_linear_config(**overrides), seed)


CASES = {
    # K- LE KE L-: full-rank queries, unnormalised top-2 of one eligible group of two, scaled
    "full-rank-query": {},
    # a low-rank query (q_a_proj, its norm, q_b_proj), biases on q_a / kv_a / o, normalised
    # top-2 of four experts in one group, one shared expert, tie_word_embeddings (which
    # transformers ignores for Kimi Linear: we read the head as it does)
    "low-rank-query-bias-normalised-tied": dict(
        q_lora_rank=12,
        attention_bias=True,
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
        tie_word_embeddings=True,
    ),
}
PATTERN = "K-LEKEL-"


@pytest.mark.parametrize("case", list(CASES))
def test_kimi_linear_parity(case, tmp_path):
    check_parity(kimi_model(**CASES[case]), tmp_path)


def test_kimi_linear_checkpoint_names(tmp_path):
    """save_pretrained writes the original checkpoints' names, which we read and write."""
    kimi_model().save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_conv1d.weight" in names
    assert "model.layers.0.self_attn.A_log" in names
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.1.block_sparse_moe.gate.e_score_correction_bias" in names


@pytest.mark.parametrize("case", list(CASES))
def test_kimi_linear_config_round_trip(case):
    hf = kimi_model(**CASES[case]).config.to_dict()
    config = kimi_linear.config_from_hf(hf)
    assert config.pattern_string == PATTERN
    kda = config.layer_options[0]
    assert (kda.n_heads, kda.head_k_dim, kda.decay_rank, kda.d_conv) == (2, 8, 8, 3)
    latent = config.layer_options[2]
    assert (latent.q_lora_rank, latent.kv_lora_rank, latent.v_head_dim, latent.position) == (
        hf["q_lora_rank"], 16, 12, "none",
    )  # fmt: skip
    moe = config.layer_options[3]
    assert (moe.router, moe.score_correction_bias, moe.routed_scaling) == ("sigmoid", True, 2.5)
    assert moe.shared_hidden_size == 12 * hf["num_shared_experts"]
    again = kimi_linear.config_from_hf(kimi_linear.config_to_hf(config))
    assert again.fingerprint() == config.fingerprint()


def test_kimi_linear_original_config_keys():
    """The released checkpoints' config.json: linear attention keys in ``linear_attn_config``
    (1-indexed layer lists), ``first_k_dense_replace``, no layer-type lists; read as
    transformers reads them."""
    keys = {
        "num_hidden_layers": 4, "first_k_dense_replace": 2,
        "linear_attn_config": {"head_dim": 16, "num_heads": 4, "short_conv_kernel_size": 3,
                               "full_attn_layers": [2, 4], "kda_layers": [1, 3]},
        "num_experts": 8, "num_experts_per_token": 3, "moe_renormalize": False,
    }  # fmt: skip
    config = kimi_linear.config_from_hf({"model_type": "kimi_linear", **keys})
    theirs = KimiLinearConfig(**keys)
    assert config.pattern_string == "K-L-KELE"
    assert theirs.layer_types == ["linear_attention", "full_attention"] * 2
    assert theirs.mlp_layer_types == ["dense", "dense", "sparse", "sparse"]
    kda, moe = config.layer_options[0], config.layer_options[5]
    assert (kda.n_heads, kda.head_k_dim, kda.d_conv) == (
        theirs.linear_num_heads, theirs.linear_head_dim, theirs.linear_conv_kernel_dim,
    ) == (4, 16, 3)  # fmt: skip
    assert (moe.n_experts, moe.top_k, moe.normalize_top_k) == (
        theirs.num_local_experts, theirs.num_experts_per_tok, theirs.norm_topk_prob,
    ) == (8, 3, False)  # fmt: skip


def test_kimi_linear_config_defaults():
    """A config.json with only the model type reads as transformers' defaults: 27 layers, full
    attention at layers 4, 8, ..., 24, the first MLP dense, 256 experts of which 8 routed."""
    config = kimi_linear.config_from_hf({"model_type": "kimi_linear"})
    theirs = KimiLinearConfig()
    symbols = {"linear_attention": "K", "full_attention": "L", "dense": "-", "sparse": "E"}
    expected = "".join(
        symbols[m] + symbols[f]
        for m, f in zip(theirs.layer_types, theirs.mlp_layer_types, strict=True)
    )
    assert config.pattern_string == expected and expected.startswith("K-KEKEKELE")
    moe = config.layer_options[3]
    assert (moe.n_experts, moe.top_k, moe.routed_scaling) == (256, 8, 2.446)
    latent = config.layer_options[8]
    assert (latent.n_heads, latent.kv_lora_rank, latent.qk_rope_head_dim) == (32, 512, 64)


def test_kimi_linear_in_memory_module_state():
    """transformers' in-memory names (forget_gate, one conv1d, packed experts, 4-d A_log)
    load as well."""
    hf_model = kimi_model(tie_word_embeddings=True)
    hf = hf_model.config.to_dict()
    config = kimi_linear.config_from_hf(hf)
    state = hf_model.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    assert "model.layers.0.self_attn.forget_gate.A_log" in state
    ours = HybridLM(config).eval()
    weights = kimi_linear.weights_from_hf(state, hf, config)
    missing, unexpected = ours.load_state_dict(weights, strict=False)
    assert (missing, unexpected) == ([], [])  # tie_word_embeddings does not tie them here
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert relative_error(ours(ids).logits, hf_model.eval()(ids).logits) < 1e-4


# A model of ours that Kimi Linear holds: K- LE K-, low-rank queries.
KDA = {"n_heads": 2, "head_k_dim": 8, "d_conv": 4, "chunk_size": CHUNK, "norm_eps": 1e-5}
LATENT = {"n_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 24, "qk_nope_head_dim": 8,
          "qk_rope_head_dim": 8, "v_head_dim": 8, "position": "none"}  # fmt: skip
MOE = {"n_experts": 4, "top_k": 2, "expert_hidden_size": 24, "n_shared_experts": 1,
       "router": "sigmoid", "score_correction_bias": True, "routed_scaling": 1.5}  # fmt: skip


def our_config(**changes) -> HybridConfig:
    values = dict(
        pattern="K-LEK-",
        vocab_size=64,
        d_model=32,
        norm_eps=1e-5,
        kda=KDA,
        latent_attention=LATENT,
        mlp={"hidden_size": 48},
        moe=MOE,
    )
    return HybridConfig(**{**values, **changes})


@pytest.mark.parametrize("tied", [False, True])
def test_kimi_linear_from_our_model(tied, tmp_path):
    """A model of ours written as Kimi Linear: transformers computes our logits (a tied head
    is written as a copy of the embedding, which transformers never ties)."""
    torch.manual_seed(0)
    ours = randomize(HybridLM(our_config(tie_embeddings=tied)), seed=1).eval()
    to_hf(ours, tmp_path, "kimi_linear")
    theirs = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert theirs.config.mlp_layer_types == ["dense", "sparse", "dense"]
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, ours(ids).logits) < 1e-4


def kimi_dict(**overrides) -> dict:
    return {**kimi_model().config.to_dict(), **overrides}


@pytest.mark.parametrize(
    "option, overrides",
    [
        ("hidden_act", {"hidden_act": "gelu"}),
        ("num_key_value_heads", {"num_key_value_heads": 1}),
        ("layer_types", {"layer_types": ["linear_attention", "sliding_attention"] * 2}),
        ("layer_types", {"layer_types": ["linear_attention", "full_attention"]}),  # too short
        ("mlp_layer_types", {"mlp_layer_types": ["dense", "moe", "dense", "dense"]}),
        ("mlp_layer_types", {"mlp_layer_types": ["dense"]}),
        ("n_shared_experts", {"num_shared_experts": 0}),
        ("linear_attn_config.kda_layers",
         {"layer_types": None, "linear_attn_config": {"full_attn_layers": [1, 2, 3],
                                                      "kda_layers": [0]}}),
        ("quantization_config", {"quantization_config": {"quant_method": "fp8"}}),
    ],
)  # fmt: skip
def test_kimi_linear_unsupported_options(option, overrides):
    with pytest.raises(ValueError, match=re.escape(f"kimi_linear: config option {option}=")):
        kimi_linear.config_from_hf(kimi_dict(**overrides))


@pytest.mark.parametrize(
    "change, option",
    [
        ({"pattern": "M-K-"}, "pattern"),
        ({"pattern": "K*-E"}, "pattern"),
        ({"kda": {**KDA, "allow_neg_eigval": True}}, "kda.allow_neg_eigval"),
        ({"kda": {**KDA, "decay_rank": 3}}, "kda.decay_rank"),
        ({"kda": {**KDA, "n_v_heads": 4}}, "kda.n_v_heads"),
        ({"kda": {**KDA, "norm_eps": 1e-6}}, "kda.norm_eps"),
        ({"latent_attention": {**LATENT, "position": "rope"}}, "latent_attention.position"),
        ({"latent_attention": {**LATENT, "window": 4}}, "latent_attention.window"),
        ({"mlp": {"hidden_size": 48, "activation": "gelu"}}, "mlp.activation"),
        ({"moe": {**MOE, "router": "softmax"}}, "moe.router"),
        ({"moe": {**MOE, "n_shared_experts": 0}}, "moe.n_shared_experts"),
        ({"moe": {**MOE, "shared_hidden_size": 30}}, "moe.shared_hidden_size"),
    ],
)
def test_kimi_linear_inexpressible(change, option):
    with pytest.raises(ValueError, match=f"kimi_linear: .*{re.escape(option)}"):
        kimi_linear.config_to_hf(our_config(**change))

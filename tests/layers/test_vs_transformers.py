"""Our blocks against the layers of transformers' Llama, Mamba2, Bamba, Jamba and NemotronH.

Each case builds the transformers module from a tiny config with random weights (no download),
builds our block from the matching ``HybridConfig`` options, copies the weights across with an
explicit name mapping (``load_state_dict(strict=True)``, so every weight of ours is covered) and
compares the outputs on odd sequence lengths, one of which crosses the Mamba-2 chunk size (8 on
both sides). The comparisons run in float32 (transformers upcasts norms, softmaxes, routers and
scans to float32 internally), the plain MLPs in float64. Norm epsilons and other options are set
away from both libraries' defaults, so an option that is not passed through fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers.models.bamba import modeling_bamba
from transformers.models.jamba import modeling_jamba
from transformers.models.llama import modeling_llama
from transformers.models.mamba2 import modeling_mamba2
from transformers.models.nemotron_h import modeling_nemotron_h

from hybrid import HybridConfig, HybridLM
from layers.registry import get_block
from tests.hf_models import (
    CHUNK,
    bamba_config,
    jamba_config,
    llama_config,
    mamba2_config,
    nemotron_h_config,
)
from tests.hf_testing import needs_torch_ssm_path, randomize

LENGTHS = (13, 21)  # odd; 21 crosses the chunk size 8 twice and leaves a partial chunk
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32; observed differences are below 1.1e-6
TOL64 = {"rtol": 1e-12, "atol": 1e-12}  # float64, where transformers does not upcast to float32


def our_block(family: str, d_model: int, **options):
    """Our block of ``family`` built from a one-sublayer HybridConfig."""
    config = HybridConfig(pattern=[family], vocab_size=16, d_model=d_model, **{family: options})
    block = get_block(family).block_class(d_model, config.layer_options[0], 0)
    return block.eval()


def load(ours: torch.nn.Module, theirs: torch.nn.Module, mapping: dict) -> None:
    """Copy ``theirs[mapping[name]]`` into ``ours[name]``; every tensor of ours must be named.

    A mapping value is a tensor name of ``theirs``, or ``(name, rows)`` to take ``[:, rows]`` of
    a packed expert tensor.
    """
    source = dict(theirs.named_parameters()) | dict(theirs.named_buffers())
    state = {}
    for name, their in mapping.items():
        value = source[their] if isinstance(their, str) else source[their[0]][:, their[1]]
        state[name] = value.detach().clone()
    ours.load_state_dict(state)  # strict: missing or unexpected names fail


def causal_mask(length: int) -> torch.Tensor:
    """Additive (1, 1, L, L) causal mask, as eager attention takes it."""
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def attention_kwargs(config, implementation: str, length: int) -> dict:
    config._attn_implementation = implementation
    # eager needs the mask; sdpa with no mask runs is_causal=True
    return {"attention_mask": causal_mask(length) if implementation == "eager" else None}


def rope_embeddings(rotary: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(x.shape[1])[None]
    return rotary(x, positions)


def inputs(d_model: int, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, length, d_model, generator=torch.Generator().manual_seed(0)).to(dtype)


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def proj_mapping(names, prefix_ours="", prefix_theirs="", bias=False) -> dict[str, str]:
    keys = ["weight", "bias"] if bias else ["weight"]
    return {f"{prefix_ours}{n}.{k}": f"{prefix_theirs}{n}.{k}" for n in names for k in keys}


# --------------------------------------------------------------------------------------- Llama

# GQA and a head_dim of its own (!= hidden_size / heads)
LLAMA = dict(num_key_value_heads=2, head_dim=16)
LLAMA_ATTENTION = dict(n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=5000.0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("length", LENGTHS)
def test_llama_attention(length, bias, implementation):
    config = llama_config(**LLAMA, attention_bias=bias)
    theirs = modeling_llama.LlamaAttention(config, layer_idx=0).eval()
    randomize(theirs, seed=1)
    ours = our_block("attention", 48, **LLAMA_ATTENTION, qkv_bias=bias, out_bias=bias)
    load(ours, theirs, proj_mapping(ATTN, bias=bias))

    x = inputs(48, length)
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    kwargs = attention_kwargs(config, implementation, length)
    expected, _ = theirs(x, position_embeddings=rope_embeddings(rotary, x), **kwargs)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_llama_mlp():
    config = llama_config(**LLAMA)
    theirs = modeling_llama.LlamaMLP(config).eval()
    randomize(theirs, seed=2)
    ours = our_block("mlp", 48, hidden_size=80, activation="swiglu")
    load(ours, theirs, proj_mapping(["gate_proj", "up_proj", "down_proj"], "ffn."))
    theirs, ours = theirs.double(), ours.double()
    x = inputs(48, 13, torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL64)


@pytest.mark.parametrize("length", LENGTHS)
def test_llama_decoder_layer(length):
    """A whole LlamaDecoderLayer is our two pre-norm residual sublayers ``*-``."""
    config = llama_config(**LLAMA)
    theirs = modeling_llama.LlamaDecoderLayer(config, layer_idx=0).eval()
    randomize(theirs, seed=3)
    model = HybridLM(
        HybridConfig(
            pattern="*-",
            vocab_size=16,
            d_model=48,
            attention=LLAMA_ATTENTION,
            mlp={"hidden_size": 80},
            norm_eps=1e-3,
        )
    ).eval()
    mapping = {
        "0.norm.weight": "input_layernorm.weight",
        "1.norm.weight": "post_attention_layernorm.weight",
        **proj_mapping(ATTN, "0.block.", "self_attn."),
        **proj_mapping(["gate_proj", "up_proj", "down_proj"], "1.block.ffn.", "mlp."),
    }
    load(model.sublayers, theirs, mapping)

    x = inputs(48, length)
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    kwargs = attention_kwargs(config, "eager", length)
    expected = theirs(x, position_embeddings=rope_embeddings(rotary, x), **kwargs)
    out = x
    for sublayer in model.sublayers:
        out, _ = sublayer(out)
    torch.testing.assert_close(out, expected, **TOL)


# -------------------------------------------------------------------------------------- Mamba-2

MAMBA2_WEIGHTS = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight"]
MAMBA2_WEIGHTS += ["out_proj.weight"]


def mamba2_mapping(conv_bias: bool, bias: bool, prefix_ours="", prefix_theirs="") -> dict:
    names = MAMBA2_WEIGHTS + ["conv1d.bias"] * conv_bias + ["in_proj.bias", "out_proj.bias"] * bias
    return {prefix_ours + n: prefix_theirs + n for n in names}


@needs_torch_ssm_path
@pytest.mark.parametrize(
    "ngroups, conv_bias, bias, dt_limit",
    [(1, True, False, (0.0, math.inf)), (4, False, True, (0.05, 0.2))],
)
@pytest.mark.parametrize("length", LENGTHS)
def test_mamba2_mixer(length, ngroups, conv_bias, bias, dt_limit):
    config = mamba2_config(
        n_groups=ngroups, use_conv_bias=conv_bias, use_bias=bias, time_step_limit=dt_limit
    )
    theirs = modeling_mamba2.Mamba2Mixer(config, layer_idx=0).eval()
    randomize(theirs, seed=4)
    ours = our_block(
        "mamba2",
        32,
        d_state=16,
        headdim=8,
        expand=2,
        ngroups=ngroups,
        d_conv=4,
        chunk_size=CHUNK,
        conv_bias=conv_bias,
        bias=bias,
        norm_eps=1e-3,
        dt_limit=dt_limit,
    )
    load(ours, theirs, mamba2_mapping(conv_bias, bias))
    x = inputs(32, length)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


# ---------------------------------------------------------------------------------------- Bamba


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("length", LENGTHS)
def test_bamba_attention(length, implementation):
    """Bamba rotates half of each head's channels (partial_rotary_factor 0.5)."""
    config = bamba_config()
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    theirs = modeling_bamba.BambaAttention(config, layer_idx=1).eval()
    randomize(theirs, seed=5)
    ours = our_block("attention", 64, n_heads=4, n_kv_heads=2, rope_theta=3000.0, rope_fraction=0.5)
    load(ours, theirs, proj_mapping(ATTN))

    x = inputs(64, length)
    rotary = modeling_bamba.BambaRotaryEmbedding(config)
    kwargs = attention_kwargs(config, implementation, length)
    expected, _ = theirs(x, position_embeddings=rope_embeddings(rotary, x), **kwargs)
    torch.testing.assert_close(ours(x), expected, **TOL)


@needs_torch_ssm_path
@pytest.mark.parametrize("length", LENGTHS)
def test_bamba_mixer(length):
    config = bamba_config()
    theirs = modeling_bamba.BambaMixer(config, layer_idx=0).eval()
    randomize(theirs, seed=6)
    assert theirs.head_dim == 8  # "auto": expand * hidden / n_heads
    ours = our_block(
        "mamba2",
        64,
        d_state=16,
        headdim=8,
        expand=2,
        ngroups=2,
        d_conv=4,
        chunk_size=CHUNK,
        norm_eps=1e-3,
    )
    load(ours, theirs, mamba2_mapping(conv_bias=True, bias=False))
    x = inputs(64, length)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


# ---------------------------------------------------------------------------------------- Jamba


JAMBA_MAMBA1 = dict(d_state=8, expand=2, dt_rank=6, d_conv=4, inner_norms=True, norm_eps=1e-3)


def jamba_mamba_mapping(conv_bias, proj_bias, prefix_ours="", prefix_theirs="") -> dict:
    names = ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight"]
    names += ["dt_proj.bias", "A_log", "D", "out_proj.weight"]
    names += ["conv1d.bias"] * conv_bias + ["in_proj.bias", "out_proj.bias"] * proj_bias
    mapping = {prefix_ours + n: prefix_theirs + n for n in names}
    for ours_norm, their_norm in [("dt_norm", "dt_layernorm"), ("b_norm", "b_layernorm"),
                                  ("c_norm", "c_layernorm")]:  # fmt: skip
        mapping[f"{prefix_ours}{ours_norm}.weight"] = f"{prefix_theirs}{their_norm}.weight"
    return mapping


@needs_torch_ssm_path
@pytest.mark.parametrize("conv_bias, proj_bias", [(True, False), (False, True)])
@pytest.mark.parametrize("length", LENGTHS)
def test_jamba_mamba_mixer(length, conv_bias, proj_bias):
    """JambaMambaMixer's sequential CPU scan, with its RMSNorms on dt, B and C."""
    config = jamba_config(mamba_conv_bias=conv_bias, mamba_proj_bias=proj_bias)
    theirs = modeling_jamba.JambaMambaMixer(config, layer_idx=0).eval()
    randomize(theirs, seed=7)
    ours = our_block("mamba1", 32, **JAMBA_MAMBA1, conv_bias=conv_bias, bias=proj_bias)
    load(ours, theirs, jamba_mamba_mapping(conv_bias, proj_bias))
    x = inputs(32, length)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


JAMBA_MOE = dict(
    n_experts=4, top_k=2, expert_hidden_size=48, router="softmax", normalize_top_k=False
)


def jamba_moe_mapping(prefix_ours="", prefix_theirs="") -> dict:
    # gate_up_proj is (n_experts, 2 * hidden, d_model): the gate's rows, then the up's
    hidden = JAMBA_MOE["expert_hidden_size"]
    gate_up = f"{prefix_theirs}experts.gate_up_proj"
    return {
        f"{prefix_ours}router.weight": f"{prefix_theirs}router.weight",
        f"{prefix_ours}experts.gate_proj": (gate_up, slice(None, hidden)),
        f"{prefix_ours}experts.up_proj": (gate_up, slice(hidden, None)),
        f"{prefix_ours}experts.down_proj": f"{prefix_theirs}experts.down_proj",
    }


@pytest.mark.parametrize("length", LENGTHS)
def test_jamba_sparse_moe(length):
    """Softmax over all experts, top-2, weights left unnormalised."""
    config = jamba_config()
    theirs = modeling_jamba.JambaSparseMoeBlock(config).eval()
    randomize(theirs, seed=8)
    ours = our_block("moe", 32, **JAMBA_MOE)
    load(ours, theirs, jamba_moe_mapping())
    x = inputs(32, length)
    torch.testing.assert_close(ours(x).hidden, theirs(x), **TOL)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("length", LENGTHS)
def test_jamba_attention(length, implementation):
    """Jamba's attention has no positional encoding."""
    config = jamba_config()
    theirs = modeling_jamba.JambaAttention(config, layer_idx=1).eval()
    randomize(theirs, seed=9)
    ours = our_block("attention", 32, n_heads=4, n_kv_heads=2, rope=False)
    load(ours, theirs, proj_mapping(ATTN))
    x = inputs(32, length)
    expected, _ = theirs(x, **attention_kwargs(config, implementation, length))
    torch.testing.assert_close(ours(x), expected, **TOL)


@needs_torch_ssm_path
@pytest.mark.parametrize("length", LENGTHS)
def test_jamba_mamba_decoder_layer(length):
    """A JambaMambaDecoderLayer with an MoE feed-forward is our sublayers ``SE``."""
    config = jamba_config()
    theirs = modeling_jamba.JambaMambaDecoderLayer(config, layer_idx=0).eval()
    assert isinstance(theirs.feed_forward, modeling_jamba.JambaSparseMoeBlock)
    randomize(theirs, seed=10)
    model = HybridLM(
        HybridConfig(
            pattern="SE",
            vocab_size=16,
            d_model=32,
            mamba1=JAMBA_MAMBA1,
            moe=JAMBA_MOE,
            norm_eps=1e-3,
        )
    ).eval()
    mapping = {
        "0.norm.weight": "input_layernorm.weight",
        "1.norm.weight": "pre_ff_layernorm.weight",
        **jamba_mamba_mapping(True, False, "0.block.", "mamba."),
        **jamba_moe_mapping("1.block.", "feed_forward."),
    }
    load(model.sublayers, theirs, mapping)
    x = inputs(32, length)
    out = x
    for sublayer in model.sublayers:
        out, _ = sublayer(out)
    torch.testing.assert_close(out, theirs(x), **TOL)


# ------------------------------------------------------------------------------------ NemotronH


def nemotron_config(norm_topk_prob: bool = True):
    """M * - E: the layer indices the tests build each block at; biases in the Mamba-2 mixer."""
    return nemotron_h_config(
        layers_block_type=["linear_attention", "full_attention", "mlp", "moe"],
        use_bias=True,
        norm_topk_prob=norm_topk_prob,
    )


NEMOTRON_MAMBA2 = dict(
    d_state=16,
    headdim=8,
    n_heads=6,
    ngroups=2,
    d_conv=4,
    chunk_size=CHUNK,
    bias=True,
    norm_eps=1e-3,
    dt_limit=(0.05, math.inf),
)


@needs_torch_ssm_path
@pytest.mark.parametrize("length", LENGTHS)
def test_nemotron_h_mamba2_mixer(length):
    config = nemotron_config()
    theirs = modeling_nemotron_h.NemotronHMamba2Mixer(config, layer_idx=0).eval()
    assert theirs.time_step_limit == (0.05, math.inf)
    randomize(theirs, seed=11)
    ours = our_block("mamba2", 32, **NEMOTRON_MAMBA2)
    load(ours, theirs, mamba2_mapping(conv_bias=True, bias=True))
    x = inputs(32, length)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


@needs_torch_ssm_path
@pytest.mark.parametrize("length", LENGTHS)
def test_nemotron_h_mamba_block(length):
    """A whole NemotronHBlock (norm, mixer, residual) is our pre-norm sublayer ``M``."""
    config = nemotron_config()
    theirs = modeling_nemotron_h.NemotronHBlock(config, layer_idx=0).eval()
    randomize(theirs, seed=12)
    model = HybridLM(
        HybridConfig(pattern="M", vocab_size=16, d_model=32, mamba2=NEMOTRON_MAMBA2, norm_eps=1e-3)
    ).eval()
    mapping = {"0.norm.weight": "norm.weight"}
    mapping |= mamba2_mapping(True, True, "0.block.", "mixer.")
    load(model.sublayers, theirs, mapping)
    x = inputs(32, length)
    torch.testing.assert_close(model.sublayers[0](x)[0], theirs(x), **TOL)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("length", LENGTHS)
def test_nemotron_h_attention(length, implementation):
    """Nemotron-H attention has no positional encoding and a head_dim of its own."""
    config = nemotron_config()
    theirs = modeling_nemotron_h.NemotronHAttention(config, layer_idx=1).eval()
    randomize(theirs, seed=13)
    ours = our_block("attention", 32, n_heads=4, n_kv_heads=2, head_dim=12, rope=False)
    load(ours, theirs, proj_mapping(ATTN))
    x = inputs(32, length)
    expected, _ = theirs(x, **attention_kwargs(config, implementation, length))
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_nemotron_h_mlp():
    config = nemotron_config()
    theirs = modeling_nemotron_h.NemotronHMLP(config, layer_idx=2).eval()
    randomize(theirs, seed=14)
    ours = our_block("mlp", 32, hidden_size=48, activation="relu2")
    load(ours, theirs, proj_mapping(["up_proj", "down_proj"], "ffn."))
    theirs, ours = theirs.double(), ours.double()
    x = inputs(32, 13, torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL64)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("length", LENGTHS)
def test_nemotron_h_moe(length, norm_topk_prob):
    """Sigmoid router with correction bias and group-limited choice, shared relu2 expert."""
    config = nemotron_config(norm_topk_prob)
    theirs = modeling_nemotron_h.NemotronHMoE(config, layer_idx=3).eval()
    randomize(theirs, seed=15)
    ours = our_block(
        "moe",
        32,
        n_experts=8,
        top_k=2,
        expert_hidden_size=24,
        activation="relu2",
        n_shared_experts=1,
        shared_hidden_size=40,
        router="sigmoid",
        normalize_top_k=norm_topk_prob,
        routed_scaling=2.5,
        score_correction_bias=True,
        n_groups=4,
        topk_groups=2,
    )
    mapping = {
        "router.weight": "gate.weight",
        "score_bias": "gate.e_score_correction_bias",
        "experts.up_proj": "experts.up_proj",
        "experts.down_proj": "experts.down_proj",
        **proj_mapping(["up_proj", "down_proj"], "shared.", "shared_experts."),
    }
    load(ours, theirs, mapping)
    x = inputs(32, length)
    torch.testing.assert_close(ours(x).hidden, theirs(x), **TOL)


# ----------------------------------------------------------------------------------- Qwen3-Next


def qwen3_next_linear_attention(nk: int, nv: int, dk: int, dv: int, seed: int):
    """transformers' Qwen3NextGatedDeltaNet (its torch chunked path: fla is not installed) and
    our gated_deltanet block with the same weights (in_proj rows regrouped)."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next import modeling_qwen3_next

    from hybrid.convert.blocks import gated_deltanet_in_proj_from_hf

    config = Qwen3NextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, layer_types=["linear_attention"],
        linear_num_key_heads=nk, linear_num_value_heads=nv, linear_key_head_dim=dk,
        linear_value_head_dim=dv, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
    )  # fmt: skip
    theirs = modeling_qwen3_next.Qwen3NextGatedDeltaNet(config, layer_idx=0).eval()
    randomize(theirs, seed=seed)
    ours = our_block(
        "gated_deltanet", 32, n_heads=nk, n_v_heads=nv, head_k_dim=dk, head_v_dim=dv,
        d_conv=4, chunk_size=8, norm_eps=1e-6,
    )  # fmt: skip
    weights = dict(theirs.named_parameters())
    ours.load_state_dict({
        "in_proj.weight": gated_deltanet_in_proj_from_hf(
            weights["in_proj_qkvz.weight"], weights["in_proj_ba.weight"], ours.options
        ),
        **{name: weights[name] for name in
           ("conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight")},
    })  # fmt: skip
    return ours, theirs


@pytest.mark.parametrize(("nk", "nv", "dk", "dv"), [(2, 2, 8, 8), (2, 4, 8, 4), (1, 3, 4, 6)])
@pytest.mark.parametrize("length", LENGTHS)
def test_qwen3_next_gated_deltanet(length, nk, nv, dk, dv):
    """Value heads sharing key heads (2x, 3x) and head_v_dim != head_k_dim; their chunk is 64,
    ours 8, so the chunking differs too."""
    ours, theirs = qwen3_next_linear_attention(nk, nv, dk, dv, seed=21)
    x = inputs(32, length)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_qwen3_next_in_proj_round_trip():
    from hybrid.convert.blocks import gated_deltanet_in_proj_to_hf

    ours, theirs = qwen3_next_linear_attention(2, 4, 8, 4, seed=22)
    qkvz, ba = gated_deltanet_in_proj_to_hf(ours.in_proj.weight, ours.options)
    assert torch.equal(qkvz, theirs.in_proj_qkvz.weight)
    assert torch.equal(ba, theirs.in_proj_ba.weight)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("length", LENGTHS)
def test_qwen3_next_sparse_moe(length, norm_topk_prob):
    """Softmax over all experts, top-2, and a shared SwiGLU expert of its own width scaled per
    token by sigmoid(shared_expert_gate(x)): our moe.shared_gate."""
    from transformers.models.qwen3_next import modeling_qwen3_next

    from tests.hf_models import qwen3_next_config

    config = qwen3_next_config(norm_topk_prob=norm_topk_prob)
    theirs = modeling_qwen3_next.Qwen3NextSparseMoeBlock(config).eval()
    randomize(theirs, seed=25)
    ours = our_block(
        "moe", 32, n_experts=4, top_k=2, expert_hidden_size=24, n_shared_experts=1,
        shared_hidden_size=40, shared_gate=True, normalize_top_k=norm_topk_prob,
    )  # fmt: skip
    gate_up = "experts.gate_up_proj"
    load(ours, theirs, {
        "router.weight": "gate.weight",
        "experts.gate_proj": (gate_up, slice(None, 24)),
        "experts.up_proj": (gate_up, slice(24, None)),
        "experts.down_proj": "experts.down_proj",
        "shared_gate.weight": "shared_expert_gate.weight",
        **proj_mapping(["gate_proj", "up_proj", "down_proj"], "shared.", "shared_expert."),
    })  # fmt: skip
    x = inputs(32, length)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).hidden, theirs(x), **TOL)


# ----------------------------------------------------------------------------------------- LFM2


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d_conv", [3, 4])
@pytest.mark.parametrize("length", LENGTHS)
def test_lfm2_short_conv(length, d_conv, bias):
    from transformers import Lfm2Config
    from transformers.models.lfm2 import modeling_lfm2

    config = Lfm2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, layer_types=["conv"],
        conv_L_cache=d_conv, conv_bias=bias,
    )  # fmt: skip
    theirs = modeling_lfm2.Lfm2ShortConv(config, layer_idx=0).eval()
    randomize(theirs, seed=23)
    ours = our_block("short_conv", 32, d_conv=d_conv, bias=bias)
    names = ["in_proj", "out_proj", "conv"]
    load(ours, theirs, proj_mapping(names, bias=bias))
    x = inputs(32, length)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("length", LENGTHS)
def test_qwen3_next_gated_attention(length, implementation):
    """Qwen3-Next's full attention: per-head q / k RMSNorm (zero-centred: weight 1 + w), an
    output gate interleaved with the queries in q_proj, a quarter of each head rotating."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next import modeling_qwen3_next

    config = Qwen3NextConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=1, layer_types=["full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 3000.0,
                         "partial_rotary_factor": 0.25},
    )  # fmt: skip
    theirs = modeling_qwen3_next.Qwen3NextAttention(config, layer_idx=0).eval()
    randomize(theirs, seed=24)
    ours = our_block(
        "attention", 64, n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=3000.0,
        rope_fraction=0.25, qk_norm=True, qk_norm_eps=1e-6, output_gate=True,
    )  # fmt: skip
    weights = dict(theirs.named_parameters())
    query, gate = weights["q_proj.weight"].view(4, 2, 16, 64).unbind(1)
    ours.load_state_dict({
        "q_proj.weight": query.reshape(64, 64), "gate_proj.weight": gate.reshape(64, 64),
        "k_proj.weight": weights["k_proj.weight"], "v_proj.weight": weights["v_proj.weight"],
        "o_proj.weight": weights["o_proj.weight"],
        "q_norm.weight": 1 + weights["q_norm.weight"],
        "k_norm.weight": 1 + weights["k_norm.weight"],
    })  # fmt: skip
    x = inputs(64, length)
    rotary = modeling_qwen3_next.Qwen3NextRotaryEmbedding(config)
    kwargs = attention_kwargs(config, implementation, length)
    with torch.no_grad():
        expected, _ = theirs(x, position_embeddings=rope_embeddings(rotary, x), **kwargs)
        torch.testing.assert_close(ours(x), expected, **TOL)

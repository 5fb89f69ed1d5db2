"""transformers ``granitemoehybrid`` (GraniteMoeHybridForCausalLM, IBM's Granite 4) <-> HybridLM.

A Granite 4 decoder layer is a mixer sublayer (Mamba-2 for ``mamba`` / ``linear_attention``
layer types, attention for ``attention`` / ``full_attention``) then a feed-forward sublayer:
with ``num_local_experts`` > 0 a MoE of that many experts plus an ungated shared expert of
``shared_intermediate_size`` (our ``moe`` with ``n_shared_experts: 1``), with 0 the shared MLP
alone (our ``mlp``). Routing is softmax over the top-k router logits, which is our softmax
router with the top-k weights renormalised.

Multipliers: ``embedding_multiplier`` and ``residual_multiplier`` are our model's fields of
those names, ``logits_scaling`` divides the logits (our ``logit_multiplier`` is its inverse),
``attention_multiplier`` is the attention's softmax scale (our ``attention.softmax_scale``).

Tensors: checkpoints store each MoE's experts packed, ``block_sparse_moe.input_linear``
(experts, 2 * intermediate, hidden: the gate's rows, then the up's) and ``output_linear``, the
router as ``router.layer``, and the shared MLP's gate and up as one ``input_linear``; a state
dict of transformers' modules (``experts.gate_up_proj``, ``router.weight``) reads too.

Read and written: sizes, ``layer_types``, heads / key-value heads / ``head_dim``,
``position_embedding_type`` (None: no positions; ``rope``: RoPE with ``rope_theta``),
``attention_bias``, ``num_local_experts``, ``num_experts_per_tok``, ``intermediate_size``,
``shared_intermediate_size``, ``router_aux_loss_coef``, the Mamba-2 keys Bamba has
(``mamba_n_heads``, ``mamba_d_head``, ``mamba_expand``, ``mamba_d_state``, ``mamba_n_groups``,
``mamba_d_conv``, ``mamba_chunk_size``, ``mamba_conv_bias``, ``mamba_proj_bias``,
``time_step_limit``), ``rms_norm_eps`` (every norm), ``tie_word_embeddings``, the multipliers.
Refused: ``hidden_act`` other than silu, RoPE types other than ``default``, other layer types,
quantized checkpoints. Ignored: ``output_router_logits``, ``max_position_embeddings``, dropout,
token ids, ``initializer_range`` (kept as ``init_std``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import (
    ATTENTION,
    MAMBA2_MIXER,
    MAX_POSITIONS,
    attention_from_hf,
    mamba2_from_hf,
    mamba2_sizes_to_hf,
    mamba_prefixed_from_hf,
    mamba_prefixed_to_hf,
    same_names,
)
from hybrid.convert.common import unsupported
from hybrid.convert.hf_config import (
    checked_layer_types,
    common_from_hf,
    common_to_hf,
    family_options,
    mixer_feedforward_pairs,
    reject_quantized,
    require_expressible,
    require_options,
    rope_from_hf,
    written_options,
)
from hybrid.convert.mapping import NameMap, model_table, nest

MODEL_TYPE = "granitemoehybrid"

EXPRESSES = frozenset(
    {"embedding_multiplier", "residual_multiplier", "logit_multiplier", "attention.softmax_scale"}
)

MIXER_TYPES = {"mamba": "mamba2", "linear_attention": "mamba2",
               "attention": "attention", "full_attention": "attention"}  # fmt: skip

# A Granite layer is two of our sublayers: the mixer (2 i), then the feed-forward (2 i + 1).
# The feed-forward names are those of unpacked() below (split gate / up).
LAYER = "model.layers.{}."
MIXER_NORM = {"sublayers.{}.norm.weight": LAYER + "input_layernorm.weight"}
FFN_NORM = {"sublayers.{}.norm.weight": LAYER + "post_attention_layernorm.weight"}
SHARED = same_names("gate_proj.weight", "up_proj.weight", "down_proj.weight")
TENSORS = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
SUBLAYERS = {
    "attention": MIXER_NORM | nest(ATTENTION, "sublayers.{}.block.", LAYER + "self_attn."),
    "mamba2": MIXER_NORM | nest(MAMBA2_MIXER, "sublayers.{}.block.", LAYER + "mamba."),
    "mlp": FFN_NORM | nest(SHARED, "sublayers.{}.block.ffn.", LAYER + "shared_mlp."),
    "moe": FFN_NORM
    | {
        "sublayers.{}.block.router.weight": LAYER + "block_sparse_moe.router.layer.weight",
        "sublayers.{}.block.experts.gate_proj": LAYER + "block_sparse_moe.experts.gate_proj",
        "sublayers.{}.block.experts.up_proj": LAYER + "block_sparse_moe.experts.up_proj",
        "sublayers.{}.block.experts.down_proj": LAYER + "block_sparse_moe.output_linear.weight",
    }
    | nest(SHARED, "sublayers.{}.block.shared.", LAYER + "shared_mlp."),
}


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> Granite 4's (gate and up split) for ``config``'s model."""
    table = model_table(TENSORS, SUBLAYERS, config, layer_of=lambda index: index // 2)
    return NameMap(table, config, MODEL_TYPE)


# packed name (on disk, or of transformers' modules) -> (our split names, the split's dim)
PACKED = {
    "block_sparse_moe.input_linear.weight": (("experts.gate_proj", "experts.up_proj"), 1),
    "block_sparse_moe.experts.gate_up_proj": (("experts.gate_proj", "experts.up_proj"), 1),
    "shared_mlp.input_linear.weight": (("gate_proj.weight", "up_proj.weight"), 0),
}
RENAMED = {
    "block_sparse_moe.experts.down_proj": "block_sparse_moe.output_linear.weight",
    "block_sparse_moe.router.weight": "block_sparse_moe.router.layer.weight",
    "shared_mlp.output_linear.weight": "shared_mlp.down_proj.weight",
}


def unpacked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Granite state dict with packed gate / up tensors split and module names renamed to
    the names of :data:`SUBLAYERS`."""
    out = {}
    for name, tensor in state.items():
        for packed, ((gate, up), dim) in PACKED.items():
            if name.endswith(packed):
                prefix = name.removesuffix(packed) + packed.split(".")[0] + "."
                parts = tensor.chunk(2, dim=dim)
                out[prefix + gate], out[prefix + up] = (p.contiguous() for p in parts)
                break
        else:
            suffix = next((s for s in RENAMED if name.endswith(s)), None)
            out[name if suffix is None else name.removesuffix(suffix) + RENAMED[suffix]] = tensor
    return out


def packed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`unpacked`, to the names checkpoints store."""
    out = dict(state)
    for name in [
        n for n in state if n.endswith(("experts.gate_proj", "shared_mlp.gate_proj.weight"))
    ]:
        gate_name = name
        up_name = name.replace("gate_proj", "up_proj")
        experts = name.endswith("experts.gate_proj")
        target = (
            name.removesuffix("experts.gate_proj") + "input_linear.weight"
            if experts
            else name.removesuffix("gate_proj.weight") + "input_linear.weight"
        )
        out[target] = torch.cat([out.pop(gate_name), out.pop(up_name)], dim=1 if experts else 0)
    for name in [n for n in out if n.endswith("shared_mlp.down_proj.weight")]:
        out[name.removesuffix("down_proj.weight") + "output_linear.weight"] = out.pop(name)
    return out


def layer_mixers(hf: dict[str, Any]) -> list[str]:
    """Our mixer family of each layer."""
    n_layers = hf.get("num_hidden_layers", 32)
    types = hf.get("layer_types") or ["mamba"] * n_layers
    types = checked_layer_types(types, n_layers, MODEL_TYPE, MIXER_TYPES)
    return [MIXER_TYPES[kind] for kind in types]


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Granite 4 config (``config.json`` as a dict)."""
    reject_quantized(hf, MODEL_TYPE)
    common = common_from_hf(hf, vocab_default=32000, hidden_default=4096)
    d_model = common["d_model"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise unsupported(MODEL_TYPE, "hidden_act", act, "silu, the MLPs' and the Mamba conv's")
    eps = float(hf.get("rms_norm_eps", 1e-6))
    mixers = layer_mixers(hf)
    position = hf.get("position_embedding_type")
    if position not in (None, "rope", "nope"):
        raise unsupported(MODEL_TYPE, "position_embedding_type", position, "null or 'rope'")
    theta, _ = rope_from_hf(hf, MODEL_TYPE, default_fraction=None)
    attention = attention_from_hf(hf, heads_default=32, kv_default=None, d_model=d_model)
    attention |= {
        "position": "rope" if position == "rope" else "none",
        "rope_theta": theta,
        "softmax_scale": float(hf.get("attention_multiplier", 1.0)),
    }
    expand = hf.get("mamba_expand", 2)
    n_heads = hf.get("mamba_n_heads", 128)
    head_dim = hf.get("mamba_d_head", "auto")
    if head_dim == "auto":
        head_dim = expand * d_model // n_heads
    mamba2 = mamba2_from_hf(
        MODEL_TYPE, d_model, n_heads=n_heads, head_dim=head_dim, expand=expand, hidden_act=act,
        **mamba_prefixed_from_hf(hf), norm_eps=eps,
    )  # fmt: skip
    n_experts = hf.get("num_local_experts", 8)
    shared = hf.get("shared_intermediate_size", 1024)
    ffn = "E" if n_experts > 0 else "-"
    symbols = {"mamba2": "M", "attention": "*"}
    families: dict[str, Any] = {"mlp": {"hidden_size": shared, "activation": "swiglu"}}
    if n_experts > 0:
        families["moe"] = {
            "n_experts": n_experts,
            "top_k": hf.get("num_experts_per_tok", 2),
            "expert_hidden_size": hf.get("intermediate_size", 11008),
            "activation": "swiglu",
            "n_shared_experts": 1,
            "shared_hidden_size": shared,
            "router": "softmax",
            "normalize_top_k": True,
            "aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.001)),
            "z_loss_weight": 0.0,
        }
    scaling = float(hf.get("logits_scaling", 1.0))
    if scaling == 0:
        raise unsupported(MODEL_TYPE, "logits_scaling", scaling, "a nonzero divisor")
    return HybridConfig(
        pattern="".join(symbols[m] + ffn for m in mixers),
        attention=attention,
        mamba2=mamba2,
        norm_eps=eps,
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        logit_multiplier=1.0 / scaling,
        **families,
        **common,
    )


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a Granite 4 one (stored or of transformers' modules)."""
    return name_map(config).from_hf(unpacked(state))


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The transformers Granite 4 config of our config.

    Raises:
        ValueError: the model is not mixer / feed-forward pairs (all MoE with a shared expert,
            or all MLP) with one set of options per family that Granite 4 can express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    layers = config.layers
    mixers, ffns = layers[0::2], layers[1::2]
    pairs = mixer_feedforward_pairs(layers, ("mamba2", "attention"), ("mlp", "moe"))
    if not pairs or len(set(ffns)) != 1:
        raise ValueError(
            f"{MODEL_TYPE}: cannot express pattern {config.pattern_string!r}; {MODEL_TYPE} "
            "needs layers of a mixer (M or *) then one kind of feed-forward for all (E or -)"
        )
    attention = written_options(config, "attention", MODEL_TYPE)
    require_options(MODEL_TYPE, "attention", attention,
                    {"window": None, "rope_fraction": 1.0, "rope_scaling": None,
                     "out_bias": attention.qkv_bias}, "Granite 4's attention")  # fmt: skip
    if attention.position not in ("rope", "none"):
        raise ValueError(
            f"{MODEL_TYPE}: cannot express attention.position={attention.position!r} "
            "(Granite 4 has RoPE or no positions)"
        )
    mamba = written_options(config, "mamba2", MODEL_TYPE)
    if "mamba2" not in mixers:  # unused keys, but they must make a valid config
        mamba = dataclasses.replace(mamba, norm_eps=config.norm_eps)
    sizes = mamba2_sizes_to_hf(mamba, config, MODEL_TYPE)
    hf_ffn: dict[str, Any]
    if ffns[0] == "moe":
        moe = family_options(config, "moe", MODEL_TYPE)
        allowed = {"router": "softmax", "normalize_top_k": True, "routed_scaling": 1.0,
                   "n_shared_experts": 1, "shared_gate": False, "score_correction_bias": False,
                   "n_groups": 1, "activation": "swiglu", "bias": False}  # fmt: skip
        require_options(MODEL_TYPE, "moe", moe, allowed, "Granite 4's MoE with a shared MLP")
        hf_ffn = {
            "num_local_experts": moe.n_experts,
            "num_experts_per_tok": moe.top_k,
            "intermediate_size": moe.expert_hidden_size,
            "shared_intermediate_size": moe.shared_hidden_size,
            "router_aux_loss_coef": moe.aux_loss_weight,
        }
    else:
        mlp = family_options(config, "mlp", MODEL_TYPE)
        require_options(MODEL_TYPE, "mlp", mlp, {"activation": "swiglu", "bias": False},
                        "Granite 4's shared MLP")  # fmt: skip
        hf_ffn = {"num_local_experts": 0, "shared_intermediate_size": mlp.hidden_size}
    if config.logit_multiplier == 0:
        raise ValueError(
            f"{MODEL_TYPE}: cannot express logit_multiplier=0.0 ({MODEL_TYPE} divides the "
            "logits by logits_scaling, its inverse)"
        )
    return {
        **common_to_hf(config, MODEL_TYPE, "GraniteMoeHybridForCausalLM"),
        **hf_ffn,
        "num_hidden_layers": len(mixers),
        "layer_types": ["mamba" if m == "mamba2" else "attention" for m in mixers],
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "head_dim": attention.head_dim,
        "attention_bias": attention.qkv_bias,
        "position_embedding_type": "rope" if attention.position == "rope" else None,
        "rope_parameters": {"rope_type": "default", "rope_theta": attention.rope_theta},
        "attention_multiplier": (
            attention.softmax_scale
            if attention.softmax_scale is not None
            else attention.head_dim**-0.5
        ),
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": MAX_POSITIONS,
        "mamba_n_heads": sizes["n_heads"],
        "mamba_d_head": mamba.headdim,
        "mamba_expand": sizes["expand"],
        **mamba_prefixed_to_hf(mamba),
        "embedding_multiplier": config.embedding_multiplier,
        "residual_multiplier": config.residual_multiplier,
        "logits_scaling": 1.0 / config.logit_multiplier,
    }


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A Granite 4 state dict from ours, in the names checkpoints store."""
    return packed(name_map(config).to_hf(state))

"""transformers' Jamba (``model_type: jamba``) as a HybridLM, and back.

Jamba layer ``i`` is two of our sublayers: a mixer (attention without positional encoding
where ``i % attn_layer_period == attn_layer_offset``, else Mamba-1 with RMSNorms on dt, B and
C) and a feed-forward (a softmax top-k MoE whose selected weights are not renormalised where
``num_experts > 1`` and ``i % expert_layer_period == expert_layer_offset``, else a SwiGLU MLP).
Both sublayers' pre-norms, the Mamba inner norms and the final norm use ``rms_norm_eps``.

Weights are written as transformers' ``save_pretrained`` writes them (one tensor per expert
projection, as on the Hub); packed ``experts.gate_up_proj`` / ``experts.down_proj`` tensors are
read too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import (
    ATTENTION,
    EXPERTS,
    MAMBA1_MIXER,
    MLP,
    NOPE_ATTENTION,
    unpacked_gate_up,
)
from hybrid.convert.common import unsupported
from hybrid.convert.hf_config import (
    cannot_express,
    common_to_hf,
    family_options,
    get,
    require_expressible,
    require_options,
    written_options,
)
from hybrid.convert.mapping import NameMap, model_table, nest
from hybrid.pattern import pattern_from_periods, periods_from_pattern

MODEL_TYPE = "jamba"

# Our extended options this converter writes (hybrid.convert.hf_config.EXTENDED_OPTIONS).
EXPRESSES: frozenset[str] = frozenset()

# transformers' JambaConfig defaults, for keys a config.json may leave out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536,
    "tie_word_embeddings": False,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "router_aux_loss_coef": 0.001,
    "num_experts_per_tok": 2,
    "num_experts": 16,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "attn_layer_period": 8,
    "attn_layer_offset": 4,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_dt_rank": "auto",
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
}

SILU = ("silu", "swish")

# Jamba layer i is two of our sublayers: a mixer (2 i), then a feed-forward (2 i + 1).
LAYER = "model.layers.{}."
TENSORS = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.final_layernorm.weight",
    "lm_head.weight": "lm_head.weight",
}
MIXER_NORM = {"sublayers.{}.norm.weight": LAYER + "input_layernorm.weight"}
FEEDFORWARD_NORM = {"sublayers.{}.norm.weight": LAYER + "pre_ff_layernorm.weight"}
SUBLAYERS = {
    "attention": MIXER_NORM | nest(ATTENTION, "sublayers.{}.block.", LAYER + "self_attn."),
    "mamba1": MIXER_NORM | nest(MAMBA1_MIXER, "sublayers.{}.block.", LAYER + "mamba."),
    "mlp": FEEDFORWARD_NORM | nest(MLP, "sublayers.{}.block.ffn.", LAYER + "feed_forward."),
    "moe": FEEDFORWARD_NORM
    | {"sublayers.{}.block.router.weight": LAYER + "feed_forward.router.weight"}
    | nest(EXPERTS, "sublayers.{}.block.", LAYER + "feed_forward."),
}


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> Jamba's for ``config``'s model."""
    table = model_table(TENSORS, SUBLAYERS, config, layer_of=lambda index: index // 2)
    return NameMap(table, config, MODEL_TYPE)


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config for a transformers Jamba config (as a dict).

    Raises:
        ValueError: naming an option that changes the computation and that we cannot express.
    """

    def value(key: str) -> Any:
        return get(hf, key, DEFAULTS)

    if value("hidden_act") not in SILU:
        why = "silu only: it is the MLP gate and the Mamba activation, and our Mamba-1 uses silu"
        raise unsupported(MODEL_TYPE, "hidden_act", hf["hidden_act"], why)
    if hf.get("sliding_window") is not None:
        why = "transformers' Jamba attends to the whole prefix; only null is read"
        raise unsupported(MODEL_TYPE, "sliding_window", hf["sliding_window"], why)
    d_model = value("hidden_size")
    n_heads = value("num_attention_heads")
    dt_rank = value("mamba_dt_rank")
    n_experts = value("num_experts")
    eps = value("rms_norm_eps")
    has_moe = n_experts > 1
    pattern = pattern_from_periods(
        value("num_hidden_layers"),
        value("attn_layer_period"),
        value("attn_layer_offset"),
        value("expert_layer_period") if has_moe else None,
        value("expert_layer_offset"),
        mixer="mamba1",
    )
    n_kv_heads = hf.get("num_key_value_heads", DEFAULTS["num_key_value_heads"]) or n_heads
    families: dict[str, Any] = {
        "attention": {
            "n_heads": n_heads,
            "n_kv_heads": n_kv_heads,
            "head_dim": hf.get("head_dim") or d_model // n_heads,
            "rope": False,
        },
        "mamba1": {
            "d_state": value("mamba_d_state"),
            "expand": value("mamba_expand"),
            "dt_rank": math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
            "d_conv": value("mamba_d_conv"),
            "conv_bias": value("mamba_conv_bias"),
            "bias": value("mamba_proj_bias"),
            "inner_norms": True,
            "norm_eps": eps,
        },
        "mlp": {"hidden_size": value("intermediate_size"), "activation": "swiglu"},
    }
    if has_moe:
        families["moe"] = {
            "n_experts": n_experts,
            "top_k": value("num_experts_per_tok"),
            "expert_hidden_size": value("intermediate_size"),
            "activation": "swiglu",
            "router": "softmax",
            "normalize_top_k": False,
            "aux_loss_weight": value("router_aux_loss_coef"),
        }
    return HybridConfig(
        pattern=pattern,
        vocab_size=value("vocab_size"),
        d_model=d_model,
        norm_eps=eps,
        tie_embeddings=bool(value("tie_word_embeddings")),
        init_std=value("initializer_range"),
        **families,
    )


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict for a transformers Jamba state dict (``model.*`` and ``lm_head``)."""
    return name_map(config).from_hf(unpacked_gate_up(state))


def check_expressible(config: HybridConfig) -> dict[str, Any]:
    """Jamba's periods for ``config``, after checking every option has a Jamba equivalent.

    Raises:
        ValueError: naming the first option Jamba cannot hold.
    """
    try:
        periods = periods_from_pattern(config.layers)
    except ValueError as error:
        raise ValueError(f"{MODEL_TYPE}: {error}") from None
    if periods["mixer"] != "mamba1":
        why = "Jamba's mixers are attention and mamba1"
        raise cannot_express(MODEL_TYPE, "pattern", config.pattern_string, why)
    used = set(config.layers)
    if "attention" in used:
        attention = family_options(config, "attention", MODEL_TYPE)
        require_options(MODEL_TYPE, "attention", attention, NOPE_ATTENTION, "Jamba's attention")
    if "mamba1" in used:
        mamba = family_options(config, "mamba1", MODEL_TYPE)
        allowed = {"inner_norms": True, "inner_norm_weights": True}
        require_options(MODEL_TYPE, "mamba1", mamba, allowed, "Jamba's Mamba")
        if mamba.norm_eps != config.norm_eps:
            why = f"Jamba has one rms_norm_eps; norm_eps={config.norm_eps}"
            raise cannot_express(MODEL_TYPE, "mamba1.norm_eps", mamba.norm_eps, why)
    if "mlp" in used:
        mlp = family_options(config, "mlp", MODEL_TYPE)
        allowed = {"activation": "swiglu", "bias": False}
        require_options(MODEL_TYPE, "mlp", mlp, allowed, "Jamba's MLP")
    if "moe" in used:
        moe = family_options(config, "moe", MODEL_TYPE)
        allowed = {
            "router": "softmax",
            "normalize_top_k": False,
            "routed_scaling": 1.0,
            "n_shared_experts": 0,
            "score_correction_bias": False,
            "n_groups": 1,
            "activation": "swiglu",
            "bias": False,
        }
        require_options(MODEL_TYPE, "moe", moe, allowed, "Jamba's MoE")
        if moe.n_experts < 2:
            why = "Jamba builds a dense MLP where num_experts is 1"
            raise cannot_express(MODEL_TYPE, "moe.n_experts", moe.n_experts, why)
        if "mlp" in used and moe.expert_hidden_size != mlp.hidden_size:
            why = f"Jamba has one intermediate_size; mlp.hidden_size={mlp.hidden_size}"
            raise cannot_express(MODEL_TYPE, "moe.expert_hidden_size", moe.expert_hidden_size, why)
    return periods


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """A transformers Jamba config (as a dict) for ``config``.

    Raises:
        ValueError: naming an option of ours that Jamba cannot express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    periods = check_expressible(config)
    n_layers = periods["n_layers"]
    attention = written_options(config, "attention", MODEL_TYPE)
    mamba = written_options(config, "mamba1", MODEL_TYPE)
    has_moe = "moe" in config.layers
    moe = written_options(config, "moe", MODEL_TYPE) if has_moe else None
    intermediate = (
        written_options(config, "mlp", MODEL_TYPE).hidden_size
        if "mlp" in config.layers or moe is None
        else moe.expert_hidden_size
    )
    attn_period, attn_offset = periods["attn_layer_period"], periods["attn_layer_offset"]
    if attn_period is None:  # no attention layer: a period longer than the stack
        attn_period, attn_offset = n_layers + 1, n_layers
    hf = {
        **common_to_hf(config, MODEL_TYPE, "JambaForCausalLM"),
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "attn_layer_period": attn_period,
        "attn_layer_offset": attn_offset,
        "expert_layer_period": periods["expert_layer_period"] or 1,
        "expert_layer_offset": periods["expert_layer_offset"],
        "num_experts": moe.n_experts if moe else 1,
        "num_experts_per_tok": moe.top_k if moe else 1,
        "mamba_d_state": mamba.d_state,
        "mamba_d_conv": mamba.d_conv,
        "mamba_expand": mamba.expand,
        "mamba_dt_rank": mamba.dt_rank,
        "mamba_conv_bias": mamba.conv_bias,
        "mamba_proj_bias": mamba.bias,
    }
    if moe:
        hf["router_aux_loss_coef"] = moe.aux_loss_weight
    if attention.head_dim != config.d_model // attention.n_heads:
        hf["head_dim"] = attention.head_dim  # JambaAttention reads it when present
    return hf


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A transformers Jamba state dict for our ``state`` (one tensor per expert projection)."""
    check_expressible(config)
    return name_map(config).to_hf(state)

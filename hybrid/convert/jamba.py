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
from hybrid.convert.common import take, unsupported
from hybrid.pattern import pattern_from_periods, periods_from_pattern

MODEL_TYPE = "jamba"

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

# transformers' Mamba mixer tensor names -> ours (the rest are the same)
MAMBA_RENAMES = {"dt_layernorm.": "dt_norm.", "b_layernorm.": "b_norm.", "c_layernorm.": "c_norm."}
SILU = ("silu", "swish")


def get(hf: dict[str, Any], key: str, defaults: dict[str, Any] = DEFAULTS) -> Any:
    """``hf[key]``, or transformers' default when the key is absent or null."""
    value = hf.get(key)
    return defaults[key] if value is None else value


def cannot_express(model_type: str, option: str, value: Any, why: str) -> ValueError:
    """The one-line error for one of our options that the transformers model cannot hold."""
    return ValueError(f"{model_type}: {option}={value!r} cannot be expressed ({why})")


def family_options(config: HybridConfig, family: str, model_type: str) -> Any:
    """The resolved options every ``family`` sublayer shares (transformers configs hold one
    set per family); the family's own options when no sublayer uses it.

    Raises:
        ValueError: if sublayers of ``family`` have different options (per-layer overrides).
    """
    found = [o for n, o in zip(config.layers, config.layer_options, strict=True) if n == family]
    if not found:
        return getattr(config, family).resolve(config.d_model, family)
    if any(o != found[0] for o in found[1:]):
        raise ValueError(
            f"{model_type}: the {family} sublayers have different options; a {model_type} config "
            "holds one set per block family (per-layer overrides cannot be expressed)"
        )
    return found[0]


def move(
    state: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
    source: str,
    target: str,
    renames: dict[str, str] | None = None,
) -> None:
    """Pop every tensor named ``source...`` from ``state`` into ``out`` as ``target...``,
    replacing name prefixes (after ``source``) by ``renames``."""
    for name in [n for n in state if n.startswith(source)]:
        rest = name[len(source) :]
        for old, new in (renames or {}).items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
        out[target + rest] = state.pop(name)


def stacked_experts(
    state: dict[str, torch.Tensor], prefix: str, projections: tuple[str, ...], n_experts: int
) -> dict[str, torch.Tensor]:
    """Per-expert ``{prefix}{e}.{projection}.weight`` tensors stacked to (n_experts, out, in)."""
    return {
        projection: torch.stack(
            [take(state, f"{prefix}{e}.{projection}.weight") for e in range(n_experts)]
        )
        for projection in projections
    }


def unstacked_experts(experts: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`stacked_experts`: ``{prefix}{e}.{projection}.weight`` tensors."""
    return {
        f"{prefix}{e}.{projection}.weight": weight[e]
        for projection, weight in experts.items()
        for e in range(weight.shape[0])
    }


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config for a transformers Jamba config (as a dict).

    Raises:
        ValueError: naming an option that changes the computation and that we cannot express.
    """
    if get(hf, "hidden_act") not in SILU:
        why = "silu only: it is the MLP gate and the Mamba activation, and our Mamba-1 uses silu"
        raise unsupported(MODEL_TYPE, "hidden_act", hf["hidden_act"], why)
    if hf.get("sliding_window") is not None:
        why = "transformers' Jamba attends to the whole prefix; only null is read"
        raise unsupported(MODEL_TYPE, "sliding_window", hf["sliding_window"], why)
    d_model = get(hf, "hidden_size")
    n_heads = get(hf, "num_attention_heads")
    dt_rank = get(hf, "mamba_dt_rank")
    n_experts = get(hf, "num_experts")
    eps = get(hf, "rms_norm_eps")
    has_moe = n_experts > 1
    pattern = pattern_from_periods(
        get(hf, "num_hidden_layers"),
        get(hf, "attn_layer_period"),
        get(hf, "attn_layer_offset"),
        get(hf, "expert_layer_period") if has_moe else None,
        get(hf, "expert_layer_offset"),
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
            "d_state": get(hf, "mamba_d_state"),
            "expand": get(hf, "mamba_expand"),
            "dt_rank": math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
            "d_conv": get(hf, "mamba_d_conv"),
            "conv_bias": get(hf, "mamba_conv_bias"),
            "bias": get(hf, "mamba_proj_bias"),
            "inner_norms": True,
            "norm_eps": eps,
        },
        "mlp": {"hidden_size": get(hf, "intermediate_size"), "activation": "swiglu"},
    }
    if has_moe:
        families["moe"] = {
            "n_experts": n_experts,
            "top_k": get(hf, "num_experts_per_tok"),
            "expert_hidden_size": get(hf, "intermediate_size"),
            "activation": "swiglu",
            "router": "softmax",
            "normalize_top_k": False,
            "aux_loss_weight": get(hf, "router_aux_loss_coef"),
        }
    return HybridConfig(
        pattern=pattern,
        vocab_size=get(hf, "vocab_size"),
        d_model=d_model,
        norm_eps=eps,
        tie_embeddings=bool(get(hf, "tie_word_embeddings")),
        init_std=get(hf, "initializer_range"),
        **families,
    )


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict for a transformers Jamba state dict (``model.*`` and ``lm_head``)."""
    state = dict(state)
    out = {
        "embedding.weight": take(state, "model.embed_tokens.weight"),
        "final_norm.weight": take(state, "model.final_layernorm.weight"),
    }
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = take(state, "lm_head.weight")
    for i in range(len(config.layers) // 2):
        theirs, mixer, ffn = f"model.layers.{i}.", f"sublayers.{2 * i}.", f"sublayers.{2 * i + 1}."
        out[mixer + "norm.weight"] = take(state, theirs + "input_layernorm.weight")
        out[ffn + "norm.weight"] = take(state, theirs + "pre_ff_layernorm.weight")
        if config.layers[2 * i] == "attention":
            move(state, out, theirs + "self_attn.", mixer + "block.")
        else:
            move(state, out, theirs + "mamba.", mixer + "block.", MAMBA_RENAMES)
        if config.layers[2 * i + 1] == "mlp":
            move(state, out, theirs + "feed_forward.", ffn + "block.ffn.")
            continue
        options = config.layer_options[2 * i + 1]
        source = theirs + "feed_forward."
        out[ffn + "block.router.weight"] = take(state, source + "router.weight")
        if source + "experts.gate_up_proj" in state:  # transformers' packed layout
            gate_up = take(state, source + "experts.gate_up_proj")
            hidden = options.expert_hidden_size
            experts = {"gate_proj": gate_up[:, :hidden], "up_proj": gate_up[:, hidden:]}
            experts["down_proj"] = take(state, source + "experts.down_proj")
        else:
            projections = ("gate_proj", "up_proj", "down_proj")
            experts = stacked_experts(state, source + "experts.", projections, options.n_experts)
        for projection, weight in experts.items():
            out[f"{ffn}block.experts.{projection}"] = weight.contiguous()
    if state:
        raise ValueError(f"{MODEL_TYPE}: weights: unexpected tensors {sorted(state)[:3]}")
    return out


def require_options(
    model_type: str, family: str, options: Any, allowed: dict[str, Any], why: str
) -> None:
    """Raise :func:`cannot_express` for the first field of ``options`` not equal to ``allowed``."""
    for name, value in allowed.items():
        if getattr(options, name) != value:
            raise cannot_express(
                model_type, f"{family}.{name}", getattr(options, name), f"{why}: needs {value!r}"
            )


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
        allowed = {"rope": False, "window": None, "qkv_bias": False, "out_bias": False}
        require_options(MODEL_TYPE, "attention", attention, allowed, "Jamba's attention")
    if "mamba1" in used:
        mamba = family_options(config, "mamba1", MODEL_TYPE)
        require_options(MODEL_TYPE, "mamba1", mamba, {"inner_norms": True}, "Jamba's Mamba")
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
    periods = check_expressible(config)
    n_layers = periods["n_layers"]
    attention = family_options(config, "attention", MODEL_TYPE)
    mamba = family_options(config, "mamba1", MODEL_TYPE)
    has_moe = "moe" in config.layers
    moe = family_options(config, "moe", MODEL_TYPE) if has_moe else None
    intermediate = (
        family_options(config, "mlp", MODEL_TYPE).hidden_size
        if "mlp" in config.layers or moe is None
        else moe.expert_hidden_size
    )
    attn_period, attn_offset = periods["attn_layer_period"], periods["attn_layer_offset"]
    if attn_period is None:  # no attention layer: a period longer than the stack
        attn_period, attn_offset = n_layers + 1, n_layers
    hf = {
        "model_type": MODEL_TYPE,
        "architectures": ["JambaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        # Our models carry no token ids; the tokenizer's files do.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
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
    state = dict(state)
    out = {
        "model.embed_tokens.weight": take(state, "embedding.weight"),
        "model.final_layernorm.weight": take(state, "final_norm.weight"),
    }
    if config.tie_embeddings:  # transformers ties it back to the embedding
        state.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = take(state, "lm_head.weight")
    inverse = {new: old for old, new in MAMBA_RENAMES.items()}
    for i in range(len(config.layers) // 2):
        theirs, mixer, ffn = f"model.layers.{i}.", f"sublayers.{2 * i}.", f"sublayers.{2 * i + 1}."
        out[theirs + "input_layernorm.weight"] = take(state, mixer + "norm.weight")
        out[theirs + "pre_ff_layernorm.weight"] = take(state, ffn + "norm.weight")
        if config.layers[2 * i] == "attention":
            move(state, out, mixer + "block.", theirs + "self_attn.")
        else:
            move(state, out, mixer + "block.", theirs + "mamba.", inverse)
        if config.layers[2 * i + 1] == "mlp":
            move(state, out, ffn + "block.ffn.", theirs + "feed_forward.")
            continue
        target = theirs + "feed_forward."
        out[target + "router.weight"] = take(state, ffn + "block.router.weight")
        projections = ("gate_proj", "up_proj", "down_proj")
        experts = {p: take(state, f"{ffn}block.experts.{p}") for p in projections}
        out.update(unstacked_experts(experts, target + "experts."))
    if state:
        raise ValueError(f"{MODEL_TYPE}: weights: tensors with no Jamba place {sorted(state)[:3]}")
    return out

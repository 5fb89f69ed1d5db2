"""transformers' Nemotron-H (``model_type: nemotron_h``) as a HybridLM, and back.

Each Nemotron-H layer is one pre-norm residual sublayer of ours, by ``layers_block_type`` (or
the older ``hybrid_override_pattern``): ``linear_attention`` / ``M`` is Mamba-2 (inner width
``mamba_num_heads * mamba_head_dim``, dt clamped to ``time_step_limit``),
``full_attention`` / ``*`` attention without positional encoding, ``mlp`` / ``-`` a non-gated
MLP (squared ReLU by default) and ``moe`` / ``E`` a sigmoid-routed MoE with a correction bias,
group-limited choice, routed scaling and one shared expert. All norms, the Mamba-2 gated norm
included, use ``layer_norm_epsilon``.

transformers up to 5.24 clamped dt to ``[time_step_min, inf)`` whatever ``time_step_limit``
said (``time_step_min`` is meant as the dt_bias initialisation range only); 5.25 clamps it to
``time_step_limit``, as mamba_ssm, vLLM and llama.cpp do, and so do we. We write
``time_step_min`` equal to the lower limit and no upper limit, so that what we write computes
the same function under either behaviour.

transformers never ties Nemotron-H's LM head to the embedding (whatever
``tie_word_embeddings`` says), so the head is always read from and written to the checkpoint.
Weights are written as ``save_pretrained`` writes them: ``backbone.*`` names and one tensor
per expert projection; ``model.*`` names and packed expert tensors are read too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import (
    ATTENTION,
    EXPERTS,
    MAMBA2_MIXER,
    MLP,
    NOPE_ATTENTION,
    dt_limit_from_hf,
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

MODEL_TYPE = "nemotron_h"

# Our extended options this converter writes (hybrid.convert.hf_config.EXTENDED_OPTIONS).
EXPRESSES: frozenset[str] = frozenset()

# transformers' NemotronHConfig defaults, for keys a config.json may leave out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "tie_word_embeddings": False,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "attention_bias": False,
    "intermediate_size": 21504,
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "ssm_state_size": 128,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "mamba_hidden_act": "silu",
    "n_groups": 8,
    "conv_kernel": 4,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "time_step_limit": (0.0, math.inf),
    "use_conv_bias": True,
    "chunk_size": 128,
    "n_routed_experts": 8,
    "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 0,
    "use_bias": False,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-5,
}

# Old config.json names that NemotronHConfig still reads.
LEGACY_NAMES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_dt_limit": "time_step_limit",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
}

# layer type (current, legacy or pattern symbol) -> our block
BLOCKS = {
    "linear_attention": "mamba2",
    "mamba": "mamba2",
    "M": "mamba2",
    "full_attention": "attention",
    "attention": "attention",
    "*": "attention",
    "mlp": "mlp",
    "-": "mlp",
    "moe": "moe",
    "E": "moe",
}
# our block -> layer type
LAYER_TYPES = {
    "mamba2": "linear_attention",
    "attention": "full_attention",
    "mlp": "mlp",
    "moe": "moe",
}

# transformers' activation names -> ours (non-gated: Nemotron-H's MLPs have no gate)
ACTIVATIONS = {
    "relu2": "relu2",
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_new": "gelu",
}
HF_ACTIVATIONS = {"relu2": "relu2", "silu": "silu", "gelu": "gelu_pytorch_tanh"}

# Each Nemotron-H layer is one of our sublayers, its block under "mixer." whatever it is.
LAYER = "backbone.layers.{}."
TENSORS = {
    "embedding.weight": "backbone.embeddings.weight",
    "final_norm.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
NORM = {"sublayers.{}.norm.weight": LAYER + "norm.weight"}
SUBLAYERS = {
    "mamba2": NORM | nest(MAMBA2_MIXER, "sublayers.{}.block.", LAYER + "mixer."),
    "attention": NORM | nest(ATTENTION, "sublayers.{}.block.", LAYER + "mixer."),
    "mlp": NORM | nest(MLP, "sublayers.{}.block.ffn.", LAYER + "mixer."),
    "moe": NORM
    | {
        "sublayers.{}.block.router.weight": LAYER + "mixer.gate.weight",
        "sublayers.{}.block.score_bias": LAYER + "mixer.gate.e_score_correction_bias",
    }
    | nest(EXPERTS, "sublayers.{}.block.", LAYER + "mixer.")
    | nest(MLP, "sublayers.{}.block.shared.", LAYER + "mixer.shared_experts."),
}


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> Nemotron-H's for ``config``'s model."""
    return NameMap(model_table(TENSORS, SUBLAYERS, config), config, MODEL_TYPE)


def normalized(hf: dict[str, Any]) -> dict[str, Any]:
    """``hf`` with the legacy option names NemotronHConfig accepts renamed to current ones."""
    hf = dict(hf)
    for old, new in LEGACY_NAMES.items():
        if old in hf:
            hf[new] = hf.pop(old)
    return hf


def block_names(hf: dict[str, Any]) -> list[str]:
    """Our block name of each layer, from ``layers_block_type`` or ``hybrid_override_pattern``."""
    types = hf.get("layers_block_type") or hf.get("layer_types")
    option = "layers_block_type"
    if types is None and hf.get("hybrid_override_pattern") is not None:
        types, option = list(hf["hybrid_override_pattern"]), "hybrid_override_pattern"
    if types is None:
        types = ["linear_attention", "moe", "full_attention", "mlp"]  # transformers' default
    for kind in types:
        if kind not in BLOCKS:
            supported = "mamba / linear_attention, attention / full_attention, mlp, moe"
            raise unsupported(MODEL_TYPE, option, kind, supported)
    return [BLOCKS[kind] for kind in types]


def check_supported(hf: dict[str, Any], names: list[str]) -> None:
    """Raise :func:`unsupported` for the first option that changes the computation of the
    layers ``names`` and that we cannot express."""
    if get(hf, "num_nextn_predict_layers", DEFAULTS):
        why = "multi-token prediction layers are not built; only 0"
        raise unsupported(
            MODEL_TYPE, "num_nextn_predict_layers", hf["num_nextn_predict_layers"], why
        )
    if hf.get("moe_latent_size") is not None:
        why = "experts on a latent projection of the hidden state; only null"
        raise unsupported(MODEL_TYPE, "moe_latent_size", hf["moe_latent_size"], why)
    if "attention" in names and hf.get("sliding_window") is not None:
        why = "transformers' Nemotron-H attends to the whole prefix; only null is read"
        raise unsupported(MODEL_TYPE, "sliding_window", hf["sliding_window"], why)
    if "attention" in names and get(hf, "attention_bias", DEFAULTS):
        why = "transformers' Nemotron-H attention has no biases; only false"
        raise unsupported(MODEL_TYPE, "attention_bias", True, why)
    if "mamba2" in names and get(hf, "mamba_hidden_act", DEFAULTS) not in ("silu", "swish"):
        why = "silu only (our Mamba-2 block uses silu)"
        raise unsupported(MODEL_TYPE, "mamba_hidden_act", hf["mamba_hidden_act"], why)
    feedforward = "mlp" in names or "moe" in names
    if feedforward and get(hf, "mlp_hidden_act", DEFAULTS) not in ACTIVATIONS:
        why = f"one of {', '.join(ACTIVATIONS)}"
        raise unsupported(MODEL_TYPE, "mlp_hidden_act", hf["mlp_hidden_act"], why)
    if "moe" in names and get(hf, "mlp_bias", DEFAULTS):
        why = "with MoE layers: the routed experts have no biases but the shared expert has"
        raise unsupported(MODEL_TYPE, "mlp_bias", True, why)


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config for a transformers Nemotron-H config (as a dict).

    Raises:
        ValueError: naming an option that changes the computation and that we cannot express.
    """
    hf = normalized(hf)
    names = block_names(hf)
    check_supported(hf, names)

    def value(key: str) -> Any:
        return get(hf, key, DEFAULTS)

    n_heads = value("num_attention_heads")
    activation = ACTIVATIONS.get(value("mlp_hidden_act"), "relu2")  # checked where used
    dt_min, dt_max = value("time_step_min"), value("time_step_max")
    mamba2 = {
        "d_state": value("ssm_state_size"),
        "headdim": value("mamba_head_dim"),
        "n_heads": value("mamba_num_heads"),
        "ngroups": value("n_groups"),
        "d_conv": value("conv_kernel"),
        "chunk_size": value("chunk_size"),
        "conv_bias": value("use_conv_bias"),
        "bias": value("use_bias"),
        "norm_eps": value("layer_norm_epsilon"),
        "dt_limit": dt_limit_from_hf(value("time_step_limit")),
    }
    if 0 < dt_min <= dt_max:  # the initialisation range only
        mamba2.update(dt_min=dt_min, dt_max=dt_max, dt_init_floor=value("time_step_floor"))
    families: dict[str, Any] = {
        "attention": {
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads", DEFAULTS["num_key_value_heads"]) or n_heads,
            "head_dim": value("head_dim"),
            "rope": False,
        },
        "mamba2": mamba2,
        "mlp": {
            "hidden_size": value("intermediate_size"),
            "activation": activation,
            "bias": value("mlp_bias"),
        },
    }
    if "moe" in names:
        families["moe"] = {
            "n_experts": value("n_routed_experts"),
            "top_k": value("num_experts_per_tok"),
            "expert_hidden_size": value("moe_intermediate_size"),
            "activation": activation,
            # transformers always builds one shared expert, whatever n_shared_experts says
            "n_shared_experts": 1,
            "shared_hidden_size": value("moe_shared_expert_intermediate_size"),
            "router": "sigmoid",
            "normalize_top_k": value("norm_topk_prob"),
            "routed_scaling": value("routed_scaling_factor"),
            "score_correction_bias": True,
            "n_groups": value("n_group"),
            "topk_groups": value("topk_group"),
        }
    return HybridConfig(
        pattern=names,
        vocab_size=value("vocab_size"),
        d_model=value("hidden_size"),
        norm_eps=value("layer_norm_epsilon"),
        tie_embeddings=False,  # transformers does not tie them either
        init_std=value("initializer_range"),
        **families,
    )


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict for a transformers Nemotron-H state dict (``backbone.*`` names as in
    checkpoints, or ``model.*`` as transformers' modules name them)."""
    state = {
        "backbone." + name.removeprefix("model.") if name.startswith("model.") else name: tensor
        for name, tensor in state.items()
    }
    # a checkpoint that relied on tying (transformers would leave the head random)
    if "lm_head.weight" not in state and "backbone.embeddings.weight" in state:
        state["lm_head.weight"] = state["backbone.embeddings.weight"]
    return name_map(config).from_hf(state)


def check_expressible(config: HybridConfig) -> None:
    """Raise ValueError naming the first option of ours that Nemotron-H cannot hold (options
    of block families the pattern does not use are not checked)."""
    for index, name in enumerate(config.layers):
        if name not in LAYER_TYPES:
            why = f"Nemotron-H layers are {', '.join(LAYER_TYPES)}"
            raise cannot_express(MODEL_TYPE, f"pattern[{index}]", name, why)
    used = set(config.layers)
    if "attention" in used:
        attention = family_options(config, "attention", MODEL_TYPE)
        require_options(
            MODEL_TYPE, "attention", attention, NOPE_ATTENTION, "Nemotron-H's attention"
        )
    if "mamba2" in used:
        mamba = family_options(config, "mamba2", MODEL_TYPE)
        if mamba.dt_limit[1] != math.inf:
            why = "transformers before 5.25 clamps dt only below, at time_step_min"
            raise cannot_express(MODEL_TYPE, "mamba2.dt_limit", mamba.dt_limit, why)
        if mamba.norm_eps != config.norm_eps:
            why = f"Nemotron-H has one layer_norm_epsilon; norm_eps={config.norm_eps}"
            raise cannot_express(MODEL_TYPE, "mamba2.norm_eps", mamba.norm_eps, why)
    for family in ("mlp", "moe"):
        if family in used:
            activation = family_options(config, family, MODEL_TYPE).activation
            if activation not in HF_ACTIVATIONS:
                why = f"Nemotron-H's feed-forwards are not gated: {', '.join(HF_ACTIVATIONS)}"
                raise cannot_express(MODEL_TYPE, f"{family}.activation", activation, why)
    if "moe" not in used:
        return
    moe = family_options(config, "moe", MODEL_TYPE)
    allowed = {"router": "sigmoid", "bias": False}
    require_options(MODEL_TYPE, "moe", moe, allowed, "Nemotron-H's MoE")
    if moe.n_shared_experts < 1:
        why = "Nemotron-H's MoE always has a shared expert"
        raise cannot_express(MODEL_TYPE, "moe.n_shared_experts", moe.n_shared_experts, why)
    if "mlp" in used:
        mlp = family_options(config, "mlp", MODEL_TYPE)
        if moe.activation != mlp.activation:
            why = f"Nemotron-H has one mlp_hidden_act; mlp.activation={mlp.activation!r}"
            raise cannot_express(MODEL_TYPE, "moe.activation", moe.activation, why)
        if mlp.bias:
            why = "with MoE layers: Nemotron-H's routed experts have no biases"
            raise cannot_express(MODEL_TYPE, "mlp.bias", True, why)


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """A transformers Nemotron-H config (as a dict) for ``config``.

    Raises:
        ValueError: naming an option of ours that Nemotron-H cannot express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    check_expressible(config)
    attention = written_options(config, "attention", MODEL_TYPE)
    mamba = written_options(config, "mamba2", MODEL_TYPE)
    mlp = written_options(config, "mlp", MODEL_TYPE)
    moe = written_options(config, "moe", MODEL_TYPE) if "moe" in config.layers else None
    fallback = moe.activation if moe else "relu2"
    activation = mlp.activation if "mlp" in config.layers else fallback
    hf: dict[str, Any] = {
        **common_to_hf(config, MODEL_TYPE, "NemotronHForCausalLM"),
        "layers_block_type": [LAYER_TYPES[name] for name in config.layers],
        "tie_word_embeddings": False,  # transformers never ties them; the head is written
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "head_dim": attention.head_dim,
        "intermediate_size": mlp.hidden_size,
        "mlp_hidden_act": HF_ACTIVATIONS[activation],
        "mlp_bias": mlp.bias and "mlp" in config.layers,
        "ssm_state_size": mamba.d_state,
        "mamba_num_heads": mamba.d_inner(config.d_model) // mamba.headdim,
        "mamba_head_dim": mamba.headdim,
        "mamba_hidden_act": "silu",
        "n_groups": mamba.ngroups,
        "conv_kernel": mamba.d_conv,
        "chunk_size": mamba.chunk_size,
        "use_conv_bias": mamba.conv_bias,
        "use_bias": mamba.bias,
        # time_step_min is the clamp of transformers <= 5.24 and time_step_limit that of 5.25:
        # the same value, so both compute our function (our init range dt_min is not kept).
        "time_step_min": mamba.dt_limit[0],
        "time_step_max": mamba.dt_max,
        "time_step_floor": mamba.dt_init_floor,
        "time_step_limit": [mamba.dt_limit[0], math.inf],
        "layer_norm_epsilon": config.norm_eps,
    }
    if moe:
        hf.update(
            n_routed_experts=moe.n_experts,
            num_experts_per_tok=moe.top_k,
            moe_intermediate_size=moe.expert_hidden_size,
            n_shared_experts=1,
            moe_shared_expert_intermediate_size=moe.shared_hidden_size,
            norm_topk_prob=moe.normalize_top_k,
            routed_scaling_factor=moe.routed_scaling,
            n_group=moe.n_groups,
            topk_group=moe.topk_groups,
            moe_latent_size=None,
        )
    return hf


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A transformers Nemotron-H state dict for our ``state`` (``backbone.*`` names, one tensor
    per expert projection, a zero correction bias where our router has none)."""
    check_expressible(config)
    out = name_map(config).to_hf(state)
    # transformers never ties the head, and its router always has a correction bias
    out.setdefault("lm_head.weight", out["backbone.embeddings.weight"].clone())
    for index, (name, options) in enumerate(zip(config.layers, config.layer_options, strict=True)):
        if name == "moe" and not options.score_correction_bias:
            bias = f"{LAYER.format(index)}mixer.gate.e_score_correction_bias"
            out[bias] = torch.zeros(options.n_experts, dtype=torch.float32)
    return out

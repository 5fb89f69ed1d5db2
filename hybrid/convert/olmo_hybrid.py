"""transformers ``olmo_hybrid`` (OlmoHybridForCausalLM) <-> HybridLM.

An OLMo hybrid decoder layer is a mixer sublayer then a SwiGLU MLP sublayer. Where
``layer_types[i]`` is ``"linear_attention"`` the mixer is our ``gated_deltanet`` and both
sublayers are pre-norm, as in Llama (``input_layernorm``, ``post_attention_layernorm``). Where it
is ``"full_attention"`` the layer is OLMo 2's: attention with RMSNorms over the whole q and k
projections (our ``attention.qk_norm_scope: projection``), and both sublayers normalise the
block's *output* before the residual add (``post_attention_layernorm``,
``post_feedforward_layernorm``: our ``post_norm_sublayers``). ``D-D-D-*-`` reads: three
Gated DeltaNet layers, then an attention layer.

The Gated DeltaNet has separate q / k / v / g (output gate) / b / a projections (our one
``in_proj``, rows in that order), a conv over [q, k, v], ``beta = 2 sigmoid(b)`` when
``linear_allow_neg_eigval`` (our ``gated_deltanet.allow_neg_eigval``) and a gated output norm
whose epsilon is 1e-5 whatever ``rms_norm_eps`` is (:data:`GATED_NORM_EPS`). Attention has RoPE
over whole heads when ``rope_parameters`` has a ``rope_theta``, none (NoPE, as the released
checkpoints) when it is null; ``head_dim`` is ``hidden_size // num_attention_heads``.

Read and written: sizes, ``layer_types``, heads / key-value heads, ``attention_bias`` (q, k, v
and o), ``rope_parameters`` (``rope_theta`` or NoPE, and the RoPE types ``linear``, ``yarn``,
``llama3`` as ``attention.rope_scaling``), ``linear_num_key_heads`` / ``linear_num_value_heads``
/ ``linear_key_head_dim`` / ``linear_value_head_dim`` / ``linear_conv_kernel_dim`` /
``linear_allow_neg_eigval``, ``intermediate_size``, ``rms_norm_eps`` (the layer norms, the q / k
norms, the final norm), ``tie_word_embeddings``. Refused: ``hidden_act`` other than silu (the
MLP gate and the conv activation), layer types other than the two, a ``layer_types`` whose
length is not ``num_hidden_layers`` or that lacks either type (transformers refuses those
too), ``dynamic`` RoPE (OLMo hybrid's rotary embedding never updates it), quantized
checkpoints. Ignored: the A_log / dt initialisation ranges (init only), ``attention_dropout``,
``use_cache``, ``max_position_embeddings``, token ids, ``initializer_range`` (kept as
``init_std``).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import (
    ATTENTION,
    MAX_POSITIONS,
    MLP,
    SPLIT_QKV_CONVS,
    rope_to_hf,
    same_names,
    split_projection,
    stack_projections,
)
from hybrid.convert.common import renamed, unsupported
from hybrid.convert.hf_config import (
    cannot_express,
    checked_layer_types,
    common_from_hf,
    common_to_hf,
    family_options,
    get,
    mixer_feedforward_pairs,
    reject_quantized,
    require_expressible,
    require_options,
    require_value,
    rope_with_scaling_from_hf,
    written_options,
)
from hybrid.convert.mapping import NameMap, Table, at_layer, nest

MODEL_TYPE = "olmo_hybrid"

# What this converter writes beyond the plain model (hybrid.convert.to_hf checks the rest).
EXPRESSES = frozenset({
    "attention.qk_norm", "attention.qk_norm_scope", "gated_deltanet.allow_neg_eigval",
    "post_norm_sublayers",
})  # fmt: skip

# Our gated_deltanet chunk length (speed only; transformers and fla use 64).
CHUNK_SIZE = 64
# OlmoHybridGatedDeltaNet's o_norm: eps=1e-5 always (fla's FusedRMSNormGated default).
GATED_NORM_EPS = 1e-5

# transformers' OlmoHybridConfig defaults, for keys a config.json may leave out (the linear
# heads and head widths default to values derived from others: :func:`deltanet_from_hf`).
DEFAULTS: dict[str, Any] = {
    "vocab_size": 100352,
    "hidden_size": 3840,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 30,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "linear_conv_kernel_dim": 4,
    "linear_allow_neg_eigval": True,
}
SILU = ("silu", "swish")
LINEAR, FULL = "linear_attention", "full_attention"
MIXERS = {"gated_deltanet": LINEAR, "attention": FULL}  # our mixer -> OLMo hybrid's layer type
SCALINGS = ("linear", "yarn", "llama3")

# An OLMo hybrid layer is two of our sublayers: a mixer (2 i), then the MLP (2 i + 1).
LAYER = "model.layers.{}."
TENSORS = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
NORM = "sublayers.{}.norm.weight"
ATTENTION_LAYER = {NORM: LAYER + "post_attention_layernorm.weight"} | nest(
    ATTENTION | same_names("q_norm.weight", "k_norm.weight"),
    "sublayers.{}.block.",
    LAYER + "self_attn.",
)
# in_proj: their q / k / v / g / b / a projections stacked (:func:`unfused`)
DELTANET_LAYER = {NORM: LAYER + "input_layernorm.weight"} | nest(
    same_names("in_proj.weight", "conv1d.weight", "dt_bias", "A_log")
    | {"norm.weight": "o_norm.weight", "out_proj.weight": "o_proj.weight"},
    "sublayers.{}.block.",
    LAYER + "linear_attn.",
)
MLP_BLOCK = nest(MLP, "sublayers.{}.block.ffn.", LAYER + "mlp.")
# the MLP's norm: pre-norm after a Gated DeltaNet, OLMo 2's post-norm after attention
MLP_LAYER = {
    LINEAR: {NORM: LAYER + "post_attention_layernorm.weight"} | MLP_BLOCK,
    FULL: {NORM: LAYER + "post_feedforward_layernorm.weight"} | MLP_BLOCK,
}
IN_PROJ = ("q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj")  # our in_proj's rows


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> OLMo hybrid's for ``config``'s model (in_proj split)."""
    table: Table = dict(TENSORS)
    for index, name in enumerate(config.layers):
        if index % 2 == 0:
            block = ATTENTION_LAYER if name == "attention" else DELTANET_LAYER
        else:
            block = MLP_LAYER[MIXERS.get(config.layers[index - 1], LINEAR)]
        table |= at_layer(block, index, index // 2)
    return NameMap(table, config, MODEL_TYPE)


def value(hf: dict[str, Any], key: str) -> Any:
    """``hf[key]``, or OlmoHybridConfig's default when it is absent or null."""
    return get(hf, key, DEFAULTS)


def layer_types(hf: dict[str, Any]) -> list[str]:
    """Each layer's mixer as OlmoHybridConfig resolves them: ``layer_types``, or full attention
    every 4th layer (the last layer when there is no 4th)."""
    n_layers = value(hf, "num_hidden_layers")
    types = hf.get("layer_types")
    if types is None:
        types = [FULL if i % 4 == 3 else LINEAR for i in range(n_layers)]
        if FULL not in types:
            types[-1] = FULL
    types = checked_layer_types(types, n_layers, MODEL_TYPE, (LINEAR, FULL))
    if LINEAR not in types or FULL not in types:
        why = f"at least one {LINEAR!r} and one {FULL!r} layer"
        raise unsupported(MODEL_TYPE, "layer_types", types, why)
    return types


def post_norm_sublayers(mixers: list[str]) -> list[int]:
    """Our sublayers under OLMo 2's post-norms, given each layer's type: both of every
    attention layer's (the attention and its MLP)."""
    return [2 * i + j for i, kind in enumerate(mixers) if kind == FULL for j in (0, 1)]


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Our attention position options: NoPE when the config's ``rope_theta`` is null (in
    ``rope_parameters``, or at the top level without one), as OlmoHybridModel decides."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
    else:
        theta = hf.get("rope_theta", 10000.0)
    if theta is None:
        return {"position": "none"}
    if isinstance(params, dict) and "rope_theta" not in params:
        hf = {**hf, "rope_parameters": {**params, "rope_theta": theta}}
    theta, _, scaling = rope_with_scaling_from_hf(
        hf, MODEL_TYPE, default_fraction=None, scalings=SCALINGS
    )
    return {"position": "rope", "rope_theta": theta, "rope_scaling": scaling}


def deltanet_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Our ``gated_deltanet`` options, with OlmoHybridConfig's derived defaults: key heads as
    attention heads, value heads as key heads, key heads of ``0.75 hidden_size / heads``
    channels and value heads of twice that."""
    n_heads = hf.get("linear_num_key_heads") or value(hf, "num_attention_heads")
    head_k_dim = hf.get("linear_key_head_dim") or int(0.75 * value(hf, "hidden_size") / n_heads)
    return {
        "n_heads": n_heads,
        "n_v_heads": hf.get("linear_num_value_heads") or value(hf, "num_attention_heads"),
        "head_k_dim": head_k_dim,
        "head_v_dim": hf.get("linear_value_head_dim") or 2 * head_k_dim,
        "d_conv": value(hf, "linear_conv_kernel_dim"),
        "conv_bias": False,
        "output_gate": True,
        "allow_neg_eigval": bool(value(hf, "linear_allow_neg_eigval")),
        "chunk_size": CHUNK_SIZE,
        "norm_eps": GATED_NORM_EPS,
    }


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers OLMo hybrid config (``config.json`` as a dict).

    Raises:
        ValueError: naming an option that changes the computation and that we cannot express.
    """
    reject_quantized(hf, MODEL_TYPE)
    if value(hf, "hidden_act") not in SILU:
        why = "silu only: it is the MLP gate and the Gated DeltaNet conv activation"
        raise unsupported(MODEL_TYPE, "hidden_act", hf["hidden_act"], why)
    mixers = layer_types(hf)
    common = common_from_hf(
        hf, vocab_default=DEFAULTS["vocab_size"], hidden_default=DEFAULTS["hidden_size"]
    )
    eps = float(value(hf, "rms_norm_eps"))
    bias = bool(value(hf, "attention_bias"))
    n_heads = value(hf, "num_attention_heads")
    attention = {
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "head_dim": common["d_model"] // n_heads,
        "qkv_bias": bias,
        "out_bias": bias,
        "qk_norm": True,
        "qk_norm_scope": "projection",
        "qk_norm_eps": eps,
        **rope_from_hf(hf),
    }
    return HybridConfig(
        pattern="".join({LINEAR: "D-", FULL: "*-"}[kind] for kind in mixers),
        norm_eps=eps,
        post_norm_sublayers=post_norm_sublayers(mixers),
        attention=attention,
        gated_deltanet=deltanet_from_hf(hf),
        mlp={"hidden_size": value(hf, "intermediate_size"), "activation": "swiglu"},
        **common,
    )


# The checkpoints' names (OLMo-core's, which transformers' save_pretrained writes and its
# conversion mapping renames on load) for the in-memory names our tables use.
CHECKPOINT_NAMES = [
    (".input_layernorm.", ".attention_layer_norm."),
    (".post_attention_layernorm.", ".feedforward_layer_norm."),
]


def unfused(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """``state`` in the names our tables read: the checkpoint names of the layer norms and
    the split conv read as transformers' in-memory ones (``input_layernorm``,
    ``post_attention_layernorm``, one ``conv1d``), which are read as well, and each Gated
    DeltaNet's six input projections stacked into one ``in_proj``."""
    state = renamed(state, [(new, old) for old, new in CHECKPOINT_NAMES])
    for index, name in enumerate(config.layers):
        if name == "gated_deltanet":
            prefix = LAYER.format(index // 2) + "linear_attn."
            stack_projections(state, prefix, IN_PROJ, "in_proj")
            if prefix + "conv1d.weight" not in state:
                stack_projections(state, prefix, SPLIT_QKV_CONVS, "conv1d")
    return state


def fused(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`unfused`, in the checkpoints' names (as ``save_pretrained`` writes
    them): OLMo hybrid's six projections of each ``in_proj``, the conv split in three."""
    state = dict(state)
    for index, (name, options) in enumerate(zip(config.layers, config.layer_options, strict=True)):
        if name == "gated_deltanet":
            prefix = LAYER.format(index // 2) + "linear_attn."
            key_width, value_width = options.widths()
            sizes = [key_width, key_width, value_width, value_width, options.n_v_heads,
                     options.n_v_heads]  # fmt: skip
            split_projection(state, prefix, "in_proj", IN_PROJ, sizes)
            split_projection(state, prefix, "conv1d", SPLIT_QKV_CONVS, sizes[:3])
    return renamed(state, CHECKPOINT_NAMES)


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from an OLMo hybrid one (the checkpoints' names or transformers'
    in-memory ones)."""
    return name_map(config).from_hf(unfused(state, config))


def check_expressible(config: HybridConfig) -> None:
    """Raise ValueError naming the first option of ours that OLMo hybrid cannot hold."""
    layers = config.layers
    if not mixer_feedforward_pairs(layers, MIXERS, ("mlp",)):
        why = f"{MODEL_TYPE} layers are a mixer (D or *) then an MLP (-)"
        raise cannot_express(MODEL_TYPE, "pattern", config.pattern_string, why)
    if not {"attention", "gated_deltanet"} <= set(layers):
        why = f"{MODEL_TYPE} needs at least one Gated DeltaNet layer and one attention layer"
        raise cannot_express(MODEL_TYPE, "pattern", config.pattern_string, why)
    post_norm = post_norm_sublayers([MIXERS[name] for name in layers[0::2]])
    require_value(
        MODEL_TYPE, "post_norm_sublayers", config.post_norm_sublayers, post_norm,
        "post-norms in the attention layers (the attention and its MLP) and pre-norms in the "
        "Gated DeltaNet layers",
    )  # fmt: skip
    attention = family_options(config, "attention", MODEL_TYPE)
    require_options(
        MODEL_TYPE, "attention", attention,
        {"window": None, "qk_norm": True, "qk_norm_scope": "projection", "output_gate": False,
         "out_bias": attention.qkv_bias, "head_dim": config.d_model // attention.n_heads},
        "OLMo hybrid's attention is full causal attention with RMSNorms over the whole q and k "
        "projections, no output gate, one attention_bias for q, k, v and o, and heads of "
        "hidden_size // num_attention_heads",
    )  # fmt: skip
    if attention.position not in ("rope", "none"):
        why = "RoPE or no positional encoding"
        raise cannot_express(MODEL_TYPE, "attention.position", attention.position, why)
    if attention.position == "rope":
        require_value(
            MODEL_TYPE, "attention.rope_fraction", attention.rope_fraction, 1.0,
            "RoPE over whole heads",
        )  # fmt: skip
        kind = (attention.rope_scaling or {}).get("rope_type", "default")
        if kind not in ("default", *SCALINGS):
            why = f"RoPE scalings {', '.join(SCALINGS)} only"
            raise cannot_express(MODEL_TYPE, "attention.rope_scaling", kind, why)
    require_value(
        MODEL_TYPE, "attention.qk_norm_eps", attention.qk_norm_eps, config.norm_eps,
        "one rms_norm_eps for the layer norms and the q / k norms",
    )  # fmt: skip
    deltanet = family_options(config, "gated_deltanet", MODEL_TYPE)
    require_options(
        MODEL_TYPE, "gated_deltanet", deltanet, {"conv_bias": False, "output_gate": True},
        "OLMo hybrid's Gated DeltaNet has no conv bias and a gated output norm",
    )  # fmt: skip
    require_value(
        MODEL_TYPE, "gated_deltanet.norm_eps", deltanet.norm_eps, GATED_NORM_EPS,
        "a gated output norm of epsilon 1e-5",
    )  # fmt: skip
    mlp = family_options(config, "mlp", MODEL_TYPE)
    allowed = {"activation": "swiglu", "bias": False}
    require_options(MODEL_TYPE, "mlp", mlp, allowed, "OLMo hybrid's MLP is SwiGLU")


def positions_to_hf(attention: Any) -> dict[str, Any]:
    """``rope_parameters`` and ``max_position_embeddings``: a null ``rope_theta`` for NoPE."""
    if attention.position == "none":
        return {"rope_parameters": {"rope_type": "default", "rope_theta": None},
                "max_position_embeddings": MAX_POSITIONS}  # fmt: skip
    return rope_to_hf(attention)


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """A transformers OLMo hybrid config (as a dict) for ``config``.

    Raises:
        ValueError: naming an option of ours that OLMo hybrid cannot express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    check_expressible(config)
    mixers = config.layers[0::2]
    attention = family_options(config, "attention", MODEL_TYPE)
    deltanet = written_options(config, "gated_deltanet", MODEL_TYPE)
    return {
        **common_to_hf(config, MODEL_TYPE, "OlmoHybridForCausalLM"),
        **positions_to_hf(attention),
        "num_hidden_layers": len(mixers),
        "layer_types": [MIXERS[name] for name in mixers],
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "attention_bias": attention.qkv_bias,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "intermediate_size": family_options(config, "mlp", MODEL_TYPE).hidden_size,
        "linear_num_key_heads": deltanet.n_heads,
        "linear_num_value_heads": deltanet.n_v_heads,
        "linear_key_head_dim": deltanet.head_k_dim,
        "linear_value_head_dim": deltanet.head_v_dim,
        "linear_conv_kernel_dim": deltanet.d_conv,
        "linear_allow_neg_eigval": deltanet.allow_neg_eigval,
    }


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A transformers OLMo hybrid state dict for our ``state``."""
    check_expressible(config)
    return fused(name_map(config).to_hf(state), config)

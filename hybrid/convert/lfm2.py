"""transformers ``lfm2`` (Lfm2ForCausalLM) <-> HybridLM.

An LFM2 decoder layer is a mixer sublayer (``operator_norm``) then a SwiGLU MLP sublayer
(``ffn_norm``): ``C-`` where ``layer_types[i]`` is ``"conv"`` (our ``short_conv``: LFM2's
gated short convolution), ``*-`` where it is ``"full_attention"`` (GQA with RoPE and per-head
q / k RMSNorms, ``q_layernorm`` / ``k_layernorm``, at ``norm_eps``). What LFM2 calls
``embedding_norm`` is applied after the last layer, before the head: our ``final_norm``.

The MLP's width is not ``intermediate_size`` itself when ``block_auto_adjust_ff_dim`` is set
(the default): transformers takes two thirds of it, times ``block_ffn_dim_multiplier``,
rounded up to a multiple of ``block_multiple_of`` (:func:`ff_dim`). Written back, the
effective width is ``intermediate_size`` with ``block_auto_adjust_ff_dim: false``.

Read and written: sizes, ``layer_types`` (or, in older configs without it, ``full_attn_idxs``;
neither: every layer is attention, as transformers does), heads / key-value heads /
``head_dim``, ``norm_eps`` (every norm: the pre-norms, the q / k norms, the final norm),
``conv_L_cache`` (our ``short_conv.d_conv``), ``conv_bias`` (the short conv's projections and
conv), ``intermediate_size`` with ``block_auto_adjust_ff_dim`` / ``block_ffn_dim_multiplier``
/ ``block_multiple_of``, ``tie_word_embeddings`` (LFM2 ties by default), ``rope_theta``
(default 1e6) and the RoPE types ``linear``, ``dynamic``, ``yarn`` and ``llama3`` as
``attention.rope_scaling``; the older keys ``block_ff_dim`` and ``tie_embedding`` win over
``intermediate_size`` and ``tie_word_embeddings`` when present, as in transformers. Refused:
layer types other than ``conv`` and ``full_attention``, a ``layer_types`` whose length is not
``num_hidden_layers``, other RoPE types (``longrope``, ...), quantized checkpoints. Ignored
because transformers does not read them either: the original Liquid keys (``block_dim``,
``block_norm_eps``, ``block_use_swiglu``, ``conv_dim``, ``use_pos_enc``, init scales, ...),
and, not changing inference, ``max_position_embeddings`` (except for ``dynamic`` RoPE),
``use_cache``, token ids, ``initializer_range`` (kept as ``init_std``).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import rope_to_hf, same_names
from hybrid.convert.hf_config import (
    checked_layer_types,
    common_from_hf,
    common_to_hf,
    family_options,
    mixer_feedforward_pairs,
    reject_quantized,
    require_expressible,
    require_options,
    require_value,
    rope_with_scaling_from_hf,
    written_options,
)
from hybrid.convert.mapping import NameMap, model_table, nest

MODEL_TYPE = "lfm2"

# What this converter writes beyond the plain model (hybrid.convert.to_hf checks the rest).
EXPRESSES = frozenset({"attention.qk_norm"})

# Lfm2Config's defaults where config.json leaves a key out.
DEFAULTS = {
    "vocab_size": 65536,
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 128000,
    "norm_eps": 1e-5,
    "rope_theta": 1e6,
    "conv_L_cache": 3,
    "conv_bias": False,
    "block_auto_adjust_ff_dim": True,
    "block_ffn_dim_multiplier": 1.0,
    "block_multiple_of": 256,
    "tie_word_embeddings": True,
}
CONV, ATTENTION_LAYER = "conv", "full_attention"  # the layer types transformers runs

# An LFM2 decoder layer is two of our sublayers: a mixer (2 i), then the MLP (2 i + 1).
LAYER = "model.layers.{}."
TENSORS = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.embedding_norm.weight",  # applied after the last layer
    "lm_head.weight": "lm_head.weight",
}
# q, k, v without biases, the output projection as out_proj, per-head q / k RMSNorms
ATTENTION = same_names("q_proj.weight", "k_proj.weight", "v_proj.weight") | {
    "o_proj.weight": "out_proj.weight",
    "q_norm.weight": "q_layernorm.weight",
    "k_norm.weight": "k_layernorm.weight",
}
# transformers' Lfm2ShortConv names its tensors as our short_conv does
SHORT_CONV = same_names(
    *(f"{name}.{kind}" for name in ("in_proj", "conv", "out_proj") for kind in ("weight", "bias"))
)
# Lfm2MLP: w2(silu(w1(x)) * w3(x))
MLP = {
    "gate_proj.weight": "w1.weight",
    "up_proj.weight": "w3.weight",
    "down_proj.weight": "w2.weight",
}
SUBLAYERS = {
    "attention": {
        "sublayers.{}.norm.weight": LAYER + "operator_norm.weight",
        **nest(ATTENTION, "sublayers.{}.block.", LAYER + "self_attn."),
    },
    "short_conv": {
        "sublayers.{}.norm.weight": LAYER + "operator_norm.weight",
        **nest(SHORT_CONV, "sublayers.{}.block.", LAYER + "conv."),
    },
    "mlp": {
        "sublayers.{}.norm.weight": LAYER + "ffn_norm.weight",
        **nest(MLP, "sublayers.{}.block.ffn.", LAYER + "feed_forward."),
    },
}
MIXERS = {"attention": ATTENTION_LAYER, "short_conv": CONV}  # our mixer -> LFM2's layer type


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> LFM2's for ``config``'s model."""
    table = model_table(TENSORS, SUBLAYERS, config, layer_of=lambda index: index // 2)
    return NameMap(table, config, MODEL_TYPE)


def get(hf: dict[str, Any], key: str) -> Any:
    """``hf[key]``, or Lfm2Config's default when the key is absent."""
    return hf.get(key, DEFAULTS[key])


def ff_dim(hf: dict[str, Any]) -> int:
    """The MLP width transformers' Lfm2MLP builds, in its own arithmetic (two thirds of
    ``intermediate_size``, times the multiplier, rounded up to ``block_multiple_of``; a null
    multiplier skips both the multiplier and the rounding)."""
    size = hf.get("block_ff_dim", get(hf, "intermediate_size"))
    if not get(hf, "block_auto_adjust_ff_dim"):
        return size
    size = int(2 * size / 3)
    multiplier = get(hf, "block_ffn_dim_multiplier")
    if multiplier is not None:
        multiple_of = get(hf, "block_multiple_of")
        size = int(multiplier * size)
        size = multiple_of * ((size + multiple_of - 1) // multiple_of)
    return size


def layer_types(hf: dict[str, Any]) -> list[str]:
    """Each layer's type, ``"conv"`` or ``"full_attention"``, as Lfm2Config resolves them."""
    n_layers = get(hf, "num_hidden_layers")
    types = hf.get("layer_types")
    if types is None:
        attention = hf.get("full_attn_idxs")
        attention = range(n_layers) if attention is None else attention
        return [ATTENTION_LAYER if i in attention else CONV for i in range(n_layers)]
    return checked_layer_types(types, n_layers, MODEL_TYPE, (CONV, ATTENTION_LAYER))


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers LFM2 config (``config.json`` as a dict)."""
    reject_quantized(hf, MODEL_TYPE)
    rope_keys = {key: get(hf, key) for key in ("rope_theta", "max_position_embeddings")}
    theta, _, scaling = rope_with_scaling_from_hf(
        {**hf, **rope_keys}, MODEL_TYPE, default_fraction=None
    )
    common = common_from_hf(
        hf, vocab_default=DEFAULTS["vocab_size"], hidden_default=DEFAULTS["hidden_size"]
    )
    common["tie_embeddings"] = bool(hf.get("tie_embedding", get(hf, "tie_word_embeddings")))
    eps = float(get(hf, "norm_eps"))
    n_heads = get(hf, "num_attention_heads")
    attention = {
        "n_heads": n_heads,
        "n_kv_heads": get(hf, "num_key_value_heads"),
        "head_dim": hf.get("head_dim") or common["d_model"] // n_heads,
        "qk_norm": True,
        "qk_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": scaling,
    }
    bias = bool(get(hf, "conv_bias"))
    pattern = "".join("C-" if kind == CONV else "*-" for kind in layer_types(hf))
    return HybridConfig(
        pattern=pattern,
        attention=attention,
        short_conv={"d_conv": get(hf, "conv_L_cache"), "bias": bias},
        mlp={"hidden_size": ff_dim(hf), "activation": "swiglu", "bias": False},
        norm_eps=eps,
        **common,
    )


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from an LFM2 one."""
    return name_map(config).from_hf(state)


def attention_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The attention and RoPE keys: checked options of the attention sublayers, or for a model
    without any the family's own options (unused by transformers, but they must be valid)."""
    attention = family_options(config, "attention", MODEL_TYPE)
    if attention is None:
        try:
            unused = written_options(config, "attention", MODEL_TYPE)
        except ValueError:
            return {"num_attention_heads": 1, "num_key_value_heads": 1}
        return {"num_attention_heads": unused.n_heads, "num_key_value_heads": unused.n_kv_heads,
                "head_dim": unused.head_dim}  # fmt: skip
    require_options(
        MODEL_TYPE, "attention", attention,
        {"position": "rope", "rope_fraction": 1.0, "window": None, "qkv_bias": False,
         "out_bias": False, "qk_norm": True},
        "LFM2's attention has RoPE on whole heads, full causal attention, no biases and "
        "per-head q / k RMSNorms",
    )  # fmt: skip
    require_value(
        MODEL_TYPE, "attention.qk_norm_eps", attention.qk_norm_eps, config.norm_eps,
        "one norm_eps for every norm, the q / k norms too",
    )  # fmt: skip
    return {
        "num_attention_heads": attention.n_heads,
        "num_key_value_heads": attention.n_kv_heads,
        "head_dim": attention.head_dim,
        **rope_to_hf(attention),
    }


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The transformers LFM2 config of our config.

    Raises:
        ValueError: the model is not mixer / MLP pairs (``C-`` or ``*-``) with one set of
            options per family that LFM2 can express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    layers = config.layers
    mixers = layers[0::2]
    if not mixer_feedforward_pairs(layers, MIXERS, ("mlp",)):
        raise ValueError(
            f"{MODEL_TYPE}: cannot express pattern {config.pattern_string!r}; {MODEL_TYPE} "
            "needs layers of a mixer (C or *) then an MLP (-)"
        )
    conv = written_options(config, "short_conv", MODEL_TYPE)
    mlp = family_options(config, "mlp", MODEL_TYPE)
    require_options(
        MODEL_TYPE, "mlp", mlp, {"activation": "swiglu", "bias": False},
        "LFM2's MLP is SwiGLU without biases",
    )  # fmt: skip
    return {
        **common_to_hf(config, MODEL_TYPE, "Lfm2ForCausalLM"),
        **attention_to_hf(config),
        "num_hidden_layers": len(mixers),
        "layer_types": [MIXERS[name] for name in mixers],
        "intermediate_size": mlp.hidden_size,
        "block_auto_adjust_ff_dim": False,  # the width as it is, not two thirds of it
        "conv_L_cache": conv.d_conv,
        "conv_bias": conv.bias,
        "norm_eps": config.norm_eps,
    }


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """An LFM2 state dict from ours."""
    return name_map(config).to_hf(state)

"""transformers ``llama`` (LlamaForCausalLM) <-> HybridLM.

A Llama decoder layer is our two pre-norm residual sublayers ``*-``: attention (GQA, full RoPE)
then a gated MLP, so an ``n``-layer Llama is the pattern ``"*-" * n``.

Read and written: sizes, heads / key-value heads / head_dim, ``rms_norm_eps``, ``rope_theta``,
``attention_bias`` (q, k, v and o), ``mlp_bias``, ``hidden_act`` silu (SwiGLU) or
gelu_pytorch_tanh (GeGLU), ``tie_word_embeddings``. Refused: any RoPE type but ``default``
(``rope_parameters['rope_type']`` or an old ``rope_scaling``), other activations, quantized
checkpoints. Ignored because they do not change inference: ``max_position_embeddings`` (plain
RoPE has no length), ``pretraining_tp`` (transformers 5 does not read it; it only split the same
matmuls), dropouts, ``use_cache``, token ids, ``initializer_range`` (kept as ``init_std``).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.common import unsupported
from hybrid.convert.layout import (
    common_from_hf,
    common_to_hf,
    name_table,
    reject_quantized,
    rename_from_hf,
    rename_to_hf,
    require_layers,
    require_value,
    rope_from_hf,
    shared_options,
    sublayer_index,
)

MODEL_TYPE = "llama"

# transformers hidden_act of a gated MLP -> our mlp activation, and back
ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu"}
HF_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}

# Written as max_position_embeddings: plain RoPE works at any length; this only bounds what
# transformers pre-allocates for static caches.
MAX_POSITIONS = 131072


def mlp_from_hf(hf: dict[str, Any], model_type: str, intermediate_default: int) -> dict[str, Any]:
    """Our ``mlp`` options from a Llama-style gated MLP config."""
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise unsupported(model_type, "hidden_act", act, f"one of {', '.join(ACTIVATIONS)}")
    return {
        "hidden_size": hf.get("intermediate_size", intermediate_default),
        "activation": ACTIVATIONS[act],
        "bias": bool(hf.get("mlp_bias", False)),
    }


def attention_from_hf(
    hf: dict[str, Any], *, heads_default: int, kv_default: int | None, d_model: int
) -> dict[str, Any]:
    """Our ``attention`` options (without RoPE) from a Llama-style attention config."""
    n_heads = hf.get("num_attention_heads", heads_default)
    n_kv_heads = hf.get("num_key_value_heads", kv_default) or n_heads
    bias = bool(hf.get("attention_bias", False))
    return {
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": hf.get("head_dim") or d_model // n_heads,
        "qkv_bias": bias,
        "out_bias": bias,
    }


def attention_to_hf(options: Any, model_type: str) -> dict[str, Any]:
    """The Llama-style attention keys of resolved attention options (no RoPE keys)."""
    require_value(model_type, "attention.rope", options.rope, True, "RoPE on every attention")
    require_value(model_type, "attention.window", options.window, None, "full causal attention")
    require_value(
        model_type, "attention.out_bias", options.out_bias, options.qkv_bias,
        "one attention_bias for q, k, v and o",
    )  # fmt: skip
    return {
        "num_attention_heads": options.n_heads,
        "num_key_value_heads": options.n_kv_heads,
        "head_dim": options.head_dim,
        "attention_bias": options.qkv_bias,
    }


def mlp_to_hf(options: Any, model_type: str) -> dict[str, Any]:
    """The Llama-style MLP keys of resolved mlp options."""
    if options.activation not in HF_ACTIVATIONS:
        raise ValueError(
            f"{model_type}: cannot express mlp.activation={options.activation!r} "
            f"({model_type} has a gated MLP: {', '.join(HF_ACTIVATIONS)})"
        )
    return {
        "intermediate_size": options.hidden_size,
        "hidden_act": HF_ACTIVATIONS[options.activation],
        "mlp_bias": options.bias,
    }


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Llama config (``config.json`` as a dict)."""
    reject_quantized(hf, MODEL_TYPE)
    theta, _ = rope_from_hf(hf, MODEL_TYPE, default_fraction=None)
    common = common_from_hf(hf, vocab_default=32000, hidden_default=4096)
    attention = attention_from_hf(
        hf, heads_default=32, kv_default=None, d_model=common["d_model"]
    )  # fmt: skip
    return HybridConfig(
        pattern="*-" * hf.get("num_hidden_layers", 32),
        attention={**attention, "rope_theta": theta},
        mlp=mlp_from_hf(hf, MODEL_TYPE, intermediate_default=11008),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        **common,
    )


def hf_name(name: str) -> str:
    """The transformers tensor name of one of our tensor names."""
    fixed = {
        "embedding.weight": "model.embed_tokens.weight",
        "final_norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    if name in fixed:
        return fixed[name]
    index, rest = sublayer_index(name)
    layer, is_mlp = divmod(index, 2)
    prefix = f"model.layers.{layer}."
    if rest == "norm.weight":
        return prefix + ("post_attention_layernorm.weight" if is_mlp else "input_layernorm.weight")
    if is_mlp:
        return prefix + "mlp." + rest.removeprefix("block.ffn.")
    return prefix + "self_attn." + rest.removeprefix("block.")


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a Llama one."""
    return rename_from_hf(state, name_table(config, hf_name), config, MODEL_TYPE)


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The transformers Llama config of our config.

    Raises:
        ValueError: the model is not ``"*-" * n`` with one set of attention / mlp options,
            plain full RoPE and a gated MLP.
    """
    n_layers = len(config.layers) // 2
    require_layers(config, ["attention", "mlp"] * n_layers, MODEL_TYPE, "the pattern '*-' * n")
    attention = shared_options(config, "attention", MODEL_TYPE)
    require_value(
        MODEL_TYPE, "attention.rope_fraction", attention.rope_fraction, 1.0, "RoPE on whole heads"
    )
    if config.d_model % attention.n_heads:
        raise ValueError(
            f"{MODEL_TYPE}: cannot express n_heads={attention.n_heads} with "
            f"d_model={config.d_model} (transformers requires hidden_size % heads == 0)"
        )
    return {
        **common_to_hf(config, MODEL_TYPE, "LlamaForCausalLM"),
        **attention_to_hf(attention, MODEL_TYPE),
        **mlp_to_hf(shared_options(config, "mlp", MODEL_TYPE), MODEL_TYPE),
        "num_hidden_layers": n_layers,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": attention.rope_theta},
        "max_position_embeddings": MAX_POSITIONS,
    }


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A Llama state dict from ours."""
    return rename_to_hf(state, name_table(config, hf_name))

"""transformers ``llama`` (LlamaForCausalLM) <-> HybridLM.

A Llama decoder layer is our two pre-norm residual sublayers ``*-``: attention (GQA, full RoPE)
then a gated MLP, so an ``n``-layer Llama is the pattern ``"*-" * n``.

Read and written: sizes, heads / key-value heads / head_dim, ``rms_norm_eps``, ``rope_theta``,
``attention_bias`` (q, k, v and o), ``mlp_bias``, ``hidden_act`` silu (SwiGLU) or
gelu_pytorch_tanh (GeGLU), ``tie_word_embeddings``, and the RoPE types ``linear``, ``dynamic``,
``yarn`` and ``llama3`` (Llama 3.x checkpoints; ``rope_parameters`` or an old ``rope_scaling``)
as ``attention.rope_scaling``. Refused: other RoPE types (``longrope``, ...), other
activations, quantized checkpoints. Ignored because they do not change inference:
``max_position_embeddings`` (except for ``dynamic``, which scales from it; the other scalings
name their own original length), ``pretraining_tp``
(transformers 5 does not read it; it only split the same matmuls), dropouts, ``use_cache``,
token ids, ``initializer_range`` (kept as ``init_std``).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import (
    ATTENTION,
    MLP,
    attention_from_hf,
    attention_to_hf,
    mlp_from_hf,
    mlp_to_hf,
    rope_to_hf,
)
from hybrid.convert.hf_config import (
    common_from_hf,
    common_to_hf,
    family_options,
    reject_quantized,
    require_expressible,
    require_layers,
    require_value,
    rope_with_scaling_from_hf,
)
from hybrid.convert.mapping import NameMap, model_table, nest

MODEL_TYPE = "llama"

# Our extended options this converter writes (hybrid.convert.hf_config.EXTENDED_OPTIONS).
EXPRESSES: frozenset[str] = frozenset()

# A Llama decoder layer is two of our sublayers: attention (2 i), then the MLP (2 i + 1).
LAYER = "model.layers.{}."
TENSORS = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
SUBLAYERS = {
    "attention": {
        "sublayers.{}.norm.weight": LAYER + "input_layernorm.weight",
        **nest(ATTENTION, "sublayers.{}.block.", LAYER + "self_attn."),
    },
    "mlp": {
        "sublayers.{}.norm.weight": LAYER + "post_attention_layernorm.weight",
        **nest(MLP, "sublayers.{}.block.ffn.", LAYER + "mlp."),
    },
}


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> Llama's for ``config``'s model."""
    table = model_table(TENSORS, SUBLAYERS, config, layer_of=lambda index: index // 2)
    return NameMap(table, config, MODEL_TYPE)


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Llama config (``config.json`` as a dict)."""
    reject_quantized(hf, MODEL_TYPE)
    theta, _, scaling = rope_with_scaling_from_hf(hf, MODEL_TYPE, default_fraction=None)
    common = common_from_hf(hf, vocab_default=32000, hidden_default=4096)
    attention = attention_from_hf(
        hf, heads_default=32, kv_default=None, d_model=common["d_model"]
    )  # fmt: skip
    return HybridConfig(
        pattern="*-" * hf.get("num_hidden_layers", 32),
        attention={**attention, "rope_theta": theta, "rope_scaling": scaling},
        mlp=mlp_from_hf(hf, MODEL_TYPE, intermediate_default=11008),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        **common,
    )


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a Llama one."""
    return name_map(config).from_hf(state)


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The transformers Llama config of our config.

    Raises:
        ValueError: the model is not ``"*-" * n`` with one set of attention / mlp options,
            plain full RoPE and a gated MLP.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    n_layers = len(config.layers) // 2
    require_layers(config, ["attention", "mlp"] * n_layers, MODEL_TYPE, "the pattern '*-' * n")
    attention = family_options(config, "attention", MODEL_TYPE)
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
        **mlp_to_hf(family_options(config, "mlp", MODEL_TYPE), MODEL_TYPE),
        "num_hidden_layers": n_layers,
        "rms_norm_eps": config.norm_eps,
        **rope_to_hf(attention),
    }


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A Llama state dict from ours."""
    return name_map(config).to_hf(state)

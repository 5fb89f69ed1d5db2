"""transformers ``bamba`` (BambaForCausalLM) <-> HybridLM.

A Bamba decoder layer is a mixer sublayer then a gated-MLP sublayer: ``*-`` where the layer
index is in ``attn_layer_indices``, ``M-`` elsewhere. Attention is Llama's with RoPE on a share
of each head (``partial_rotary_factor``, 0.5 unless the config says otherwise); the Mamba-2
mixer is transformers' Mamba2 mixer.

Read and written: sizes, ``attn_layer_indices``, heads / key-value heads / ``head_dim``,
``rope_theta``, ``partial_rotary_factor``, ``attention_bias``, ``mlp_bias``, ``mamba_n_heads``
/ ``mamba_d_head`` / ``mamba_expand``, ``mamba_d_state``, ``mamba_n_groups``, ``mamba_d_conv``,
``mamba_chunk_size``, ``mamba_conv_bias``, ``mamba_proj_bias``, ``time_step_limit``,
``rms_norm_eps`` (every norm, the gated one too), ``tie_word_embeddings``. Refused: RoPE types
other than ``default``, ``hidden_act`` other than silu (it is both the MLP's and the Mamba conv's
activation), quantized checkpoints. Ignored: ``z_loss_coefficient`` (training loss),
``num_logits_to_keep`` (which logits generation computes), ``max_position_embeddings``, dropout,
token ids, ``initializer_range`` (kept as ``init_std``).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import (
    ATTENTION,
    MAMBA2_MIXER,
    MAX_POSITIONS,
    MLP,
    attention_from_hf,
    attention_to_hf,
    mamba2_from_hf,
    mamba2_sizes_to_hf,
    mamba_prefixed_from_hf,
    mamba_prefixed_to_hf,
    mlp_from_hf,
    mlp_to_hf,
)
from hybrid.convert.common import unsupported
from hybrid.convert.hf_config import (
    common_from_hf,
    common_to_hf,
    family_options,
    mixer_feedforward_pairs,
    reject_quantized,
    require_expressible,
    require_value,
    rope_from_hf,
)
from hybrid.convert.mapping import NameMap, model_table, nest

MODEL_TYPE = "bamba"

# Our extended options this converter writes (hybrid.convert.hf_config.EXTENDED_OPTIONS).
EXPRESSES: frozenset[str] = frozenset()

PARTIAL_ROTARY_DEFAULT = 0.5  # what BambaConfig sets when rope_parameters does not say

# A Bamba decoder layer is two of our sublayers: a mixer (2 i), then the MLP (2 i + 1).
LAYER = "model.layers.{}."
TENSORS = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.final_layernorm.weight",
    "lm_head.weight": "lm_head.weight",
}
SUBLAYERS = {
    "attention": {
        "sublayers.{}.norm.weight": LAYER + "input_layernorm.weight",
        **nest(ATTENTION, "sublayers.{}.block.", LAYER + "self_attn."),
    },
    "mamba2": {
        "sublayers.{}.norm.weight": LAYER + "input_layernorm.weight",
        **nest(MAMBA2_MIXER, "sublayers.{}.block.", LAYER + "mamba."),
    },
    "mlp": {
        "sublayers.{}.norm.weight": LAYER + "pre_ff_layernorm.weight",
        **nest(MLP, "sublayers.{}.block.ffn.", LAYER + "feed_forward."),
    },
}


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> Bamba's for ``config``'s model."""
    table = model_table(TENSORS, SUBLAYERS, config, layer_of=lambda index: index // 2)
    return NameMap(table, config, MODEL_TYPE)


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Bamba config (``config.json`` as a dict)."""
    reject_quantized(hf, MODEL_TYPE)
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(
            MODEL_TYPE, "hidden_act", hf["hidden_act"], "silu (SwiGLU MLP and Mamba-2 conv)"
        )
    theta, fraction = rope_from_hf(hf, MODEL_TYPE, default_fraction=PARTIAL_ROTARY_DEFAULT)
    common = common_from_hf(hf, vocab_default=128000, hidden_default=4096)
    d_model = common["d_model"]
    eps = float(hf.get("rms_norm_eps", 1e-5))
    n_layers = hf.get("num_hidden_layers", 32)
    attn_layers = hf.get("attn_layer_indices") or []
    if not isinstance(attn_layers, list):
        raise unsupported(MODEL_TYPE, "attn_layer_indices", attn_layers, "a list of layer indices")
    attention = attention_from_hf(hf, heads_default=32, kv_default=8, d_model=d_model)
    expand = hf.get("mamba_expand", 2)
    n_heads = hf.get("mamba_n_heads", 128)
    head_dim = hf.get("mamba_d_head", "auto")
    if head_dim == "auto":
        head_dim = expand * d_model // n_heads
    mamba2 = mamba2_from_hf(
        MODEL_TYPE,
        d_model,
        n_heads=n_heads,
        head_dim=head_dim,
        expand=expand,
        hidden_act="silu",
        **mamba_prefixed_from_hf(hf),
        norm_eps=eps,
    )
    pattern = "".join("*-" if i in attn_layers else "M-" for i in range(n_layers))
    return HybridConfig(
        pattern=pattern,
        attention={**attention, "rope_theta": theta, "rope_fraction": fraction},
        mamba2=mamba2,
        mlp=mlp_from_hf(hf, MODEL_TYPE, intermediate_default=14336),
        norm_eps=eps,
        **common,
    )


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a Bamba one."""
    return name_map(config).from_hf(state)


def unused_family(config: HybridConfig, family: str) -> Any:
    """Resolved family options for a family no sublayer uses (still written, must be valid)."""
    try:
        return getattr(config, family).resolve(config.d_model, family)
    except ValueError:
        return None


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The transformers Bamba config of our config.

    Raises:
        ValueError: the model is not mixer/MLP pairs (``M-`` or ``*-``) with one set of options
            per family that Bamba can express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    layers = config.layers
    n_layers = len(layers) // 2
    mixers = layers[0::2]
    if not mixer_feedforward_pairs(layers, ("mamba2", "attention"), ("mlp",)):
        raise ValueError(
            f"{MODEL_TYPE}: cannot express pattern {config.pattern_string!r}; {MODEL_TYPE} "
            "needs layers of a mixer (M or *) then an MLP (-)"
        )
    attn_layers = [i for i, name in enumerate(mixers) if name == "attention"]
    attention = family_options(config, "attention", MODEL_TYPE)
    if attention is not None:
        attention_keys = attention_to_hf(attention, MODEL_TYPE)
        rope = {
            "rope_theta": attention.rope_theta,
            "partial_rotary_factor": attention.rope_fraction,
        }
    else:  # no attention layer: the keys are unused but must make a valid config
        unused = unused_family(config, "attention")
        n_heads = unused.n_heads if unused else 1
        attention_keys = {"num_attention_heads": n_heads, "num_key_value_heads": n_heads,
                          "attention_bias": False}  # fmt: skip
        rope = {"rope_theta": 10000.0, "partial_rotary_factor": PARTIAL_ROTARY_DEFAULT}
    mamba = family_options(config, "mamba2", MODEL_TYPE)
    if mamba is not None:
        sizes = mamba2_sizes_to_hf(mamba, config, MODEL_TYPE)
    else:
        mamba = unused_family(config, "mamba2")
        if mamba is None or mamba.d_inner(config.d_model) % config.d_model:
            mamba = None
            sizes = {"expand": 1, "n_heads": 1}
        else:
            sizes = {"expand": mamba.d_inner(config.d_model) // config.d_model,
                     "n_heads": mamba.d_inner(config.d_model) // mamba.headdim}  # fmt: skip
    mamba_keys = {
        "mamba_n_heads": sizes["n_heads"],
        "mamba_d_head": sizes["expand"] * config.d_model // sizes["n_heads"],
        "mamba_expand": sizes["expand"],
    }
    if mamba is not None:
        mamba_keys |= mamba_prefixed_to_hf(mamba)
    mlp = family_options(config, "mlp", MODEL_TYPE)
    require_value(
        MODEL_TYPE, "mlp.activation", mlp.activation, "swiglu",
        "one hidden_act, silu, for the MLP and the Mamba conv",
    )  # fmt: skip
    return {
        **common_to_hf(config, MODEL_TYPE, "BambaForCausalLM"),
        **attention_keys,
        **mlp_to_hf(mlp, MODEL_TYPE),
        **mamba_keys,
        "num_hidden_layers": n_layers,
        "attn_layer_indices": attn_layers,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", **rope},
        "max_position_embeddings": MAX_POSITIONS,
    }


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A Bamba state dict from ours."""
    return name_map(config).to_hf(state)

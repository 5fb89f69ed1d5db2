"""transformers ``mamba2`` (Mamba2ForCausalLM) <-> HybridLM.

Each Mamba2 block (RMSNorm, mixer, residual) is our pre-norm sublayer ``M``; there is no MLP,
so an ``n``-layer model is the pattern ``"M" * n``. Tensor names inside the mixer are the same
on both sides (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm``,
``out_proj``).

Read and written: sizes, ``num_heads`` / ``head_dim`` / ``expand``, ``state_size``,
``n_groups`` (the gated norm's groups too), ``conv_kernel``, ``chunk_size``, ``use_bias``,
``use_conv_bias``, ``layer_norm_epsilon`` (block norms, final norm and gated norm),
``time_step_limit`` (our ``dt_limit``), ``time_step_min/max/floor`` (init only, kept as
``dt_min/dt_max/dt_init_floor``), ``tie_word_embeddings``. Refused: ``hidden_act`` other than
silu (the conv activation), quantized checkpoints, ``num_heads * head_dim != expand *
hidden_size``. Ignored: ``time_step_rank`` (unused by the model), ``rescale_prenorm_residual``
and ``initializer_range`` (init only), ``residual_in_fp32``: it only keeps the residual stream
in float32 when the model runs in half precision, which changes rounding, not the function
(load with ``dtype=torch.float32`` for exactness); we write ``False``, which is exactly our
computation in every dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import MAMBA2_MIXER, dt_limit_from_hf, mamba2_from_hf, mamba2_sizes_to_hf
from hybrid.convert.hf_config import (
    common_from_hf,
    common_to_hf,
    family_options,
    reject_quantized,
    require_expressible,
    require_layers,
)
from hybrid.convert.mapping import NameMap, model_table, nest

MODEL_TYPE = "mamba2"

# Our extended options this converter writes (hybrid.convert.hf_config.EXTENDED_OPTIONS).
EXPRESSES: frozenset[str] = frozenset()

# Each Mamba2 block is one of our sublayers: sublayer i is backbone layer i.
LAYER = "backbone.layers.{}."
TENSORS = {
    "embedding.weight": "backbone.embeddings.weight",
    "final_norm.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
SUBLAYERS = {
    "mamba2": {
        "sublayers.{}.norm.weight": LAYER + "norm.weight",
        **nest(MAMBA2_MIXER, "sublayers.{}.block.", LAYER + "mixer."),
    }
}


def name_map(config: HybridConfig) -> NameMap:
    """Our tensor names <-> Mamba2's for ``config``'s model."""
    return NameMap(model_table(TENSORS, SUBLAYERS, config), config, MODEL_TYPE)


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Mamba2 config (``config.json`` as a dict)."""
    reject_quantized(hf, MODEL_TYPE)
    common = common_from_hf(hf, vocab_default=32768, hidden_default=4096)
    eps = float(hf.get("layer_norm_epsilon", 1e-5))
    mamba2 = mamba2_from_hf(
        MODEL_TYPE,
        common["d_model"],
        n_heads=hf.get("num_heads", 128),
        head_dim=hf.get("head_dim", 64),
        expand=hf.get("expand", 2),
        hidden_act=hf.get("hidden_act", "silu"),
        d_state=hf.get("state_size", 128),
        ngroups=hf.get("n_groups", 8),
        d_conv=hf.get("conv_kernel", 4),
        chunk_size=hf.get("chunk_size", 256),
        conv_bias=bool(hf.get("use_conv_bias", True)),
        bias=bool(hf.get("use_bias", False)),
        dt_min=float(hf.get("time_step_min", 0.001)),
        dt_max=float(hf.get("time_step_max", 0.1)),
        dt_init_floor=float(hf.get("time_step_floor", 1e-4)),
        dt_limit=dt_limit_from_hf(hf.get("time_step_limit", (0.0, math.inf))),
        norm_eps=eps,
    )
    return HybridConfig(
        pattern="M" * hf.get("num_hidden_layers", 64), mamba2=mamba2, norm_eps=eps, **common
    )


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a Mamba2 one (mamba_ssm's ``backbone.embedding`` name accepted)."""
    state = dict(state)
    if "backbone.embedding.weight" in state and "backbone.embeddings.weight" not in state:
        state["backbone.embeddings.weight"] = state.pop("backbone.embedding.weight")
    return name_map(config).from_hf(state)


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The transformers Mamba2 config of our config.

    Raises:
        ValueError: the model is not ``"M" * n`` with one set of mamba2 options that
            transformers can express.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    require_layers(config, ["mamba2"] * len(config.layers), MODEL_TYPE, "the pattern 'M' * n")
    options = family_options(config, "mamba2", MODEL_TYPE)
    sizes = mamba2_sizes_to_hf(options, config, MODEL_TYPE)
    return {
        **common_to_hf(config, MODEL_TYPE, "Mamba2ForCausalLM"),
        "num_hidden_layers": len(config.layers),
        "num_heads": sizes["n_heads"],
        "head_dim": options.headdim,
        "expand": sizes["expand"],
        "state_size": options.d_state,
        "n_groups": options.ngroups,
        "conv_kernel": options.d_conv,
        "chunk_size": options.chunk_size,
        "use_bias": options.bias,
        "use_conv_bias": options.conv_bias,
        "hidden_act": "silu",
        "layer_norm_epsilon": config.norm_eps,
        "time_step_min": options.dt_min,
        "time_step_max": options.dt_max,
        "time_step_floor": options.dt_init_floor,
        "time_step_limit": list(options.dt_limit),
        "residual_in_fp32": False,
    }


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A Mamba2 state dict from ours."""
    return name_map(config).to_hf(state)

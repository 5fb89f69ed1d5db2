"""transformers ``mamba`` (MambaForCausalLM) <-> HybridLM, and the plain Mamba-1 stack that
``falcon_mamba`` (:mod:`hybrid.convert.falcon_mamba`) shares with it.

Each Mamba block (RMSNorm, mixer, residual) is our pre-norm sublayer ``S``; there is no MLP,
so an ``n``-layer model is the pattern ``"S" * n``. Tensor names inside the mixer are the same
on both sides (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``,
``out_proj``); mamba_ssm's ``backbone.embedding`` is read as transformers' load hook reads it.
The two types differ only in the mixer's norms on dt, B and C before the scan: Mamba has none,
FalconMamba weight-free RMSNorms (our ``inner_norms`` without ``inner_norm_weights``).

Read and written: sizes, ``state_size``, ``expand`` (transformers recomputes
``intermediate_size`` from it and ignores a stored one; so do we), ``time_step_rank`` ("auto":
``ceil(hidden_size / 16)``; written as the number), ``conv_kernel``, ``use_bias``,
``use_conv_bias``, ``layer_norm_epsilon`` (block norms and final norm),
``time_step_min/max/floor/scale`` (init only, kept as ``dt_min/dt_max/dt_init_floor/dt_scale``),
``initializer_range``, ``tie_word_embeddings`` (default true). Refused: ``hidden_act`` other
than silu (the conv activation; the gate is silu in any case), quantized checkpoints. Ignored:
``time_step_init_scheme`` and ``rescale_prenorm_residual`` (init only), ``use_mambapy`` /
``use_falcon_mambapy`` / ``use_associative_scan`` (which of transformers' equal scans runs),
``residual_in_fp32``: it only keeps the residual stream in float32 when the model runs in half
precision, which changes rounding, not the function (load with ``dtype=torch.float32`` for
exactness); we write ``False``, which is exactly our computation in every dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.blocks import MAMBA1_MIXER
from hybrid.convert.common import unsupported
from hybrid.convert.hf_config import (
    common_to_hf,
    family_options,
    get,
    reject_quantized,
    require_expressible,
    require_layers,
    require_options,
)
from hybrid.convert.mapping import NameMap, model_table, nest

MODEL_TYPE = "mamba"

# Our extended options this converter writes (hybrid.convert.hf_config.EXTENDED_OPTIONS).
EXPRESSES: frozenset[str] = frozenset()

# transformers' MambaConfig defaults (FalconMambaConfig's too, plus its mixer_rms_eps), for
# keys a config.json may leave out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50280,
    "hidden_size": 768,
    "state_size": 16,
    "num_hidden_layers": 32,
    "layer_norm_epsilon": 1e-5,
    "expand": 2,
    "conv_kernel": 4,
    "use_bias": False,
    "use_conv_bias": True,
    "hidden_act": "silu",
    "initializer_range": 0.1,
    "time_step_rank": "auto",
    "time_step_scale": 1.0,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "tie_word_embeddings": True,
    "mixer_rms_eps": 1e-6,
}

SILU = ("silu", "swish")

# Mamba's mixer has no norms on dt, B and C.
INNER_NORMS = {"inner_norms": False}

# Each Mamba block is one of our sublayers: sublayer i is backbone layer i.
LAYER = "backbone.layers.{}."
TENSORS = {
    "embedding.weight": "backbone.embeddings.weight",
    "final_norm.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
SUBLAYERS = {
    "mamba1": {
        "sublayers.{}.norm.weight": LAYER + "norm.weight",
        **nest(MAMBA1_MIXER, "sublayers.{}.block.", LAYER + "mixer."),
    }
}


def name_map(config: HybridConfig, model_type: str = MODEL_TYPE) -> NameMap:
    """Our tensor names <-> Mamba's (and FalconMamba's) for ``config``'s model."""
    return NameMap(model_table(TENSORS, SUBLAYERS, config), config, model_type)


def stack_from_hf(hf: dict[str, Any], model_type: str, inner_norms: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Mamba-style config (``config.json`` as a dict) whose
    mixers have the dt / B / C norms of our mamba1 options ``inner_norms``.

    Raises:
        ValueError: naming an option that changes the computation and that we cannot express.
    """

    def value(key: str) -> Any:
        return get(hf, key, DEFAULTS)

    reject_quantized(hf, model_type)
    if value("hidden_act") not in SILU:
        why = "silu only: the mixer's conv activation, and our Mamba-1 uses silu"
        raise unsupported(model_type, "hidden_act", hf["hidden_act"], why)
    d_model = value("hidden_size")
    dt_rank = value("time_step_rank")
    mamba1 = {
        "d_state": value("state_size"),
        "expand": value("expand"),
        "dt_rank": math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
        "d_conv": value("conv_kernel"),
        "conv_bias": bool(value("use_conv_bias")),
        "bias": bool(value("use_bias")),
        "dt_min": float(value("time_step_min")),
        "dt_max": float(value("time_step_max")),
        "dt_init_floor": float(value("time_step_floor")),
        "dt_scale": float(value("time_step_scale")),
        **inner_norms,
    }
    return HybridConfig(
        pattern="S" * value("num_hidden_layers"),
        vocab_size=value("vocab_size"),
        d_model=d_model,
        norm_eps=float(value("layer_norm_epsilon")),
        tie_embeddings=bool(value("tie_word_embeddings")),
        init_std=float(value("initializer_range")),
        mamba1=mamba1,
    )


def stack_to_hf(
    config: HybridConfig, model_type: str, architecture: str, inner_norms: dict[str, Any]
) -> dict[str, Any]:
    """The transformers Mamba-style config of our config, whose mixers' dt / B / C norms must
    be our mamba1 options ``inner_norms``.

    Raises:
        ValueError: the model is not ``"S" * n`` with one set of mamba1 options whose inner
            norms are ``inner_norms``.
    """
    require_layers(config, ["mamba1"] * len(config.layers), model_type, "the pattern 'S' * n")
    options = family_options(config, "mamba1", model_type)
    require_options(model_type, "mamba1", options, inner_norms, f"{model_type}'s mixer")
    return {
        **common_to_hf(config, model_type, architecture),
        "num_hidden_layers": len(config.layers),
        "state_size": options.d_state,
        "expand": options.expand,
        "time_step_rank": options.dt_rank,
        "conv_kernel": options.d_conv,
        "use_bias": options.bias,
        "use_conv_bias": options.conv_bias,
        "hidden_act": "silu",
        "layer_norm_epsilon": config.norm_eps,
        "time_step_min": options.dt_min,
        "time_step_max": options.dt_max,
        "time_step_floor": options.dt_init_floor,
        "time_step_scale": options.dt_scale,
        "residual_in_fp32": False,
    }


def stack_weights_from_hf(
    state: dict[str, torch.Tensor], config: HybridConfig, model_type: str
) -> dict[str, torch.Tensor]:
    """Our state dict from a Mamba-style one (mamba_ssm's ``backbone.embedding`` accepted)."""
    state = dict(state)
    if "backbone.embedding.weight" in state and "backbone.embeddings.weight" not in state:
        state["backbone.embeddings.weight"] = state.pop("backbone.embedding.weight")
    return name_map(config, model_type).from_hf(state)


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers Mamba config (``config.json`` as a dict)."""
    return stack_from_hf(hf, MODEL_TYPE, INNER_NORMS)


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a Mamba one."""
    return stack_weights_from_hf(state, config, MODEL_TYPE)


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The transformers Mamba config of our config.

    Raises:
        ValueError: the model is not ``"S" * n`` with one set of mamba1 options without
            inner norms.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    return stack_to_hf(config, MODEL_TYPE, "MambaForCausalLM", INNER_NORMS)


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A Mamba state dict from ours."""
    return name_map(config).to_hf(state)

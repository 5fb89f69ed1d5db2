"""transformers ``falcon_mamba`` (FalconMambaForCausalLM) <-> HybridLM.

A FalconMamba model is a Mamba model (:mod:`hybrid.convert.mamba`: the same layers, tensor
names, config keys and refusals) whose mixer RMS-normalises dt (before ``dt_proj``), B and C
with no learned weights (transformers keeps ones as non-persistent buffers that it never
reads): our mamba1 ``inner_norms`` with ``inner_norm_weights`` off, their epsilon
``mixer_rms_eps`` (our ``mamba1.norm_eps``; the block norms and final norm use
``layer_norm_epsilon``).
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert import mamba
from hybrid.convert.hf_config import family_options, get, require_expressible

MODEL_TYPE = "falcon_mamba"

# Our extended options this converter writes (hybrid.convert.hf_config.EXTENDED_OPTIONS).
EXPRESSES: frozenset[str] = frozenset()

INNER_NORMS = {"inner_norms": True, "inner_norm_weights": False}


def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Our config of a transformers FalconMamba config (``config.json`` as a dict)."""
    eps = float(get(hf, "mixer_rms_eps", mamba.DEFAULTS))
    return mamba.stack_from_hf(hf, MODEL_TYPE, {**INNER_NORMS, "norm_eps": eps})


def weights_from_hf(
    state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
) -> dict[str, torch.Tensor]:
    """Our state dict from a FalconMamba one (the norms have no tensors)."""
    return mamba.stack_weights_from_hf(state, config, MODEL_TYPE)


def config_to_hf(config: HybridConfig) -> dict[str, Any]:
    """The transformers FalconMamba config of our config.

    Raises:
        ValueError: the model is not ``"S" * n`` with one set of mamba1 options with
            weight-free inner norms.
    """
    require_expressible(config, MODEL_TYPE, EXPRESSES)
    hf = mamba.stack_to_hf(config, MODEL_TYPE, "FalconMambaForCausalLM", INNER_NORMS)
    return {**hf, "mixer_rms_eps": family_options(config, "mamba1", MODEL_TYPE).norm_eps}


def weights_to_hf(state: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """A FalconMamba state dict from ours."""
    return mamba.name_map(config, MODEL_TYPE).to_hf(state)

"""Helpers the Llama, Mamba-2 and Bamba converters share: tensor-name tables and layout checks.

A converter describes a checkpoint by one table, our tensor name -> transformers tensor name,
built from our config; :func:`rename_from_hf` and :func:`rename_to_hf` apply it in either
direction, so the two directions cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hybrid.config import HybridConfig
from hybrid.convert.common import take, unsupported

# Tensors some checkpoints carry that are recomputed at load time, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def common_from_hf(hf: dict[str, Any], vocab_default: int, hidden_default: int) -> dict[str, Any]:
    """HybridConfig fields every converter reads the same way."""
    values = {
        "vocab_size": hf.get("vocab_size", vocab_default),
        "d_model": hf.get("hidden_size", hidden_default),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    if hf.get("initializer_range"):
        values["init_std"] = float(hf["initializer_range"])
    return values


def common_to_hf(config: HybridConfig, model_type: str, architecture: str) -> dict[str, Any]:
    """transformers config keys every converter writes the same way."""
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        # Our models carry no token ids; the tokenizer's files do.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def our_tensor_names(config: HybridConfig) -> list[str]:
    """Names of our model's state dict for ``config`` (built on the meta device, no memory).

    With tied embeddings ``lm_head.weight`` is left out: it is ``embedding.weight``.
    """
    from hybrid.model import HybridLM

    with torch.device("meta"):
        names = list(HybridLM(config).state_dict())
    return [n for n in names if not (config.tie_embeddings and n == "lm_head.weight")]


def name_table(config: HybridConfig, hf_name: Callable[[str], str]) -> dict[str, str]:
    """Our tensor name -> transformers tensor name for every tensor of ``config``'s model."""
    return {name: hf_name(name) for name in our_tensor_names(config)}


def rename_from_hf(
    state: dict[str, torch.Tensor],
    table: dict[str, str],
    config: HybridConfig,
    model_type: str,
) -> dict[str, torch.Tensor]:
    """Our state dict from a transformers one; a missing or an unused tensor fails.

    A tied checkpoint that still stores ``lm_head.weight`` has it dropped.
    """
    state = dict(state)
    ours = {name: take(state, hf) for name, hf in table.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    left = [name for name in state if not name.endswith(IGNORED_SUFFIXES)]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise ValueError(
            f"{model_type}: weights {', '.join(left[:3])}{more} have no place in the model "
            "(a config option that adds them is not handled)"
        )
    return ours


def rename_to_hf(state: dict[str, torch.Tensor], table: dict[str, str]) -> dict[str, torch.Tensor]:
    """A transformers state dict from ours (tied ``lm_head.weight`` is not written)."""
    return {hf: state[name] for name, hf in table.items()}


def sublayer_index(name: str) -> tuple[int, str]:
    """``("sublayers.7.block.q_proj.weight")`` -> ``(7, "block.q_proj.weight")``."""
    _, index, rest = name.split(".", 2)
    return int(index), rest


def require_layers(config: HybridConfig, expected: list[str], model_type: str, layout: str) -> None:
    """Fail unless ``config.layers`` is exactly ``expected`` (``layout`` describes it)."""
    if config.layers != expected:
        raise ValueError(
            f"{model_type}: cannot express pattern {config.pattern_string!r}; "
            f"{model_type} needs {layout}"
        )


def shared_options(config: HybridConfig, family: str, model_type: str) -> Any:
    """The one set of resolved options every ``family`` sublayer uses (None without any).

    transformers configs have one set per family, so per-layer differences cannot be written.
    """
    options = [o for name, o in zip(config.layers, config.layer_options, strict=True)
               if name == family]  # fmt: skip
    if not options:
        return None
    for index, option in enumerate(options[1:], 1):
        if option != options[0]:
            raise ValueError(
                f"{model_type}: the {family} sublayers differ in their options ({family} "
                f"#{index} is {option}, #0 is {options[0]}); {model_type} has one set for all"
            )
    return options[0]


def require_value(model_type: str, what: str, value: Any, allowed: Any, why: str) -> None:
    """Fail (to_hf direction) unless our option ``what`` equals ``allowed``."""
    if value != allowed:
        raise ValueError(
            f"{model_type}: cannot express {what}={value!r} ({model_type} has {why}; "
            f"needs {allowed!r})"
        )


def reject_quantized(hf: dict[str, Any], model_type: str) -> None:
    """Quantized checkpoints store other tensors than the float weights we read."""
    if hf.get("quantization_config"):
        raise unsupported(
            model_type,
            "quantization_config",
            hf["quantization_config"].get("quant_method", "?")
            if isinstance(hf["quantization_config"], dict)
            else hf["quantization_config"],
            "only unquantized float checkpoints are read",
        )


def rope_from_hf(
    hf: dict[str, Any], model_type: str, *, default_fraction: float | None
) -> tuple[float, float | None]:
    """``(rope_theta, partial_rotary_factor)`` of a config; only plain RoPE is expressible.

    Reads transformers 5's ``rope_parameters`` and the older ``rope_theta`` / ``rope_scaling``
    keys. ``default_fraction`` is the model's own default for the partial rotary factor, or
    None where the model ignores it (Llama's default RoPE rotates the whole head).
    """
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise unsupported(model_type, "rope_parameters", params, "a mapping")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise unsupported(
            model_type, "rope_parameters['rope_type']", rope_type, "only 'default' RoPE"
        )
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind != "default":
            raise unsupported(model_type, "rope_scaling", scaling, "only plain RoPE, no scaling")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if default_fraction is None:
        return theta, None
    return theta, float(params.get("partial_rotary_factor", default_fraction))

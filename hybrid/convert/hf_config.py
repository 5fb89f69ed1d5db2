"""What the converters' config sides share: the keys every transformers config has, RoPE,
quantization, one set of options per block family, and the errors for what a transformers
model type cannot hold."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hybrid.config import HybridConfig
from hybrid.convert.common import unsupported
from layers.rope_scaling import KEYS, SCALINGS, check_scaling


def get(hf: dict[str, Any], key: str, defaults: dict[str, Any]) -> Any:
    """``hf[key]``, or transformers' default ``defaults[key]`` when the key is absent or null."""
    value = hf.get(key)
    return defaults[key] if value is None else value


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
    """``(rope_theta, partial_rotary_factor)`` of a config with plain RoPE (no scaling).

    Reads transformers 5's ``rope_parameters`` and the older ``rope_theta`` / ``rope_scaling``
    keys. ``default_fraction`` is the model's own default for the partial rotary factor, or
    None where the model ignores it (Llama's default RoPE rotates the whole head).
    """
    theta, fraction, _ = rope_with_scaling_from_hf(
        hf, model_type, default_fraction=default_fraction, scalings=()
    )
    return theta, fraction


def rope_with_scaling_from_hf(
    hf: dict[str, Any],
    model_type: str,
    *,
    default_fraction: float | None,
    scalings: tuple[str, ...] = SCALINGS,
) -> tuple[float, float | None, dict[str, Any] | None]:
    """``(rope_theta, partial_rotary_factor, rope_scaling)``: :func:`rope_from_hf` plus the
    ``scalings`` the model may use (linear / dynamic / yarn / llama3) as our
    ``attention.rope_scaling`` (None for plain RoPE)."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise unsupported(model_type, "rope_parameters", params, "a mapping")
    old = hf.get("rope_scaling")
    if old is not None and not isinstance(old, dict):
        raise unsupported(model_type, "rope_scaling", old, "a mapping")

    def kind(values: dict[str, Any]) -> str:
        return values.get("rope_type", values.get("type", "default"))

    # An old-style ``rope_scaling`` with a type wins over a ``rope_parameters`` that says default.
    if old and kind(old) != "default":
        merged = {**params, **old, "rope_type": kind(old)}
    else:
        merged = {**(old or {}), **params}
    rope_type = kind(merged)
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    fraction = None
    if default_fraction is not None:
        fraction = float(merged.get("partial_rotary_factor", default_fraction))
    if rope_type == "default":
        return theta, fraction, None
    if rope_type not in scalings:
        raise unsupported(
            model_type, "rope_parameters['rope_type']", rope_type,
            ", ".join(("'default'", *scalings)) + " RoPE" if scalings else "only 'default' RoPE",
        )  # fmt: skip
    keys = set(KEYS[rope_type])
    scaling = {"rope_type": rope_type, **{k: v for k, v in merged.items() if k in keys}}
    if rope_type == "dynamic":  # transformers scales from the config's max_position_embeddings
        scaling["original_max_position_embeddings"] = hf.get("max_position_embeddings", 2048)
    try:
        check_scaling(scaling, "rope_parameters")
    except ValueError as error:
        raise ValueError(f"{model_type}: {error}") from None
    return theta, fraction, scaling


def checked_layer_types(
    types: Any, n_layers: int, model_type: str, kinds: Collection[str]
) -> list[str]:
    """A config's ``layer_types`` as a list, failing unless it holds ``n_layers`` entries
    (``num_hidden_layers``), each one of ``kinds``."""
    if not isinstance(types, list) or len(types) != n_layers:
        why = f"a list of num_hidden_layers={n_layers} types"
        raise unsupported(model_type, "layer_types", types, why)
    for kind in types:
        if kind not in kinds:
            why = " or ".join(repr(k) for k in kinds) + " layers"
            raise unsupported(model_type, "layer_types", kind, why)
    return list(types)


def mixer_feedforward_pairs(
    layers: list[str], mixers: Collection[str], feedforwards: Collection[str]
) -> bool:
    """Whether ``layers`` is one or more transformers layers of two sublayers each: a block of
    ``mixers``, then one of ``feedforwards``."""
    return (
        bool(layers)
        and len(layers) % 2 == 0
        and all(name in mixers for name in layers[0::2])
        and all(name in feedforwards for name in layers[1::2])
    )


def family_options(config: HybridConfig, family: str, model_type: str) -> Any:
    """The one set of resolved options every ``family`` sublayer uses (None without any).

    transformers configs hold one set per block family, so per-layer differences cannot be
    written.
    """
    options = [o for name, o in zip(config.layers, config.layer_options, strict=True)
               if name == family]  # fmt: skip
    if not options:
        return None
    for index, option in enumerate(options[1:], 1):
        if option != options[0]:
            raise ValueError(
                f"{model_type}: the {family} sublayers have different options ({family} "
                f"#{index} is {option}, #0 is {options[0]}); a {model_type} config holds one "
                "set per block family (per-layer overrides cannot be expressed)"
            )
    return options[0]


def written_options(config: HybridConfig, family: str, model_type: str) -> Any:
    """:func:`family_options`, or for a family no sublayer uses its own options resolved (a
    transformers config that has keys for the family must still hold valid values)."""
    options = family_options(config, family, model_type)
    return getattr(config, family).resolve(config.d_model, family) if options is None else options


def require_layers(config: HybridConfig, expected: list[str], model_type: str, layout: str) -> None:
    """Fail unless ``config.layers`` is exactly ``expected`` (``layout`` describes it)."""
    if config.layers != expected:
        raise ValueError(
            f"{model_type}: cannot express pattern {config.pattern_string!r}; "
            f"{model_type} needs {layout}"
        )


def require_value(model_type: str, what: str, value: Any, allowed: Any, why: str) -> None:
    """Fail (to_hf direction) unless our option ``what`` equals ``allowed``."""
    if value != allowed:
        raise ValueError(
            f"{model_type}: cannot express {what}={value!r} ({model_type} has {why}; "
            f"needs {allowed!r})"
        )


def cannot_express(model_type: str, option: str, value: Any, why: str) -> ValueError:
    """The one-line error for one of our options that the transformers model cannot hold."""
    return ValueError(f"{model_type}: {option}={value!r} cannot be expressed ({why})")


def require_options(
    model_type: str, family: str, options: Any, allowed: dict[str, Any], why: str
) -> None:
    """Raise :func:`cannot_express` for the first field of ``options`` not equal to ``allowed``."""
    for name, value in allowed.items():
        if getattr(options, name) != value:
            raise cannot_express(
                model_type, f"{family}.{name}", getattr(options, name), f"{why}: needs {value!r}"
            )


# Options of ours off their default that a converter must say it writes (its module's
# ``EXPRESSES``); everywhere else they fail by name instead of being dropped on the way out
# (every converter's ``config_to_hf`` starts with :func:`require_expressible`).
EXTENDED_OPTIONS = {
    "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0,
    "logit_multiplier": 1.0,
    "post_norm_sublayers": [],
    "attention.softmax_scale": None,
    "attention.qk_norm": False,
    "attention.qk_norm_scope": "head",
    "attention.output_gate": False,
    "moe.shared_gate": False,
    "gated_deltanet.allow_neg_eigval": False,
    "mamba2.rmsnorm": True,
    "mamba2.norm_before_gate": False,
}


def sublayer_options(config: HybridConfig) -> list[tuple[str, Any]]:
    """``(family, resolved options)`` of every block, the mixers inside ``parallel`` too."""
    found = []
    for name, options in zip(config.layers, config.layer_options, strict=True):
        if name == "parallel":
            found.extend(options.mixers)
        else:
            found.append((name, options))
    return found


def require_expressible(config: HybridConfig, model_type: str, expresses: frozenset[str]) -> None:
    """Fail on the first of :data:`EXTENDED_OPTIONS` off its default that ``model_type`` does
    not express (``expresses``: the converter's own list)."""
    found = [(key, getattr(config, key)) for key in EXTENDED_OPTIONS if "." not in key]
    for family, options in sublayer_options(config):
        found += [(key, getattr(options, key.split(".", 1)[1])) for key in EXTENDED_OPTIONS
                  if key.startswith(family + ".")]  # fmt: skip
    for key, value in found:
        if key not in expresses and value != EXTENDED_OPTIONS[key]:
            raise cannot_express(model_type, key, value, f"{model_type} has no such option")

"""What every Hugging Face converter shares: reading and writing model directories, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

import torch

from hybrid.atomic import atomic_write, atomic_write_text
from hybrid.config import HybridConfig


class Converter(Protocol):
    """One transformers model type. Each lives in its own module of ``hybrid.convert``.

    ``config_from_hf`` / ``weights_from_hf`` map a transformers config (as a dict) and state
    dict onto ours; ``config_to_hf`` / ``weights_to_hf`` go back (raising ValueError where the
    model cannot be expressed in that type; ``config_to_hf`` first refuses the extended
    options off their default that are not in ``EXPRESSES``:
    :func:`hybrid.convert.hf_config.require_expressible`).
    """

    MODEL_TYPE: str
    EXPRESSES: frozenset[str]

    def config_from_hf(self, hf: dict[str, Any]) -> HybridConfig: ...

    def weights_from_hf(
        self, state: dict[str, torch.Tensor], hf: dict[str, Any], config: HybridConfig
    ) -> dict[str, torch.Tensor]: ...

    def config_to_hf(self, config: HybridConfig) -> dict[str, Any]: ...

    def weights_to_hf(
        self, state: dict[str, torch.Tensor], config: HybridConfig
    ) -> dict[str, torch.Tensor]: ...


def unsupported(model_type: str, option: str, value: Any, supported: str) -> ValueError:
    """The one-line error for a config option we cannot express."""
    return ValueError(
        f"{model_type}: config option {option}={value!r} is not supported ({supported})"
    )


# transformers 5 writes inf / nan (e.g. a time_step_limit of (0, inf)) as {"__float__": "Infinity"}
SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def decode_special_floats(value: Any) -> Any:
    """``value`` with transformers' ``{"__float__": "Infinity"}`` objects turned into floats."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in SPECIAL_FLOATS:
            return SPECIAL_FLOATS[value["__float__"]]
        return {key: decode_special_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_special_floats(item) for item in value]
    return value


def encode_special_floats(value: Any) -> Any:
    """``value`` with inf / nan floats written as transformers writes them (plain JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {
            "__float__": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        }
    if isinstance(value, dict):
        return {key: encode_special_floats(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_special_floats(item) for item in value]
    return value


def read_hf_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a transformers model directory."""
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no config.json (not a transformers model directory)")
    try:
        hf = decode_special_floats(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object of config keys")
    return hf


def check_hf_types(hf: dict[str, Any], path: Path) -> None:
    """Fail with one line naming ``path`` and the key where a config.json value has another
    kind than transformers' default for that key (a string where a number belongs, a number
    where a string belongs, a bool where a number belongs). Without transformers, or for a
    model type it does not know, nothing is checked here (the converters' own checks remain).
    """
    try:
        from transformers import CONFIG_MAPPING

        defaults = CONFIG_MAPPING[hf["model_type"]]().to_dict()
    except Exception:  # transformers missing, unknown model type, a config that needs arguments
        return
    for key, value in hf.items():
        default = defaults.get(key)
        if default is None or value is None or isinstance(default, (list, dict)):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            kind = "true or false"
        elif isinstance(default, (int, float)):
            ok = number or isinstance(value, (list, dict))  # some keys take a list per layer
            kind = "a number"
        elif isinstance(default, str):
            ok = not (number or isinstance(value, bool))
            kind = "a string"
        else:
            continue
        if not ok:
            raise ValueError(f"{path}: {key}: must be {kind} (as transformers' default "
                             f"{default!r}), got {value!r}")  # fmt: skip


def read_weight_map(index: Path) -> list[str]:
    """The shard files an index (``model.safetensors.index.json``) lists."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{index}: not a JSON index of shards ({error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: no weight_map (a mapping of tensor names to shard files)")
    return sorted(set(weight_map.values()))


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in its index."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = read_weight_map(index)
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{directory}: no model.safetensors (only safetensors weights are read)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(directory / name))
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{directory / name}: not a readable safetensors file ({error})"
            ) from None
    return state


def write_hf(directory: Path, hf_config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` as transformers' save_pretrained does.

    Each file is replaced atomically (a reader or a killed run never sees half a file); the
    config goes last, so a new directory with a config.json has its weights.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    atomic_write(
        directory / "model.safetensors",
        lambda path: save_file(tensors, path, metadata={"format": "pt"}),
    )
    text = json.dumps(encode_special_floats(hf_config), indent=2, sort_keys=True)
    atomic_write_text(directory / "config.json", text)


def take(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Pop ``name`` from a transformers state dict, failing clearly when it is absent."""
    if name not in state:
        raise ValueError(f"weights: missing tensor {name!r}")
    return state.pop(name)


def renamed(state: dict[str, torch.Tensor], names: list[tuple[str, str]]) -> dict:
    """``state`` with every ``old`` of ``names`` in a tensor name written ``new`` (in order):
    a checkpoint's names for the ones transformers uses in memory, or back."""
    return {renamed_name(name, names): tensor for name, tensor in state.items()}


def renamed_name(name: str, names: list[tuple[str, str]]) -> str:
    """``name`` with every ``old`` of ``names`` in it written ``new`` (in order)."""
    for old, new in names:
        name = name.replace(old, new)
    return name

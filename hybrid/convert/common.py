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
    model cannot be expressed in that type).
    """

    MODEL_TYPE: str

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
        return decode_special_floats(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in its index."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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

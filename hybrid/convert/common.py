"""What every Hugging Face converter shares: reading and writing model directories, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

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


def read_hf_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a transformers model directory."""
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no config.json (not a transformers model directory)")
    try:
        return json.loads(path.read_text())
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
    """Write ``config.json`` and ``model.safetensors`` as transformers' save_pretrained does."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))


def take(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Pop ``name`` from a transformers state dict, failing clearly when it is absent."""
    if name not in state:
        raise ValueError(f"weights: missing tensor {name!r}")
    return state.pop(name)

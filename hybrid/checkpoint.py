"""Model directories: ``config.json`` (the HybridConfig) plus ``model.safetensors``.

The format every later tool reads (generation, evaluation, conversion): a directory that
loads without the recipe that trained it. Files are written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from hybrid.config import HybridConfig
from hybrid.model import HybridLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _atomic_write(path: Path, write) -> None:
    """Run ``write(temp_path)`` then move the result onto ``path`` (never a partial file)."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_pretrained(model: HybridLM, directory: str | Path) -> None:
    """Write ``model``'s config and weights into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if not (model.config.tie_embeddings and name == "lm_head.weight")
    }
    _atomic_write(directory / WEIGHTS_FILE, lambda temp: save_file(state, temp))
    text = json.dumps(model.config.to_dict(), indent=2)
    _atomic_write(directory / CONFIG_FILE, lambda temp: Path(temp).write_text(text))


def load_pretrained(
    directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> HybridLM:
    """The model saved by :func:`save_pretrained`.

    Raises:
        ValueError: one line naming the directory or file and what is wrong.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such checkpoint directory")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{directory}: missing {path.name}")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    try:
        config = HybridConfig.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    model = HybridLM(config)
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
    if config.tie_embeddings:
        state["lm_head.weight"] = state.get("embedding.weight")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        detail = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ValueError(f"{weights_path}: weights do not match {CONFIG_FILE} ({detail})") from None
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: weights do not match {CONFIG_FILE} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device=device, dtype=dtype).eval()


def load_model(
    directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> HybridLM:
    """A model from either of our checkpoint directories or a transformers one.

    A ``config.json`` with a ``model_type`` key is a transformers directory (converted with
    :func:`hybrid.convert.from_hf`); otherwise it is ours (:func:`load_pretrained`).
    """
    config_path = Path(directory) / CONFIG_FILE
    if config_path.is_file():
        try:
            is_hf = "model_type" in json.loads(config_path.read_text())
        except json.JSONDecodeError:
            is_hf = False  # load_pretrained reports the bad JSON
        if is_hf:
            from hybrid.convert import from_hf

            return from_hf(directory, dtype=dtype).to(device)
    return load_pretrained(directory, device=device, dtype=dtype)

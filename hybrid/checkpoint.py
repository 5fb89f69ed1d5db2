"""Model directories: ``config.json`` (the HybridConfig) plus ``model.safetensors``.

The format every later tool reads (generation, evaluation, conversion): a directory that
loads without the recipe that trained it. Files are written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from hybrid.atomic import atomic_write, atomic_write_text
from hybrid.checksum import (
    CHECKPOINT_KEY,
    METADATA_KEY,
    structure_digest,
    tensor_digest,
    verify_digest,
)
from hybrid.config import HybridConfig
from hybrid.model import HybridLM
from hybrid.outputs import require_output_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def require_trusted_modules(config: Any, where: str | Path, trust_remote_code: bool) -> None:
    """Refuse a stored config whose ``modules`` list names modules not imported yet, unless
    ``trust_remote_code``: importing them runs their code, so a downloaded checkpoint could
    execute anything (as transformers' ``trust_remote_code``). Modules this process has
    already imported (a user's own blocks) run nothing new and pass.

    Raises:
        ValueError: one line naming the file and the modules.
    """
    modules = config.get("modules") if isinstance(config, dict) else None
    if not modules or trust_remote_code or not isinstance(modules, list):
        return  # a malformed list is reported by HybridConfig
    new = [name for name in modules if not (isinstance(name, str) and name in sys.modules)]
    if new:
        raise ValueError(
            f"{where}: modules: loading this checkpoint imports {', '.join(map(repr, new))}, "
            "which runs their code; pass --trust-remote-code (trust_remote_code=True) if you "
            "trust them"
        )


def save_pretrained(model: HybridLM, directory: str | Path) -> None:
    """Write ``model``'s config and weights into ``directory`` (created if needed).

    Raises:
        ValueError: one line naming ``directory`` if it (or a parent) is a file or not writable.
    """
    from safetensors.torch import save_file

    directory = require_output_dir(directory, "save_pretrained")
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if not (model.config.tie_embeddings and name == "lm_head.weight")
    }
    metadata = {METADATA_KEY: tensor_digest(state)}
    atomic_write(
        directory / WEIGHTS_FILE, lambda temporary: save_file(state, temporary, metadata=metadata)
    )
    atomic_write_text(directory / CONFIG_FILE, json.dumps(model.config.to_dict(), indent=2))


def load_pretrained(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> HybridLM:
    """The model saved by :func:`save_pretrained`.

    A config whose ``modules`` would import code not yet imported is refused unless
    ``trust_remote_code`` (see :func:`require_trusted_modules`).

    Raises:
        ValueError: one line naming the directory or file and what is wrong.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such checkpoint directory")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{directory}: missing {path.name}")
    data = read_config_json(config_path)
    require_trusted_modules(data, config_path, trust_remote_code)
    try:
        config = HybridConfig.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    model = HybridLM(config)
    try:
        state = load_file(weights_path)
        with safe_open(str(weights_path), framework="pt") as file:
            expected = (file.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
    verify_digest(state, expected, str(weights_path))
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


TRAINING_META_KEY = "hybrid"  # our metadata inside a Lightning training checkpoint


def read_training_checkpoint(path: str | Path) -> dict:
    """The model config, tokenizer and weights inside a Lightning ``.ckpt`` of ``hybrid train``.

    Loaded with ``weights_only=True`` (no code runs from the file) and memory-mapped.
    Returns ``{"meta": {...config, fingerprint, tokenizer_json, recipe}, "state_dict": {...}}``
    with the model's own parameter names.

    Raises:
        ValueError: one line naming the file: missing, corrupt, or not from ``hybrid train``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a bad file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or TRAINING_META_KEY not in checkpoint:
        raise ValueError(f"{path}: not a checkpoint written by hybrid train (no model config)")
    expected = checkpoint.pop(CHECKPOINT_KEY, None)
    if expected is not None and structure_digest(checkpoint) != expected:
        raise ValueError(f"{path}: content does not match its checksum (the file is damaged)")
    prefix = "model."
    state = {
        name[len(prefix) :]: tensor
        for name, tensor in checkpoint.get("state_dict", {}).items()
        if name.startswith(prefix)
    }
    return {"meta": checkpoint[TRAINING_META_KEY], "state_dict": state}


def load_training_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> HybridLM:
    """The model of a ``hybrid train`` checkpoint (see :func:`read_training_checkpoint`);
    ``trust_remote_code`` as in :func:`load_pretrained`."""
    content = read_training_checkpoint(path)
    require_trusted_modules(content["meta"]["config"], path, trust_remote_code)
    try:
        config = HybridConfig.from_dict(content["meta"]["config"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    model = HybridLM(config)
    try:
        model.load_state_dict(content["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not match the stored config ({error})") from None
    return model.to(device=device, dtype=dtype).eval()


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory stands for its exported ``model/`` when complete (config and weights),
    else ``checkpoints/last.ckpt``; anything else is returned unchanged."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        model = path / "model"
        # A complete export only: a run killed while exporting leaves model/ partial.
        if (model / CONFIG_FILE).is_file() and (model / WEIGHTS_FILE).is_file():
            return model
        if (path / "checkpoints" / "last.ckpt").is_file():
            return path / "checkpoints" / "last.ckpt"
        if model.exists():
            return model  # whose loading then names what is missing
    return path


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The model config (plain data, :meth:`HybridConfig.to_dict`) of any checkpoint
    :func:`load_model` reads, without reading its weights: a transformers directory's
    ``config.json`` is converted (:mod:`hybrid.convert`).

    Raises:
        ValueError: one line naming the path and what is wrong.
    """
    path = resolve_checkpoint(path)
    if path.is_file():
        return read_training_checkpoint(path)["meta"]["config"]
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{path}: missing {CONFIG_FILE}")
    data = read_config_json(config_path)
    if isinstance(data, dict) and "model_type" in data:
        from hybrid.convert import read_hf_directory_config

        return read_hf_directory_config(path)[2].to_dict()
    return data


def read_config_json(path: Path) -> Any:
    """The JSON in ``path`` (a checkpoint's config.json), failing in one line naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def load_model(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> HybridLM:
    """A model from any checkpoint we know: our model directory, a ``hybrid train`` run
    directory or ``.ckpt`` file, or a transformers directory. ``trust_remote_code``: see
    :func:`require_trusted_modules`.

    A ``config.json`` with a ``model_type`` key is a transformers directory (converted with
    :func:`hybrid.convert.from_hf`); otherwise it is ours (:func:`load_pretrained`).
    """
    directory = resolve_checkpoint(directory)
    if directory.is_file():
        return load_training_checkpoint(
            directory, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
    config_path = Path(directory) / CONFIG_FILE
    if config_path.is_file():
        try:
            is_hf = "model_type" in json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            is_hf = False  # load_pretrained reports the bad JSON
        if is_hf:
            from hybrid.convert import from_hf

            return from_hf(directory, dtype=dtype).to(device)
    return load_pretrained(
        directory, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )

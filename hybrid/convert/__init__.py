"""Hugging Face interop: load transformers checkpoints as HybridLM and write them back.

``from_hf(directory)`` reads a directory written by transformers' ``save_pretrained``
(config.json plus safetensors) for the model types in :data:`CONVERTERS`; ``to_hf(model,
directory, model_type)`` writes one that transformers loads.

One module per model type (llama, mamba, falcon_mamba, mamba2, bamba, jamba, nemotron_h,
falcon_h1, granitemoehybrid, lfm2, qwen3_next, olmo_hybrid, kimi_linear: :class:`Converter`;
falcon_mamba is mamba's plain Mamba-1 stack with weight-free inner norms), each its tensor names
as one table (:mod:`~hybrid.convert.mapping`: the engine that applies a table in both
directions), built from the block families several types share (:mod:`~hybrid.convert.blocks`:
attention, MLP, Mamba-2 / Mamba-1 mixers, experts, Qwen3-Next's fused projections, and their
config keys);
:mod:`~hybrid.convert.hf_config` holds what their config sides share,
:mod:`~hybrid.convert.common` model directories and errors.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import torch

from hybrid.config import HybridConfig
from hybrid.convert.common import (
    Converter,
    check_hf_types,
    read_hf_config,
    read_hf_weights,
    write_hf,
)
from hybrid.model import HybridLM

# model_type -> module of hybrid.convert implementing Converter
CONVERTERS = {
    "llama": "llama",
    "mamba": "mamba",
    "falcon_mamba": "falcon_mamba",
    "mamba2": "mamba2",
    "bamba": "bamba",
    "jamba": "jamba",
    "nemotron_h": "nemotron_h",
    "falcon_h1": "falcon_h1",
    "granitemoehybrid": "granitemoehybrid",
    "lfm2": "lfm2",
    "qwen3_next": "qwen3_next",
    "olmo_hybrid": "olmo_hybrid",
    "kimi_linear": "kimi_linear",
}


def converter(model_type: str) -> Converter:
    """The converter module for a transformers ``model_type``."""
    if model_type not in CONVERTERS:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(CONVERTERS)}"
        )
    return importlib.import_module(f"hybrid.convert.{CONVERTERS[model_type]}")


def read_hf_directory_config(directory: Path) -> tuple[dict, Converter, HybridConfig]:
    """A transformers directory's ``config.json``, its converter and our config of it.

    Raises:
        ValueError: one line naming the file: unreadable, an unsupported type or option.
    """
    hf = read_hf_config(directory)
    module = converter(hf.get("model_type", "<missing>"))
    check_hf_types(hf, directory / "config.json")
    try:
        return hf, module, module.config_from_hf(hf)
    except (TypeError, KeyError, AttributeError, IndexError) as error:  # a malformed config
        raise ValueError(
            f"{directory / 'config.json'}: cannot be read as a {module.MODEL_TYPE} config "
            f"({type(error).__name__}: {error})"
        ) from None


def from_hf(directory: str | Path, *, dtype: torch.dtype | None = None) -> HybridLM:
    """A HybridLM with the weights of a transformers model directory.

    Raises:
        ValueError: one line naming an unsupported model type or config option, or a missing
            or unreadable file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such directory")
    hf, module, config = read_hf_directory_config(directory)
    weights = read_hf_weights(directory)
    try:
        state = module.weights_from_hf(weights, hf, config)
    except KeyError as error:
        raise ValueError(
            f"{directory}: the weights lack tensor {error} (for {module.MODEL_TYPE})"
        ) from None
    except (TypeError, IndexError, RuntimeError) as error:  # shapes that the config contradicts
        raise ValueError(
            f"{directory}: the weights do not fit config.json ({type(error).__name__}: {error})"
        ) from None
    model = HybridLM(config)
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state["embedding.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not map onto the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return model.to(dtype=dtype).eval() if dtype else model.eval()


def to_hf(model: HybridLM, directory: str | Path, model_type: str) -> None:
    """Write ``model`` as a transformers ``model_type`` directory (with tokenizer.json if the
    model was loaded from a directory that had one is up to the caller)."""
    module = converter(model_type)
    hf = module.config_to_hf(model.config)  # fails on what model_type cannot hold
    state = module.weights_to_hf(dict(model.state_dict()), model.config)
    write_hf(Path(directory), hf, state)


def copy_tokenizer(source: str | Path, destination: str | Path) -> None:
    """Copy tokenizer files (tokenizer.json and its configs) between model directories."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = Path(source) / name
        if path.is_file():
            shutil.copy(path, Path(destination) / name)

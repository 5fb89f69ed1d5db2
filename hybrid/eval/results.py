"""``results.json``: what an evaluation measured, with how and on what it was measured."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from hybrid.atomic import atomic_write_text
from hybrid.provenance import source_commit

RESULTS_FILE = "results.json"


def save_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write ``results`` as JSON to ``path`` (a file, or a directory that gets ``results.json``),
    atomically. Returns the file written."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / RESULTS_FILE
    return atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def load_results(path: str | Path) -> dict[str, Any]:
    """The results written by an evaluation: ``path`` is the ``results.json`` file or the
    directory holding it.

    Raises:
        ValueError: no such file, or not a results file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no such results file")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(results, dict) or "task" not in results:
        raise ValueError(f"{path}: not an evaluation results file (no 'task')")
    return results


def run_meta(model: torch.nn.Module | None, tokenizer: Any | None) -> dict[str, Any]:
    """Where and with what an evaluation ran: time, versions, device, the model's shape."""
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "commit": source_commit(),
    }
    if model is not None:
        weight = model.embedding.weight
        config = model.config
        meta["device"] = (
            torch.cuda.get_device_name(weight.device)
            if weight.device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()})"
        )
        meta["model"] = {
            "pattern": config.pattern_string,
            "d_model": config.d_model,
            "sublayers": len(config.layers),
            "vocab_size": config.vocab_size,
            "parameters": model.num_parameters(),
            "active_parameters": model.num_parameters(active=True),
            "dtype": str(weight.dtype).removeprefix("torch."),
        }
    if tokenizer is not None:
        meta["tokenizer"] = {
            "kind": type(tokenizer).__name__,
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": tokenizer.fingerprint,
        }
    return meta

"""What the evaluations read around a checkpoint: the training length and where results go."""

from __future__ import annotations

from pathlib import Path

import yaml

from hybrid.checkpoint import CONFIG_FILE, read_training_checkpoint, resolve_checkpoint

RECIPE_FILE = "recipe.yaml"


def is_run_directory(path: str | Path) -> bool:
    """A ``hybrid train`` run directory: no ``config.json``, but ``model/`` or ``checkpoints/``."""
    path = Path(path)
    return (
        path.is_dir()
        and not (path / CONFIG_FILE).is_file()
        and ((path / "model").is_dir() or (path / "checkpoints").is_dir())
    )


def default_out_dir(checkpoint: str | Path, task: str) -> Path:
    """``RUN/eval/TASK`` for a run directory, else ``eval/TASK`` next to the checkpoint."""
    path = Path(checkpoint).resolve()
    if is_run_directory(path):
        return path / "eval" / task
    return path.parent / "eval" / task


def training_length(checkpoint: str | Path) -> int | None:
    """The ``data.seq_len`` the checkpoint was trained with, if recorded: in a ``.ckpt``'s
    metadata, or in the ``recipe.yaml`` of the run directory it belongs to."""
    path = Path(checkpoint)
    resolved = resolve_checkpoint(path)
    if resolved.is_file():
        try:
            recipe = read_training_checkpoint(resolved)["meta"].get("recipe") or {}
        except ValueError:
            return None
        return _seq_len(recipe)
    candidates = [path / RECIPE_FILE]
    if resolved.name == "model":  # a run directory's exported model
        candidates.append(resolved.parent / RECIPE_FILE)
    for candidate in candidates:
        if candidate.is_file():
            try:
                return _seq_len(yaml.safe_load(candidate.read_text()) or {})
            except yaml.YAMLError:
                return None
    return None


def _seq_len(recipe: dict) -> int | None:
    value = (recipe.get("data") or {}).get("seq_len") if isinstance(recipe, dict) else None
    return value if isinstance(value, int) and value > 0 else None

"""Evaluation results into a W&B run: each list of records as a ``wandb.Table``, each plot as
a ``wandb.Image``, the scalar results as the run summary. Offline mode needs no account."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_PROJECT = "hybrid"


def tables(results: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Every top-level list of dicts in ``results`` (``rows``, ``samples``, ``positions``, ...)
    as (columns, data); values that are not scalars are written as JSON text."""
    found = {}
    for key, value in results.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(column for record in value for column in record))
            data = [[_cell(record.get(column)) for column in columns] for record in value]
            found[key] = (columns, data)
    return found


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


def summary(results: dict[str, Any]) -> dict[str, float]:
    """Scalar results worth a glance: ``accuracy`` (overall, or per variant), the mean loss
    at each length, the decode ms/token at each context."""
    found: dict[str, float] = {}
    accuracy = results.get("accuracy")
    if isinstance(accuracy, (int, float)):
        found["accuracy"] = float(accuracy)
    elif isinstance(accuracy, dict):
        found.update({f"accuracy/{name}": float(value) for name, value in accuracy.items()})
    for row in results.get("rows", []):
        if "mean_loss" in row:
            found[f"mean_loss/{row['length']}"] = float(row["mean_loss"])
        if "ms_per_token" in row:
            found[f"ms_per_token/{row['context']}"] = float(row["ms_per_token"])
    return found


def log_results(
    results: dict[str, Any],
    images: Sequence[Path],
    *,
    directory: Path,
    mode: str = "offline",
    project: str = DEFAULT_PROJECT,
    name: str | None = None,
) -> Path:
    """Log ``results`` and ``images`` to a new W&B run (``job_type="eval"``) whose files go
    under ``directory/wandb``; returns the run's local directory (``wandb sync`` it when
    offline)."""
    import wandb

    task = results["task"]
    config = {"task": task, "settings": results.get("settings", {}), **results.get("meta", {})}
    run = wandb.init(
        project=project, name=name, dir=str(directory), mode=mode, job_type="eval",
        config=config, settings=wandb.Settings(silent=True, console="off"),
    )  # fmt: skip
    try:
        payload: dict[str, Any] = {
            f"{task}/{key}": wandb.Table(columns=columns, data=data)
            for key, (columns, data) in tables(results).items()
        }
        payload.update({f"{task}/{Path(image).stem}": wandb.Image(str(image)) for image in images})
        run.log(payload)
        for key, value in summary(results).items():
            run.summary[f"{task}/{key}"] = value
        local = Path(run.dir).parent  # .../offline-run-<time>-<id>/files -> the run directory
    finally:
        run.finish()
    return local

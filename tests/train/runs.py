"""Reading a run's CSV log back."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """All CSV rows of every launch of a run, in order (values as floats, blanks dropped)."""
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from the CSV log."""
    return {int(r["step"]): r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}

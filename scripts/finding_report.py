"""Set-up shared by the finding report scripts (``scripts/finding_*_report.py``): their
arguments, the JSON + markdown outputs, and the matplotlib figure they save."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def report_parser(description: str, runs_help: str) -> argparse.ArgumentParser:
    """A parser with ``--runs`` (where the runs are) and ``--out`` (default docs/findings)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", default="runs", help=runs_help)
    parser.add_argument("--out", default="docs/findings")
    return parser


def write_report(out: Path, stem: str, data: Any, lines: list[str]) -> None:
    """Writes ``OUT/STEM.json`` (the results read) and ``OUT/STEM.md`` (the table ``lines``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def subplots(*args: Any, **kwargs: Any):
    """``matplotlib.pyplot.subplots`` on the file-only Agg backend: (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(figure, out: Path, stem: str) -> None:
    """Saves ``figure`` as ``OUT/STEM.png`` (tight layout, 120 dpi)."""
    figure.tight_layout()
    figure.savefig(out / f"{stem}.png", dpi=120)

"""Set-up shared by the finding report scripts (``scripts/finding_*_report.py``): their
arguments, the JSON + markdown outputs, and the matplotlib figure they draw and save."""

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


def accuracy_axis(axis, xlabel: str, ylabel: str | None = None) -> None:
    """The findings' accuracy plot: a log2 x axis, accuracy from 0 to 1 with a margin, a grid."""
    axis.set_xscale("log", base=2)
    axis.set(xlabel=xlabel, ylim=(-0.05, 1.05))
    if ylabel is not None:
        axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)


def save_figure(figure, out: Path, stem: str) -> None:
    """Saves ``figure`` as ``OUT/STEM.png`` (tight layout, 120 dpi)."""
    figure.tight_layout()
    figure.savefig(out / f"{stem}.png", dpi=120)

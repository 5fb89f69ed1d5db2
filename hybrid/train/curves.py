"""The run's loss curve: train and validation loss against tokens, from its CSV logs.

The CSV logger writes ``RUN/csv/version_N/metrics.csv`` (a new version per resumed session);
:func:`read_losses` merges them, a later session's value winning for a step logged twice, and
:func:`plot_loss_curve` draws ``RUN/loss_curve.png`` with the unigram baseline as a line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from hybrid.atomic import atomic_write

__all__ = ["LossCurve", "plot_loss_curve", "read_losses"]


@dataclass
class LossCurve:
    """Losses by optimizer step (1-based: the loss after that many steps)."""

    train: dict[int, float] = field(default_factory=dict)
    val: dict[int, float] = field(default_factory=dict)


def _versions(run_dir: Path) -> list[Path]:
    def number(path: Path) -> int:
        suffix = path.parent.name.removeprefix("version_")
        return int(suffix) if suffix.isdigit() else -1

    return sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=number)


def read_losses(run_dir: str | Path, max_steps: int) -> LossCurve:
    """``train/loss`` and ``val/loss`` of every CSV log of the run directory."""
    curve = LossCurve()
    for path in _versions(Path(run_dir)):
        with path.open(newline="", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                if not row.get("step"):
                    continue
                # Lightning logs the 0-based index of the batch that produced the value; the
                # validation after fit logs max_steps itself (the same loss as the last one).
                step = min(int(row["step"]) + 1, max_steps)
                if row.get("train/loss"):
                    curve.train[step] = float(row["train/loss"])
                if row.get("val/loss"):
                    curve.val[step] = float(row["val/loss"])
    return curve


def plot_loss_curve(
    run_dir: str | Path, tokens_per_step: int, max_steps: int, unigram_loss: float,
    title: str = "",
) -> Path | None:  # fmt: skip
    """Draw ``RUN/loss_curve.png`` (atomically); None when the run logged no loss yet."""
    curve = read_losses(run_dir, max_steps)
    if not curve.train and not curve.val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, losses, style in (("train", curve.train, "-"), ("validation", curve.val, "o-")):
        if losses:
            steps = sorted(losses)
            ax.plot([s * tokens_per_step for s in steps], [losses[s] for s in steps], style,
                    label=name, markersize=4)  # fmt: skip
    ax.axhline(unigram_loss, color="grey", linestyle="--",
               label=f"unigram baseline ({unigram_loss:.3f})")  # fmt: skip
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    highest = max([unigram_loss, *curve.train.values(), *curve.val.values()])
    ax.set_ylim(0, highest * 1.25)  # room for the legend above the curves
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(run_dir) / "loss_curve.png"
    atomic_write(path, lambda temporary: fig.savefig(temporary, format="png"))
    plt.close(fig)
    return path

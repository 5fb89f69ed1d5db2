"""PNG plots drawn from evaluation results (the dicts in ``results.json``), apart from the
computation, so a notebook can redraw them from :func:`hybrid.eval.load_results`."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybrid.atomic import atomic_write

MIB = 2**20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(results: dict[str, Any], what: str) -> str:
    model = results.get("meta", {}).get("model")
    if not model:
        return what
    shape = f"d_model {model['d_model']}, {model['parameters']:,} parameters"
    return f"{what}\n{model['pattern']} ({shape})"


def _length_label(length: int) -> str:
    """4096 -> '4K'; 1000 -> '1000'."""
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def _log2_lengths(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_length_label(n) for n in lengths])
    ax.minorticks_off()


def plot_passkey(results: dict[str, Any], path: str | Path) -> Path:
    """The usual retrieval heatmap: depth (rows, 0 at the top) x length (columns), each cell
    coloured and labelled by its accuracy."""
    plt = _pyplot()
    lengths = results["settings"]["lengths"]
    depths = results["settings"]["depths"]
    cells = {(r["length"], r["depth"]): r["accuracy"] for r in results["rows"]}
    grid = [[cells[length, depth] for length in lengths] for depth in depths]
    fig, ax = plt.subplots(
        figsize=(1.2 + 0.9 * len(lengths), 1.4 + 0.45 * len(depths)), constrained_layout=True
    )
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for row, values in enumerate(grid):
        for column, value in enumerate(values):
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(_title(results, f"Passkey retrieval (mean accuracy {results['accuracy']:.2f})"),
                 fontsize=9)  # fmt: skip
    return _save(fig, path)


def plot_niah(results: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against context length, one line per variant."""
    plt = _pyplot()
    lengths = results["settings"]["lengths"]
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for variant in results["settings"]["variants"]:
        rows = sorted((r for r in results["rows"] if r["variant"] == variant),
                      key=lambda r: r["length"])  # fmt: skip
        ax.plot([r["length"] for r in rows], [r["accuracy"] for r in rows], "o-", label=variant)
    _log2_lengths(ax, lengths)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (exact match)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(_title(results, "Needle in a haystack (RULER-style)"), fontsize=9)
    return _save(fig, path)


def plot_ppl_length(results: dict[str, Any], path: str | Path) -> Path:
    """Mean loss (and perplexity on the right axis) against evaluation length; the training
    length marked."""
    plt = _pyplot()
    rows = results["rows"]
    lengths = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    ax.plot(lengths, [r["mean_loss"] for r in rows], "o-")
    ax.axvline(results["settings"]["train_length"], color="grey", linestyle="--",
               label="training length")  # fmt: skip
    _log2_lengths(ax, lengths)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    low, high = ax.get_ylim()
    right = ax.twinx()
    right.set_ylim(math.exp(low), math.exp(high))
    right.set_yscale("log")
    right.set_ylabel("perplexity")
    ax.set_title(_title(results, "Loss vs context length"), fontsize=9)
    return _save(fig, path)


def plot_ppl_position(results: dict[str, Any], path: str | Path) -> Path:
    """Mean loss per bucket of positions; the training length marked."""
    plt = _pyplot()
    buckets = results["positions"]
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    ax.step([b["start"] for b in buckets] + [buckets[-1]["end"]],
            [b["mean_loss"] for b in buckets] + [buckets[-1]["mean_loss"]],
            where="post")  # fmt: skip
    ax.axvline(results["settings"]["train_length"], color="grey", linestyle="--",
               label="training length")  # fmt: skip
    ax.set_xlabel(f"position (buckets of {results['settings']['bucket_size']} tokens)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(_title(results, "Loss vs position"), fontsize=9)
    return _save(fig, path)


def plot_decode(results: dict[str, Any], path: str | Path) -> Path:
    """Two panels against context length: decode ms/token (median, quartile band) and the
    inference cache in MiB."""
    plt = _pyplot()
    rows = sorted(results["rows"], key=lambda r: r["context"])
    contexts = [r["context"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    (line,) = left.plot(contexts, [r["ms_per_token"] for r in rows], "o-")
    left.fill_between(contexts, [r["ms_per_token_p25"] for r in rows],
                      [r["ms_per_token_p75"] for r in rows], color=line.get_color(), alpha=0.15,
                      linewidth=0)  # fmt: skip
    left.set_ylabel("ms / token")
    left.set_ylim(bottom=0)
    left.set_title("Decode latency (median, band: quartiles)")
    right.plot(contexts, [r["cache_bytes"] / MIB for r in rows], "s-")
    right.set_ylabel("cache MiB")
    right.set_ylim(bottom=0)
    right.set_title("Inference cache per sequence")
    for ax in (left, right):
        _log2_lengths(ax, contexts)
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(_title(results, "Decode cost"), fontsize=9)
    return _save(fig, path)


def plot_mqar(results: dict[str, Any], path: str | Path) -> Path:
    """MQAR accuracy against the number of key-value pairs, one line per sequence length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for seq_len in results["settings"]["seq_lens"]:
        rows = sorted((r for r in results["rows"] if r["seq_len"] == seq_len),
                      key=lambda r: r["n_kv_pairs"])  # fmt: skip
        if rows:
            ax.plot([r["n_kv_pairs"] for r in rows], [r["accuracy"] for r in rows], "o-",
                    label=f"sequence length {seq_len}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(_title(results, "Multi-query associative recall"), fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    # The temporary name has no image suffix, so the format is named.
    atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=120, format=path.suffix[1:]))
    _pyplot().close(fig)
    return path


PLOTS: dict[str, list[tuple[str, Callable[[dict[str, Any], Path], Path]]]] = {
    "passkey": [("passkey_heatmap.png", plot_passkey)],
    "niah": [("niah_accuracy.png", plot_niah)],
    "ppl": [("ppl_vs_length.png", plot_ppl_length), ("loss_vs_position.png", plot_ppl_position)],
    "decode": [("decode_cost.png", plot_decode)],
    "mqar": [("mqar_accuracy.png", plot_mqar)],
}
"""Each task's plots: file name and drawing function. A task with no entry draws nothing."""


def draw(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw every plot of ``results['task']`` into ``out_dir``; returns the files written."""
    return [plot(results, Path(out_dir) / name) for name, plot in PLOTS.get(results["task"], [])]

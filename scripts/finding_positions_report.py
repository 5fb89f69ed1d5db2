"""Finding 5: length extrapolation of positional encodings (sinusoidal, RoPE, ALiBi, none, and
a Mamba-2 hybrid with NoPE attention), trained at 128 tokens and evaluated at 1x-8x.

Reads ``RUNS/positions_{encoding}/eval/ppl/results.json`` (written by ``hybrid eval ppl``) and
writes ``OUT/positions.json``, ``OUT/positions.md`` (perplexity of the first k x 128 tokens,
and the mean loss of each stretch of positions) and ``OUT/positions.png`` (loss against
position, the training length marked).
"""

from __future__ import annotations

from pathlib import Path

from finding_report import report_parser, save_figure, subplots, write_report

from hybrid.eval import load_results

ENCODINGS = {
    "sinusoidal": "*-*-*-*- sinusoidal",
    "rope": "*-*-*-*- RoPE",
    "alibi": "*-*-*-*- ALiBi",
    "nope": "*-*-*-*- no encoding",
    "mamba2_nope": "M-*-M-*- Mamba-2 + NoPE attention",
}
TRAINING_LENGTH = 128
STRETCHES = [(0, 128), (128, 256), (256, 512), (512, 1024)]


def main() -> None:
    args = report_parser(__doc__.splitlines()[0], "directory holding the runs").parse_args()
    out = Path(args.out)
    results = {
        name: load_results(Path(args.runs) / f"positions_{name}" / "eval" / "ppl")
        for name in ENCODINGS
    }
    lengths = sorted({row["length"] for r in results.values() for row in r["rows"]})
    lines = [
        f"Perplexity of the first L tokens (bytes) of each document, trained at {TRAINING_LENGTH}:",
        "",
        "| model | " + " | ".join(f"{n} ({n // TRAINING_LENGTH}x)" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for name, result in results.items():
        by_length = {row["length"]: row["perplexity"] for row in result["rows"]}
        cells = " | ".join(f"{by_length.get(n, float('nan')):.3f}" for n in lengths)
        lines.append(f"| {ENCODINGS[name]} | {cells} |")
    lines += [
        "",
        "Mean loss (nats/token) at positions in each stretch (beyond 128 is extrapolation):",
        "",
        "| model | " + " | ".join(f"{a}-{b}" for a, b in STRETCHES) + " |",
        "|---|" + "---:|" * len(STRETCHES),
    ]
    for name, result in results.items():
        cells = []
        for start, end in STRETCHES:
            inside = [p for p in result["positions"] if start <= p["start"] and p["end"] <= end]
            weight = sum(p["end"] - p["start"] for p in inside)
            mean = sum(p["mean_loss"] * (p["end"] - p["start"]) for p in inside) / weight
            cells.append(f"{mean:.3f}")
        lines.append(f"| {ENCODINGS[name]} | " + " | ".join(cells) + " |")
    write_report(out, "positions", results, lines)
    print("\n".join(lines))

    figure, axis = subplots(figsize=(6, 3.8))
    for name, result in results.items():
        middles = [(p["start"] + p["end"]) / 2 for p in result["positions"]]
        axis.plot(middles, [p["mean_loss"] for p in result["positions"]], label=ENCODINGS[name])
    axis.axvline(TRAINING_LENGTH, color="grey", linestyle="--", linewidth=1)
    axis.text(TRAINING_LENGTH * 1.05, axis.get_ylim()[1] * 0.97, "training length", fontsize=8,
              va="top", color="grey")  # fmt: skip
    axis.set_xscale("log", base=2)
    axis.set(xlabel="position (bytes)", ylabel="loss (nats/token)",
             title="Length extrapolation, trained at 128 bytes")  # fmt: skip
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    save_figure(figure, out, "positions")


if __name__ == "__main__":
    main()

"""Finding 1, the width axis: MQAR test accuracy of the Mamba-2 recipe against model width.

Reads ``RUNS/mqar_mamba2_d{W}/eval/mqar/results.json`` for each width W (written by
``hybrid eval mqar``; ``RUNS/mqar_attention`` too when present, as the reference) and writes
``OUT/mqar_width.json``, ``OUT/mqar_width.md`` (accuracy by width and number of key-value
pairs at the training length) and ``OUT/mqar_width.png``.
"""

from __future__ import annotations

from pathlib import Path

from finding_report import accuracy_axis, report_parser, save_figure, subplots, write_report

from hybrid.eval import load_results


def accuracy_by_pairs(result: dict, seq_len: int) -> dict[int, float]:
    return {r["n_kv_pairs"]: r["accuracy"] for r in result["rows"] if r["seq_len"] == seq_len}


def main() -> None:
    parser = report_parser(__doc__.splitlines()[0], "directory holding the runs")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seq-len", type=int, default=64, help="the training length")
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    results = {
        width: load_results(runs / f"mqar_mamba2_d{width}" / "eval" / "mqar")
        for width in sorted(args.widths)
    }
    attention_dir = runs / "mqar_attention" / "eval" / "mqar"
    attention = load_results(attention_dir) if attention_dir.is_dir() else None
    curves = {width: accuracy_by_pairs(r, args.seq_len) for width, r in results.items()}
    pairs = sorted({p for curve in curves.values() for p in curve})
    lines = [
        "| Mamba-2 `M-M-` d_model | parameters | "
        + " | ".join(f"{p} pairs" for p in pairs) + " |",
        "|---:|---:|" + "---:|" * len(pairs),
    ]  # fmt: skip
    for width, result in results.items():
        params = result["meta"]["model"]["parameters"]
        cells = " | ".join(f"{curves[width].get(p, float('nan')):.3f}" for p in pairs)
        lines.append(f"| {width} | {params:,} | {cells} |")
    if attention is not None:
        reference = accuracy_by_pairs(attention, args.seq_len)
        cells = " | ".join(f"{reference.get(p, float('nan')):.3f}" for p in pairs)
        lines.append(f"| attention `*-*-`, d_model 64 | | {cells} |")
    data = {"mamba2": {str(w): r for w, r in results.items()}, "attention": attention}
    write_report(out, "mqar_width", data, lines)

    figure, axis = subplots(figsize=(5.5, 3.5))
    for p in pairs:
        widths = [w for w in curves if p in curves[w]]
        axis.plot(widths, [curves[w][p] for w in widths], "o-", label=f"Mamba-2, {p} pairs")
    accuracy_axis(axis, "d_model", f"MQAR test accuracy (length {args.seq_len})")
    axis.legend(fontsize=8)
    save_figure(figure, out, "mqar_width")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

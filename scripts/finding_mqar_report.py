"""Findings 1-2: MQAR test accuracy of the attention, Mamba-2, hybrid, DeltaNet, KDA, conv runs.

Reads ``RUNS/mqar_{attention,mamba2,hybrid,deltanet,kda,shortconv}/eval/mqar/results.json``
(written by ``hybrid eval mqar``) and writes ``OUT/mqar.json``, ``OUT/mqar.md`` (a table of
accuracy by sequence length and number of key-value pairs) and ``OUT/mqar.png``.
"""

from __future__ import annotations

from pathlib import Path

from finding_report import accuracy_axis, report_parser, save_figure, subplots, write_report

from hybrid.eval import load_results

LAYOUTS = {
    "attention": "*-*-",
    "mamba2": "M-M-",
    "hybrid": "M-*-",
    "deltanet": "D-D-",
    "kda": "K-K-",
    "shortconv": "C-C-",
}


def main() -> None:
    args = report_parser(__doc__.splitlines()[0], "directory holding the six runs").parse_args()
    out = Path(args.out)
    results = {
        layout: load_results(Path(args.runs) / f"mqar_{layout}" / "eval" / "mqar")
        for layout in LAYOUTS
    }

    cells = sorted(
        {(r["seq_len"], r["n_kv_pairs"]) for res in results.values() for r in res["rows"]}
    )
    accuracy = {
        (layout, r["seq_len"], r["n_kv_pairs"]): r["accuracy"]
        for layout, res in results.items()
        for r in res["rows"]
    }
    lines = [
        "| sequence length | kv pairs | "
        + " | ".join(f"{k} `{p}`" for k, p in LAYOUTS.items())
        + " |",
        "|---:|---:|" + "---:|" * len(LAYOUTS),
    ]
    for seq_len, pairs in cells:
        values = " | ".join(
            f"{accuracy.get((k, seq_len, pairs), float('nan')):.3f}" for k in LAYOUTS
        )
        lines.append(f"| {seq_len} | {pairs} | {values} |")
    write_report(out, "mqar", results, lines)

    seq_lens = sorted({s for s, _ in cells})
    figure, axes = subplots(1, len(seq_lens), figsize=(4 * len(seq_lens), 3.5), sharey=True)
    for axis, seq_len in zip(list(axes) if len(seq_lens) > 1 else [axes], seq_lens, strict=True):
        for layout, pattern in LAYOUTS.items():
            points = [(p, accuracy[(layout, s, p)]) for s, p in cells if s == seq_len
                      and (layout, s, p) in accuracy]  # fmt: skip
            axis.plot(*zip(*points, strict=True), "o-", label=f"{layout} {pattern}")
        accuracy_axis(axis, "key-value pairs")
        axis.set_title(f"sequence length {seq_len}")
    (axes[0] if len(seq_lens) > 1 else axes).set_ylabel("MQAR test accuracy")
    (axes[0] if len(seq_lens) > 1 else axes).legend()
    save_figure(figure, out, "mqar")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

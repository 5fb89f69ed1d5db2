"""Finding 3: passkey accuracy of the full-attention and the two SWA-hybrid runs by length.

Reads ``RUNS/passkey_{attention,samba,mamba2_swa}/eval/passkey/results.json`` (written by
``hybrid eval passkey``) and writes ``OUT/passkey.json``, ``OUT/passkey.md`` (accuracy by
context length, over all depths, and by depth) and ``OUT/passkey.png``.
"""

from __future__ import annotations

from pathlib import Path

from finding_report import accuracy_axis, report_parser, save_figure, subplots, write_report

from hybrid.eval import load_results

LAYOUTS = {
    "attention": "*-*- (full RoPE attention)",
    "samba": "S-*- (Mamba-1 + SWA 128)",
    "mamba2_swa": "M-*- (Mamba-2 + SWA 128)",
}
TRAINING_LENGTH = 512


def main() -> None:
    args = report_parser(__doc__.splitlines()[0], "directory holding the runs").parse_args()
    out = Path(args.out)
    results = {
        layout: load_results(Path(args.runs) / f"passkey_{layout}" / "eval" / "passkey")
        for layout in LAYOUTS
    }

    def by_length(result: dict) -> dict[int, float]:
        cells: dict[int, list[int]] = {}
        for row in result["rows"]:
            counts = cells.setdefault(row["length"], [0, 0])
            counts[0] += row["correct"]
            counts[1] += row["trials"]
        return {length: correct / trials for length, (correct, trials) in sorted(cells.items())}

    curves = {layout: by_length(result) for layout, result in results.items()}
    lengths = sorted({length for curve in curves.values() for length in curve})
    lines = [
        "| layout | " + " | ".join(f"{n} ({n / TRAINING_LENGTH:g}x)" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for layout, curve in curves.items():
        cells = " | ".join(f"{curve.get(n, float('nan')):.2f}" for n in lengths)
        lines.append(f"| {layout} `{LAYOUTS[layout]}` | {cells} |")
    lines += ["", "By depth (rows: layout and depth; columns: context length):", ""]
    lines += ["| layout | depth | " + " | ".join(str(n) for n in lengths) + " |"]
    lines += ["|---|---:|" + "---:|" * len(lengths)]
    for layout, result in results.items():
        for depth in result["settings"]["depths"]:
            cells = {r["length"]: r["accuracy"] for r in result["rows"] if r["depth"] == depth}
            values = " | ".join(f"{cells.get(n, float('nan')):.2f}" for n in lengths)
            lines.append(f"| {layout} | {depth:g} | {values} |")
    write_report(out, "passkey", results, lines)

    figure, axis = subplots(figsize=(5.5, 3.5))
    for layout, curve in curves.items():
        axis.plot(list(curve), list(curve.values()), "o-", label=LAYOUTS[layout])
    axis.axvline(TRAINING_LENGTH, color="grey", linestyle=":", label="training length")
    accuracy_axis(axis, "context length (bytes)", "passkey accuracy")
    axis.legend(fontsize=8)
    save_figure(figure, out, "passkey")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

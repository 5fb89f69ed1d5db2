"""Finding 4 (Jamba): a 1 attention : 7 Mamba layout needs about 1/8 of the inference-cache
memory of the all-attention stack of the same size, at long context.

Counts, not timings: the cache bytes per sequence of each layout at each context length,
from each block's own allocation rule (the same numbers ``hybrid info`` prints and
``model.allocate_cache(...).nbytes`` allocates). Writes JSON, a markdown table and a plot.

    python3 scripts/finding_cache_memory.py --out docs/findings
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hybrid import HybridConfig
from hybrid.accounting import describe
from hybrid.units import human_bytes

# Jamba-v0.1's block at its width: 8 layers of (mixer, feed-forward), attention at layer 4,
# MoE on odd layers; the all-attention stack has the same layers with attention mixers.
WIDTH = {"d_model": 4096, "attention": {"n_heads": 32, "n_kv_heads": 8}}
LAYOUTS = {
    "jamba (1 attention : 7 Mamba-1)": "S-SES-SE*-SES-SE",
    "all attention (same layers)": "*-*E*-*E*-*E*-*E",
    "all Mamba-2 (same layers)": "M-MEM-MEM-MEM-ME",
}
CONTEXTS = [1024, 4096, 16384, 32768, 131072, 262144]


def measure() -> list[dict]:
    rows = []
    for name, pattern in LAYOUTS.items():
        config = HybridConfig(pattern=pattern, vocab_size=65536, **WIDTH)
        for context in CONTEXTS:
            info = describe(config, context, torch.bfloat16)
            rows.append({"layout": name, "pattern": pattern, "context": context,
                         "cache_bytes": info.cache_bytes})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/findings", help="output directory")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure()
    attention = {r["context"]: r["cache_bytes"] for r in rows if r["pattern"].startswith("*")}
    for row in rows:
        row["fraction_of_attention"] = row["cache_bytes"] / attention[row["context"]]
    (out / "cache_memory.json").write_text(json.dumps({"width": WIDTH, "rows": rows}, indent=2))

    lines = [
        "| layout | pattern | " + " | ".join(f"{c // 1024}K" for c in CONTEXTS) + " |",
        "|---|---|" + "---:|" * len(CONTEXTS),
    ]
    for name, pattern in LAYOUTS.items():
        cells = [
            f"{human_bytes(r['cache_bytes'])} ({r['fraction_of_attention']:.3f})"
            for r in rows
            if r["pattern"] == pattern
        ]
        lines.append(f"| {name} | `{pattern}` | " + " | ".join(cells) + " |")
    (out / "cache_memory.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, pattern in LAYOUTS.items():
        points = [(r["context"], r["cache_bytes"] / 2**30) for r in rows if r["pattern"] == pattern]
        axis.plot(*zip(*points, strict=True), marker="o", label=name)
    axis.set(
        xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache per sequence (GiB)"
    )
    axis.set_title("Inference cache, bf16 KV / fp32 SSM state, d_model 4096")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "cache_memory.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

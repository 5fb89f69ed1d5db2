"""Training-step cost of a loss on a few positions only, with and without flushing denormals.

A loss on a few positions per sequence (a passkey answer, an SFT response after a masked
prompt) leaves the output gradient zero almost everywhere. In a selective scan's backward the
state gradient then only decays between the labelled positions, geometrically, into subnormal
floats (below ~1.2e-38 in float32), which x86 CPUs process 10-100x slower than normal ones.
``trainer.flush_denormal`` (on by default) sets the CPU's flush-to-zero / denormals-are-zero
modes for a run, so those values become zeros.

This script measures the training step (forward, backward, AdamW) of the finding-3 recipes'
models (``recipes/findings/passkey_*.yaml``, and the Samba-like one with Mamba-2) on random
bytes, three ways taking turns in every round: the loss on every position; on the last
``--labelled`` positions only; the same with denormals flushed. Each measurement is the median
of ``--steps`` steps in a fresh process (the modes are per thread: a thread pool keeps the
modes it started with); the table gives the medians over the rounds and ratios against the
every-position step.

Usage: python scripts/bench_sparse_loss.py [--repeats 3] [--steps 5] [--labelled 6]
       [--out docs/bench_sparse_loss]
Writes OUT.json and OUT.md (a markdown table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

# Measure this checkout, whichever copy of the packages is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid import HybridLM
from hybrid.provenance import cpu_description
from hybrid.recipe import load_model_config

ROOT = Path(__file__).resolve().parents[1]

# (recipe, overrides) per model: finding 3's two, and its Samba-like one with Mamba-2.
RECIPES = {
    "attention *-*-": (ROOT / "recipes/findings/passkey_attention.yaml", []),
    "samba-like S-*-": (ROOT / "recipes/findings/passkey_samba.yaml", []),
    "mamba-2 M-*-": (ROOT / "recipes/findings/passkey_samba.yaml", ["model.pattern=M-*-"]),
}
VARIANTS = ("every position", "few positions", "few positions, flushed")


def make_step(model: str, batch: int, seqlen: int, labelled: int | None) -> Callable[[], None]:
    """One training step of RECIPES[model]; the loss on the last ``labelled`` positions (None:
    on all of them)."""
    torch.manual_seed(0)
    recipe, overrides = RECIPES[model]
    model = HybridLM(load_model_config(str(recipe), overrides)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (batch, seqlen + 1))
    targets = ids[:, 1:].clone()
    if labelled is not None:
        targets[:, :-labelled] = -100

    def step() -> None:
        logits = model(ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(model: str, variant: str, batch: int, seqlen: int, labelled: int, steps: int) -> float:
    """Median seconds of ``steps`` training steps (after two warm-up steps), in a fresh process.

    The flush modes are per thread and a thread pool keeps the modes it started with, so each
    measurement runs in its own process that sets them before its first parallel op.
    """
    torch.set_flush_denormal(variant == VARIANTS[2])
    step = make_step(model, batch, seqlen, None if variant == VARIANTS[0] else labelled)
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(batch: int, seqlen: int, labelled: int, repeats: int, steps: int) -> dict:
    """Median seconds per (model, variant): ``repeats`` rounds, every pair once per round."""
    keys = [(model, variant) for model in RECIPES for variant in VARIANTS]
    times: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for _ in range(repeats):
            for key in keys:
                times[key].append(pool.apply(measure, (*key, batch, seqlen, labelled, steps)))
    results: dict = {}
    for model in RECIPES:
        dense = statistics.median(times[model, VARIANTS[0]])
        results[model] = {
            variant: {
                "seconds": statistics.median(times[model, variant]),
                "x_every_position": statistics.median(times[model, variant]) / dense,
            }
            for variant in VARIANTS
        }
    return results


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"## Training step with a loss on few positions ({meta['date']}, {meta['device']}, "
        f"batch {meta['batch']} x L = {meta['seqlen']})",
        "",
        f"Forward + backward + AdamW of the finding-3 models (and the Samba-like one with "
        f"Mamba-2); medians of {meta['repeats']} rounds "
        f"(each a fresh process timing {meta['steps']} steps), all variants taking turns in "
        "every round. Few positions: the loss on the last "
        f"{meta['labelled']} of {meta['seqlen']}; flushed: `torch.set_flush_denormal(True)` "
        "(what `trainer.flush_denormal`, on by default, does).",
        "",
        "| model | loss on | step ms | time / every position |",
        "|---|---|---:|---:|",
    ]
    for model, rows in results.items():
        for variant, row in rows.items():
            lines.append(
                f"| {model} | {variant} | {row['seconds'] * 1000:,.0f} | "
                f"{row['x_every_position']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--labelled", type=int, default=6, help="positions that take the loss")
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--out", default="docs/bench_sparse_loss")
    args = parser.parse_args()
    meta = {
        "date": date.today().isoformat(),
        "device": cpu_description(),
        "torch": torch.__version__,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "labelled": args.labelled,
        "repeats": args.repeats,
        "steps": args.steps,
    }
    results = bench(args.batch, args.seqlen, args.labelled, args.repeats, args.steps)
    table = markdown(results, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

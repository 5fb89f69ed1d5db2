"""How far each side of ``bench_vs_hf.py`` is from the matmul floor, on the same weights.

For a speed-up target over transformers to be reachable, transformers must be slower than the
target times the fastest time possible. On a CPU that bound is the matmul floor: the model's
matmul FLOPs (2 per active non-embedding parameter and token, the LM head, and the attention
score / value products; 3x that for forward + backward, as
:func:`hybrid.train.run.training_flops_per_token` counts them) divided by the machine's fp32
matmul rate (a 2048^3 matmul, the highest median of several measurements taken in this run).
The scans' own work (the SSD, the delta rule) is not counted, so the floor is a lower bound:
the true best time is above it.

For each config of ``bench_vs_hf.py`` (same ~10 M-parameter transformers configs, loaded into
hybrid with ``from_hf``) this times a prefill of 1 x 1024 tokens and a training step of
4 x 512 tokens in one process, the two frameworks taking turns (paired, so load changes hit
both), and reports each time as a multiple of the floor. ``transformers / floor`` is the
largest speed-up any implementation could show on this machine.

Usage: python scripts/bench_floor.py [--configs bamba nemotron_h qwen3_next falcon_h1 olmo_hybrid
       kimi_linear]
       [--repeats 5]
Writes docs/bench_floor.json and docs/bench_floor.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import matmul_rate  # noqa: E402
from bench_vs_hf import VOCAB, hf_config, timed, train_step  # noqa: E402

from hybrid.provenance import allocator_settings, cpu_description  # noqa: E402

PREFILL = (1, 1024)  # (batch, seqlen) of the prefill
TRAIN = (4, 512)  # of the training step, as bench_vs_hf.py
DEFAULT_CONFIGS = [
    "bamba", "nemotron_h", "qwen3_next", "falcon_h1", "olmo_hybrid", "kimi_linear",
]  # fmt: skip
"""jamba is left out by default: transformers' per-token Mamba-1 training path takes minutes
per step on a CPU."""


def models(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers model, hybrid model) with the same random weights, float32."""
    from transformers import AutoModelForCausalLM

    from hybrid.convert import from_hf

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        AutoModelForCausalLM.from_config(hf_config(name)).save_pretrained(directory)
        theirs = AutoModelForCausalLM.from_pretrained(directory).float()
        ours = from_hf(directory).float()
    return theirs, ours


def matmul_flops(config, batch: int, seqlen: int, training: bool) -> float:
    """Matmul FLOPs of a forward (``training``: forward + backward) over batch x seqlen."""
    from hybrid.train.run import training_flops_per_token

    per_token = training_flops_per_token(config, seqlen)
    return per_token * batch * seqlen / (1 if training else 3)


def steps(model: torch.nn.Module) -> dict[str, Callable[[], None]]:
    """The timed calls: a prefill (inference mode, all logits) and a training step."""
    prompt = torch.randint(0, VOCAB, PREFILL)
    batch = torch.randint(0, VOCAB, TRAIN)

    def prefill() -> None:
        model.eval()
        with torch.inference_mode():
            model(prompt)

    def training() -> None:
        model.train()
        train_step(model, batch)

    return {"prefill": prefill, "train_step": training}


def measure(name: str, repeats: int) -> dict:
    """Paired medians of both frameworks on one config, and the floor."""
    theirs, ours = models(name)
    ours_steps, their_steps = steps(ours), steps(theirs)
    rates = [matmul_rate()]
    result = {}
    for what, (batch, seqlen) in (("prefill", PREFILL), ("train_step", TRAIN)):
        for _ in range(2):  # warm-up: allocator pools, first-call paths
            their_steps[what]()
            ours_steps[what]()
        pairs = [(timed(their_steps[what]), timed(ours_steps[what])) for _ in range(repeats)]
        rates.append(matmul_rate())
        result[what] = {
            "tokens": batch * seqlen,
            "matmul_flops": matmul_flops(ours.config, batch, seqlen, what == "train_step"),
            "transformers_s": statistics.median(t for t, _ in pairs),
            "hybrid_s": statistics.median(h for _, h in pairs),
            "speedup_per_pair": sorted(t / h for t, h in pairs),
        }
    rate = max(rates)
    for row in result.values():
        row["floor_s"] = row["matmul_flops"] / rate
    return {"matmul_flops_per_s": rate, **result}


def markdown(results: dict, meta: dict) -> str:
    allocator = ", ".join(f"{key}={value}" for key, value in meta.get("allocator", {}).items())
    lines = [
        "## Distance from the matmul floor (CPU)",
        "",
        f"{meta['date']}, {meta['device']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, allocator: {allocator or 'glibc defaults'}; "
        f"medians of {meta['repeats']} paired runs "
        "(`python scripts/bench_floor.py`). Floor = matmul FLOPs / the fp32 matmul rate "
        "measured in the same run (scans not counted, so a lower bound). "
        "`transformers / floor` is the largest speed-up any implementation could reach here.",
        "",
        "| Config | Step | Matmul GFLOP | Matmul rate GFLOP/s | Floor ms | transformers ms "
        "(x floor) | hybrid ms (x floor) | hybrid speed-up (paired min-max) | "
        "transformers / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        rate = result["matmul_flops_per_s"]
        for what in ("prefill", "train_step"):
            row = result[what]
            floor, theirs, ours = row["floor_s"], row["transformers_s"], row["hybrid_s"]
            pairs = row["speedup_per_pair"]
            lines.append(
                f"| {name} | {what} ({row['tokens']} tokens) | {row['matmul_flops'] / 1e9:.1f} "
                f"| {rate / 1e9:.0f} | {floor * 1e3:.0f} | {theirs * 1e3:.0f} "
                f"({theirs / floor:.2f}x) | {ours * 1e3:.0f} ({ours / floor:.2f}x) | "
                f"{theirs / ours:.2f}x ({pairs[0]:.2f}-{pairs[-1]:.2f}) | {theirs / floor:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    import transformers

    for name in args.configs:
        hf_config(name)  # fail fast on a bad name
    results = {}
    for name in args.configs:
        results[name] = measure(name, args.repeats)
        print(name, json.dumps(results[name]), flush=True)
    meta = {
        "date": date.today().isoformat(),
        "device": cpu_description(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
        "allocator": allocator_settings(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_floor.json").write_text(json.dumps({"meta": meta, **results}, indent=2))
    table = markdown(results, meta)
    (args.out / "bench_floor.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

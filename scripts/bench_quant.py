"""Quantized inference side by side: float32, bfloat16, int8 and int4 weights, int8 KV cache.

On one trained checkpoint (default: the quick-start run, trained first with
``hybrid train recipes/quickstart.yaml`` when ``runs/quickstart`` has no model), each variant
is measured in the same process, the variants taking turns in every round:

- perplexity on held-out text: Python sources the quick start does not train on (the ``pip``
  package's own files; ``--data`` for others), ``--documents`` documents of ``--length``
  tokens, through the inference cache in chunks (so the KV dtype counts);
- weight bytes as stored (codes, scales and zero points for quantized weights);
- inference-cache bytes of one sequence at ``--context`` tokens (32K);
- prefill tokens/s (one ``--length``-token prompt through the cache) and decode ms/token
  (greedy, batch 1, ``--new-tokens`` tokens), medians over ``--rounds`` rounds.

Targets (issue 15): int8 weights within 1 % of float32 perplexity, int4 within 5 %, int8 KV
half the KV bytes of bfloat16 with perplexity within 1 %. The table reports what comes out.

Usage: python scripts/bench_quant.py [--checkpoint RUN] [--rounds 3] [--out docs/bench_quant]
Writes OUT.json and OUT.md (a markdown table) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

# Measure this checkout, whichever copy of the packages is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid.accounting import describe
from hybrid.checkpoint import load_model
from hybrid.eval.inference import token_losses
from hybrid.inference.cache import CachePrecision
from hybrid.provenance import cpu_description
from hybrid.quantize import quantize, weight_bytes
from hybrid.tokenizer import load_tokenizer
from hybrid.units import human_bytes

ROOT = Path(__file__).resolve().parents[1]

# name -> (weights dtype, weight scheme, kv dtype)
VARIANTS = {
    "float32": (torch.float32, None, None),
    "bfloat16": (torch.bfloat16, None, None),
    "int8 weights": (torch.float32, "int8", None),
    "int8 weights (torchao Int8Tensor)": (torch.float32, "int8-torchao", None),
    "int4 weights": (torch.float32, "int4", None),
    "int8 KV": (torch.float32, None, "int8"),
    "bfloat16 + int8 KV": (torch.bfloat16, None, "int8"),
}


def held_out_files(patterns: list[str] | None) -> list[Path]:
    """The ``--data`` globs, or the installed ``pip`` package's .py files (real Python that
    the quick start, trained on the standard library without site-packages, never saw)."""
    if patterns:
        return sorted({Path(p) for pat in patterns for p in glob.glob(pat, recursive=True)})
    spec = importlib.util.find_spec("pip")
    if spec is None or spec.origin is None:
        raise SystemExit("bench_quant: pip is not installed; give held-out text with --data GLOB")
    return sorted(Path(spec.origin).parent.rglob("*.py"))


def documents(tokenizer, files: list[Path], length: int, count: int) -> torch.Tensor:
    """(count, length + 1) token ids: the first ``length + 1`` tokens of the first ``count``
    files (sorted by path) that have that many."""
    rows = []
    for path in files:
        ids = tokenizer.encode(path.read_text(errors="replace"))
        if len(ids) > length:
            rows.append(ids[: length + 1])
        if len(rows) == count:
            return torch.tensor(rows)
    raise SystemExit(f"bench_quant: only {len(rows)} held-out files have {length + 1} tokens")


def build(base, dtype, scheme, kv_dtype):
    model = copy.deepcopy(base).to(dtype)
    if scheme is not None:
        name, _, backend = scheme.partition("-")
        quantize(model, name, int8_backend=backend or "hybrid")
    model.cache_precision = CachePrecision.of(kv_dtype=kv_dtype)
    return model.eval()


@torch.no_grad()
def prefill_seconds(model, prompt: torch.Tensor) -> float:
    cache = model.allocate_cache(1, prompt.shape[1])
    start = time.perf_counter()
    model(prompt, cache=cache)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds_per_token(model, prompt: torch.Tensor, new_tokens: int) -> float:
    model.generate(prompt, 2)  # warm
    start = time.perf_counter()
    model.generate(prompt, new_tokens)
    first = time.perf_counter()
    model.generate(prompt, 1)
    one = time.perf_counter() - first
    return max(first - start - one, 1e-9) / (new_tokens - 1)  # minus the prefill


def ensure_checkpoint(path: Path | None) -> Path:
    if path is not None:
        return path
    run = ROOT / "runs" / "quickstart"
    if not (run / "model" / "model.safetensors").is_file():
        print("training the quick-start recipe first (hybrid train recipes/quickstart.yaml)")
        subprocess.run(
            [sys.executable, "-m", "hybrid.cli", "train", str(ROOT / "recipes/quickstart.yaml"),
             "logging.wandb=false", f"output_dir={ROOT / 'runs'}", "--no-progress"],
            check=True, cwd=ROOT,
        )  # fmt: skip
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--data", action="append", metavar="GLOB")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_quant"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    checkpoint = ensure_checkpoint(args.checkpoint)
    base = load_model(checkpoint).eval()
    tokenizer = load_tokenizer(checkpoint)
    ids = documents(tokenizer, held_out_files(args.data), args.length, args.documents)
    models = {name: build(base, *spec) for name, spec in VARIANTS.items()}

    rows = {}
    for name, model in models.items():
        dtype, scheme, kv = VARIANTS[name]
        cache_info = describe(model.config, args.context, dtype, kv_dtype=kv)
        with torch.no_grad():
            loss = float(token_losses(model, ids).double().mean())
        rows[name] = {
            "weights": str(dtype).removeprefix("torch.") if scheme is None else scheme,
            "kv_dtype": kv or str(dtype).removeprefix("torch."),
            "perplexity": math.exp(loss),
            "weight_bytes": weight_bytes(model),
            "cache_bytes_at_context": cache_info.cache_bytes,
            "kv_bytes_at_context": sum(
                row.cache_bytes for row in cache_info.rows if row.block == "attention"
            ),
            "prefill": [],
            "decode": [],
        }
    prompt = ids[:1, : args.length]
    for _ in range(args.rounds):  # the variants take turns in every round
        for name, model in models.items():
            rows[name]["prefill"].append(prefill_seconds(model, prompt))
            rows[name]["decode"].append(
                decode_seconds_per_token(model, prompt[:, :128], args.new_tokens)
            )
    reference = rows["float32"]
    for row in rows.values():
        row["prefill_tokens_per_s"] = args.length / statistics.median(row.pop("prefill"))
        row["decode_ms_per_token"] = 1e3 * statistics.median(row.pop("decode"))
        row["perplexity_vs_float32"] = row["perplexity"] / reference["perplexity"] - 1
        row["weight_bytes_vs_float32"] = row["weight_bytes"] / reference["weight_bytes"]
        row["prefill_vs_float32"] = row["prefill_tokens_per_s"] / reference["prefill_tokens_per_s"]
        row["decode_vs_float32"] = row["decode_ms_per_token"] / reference["decode_ms_per_token"]
    kv_ratio, cache_ratio = (
        rows["bfloat16 + int8 KV"][key] / rows["bfloat16"][key]
        for key in ("kv_bytes_at_context", "cache_bytes_at_context")
    )
    result = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_description()}, torch {torch.__version__}",
        "checkpoint": str(checkpoint),
        "pattern": base.config.pattern_string,
        "settings": {k: v for k, v in vars(args).items() if k not in ("checkpoint", "out")},
        "held_out": f"{ids.shape[0]} documents x {args.length} tokens",
        "rows": rows,
        "kv_bytes_int8_vs_bfloat16": kv_ratio,
        "cache_bytes_int8_kv_vs_bfloat16": cache_ratio,
    }
    table = [
        f"Quantized inference of `{base.config.pattern_string}` ({checkpoint.name}), "
        f"{result['date']}, {result['machine']}; perplexity on {result['held_out']} of held-out "
        f"Python; cache bytes of one sequence at {args.context:,} tokens; medians of "
        f"{args.rounds} rounds.",
        "",
        "| variant | perplexity | vs float32 | weight bytes | vs float32 | cache at "
        f"{args.context // 1024}K | prefill tok/s | decode ms/token | decode vs float32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        table.append(
            f"| {name} | {row['perplexity']:.4f} | {100 * row['perplexity_vs_float32']:+.2f} % "
            f"| {human_bytes(row['weight_bytes'])} | {row['weight_bytes_vs_float32']:.2f}x "
            f"| {human_bytes(row['cache_bytes_at_context'])} "
            f"| {row['prefill_tokens_per_s']:,.0f} | {row['decode_ms_per_token']:.2f} "
            f"| {row['decode_vs_float32']:.2f}x |"
        )
    table += [
        "",
        f"At {args.context:,} tokens, int8 keys / values (with their float16 scales and the "
        f"per-slot index and flag) take {kv_ratio:.3f}x the bytes of bfloat16 ones; the whole "
        f"cache (conv and SSM states included) {cache_ratio:.3f}x.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

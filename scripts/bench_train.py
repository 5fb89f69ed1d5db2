"""Training throughput and memory against sequence length: attention, a 1:7 hybrid, Mamba-2.

One forward + backward (cross-entropy over the bytes vocabulary) of batch 1 at each length,
for three models of the same width and depth (8 mixers, each followed by an MLP):

- ``attention``: ``*-`` x 8 (RoPE, causal SDPA);
- ``hybrid 1:7``: ``M-M-M-*-M-M-M-M-`` (one attention layer per seven Mamba-2, as Jamba and
  Megatron's Mamba-2-Hybrid);
- ``mamba2``: ``M-`` x 8;

each with and without activation checkpointing (every sublayer). Every configuration runs in
its own process, so its peak resident memory is its own; reported: median step seconds,
training tokens/s, the activations autograd keeps for the backward (bytes packed through
``saved_tensors_hooks``: what checkpointing is meant to cut), the process's peak RSS, and
the model-FLOPs fraction of this machine's fp32 matmul rate (FLOPs counted as
``hybrid.train.run.training_flops_per_token``: 6 x active non-embedding parameters + head +
attention scores). Also, at ``--compile-length``, the hybrid's step with ``torch.compile``
(``trainer.compile``): its first step (compilation included) and its steady step against
the eager one.

    python3 scripts/bench_train.py                       # writes docs/bench_train.{json,md,png}
    python3 scripts/bench_train.py --lengths 2048 4096 --d-model 128 --out /tmp/bench_train

Attention beyond ``--attention-max`` tokens is not run (its cost grows with the square of
the length; the 64K step would take about 4x the 32K one).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hybrid.config import HybridConfig  # noqa: E402
from hybrid.model import HybridLM  # noqa: E402
from hybrid.provenance import cpu_description  # noqa: E402
from hybrid.train.run import training_flops_per_token  # noqa: E402
from layers.mamba2 import Mamba2  # noqa: E402
from layers.mlp import MLP  # noqa: E402

MODELS = {
    "attention": "*-" * 8,
    "hybrid 1:7": "M-M-M-*-M-M-M-M-",
    "mamba2": "M-" * 8,
}
# (label, pattern, activation checkpointing, CPU segments): each model with and without
# checkpointing, and Mamba-2 also with its sublayers run whole (segment_length None), to show
# what running long sequences in cache-sized segments gives.
VARIANTS = [
    *((name, pattern, ckpt, True) for name, pattern in MODELS.items() for ckpt in (False, True)),
    ("mamba2 unsegmented", MODELS["mamba2"], False, False),
]
VOCAB = 257


def build_config(pattern: str, d_model: int) -> HybridConfig:
    return HybridConfig(
        pattern,
        vocab_size=VOCAB,
        d_model=d_model,
        attention={"n_heads": max(1, d_model // 64)},
        mamba2={"d_state": 64, "headdim": 64, "chunk_size": 128},
        tie_embeddings=True,
    )


def matmul_rate(repeats: int = 5) -> float:
    """fp32 FLOP/s of a 2048^3 matmul (median)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def worker(spec: dict) -> dict:
    """One configuration in this process: step times, saved activation bytes, peak RSS."""
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    config = build_config(spec["pattern"], spec["d_model"])
    model = HybridLM(config).train()
    if spec["checkpointing"]:
        model.enable_activation_checkpointing(1)
    if not spec.get("segments", True):
        Mamba2.segment_length = MLP.segment_length = None
    if spec["compile"]:
        model.compile()
    length = spec["length"]
    ids = torch.randint(0, VOCAB - 1, (1, length + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    saved = 0
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        """Count each saved storage once (views share one), weights not at all."""
        nonlocal saved
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights | seen:
            seen.add(storage.data_ptr())
            saved += storage.nbytes()
        return tensor

    def step(measure: bool = False) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if measure:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(inputs).logits
        else:
            logits = model(inputs).logits
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return time.perf_counter() - start

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    first = step(measure=not spec["compile"])
    if spec["rounds"]:
        step()  # the second step still pays for growing the allocator's pools (~1.5x here)
        times = [step() for _ in range(spec["rounds"])]
    else:
        times = [first]
    return {
        "first_step_s": first,
        "step_s": statistics.median(times),
        "saved_activation_bytes": saved or None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_bytes": rss_before,
        "parameters": model.num_parameters(),
        "flops_per_token": training_flops_per_token(config, length),
        # The same process, right after its steps: the machine's rate drifts by 10-20 %.
        "matmul_flops": matmul_rate(),
    }


def run_worker(spec: dict, timeout: float) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if done.returncode < 0:
        return {"error": f"killed by signal {-done.returncode} (out of memory?)"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rate = result["matmul_flops"]
    measured = result.get("matmul_flops_measured", {})
    spread = (
        f", of medians from {measured['min'] / 1e9:.0f} (median {measured['median'] / 1e9:.0f})"
        if measured
        else ""
    )
    lines = [
        f"Training step (forward + backward, batch 1) against length, {result['date']}, "
        f"{result['machine']}; fp32 matmul {rate / 1e9:.0f} GFLOP/s (2048^3: the highest "
        f"median of 5 measured in the run{spread}); "
        f"d_model {result['settings']['d_model']}, 8 mixers + 8 MLPs, bytes vocabulary; "
        f"`python3 scripts/bench_train.py`.",
        "",
        "| model | checkpointing | length | tokens/s | step | saved in forward | step memory "
        "| model FLOPs / matmul rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ckpt = "every sublayer" if row["checkpointing"] else "off"
        if "error" in row or "skipped" in row:
            why = row.get("skipped") or row["error"]
            lines.append(f"| {row['model']} | {ckpt} | {row['length']:,} | {why} | | | | |")
            continue
        lines.append(
            f"| {row['model']} | {ckpt} | {row['length']:,} | {row['tokens_per_s']:,.0f} | "
            f"{row['step_s']:.2f} s | {mib(row['saved_activation_bytes'])} | "
            f"{mib(row['peak_rss_bytes'] - row['rss_before_bytes'])} | {100 * row['mfu']:.0f} % |"
        )
    compiled = result.get("compile")
    if compiled and "error" not in compiled:
        lines += [
            "",
            f"torch.compile (`trainer.compile: true`), hybrid 1:7 at {compiled['length']:,} "
            f"tokens: steady step {compiled['step_s']:.2f} s vs eager {compiled['eager_s']:.2f} s"
            f" ({compiled['speedup']:.2f}x); first step, compilation included, "
            f"{compiled['first_step_s']:.0f} s.",
        ]
    elif compiled:
        lines += ["", f"torch.compile: failed ({compiled['error']})"]
    lines += ["", *result["notes"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for model in [*MODELS, "mamba2 unsegmented"]:
        for ckpt, style in ((False, "-"), (True, "--")):
            rows = [
                r for r in result["rows"]
                if r["model"] == model and r["checkpointing"] == ckpt and "step_s" in r
            ]  # fmt: skip
            if not rows:
                continue
            label = f"{model}{' + checkpointing' if ckpt else ''}"
            x = [r["length"] for r in rows]
            left.plot(x, [1e6 * r["step_s"] / r["length"] for r in rows], style, marker="o",
                      label=label)  # fmt: skip
            right.plot(x, [r["saved_activation_bytes"] / 2**20 for r in rows], style,
                       marker="o", label=label)  # fmt: skip
    for axis, title in ((left, "step time per token (µs)"), (right, "saved activations (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[2048, 4096, 8192, 16384, 32768, 65536])  # fmt: skip
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps up to 8K tokens")
    parser.add_argument("--attention-max", type=int, default=32768)
    parser.add_argument("--compile-length", type=int, default=4096, help="0: no compile row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_train"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    rate = matmul_rate()
    rows = []
    base = {"d_model": args.d_model, "threads": args.threads, "compile": False}
    for length in args.lengths:
        rounds = args.rounds if length <= 8192 else 0  # long steps: the one step is the time
        for model, pattern, ckpt, segments in VARIANTS:
            row = {"model": model, "pattern": pattern, "length": length, "checkpointing": ckpt}
            if pattern == MODELS["attention"] and length > args.attention_max:
                row["skipped"] = f"not run (> --attention-max {args.attention_max:,})"
            else:
                spec = {**base, "pattern": pattern, "length": length, "checkpointing": ckpt,
                        "rounds": rounds, "segments": segments}  # fmt: skip
                row.update(run_worker(spec, args.timeout))
                if "step_s" in row:
                    row["tokens_per_s"] = length / row["step_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    compiled = None
    if args.compile_length:
        spec = {**base, "pattern": MODELS["hybrid 1:7"], "length": args.compile_length,
                "checkpointing": False, "rounds": max(args.rounds, 1)}  # fmt: skip
        eager = run_worker(spec, args.timeout)
        compiled = run_worker({**spec, "compile": True}, args.timeout)
        if "step_s" in compiled and "step_s" in eager:
            compiled.update(
                length=args.compile_length,
                eager_s=eager["step_s"],
                speedup=eager["step_s"] / compiled["step_s"],
            )
        print(json.dumps(compiled), flush=True)
    # The machine's matmul rate: the highest median measured in this run (once before the
    # workers, once in each after its steps); the fastest the machine showed, so the fraction
    # is never flattered by a slow moment of the rate measurement.
    rates = [rate, *(row["matmul_flops"] for row in rows if "matmul_flops" in row)]
    rate = max(rates)
    for row in rows:
        if "step_s" in row:
            row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / rate
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu_description(args.threads)}, torch {torch.__version__}",
        "matmul_flops": rate,
        "matmul_flops_measured": {"min": min(rates), "median": statistics.median(rates)},
        "settings": vars(args) | {"worker": None},
        "rows": rows,
        "compile": compiled,
        "notes": [
            "Saved in forward: bytes autograd keeps for the backward, counted in the first "
            "step outside checkpointed regions (with checkpointing: each sublayer's input is "
            "held by torch's checkpoint instead and not counted, and one sublayer's "
            "activations are recomputed at a time in the backward). Step memory: the "
            "process's peak resident memory minus its resident memory before the first step "
            "(model and optimizer-free weights excluded; what the step itself needed at its "
            "peak). Steps up to 8K tokens: median of the timed steps after two untimed ones; "
            "longer: the single step.",
        ],
    }
    write_report(result, Path(args.out))
    print(f"wrote {args.out}.json / .md / .png")


if __name__ == "__main__":
    main()

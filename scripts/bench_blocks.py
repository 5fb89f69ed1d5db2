"""Forward throughput of each block family and of a ~10 M-parameter Mamba-2 hybrid.

Measures, in one run on one machine: the fp32 matmul rate (large square matmuls), forward
tokens/s of every block family at L = 2048, and the hybrid's prefill tokens/s with its
model-FLOPs fraction of that matmul rate. On CUDA it also measures forward + backward tokens/s
of the same hybrid against mamba_ssm's ``MambaLMHeadModel`` with the same layers.

Model FLOPs per token: 2 x (parameters used in matmuls, LM head included, input embedding and
per-channel parameters excluded) + 4 x (L / 2) x (n_heads x head_dim) per causal attention
layer. The SSD / selective-scan work is not counted, so the fraction is conservative.

With ``--train`` it measures instead the training step of every block family: forward +
backward seconds on a (batch, seqlen, d_model) input (by default 8 x 512 x 256, the shape of
the same-budget recipes), each block against the Mamba-2 block, all blocks taking turns in
every round so that a noisy machine affects them alike.

Usage: python scripts/bench_blocks.py [--seqlen 2048] [--repeats 5] [--out docs/bench_blocks]
       python scripts/bench_blocks.py --train [--batch 8] [--seqlen 512] [--d-model 256]
Writes OUT.json and OUT.md (a markdown table; OUT defaults to docs/bench_blocks, with --train
docs/bench_blocks_train) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

# Measure this checkout, whichever copy of the packages is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid import HybridConfig, HybridLM
from hybrid.eval.decode import device_sync
from hybrid.provenance import cpu_description
from layers.base import BlockOutput
from layers.registry import get_block

HYBRID = {
    "pattern": "M-M-*-M-M-",
    "vocab_size": 256,
    "d_model": 384,
    "mamba2": {"d_state": 64, "headdim": 64, "chunk_size": 256},
    "attention": {"n_heads": 6},
    "mlp": {"hidden_size": 1024},
}
BLOCKS = {
    "mamba2": ("M", {"mamba2": {"d_state": 64, "headdim": 64}}),
    "mamba1": ("S", {"mamba1": {"d_state": 16}}),
    "attention": ("*", {"attention": {"n_heads": 6, "head_dim": 64}}),
    "attention_window256": ("*", {"attention": {"n_heads": 6, "head_dim": 64, "window": 256}}),
    "mlp": ("-", {"mlp": {"hidden_size": 1024}}),
    "moe_8x_top2": ("E", {"moe": {"n_experts": 8, "top_k": 2, "expert_hidden_size": 512}}),
}


def median_seconds(run: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``run`` after two warm-up calls (first calls are several x slower)."""
    for _ in range(2):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(device: torch.device, repeats: int, sync: Callable[[], None]) -> float:
    """fp32 FLOP/s of a 2048^3 matmul."""
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats, sync)


def matmul_parameters(module: nn.Module) -> int:
    """Parameters of Linear layers and stacked expert weights (the ones used in matmuls)."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            count += sub.weight.numel()
        elif sub.__class__.__name__ == "Experts":
            count += sum(p.numel() for p in sub.parameters() if p.dim() == 3)
    return count


def model_flops_per_token(model: HybridLM, seqlen: int) -> float:
    """Forward FLOPs per token (see the module docstring); MoE counts top-k experts only."""
    flops = 0.0
    for block in [*model.blocks, model.lm_head]:
        params = matmul_parameters(block)
        options = getattr(block, "options", None)
        if options is not None and hasattr(options, "top_k"):
            expert = sum(p.numel() for p in block.experts.parameters() if p.dim() == 3)
            params -= expert - expert * options.top_k // options.n_experts
        flops += 2 * params
        if getattr(block, "block_name", "") == "attention":
            view = seqlen / 2 if options.window is None else min(options.window, seqlen / 2)
            flops += 4 * view * options.n_heads * options.head_dim
    return flops


def make_block(name: str, d_model: int, device: torch.device) -> nn.Module:
    """The block family ``name`` of BLOCKS at width ``d_model``, random weights."""
    symbol, options = BLOCKS[name]
    config = HybridConfig(symbol, vocab_size=256, d_model=d_model, **options)
    return get_block(symbol).block_class(d_model, config.layer_options[0], 0).to(device)


def bench_train(batch: int, seqlen: int, d_model: int, repeats: int, device: torch.device) -> dict:
    """Forward + backward median seconds of every block family, blocks interleaved per round."""
    sync = device_sync(device)
    torch.manual_seed(0)
    x = torch.randn(batch, seqlen, d_model, device=device, requires_grad=True)
    steps = {}
    for name in BLOCKS:
        block = make_block(name, d_model, device).train()

        def step(block: nn.Module = block) -> None:
            out = block(x)
            hidden = out.hidden if isinstance(out, BlockOutput) else out
            hidden.square().mean().backward()

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in BLOCKS}
    for round_ in range(repeats + 2):  # two warm-up rounds
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {
        name: {
            "seconds": seconds[name],
            "tokens_per_s": batch * seqlen / seconds[name],
            "x_mamba2": seconds[name] / seconds["mamba2"],
        }
        for name in BLOCKS
    }


def markdown_train(results: dict, meta: dict) -> str:
    lines = [
        f"## Block forward + backward ({meta['date']}, {meta['device']}, batch {meta['batch']} "
        f"x L = {meta['seqlen']}, d_model {meta['d_model']})",
        "",
        f"Medians of {meta['repeats']} rounds, every block once per round; loss = mean of the "
        "squared output.",
        "",
        "| block | forward + backward ms | tokens/s | time / mamba2 |",
        "|---|---:|---:|---:|",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['seconds'] * 1000:,.0f} | {row['tokens_per_s']:,.0f} | "
            f"{row['x_mamba2']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def bench_cpu_and_gpu(seqlen: int, repeats: int, device: torch.device) -> dict:
    sync = device_sync(device)
    torch.manual_seed(0)
    results: dict = {"matmul_flops": matmul_rate(device, repeats, sync), "blocks": {}}
    d_model = HYBRID["d_model"]
    x = torch.randn(1, seqlen, d_model, device=device)
    for name in BLOCKS:
        block = make_block(name, d_model, device).eval()
        with torch.inference_mode():
            seconds = median_seconds(lambda b=block: b(x), repeats, sync)
        results["blocks"][name] = {
            "tokens_per_s": seqlen / seconds,
            "parameters": sum(p.numel() for p in block.parameters()),
        }

    model = HybridLM(HybridConfig(**HYBRID)).to(device).eval()
    ids = torch.randint(0, 256, (1, seqlen), device=device)
    with torch.inference_mode():
        seconds = median_seconds(lambda: model(ids), repeats, sync)
    flops = model_flops_per_token(model, seqlen) * seqlen / seconds
    results["hybrid"] = {
        "pattern": HYBRID["pattern"],
        "parameters": model.num_parameters(),
        "prefill_tokens_per_s": seqlen / seconds,
        "model_flops_per_s": flops,
        "fraction_of_matmul_rate": flops / results["matmul_flops"],
    }
    if device.type == "cuda":
        results["hybrid_vs_mamba_ssm"] = bench_against_mamba_ssm(seqlen, repeats, device, sync)
    return results


def bench_against_mamba_ssm(seqlen: int, repeats: int, device: torch.device, sync) -> dict:
    """Forward + backward tokens/s of the hybrid and of mamba_ssm's model with the same layers.

    mamba_ssm's ``MambaLMHeadModel`` layer is a mixer then a gated MLP, so the pattern's
    (mixer, mlp) pairs map onto its ``attn_layer_idx`` and ``d_intermediate``.
    """
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception as error:  # the kernels do not import: say why, measure ours only
        return {"skipped": f"mamba_ssm unavailable: {error}"}
    mixers = HYBRID["pattern"][0::2]
    ssm_cfg = {"layer": "Mamba2", **HYBRID["mamba2"]}
    theirs = MambaLMHeadModel(
        MambaConfig(
            d_model=HYBRID["d_model"],
            d_intermediate=HYBRID["mlp"]["hidden_size"],
            n_layer=len(mixers),
            vocab_size=HYBRID["vocab_size"],
            ssm_cfg=ssm_cfg,
            attn_layer_idx=[i for i, s in enumerate(mixers) if s == "*"],
            attn_cfg={"num_heads": HYBRID["attention"]["n_heads"], "rotary_emb_dim": 64},
            pad_vocab_size_multiple=1,
        ),
        device=device,
        dtype=torch.float32,
    )
    ours = HybridLM(HybridConfig(**HYBRID)).to(device)
    ids = torch.randint(0, 256, (4, seqlen), device=device)
    out = {}
    for name, model, logits_of in (
        ("hybrid", ours, lambda o: o.logits),
        ("mamba_ssm", theirs, lambda o: o.logits),
    ):

        def step(model=model, logits_of=logits_of):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = logits_of(model(ids)).float().logsumexp(-1).mean()
            loss.backward()

        seconds = median_seconds(step, repeats, sync)
        out[name] = {"train_tokens_per_s": ids.numel() / seconds}
    out["ratio_hybrid_over_mamba_ssm"] = (
        out["hybrid"]["train_tokens_per_s"] / out["mamba_ssm"]["train_tokens_per_s"]
    )
    return out


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"## Block forward throughput ({meta['date']}, {meta['device']}, L = {meta['seqlen']})",
        "",
        f"fp32 matmul rate: {results['matmul_flops'] / 1e9:.1f} GFLOP/s (2048^3, median)",
        "",
        "| block | parameters | forward tokens/s |",
        "|---|---:|---:|",
    ]
    for name, row in results["blocks"].items():
        lines.append(f"| {name} | {row['parameters']:,} | {row['tokens_per_s']:,.0f} |")
    hybrid = results["hybrid"]
    lines += [
        "",
        "| hybrid | parameters | prefill tokens/s | model GFLOP/s | fraction of matmul rate |",
        "|---|---:|---:|---:|---:|",
        f"| `{hybrid['pattern']}` d_model {HYBRID['d_model']} | {hybrid['parameters']:,} | "
        f"{hybrid['prefill_tokens_per_s']:,.0f} | {hybrid['model_flops_per_s'] / 1e9:.1f} | "
        f"{hybrid['fraction_of_matmul_rate']:.0%} |",
    ]
    versus = results.get("hybrid_vs_mamba_ssm")
    if versus and "skipped" not in versus:
        lines += [
            "",
            "| forward + backward (bf16 autocast, batch 4) | tokens/s |",
            "|---|---:|",
            f"| hybrid | {versus['hybrid']['train_tokens_per_s']:,.0f} |",
            f"| mamba_ssm MambaLMHeadModel | {versus['mamba_ssm']['train_tokens_per_s']:,.0f} |",
            f"| ratio | {versus['ratio_hybrid_over_mamba_ssm']:.2f} |",
        ]
    elif versus:
        lines += ["", f"mamba_ssm comparison: {versus['skipped']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="forward + backward per block")
    parser.add_argument(
        "--matmul-only", action="store_true", help="print the fp32 matmul rate and stop"
    )
    parser.add_argument("--seqlen", type=int, help="default 2048, with --train 512")
    parser.add_argument("--batch", type=int, default=8, help="--train only")
    parser.add_argument("--d-model", type=int, default=256, help="--train only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="default docs/bench_blocks, with --train ..._train")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.matmul_only:
        rate = matmul_rate(device, args.repeats, device_sync(device))
        threads = "" if device.type == "cuda" else f" on {torch.get_num_threads()} threads"
        print(f"fp32 matmul (2048^3): {rate / 1e9:.0f} GFLOP/s{threads}")
        return
    seqlen = args.seqlen or (512 if args.train else 2048)
    meta = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else cpu_description(),
        "torch": torch.__version__,
        "seqlen": seqlen,
    }
    if args.train:
        meta.update(batch=args.batch, d_model=args.d_model, repeats=args.repeats)
        results = bench_train(args.batch, seqlen, args.d_model, args.repeats, device)
        table = markdown_train(results, meta)
    else:
        results = bench_cpu_and_gpu(seqlen, args.repeats, device)
        table = markdown(results, meta)
    out = Path(args.out or ("docs/bench_blocks_train" if args.train else "docs/bench_blocks"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=2))
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

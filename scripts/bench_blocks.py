"""Forward throughput of each block family and of a ~10 M-parameter Mamba-2 hybrid.

Measures, in one run on one machine: the fp32 matmul rate (large square matmuls), forward
tokens/s of every block family at L = 2048, and the hybrid's prefill tokens/s with its
model-FLOPs fraction of that matmul rate. On CUDA it also measures forward + backward tokens/s
of the same hybrid against mamba_ssm's ``MambaLMHeadModel`` with the same layers.

Model FLOPs per token: 2 x (parameters used in matmuls, LM head included, input embedding and
per-channel parameters excluded) + 4 x (L / 2) x (n_heads x head_dim) per causal attention
layer. The SSD / selective-scan work is not counted, so the fraction is conservative.

Usage: python scripts/bench_blocks.py [--seqlen 2048] [--repeats 5] [--out docs/bench_blocks]
Writes OUT.json and OUT.md (a markdown table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

from hybrid import HybridConfig, HybridLM
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
    "attention": ("*", {"attention": {"n_heads": 6}}),
    "attention_window256": ("*", {"attention": {"n_heads": 6, "window": 256}}),
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


def bench_cpu_and_gpu(seqlen: int, repeats: int, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    results: dict = {"matmul_flops": matmul_rate(device, repeats, sync), "blocks": {}}
    d_model = HYBRID["d_model"]
    x = torch.randn(1, seqlen, d_model, device=device)
    for name, (symbol, options) in BLOCKS.items():
        config = HybridConfig(symbol, vocab_size=256, d_model=d_model, **options)
        spec = get_block(symbol)
        block = spec.block_class(d_model, config.layer_options[0], 0).to(device).eval()
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
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="docs/bench_blocks")
    args = parser.parse_args()
    device = torch.device(args.device)
    meta = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "seqlen": args.seqlen,
    }
    results = bench_cpu_and_gpu(args.seqlen, args.repeats, device)
    table = markdown(results, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=2))
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""Side by side with transformers: the same random weights in both frameworks, one machine.

For a Bamba-like, a Jamba-like, a Nemotron-H-like, a Qwen3-Next-like (Gated DeltaNet 3:1 with
gated attention, MoE with a shared expert) and a Falcon-H1-like (attention and Mamba-2 side by
side in every layer) config of about 10 M parameters this
measures prefill tokens/s at L = 1024 and 4096, a training step (forward + backward) tokens/s,
decode ms/token after a 1024-token prompt (hybrid: the default eager ``generate``, compiled,
and the first compiled call with its compile, cold and with torch's on-disk cache warm), and
peak memory. The transformers model is built
with random weights, saved, and loaded into hybrid with ``hybrid.convert.from_hf``, so both
compute the same function. Every path is warmed up before timing; times are medians. Each
(config, framework) pair runs in its own process so that its peak RSS is its own.

On a shared machine the load changes while the processes run one after the other, and it can
favour either side. ``--rounds N`` runs every (config, framework) process N times, the two
frameworks taking turns, and reports the median of each metric over the rounds.

Usage: python scripts/bench_vs_hf.py [--configs bamba jamba nemotron_h qwen3_next falcon_h1
       olmo_hybrid kimi_linear]
       [--repeats 3]
       [--rounds 3] [--device cpu|cuda]
Writes docs/bench_vs_hf.json (bench_vs_hf_cuda.json) and the "hybrid vs transformers on CPU"
("... on CUDA") section of docs/benchmarks.md (other sections of that file are kept). On CUDA
install the kernels first (`pip install --no-build-isolation -e ".[gpu]"`), so that both sides
run them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Measure this checkout (the child processes too), whichever copy of hybrid is installed.
sys.path.insert(0, str(ROOT))

from hybrid.provenance import allocator_settings, cpu_description  # noqa: E402

VOCAB = 1024
CONFIG_ORDER = [
    "bamba", "jamba", "nemotron_h", "qwen3_next", "falcon_h1", "olmo_hybrid", "kimi_linear",
]  # fmt: skip


def hf_config(name: str, kernels: bool = False):
    """A ~10 M-parameter transformers config of each family (``kernels``: Jamba's CUDA path)."""
    from transformers import (
        BambaConfig,
        FalconH1Config,
        JambaConfig,
        KimiLinearConfig,
        NemotronHConfig,
        OlmoHybridConfig,
        Qwen3NextConfig,
    )

    if name == "bamba":
        return BambaConfig(
            vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, intermediate_size=768,
            num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[3],
            mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1,
            mamba_chunk_size=256, tie_word_embeddings=True,
        )  # fmt: skip
    if name == "jamba":
        return JambaConfig(
            vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, intermediate_size=512,
            num_attention_heads=4, num_key_value_heads=2, attn_layer_period=8,
            attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
            num_experts_per_tok=2, mamba_d_state=16, mamba_expand=2, tie_word_embeddings=True,
            use_mamba_kernels=kernels,
        )  # fmt: skip
    if name == "nemotron_h":
        return NemotronHConfig(
            vocab_size=VOCAB, hidden_size=256, num_hidden_layers=12,
            layers_block_type=["mamba", "mlp", "mamba", "mlp", "mamba", "attention", "mlp",
                               "mamba", "mlp", "mamba", "mlp", "mamba"],
            intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=64, n_groups=1, chunk_size=256,
            tie_word_embeddings=True,
        )  # fmt: skip
    if name == "qwen3_next":  # transformers runs its torch delta rule when fla is missing
        return Qwen3NextConfig(
            vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8,
            layer_types=["linear_attention"] * 3 + ["full_attention"]
            + ["linear_attention"] * 3 + ["full_attention"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
            linear_value_head_dim=64, linear_conv_kernel_dim=4, num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=256,
            shared_expert_intermediate_size=256, decoder_sparse_step=1, mlp_only_layers=[],
            tie_word_embeddings=True,
        )  # fmt: skip
    if name == "falcon_h1":
        return FalconH1Config(
            vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, intermediate_size=768,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, mamba_d_ssm=512,
            mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1,
            mamba_chunk_size=256, tie_word_embeddings=True,
        )  # fmt: skip
    if name == "olmo_hybrid":  # NoPE, as the released checkpoints; OLMo's derived head widths
        return OlmoHybridConfig(
            vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, hidden_size=256,
            num_hidden_layers=8, intermediate_size=768, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": None},
            layer_types=["linear_attention"] * 3 + ["full_attention"]
            + ["linear_attention"] * 3 + ["full_attention"],
            linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=48,
            linear_value_head_dim=96, tie_word_embeddings=True,
        )  # fmt: skip
    if name == "kimi_linear":  # KDA 3:1 with NoPE latent attention, DeepSeek-V3 MoE
        return KimiLinearConfig(
            vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=256,
            num_hidden_layers=8, intermediate_size=768,
            layer_types=["linear_attention"] * 3 + ["full_attention"]
            + ["linear_attention"] * 3 + ["full_attention"],
            mlp_layer_types=["dense"] + ["sparse"] * 7, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
            v_head_dim=64, linear_num_heads=4, linear_head_dim=64, num_local_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=256, n_shared_experts=1, n_group=1,
            topk_group=1,
        )  # fmt: skip
    raise ValueError(
        f"--configs: unknown config {name!r}; "
        "choose bamba, jamba, nemotron_h, qwen3_next, falcon_h1, olmo_hybrid, kimi_linear"
    )


SLOW_SECONDS = 60.0  # a warm-up call slower than this is timed once more, not ``repeats`` times


def synchronize() -> None:
    """Waits for queued CUDA work, so that a wall-clock interval covers it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - start


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    if timed(run) > SLOW_SECONDS:  # the first calls are several times slower
        repeats = 1  # transformers' per-token Mamba-1 training path: minutes per step
    return statistics.median(timed(run) for _ in range(repeats))


FIRST_CALL_TOKENS = 32  # new tokens of the generation whose first call is timed


def measure(
    name: str, framework: str, repeats: int, device: str = "cpu", first_call_only: bool = False
) -> dict:
    """All measurements of one framework on one config (run in a child process).

    On CUDA both sides use their fused kernels (transformers' ``use_mamba_kernels``, our
    dispatch to mamba-ssm / causal-conv1d when they import) and peak memory is the CUDA
    allocator's peak instead of the process's RSS. ``first_call_only`` (hybrid) times only the
    first compiled generation: the parent runs it in a second process that shares the first
    one's ``TORCHINDUCTOR_CACHE_DIR``, so that it finds torch's on-disk compile cache warm.
    """
    from transformers import AutoModelForCausalLM

    from hybrid.convert import from_hf

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        config = hf_config(name, kernels=device.startswith("cuda"))
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
        model = (
            AutoModelForCausalLM.from_pretrained(directory)
            if framework == "transformers"
            else from_hf(directory)
        )
    model = model.float().to(device)
    params = sum(p.numel() for p in model.parameters())
    ids = {length: torch.randint(0, VOCAB, (1, length), device=device) for length in (1024, 4096)}
    result: dict = {"parameters": params}
    model.eval()
    with torch.inference_mode():
        if first_call_only:
            return first_call(model, ids[1024], repeats)
        for length, prompt in ids.items():
            seconds = median_seconds(lambda p=prompt: model(p), repeats)
            result[f"prefill_{length}_tokens_per_s"] = length / seconds

        def generate(new_tokens: int, compile: bool = False) -> None:
            if framework == "transformers":
                model.generate(ids[1024], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)  # fmt: skip
            else:  # one cache capacity for every call, so the compiled step is reused
                model.generate(ids[1024], new_tokens, max_seqlen=1024 + 40, compile=compile)

        def decode_ms(compile: bool = False) -> float:
            short = median_seconds(lambda: generate(1, compile), repeats)
            long = median_seconds(lambda: generate(33, compile), repeats)
            return (long - short) / 32 * 1000

        if framework == "transformers":  # its default: eager, nothing to compile
            result["decode_eager_ms_per_token"] = decode_ms()
            result["decode_ms_per_token"] = result["decode_eager_ms_per_token"]
            result["decode_first_call_ms_per_token"] = result["decode_eager_ms_per_token"]
        else:
            result["decode_eager_ms_per_token"] = decode_ms()
            result.update(first_call(model, ids[1024], repeats))
            result["decode_ms_per_token"] = decode_ms(compile=True)
    model.train()
    batch = torch.randint(0, VOCAB, (4, 512), device=device)
    result["train_tokens_per_s"] = batch.numel() / median_seconds(
        lambda: train_step(model, batch), repeats
    )
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def train_step(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """One forward + backward of the next-token loss over ``batch`` (the gradients dropped)."""
    logits = model(batch).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def first_call(model, prompt: torch.Tensor, repeats: int) -> dict:
    """The first compiled generation of this process (``FIRST_CALL_TOKENS`` new tokens), in
    ms per new token with the prompt's prefill taken out and the compile included, and the
    compile's seconds (first call minus a compiled call)."""

    def run(new_tokens: int, compile: bool) -> None:
        model.generate(prompt, new_tokens, max_seqlen=prompt.shape[1] + 40, compile=compile)

    prefill = median_seconds(lambda: run(1, False), repeats)
    first = timed(lambda: run(FIRST_CALL_TOKENS + 1, True))
    again = median_seconds(lambda: run(FIRST_CALL_TOKENS + 1, True), repeats)
    return {
        "decode_first_call_ms_per_token": (first - prefill) / FIRST_CALL_TOKENS * 1000,
        "decode_compile_seconds": first - again,
    }


def targets(prefill: float, train: float, decode: tuple[float, float] | None = None) -> dict:
    """Speed-up targets of one config: prefill (both lengths), training step, and decode
    (eager, compiled) where an issue sets one."""
    result = {"prefill_1024_tokens_per_s": prefill, "prefill_4096_tokens_per_s": prefill,
              "train_tokens_per_s": train}  # fmt: skip
    if decode:
        result |= {"decode_eager_ms_per_token": decode[0], "decode_ms_per_token": decode[1]}
    return result


TARGETS = {  # config -> metric -> hybrid / transformers, from the issues
    "bamba": targets(2, 1.5, (2, 3)),
    "nemotron_h": targets(2, 1.5, (2, 3)),
    "jamba": targets(3, 1.5, (2, 3)),
    "qwen3_next": targets(2, 2),
    "falcon_h1": targets(2, 2),
    "olmo_hybrid": targets(2, 2),  # issue 17's target for the 2025-26 hybrids
    "kimi_linear": targets(2, 2),
}
DECODE_ROWS = {  # metric -> row label; transformers' row is its default generate each time
    "decode_eager_ms_per_token": "decode ms/token, default (hybrid: eager, no compile)",
    "decode_ms_per_token": "decode ms/token, compiled (`compile=True`, after the compile)",
    "decode_first_call_ms_per_token": "decode ms/token, first call, compile included, cold "
    "compile cache",
    "decode_first_call_warm_ms_per_token": "decode ms/token, first call, compile included, "
    "warm on-disk compile cache (a later process)",
}


SECTION = "## hybrid vs transformers"  # then " on CPU" / " on CUDA": one section per kind


def median_results(runs: list[dict]) -> dict:
    """Per-metric median over the rounds of one (config, framework)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def replace_section(document: str, section: str, heading: str) -> str:
    """``document`` with the section starting ``heading`` (up to the next "## " heading)
    replaced by ``section``, or with ``section`` added at the end."""
    if heading not in document:
        return document.rstrip("\n") + "\n\n" + section
    start = document.index(heading)
    end = document.find("\n## ", start + len(heading))
    rest = "" if end < 0 else "\n" + document[end + 1 :]
    return document[:start] + section + rest


def merge_earlier(path: Path, results: dict, runs: dict, meta: dict) -> tuple[dict, dict, dict]:
    """Keep the configs of an earlier run in ``path`` that this run did not measure (on the
    same device), so that ``--configs a b`` adds to the committed table instead of replacing
    it. ``meta["measured"]`` says when, and with which transformers, each config was run."""
    measured = {name: {"date": meta["date"], "transformers": meta["transformers"],
                       "rounds": meta["rounds"]} for name in results}  # fmt: skip
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier["meta"]["device"] == meta["device"]:
            for name in earlier:
                if name not in ("meta", "rounds") and name not in results:
                    results = {name: earlier[name], **results}
                    runs = {name: earlier["rounds"][name], **runs}
                    old = earlier["meta"]
                    measured[name] = old.get("measured", {}).get(name) or {
                        "date": old["date"], "transformers": old["transformers"],
                        "rounds": old.get("rounds", 1)}  # fmt: skip
    order = [name for name in CONFIG_ORDER if name in results]
    order += [name for name in results if name not in order]
    return (
        {name: results[name] for name in order},
        {name: runs[name] for name in order},
        {**meta, "measured": {name: measured[name] for name in order}},
    )


def markdown(results: dict, meta: dict) -> str:
    rounds = meta.get("rounds", 1)
    medians = "medians" if rounds == 1 else f"medians (per metric, then over {rounds} rounds)"
    runs = {}  # (date, transformers) -> configs measured then
    for name in results:
        when = meta.get("measured", {}).get(name) or meta
        runs.setdefault((when["date"], when["transformers"]), []).append(name)
    if len(runs) == 1:
        [(day, version)] = runs
        measured = f"transformers {version} ({day}, {meta['device']})"
    else:
        measured = f"{meta['device']}: " + "; ".join(
            f"{', '.join(names)} on {day} with transformers {version}"
            for (day, version), names in runs.items()
        )
    lines = [
        f"{meta['heading']}, {measured}",
        "",
        f"Same random weights in both (transformers model converted with `from_hf`); {medians} "
        "after warm-up; each framework in its own process. Speed-up = hybrid / transformers "
        "(for decode: transformers ms / hybrid ms; transformers decodes with its default "
        "`generate` in every decode row). Decode: 32 new tokens after a 1024-token prompt, "
        "batch 1; hybrid's default `generate` is eager; `compile=True` compiles the "
        "static-shape step; the first-call rows time the first compiled `generate` of a "
        f"process ({FIRST_CALL_TOKENS} new tokens, compile included, prefill taken out), with "
        "torch's on-disk compile cache empty (cold) and filled by an earlier process (warm); "
        "compile seconds are in the JSON.",
        "",
        "| config | metric | transformers | hybrid | speed-up | target |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, pair in results.items():
        theirs, ours = pair["transformers"], pair["hybrid"]
        for metric in ("prefill_1024_tokens_per_s", "prefill_4096_tokens_per_s",
                       "train_tokens_per_s"):  # fmt: skip
            lines.append(
                f"| {name} | {metric} | {theirs[metric]:,.1f} | {ours[metric]:,.1f} | "
                f"{ours[metric] / theirs[metric]:.2f}x | {TARGETS[name][metric]}x |"
            )
        baseline = theirs["decode_eager_ms_per_token"]
        for metric, label in DECODE_ROWS.items():
            if metric in ours:
                target = TARGETS[name].get(metric)
                lines.append(
                    f"| {name} | {label} | {baseline:,.2f} | {ours[metric]:,.2f} | "
                    f"{baseline / ours[metric]:.2f}x | {f'{target}x' if target else ''} |"
                )
        lines.append(
            f"| {name} | peak RSS MiB | {theirs['peak_rss_mib']:,.0f} | "
            f"{ours['peak_rss_mib']:,.0f} | | |"
        )
        if "peak_cuda_mib" in ours:
            lines.append(
                f"| {name} | peak CUDA MiB | {theirs['peak_cuda_mib']:,.0f} | "
                f"{ours['peak_cuda_mib']:,.0f} | | |"
            )
    return "\n".join(lines) + "\n"


def run_child(args: argparse.Namespace, name: str, framework: str, env: dict, *extra: str) -> dict:
    """One measuring process; returns its JSON result."""
    child = subprocess.run(
        [sys.executable, __file__, "--child", name, framework, "--repeats", str(args.repeats),
         "--device", args.device, *extra],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["bamba", "jamba", "nemotron_h"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="processes per (config, framework)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "FRAMEWORK"), help=argparse.SUPPRESS)
    parser.add_argument("--first-call-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device: CUDA is not available on this machine")
    if args.child:
        result = measure(*args.child, args.repeats, args.device, args.first_call_only)
        print(json.dumps(result))
        return
    import transformers

    for name in args.configs:
        hf_config(name)  # fail fast on a bad name
    runs = {name: {"transformers": [], "hybrid": []} for name in args.configs}
    for _ in range(args.rounds):
        for name in args.configs:
            with tempfile.TemporaryDirectory() as compile_cache:  # cold for each round
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": compile_cache}
                for framework in ("transformers", "hybrid"):
                    result = run_child(args, name, framework, env)
                    if framework == "hybrid":  # a second process finds the cache warm
                        warm = run_child(args, name, framework, env, "--first-call-only")
                        result["decode_first_call_warm_ms_per_token"] = warm[
                            "decode_first_call_ms_per_token"
                        ]
                        result["decode_compile_warm_seconds"] = warm["decode_compile_seconds"]
                    runs[name][framework].append(result)
                    print(name, framework, result, flush=True)
    results = {
        name: {framework: median_results(pair[framework]) for framework in pair}
        for name, pair in runs.items()
    }
    cuda = args.device.startswith("cuda")
    meta = {
        "heading": f"{SECTION} on {'CUDA' if cuda else 'CPU'}",
        "date": date.today().isoformat(),
        "device": (
            torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda")
            else cpu_description()
        ),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "allocator": allocator_settings(),
    }
    docs = ROOT / "docs"
    path = docs / ("bench_vs_hf_cuda.json" if cuda else "bench_vs_hf.json")
    results, runs, meta = merge_earlier(path, results, runs, meta)
    path.write_text(json.dumps({"meta": meta, **results, "rounds": runs}, indent=2))
    table = markdown(results, meta)
    benchmarks = docs / "benchmarks.md"
    document = benchmarks.read_text() if benchmarks.exists() else "# Benchmarks\n"
    benchmarks.write_text(replace_section(document, table, meta["heading"]))
    print(table)


if __name__ == "__main__":
    main()

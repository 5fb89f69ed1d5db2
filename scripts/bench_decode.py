"""Decode ms/token and inference-cache bytes against context length, attention vs SSM vs hybrid.

Three stacks of the same width, depth and vocabulary (16 pre-norm sublayers, d_model 256,
vocab 256, batch 1; a mixer then an MLP, eight times, no MoE):

- ``attention``: all attention (``"*-" * 8``);
- ``jamba_1_7``: a Jamba-like 1:7 hybrid, ``pattern_from_periods(8, 8, 4, None,
  mixer="mamba2")`` = ``"M-M-M-M-*-M-M-M-"``;
- ``mamba2``: all Mamba-2 (``"M-" * 8``).

For each context length L the cache is allocated with room for L + warm-up + timed steps and
brought to L tokens in one of two ways (``--fill``):

- ``random`` (default): written directly. Every KV entry gets random keys and values in its
  first L slots with ``key_index = 0..L-1`` and ``valid = True`` there; SSM entries get random
  conv and SSM states; ``cache.length`` and ``cache.real_lengths`` are set to L. Decode cost
  does not depend on the values, only on how many keys are in view.
- ``prefill``: a real random prompt of L tokens run through the model in ``--chunk``-token
  chunks. On 2 shared CPU cores a 32K prefill took about 50 s (attention), 36 s (hybrid) and
  32 s (Mamba-2), so the whole default sweep would spend 4+ minutes in prefill alone; hence the
  default is ``random``. At 1K, 4K and 16K the two fills gave decode times within 5% of each
  other.

CPU threads (``--threads``, default 1): a batch-1 decode step of this small model is hundreds of
small ops, each an OpenMP parallel region when torch uses several threads; whenever another
process holds a core, every region waits for its threads to be scheduled, and on a shared
2-core machine a step went from 5 ms (1 thread) to 480 ms (2 threads). One thread gives stable
numbers; pass ``--threads 0`` to keep torch's default on a dedicated machine.

Then ``--warmup`` decode steps are run untimed and ``--steps`` timed one by one; the median is
reported as ms/token. A step (``--step``) is the model's forward with the cache (``forward``,
the default), its static ``decode_step`` (``static``: the shapes ``torch.compile`` and CUDA
graphs need), or that step recorded once and replayed as a CUDA graph (``cuda-graph``,
:class:`hybrid.inference.cuda_graph.CUDAGraphDecodeStep`; a step includes copying the token in
and the logits out). Cache bytes are reported for L tokens from ``hybrid.accounting.describe``;
the allocated cache's ``nbytes`` (capacity L + warm-up + steps) is checked against ``describe``
at that capacity.

Speculative decoding (``--speculative``, the default; ``--no-speculative`` skips it): tokens/s
of ``hybrid.inference.speculative_generate`` with the hybrid above as target, greedy, against
plain greedy decoding of the target (``target.generate``), same random prompt
(``--spec-prompt`` 128 tokens) and number of new tokens (``--spec-new`` 64). Both are timed by
wall clock around the whole call (prefill included, as ``SpeculativeResult.seconds`` is), after
``--spec-warmup`` untimed calls, median of ``--spec-repeats``; each speculative configuration's
runs alternate with plain runs and its speed-up is taken over those paired plain runs. For each
k in ``--spec-k`` (2 4 8) and three drafts:

- ``small``: the same family, 4 sublayers at d_model 128 (``"M-*-"``). With random weights it
  agrees with the target only by chance, so this is the method's cost at near-zero acceptance;
- ``oracle``: the same small model, run for real (same cost), but its logits are bumped to the
  target's greedy token (known from the plain run), so every draft is accepted: the speed-up a
  draft of this cost would give at acceptance 1.0, the method's ceiling for it;
- ``self``: the target drafting for itself (acceptance 1.0, but drafting costs as much as
  decoding, so it cannot beat plain decoding: it measures the method's overhead).

Every speculative output is checked token for token against plain greedy decoding; a mismatch
is recorded and makes the script exit non-zero after writing its outputs.

Usage: python scripts/bench_decode.py [--contexts 1024 2048 ... 32768] [--steps 16]
    [--warmup 4] [--fill random|prefill] [--chunk 2048] [--device cpu|cuda]
    [--dtype float32] [--threads 1] [--step forward|static|cuda-graph] [--out docs/bench_decode]
    [--speculative | --no-speculative] [--spec-k 2 4 8] [--spec-prompt 128] [--spec-new 64]
    [--spec-repeats 5] [--spec-warmup 1]
Writes OUT.json, OUT.md (markdown tables) and OUT.png (two panels), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from hybrid import HybridConfig, HybridLM, pattern_from_periods
from hybrid.accounting import describe
from hybrid.eval.decode import device_sync, fill_prefill, fill_random, time_decode
from hybrid.inference.cache import HybridCache
from hybrid.inference.cuda_graph import CUDAGraphDecodeStep
from hybrid.inference.speculative import speculative_generate
from hybrid.model import HybridOutput
from hybrid.provenance import cpu_description

D_MODEL = 256
VOCAB = 256
N_LAYERS = 8  # mixer + MLP pairs: 16 sublayers
STACKS = {
    "attention": "*-" * N_LAYERS,
    "jamba_1_7": pattern_from_periods(N_LAYERS, 8, 4, None, mixer="mamba2"),
    "mamba2": "M-" * N_LAYERS,
}
LABELS = {
    "attention": "all attention",
    "jamba_1_7": "Jamba-like 1:7 hybrid",
    "mamba2": "all Mamba-2",
}
DEFAULT_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]
MIB = 2**20
SPEC_TARGET = "jamba_1_7"
DRAFT_D_MODEL = 128
DRAFT_PATTERN = "M-*-"
DRAFTS = {
    "small": f"small draft ({DRAFT_PATTERN}, d_model {DRAFT_D_MODEL})",
    "oracle": "small draft, forced to agree (oracle)",
    "self": "target as its own draft",
}


def make_config(pattern: str) -> HybridConfig:
    """A stack of the shared width; attention has 4 heads of 64, Mamba-2 its defaults."""
    return HybridConfig(pattern=pattern, vocab_size=VOCAB, d_model=D_MODEL)


def bench(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Every stack at every context: ms/token (median and quartiles) and cache bytes."""
    sync = device_sync(device)
    generator = torch.Generator().manual_seed(0)
    results: dict = {"stacks": {}, "runs": []}
    models = {}
    for name, pattern in STACKS.items():
        torch.manual_seed(0)
        config = make_config(pattern)
        model = HybridLM(config).to(device=device, dtype=dtype).eval()
        models[name] = (config, model)
        results["stacks"][name] = {
            "label": LABELS[name],
            "pattern": config.pattern_string,
            "sublayers": len(config.layers),
            "parameters": model.num_parameters(),
        }
    for context in args.contexts:
        for name, (config, model) in models.items():
            capacity = context + args.warmup + args.steps
            cache = model.allocate_cache(1, capacity, dtype=dtype)
            start = time.perf_counter()
            if args.fill == "random":
                fill_random(cache, context, generator)
            else:
                fill_prefill(model, cache, context, args.chunk)
            sync()
            fill_seconds = time.perf_counter() - start
            times = time_decode(
                model, cache, args.warmup, args.steps, sync, decode_step(args, model)
            )
            quartiles = statistics.quantiles(times, n=4)
            at_context = describe(config, context, dtype).cache_bytes
            at_capacity = describe(config, capacity, dtype).cache_bytes
            row = {
                "stack": name,
                "context": context,
                "ms_per_token": 1e3 * statistics.median(times),
                "ms_per_token_p25": 1e3 * quartiles[0],
                "ms_per_token_p75": 1e3 * quartiles[2],
                "step_ms": [round(1e3 * t, 3) for t in times],
                "cache_bytes": at_context,
                "cache_capacity": capacity,
                "cache_nbytes_allocated": cache.nbytes,
                "describe_bytes_at_capacity": at_capacity,
                "nbytes_agrees_with_describe": cache.nbytes == at_capacity,
                "fill_seconds": fill_seconds,
            }
            results["runs"].append(row)
            print(
                f"{name:>10} L={context:>6}: {row['ms_per_token']:7.2f} ms/token, cache "
                f"{at_context / MIB:8.2f} MiB (fill {fill_seconds:.1f} s)",
                flush=True,
            )
            del cache
    largest = max(args.contexts)
    cache_at = {r["stack"]: r["cache_bytes"] for r in results["runs"] if r["context"] == largest}
    results["hybrid_over_attention_cache"] = {
        "context": largest,
        "ratio": cache_at["jamba_1_7"] / cache_at["attention"],
    }
    if args.speculative:
        results["speculative"] = bench_speculative(args, device, dtype, models[SPEC_TARGET][1])
    return results


STEP_LABELS = {
    "forward": "the model's forward with the cache",
    "static": "the static `decode_step`",
    "cuda-graph": "the static `decode_step` replayed as one CUDA graph",
}


def decode_step(args: argparse.Namespace, model: HybridLM):
    """What ``--step`` times: None for the model's forward, else a static decode step."""
    if args.step == "forward":
        return None
    if args.step == "static":
        return model.decode_step
    return CUDAGraphDecodeStep(model.decode_step)


class OracleDraft(torch.nn.Module):
    """A draft that costs what ``model`` costs but proposes the target's greedy tokens.

    ``model`` runs on every call as usual (same cache, same work); then, at each position, the
    logit of the token that follows it in ``sequence`` (the target's plain greedy output:
    prompt + new tokens) is raised above all others, so greedy drafting proposes exactly the
    target's tokens and every draft is accepted. Benchmark-only: it shows the speed-up at
    acceptance 1.0 for a draft of ``model``'s cost.
    """

    def __init__(self, model: HybridLM, sequence: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.sequence = sequence[0]

    def allocate_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> HybridCache:
        return self.model.allocate_cache(batch_size, max_seqlen, dtype)

    def forward(self, input_ids: torch.Tensor, *, cache: HybridCache) -> HybridOutput:
        start = cache.length
        output = self.model(input_ids, cache=cache)
        logits = output.logits.clone()
        positions = torch.arange(start + 1, start + 1 + input_ids.shape[1])
        known = positions < self.sequence.numel()
        rows = torch.nonzero(known).flatten().to(logits.device)
        nexts = self.sequence[positions[known]].to(logits.device)
        logits[0, rows, nexts] = logits[0].max() + 100.0
        return HybridOutput(logits, output.aux_loss, output.router_stats)


def timed(
    calls: list[Callable[[], object]], warmup: int, repeats: int, sync: Callable[[], None]
) -> tuple[list[list[float]], list[object]]:
    """Time ``calls`` in turn, ``repeats`` rounds after ``warmup`` untimed ones.

    Alternating the calls keeps a slow spell of a shared machine from landing on one of them
    only. Returns the seconds of each call's timed runs and each call's last result.
    """
    times: list[list[float]] = [[] for _ in calls]
    results: list[object] = [None] * len(calls)
    for round_index in range(warmup + repeats):
        for index, call in enumerate(calls):
            sync()
            start = time.perf_counter()
            results[index] = call()
            sync()
            if round_index >= warmup:
                times[index].append(time.perf_counter() - start)
    return times, results


@torch.inference_mode()
def forward_ms(
    model: HybridLM, prompt: torch.Tensor, n_tokens: int, repeats: int, sync: Callable[[], None]
) -> float:
    """Median ms of one cached forward of ``n_tokens`` tokens right after ``prompt``.

    The prompt is prefilled once; each repeat rolls the cache back to that point first.
    """
    cache = model.allocate_cache(1, prompt.shape[1] + n_tokens)
    model(prompt, cache=cache)
    checkpoint = cache.checkpoint()
    tokens = torch.randint(0, VOCAB, (1, n_tokens), device=prompt.device)
    times = []
    for _ in range(repeats + 2):
        cache.rollback(checkpoint)
        sync()
        start = time.perf_counter()
        model(tokens, cache=cache)
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


def bench_speculative(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, target: HybridLM
) -> dict:
    """Plain greedy decoding of ``target`` vs speculative decoding with each draft at each k."""
    sync = device_sync(device)
    torch.manual_seed(1)
    draft_config = HybridConfig(pattern=DRAFT_PATTERN, vocab_size=VOCAB, d_model=DRAFT_D_MODEL)
    small = HybridLM(draft_config).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, VOCAB, (1, args.spec_prompt), generator=generator).to(device)
    n = args.spec_new

    def plain_call() -> torch.Tensor:
        return target.generate(prompt, n)

    (times,), (reference,) = timed([plain_call], args.spec_warmup, args.spec_repeats, sync)
    plain_s = statistics.median(times)
    plain = {
        "seconds": plain_s,
        "tokens_per_second": n / plain_s,
        "ms_per_token": 1e3 * plain_s / n,
        "run_seconds": [round(t, 4) for t in times],
    }
    print(f"{'plain':>10}      : {plain['tokens_per_second']:7.1f} tokens/s", flush=True)
    costs = {
        "draft_1_token_ms": forward_ms(small, prompt, 1, 20, sync),
        "target_1_token_ms": forward_ms(target, prompt, 1, 20, sync),
        **{
            f"target_{k + 1}_tokens_ms": forward_ms(target, prompt, k + 1, 20, sync)
            for k in args.spec_k
        },
    }
    print("forward ms: " + ", ".join(f"{key} {value:.2f}" for key, value in costs.items()))
    drafts = {"small": small, "oracle": OracleDraft(small, reference), "self": target}
    runs = []
    for k in args.spec_k:
        for name, draft in drafts.items():

            def call(draft=draft, k=k):
                return speculative_generate(target, draft, prompt, n, num_draft_tokens=k)

            (plain_times, times), (_, result) = timed(
                [plain_call, call], args.spec_warmup, args.spec_repeats, sync
            )
            seconds, paired_plain = statistics.median(times), statistics.median(plain_times)
            row = {
                "draft": name,
                "k": k,
                "seconds": seconds,
                "tokens_per_second": n / seconds,
                "plain_seconds": paired_plain,
                "plain_tokens_per_second": n / paired_plain,
                "speedup": paired_plain / seconds,
                "acceptance_rate": result.acceptance_rate,
                "drafted": result.drafted,
                "accepted": result.accepted,
                "rounds": result.rounds,
                "new_tokens": result.new_tokens,
                "result_seconds": result.seconds,
                "run_seconds": [round(t, 4) for t in times],
                "plain_run_seconds": [round(t, 4) for t in plain_times],
                "tokens_match_plain_greedy": bool(torch.equal(result.tokens, reference)),
            }
            runs.append(row)
            print(
                f"{name:>10} k={k:<4}: {row['tokens_per_second']:7.1f} tokens/s, "
                f"x{row['speedup']:.2f}, acceptance {row['acceptance_rate']:.2f}, "
                f"match {row['tokens_match_plain_greedy']}",
                flush=True,
            )
    return {
        "target": SPEC_TARGET,
        "target_pattern": target.config.pattern_string,
        "target_parameters": target.num_parameters(),
        "draft_pattern": draft_config.pattern_string,
        "draft_d_model": DRAFT_D_MODEL,
        "draft_parameters": small.num_parameters(),
        "drafts": DRAFTS,
        "prompt_tokens": args.spec_prompt,
        "new_tokens": n,
        "warmup": args.spec_warmup,
        "repeats": args.spec_repeats,
        "sampling": "greedy (temperature 0)",
        "timing": (
            "wall clock around the whole call, prefill included; median of repeats; each "
            "speculative configuration alternates with plain decoding, and its speed-up is over "
            "those paired plain runs"
        ),
        "plain": plain,
        "forward_ms": costs,
        "runs": runs,
        "all_tokens_match": all(r["tokens_match_plain_greedy"] for r in runs),
    }


def markdown_speculative(spec: dict, meta: dict) -> str:
    """The speculative-decoding results as a markdown section."""
    plain, costs = spec["plain"], spec["forward_ms"]
    rows = {(r["draft"], r["k"]): r for r in spec["runs"]}
    ks = sorted({r["k"] for r in spec["runs"]})
    best = {name: max((rows[name, k] for k in ks), key=lambda r: r["speedup"]) for name in DRAFTS}
    small_acceptance = max(rows["small", k]["acceptance_rate"] for k in ks)
    lines = [
        f"## Speculative decoding ({meta['date']}, {meta['device']})",
        "",
        f"Target: the Jamba-like 1:7 hybrid above (`{spec['target_pattern']}`, d_model "
        f"{D_MODEL}, {spec['target_parameters']:,} parameters), random weights. Small draft: "
        f"`{spec['draft_pattern']}` at d_model {spec['draft_d_model']} "
        f"({spec['draft_parameters']:,} parameters). Greedy; a random "
        f"{spec['prompt_tokens']}-token prompt, {spec['new_tokens']} new tokens; wall clock "
        f"around the whole call (prefill included), median of {spec['repeats']} runs after "
        f"{spec['warmup']} warm-up. Plain "
        f"greedy decoding (`target.generate`): **{plain['tokens_per_second']:.1f} tokens/s** "
        f"({plain['ms_per_token']:.2f} ms/token); each row's runs alternate with plain runs, "
        "and its speed-up is over those paired runs (robust to the shared machine's slow "
        "spells). Speculative output equal to plain greedy "
        "output token for token: "
        + ("yes, every run." if spec["all_tokens_match"] else "**no** (see the JSON).")
        + " Drafts: *small*, the small model as is; *oracle*, the same small model run for real "
        "but with its logits bumped to the target's greedy token, so every draft is accepted "
        "(the ceiling for a draft of that cost); *self*, the target drafting for itself "
        "(acceptance 1.0, but each draft token costs a full target step).",
        "",
        "| draft | k | tokens/s | acceptance | rounds | plain tokens/s (paired) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in DRAFTS.items():
        for k in ks:
            r = rows[name, k]
            lines.append(
                f"| {label} | {k} | {r['tokens_per_second']:.1f} | {r['acceptance_rate']:.2f} | "
                f"{r['rounds']} | {r['plain_tokens_per_second']:.1f} | x{r['speedup']:.2f} |"
            )
    lines += [
        "",
        f"With random weights the small draft agrees with the target only by chance (acceptance "
        f"at most {small_acceptance:.2f} here), so every round pays for k draft steps, a "
        "(k+1)-token verification and a rollback plus re-feed, to gain one token: its speed-up "
        f"(best x{best['small']['speedup']:.2f}, k={best['small']['k']}) is a lower bound. "
        f"With every draft accepted the same small draft reaches x{best['oracle']['speedup']:.2f} "
        f"(k={best['oracle']['k']}); the target as its own draft, acceptance 1.0 but no cheaper "
        f"than decoding, gets x{best['self']['speedup']:.2f} (k={best['self']['k']}), the "
        "method's overhead rather than a gain. Trained target/draft pairs (after the training "
        "work) will land between the small and oracle rows; their acceptance rate is the real "
        "figure.",
        "",
        "Cost of one cached forward after the prompt (median ms): small draft, 1 token "
        f"{costs['draft_1_token_ms']:.2f}; target, 1 token {costs['target_1_token_ms']:.2f}"
        + "".join(f"; target, {k + 1} tokens {costs[f'target_{k + 1}_tokens_ms']:.2f}" for k in ks)
        + ". The draft-to-target step cost ratio and the verification cost bound the speed-up "
        "a perfect draft of this size can give; acceptance decides how much of it is realised.",
    ]
    return "\n".join(lines) + "\n"


def growth(results: dict, stack: str) -> float:
    """ms/token at the largest context over ms/token at the smallest, for ``stack``."""
    rows = sorted((r for r in results["runs"] if r["stack"] == stack), key=lambda r: r["context"])
    return rows[-1]["ms_per_token"] / rows[0]["ms_per_token"]


def context_label(context: int) -> str:
    """32768 -> '32K'; 1000 -> '1000'."""
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def markdown(results: dict, meta: dict) -> str:
    """The results as a markdown section: stacks, the table, the cache ratio, the shape."""
    lines = [
        f"## Decode ms/token and cache size vs context ({meta['date']}, {meta['device']})",
        "",
        f"Batch 1, {meta['dtype']} weights and cache, median of {meta['steps']} decode steps "
        f"({STEP_LABELS[meta.get('step', 'forward')]}) after "
        f"{meta['warmup']} warm-up steps. Cache filled to L by "
        + (
            "writing it directly (random keys/values in the first L KV slots, random SSM "
            "states), not by a real prefill."
            if meta["fill"] == "random"
            else f"a real prefill of a random prompt in {meta['chunk']}-token chunks."
        )
        + " Cache MiB is the cache holding L tokens (`hybrid.accounting.describe`: KV and conv "
        "state in the model dtype, SSM state float32, plus 9 B of slot bookkeeping per KV "
        "position); the allocated caches' `nbytes` matched `describe` at their capacity: "
        + ("yes." if meta["nbytes_agree"] else "**no**.")
        + f" Total run time {meta['runtime_s']:.0f} s.",
        "",
        "| stack | pattern | sublayers | parameters |",
        "|---|---|---:|---:|",
    ]
    for stack in results["stacks"].values():
        lines.append(
            f"| {stack['label']} | `{stack['pattern']}` | {stack['sublayers']} | "
            f"{stack['parameters']:,} |"
        )
    lines += ["", "| stack | context | ms/token | cache MiB |", "|---|---:|---:|---:|"]
    for row in results["runs"]:
        lines.append(
            f"| {results['stacks'][row['stack']]['label']} | {context_label(row['context'])} | "
            f"{row['ms_per_token']:.2f} | {row['cache_bytes'] / MIB:.2f} |"
        )
    ratio = results["hybrid_over_attention_cache"]
    lines += [
        "",
        f"Hybrid cache / attention cache at {context_label(ratio['context'])}: "
        f"{ratio['ratio']:.3f} (1/{1 / ratio['ratio']:.1f}).",
        "",
        "Expected shape: SSM decode is flat in context (a fixed-size state per layer), attention "
        "decode grows linearly with context (every step reads all L cached keys and values), "
        "and the hybrid sits between, close to the SSM line: its one attention layer in eight "
        "adds an eighth of attention's linear term (on the log2 axis of `bench_decode.png` a "
        "linear rise looks exponential). The hybrid's cache at 32K is at most 1/6 of "
        "attention's (one KV layer in eight: about 1/8, plus the SSM states). Measured "
        "ms/token, largest over smallest context: "
        f"all attention x{growth(results, 'attention'):.1f}, "
        f"hybrid x{growth(results, 'jamba_1_7'):.1f}, "
        f"all Mamba-2 x{growth(results, 'mamba2'):.1f}.",
    ]
    if meta["device"].startswith("CPU"):
        lines += [
            "",
            "On a shared CPU, small absolute differences (about a millisecond) are within the "
            "noise; `docs/bench_decode.json` has every step's time and the quartiles.",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict, meta: dict, path: Path) -> None:
    """Two panels, ms/token and cache MiB against context (log2 x axis), one line per stack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in results["runs"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    styles = {"attention": "o-", "jamba_1_7": "s-", "mamba2": "^-"}
    for name, stack in results["stacks"].items():
        rows = sorted(
            (r for r in results["runs"] if r["stack"] == name), key=lambda r: r["context"]
        )
        x = [r["context"] for r in rows]
        median = [r["ms_per_token"] for r in rows]
        low = [r["ms_per_token_p25"] for r in rows]
        high = [r["ms_per_token_p75"] for r in rows]
        (line,) = left.plot(x, median, styles[name], label=stack["label"])
        left.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        right.plot(x, [r["cache_bytes"] / MIB for r in rows], styles[name], label=stack["label"])
    left.set_title("Decode latency (median, band: quartiles)")
    left.set_ylabel("ms / token")
    left.set_ylim(bottom=0)
    right.set_title("Inference cache per sequence")
    right.set_ylabel("cache MiB (log scale)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [context_label(c) for c in contexts])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"d_model {D_MODEL}, {2 * N_LAYERS} sublayers, batch 1, {meta['dtype']}, {meta['device']}",
        fontsize=10,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS)
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    parser.add_argument("--fill", choices=("random", "prefill"), default="random")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (--fill prefill)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: see the module docstring; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--step",
        choices=("forward", "static", "cuda-graph"),
        default="forward",
        help="what a timed step runs: the model's forward with the cache (default), its static "
        "decode_step, or that step replayed as a CUDA graph (CUDA only)",
    )
    parser.add_argument("--out", default="docs/bench_decode")
    parser.add_argument(
        "--speculative",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also benchmark speculative decoding (default: on)",
    )
    parser.add_argument("--spec-k", type=int, nargs="+", default=[2, 4, 8], help="draft tokens")
    parser.add_argument("--spec-prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--spec-new", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--spec-repeats", type=int, default=5, help="timed generations")
    parser.add_argument("--spec-warmup", type=int, default=1, help="untimed generations first")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.steps < 2 or args.warmup < 0 or min(args.contexts) < 1 or args.chunk < 1:
        parser.error("need --steps >= 2, --warmup >= 0, positive --contexts and --chunk")
    if min(args.spec_k) < 1 or min(args.spec_prompt, args.spec_new, args.spec_repeats) < 1:
        parser.error("need positive --spec-k, --spec-prompt, --spec-new and --spec-repeats")
    if args.spec_warmup < 0:
        parser.error("need --spec-warmup >= 0")
    if args.step == "cuda-graph" and not args.device.startswith("cuda"):
        parser.error("--step cuda-graph: needs --device cuda")
    args.spec_k = sorted(set(args.spec_k))
    args.contexts = sorted(set(args.contexts))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    results = bench(args, device, dtype)
    meta = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else cpu_description(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "batch_size": 1,
        "d_model": D_MODEL,
        "vocab_size": VOCAB,
        "steps": args.steps,
        "warmup": args.warmup,
        "step": args.step,
        "fill": args.fill,
        "fill_description": (
            "cache written directly: random keys/values in the first L KV slots (key_index "
            "0..L-1, valid), random conv/SSM states, cache.length = real_lengths = L"
            if args.fill == "random"
            else f"real prefill of a random L-token prompt in {args.chunk}-token chunks"
        ),
        "chunk": args.chunk,
        "nbytes_agree": all(r["nbytes_agrees_with_describe"] for r in results["runs"]),
        "runtime_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(results, meta)
    if "speculative" in results:
        table += "\n" + markdown_speculative(results["speculative"], meta)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=2))
    out.with_suffix(".md").write_text(table)
    plot(results, meta, out.with_suffix(".png"))
    print(table)
    if not results.get("speculative", {}).get("all_tokens_match", True):
        raise SystemExit("speculative decoding output differs from plain greedy decoding")


if __name__ == "__main__":
    main()

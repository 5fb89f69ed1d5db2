"""Decode cost against context length: ms/token and inference-cache bytes of one model.

For each context length L a batch-1 cache is allocated for L plus the decode steps and brought
to L tokens, either written directly (``random``: random keys and values in the first L KV
slots, random conv and SSM states, as if L tokens had gone in; decode cost depends only on
how many keys are in view) or by a real prefill of a random prompt (``prefill``, in
``chunk_size`` chunks; slower). Then ``warmup`` decode steps run untimed and ``steps`` are
timed one by one; the median is ms/token. Cache bytes at L come from
:func:`hybrid.accounting.describe` (KV and conv state in the model's dtype, SSM state float32), with
the breakdown per block family. ``scripts/bench_decode.py`` uses the same fill and timing
functions to compare whole stacks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from hybrid.accounting import describe
from hybrid.eval import inference
from hybrid.eval.progress import progress_bar

if TYPE_CHECKING:
    from hybrid.inference.cache import HybridCache
    from hybrid.model import HybridLM
    from hybrid.tokenizer import Tokenizer

DEFAULT_CONTEXTS = [1024, 2048, 4096, 8192]
FILLS = ("random", "prefill")
DEFAULT_THREADS = 1
"""CPU threads when ``--threads`` is not given: a batch-1 decode step is hundreds of small ops,
each an OpenMP region that waits for every thread, so on a shared machine more threads make
timings slow and erratic (see ``scripts/bench_decode.py``)."""


@torch.no_grad()
def fill_random(cache: HybridCache, length: int, generator: torch.Generator) -> None:
    """Make ``cache`` look as if it had consumed ``length`` real tokens, without running them.

    Each entry fills itself (:meth:`layers.base.CacheEntry.fill_random`): KV entries get random
    keys/values in the slots of indices 0..length-1 (slot ``t % window`` for a sliding-window
    ring), conv and SSM states small random values.
    """
    for entry in cache.entries:
        if entry is not None:
            entry.fill_random(length, generator)
    cache.length = length
    cache.real_lengths.fill_(length)


@torch.inference_mode()
def fill_prefill(model: HybridLM, cache: HybridCache, length: int, chunk: int) -> None:
    """Run a random prompt of ``length`` tokens through ``model`` into ``cache``, in chunks."""
    device = model.embedding.weight.device
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    for start in range(0, length, chunk):
        model(ids[:, start : start + chunk], cache=cache)


@torch.inference_mode()
def time_decode(
    model: HybridLM,
    cache: HybridCache,
    warmup: int,
    steps: int,
    sync: Callable[[], None],
    step: Callable[[torch.Tensor, HybridCache, torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """Seconds of each of ``steps`` single-token decode steps, after ``warmup`` untimed ones.

    A step is ``model(token, cache=cache)`` (the general forward), or with ``step`` (such as
    ``model.decode_step`` or a :class:`hybrid.inference.cuda_graph.CUDAGraphDecodeStep` of it)
    ``step(token, cache, position)`` followed by ``cache.advance``, timed together.
    """
    device = model.embedding.weight.device
    tokens = torch.randint(0, model.config.vocab_size, (warmup + steps, cache.batch_size, 1),
                           device=device)  # fmt: skip
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        if step is None:
            logits = model(tokens[i], cache=cache).logits
        else:
            logits = step(tokens[i], cache, torch.tensor(cache.length, device=device))
            cache.advance(1, None)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if not bool(torch.isfinite(logits).all()):
        raise RuntimeError("decode produced non-finite logits")
    return times


def device_sync(device: torch.device) -> Callable[[], None]:
    """A call that waits for ``device`` (CUDA kernels run asynchronously); nothing on CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def run_decode(
    model: HybridLM,
    contexts: Sequence[int] = tuple(DEFAULT_CONTEXTS),
    steps: int = 16,
    warmup: int = 4,
    seed: int = 0,
    *,
    fill: str = "random",
    chunk_size: int = inference.DEFAULT_CHUNK_SIZE,
    max_context: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Decode ms/token (median and quartiles of ``steps`` timed steps) and cache bytes at each
    context length.

    Returns ``{"task", "settings", "rows"}``: one row per context with ``ms_per_token``,
    ``ms_per_token_p25`` / ``_p75``, ``step_ms``, ``cache_bytes`` (at the context),
    ``cache_bytes_by_block`` and the allocated cache's ``cache_nbytes_allocated``.

    Raises:
        ValueError: before any work: non-positive contexts, ``steps < 2``, ``warmup < 0``, an
            unknown fill, a context beyond ``max_context`` or the device's memory.
    """
    contexts = sorted(set(contexts))
    if steps < 2:
        raise ValueError(f"steps: need at least 2 timed steps; got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup: must be >= 0; got {warmup}")
    if fill not in FILLS:
        raise ValueError(f"fill: {fill!r} is not one of {', '.join(FILLS)}")
    inference.check_positive("chunk-size", [chunk_size])
    inference.check_context(
        model, "contexts", contexts, extra_tokens=warmup + steps, max_context=max_context
    )
    sync = device_sync(model.embedding.weight.device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dtype = model.embedding.weight.dtype
    rows = []
    with progress_bar(len(contexts), "decode", progress) as bar:
        for context in contexts:
            capacity = context + warmup + steps
            cache = model.allocate_cache(1, capacity)
            start = time.perf_counter()
            if fill == "random":
                fill_random(cache, context, generator)
            else:
                fill_prefill(model, cache, context, chunk_size)
            sync()
            fill_seconds = time.perf_counter() - start
            times = time_decode(model, cache, warmup, steps, sync)
            quartiles = statistics.quantiles(times, n=4)
            info = describe(model.config, context, dtype)
            by_block: dict[str, int] = {}
            for row in info.rows:
                by_block[row.block] = by_block.get(row.block, 0) + row.cache_bytes
            rows.append(
                {
                    "context": context,
                    "ms_per_token": 1e3 * statistics.median(times),
                    "ms_per_token_p25": 1e3 * quartiles[0],
                    "ms_per_token_p75": 1e3 * quartiles[2],
                    "step_ms": [round(1e3 * t, 4) for t in times],
                    "cache_bytes": info.cache_bytes,
                    "cache_bytes_by_block": by_block,
                    "cache_capacity": capacity,
                    "cache_nbytes_allocated": cache.nbytes,
                    "fill_seconds": fill_seconds,
                }
            )
            del cache
            bar.update(1)
    return {
        "task": "decode",
        "settings": {
            "contexts": contexts,
            "steps": steps,
            "warmup": warmup,
            "seed": seed,
            "fill": fill,
            "chunk_size": chunk_size,
            "batch_size": 1,
            "max_context": max_context,
            "dtype": str(dtype).removeprefix("torch."),
            "timing": "median (and quartiles) of single-token decode steps, wall clock",
        },
        "rows": rows,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hybrid eval decode`` options."""
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS, metavar="TOKENS",
        help=f"context lengths (default {DEFAULT_CONTEXTS})",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps (default 16)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (default 4)")
    parser.add_argument(
        "--fill", choices=FILLS, default="random",
        help="bring the cache to the context by writing it directly (random, fast) or by a "
        "real prefill of a random prompt (prefill)",
    )  # fmt: skip


def check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no model (run before the checkpoint is loaded)."""
    inference.check_lengths("--contexts", args.contexts, args.max_context)
    if args.steps < 2:
        raise ValueError(f"--steps: need at least 2 timed steps; got {args.steps}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: must be >= 0; got {args.warmup}")


def evaluate(
    args: argparse.Namespace, model: HybridLM, tokenizer: Tokenizer, progress: bool
) -> dict[str, Any]:
    """``hybrid eval decode``: :func:`run_decode` with the parsed options."""
    return run_decode(
        model, args.contexts, args.steps, args.warmup, args.seed, fill=args.fill,
        chunk_size=args.chunk_size, max_context=args.max_context, progress=progress,
    )  # fmt: skip

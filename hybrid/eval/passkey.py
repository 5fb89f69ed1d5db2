"""``hybrid eval passkey``: passkey retrieval accuracy over a grid of context lengths x depths.

The prompts are those of :mod:`hybrid.synthetic.passkey`, at the checkpoint's tokenizer. The
answer is decoded greedily; a trial is correct when the first number in the continuation is the
key.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybrid.eval import inference
from hybrid.eval.progress import batches, progress_bar
from hybrid.synthetic.haystack import encode_segment
from hybrid.synthetic.passkey import passkey_key, passkey_prompt, shortest_prompt

if TYPE_CHECKING:
    from hybrid.model import HybridLM
    from hybrid.tokenizer import Tokenizer

DEFAULT_LENGTHS = [256, 512, 1024, 2048]
DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
ANSWER_MARGIN = 2  # decoded tokens beyond the key's own, so a key after a stray token counts


def score(text: str, key: int) -> bool:
    """Whether the first number in ``text`` is ``key``."""
    match = re.search(r"\d+", text)
    return match is not None and match.group() == str(key)


@dataclass(frozen=True)
class Trial:
    length: int
    depth: float
    trial: int
    key: int


def check_depths(depths: Sequence[float], name: str = "depths") -> None:
    """Raises ValueError unless every depth is within [0, 1]."""
    if not depths:
        raise ValueError(f"{name}: give at least one depth")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"{name}: {depth} is outside [0, 1]")


def run_passkey(
    model: HybridLM,
    tokenizer: Tokenizer,
    lengths: Sequence[int] = tuple(DEFAULT_LENGTHS),
    depths: Sequence[float] = tuple(DEFAULT_DEPTHS),
    trials: int = 5,
    seed: int = 0,
    *,
    chunk_size: int = inference.DEFAULT_CHUNK_SIZE,
    batch_size: int = 1,
    max_context: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Passkey accuracy for every (length, depth), ``trials`` seeded keys each.

    Returns ``{"task", "settings", "accuracy", "rows", "samples"}``: ``rows`` has one entry per
    (length, depth) with ``correct``, ``trials`` and ``accuracy``; ``samples`` one per trial
    with the key, the achieved needle depth and the decoded continuation.

    Raises:
        ValueError: before any model work, for a non-positive length or trial count, a depth
            outside [0, 1], a length too short for the prompt or beyond ``max_context`` (or
            the device's memory).
    """
    lengths, depths = sorted(set(lengths)), sorted(set(depths))
    check_depths(depths)
    inference.check_positive("trials", [trials])
    inference.check_positive("batch-size", [batch_size])
    inference.check_positive("chunk-size", [chunk_size])
    items = [
        Trial(length, depth, trial, passkey_key(seed, length, depth, trial))
        for length in lengths
        for depth in depths
        for trial in range(trials)
    ]
    answer_tokens = max(len(encode_segment(tokenizer, f" {t.key}")) for t in items)
    max_new_tokens = answer_tokens + ANSWER_MARGIN
    inference.check_context(
        model, "lengths", lengths, extra_tokens=max_new_tokens, batch_size=batch_size,
        max_context=max_context,
    )  # fmt: skip
    needs = [shortest_prompt(tokenizer, item.key) for item in items]
    for item, needed in zip(items, needs, strict=True):
        if item.length < needed:
            raise ValueError(
                f"lengths: {item.length} tokens is too short for the passkey prompt, which "
                f"needs {needed} tokens with this tokenizer (every length must be at least "
                f"{max(needs)})"
            )
    samples = []
    with progress_bar(len(items), "passkey", progress) as bar:
        for batch in batches(items, batch_size):
            prompts = [passkey_prompt(tokenizer, t.length, t.depth, t.key) for t in batch]
            outputs = inference.greedy_continuations(
                model, [p.ids for p in prompts], max_new_tokens, chunk_size=chunk_size
            )
            for item, prompt, output in zip(batch, prompts, outputs, strict=True):
                text = inference.decode_text(tokenizer, output)
                samples.append(
                    {
                        "length": item.length,
                        "depth": item.depth,
                        "trial": item.trial,
                        "key": item.key,
                        "needle_depth": prompt.depths[0],
                        "needle_start": prompt.needle_starts[0],
                        "output": text,
                        "correct": score(text, item.key),
                    }
                )
            bar.update(len(batch))
    rows = []
    for length in lengths:
        for depth in depths:
            cell = [s for s in samples if s["length"] == length and s["depth"] == depth]
            correct = sum(s["correct"] for s in cell)
            rows.append(
                {
                    "length": length,
                    "depth": depth,
                    "trials": len(cell),
                    "correct": correct,
                    "accuracy": correct / len(cell),
                }
            )
    return {
        "task": "passkey",
        "settings": {
            "lengths": lengths,
            "depths": depths,
            "trials": trials,
            "seed": seed,
            "chunk_size": chunk_size,
            "batch_size": batch_size,
            "max_context": max_context,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
            "scoring": "first number in the continuation equals the key",
        },
        "accuracy": sum(s["correct"] for s in samples) / len(samples),
        "rows": rows,
        "samples": samples,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hybrid eval passkey`` options."""
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, metavar="TOKENS",
        help=f"context lengths in tokens of the checkpoint's tokenizer (default {DEFAULT_LENGTHS})",
    )  # fmt: skip
    parser.add_argument(
        "--depths", type=float, nargs="+", default=DEFAULT_DEPTHS, metavar="DEPTH",
        help="relative depths of the needle in [0, 1] (0: start of the filler, 1: its end)",
    )  # fmt: skip
    parser.add_argument("--trials", type=int, default=5, help="random keys per cell (default 5)")


def evaluate(
    args: argparse.Namespace, model: HybridLM, tokenizer: Tokenizer, progress: bool
) -> dict[str, Any]:
    """``hybrid eval passkey``: :func:`run_passkey` with the parsed options."""
    return run_passkey(
        model, tokenizer, args.lengths, args.depths, args.trials, args.seed,
        chunk_size=args.chunk_size, batch_size=args.batch_size, max_context=args.max_context,
        progress=progress,
    )  # fmt: skip


def check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no model (run before the checkpoint is loaded)."""
    inference.check_lengths("--lengths", args.lengths, args.max_context)
    check_depths(args.depths, "--depths")
    inference.check_positive("--trials", [args.trials])

"""Perplexity against context length and against position, for length extrapolation.

Documents of real text (by default this Python's standard-library ``.py`` sources, outside
``site-packages``; or files given by globs), chosen in a seeded order among those with at
least ``max(multiples) * train_length + 1`` tokens, are cut to that many tokens. One forward
over each (chunk by chunk through the cache) gives the loss at every position, and since the
model is causal, the mean loss over the first ``k * train_length`` positions is exactly the
loss of an evaluation at that length. Reported: mean loss and perplexity per length, and the
mean loss per bucket of positions (where it rises beyond the training length, the model does
not extrapolate).

The default text is the corpus the shipped recipes train on, so it is not held out from them
(only 1 % of its files validate); pass ``--data`` with other text for a held-out measurement.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hybrid.eval import inference
from hybrid.eval.checkpoints import training_length
from hybrid.eval.progress import batches, progress_bar

if TYPE_CHECKING:
    from hybrid.model import HybridLM
    from hybrid.tokenizer import Tokenizer

STDLIB = "{stdlib}"
DEFAULT_DATA = [f"{STDLIB}/**/*.py"]
DEFAULT_EXCLUDE = ("site-packages", "dist-packages")
DEFAULT_MULTIPLES = [1, 2, 3, 4, 5, 6, 7, 8]
DEFAULT_TRAIN_LENGTH = 256


def find_files(patterns: Sequence[str] | None = None) -> list[Path]:
    """Files matching ``patterns`` (recursive globs; ``{stdlib}`` is this Python's standard
    library, ``~`` the home directory), sorted. Without patterns: the standard library's
    ``.py`` files outside site-packages / dist-packages."""
    exclude = DEFAULT_EXCLUDE if not patterns else ()
    stdlib = sysconfig.get_paths()["stdlib"]
    found: set[Path] = set()
    for pattern in patterns or DEFAULT_DATA:
        expanded = os.path.expanduser(pattern.replace(STDLIB, stdlib))
        for name in glob.glob(expanded, recursive=True):
            path = Path(name)
            if path.is_file() and not any(part in exclude for part in path.parts):
                found.add(path)
    return sorted(found)


def select_documents(
    tokenizer: Tokenizer, files: Sequence[Path], n_tokens: int, count: int, seed: int
) -> list[tuple[Path, list[int]]]:
    """Up to ``count`` documents of at least ``n_tokens`` tokens, in a seeded order of ``files``,
    each cut to its first ``n_tokens`` ids.

    Files with fewer bytes than ``n_tokens`` are skipped unread (a token covers at least one
    byte in byte-level tokenizers); texts are read as UTF-8 with bad bytes replaced.
    """
    order = list(files)
    random.Random(f"ppl-{seed}").shuffle(order)
    chosen = []
    for path in order:
        if len(chosen) == count:
            break
        try:
            if path.stat().st_size < n_tokens:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        ids = tokenizer.encode(text[: 16 * n_tokens])  # enough characters for n_tokens
        if len(ids) < n_tokens and len(text) > 16 * n_tokens:
            ids = tokenizer.encode(text)
        if len(ids) >= n_tokens:
            chosen.append((path, ids[:n_tokens]))
    return chosen


def run_ppl(
    model: HybridLM,
    tokenizer: Tokenizer,
    train_length: int = DEFAULT_TRAIN_LENGTH,
    multiples: Sequence[int] = tuple(DEFAULT_MULTIPLES),
    samples: int = 4,
    seed: int = 0,
    *,
    data: Sequence[str] | None = None,
    bucket_size: int | None = None,
    chunk_size: int = inference.DEFAULT_CHUNK_SIZE,
    batch_size: int = 1,
    max_context: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean loss per context length ``k * train_length`` (k in ``multiples``) and per bucket of
    ``bucket_size`` positions (default ``train_length // 4``), over ``samples`` documents.

    Returns ``{"task", "settings", "documents", "rows", "positions"}``: ``rows`` has one entry
    per length (``mean_loss`` in nats/token, ``perplexity``, ``tokens``, per-document losses),
    ``positions`` one per bucket (``start``, ``end``, ``mean_loss``, ``perplexity``).

    Raises:
        ValueError: before any model work: non-positive settings, a length beyond
            ``max_context``, or no document long enough.
    """
    inference.check_positive("train-length", [train_length])
    inference.check_positive("multiples", list(multiples))
    inference.check_positive("samples", [samples])
    inference.check_positive("batch-size", [batch_size])
    inference.check_positive("chunk-size", [chunk_size])
    bucket_size = bucket_size or max(1, train_length // 4)
    inference.check_positive("bucket-size", [bucket_size])
    multiples = sorted(set(multiples))
    lengths = [k * train_length for k in multiples]
    longest = lengths[-1]
    inference.check_context(
        model, "lengths (multiples x train-length)", lengths, batch_size=batch_size,
        max_context=max_context,
    )  # fmt: skip
    files = find_files(data)
    source = ", ".join(data) if data else f"{DEFAULT_DATA[0]} (without site-packages)"
    if not files:
        raise ValueError(f"data: no file matches {source}")
    documents = select_documents(tokenizer, files, longest + 1, samples, seed)
    if not documents:
        raise ValueError(
            f"data: none of the {len(files)} files of {source} has {longest + 1} tokens "
            f"({multiples[-1]} x train-length {train_length} + 1); give longer texts or "
            "smaller multiples"
        )
    losses = []  # (longest,) per document
    with progress_bar(len(documents), "ppl", progress) as bar:
        for batch in batches(documents, batch_size):
            ids = torch.tensor([doc for _, doc in batch], dtype=torch.long)
            losses.extend(inference.token_losses(model, ids, chunk_size=chunk_size))
            bar.update(len(batch))
    stacked = torch.stack(losses).double()  # (documents, longest)
    rows = []
    for k, length in zip(multiples, lengths, strict=True):
        per_document = stacked[:, :length].mean(1)
        mean = float(per_document.mean())
        rows.append(
            {
                "multiple": k,
                "length": length,
                "mean_loss": mean,
                "perplexity": math.exp(mean),
                "tokens": length * len(documents),
                "document_losses": [float(x) for x in per_document],
            }
        )
    positions = []
    for start in range(0, longest, bucket_size):
        mean = float(stacked[:, start : start + bucket_size].mean())
        end = min(start + bucket_size, longest)
        positions.append(
            {"start": start, "end": end, "mean_loss": mean, "perplexity": math.exp(mean)}
        )
    return {
        "task": "ppl",
        "settings": {
            "train_length": train_length,
            "multiples": multiples,
            "lengths": lengths,
            "samples": samples,
            "seed": seed,
            "data": list(data) if data else DEFAULT_DATA,
            "data_excludes": [] if data else list(DEFAULT_EXCLUDE),
            "bucket_size": bucket_size,
            "chunk_size": chunk_size,
            "batch_size": batch_size,
            "max_context": max_context,
            "loss": "next-token cross-entropy, nats/token; position p predicts token p + 1",
        },
        "documents": [{"path": str(path), "tokens": len(doc)} for path, doc in documents],
        "rows": rows,
        "positions": positions,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hybrid eval ppl`` options."""
    parser.add_argument(
        "--data", action="append", metavar="GLOB",
        help="text files (recursive glob, {stdlib} allowed; repeatable); default: the standard "
        "library's .py files outside site-packages",
    )  # fmt: skip
    parser.add_argument(
        "--train-length", type=int, default=None, metavar="TOKENS",
        help="the training context (default: data.seq_len of the checkpoint's recipe, else "
        f"{DEFAULT_TRAIN_LENGTH})",
    )  # fmt: skip
    parser.add_argument(
        "--multiples", type=int, nargs="+", default=DEFAULT_MULTIPLES, metavar="K",
        help="evaluate at K x train-length tokens (default 1..8)",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=4, help="documents (default 4)")
    parser.add_argument(
        "--bucket-size", type=int, default=None, metavar="TOKENS",
        help="positions per bucket of the loss-by-position curve (default train-length / 4)",
    )  # fmt: skip


def resolve_train_length(args: argparse.Namespace) -> tuple[int, str]:
    """The training length to use and where it came from."""
    if args.train_length is not None:
        return args.train_length, "--train-length"
    recorded = training_length(args.checkpoint)
    if recorded is not None:
        return recorded, "the checkpoint's recipe (data.seq_len)"
    return DEFAULT_TRAIN_LENGTH, "default (no recipe found)"


def check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no model (run before the checkpoint is loaded)."""
    if args.train_length is not None:
        inference.check_positive("--train-length", [args.train_length])
    inference.check_positive("--multiples", args.multiples)
    inference.check_positive("--samples", [args.samples])
    if args.bucket_size is not None:
        inference.check_positive("--bucket-size", [args.bucket_size])


def evaluate(
    args: argparse.Namespace, model: HybridLM, tokenizer: Tokenizer, progress: bool
) -> dict[str, Any]:
    """``hybrid eval ppl``: :func:`run_ppl` with the parsed options."""
    train_length, origin = resolve_train_length(args)
    results = run_ppl(
        model, tokenizer, train_length, args.multiples, args.samples, args.seed,
        data=args.data, bucket_size=args.bucket_size, chunk_size=args.chunk_size,
        batch_size=args.batch_size, max_context=args.max_context, progress=progress,
    )  # fmt: skip
    results["settings"]["train_length_source"] = origin
    return results

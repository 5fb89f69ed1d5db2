"""``hybrid eval mqar``: a model's multi-query associative recall accuracy over sequence
lengths x numbers of key-value pairs, on the examples of :mod:`hybrid.synthetic.mqar` (the
test stream, disjoint from what ``data.source.format: mqar`` trains on with the same seed).
"""

from __future__ import annotations

import torch

from hybrid.labels import IGNORE_INDEX
from hybrid.synthetic.mqar import TEST_STREAM, MQARSpec, make_examples


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 64
) -> float:
    """Fraction of query positions where the model's argmax is the value.

    Shapes: inputs, labels (n, seq_len) -> a float in [0, 1].
    """
    correct = total = 0
    model.eval()
    for start in range(0, len(inputs), batch_size):
        batch, target = inputs[start : start + batch_size], labels[start : start + batch_size]
        logits = model(batch).logits
        mask = target != IGNORE_INDEX
        correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
        total += int(mask.sum())
    return correct / max(total, 1)


def accuracy_grid(
    model: torch.nn.Module,
    vocab_size: int,
    seq_lens: list[int],
    kv_pairs: list[int],
    n_examples: int,
    seed: int,
    power_a: float = 0.01,
) -> list[dict]:
    """Test accuracy for every (seq_len, n_kv_pairs) that fits, on the test seed stream."""
    rows = []
    for seq_len in seq_lens:
        for pairs in kv_pairs:
            spec = MQARSpec(vocab_size, seq_len, pairs, power_a)
            if seq_len < 4 * pairs:
                continue
            inputs, labels = make_examples(spec, n_examples, seed, TEST_STREAM)
            score = accuracy(model, inputs, labels)
            rows.append({"seq_len": seq_len, "n_kv_pairs": pairs, "accuracy": score})
    return rows


def run_mqar(
    model: torch.nn.Module,
    vocab_size: int,
    seq_lens: list[int],
    kv_pairs: list[int],
    examples: int,
    seed: int,
    power_a: float = 0.01,
) -> dict:
    """:func:`accuracy_grid` as a results dict: ``{"task", "settings", "accuracy", "rows"}``."""
    rows = accuracy_grid(model, vocab_size, seq_lens, kv_pairs, examples, seed, power_a)
    mean = sum(r["accuracy"] for r in rows) / max(len(rows), 1)
    settings = {"vocab_size": vocab_size, "seq_lens": seq_lens, "kv_pairs": kv_pairs,
                "examples": examples, "seed": seed, "power_a": power_a}  # fmt: skip
    return {"task": "mqar", "settings": settings, "accuracy": mean, "rows": rows}


def add_arguments(parser) -> None:
    """``hybrid eval mqar`` options (test examples come from the seed's test stream, disjoint
    from what ``data.source.format: mqar`` trains on with the same seed)."""
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--kv-pairs", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--examples", type=int, default=256, help="test examples per cell")
    parser.add_argument(
        "--vocab-size", type=int, default=None,
        help="the task's vocabulary (default: the model's, as trained)",
    )  # fmt: skip
    parser.add_argument("--power-a", type=float, default=0.01)


def check_arguments(args) -> None:
    """Checks that need no model."""
    for name in ("seq_lens", "kv_pairs"):
        if any(value < 1 for value in getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')}: must be positive integers")
    if args.examples < 1:
        raise ValueError(f"--examples: must be a positive integer; got {args.examples}")


def evaluate(args, model, tokenizer, progress: bool) -> dict:
    """``hybrid eval mqar``: accuracy over sequence lengths x numbers of key-value pairs."""
    vocab_size = args.vocab_size or model.config.vocab_size
    if vocab_size > model.config.vocab_size:
        raise ValueError(
            f"--vocab-size: {vocab_size} exceeds the model's vocabulary {model.config.vocab_size}"
        )
    MQARSpec(vocab_size, max(args.seq_lens), 1, args.power_a).check()
    return run_mqar(
        model, vocab_size, args.seq_lens, args.kv_pairs, args.examples, args.seed, args.power_a
    )

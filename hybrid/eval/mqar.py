"""Multi-query associative recall (MQAR) in the Zoology style (Arora et al. 2023).

An example is ``n_kv_pairs`` key-value pairs followed by queries of those keys, each query
placed at a distance drawn from a power law (exponent ``power_a``, 0.01 in Zoology):

    inputs:  k1 v1 k2 v2 ... kn vn  .  .  k3  .  k1  .  .  k2 ...
    labels:  -100 ...                        v3     v1        v2 ...

Keys come from the first half of the vocabulary (ids 1 .. vocab/2 - 1), values from the
second half; the model must predict the value at each query key's position (next-token
alignment: ``labels[t]`` is the target for ``inputs[t]``; -100 elsewhere). Positions that are
neither pairs nor queries hold random ids, as in Zoology. Training and test sets come from
disjoint seed streams, so no test example is a training example.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
TRAIN_STREAM, TEST_STREAM = 1, 2  # seed-sequence keys of the two disjoint example streams


@dataclass(frozen=True)
class MQARSpec:
    """The shape of an MQAR example set."""

    vocab_size: int
    seq_len: int
    n_kv_pairs: int
    power_a: float = 0.01

    def check(self) -> None:
        """Raises ValueError (naming the field) when the examples cannot be built."""
        if self.vocab_size < 8 or self.vocab_size % 2:
            raise ValueError(f"vocab_size: must be an even number >= 8; got {self.vocab_size}")
        if self.n_kv_pairs < 1 or self.n_kv_pairs >= self.vocab_size // 2 - 1:
            raise ValueError(
                f"n_kv_pairs: must be in [1, vocab_size / 2 - 1); got {self.n_kv_pairs}"
            )
        if self.seq_len < 4 * self.n_kv_pairs:
            raise ValueError(
                f"seq_len: {self.seq_len} cannot hold {self.n_kv_pairs} pairs and their queries "
                f"(needs at least {4 * self.n_kv_pairs})"
            )
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a: must be in (0, 1]; got {self.power_a}")


def make_examples(
    spec: MQARSpec, n_examples: int, seed: int, stream: int = TRAIN_STREAM
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_examples`` MQAR examples: inputs and labels, both (n_examples, seq_len) int64.

    ``stream`` selects an independent seed stream (:data:`TRAIN_STREAM` / :data:`TEST_STREAM`).
    """
    spec.check()
    rng = np.random.default_rng([seed % 2**64, stream, spec.n_kv_pairs, spec.seq_len])
    n, pairs, length = n_examples, spec.n_kv_pairs, spec.seq_len
    half = spec.vocab_size // 2
    keys = np.stack([rng.choice(np.arange(1, half), pairs, replace=False) for _ in range(n)])
    values = rng.integers(half, spec.vocab_size, size=(n, pairs))

    context = 2 * pairs
    slots = (length - context) // 2  # query slots: even offsets after the pairs
    distance = np.arange(1, slots + 1, dtype=np.float64)
    probability = spec.power_a * distance ** (spec.power_a - 1)
    probability /= probability.sum()
    gaps = np.stack([rng.choice(slots, pairs, replace=False, p=probability) for _ in range(n)])

    inputs = rng.integers(0, spec.vocab_size, size=(n, length))
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_positions = context + 2 * gaps  # (n, pairs)
    order = rng.permuted(np.tile(np.arange(pairs), (n, 1)), axis=1)  # which key each slot asks
    np.put_along_axis(inputs, query_positions, np.take_along_axis(keys, order, 1), axis=1)
    np.put_along_axis(labels, query_positions, np.take_along_axis(values, order, 1), axis=1)
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels)


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

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

``data.source.format: mqar`` trains on these examples (:mod:`hybrid.data.synthetic`);
``hybrid eval mqar`` scores them (:mod:`hybrid.eval.mqar`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hybrid.labels import IGNORE_INDEX

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

"""Packing: documents' token ids (each ending with the end-of-document id) concatenated and cut
into rows of ``seq_len + 1`` ids; the incomplete tail is dropped. A model reads ``row[:-1]``
and predicts ``row[1:]``, so consecutive rows share no token and every id is a target once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

Item = TypeVar("Item")


def pack_rows(tokens: np.ndarray, row_len: int) -> np.ndarray:
    """The concatenated ``tokens`` (shape (n_tokens,)) as rows: a view of shape
    (n_tokens // row_len, row_len), no copy (``tokens`` may be a memory map)."""
    n_rows = len(tokens) // row_len
    return tokens[: n_rows * row_len].reshape(n_rows, row_len)


def iter_packed_rows(documents: Iterable[list[int]], row_len: int) -> Iterator[np.ndarray]:
    """:func:`pack_rows` over a stream: yields int64 rows of shape (row_len,) as soon as the
    documents' ids (each list already ending with the end-of-document id) fill them."""
    pending = np.zeros(0, dtype=np.int64)
    for ids in documents:
        pending = np.concatenate([pending, np.asarray(ids, dtype=np.int64)])
        rows = pack_rows(pending, row_len)
        yield from rows.copy()  # rows of their own, not views keeping every document alive
        pending = pending[rows.size :]


def shuffled(items: Iterable[Item], buffer_size: int, rng: np.random.Generator) -> Iterator[Item]:
    """``items`` in a random order drawn from ``rng`` through a buffer of ``buffer_size``: once
    the buffer is full each new item takes the place of a random one, which is yielded; at
    the end the rest of the buffer comes out permuted. A buffer at least as large as the
    stream gives a uniform permutation."""
    buffer: list[Item] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = int(rng.integers(buffer_size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]

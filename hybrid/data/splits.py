"""Which documents validate: a seeded document-level split, or every k-th document of a stream.

Splitting whole documents keeps any text from being both trained on and validated on.
"""

from __future__ import annotations

import numpy as np

from hybrid.data.errors import DataError

STREAM_VALIDATION_CAP = 2_000
"""At most this many documents of a stream are held out for validation."""

SPLIT_KEY, EPOCH_KEY, STREAM_SHUFFLE_KEY, VALIDATION_ORDER_KEY = 1, 2, 3, 4
"""Keys that separate the random streams drawn from one recipe seed."""


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator determined by ``seed`` (any int, negative too) and ``keys``."""
    return np.random.default_rng([seed % 2**64, *keys])


def split_documents(
    n_documents: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (int64, ascending) of the training and the validation documents.

    ``round(n_documents * val_fraction)`` documents validate, at least one and leaving at least
    one to train on; which ones is a permutation drawn from ``seed``.

    Raises:
        DataError: fewer than 2 documents.
    """
    if n_documents < 2:
        raise DataError(
            f"data.val_fraction: a validation split needs at least 2 documents; the source has "
            f"{n_documents} (add documents or set data.validation)"
        )
    n_validation = min(max(1, round(n_documents * val_fraction)), n_documents - 1)
    order = seeded_rng(seed, SPLIT_KEY).permutation(n_documents)
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])


def stream_validation_every(val_fraction: float) -> int:
    """``k``: every k-th document of a stream validates (``round(1 / val_fraction)``, at least 2
    so that documents are left to train on)."""
    return max(2, round(1 / val_fraction))


def is_stream_validation(index: int, every: int) -> bool:
    """Whether the ``index``-th non-empty document of a stream validates: the last of each group
    of ``every``, for the first :data:`STREAM_VALIDATION_CAP` groups (later ones all train)."""
    return index % every == every - 1 and index // every < STREAM_VALIDATION_CAP

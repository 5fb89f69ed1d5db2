"""Corpus statistics: the unigram baseline a trained model must beat."""

from __future__ import annotations

import numpy as np


def unigram_cross_entropy(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy in nats per token of ``targets`` under the unigram distribution of
    ``train_tokens`` with add-one smoothing over the ``vocab_size`` ids:
    ``p(t) = (count(t) + 1) / (n_train + vocab_size)``. Both arrays are any shape of ids."""
    counts = np.bincount(np.asarray(train_tokens).ravel(), minlength=vocab_size)[:vocab_size]
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(-log_probs[np.asarray(targets).ravel()].mean())

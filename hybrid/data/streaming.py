"""Streaming mode (``data.streaming: true``): documents read, tokenized and packed on the fly.

A pass over the training stream packs its documents (in stream order) into rows and shuffles
them through a buffer of ``data.shuffle_buffer`` rows seeded by ``(seed, epoch)``; each pass
is an epoch, and the training loader is infinite. Global micro-batches and their split across
ranks are as in :mod:`hybrid.data.loaders`. Resuming at global micro-batch ``b`` replays the
deterministic stream and drops its first ``b`` global micro-batches: the cost is linear in the
position (the skipped documents are read and tokenized again), up to one pass: after a whole
pass the number of micro-batches per epoch is known and further epochs are skipped unread.

With loader workers, each worker runs the whole pipeline and keeps every
``num_workers``-th global micro-batch, so the order does not depend on ``num_workers``
(workers add overlap with training, not throughput).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import datasets
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from hybrid.data.errors import DataError
from hybrid.data.packing import iter_packed_rows, shuffled
from hybrid.data.sources import stream_texts
from hybrid.data.splits import (
    STREAM_SHUFFLE_KEY,
    STREAM_VALIDATION_CAP,
    is_stream_validation,
    seeded_rng,
)
from hybrid.data.tokenization import iter_document_ids
from hybrid.tokenizer import Tokenizer


@dataclass
class DocumentStream:
    """A source's non-empty documents in stream order, read anew by every call.

    ``max_documents`` cuts the stream; with ``validation_every = k`` the documents chosen by
    :func:`~hybrid.data.splits.is_stream_validation` are held out of :meth:`training` and
    form :meth:`validation`; with None every document trains (the validation comes from
    another source).
    """

    stream: datasets.IterableDataset
    column: str
    where: str
    max_documents: int | None = None
    validation_every: int | None = None

    def texts(self) -> Iterator[str]:
        """Every document."""
        return islice(stream_texts(self.stream, self.column, self.where), self.max_documents)

    def training(self) -> Iterator[str]:
        """The training documents."""
        every = self.validation_every
        for index, text in enumerate(self.texts()):
            if every is None or not is_stream_validation(index, every):
                yield text

    def validation(self) -> Iterator[str]:
        """The held-out documents (none without ``validation_every``)."""
        every = self.validation_every
        if every is None:
            return
        for index, text in enumerate(self.texts()):
            if index >= every * STREAM_VALIDATION_CAP:
                return  # no held-out documents beyond
            if is_stream_validation(index, every):
                yield text


class StreamingBatches(IterableDataset):
    """Infinite stream of this rank's training micro-batches, (micro_batch_size, row_len)
    int64, from global micro-batch ``start`` on."""

    def __init__(
        self,
        documents: DocumentStream,
        tokenizer: Tokenizer,
        row_len: int,
        micro_batch_size: int,
        *,
        seed: int,
        shuffle_buffer: int,
        world_size: int = 1,
        rank: int = 0,
        start: int = 0,
    ) -> None:
        self.documents = documents
        self.tokenizer = tokenizer
        self.row_len = row_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.world_size = world_size
        self.rank = rank
        self.start = start

    def epoch_rows(self, epoch: int) -> Iterator[np.ndarray]:
        """The rows of one pass, shuffled: int64 arrays of shape (row_len,)."""
        ids = iter_document_ids(self.tokenizer, self.documents.training())
        rows = iter_packed_rows(ids, self.row_len)
        return shuffled(rows, self.shuffle_buffer, seeded_rng(self.seed, STREAM_SHUFFLE_KEY, epoch))

    def global_batches(self, start: int = 0) -> Iterator[list[np.ndarray]]:
        """Global micro-batches (lists of ``micro_batch_size * world_size`` rows) from number
        ``start`` on, for ever; each epoch drops its incomplete last one.

        Every pass packs the same rows, so once one pass has been counted whole epochs are
        skipped without reading them: resuming reads at most one pass plus the consumed part
        of the current one.

        Raises:
            DataError: a pass gives less than one global micro-batch.
        """
        size = self.micro_batch_size * self.world_size
        epoch, skip, per_epoch = 0, start, None
        while True:
            if per_epoch is not None:
                epoch, skip = epoch + skip // per_epoch, skip % per_epoch
            rows = self.epoch_rows(epoch)
            n_batches = 0
            while len(batch := list(islice(rows, size))) == size:
                if n_batches >= skip:
                    yield batch
                n_batches += 1
            if n_batches == 0:
                raise DataError(
                    f"data.seq_len: a pass over the training stream packs into {len(batch)} "
                    f"sequences, fewer than one global micro-batch ({size}); add documents "
                    f"or lower data.seq_len"
                )
            epoch, skip, per_epoch = epoch + 1, max(0, skip - n_batches), n_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = get_worker_info()
        n_workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        first, last = self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size
        for index, batch in enumerate(self.global_batches(self.start)):
            if index % n_workers == worker_id:
                yield torch.from_numpy(np.stack(batch[first:last]))


def materialize_tokens(tokenizer: Tokenizer, texts: Iterable[str]) -> tuple[np.ndarray, int]:
    """Documents tokenized in memory, each followed by eos, concatenated: ``(tokens of shape
    (n_tokens,) int64, n_documents)``."""
    documents = [np.asarray(ids, dtype=np.int64) for ids in iter_document_ids(tokenizer, texts)]
    tokens = np.concatenate(documents) if documents else np.zeros(0, dtype=np.int64)
    return tokens, len(documents)

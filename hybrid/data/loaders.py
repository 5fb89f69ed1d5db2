"""Loaders over packed rows: an infinite, seeded, resumable training loader sharded by rank,
and a finite validation loader in a fixed seeded order.

The training order is a sequence of *global micro-batches*: epoch ``e`` is a permutation of
the rows drawn from ``(seed, e)``, cut into consecutive groups of
``micro_batch_size * world_size`` rows (an incomplete last group is dropped), and rank ``r``
takes the ``r``-th ``micro_batch_size`` rows of each group. Two ranks with micro-batches of 2
therefore see exactly the rows one process with micro-batches of 4 sees, step for step, and a
loader started at global micro-batch ``b`` continues exactly as one that ran from 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hybrid.data.errors import DataError
from hybrid.data.packing import pack_rows
from hybrid.data.splits import EPOCH_KEY, VALIDATION_ORDER_KEY, seeded_rng


class PackedRows(Dataset):
    """Packed rows of token ids: shape (n_rows, row_len), read as int64 tensors.

    ``tokens`` is the concatenated ids (n_tokens,), in memory or an ``.npy`` file that each
    process (and each loader worker) memory-maps on first use.
    """

    def __init__(self, tokens: np.ndarray | Path, row_len: int) -> None:
        self.row_len = row_len
        self._path = Path(tokens) if isinstance(tokens, (str, Path)) else None
        self._tokens = None if self._path is not None else tokens

    @property
    def tokens(self) -> np.ndarray:
        """The concatenated ids (n_tokens,), the incomplete tail included."""
        if self._tokens is None:
            self._tokens = np.load(self._path, mmap_mode="r")
        return self._tokens

    @property
    def rows(self) -> np.ndarray:
        """The rows (n_rows, row_len), a view of :attr:`tokens` in their stored dtype."""
        return pack_rows(self.tokens, self.row_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Row ``index``: (row_len,) int64."""
        return torch.from_numpy(self.rows[index].astype(np.int64))

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        """Rows ``indices``: (len(indices), row_len) int64."""
        return torch.from_numpy(self.rows[np.asarray(indices)].astype(np.int64))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._path is not None:  # workers map the file themselves
            state["_tokens"] = None
        return state


class EpochBatchSampler(Sampler[list[int]]):
    """This rank's row indices of global micro-batch ``start``, ``start + 1``, ... for ever.

    It has no ``__len__``, so Lightning treats its loader as infinite.

    Raises:
        DataError: fewer rows than one global micro-batch.
    """

    def __init__(
        self,
        n_rows: int,
        micro_batch_size: int,
        *,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        start: int = 0,
    ) -> None:
        self.global_size = micro_batch_size * world_size
        if n_rows < self.global_size:
            raise DataError(
                f"data.seq_len: the training data packs into {n_rows} sequences, fewer than one "
                f"global micro-batch (micro_batch_size {micro_batch_size} x world size "
                f"{world_size}); add documents or lower data.seq_len"
            )
        self.n_rows = n_rows
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.start = start
        self.batches_per_epoch = n_rows // self.global_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of row indices of ``epoch`` (n_rows,)."""
        return seeded_rng(self.seed, EPOCH_KEY, epoch).permutation(self.n_rows)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, within = divmod(self.start, self.batches_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            for batch in range(within, self.batches_per_epoch):
                first = batch * self.global_size + self.rank * self.micro_batch_size
                yield order[first : first + self.micro_batch_size].tolist()
            epoch, within = epoch + 1, 0


def train_loader(
    rows: PackedRows,
    micro_batch_size: int,
    *,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    start: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Infinite loader of (micro_batch_size, row_len) int64 batches from global micro-batch
    ``start`` on (see the module docstring); the same batches for any ``num_workers``."""
    sampler = EpochBatchSampler(
        len(rows), micro_batch_size, seed=seed, world_size=world_size, rank=rank, start=start
    )
    return DataLoader(rows, batch_sampler=sampler, collate_fn=as_batch, num_workers=num_workers)


def val_loader(
    rows: PackedRows,
    micro_batch_size: int,
    *,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Finite loader of this rank's validation rows in a fixed order: a permutation drawn from
    ``seed`` (so that the first batches, all that a limited validation reads, come from every
    validation document), of which rank ``r`` takes the ``r``-th of ``world_size`` equal
    contiguous shares (the remainder is dropped, so every rank runs as many batches), in
    batches of (micro_batch_size, row_len) int64, the last one possibly smaller.

    Raises:
        DataError: fewer validation rows than ranks.
    """
    share = len(rows) // world_size
    if share == 0:
        raise DataError(
            f"data.val_fraction: {len(rows)} validation sequences cannot be shared by "
            f"{world_size} ranks; raise data.val_fraction or lower data.seq_len"
        )
    order = seeded_rng(seed, VALIDATION_ORDER_KEY).permutation(len(rows))
    mine = order[rank * share : (rank + 1) * share].tolist()
    batches = [
        mine[start : start + micro_batch_size] for start in range(0, share, micro_batch_size)
    ]
    return DataLoader(rows, batch_sampler=batches, collate_fn=as_batch, num_workers=num_workers)


def as_batch(batch: torch.Tensor) -> torch.Tensor:
    """The loaders' collate function: :meth:`PackedRows.__getitems__` made the batch already."""
    return batch

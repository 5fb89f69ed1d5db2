"""Synthetic training tasks as Lightning data modules: MQAR (``data.source.format: mqar``).

Batches are ``(inputs, labels)``, both (micro_batch_size, seq_len) int64, with labels -100
where there is nothing to predict; the training loop takes the loss on labelled positions only
and reports ``val/accuracy``. Loading order, rank sharding and resume follow the text loaders
(:class:`hybrid.data.loaders.EpochBatchSampler`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from hybrid.data.errors import DataError
from hybrid.data.loaders import EpochBatchSampler
from hybrid.eval.mqar import IGNORE_INDEX, TEST_STREAM, TRAIN_STREAM, MQARSpec, make_examples
from hybrid.recipe import DataConfig


class IdTokenizer:
    """The identity 'tokenizer' of a synthetic task: ids are the data; there is no text."""

    eos_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def save(self, directory: str | Path) -> None:
        """Nothing to write."""


class MQARDataModule(pl.LightningDataModule):
    """MQAR examples for a training run (see :mod:`hybrid.eval.mqar`).

    Args:
        data: the recipe's ``data`` section (``seq_len`` and ``mqar``).
        tokenizer: the recipe's ``tokenizer`` section: unused (ids are the data).
        seed: the recipe seed: training examples from its training stream, validation from
            its test stream.
        micro_batch_size, grad_accum: as for :class:`hybrid.data.HybridDataModule`.
    """

    def __init__(
        self,
        data: DataConfig,
        tokenizer: Any = None,
        *,
        seed: int,
        micro_batch_size: int,
        grad_accum: int,
        **_: Any,
    ) -> None:
        super().__init__()
        self.data_config = data
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.tokenizer = IdTokenizer(data.mqar.vocab_size)
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    def prepare(self) -> None:
        """Builds the example sets (seeded, a few seconds).

        Raises:
            DataError: settings that cannot make examples, naming the ``data.mqar`` field.
        """
        if self._train is not None:
            return
        options = self.data_config.mqar
        train, val = [], []
        for pairs in options.kv_pairs:
            spec = MQARSpec(options.vocab_size, self.data_config.seq_len, pairs, options.power_a)
            try:
                spec.check()
            except ValueError as error:
                raise DataError(f"data.mqar.{error}") from None
            train.append(make_examples(spec, options.train_examples, self.seed, TRAIN_STREAM))
            val.append(make_examples(spec, options.val_examples, self.seed, TEST_STREAM))
        self._train = TensorDataset(*(torch.cat(parts) for parts in zip(*train, strict=True)))
        self._val = TensorDataset(*(torch.cat(parts) for parts in zip(*val, strict=True)))

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    @property
    def stats(self) -> dict[str, Any]:
        """Example counts; ``unigram_val_loss`` is the chance loss ln(number of values)."""
        self.prepare()
        labels = self._val.tensors[1]
        return {
            "train_examples": len(self._train),
            "val_examples": len(self._val),
            "train_tokens": int((self._train.tensors[1] != IGNORE_INDEX).sum()),
            "val_tokens": int((labels != IGNORE_INDEX).sum()),
            "unigram_val_loss": math.log(self.data_config.mqar.vocab_size // 2),
        }

    def train_dataloader(self) -> DataLoader:
        world_size, rank, start = self._placement()
        sampler = EpochBatchSampler(
            len(self._train), self.micro_batch_size, seed=self.seed,
            world_size=world_size, rank=rank, start=start,
        )  # fmt: skip
        return DataLoader(self._train, batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        world_size, rank, _ = self._placement()
        share = len(self._val) // world_size
        indices = range(rank * share, (rank + 1) * share)
        batches = [
            list(indices[i : i + self.micro_batch_size])
            for i in range(0, share, self.micro_batch_size)
        ]
        return DataLoader(self._val, batch_sampler=batches)

    def _placement(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0, 0
        return trainer.world_size, trainer.global_rank, trainer.global_step * self.grad_accum

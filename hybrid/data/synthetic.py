"""Synthetic training tasks as Lightning data modules: MQAR (``data.source.format: mqar``) and
passkey retrieval (``data.source.format: passkey``).

Batches are ``(inputs, labels)``, both (micro_batch_size, seq_len) int64, with labels -100
where there is nothing to predict; the training loop takes the loss on labelled positions only
and reports ``val/accuracy``. Loading order, rank sharding and resume follow the text loaders
(:class:`hybrid.data.loaders.EpochBatchSampler`).
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hybrid.data.errors import DataError
from hybrid.data.loaders import EpochBatchSampler
from hybrid.data.stats import unigram_cross_entropy
from hybrid.data.tokenization import resolve_tokenizer
from hybrid.labels import IGNORE_INDEX
from hybrid.recipe import DataConfig, TokenizerConfig
from hybrid.synthetic.haystack import passkey_filler
from hybrid.synthetic.mqar import TEST_STREAM, TRAIN_STREAM, MQARSpec, make_examples
from hybrid.synthetic.passkey import passkey_example
from hybrid.tokenizer import ByteTokenizer, Tokenizer


class IdTokenizer:
    """The identity 'tokenizer' of a synthetic task: ids are the data; there is no text."""

    eos_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def save(self, directory: str | Path) -> None:
        """Nothing to write."""


class SyntheticDataModule(pl.LightningDataModule):
    """Loaders over a training and a validation set of ``(inputs, labels)`` examples.

    Subclasses build ``self._train`` and ``self._val`` (map-style datasets of
    ``(inputs, labels)``, each (seq_len,) int64) in :meth:`prepare` and set ``self.tokenizer``.
    """

    def __init__(self, seed: int, micro_batch_size: int, grad_accum: int) -> None:
        super().__init__()
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    def prepare(self) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

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


class MQARDataModule(SyntheticDataModule):
    """MQAR examples for a training run (see :mod:`hybrid.synthetic.mqar`).

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
        super().__init__(seed, micro_batch_size, grad_accum)
        self.data_config = data
        self.tokenizer = IdTokenizer(data.mqar.vocab_size)

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


class PasskeyExamples(Dataset):
    """Passkey training sequences made on demand: example ``i`` of a stream is always the same.

    Each draws a 5-digit key, a needle depth and a prompt length (between the shortest prompt
    and the whole sequence) uniformly from its own seeded random stream and is
    :func:`hybrid.synthetic.passkey.passkey_example` of ``seq_len`` tokens. Labels
    are the answer ids only (``supervise="answer"``) or every next id (``"all"``).
    """

    def __init__(
        self, tokenizer: Tokenizer, seq_len: int, count: int, seed: int, stream: int,
        supervise: str = "answer",
    ) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.count = count
        self.seed = seed
        self.stream = stream
        self.supervise = supervise
        self.filler = passkey_filler(tokenizer)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = random.Random(f"passkey-train-{self.seed}-{self.stream}-{index}")
        key, depth, length_fraction = rng.randint(10000, 99999), rng.random(), rng.random()
        inputs, targets, answer = passkey_example(
            self.tokenizer, self.seq_len, key, depth, length_fraction, self.filler
        )
        labels = torch.tensor(targets)
        if self.supervise == "answer":
            labels[: self.seq_len - answer] = IGNORE_INDEX
        return torch.tensor(inputs), labels


def _passkey_text(seed: int, index: int, length: int = 1024) -> str:
    """A passkey document of ``length`` characters with its answer (BPE training text)."""
    rng = random.Random(f"passkey-text-{seed}-{index}")
    key, depth = rng.randint(10000, 99999), rng.random()
    inputs, targets, _ = passkey_example(ByteTokenizer(), length, key, depth)  # no lead: bytes
    return bytes(inputs + targets[-1:]).decode("utf-8")


class PasskeyDataModule(SyntheticDataModule):
    """Passkey retrieval examples (the Landmark format of ``hybrid eval passkey``) for a
    training run: sequences of ``data.seq_len`` tokens, the key at a random depth in a prompt
    of random length (see :class:`PasskeyExamples`).

    Args:
        data: the recipe's ``data`` section (``seq_len`` and ``passkey``).
        tokenizer: the recipe's ``tokenizer`` section (a BPE is trained on passkey text).
        seed: the recipe seed: training examples from its training stream, validation from
            its test stream.
        micro_batch_size, grad_accum: as for :class:`hybrid.data.HybridDataModule`.
        run_dir: the run directory (a BPE run's ``tokenizer.json`` is kept there).
    """

    def __init__(
        self,
        data: DataConfig,
        tokenizer: TokenizerConfig,
        *,
        seed: int,
        micro_batch_size: int,
        grad_accum: int,
        run_dir: str | Path,
        **_: Any,
    ) -> None:
        super().__init__(seed, micro_batch_size, grad_accum)
        self.data_config = data
        self.tokenizer_config = tokenizer
        self.run_dir = Path(run_dir)
        self.tokenizer: Tokenizer | None = None

    def prepare(self) -> None:
        """Makes the tokenizer and checks that an example fits ``data.seq_len``.

        Raises:
            DataError: ``data.seq_len`` too short for the prompt; tokenizer errors.
        """
        if self._train is not None:
            return
        options, seq_len = self.data_config.passkey, self.data_config.seq_len

        def corpus() -> list[str]:
            return [_passkey_text(self.seed, index) for index in range(2000)]

        self.tokenizer = resolve_tokenizer(self.tokenizer_config, self.run_dir, corpus)
        self._train, self._val = (
            PasskeyExamples(self.tokenizer, seq_len, count, self.seed, stream, options.supervise)
            for count, stream in (
                (options.train_examples, TRAIN_STREAM),
                (options.val_examples, TEST_STREAM),
            )
        )
        try:
            self._val[0]
        except ValueError as error:
            raise DataError(f"data.{error}") from None

    @functools.cached_property
    def stats(self) -> dict[str, Any]:
        """Example counts; ``unigram_val_loss``: the labelled validation ids under the unigram
        distribution of the labelled ids of 256 training examples (made once: the examples
        are generated on demand)."""
        self.prepare()
        val = torch.stack([self._val[i][1] for i in range(len(self._val))])
        train = torch.stack([self._train[i][1] for i in range(min(256, len(self._train)))])
        labelled = lambda labels: labels[labels != IGNORE_INDEX].numpy()  # noqa: E731
        per_example = int((val[0] != IGNORE_INDEX).sum())
        return {
            "train_examples": len(self._train),
            "val_examples": len(self._val),
            "train_tokens": per_example * len(self._train),
            "val_tokens": int((val != IGNORE_INDEX).sum()),
            "unigram_val_loss": unigram_cross_entropy(
                labelled(train), labelled(val), self.tokenizer.vocab_size
            ),
        }

"""The Lightning data module: a recipe's ``data`` and ``tokenizer`` sections turned into a
tokenizer, corpus statistics and the training and validation loaders.

``prepare()`` does all the work and every user error surfaces there, as a :class:`DataError`,
before a model exists. Each process calls it (DDP children too): its results are cached
(``datasets`` Arrow files, the token files, ``run_dir/tokenizer.json``), so the later calls
only load them.

Documents: empty ones are dropped; ``data.max_documents`` keeps the first N non-empty
documents of each source (in the sources' deterministic order) *before* the validation split,
so a quick test reads and tokenizes only N documents. Without ``data.validation`` a seeded
``data.val_fraction`` of the documents validates (see :mod:`hybrid.data.splits`).

Loaders yield ``(micro_batch_size, seq_len + 1)`` int64 batches: the model reads
``batch[:, :-1]`` and predicts ``batch[:, 1:]``. When a Lightning trainer is attached its
``world_size``, ``global_rank`` and ``global_step`` place the loaders (the training loader
starts at global micro-batch ``global_step * grad_accum``, so a resumed run continues the
exact sequence of batches); the trainer must be built with ``use_distributed_sampler=False``.
Without a trainer: one process from the start. Tests may set ``module.trainer`` to any object
with those three attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from hybrid.data.errors import DataError
from hybrid.data.loaders import PackedRows, train_loader, val_loader
from hybrid.data.sources import load_documents, load_stream
from hybrid.data.splits import STREAM_VALIDATION_CAP, split_documents, stream_validation_every
from hybrid.data.stats import unigram_cross_entropy
from hybrid.data.streaming import DocumentStream, StreamingBatches, materialize_tokens
from hybrid.data.tokenization import resolve_tokenizer, tokenize_documents
from hybrid.recipe import DataConfig, TokenizerConfig
from hybrid.tokenizer import Tokenizer

UNIGRAM_STREAM_DOCUMENTS = 2_000
"""In streaming mode the unigram baseline counts the first this many training documents."""


@dataclass
class _Prepared:
    tokenizer: Tokenizer
    train: PackedRows | DocumentStream  # rows, or the document stream in streaming mode
    val: PackedRows
    stats: dict[str, Any]


class HybridDataModule(pl.LightningDataModule):
    """Data for one training run.

    Args:
        data: the recipe's ``data`` section.
        tokenizer: the recipe's ``tokenizer`` section.
        seed: the recipe seed (validation split, epoch order, streaming shuffle).
        micro_batch_size: rows per batch and rank.
        grad_accum: micro-batches per optimizer step (places a resumed loader).
        run_dir: the run directory (``tokenizer.json`` of a BPE run is kept there).
    """

    def __init__(
        self,
        data: DataConfig,
        tokenizer: TokenizerConfig,
        *,
        seed: int,
        micro_batch_size: int,
        grad_accum: int,
        run_dir: Path,
    ) -> None:
        super().__init__()
        self.data_config = data
        self.tokenizer_config = tokenizer
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.run_dir = Path(run_dir)
        self._prepared: _Prepared | None = None

    @property
    def row_len(self) -> int:
        """Token ids per row: ``seq_len + 1`` (inputs and shifted targets)."""
        return self.data_config.seq_len + 1

    @property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (after :meth:`prepare`)."""
        return self._require().tokenizer

    @property
    def stats(self) -> dict[str, Any]:
        """``train_documents``, ``val_documents``, ``train_tokens``, ``val_tokens``,
        ``train_sequences``, ``val_sequences`` (tokens count the end-of-document ids; in
        streaming mode the training ones are None: the stream is not counted) and
        ``unigram_val_loss``: the cross-entropy (nats/token) of the validation targets (every
        row's ids but the first) under the add-one smoothed unigram distribution of the training
        tokens (in streaming mode of the first :data:`UNIGRAM_STREAM_DOCUMENTS` training
        documents), the baseline a trained model must beat."""
        return dict(self._require().stats)

    @property
    def train_rows(self) -> PackedRows:
        """The packed training rows (n_rows, seq_len + 1) in corpus order (not in streaming
        mode: there the rows exist only in the loader)."""
        train = self._require().train
        if not isinstance(train, PackedRows):
            raise RuntimeError("HybridDataModule.train_rows: not available with data.streaming")
        return train

    @property
    def val_rows(self) -> PackedRows:
        """The packed validation rows (n_rows, seq_len + 1) in corpus order."""
        return self._require().val

    def prepare(self) -> None:
        """Load, split and tokenize the data and make the tokenizer; idempotent and cached.

        Raises:
            DataError: one line naming the recipe field or file at fault.
        """
        if self._prepared is None:
            streaming = self.data_config.streaming
            self._prepared = self._prepare_stream() if streaming else self._prepare_arrays()

    def setup(self, stage: str | None = None) -> None:
        """Lightning's per-process hook: :meth:`prepare`."""
        self.prepare()

    def train_dataloader(self) -> DataLoader:
        """Infinite loader of this rank's (micro_batch_size, seq_len + 1) int64 batches."""
        prepared = self._require()
        world_size, rank, start = self._placement()
        data = self.data_config
        if isinstance(prepared.train, PackedRows):
            return train_loader(
                prepared.train,
                self.micro_batch_size,
                seed=self.seed,
                world_size=world_size,
                rank=rank,
                start=start,
                num_workers=data.num_workers,
            )
        batches = StreamingBatches(
            prepared.train,
            prepared.tokenizer,
            self.row_len,
            self.micro_batch_size,
            seed=self.seed,
            shuffle_buffer=data.shuffle_buffer,
            world_size=world_size,
            rank=rank,
            start=start,
        )
        return DataLoader(batches, batch_size=None, num_workers=data.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Finite loader of this rank's share of the validation rows, in a fixed order (a
        seeded permutation: a limited number of batches still samples every document)."""
        world_size, rank, _ = self._placement()
        return val_loader(
            self._require().val,
            self.micro_batch_size,
            seed=self.seed,
            world_size=world_size,
            rank=rank,
            num_workers=self.data_config.num_workers,
        )

    def _placement(self) -> tuple[int, int, int]:
        """``(world_size, rank, first global micro-batch)`` from the attached trainer."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0, 0
        return trainer.world_size, trainer.global_rank, trainer.global_step * self.grad_accum

    def _require(self) -> _Prepared:
        if self._prepared is None:
            raise RuntimeError("HybridDataModule: call prepare() first")
        return self._prepared

    def _prepare_arrays(self) -> _Prepared:
        """Map-style: whole sources loaded, split, tokenized into cached token files."""
        data = self.data_config
        cache_dir, limit = data.cache_dir, data.max_documents
        source = load_documents(
            data.source, "data.source", cache_dir=cache_dir, max_documents=limit
        )
        if data.validation is not None:
            train_documents = source
            val_documents = load_documents(
                data.validation, "data.validation", cache_dir=cache_dir, max_documents=limit
            )
        else:
            train_positions, val_positions = split_documents(
                len(source), data.val_fraction, self.seed
            )
            train_documents = source.subset(train_positions)
            val_documents = source.subset(val_positions)
        tokenizer = resolve_tokenizer(self.tokenizer_config, self.run_dir, train_documents.texts)
        train_path = tokenize_documents(
            train_documents, tokenizer, cache_dir, "Tokenizing the training documents"
        )
        val_path = tokenize_documents(
            val_documents, tokenizer, cache_dir, "Tokenizing the validation documents"
        )
        train, val = PackedRows(train_path, self.row_len), PackedRows(val_path, self.row_len)
        self._check_sizes(len(train), len(val), len(val.tokens))
        stats = {
            "train_documents": len(train_documents),
            "val_documents": len(val_documents),
            "train_tokens": len(train.tokens),
            "val_tokens": len(val.tokens),
            "train_sequences": len(train),
            "val_sequences": len(val),
            "unigram_val_loss": unigram_cross_entropy(
                train.rows, val.rows[:, 1:], tokenizer.vocab_size
            ),
        }
        return _Prepared(tokenizer, train, val, stats)

    def _prepare_stream(self) -> _Prepared:
        """Streaming: validation documents and a sample of training documents read now, the
        training stream read by the loader."""
        data = self.data_config
        stream, column = load_stream(data.source, "data.source", cache_dir=data.cache_dir)
        every = None if data.validation is not None else stream_validation_every(data.val_fraction)
        source = DocumentStream(stream, column, "data.source", data.max_documents, every)
        if data.validation is not None:
            val_stream, val_column = load_stream(
                data.validation, "data.validation", cache_dir=data.cache_dir
            )
            held_out = DocumentStream(val_stream, val_column, "data.validation", data.max_documents)
            val_texts = list(islice(held_out.texts(), STREAM_VALIDATION_CAP))
        else:
            val_texts = list(source.validation())
        sample = list(islice(source.training(), UNIGRAM_STREAM_DOCUMENTS))
        if not sample:
            raise DataError("data.source: no text: the stream has no training document")
        if not val_texts:
            raise DataError(
                "data.validation: no text: the validation stream has no document"
                if data.validation is not None
                else "data.val_fraction: the stream has too few documents to hold one out"
            )
        tokenizer = resolve_tokenizer(self.tokenizer_config, self.run_dir, source.training)
        val_tokens, val_documents = materialize_tokens(tokenizer, val_texts)
        sample_tokens, _ = materialize_tokens(tokenizer, sample)
        val = PackedRows(val_tokens, self.row_len)
        self._check_sizes(None, len(val), len(val_tokens))
        stats = {
            "train_documents": None,
            "val_documents": val_documents,
            "train_tokens": None,
            "val_tokens": len(val_tokens),
            "train_sequences": None,
            "val_sequences": len(val),
            "unigram_val_loss": unigram_cross_entropy(
                sample_tokens, val.rows[:, 1:], tokenizer.vocab_size
            ),
        }
        return _Prepared(tokenizer, source, val, stats)

    def _check_sizes(self, n_train_rows: int | None, n_val_rows: int, n_val_tokens: int) -> None:
        """Enough rows for a micro-batch of training and one validation row."""
        if n_train_rows is not None and n_train_rows < self.micro_batch_size:
            raise DataError(
                f"data.seq_len: the training documents pack into {n_train_rows} sequences of "
                f"{self.row_len} tokens, fewer than micro_batch_size {self.micro_batch_size}; "
                f"add documents or lower data.seq_len"
            )
        if n_val_rows == 0:
            field = "data.validation" if self.data_config.validation else "data.val_fraction"
            raise DataError(
                f"{field}: the validation documents ({n_val_tokens} tokens) fill no sequence of "
                f"{self.row_len} tokens; use more validation text or lower data.seq_len"
            )

"""Tokenizer for a run (byte-level, trained BPE or a given ``tokenizer.json``) and tokenization
of documents with ``datasets.map``, cached on disk.

Caches (under ``data.cache_dir``, else the ``datasets`` cache directory, in ``hybrid-tokens/``),
named by a fingerprint of the documents (source content and rows) and the tokenizer:

- ``tokenized-<fp>.arrow``: the ``datasets.map`` output, one list of int32 ids per document;
- ``tokens-<fp>.npy``: the same ids concatenated (uint16 when the vocabulary allows, else
  int32), memory-mapped by every process and loader worker; packing is a reshape of it.

Both are written to temporary files and renamed, so processes that prepare the same data at
once (DDP ranks) at worst repeat the work.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from filelock import FileLock

from hybrid.atomic import atomic_path, atomic_write, atomic_write_text
from hybrid.data.errors import DataError
from hybrid.data.sources import Documents
from hybrid.recipe import TokenizerConfig
from hybrid.tokenizer import EOS_CANDIDATES, ByteTokenizer, HFTokenizer, Tokenizer, train_bpe

BPE_SETTINGS_FILE = ".tokenizer.settings.json"  # what a run's own BPE was trained with
CACHE_VERSION = "1"  # bump when the tokenized format changes
ENCODE_BATCH = 256  # documents per tokenizer call


def resolve_tokenizer(
    config: TokenizerConfig, run_dir: Path, training_texts: Callable[[], Iterable[str]]
) -> Tokenizer:
    """The run's tokenizer.

    ``byte``: :class:`ByteTokenizer` (and no ``run_dir/tokenizer.json``, which generation would
    read). ``bpe`` with ``path``: that ``tokenizer.json``, copied to ``run_dir/tokenizer.json``.
    ``bpe`` without: ``run_dir/tokenizer.json`` when it exists (a resumed run, a DDP child),
    else a BPE trained on ``training_texts()`` (at most ``config.train_bytes`` of it) and saved
    there. A file lock in ``run_dir`` makes concurrent processes train once and load the
    result.

    Raises:
        DataError: ``tokenizer.path`` missing, unreadable or without an end-of-document token;
            ``tokenizer.path`` with ``kind: byte``; ``kind: byte`` in a run directory that holds
            a ``tokenizer.json``.
    """
    run_dir = Path(run_dir)
    saved = run_dir / "tokenizer.json"
    if config.kind == "byte":
        if config.path is not None:
            raise DataError("tokenizer.path: read only with kind 'bpe' (kind is 'byte')")
        if saved.is_file():
            raise DataError(
                f"tokenizer.kind: 'byte', but the run directory holds a BPE '{saved}' (a run "
                f"with another tokenizer?); choose another run name or remove the file"
            )
        return ByteTokenizer()
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.path is not None:
        given = Path(config.path)
        tokenizer = load_tokenizer_file(given, "tokenizer.path")
        if not (saved.is_file() and filecmp.cmp(given, saved, shallow=False)):
            atomic_write(saved, lambda temporary: shutil.copyfile(given, temporary))
        return tokenizer
    settings = {"vocab_size": config.vocab_size, "train_bytes": config.train_bytes}
    recorded = run_dir / BPE_SETTINGS_FILE
    with FileLock(str(run_dir / ".tokenizer.json.lock")):
        if saved.is_file():
            if recorded.is_file():
                check_bpe_settings(json.loads(recorded.read_text()), settings, saved)
            return load_tokenizer_file(saved, "tokenizer")
        tokenizer = train_bpe(training_texts(), config.vocab_size, config.train_bytes)
        tokenizer.save(run_dir)
        atomic_write_text(recorded, json.dumps(settings))
    return tokenizer


def check_bpe_settings(recorded: dict, settings: dict, saved: Path) -> None:
    """Refuses to reuse a run directory's BPE trained with other settings (a run of the same
    name that stopped before its first checkpoint, then rerun with a changed recipe).

    Raises:
        DataError: one line naming the first differing ``tokenizer`` field.
    """
    for field, value in settings.items():
        if recorded.get(field, value) != value:
            raise DataError(
                f"tokenizer.{field}: {value}, but '{saved}' was trained with {recorded[field]} "
                "(an earlier run of this name?); choose another run name or remove the file"
            )


def load_tokenizer_file(path: Path, field: str) -> HFTokenizer:
    """A ``tokenizer.json`` that has an end-of-document token.

    Raises:
        DataError: ``field: ...`` naming the file.
    """
    if not path.is_file():
        raise DataError(f"{field}: no such file '{path}'")
    try:
        tokenizer = HFTokenizer(path)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            f"{field}: '{path}' is not a tokenizers tokenizer.json ({reason})"
        ) from None
    if tokenizer.eos_id is None:
        raise DataError(
            f"{field}: '{path}' has no end-of-document token (one of {', '.join(EOS_CANDIDATES)})"
        )
    return tokenizer


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids followed by ``tokenizer.eos_id``."""
    return [[*ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]


def iter_document_ids(tokenizer: Tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """:func:`encode_documents` over a stream of texts, :data:`ENCODE_BATCH` at a time."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == ENCODE_BATCH:
            yield from encode_documents(tokenizer, batch)
            batch = []
    if batch:
        yield from encode_documents(tokenizer, batch)


def cache_root(cache_dir: str | None) -> Path:
    """Where tokenized data is cached: ``cache_dir/hybrid-tokens``, else under the ``datasets``
    cache (``HF_DATASETS_CACHE``)."""
    if cache_dir is None:
        cache_dir = datasets.config.HF_DATASETS_CACHE
    return Path(cache_dir) / "hybrid-tokens"


def tokenize_documents(
    documents: Documents, tokenizer: Tokenizer, cache_dir: str | None, description: str
) -> Path:
    """The cached ``tokens-<fp>.npy`` of all documents' ids, each document followed by the
    end-of-document id, concatenated: shape (n_tokens,).

    Tokenizes with ``datasets.map`` unless the cache holds the result already.
    """
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    fingerprint = hashlib.sha256(
        f"{CACHE_VERSION}|{documents.fingerprint}|{tokenizer.fingerprint}".encode()
    ).hexdigest()[:24]
    tokens_path = root / f"tokens-{fingerprint}.npy"
    if not tokens_path.is_file():
        dataset = documents.selected()
        tokenized = dataset.map(
            _EncodeBatch(tokenizer, documents.column),
            batched=True,
            batch_size=ENCODE_BATCH,
            remove_columns=dataset.column_names,
            features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
            cache_file_name=str(root / f"tokenized-{fingerprint}.arrow"),
            new_fingerprint=fingerprint,
            desc=description,
        )
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
        _write_concatenated(tokenized, tokens_path, dtype)
    return tokens_path


class _EncodeBatch:
    """The ``datasets.map`` function: a batch of texts to lists of ids ending with eos."""

    def __init__(self, tokenizer: Tokenizer, column: str) -> None:
        self.tokenizer = tokenizer
        self.column = column

    def __call__(self, batch: dict[str, list]) -> dict[str, list[list[int]]]:
        return {"ids": encode_documents(self.tokenizer, batch[self.column])}


def _write_concatenated(tokenized: datasets.Dataset, path: Path, dtype: type) -> None:
    """Write the ``ids`` lists of a tokenized dataset end to end as one ``.npy`` (atomically)."""
    batches = tokenized.with_format("arrow")
    total = sum(
        int(pc.sum(pc.list_value_length(batch["ids"])).as_py() or 0)
        for batch in batches.iter(batch_size=4096)
    )
    with atomic_path(path) as temporary:
        out = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=(total,))
        position = 0
        for batch in batches.iter(batch_size=4096):
            values = batch["ids"].combine_chunks().flatten().to_numpy()
            out[position : position + len(values)] = values
            position += len(values)
        out.flush()
        del out

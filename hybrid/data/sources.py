"""Text sources: a recipe's ``SourceConfig`` resolved to files and loaded with ``datasets``.

Formats (``source.format``):

- ``text``: every file is one document (``load_dataset("text", sample_by="document")``).
  Bytes that are not UTF-8 are decoded as U+FFFD (``encoding_errors="replace"``) instead of
  failing, and line endings are normalised to ``\\n`` (Python's universal newlines).
- ``jsonl`` / ``parquet``: one document per record, its ``source.text_field``.
- ``disk``: a dataset written by ``save_to_disk`` (``paths`` names its one directory; a
  ``DatasetDict`` gives its ``source.split``).
- ``hub``: ``load_dataset(source.name, source.subset, split=source.split)``.

``paths`` entries are globs (``**`` recursive; a directory stands for every file under it) in
which ``{stdlib}`` is this Python's standard-library directory and ``~`` the home directory.
Matches are resolved (absolute, symlinks followed), filtered by the fnmatch-style ``exclude``
patterns (matched against the resolved path) and sorted, so the document order is
deterministic. Empty documents (and records whose text is null) are dropped everywhere.

Every user error is a :class:`DataError` whose one line starts with the field it concerns,
``where`` being ``data.source`` or ``data.validation``.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hybrid.data.errors import DataError
from hybrid.recipe import SourceConfig

STDLIB = "{stdlib}"
_TEXT_DTYPES = ("string", "large_string")


@dataclass(frozen=True)
class Documents:
    """The non-empty documents of a loaded source, or a subset of them.

    ``indices`` (int64, shape (n_documents,)) are the rows of ``dataset`` that hold the
    documents, in source order; ``column`` is the text column.
    """

    dataset: datasets.Dataset
    column: str
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, positions: np.ndarray) -> Documents:
        """The documents at ``positions`` (indices into this collection, int64)."""
        return Documents(self.dataset, self.column, self.indices[positions])

    def selected(self) -> datasets.Dataset:
        """The documents as a ``datasets.Dataset`` (indices kept in memory: nothing is
        written next to the source's files)."""
        return self.dataset.select(self.indices, keep_in_memory=True)

    def texts(self, batch_size: int = 256) -> Iterator[str]:
        """The documents' texts in order (read lazily, ``batch_size`` at a time)."""
        for start in range(0, len(self.indices), batch_size):
            rows = self.indices[start : start + batch_size].tolist()
            yield from self.dataset[rows][self.column]

    @property
    def fingerprint(self) -> str:
        """Identifies the documents' content: the source dataset's fingerprint (``datasets``
        changes it when a file or its modification time changes) and the rows taken."""
        digest = hashlib.sha256()
        digest.update(f"{self.dataset._fingerprint}|{self.column}|".encode())
        digest.update(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes())
        return digest.hexdigest()


def load_documents(
    source: SourceConfig, where: str, *, cache_dir: str | None, max_documents: int | None
) -> Documents:
    """Load a source with ``datasets`` (Arrow files cached under ``cache_dir``; None: the
    ``datasets`` default) and keep its first ``max_documents`` non-empty documents.

    Raises:
        DataError: missing files, unreadable files, a missing or non-text ``text_field``, an
            unreachable hub dataset, or no non-empty document.
    """
    dataset, column = _load(source, where, cache_dir=cache_dir, streaming=False)
    _check_text_feature(dataset.features, column, where)
    indices = _non_empty_rows(dataset, column)
    if len(indices) == 0:
        raise DataError(
            f"{where}: no text: all {len(dataset)} documents are empty"
            if len(dataset)
            else f"{where}: no documents"
        )
    return Documents(dataset, column, indices[:max_documents])


def load_stream(
    source: SourceConfig, where: str, *, cache_dir: str | None
) -> tuple[datasets.IterableDataset, str]:
    """The source as a ``datasets.IterableDataset`` and its text column; nothing is read yet
    beyond the checks on each file's first record.

    Raises:
        DataError: as :func:`load_documents`, for what can be checked before reading.
    """
    return _load(source, where, cache_dir=cache_dir, streaming=True)


def stream_texts(stream: datasets.IterableDataset, column: str, where: str) -> Iterator[str]:
    """The non-empty texts of a ``datasets.IterableDataset``, in order.

    Read with ``stream.iter`` (not ``iter(stream)``), which inside a loader worker still yields
    the whole stream rather than the worker's share of its files.

    Raises:
        DataError: a record without ``column``, or the stream failing to read.
    """
    batches = stream.iter(batch_size=64)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as error:
            raise DataError(f"{where}: cannot read the stream ({_reason(error)})") from error
        if column not in batch:
            fields = ", ".join(batch) or "none"
            raise DataError(f"{where}.text_field: records have no field {column!r} ({fields})")
        yield from (text for text in batch[column] if text)


def resolve_files(source: SourceConfig, where: str) -> list[Path]:
    """The files ``source.paths`` matches, less ``source.exclude``, resolved and sorted.

    Raises:
        DataError: no paths, a pattern matching nothing, everything excluded, or a file that
            cannot be opened.
    """
    if not source.paths:
        raise DataError(
            f"{where}.paths: required for format {source.format!r}; give files or globs"
        )
    files: set[Path] = set()
    for pattern in source.paths:
        matches = _glob(expand_path(pattern))
        if not matches:
            raise DataError(f"{where}.paths: no files match {pattern!r}")
        files.update(matches)
    kept = sorted(
        (path for path in files if not any(fnmatch.fnmatch(str(path), x) for x in source.exclude)),
        key=str,
    )
    if not kept:
        raise DataError(f"{where}.exclude: excludes all {len(files)} files that paths match")
    for path in kept:
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise DataError(f"{where}.paths: cannot read '{path}' ({error.strerror})") from None
    return kept


def expand_path(path: str) -> str:
    """``{stdlib}`` and ``~`` expanded."""
    return os.path.expanduser(path.replace(STDLIB, sysconfig.get_paths()["stdlib"]))


def _glob(pattern: str) -> list[Path]:
    """Files (not directories) matching ``pattern``, resolved; a directory gives the files
    under it. Broken links are kept, so that reading them reports them."""
    found: list[Path] = []
    for match in glob.glob(pattern, recursive=True):
        if os.path.isdir(match):
            found.extend(_glob(os.path.join(glob.escape(match), "**", "*")))
        elif os.path.exists(match):
            found.append(Path(match).resolve())
        else:  # a broken link
            found.append(Path(os.path.abspath(match)))
    return found


def _load(source: SourceConfig, where: str, *, cache_dir: str | None, streaming: bool):
    """``(dataset, text column)`` for any format; ``dataset`` is a ``datasets.Dataset``, or an
    ``IterableDataset`` when ``streaming``."""
    if source.format == "hub":
        return _load_hub(source, where, cache_dir=cache_dir, streaming=streaming)
    if source.format == "disk":
        dataset = _load_disk(source, where)
        if source.text_field not in dataset.column_names:
            raise DataError(
                f"{where}.text_field: the dataset in {source.paths[0]!r} has no field "
                f"{source.text_field!r} (fields: {', '.join(dataset.column_names)})"
            )
        return (dataset.to_iterable_dataset() if streaming else dataset), source.text_field

    files = resolve_files(source, where)
    data_files = [str(path) for path in files]
    if source.format == "text":
        builder, options, column = (
            "text",
            {"sample_by": "document", "encoding_errors": "replace"},
            "text",
        )
    elif source.format == "jsonl":
        for path in files:
            _check_jsonl_field(path, source.text_field, where)
        builder, options, column = "json", {}, source.text_field
    else:  # parquet
        for path in files:
            _check_parquet_field(path, source.text_field, where)
        builder, options, column = "parquet", {"columns": [source.text_field]}, source.text_field
    try:
        dataset = datasets.load_dataset(
            builder,
            data_files=data_files,
            split="train",
            cache_dir=cache_dir,
            streaming=streaming,
            **options,
        )
    except Exception as error:
        raise DataError(
            f"{where}.paths: cannot load the {source.format} files ({_reason(error)})"
        ) from error
    if not streaming and column not in dataset.column_names:
        raise DataError(
            f"{where}.text_field: no field {column!r} in {source.format} files "
            f"(fields: {', '.join(dataset.column_names)})"
        )
    return dataset, column


def _load_hub(source: SourceConfig, where: str, *, cache_dir: str | None, streaming: bool):
    if not source.name:
        raise DataError(f"{where}.name: required for format 'hub' (a dataset name on the hub)")
    try:
        dataset = datasets.load_dataset(
            source.name, source.subset, split=source.split, cache_dir=cache_dir, streaming=streaming
        )
    except Exception as error:
        raise DataError(
            f"{where}.name: cannot load {source.name!r} from the Hugging Face hub "
            f"({_reason(error)}); check the name, subset, split and the network"
        ) from error
    if not streaming and source.text_field not in dataset.column_names:
        raise DataError(
            f"{where}.text_field: {source.name!r} has no field {source.text_field!r} "
            f"(fields: {', '.join(dataset.column_names)})"
        )
    return dataset, source.text_field


def _load_disk(source: SourceConfig, where: str) -> datasets.Dataset:
    if len(source.paths) != 1:
        raise DataError(
            f"{where}.paths: format 'disk' needs exactly one directory; got {len(source.paths)}"
        )
    directory = expand_path(source.paths[0])
    if not os.path.isdir(directory):
        raise DataError(f"{where}.paths: no such directory {directory!r}")
    try:
        dataset = datasets.load_from_disk(directory)
    except Exception as error:
        raise DataError(
            f"{where}.paths: {directory!r} is not a dataset written by save_to_disk "
            f"({_reason(error)})"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        if source.split not in dataset:
            raise DataError(
                f"{where}.split: no split {source.split!r} in {directory!r} "
                f"(splits: {', '.join(dataset)})"
            )
        dataset = dataset[source.split]
    return dataset


def _check_jsonl_field(path: Path, field: str, where: str) -> None:
    """The first record of a JSON-lines file must be an object holding ``field``."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where}.paths: '{path}' line {number} is not JSON ({error.msg})"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{where}.paths: '{path}' line {number} is not a JSON object")
            if field not in record:
                raise DataError(
                    f"{where}.text_field: '{path}' has no field {field!r} "
                    f"(its first record has: {', '.join(record) or 'nothing'})"
                )
            return


def _check_parquet_field(path: Path, field: str, where: str) -> None:
    """A parquet file must be readable and have a column ``field``."""
    try:
        names = pq.read_schema(path).names
    except Exception as error:
        raise DataError(
            f"{where}.paths: '{path}' is not a readable parquet file ({_reason(error)})"
        ) from None
    if field not in names:
        raise DataError(
            f"{where}.text_field: '{path}' has no column {field!r} (columns: {', '.join(names)})"
        )


def _check_text_feature(features: datasets.Features, column: str, where: str) -> None:
    """The text column must hold strings."""
    feature = features[column] if features is not None else None
    if feature is not None and getattr(feature, "dtype", None) not in _TEXT_DTYPES:
        raise DataError(f"{where}.text_field: field {column!r} holds {feature}, not text")


def _non_empty_rows(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """Rows of ``dataset`` whose ``column`` is a non-empty string (int64, ascending)."""
    lengths = []
    for batch in dataset.with_format("arrow").iter(batch_size=65_536):
        lengths.append(pc.fill_null(pc.binary_length(batch[column]), 0).to_numpy())
    if not lengths:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(lengths) > 0).astype(np.int64)


def _reason(error: BaseException) -> str:
    """The innermost cause of ``error`` as ``Type: first line``."""
    while error.__cause__ is not None and str(error.__cause__):
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__

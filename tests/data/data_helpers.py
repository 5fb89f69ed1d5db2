"""Helpers of the data pipeline tests: small corpora written in temporary directories, modules
built on them, and a stand-in for the Lightning trainer (world size, rank, global step)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from hybrid.data import HybridDataModule
from hybrid.recipe import DataConfig, TokenizerConfig

BYTE_EOS = 256
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz .,\n"))


def random_documents(n_documents: int, seed: int = 0, shortest: int = 40, longest: int = 300):
    """Distinct random texts (so packed rows are distinct too)."""
    rng = np.random.default_rng(seed)
    return [
        "".join(rng.choice(LETTERS, size=int(rng.integers(shortest, longest))))
        for _ in range(n_documents)
    ]


def write_texts(directory: Path, documents: list[str]) -> list[Path]:
    """One file per document, named so that sorted order is the list order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"doc-{index:04d}.txt" for index in range(len(documents))]
    for path, text in zip(paths, documents, strict=True):
        path.write_text(text, encoding="utf-8")
    return paths


def make_module(
    root: Path,
    source: dict,
    *,
    seed: int = 0,
    micro_batch_size: int = 2,
    grad_accum: int = 1,
    tokenizer: dict | None = None,
    run_dir: Path | None = None,
    **data,
) -> HybridDataModule:
    """A module whose caches live under ``root``; ``data`` overrides DataConfig fields."""
    data.setdefault("cache_dir", str(root / "cache"))
    data.setdefault("seq_len", 16)
    return HybridDataModule(
        DataConfig(source=source, **data),
        TokenizerConfig(**(tokenizer or {})),
        seed=seed,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        run_dir=run_dir or root / "run",
    )


def fake_trainer(world_size: int = 1, global_rank: int = 0, global_step: int = 0):
    """What the module reads from a Lightning trainer."""
    return SimpleNamespace(world_size=world_size, global_rank=global_rank, global_step=global_step)


def take(loader, n_batches: int) -> list[torch.Tensor]:
    """The first ``n_batches`` batches of a loader."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n_batches:
            break
    return batches


def split_at(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    """Documents' ids from concatenated ids that end each document with ``eos``."""
    ends = np.flatnonzero(np.asarray(tokens) == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [np.asarray(tokens[start:end]) for start, end in zip(starts, ends, strict=True)]


def byte_texts(tokens: np.ndarray) -> list[str]:
    """Documents' texts from concatenated byte-level ids."""
    return [bytes(ids.astype(np.uint8)).decode("utf-8") for ids in split_at(tokens, BYTE_EOS)]

"""The data module as a whole: the standard library as a realistic corpus, caches hit by a
second process, and a real Lightning fit that resumes from a checkpoint on the exact batches."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from data_helpers import byte_texts, make_module

from hybrid.data import HybridDataModule

STDLIB_JSON = {"paths": ["{stdlib}/json/*.py"], "exclude": ["*/site-packages/*"]}


def test_standard_library_sources(tmp_path):
    module = make_module(tmp_path, STDLIB_JSON, val_fraction=0.2, seq_len=64, micro_batch_size=4)
    module.prepare()
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    texts = [text for text in texts if text]
    stats = module.stats
    assert stats["train_documents"] + stats["val_documents"] == len(texts)
    assert stats["val_documents"] == round(0.2 * len(texts))
    assert stats["train_tokens"] + stats["val_tokens"] == sum(len(t.encode()) + 1 for t in texts)
    assert stats["train_sequences"] == stats["train_tokens"] // 65
    assert stats["val_sequences"] == stats["val_tokens"] // 65
    assert sorted(
        byte_texts(module.train_rows.tokens) + byte_texts(module.val_rows.tokens)
    ) == sorted(texts)
    assert 1.0 < stats["unigram_val_loss"] < 5.0  # Python source: far below log(257) = 5.55
    batch = next(iter(module.train_dataloader()))
    assert batch.shape == (4, 65) and batch.dtype == torch.int64
    assert module.tokenizer.vocab_size == 257


def test_tokenizer_and_stats_need_prepare(tmp_path):
    module = make_module(tmp_path, STDLIB_JSON)
    with pytest.raises(RuntimeError, match="prepare"):
        module.tokenizer  # noqa: B018
    module.setup("fit")  # Lightning's hook prepares
    assert module.stats["train_documents"] > 0


PREPARE = """
import sys
from hybrid.data import HybridDataModule
from hybrid.recipe import DataConfig, TokenizerConfig
module = HybridDataModule(
    DataConfig(source={"paths": [sys.argv[1]]}, seq_len=16, cache_dir=sys.argv[2]),
    TokenizerConfig(kind="bpe", vocab_size=300, train_bytes=4000),
    seed=0, micro_batch_size=2, grad_accum=1, run_dir=sys.argv[3],
)
module.prepare()
print(module.tokenizer.fingerprint, module.stats["train_tokens"])
"""


def test_a_second_process_hits_every_cache(tmp_path, corpus):
    """What a DDP child does: prepare again, in another process, and find everything cached."""
    _, directory = corpus
    module = make_module(
        tmp_path,
        {"paths": [str(directory / "texts")]},
        tokenizer={"kind": "bpe", "vocab_size": 300, "train_bytes": 4000},
    )
    module.prepare()

    def snapshot() -> dict[str, int]:
        files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
        return {str(p): p.stat().st_mtime_ns for p in files}

    written = snapshot()
    assert any(name.endswith(".npy") for name in written)
    assert any(name.endswith(".arrow") for name in written)
    assert any(name.endswith("tokenizer.json") for name in written)
    arguments = [str(directory / "texts"), str(tmp_path / "cache"), str(tmp_path / "run")]
    child = subprocess.run(
        [sys.executable, "-c", PREPARE, *arguments],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    fingerprint, train_tokens = child.stdout.split()[-2:]
    assert fingerprint == module.tokenizer.fingerprint
    assert int(train_tokens) == module.stats["train_tokens"]
    assert snapshot() == written  # nothing rewritten: tokenizer, token files, Arrow files


class Recorder(pl.LightningModule):
    """A tiny model that records the batches it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(257, 8)
        self.head = torch.nn.Linear(8, 257)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        logits = self.head(self.embedding(batch[:, :-1]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def validation_step(self, batch, batch_idx):
        logits = self.head(self.embedding(batch[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: HybridDataModule, max_steps: int, root: Path, ckpt_path=None) -> Recorder:
    trainer = pl.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=module.grad_accum,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        use_distributed_sampler=False,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    model = Recorder()
    trainer.fit(model, datamodule=module, ckpt_path=ckpt_path)
    if ckpt_path is None:
        trainer.save_checkpoint(root / "last.ckpt")
    return model


def test_lightning_resume_continues_with_the_uninterrupted_batches(tmp_path, corpus):
    _, directory = corpus
    source = {"paths": [str(directory / "texts")]}

    def module() -> HybridDataModule:
        return make_module(tmp_path, source, micro_batch_size=2, grad_accum=2, val_fraction=0.2)

    whole = fit(module(), 6, tmp_path / "whole").seen
    fit(module(), 3, tmp_path / "part")
    resumed = fit(module(), 6, tmp_path / "part", ckpt_path=tmp_path / "part" / "last.ckpt").seen
    assert len(whole) == 12 and len(resumed) == 6  # micro-batches: steps x grad_accum
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[6:], strict=True))

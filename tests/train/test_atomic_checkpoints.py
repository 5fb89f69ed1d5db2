"""Checkpoint files are written atomically and a killed save's temporaries are cleaned up at
the next start (the kill -9 test in test_train_processes.py covers a whole run)."""

from __future__ import annotations

import os

import pytest
import torch

from hybrid.checksum import CHECKPOINT_KEY, structure_digest
from hybrid.recipe import load_recipe
from hybrid.tokenizer import ByteTokenizer
from hybrid.train.callbacks import AtomicCheckpointIO, remove_stale_temporaries
from hybrid.train.run import CHECKPOINT_DIR, write_run_dir


def _content(path) -> dict:
    """The saved checkpoint less its digest, after checking the digest matches the rest."""
    saved = torch.load(path, weights_only=True)
    digest = saved.pop(CHECKPOINT_KEY)
    assert digest == structure_digest(saved)
    return saved


def test_a_save_writes_the_checkpoint_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"  # the directory is made on the way
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert _content(path) == {"global_step": 3}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 2}, path)

    def save_half_then_interrupt(obj, target):
        with open(target, "wb") as file:
            file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 4}, path)
    monkeypatch.undo()
    assert _content(path) == {"global_step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_stale_checkpoint_temporaries_are_removed_and_nothing_else(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    stale = [
        f".last.ckpt.{os.getpid()}.0123abcd.tmp",  # hybrid.atomic's temporary names
        ".step000004.ckpt.4242.deadbeef.tmp",
        ".last.ckpt.k3j_x9q2.tmp",  # the names of the earlier tempfile.mkstemp writer
    ]
    kept = ["last.ckpt", "step000004.ckpt", ".tokenizer.json.4242.deadbeef.tmp", "notes.tmp"]
    for name in stale + kept:
        (directory / name).write_bytes(b"x")
    remove_stale_temporaries(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(kept)


def test_a_run_start_removes_stale_checkpoint_temporaries(tiny_recipe):
    recipe = load_recipe(tiny_recipe())
    checkpoints = recipe.run_dir / CHECKPOINT_DIR
    checkpoints.mkdir(parents=True)
    (checkpoints / ".last.ckpt.4242.deadbeef.tmp").write_bytes(b"half")
    write_run_dir(recipe, ByteTokenizer())
    assert list(checkpoints.iterdir()) == []
    assert (recipe.run_dir / "recipe.yaml").is_file()

"""``write_hf`` replaces a model directory's files atomically: a failed write leaves the old
files as they were and no temporary files behind."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from hybrid.atomic import stale_temporaries
from hybrid.convert.common import read_hf_config, read_hf_weights, write_hf


def test_write_hf_replaces_both_files(tmp_path):
    write_hf(tmp_path, {"model_type": "old"}, {"w": torch.zeros(2)})
    write_hf(tmp_path, {"model_type": "new", "limit": float("inf")}, {"w": torch.ones(3)})
    assert read_hf_config(tmp_path) == {"model_type": "new", "limit": float("inf")}
    assert torch.equal(read_hf_weights(tmp_path)["w"], torch.ones(3))
    assert stale_temporaries(tmp_path) == []


def test_failed_weights_write_leaves_the_old_directory(tmp_path, monkeypatch):
    write_hf(tmp_path, {"model_type": "old"}, {"w": torch.zeros(2)})
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "model.safetensors")}

    def disk_full(tensors, path, metadata=None):
        path.write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_hf(tmp_path, {"model_type": "new"}, {"w": torch.ones(3)})
    after = {name: (tmp_path / name).read_bytes() for name in before}
    assert after == before
    assert json.loads(after["config.json"])["model_type"] == "old"
    assert stale_temporaries(tmp_path) == []

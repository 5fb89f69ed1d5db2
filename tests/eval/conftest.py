"""A tiny random hybrid (Mamba-2 + attention + MLP, byte vocabulary) saved as a model directory."""

from __future__ import annotations

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.checkpoint import save_pretrained

TINY = {
    "pattern": "M*-",
    "vocab_size": 257,
    "d_model": 32,
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 16},
    "attention": {"n_heads": 2},
}


@pytest.fixture(scope="session")
def tiny_model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(HybridConfig(**TINY)).eval()


@pytest.fixture
def model_dir(tmp_path, tiny_model):
    """A model directory (config.json + model.safetensors) in a fresh folder."""
    save_pretrained(tiny_model, tmp_path / "ckpt")
    return tmp_path / "ckpt"

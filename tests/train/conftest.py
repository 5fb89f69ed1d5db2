"""Tiny recipes on a small real corpus (a few standard-library modules) for training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY_RECIPE = {
    "name": "tiny",
    "seed": 3,
    "model": {
        "pattern": "M*E",
        "d_model": 32,
        "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 16},
        "attention": {"n_heads": 2},
        "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 32},
        "tie_embeddings": True,
    },
    "data": {
        "source": {"format": "text", "paths": ["{stdlib}/json/*.py"]},
        "val_fraction": 0.2,
        "seq_len": 32,
    },
    "optim": {"lr": 3e-3},
    "schedule": {"warmup_steps": 2},
    "trainer": {
        "max_steps": 6,
        "micro_batch_size": 4,
        "val_every": 3,
        "val_batches": 2,
        "log_every": 1,
        "threads": 1,
    },
    "logging": {"wandb": False},
    "checkpoint": {"every_steps": 2, "keep": 1},
    "eval": {"max_new_tokens": 8},
}


@pytest.fixture
def tiny_recipe(tmp_path):
    """Writes the tiny recipe (output under tmp_path) and returns its path."""

    def write(**sections) -> Path:
        data = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
        data["output_dir"] = str(tmp_path / "runs")
        data["data"]["cache_dir"] = str(tmp_path / "cache")
        for key, value in sections.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        path = tmp_path / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write

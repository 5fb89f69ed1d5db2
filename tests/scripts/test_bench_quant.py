"""scripts/bench_quant.py runs end to end on a tiny model and writes its JSON and table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.checkpoint import save_pretrained

pytest.importorskip("torchao")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_quant.py"


def test_bench_quant_writes_every_variant(tmp_path):
    torch.manual_seed(0)
    config = HybridConfig(
        "M*E", vocab_size=257, d_model=64, attention={"n_heads": 2},
        mamba2={"d_state": 8, "headdim": 16, "chunk_size": 16},
        moe={"n_experts": 4, "expert_hidden_size": 64},
    )  # fmt: skip
    save_pretrained(HybridLM(config), tmp_path / "model")
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(tmp_path / "model"),
         "--documents", "2", "--length", "64", "--context", "2048", "--new-tokens", "4",
         "--rounds", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert list(rows) == ["float32", "bfloat16", "int8 weights",
                          "int8 weights (torchao Int8Tensor)", "int4 weights", "int8 KV",
                          "bfloat16 + int8 KV"]  # fmt: skip
    assert rows["int8 weights"]["weight_bytes"] < 0.5 * rows["float32"]["weight_bytes"]
    assert rows["int4 weights"]["weight_bytes"] < rows["int8 weights"]["weight_bytes"]
    heads, head_dim = 2, 32  # per slot: keys and values of each head, an int64 index, a flag
    assert result["kv_bytes_int8_vs_bfloat16"] == pytest.approx(
        (2 * heads * (head_dim + 2) + 9) / (2 * heads * head_dim * 2 + 9)
    )
    for row in rows.values():
        assert row["perplexity"] > 1 and row["decode_ms_per_token"] > 0
    assert "| int4 weights |" in out.with_suffix(".md").read_text()

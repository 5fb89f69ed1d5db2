"""docs/bench_floor.md is the table of docs/bench_floor.json, whose floors follow from its
FLOP counts and matmul rates; the FLOP count is the one the training throughput uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid import HybridConfig
from hybrid.train.run import training_flops_per_token
from tests.scripts.script_module import load_script

ROOT = Path(__file__).resolve().parents[2]


def script():
    return load_script("bench_floor")


def committed() -> dict:
    return json.loads((ROOT / "docs/bench_floor.json").read_text())


def test_committed_table_is_the_committed_json():
    data = committed()
    meta = data.pop("meta")
    assert (ROOT / "docs/bench_floor.md").read_text() == script().markdown(data, meta)


def test_floors_follow_from_the_flops_and_the_rate():
    data = committed()
    data.pop("meta")
    assert {"qwen3_next", "falcon_h1"} <= set(data)
    for result in data.values():
        for what in ("prefill", "train_step"):
            row = result[what]
            rate = result["matmul_flops_per_s"]
            assert row["floor_s"] == pytest.approx(row["matmul_flops"] / rate)
            assert row["floor_s"] < min(row["hybrid_s"], row["transformers_s"])


def test_matmul_flops_of_a_dense_model_by_hand():
    """One attention layer and one MLP, untied: 2 FLOPs per weight and token, the LM head,
    and the causal score / value products; 3x that for forward + backward."""
    config = HybridConfig(
        pattern="*-", d_model=64, vocab_size=100, attention={"n_heads": 2},
        mlp={"hidden_size": 128}, tie_embeddings=False,
    )  # fmt: skip
    seqlen = 32
    attention = 4 * 64 * 64  # q, k, v, o (n_kv_heads = n_heads)
    mlp = 3 * 64 * 128  # gated: up, gate, down
    norms = 3 * 64  # two sublayer norms and the final one: counted as weights too
    forward = 2 * (attention + mlp + norms) + 2 * 100 * 64 + 2 * 2 * 32 * seqlen
    per_token = training_flops_per_token(config, seqlen)
    assert per_token == pytest.approx(3 * forward)
    assert script().matmul_flops(config, 2, seqlen, training=False) == pytest.approx(
        forward * 2 * seqlen
    )

"""Decode cost: the fields of each row, cache bytes against hybrid.accounting, the bench's reuse."""

from __future__ import annotations

import json

import pytest
import torch

from hybrid.accounting import describe
from hybrid.eval import decode


def test_decode_rows_report_time_and_cache_bytes(tiny_model):
    results = decode.run_decode(tiny_model, contexts=[300, 100], steps=3, warmup=1)
    json.dumps(results)  # JSON-ready
    assert results["task"] == "decode" and results["settings"]["contexts"] == [100, 300]
    for row, context in zip(results["rows"], (100, 300), strict=True):
        assert row["context"] == context
        assert len(row["step_ms"]) == 3
        assert min(row["step_ms"]) <= row["ms_per_token"] <= max(row["step_ms"])
        assert row["ms_per_token_p25"] <= row["ms_per_token"] <= row["ms_per_token_p75"]
        assert row["cache_bytes"] == describe(tiny_model.config, context, torch.float32).cache_bytes
        assert row["cache_capacity"] == context + 4
        capacity_bytes = describe(tiny_model.config, context + 4, torch.float32).cache_bytes
        assert row["cache_nbytes_allocated"] == capacity_bytes
        assert sum(row["cache_bytes_by_block"].values()) == row["cache_bytes"]
        assert row["cache_bytes_by_block"]["mlp"] == 0
    # attention grows with the context, Mamba-2 state does not
    small, large = (r["cache_bytes_by_block"] for r in results["rows"])
    assert small["mamba2"] == large["mamba2"] and large["attention"] > small["attention"]


def test_prefill_fill_runs_a_real_prompt(tiny_model):
    results = decode.run_decode(tiny_model, [40], steps=2, warmup=0, fill="prefill", chunk_size=16)
    assert results["rows"][0]["context"] == 40


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"contexts": [0]}, "contexts: must be positive"),
        ({"steps": 1}, "steps: need at least 2"),
        ({"warmup": -1}, "warmup: must be >= 0"),
        ({"fill": "zeros"}, "fill: 'zeros' is not one of random, prefill"),
        ({"contexts": [64], "max_context": 32}, "exceeds the maximum context of 32"),
        ({"contexts": [10**13]}, "more than the device's"),
    ],
)
def test_bad_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        decode.run_decode(tiny_model, **{"contexts": [16], **kwargs})

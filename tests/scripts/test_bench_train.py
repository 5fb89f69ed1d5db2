"""scripts/bench_train.py end to end at a tiny size: every variant runs in its own process
and the report has a row for each, with numbers that hold together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_reports_every_variant(tmp_path):
    out = tmp_path / "bench_train"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--lengths", "64",
         "--d-model", "32", "--rounds", "1", "--compile-length", "0", "--threads", "1",
         "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["checkpointing"]) for r in rows] == [
        ("attention", False), ("attention", True), ("hybrid 1:7", False),
        ("hybrid 1:7", True), ("mamba2", False), ("mamba2", True),
        ("mamba2 unsegmented", False),
    ]  # fmt: skip
    for row in rows:
        assert row["step_s"] > 0 and row["tokens_per_s"] == row["length"] / row["step_s"]
        assert 0 < row["mfu"] < 1
        # Against the highest matmul rate of the run, each worker's own included.
        assert result["matmul_flops"] >= row["matmul_flops"] > 0
        mfu = row["flops_per_token"] * row["tokens_per_s"] / result["matmul_flops"]
        assert abs(row["mfu"] - mfu) < 1e-12
    by = {(r["model"], r["checkpointing"]): r for r in rows}
    assert (
        by[("mamba2", True)]["saved_activation_bytes"]
        < by[("mamba2", False)]["saved_activation_bytes"]
    )
    assert out.with_suffix(".md").read_text().count("| mamba2") == 3
    assert out.with_suffix(".png").stat().st_size > 0

"""The finding report scripts turn eval results of runs into their table, JSON and plot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.checkpoint import save_pretrained
from hybrid.cli import main

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def evaluated_runs(tmp_path: Path, task: str, names: list[str], vocab_size: int, *args) -> Path:
    """``RUNS/<name>/eval/<task>/results.json`` for each name: one tiny random model's results
    (the scripts read the files, not the models)."""
    torch.manual_seed(0)
    model = HybridLM(
        HybridConfig("M*-", vocab_size=vocab_size, d_model=32, attention={"n_heads": 2},
                     mamba2={"d_state": 8, "headdim": 8, "chunk_size": 16})
    )  # fmt: skip
    save_pretrained(model, tmp_path / "model")
    first = tmp_path / "runs" / names[0] / "eval" / task
    argv = ["eval", task, "--checkpoint", str(tmp_path / "model"), "--out", str(first)]
    assert main([*argv, "--no-progress", *map(str, args)]) == 0
    for name in names[1:]:
        shutil.copytree(first, tmp_path / "runs" / name / "eval" / task)
    return tmp_path / "runs"


def report(script: str, runs: Path, out: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--runs", str(runs), "--out", str(out), *args],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_passkey_report(tmp_path, capsys):
    layouts = ["attention", "samba", "mamba2_swa"]
    runs = evaluated_runs(tmp_path, "passkey", [f"passkey_{n}" for n in layouts], 257,
                          "--lengths", 384, 1024, "--depths", 0, 1, "--trials", 1)  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "out"
    printed = report("finding_passkey_report.py", runs, out)
    table = (out / "passkey.md").read_text()
    assert printed.strip() == table.strip()
    assert table.splitlines()[0].startswith("| layout | 384 (0.75x) | 1024 (2x) |")
    assert [line.split(" ")[1] for line in table.splitlines()[2:5]] == layouts
    assert sorted(json.loads((out / "passkey.json").read_text())) == sorted(layouts)
    assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("script", ["finding_mqar_report.py", "finding_mqar_width_report.py"])
def test_mqar_reports(tmp_path, capsys, script):
    layouts = ["attention", "mamba2", "hybrid", "deltanet", "kda", "shortconv"]
    names = [f"mqar_{n}" for n in layouts] + ["mqar_mamba2_d64", "mqar_mamba2_d128"]
    runs = evaluated_runs(tmp_path, "mqar", names, 128,
                          "--seq-lens", 64, "--kv-pairs", 2, 4, "--examples", 8)  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "out"
    width = script == "finding_mqar_width_report.py"
    printed = report(script, runs, out, *(["--widths", "64", "128"] if width else []))
    stem = "mqar_width" if width else "mqar"
    table = (out / f"{stem}.md").read_text()
    assert printed.strip() == table.strip()
    rows = table.splitlines()[2:]
    if width:  # two widths and the attention reference, 2 and 4 pairs
        assert [row.split(" | ")[0] for row in rows] == ["| 64", "| 128", "| attention `*-*-`"
                                                         ", d_model 64"]  # fmt: skip
    else:  # one row per (length, pairs), a column per layout
        assert [row.split(" | ")[:2] for row in rows] == [["| 64", "2"], ["| 64", "4"]]
        assert all(len(row.split(" | ")) == 8 for row in rows)
    assert json.loads((out / f"{stem}.json").read_text())
    assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"


def test_positions_report(tmp_path, capsys):
    encodings = ["sinusoidal", "rope", "alibi", "nope", "mamba2_nope"]
    runs = evaluated_runs(tmp_path, "ppl", [f"positions_{n}" for n in encodings], 257,
                          "--train-length", 128, "--multiples", 1, 2, 4, 8,
                          "--samples", 1)  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "out"
    printed = report("finding_positions_report.py", runs, out)
    table = (out / "positions.md").read_text()
    assert printed.strip() == table.strip()
    assert "| model | 128 (1x) | 256 (2x) | 512 (4x) | 1024 (8x) |" in table
    assert "| model | 0-128 | 128-256 | 256-512 | 512-1024 |" in table
    assert sorted(json.loads((out / "positions.json").read_text())) == sorted(encodings)
    assert (out / "positions.png").read_bytes()[:4] == b"\x89PNG"

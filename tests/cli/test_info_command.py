"""`hybrid info`: the per-sublayer table, totals, cache bytes; bad input exits 2 with one line."""

import subprocess
import sys

import pytest

from hybrid.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_info_table_and_totals(capsys):
    code, out, _ = run(
        capsys,
        "info",
        "M-M*-ME",
        "--d-model",
        "64",
        "--vocab-size",
        "100",
        "--context",
        "1000",
        "mamba2.d_state=16",
        "mamba2.headdim=16",
        "attention.n_heads=4",
        "attention.n_kv_heads=2",
        "moe.n_experts=4",
        "moe.top_k=1",
    )
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [row[2] for row in rows] == [
        "mamba2",
        "mlp",
        "mamba2",
        "attention",
        "mlp",
        "mamba2",
        "moe",
    ]
    assert "total parameters:" in out and "active parameters:" in out
    # attention: 1000 slots * (2 (K and V) * 2 kv heads * 16 head_dim * 2 bytes (bf16) + 8-byte
    # index + 1-byte valid flag) = 137000 bytes
    assert rows[3][-2:] == ["133.8", "KiB"]
    # mamba2: conv (128 + 2*16) * 3 * 2 bytes + SSM state 128 * 16 * 4 bytes = 9152 bytes
    assert rows[0][-2:] == ["8.9", "KiB"]
    assert rows[1][-2:] == ["0", "B"]
    total = 3 * 9152 + 1000 * (2 * 2 * 16 * 2 + 9)
    assert f"({total:,} bytes" in out


def test_info_reads_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  pattern: 'S-S*'\n  d_model: 32\n  vocab_size: 10\n  attention:\n    window: 64\n"
    )
    code, out, _ = run(capsys, "info", str(recipe), "--context", "32768")
    assert code == 0 and "mamba1" in out
    # windowed attention keeps only 64 slots: 64 * (2 * 1 head * 32 * 2 bytes + 9) = 8768 bytes
    assert "8.6 KiB" in out
    # overrides relative to the model, or full recipe paths as `hybrid train` takes them
    for override in ("attention.window=32", "model.attention.window=32"):
        code, out, _ = run(capsys, "info", str(recipe), override, "--context", "32768")
        assert code == 0 and "4.3 KiB" in out and "8.6 KiB" not in out, override


def test_info_applies_data_overrides_of_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {pattern: '*', d_model: 32}\ndata: {source: {format: mqar}}\n")
    code, out, _ = run(capsys, "info", str(recipe), "data.mqar.vocab_size=100")
    assert code == 0 and "vocab 100)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "M-Q"], "pattern[2]: unknown block 'Q'"),
        (["info", "M*", "attention.n_heads=3", "--d-model", "64"], "attention.n_heads"),
        (["info", "missing.yaml"], "missing.yaml: no such recipe file"),
        (["info", "M", "--context", "0"], "--context"),
        (["info", "M", "nonsense"], "expected key=value"),
    ],
)
def test_info_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, _out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_module_entry_point_exit_code():
    result = subprocess.run(
        [sys.executable, "-m", "hybrid.cli", "info", "M-?"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("hybrid info: error: pattern[2]: unknown block '?'")


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        ([], "hybrid: error: the following arguments are required: command"),
        (["train"], "hybrid train: error: the following arguments are required: recipe"),
        (["generate", "--prompt", "x"], "hybrid generate: error: the following arguments"),
        (["info", "M", "--context", "x"], "hybrid info: error: argument --context"),
        (["info", "M", "--bogus"], "hybrid: error: unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors_of_every_command_are_one_line(capsys, argv, start):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(start) and err.count("\n") == 1, err


def test_info_columns_align_with_long_block_names(capsys):
    """A block name longer than the header's column (gated_deltanet) widens it: every row's
    numbers end where the header's do."""
    code, out, _ = run(capsys, "info", "recipes/qwen3_next_like.yaml", "--context", "1024")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("idx"))
    rows = [line for line in lines if line[:4].strip().isdigit()]
    assert any("gated_deltanet" in row for row in rows)
    ends = {header.index(name) + len(name) for name in ("params", "active", "cache")}
    for row in rows:
        assert len(row) == len(header), row
        assert all(row[end - 1] != " " and (end == len(row) or row[end] == " ") for end in ends)


def test_info_of_checkpoint_directories(tmp_path, capsys):
    """A checkpoint directory (ours, a run directory holding model/, or a transformers one)
    reads as its model's config; dotted overrides apply on top, and a directory without a
    config fails in one line."""
    import torch

    from hybrid import HybridConfig, HybridLM
    from hybrid.checkpoint import save_pretrained

    config = {"pattern": "M-*-", "vocab_size": 64, "d_model": 32,
              "mamba2": {"d_state": 8, "headdim": 8}, "attention": {"n_heads": 2}}  # fmt: skip
    save_pretrained(HybridLM(HybridConfig(**config)), tmp_path / "run" / "model")
    tables = []
    for source in (tmp_path / "run" / "model", tmp_path / "run"):
        code, out, _ = run(capsys, "info", str(source), "--context", "100", "mamba2.d_state=16")
        assert code == 0
        tables.append(out)
    code, expected, _ = run(
        capsys, "info", "M-*-", "--d-model", "32", "--vocab-size", "64", "--context", "100",
        "mamba2.d_state=16", "mamba2.headdim=8", "attention.n_heads=2",
    )  # fmt: skip
    assert tables == [expected, expected]
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import llama_config

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(llama_config(vocab_size=64, hidden_size=32))
    llama.save_pretrained(tmp_path / "llama")
    code, out, _ = run(capsys, "info", str(tmp_path / "llama"), "--context", "100")
    assert code == 0 and f"{sum(p.numel() for p in llama.parameters()):,}" in out
    code, _, err = run(capsys, "info", str(tmp_path))
    assert code == 2 and "missing config.json" in err and err.count("\n") == 1


def test_info_names_the_post_norm_sublayers(capsys):
    code, out, _ = run(capsys, "info", "recipes/olmo_hybrid_like.yaml", "--context", "1024")
    assert code == 0
    assert "post-norm sublayers 6, 7, 14, 15: x + norm(block(x))" in out.splitlines()
    code, out, _ = run(capsys, "info", "recipes/qwen3_next_like.yaml", "--context", "1024")
    assert code == 0 and "post-norm" not in out

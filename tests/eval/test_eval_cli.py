"""`hybrid eval`: results.json and PNGs where they belong, W&B offline, one-line bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hybrid.checkpoint import save_pretrained
from hybrid.cli import main
from hybrid.eval import load_results, tasks
from hybrid.eval.plots import draw
from tests.train.wandb_reader import read_history

FAST = ["--no-progress", "--chunk-size", "128"]


def run(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_passkey_writes_results_and_a_heatmap_next_to_the_checkpoint(capsys, model_dir):
    code, out, err = run(capsys, "passkey", "--checkpoint", model_dir, "--lengths", 300, 400,
                         "--depths", 0, 1, "--trials", 1, *FAST)  # fmt: skip
    assert code == 0, err
    folder = model_dir.parent / "eval" / "passkey"
    assert sorted(p.name for p in folder.iterdir()) == ["passkey_heatmap.png", "results.json"]
    assert f"wrote {folder / 'results.json'}" in out
    results = load_results(folder)
    assert results["task"] == "passkey" and len(results["rows"]) == 4
    assert results["settings"]["lengths"] == [300, 400]
    meta = results["meta"]
    assert meta["checkpoint"] == str(model_dir) and meta["model"]["pattern"] == "M*-"
    assert meta["command"].startswith("hybrid eval passkey --checkpoint")
    assert meta["tokenizer"]["kind"] == "ByteTokenizer"
    # a notebook redraws from the file alone
    assert [p.name for p in draw(load_results(folder / "results.json"), model_dir / "redraw")] == [
        "passkey_heatmap.png"
    ]
    assert (folder / "passkey_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def make_run(root: Path, model) -> Path:
    """A run directory as `hybrid train` leaves it: recipe.yaml, model/, checkpoints/."""
    save_pretrained(model, root / "model")
    (root / "checkpoints").mkdir()
    (root / "recipe.yaml").write_text(yaml.safe_dump({"data": {"seq_len": 12}}))
    return root


def test_ppl_in_a_run_directory_uses_its_training_length(capsys, tmp_path, tiny_model):
    run_dir = make_run(tmp_path / "run", tiny_model)
    text = tmp_path / "held_out.txt"
    text.write_text("print('hello, world')\n" * 20)
    code, _, err = run(capsys, "ppl", "--checkpoint", run_dir, "--data", text,
                         "--multiples", 1, 2, "--samples", 1, *FAST)  # fmt: skip
    assert code == 0, err
    folder = run_dir / "eval" / "ppl"
    assert sorted(p.name for p in folder.iterdir()) == [
        "loss_vs_position.png",
        "ppl_vs_length.png",
        "results.json",
    ]
    settings = load_results(folder)["settings"]
    assert settings["train_length"] == 12 and settings["lengths"] == [12, 24]
    assert settings["train_length_source"] == "the checkpoint's recipe (data.seq_len)"


def test_a_training_checkpoint_file_gives_its_recipe_and_out_dir(capsys, tmp_path, tiny_model):
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    torch.save(
        {
            "hybrid": {
                "config": tiny_model.config.to_dict(),
                "fingerprint": tiny_model.config.fingerprint(),
                "tokenizer_json": None,
                "recipe": {"data": {"seq_len": 20}},
            },
            "state_dict": {f"model.{k}": v for k, v in tiny_model.state_dict().items()},
        },
        path,
    )
    code, _, err = run(capsys, "decode", "--checkpoint", path, "--contexts", 64, 128,
                       "--steps", 2, "--warmup", 0, *FAST)  # fmt: skip
    assert code == 0, err
    folder = tmp_path / "checkpoints" / "eval" / "decode"
    assert sorted(p.name for p in folder.iterdir()) == ["decode_cost.png", "results.json"]
    assert [r["context"] for r in load_results(folder)["rows"]] == [64, 128]
    from hybrid.eval.checkpoints import training_length

    assert training_length(path) == 20


def test_niah_to_an_explicit_out_dir(capsys, tmp_path, model_dir):
    out = tmp_path / "somewhere"
    code, _, err = run(capsys, "niah", "--checkpoint", model_dir, "--out", out, "--lengths",
                       700, "--variants", "single", "vt", "--samples", 1, "--hops", 1,
                       *FAST)  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["niah_accuracy.png", "results.json"]
    results = load_results(out)
    assert [(r["variant"], r["length"]) for r in results["rows"]] == [("single", 700), ("vt", 700)]


def flatten(row: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (W&B writes a logged media entry either way)."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_logged(run_file: Path, wanted: str, timeout: float = 60) -> dict:
    """Every logged key and value (flattened), once ``wanted`` is among them: wandb's service
    process may still be writing the run file when ``run.finish()`` has returned."""
    deadline = time.monotonic() + timeout
    logged: dict = {}
    while wanted not in logged and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            logged = {k: v for row in read_history(run_file) for k, v in flatten(row).items()}
        except Exception:  # a record cut mid-write: read again
            logged = {}
    return logged


def test_wandb_offline_logs_tables_and_images(capsys, monkeypatch, tmp_path, model_dir):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "passkey", "--checkpoint", model_dir, "--out", out,
                            "--lengths", 300, "--depths", 0.5, "--trials", 1, "--wandb",
                            "--wandb-mode", "offline", *FAST)  # fmt: skip
    assert code == 0, err
    assert "wandb sync" in stdout
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = read_logged(run_file, "passkey/rows/_type")
    assert logged["passkey/rows/_type"] == logged["passkey/samples/_type"] == "table-file"
    assert logged["passkey/rows/nrows"] == 1 and logged["passkey/rows/ncols"] == 5
    assert logged["passkey/passkey_heatmap/_type"] == "image-file"
    table = json.loads((run_file.parent / "files" / logged["passkey/rows/path"]).read_text())
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    results = load_results(out)
    assert row == results["rows"][0]


def test_help_lists_the_tasks(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ("passkey", "niah", "ppl", "decode"):
        assert f"\n  {name} " in out


def test_a_task_is_listed_only_when_its_module_exists(monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "ghost", tasks.Task("ghost", "hybrid.eval.ghost", "no"))
    assert "ghost" not in tasks.available_tasks() and "passkey" in tasks.available_tasks()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a task"),
        (["nope"], "unknown task 'nope'; valid tasks: decode,"),
        (["--checkpoint", "x", "passkey"], "unknown task '--checkpoint'"),
        (["passkey", "--checkpoint", "{tmp}/missing"], "missing: no such file or directory"),
        (["passkey", "--checkpoint", "{ckpt}", "--depths", "0.5", "1.5"],
         r"--depths: 1.5 is outside [0, 1]"),
        (["passkey", "--checkpoint", "{ckpt}", "--depths", "-0.25"],
         r"--depths: -0.25 is outside [0, 1]"),
        (["passkey", "--checkpoint", "{ckpt}", "--lengths", "512", "--max-context", "256"],
         "--lengths: 512 tokens exceeds the maximum context of 256 tokens"),
        (["passkey", "--checkpoint", "{ckpt}", "--lengths", "0"], "--lengths: must be positive"),
        (["passkey", "--checkpoint", "{ckpt}", "--lengths", "60"],
         "lengths: 60 tokens is too short for the passkey prompt"),
        (["passkey", "--checkpoint", "{ckpt}", "--lengths", "ten"], "invalid int value: 'ten'"),
        (["passkey", "--checkpoint", "{ckpt}", "--bogus"], "unrecognized arguments: --bogus"),
        (["passkey"], "the following arguments are required: --checkpoint"),
        (["niah", "--checkpoint", "{ckpt}", "--variants", "needle"], "invalid choice: 'needle'"),
        (["ppl", "--checkpoint", "{ckpt}", "--data", "{tmp}/*.none"], "data: no file matches"),
        (["ppl", "--checkpoint", "{ckpt}", "--multiples", "0"], "--multiples: must be positive"),
        (["decode", "--checkpoint", "{ckpt}", "--contexts", "10000000000000"],
         "more than the device's"),
        (["decode", "--checkpoint", "{ckpt}", "--steps", "1"], "--steps: need at least 2"),
        (["decode", "--checkpoint", "{ckpt}", "--chunk-size", "0"], "--chunk-size: must be"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, model_dir, argv, message):
    argv = [a.format(tmp=tmp_path, ckpt=model_dir) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("hybrid eval"), err
    assert message in err, err
    assert not (model_dir.parent / "eval").exists()


def test_cuda_requested_without_cuda_is_one_line(capsys, model_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run(capsys, "decode", "--checkpoint", model_dir, "--device", "cuda")
    assert code == 2 and err.count("\n") == 1 and "CUDA is not available" in err


def test_a_task_module_without_entry_points_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, "bare", tasks.Task("bare", "hybrid.eval.progress", "bare"))
    code, _, err = run(capsys, "bare", "--checkpoint", "x")
    assert code == 2 and err.count("\n") == 1 and "no command-line entry point" in err


def test_the_command_line_exits_2_without_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "hybrid.cli", "eval", "passkeys", "--checkpoint", "x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "unknown task 'passkeys'" in done.stderr

"""The catalogue of malformed user input: each case is one line on stderr naming the field or
file at fault, exit code 2, no traceback, and nothing written or overwritten.

Every case builds what it needs under ``tmp_path`` (a tiny saved model, recipes, files in the
way) and runs ``hybrid.cli.main`` in-process, so an uncaught exception fails the test with its
traceback. ``test_the_installed_command_exits_2_without_a_traceback`` runs a few of them
through the real ``hybrid`` entry point, for the process's exit code and stderr.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from hybrid import HybridConfig, HybridLM
from hybrid.checkpoint import load_model, save_pretrained
from hybrid.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TINY = {
    "pattern": "M*-",
    "vocab_size": 256,
    "d_model": 32,
    "attention": {"n_heads": 2},
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 16},
}


@dataclass
class Case:
    """``setup(tmp_path)`` returns the argv; stderr must be one line matching ``message``."""

    name: str
    setup: Callable[[Path], list[str]]
    message: str


def tiny_model(tmp_path: Path, name: str = "model", **changes) -> Path:
    """A saved random model; ``changes`` edit its config.json afterwards (as a user might)."""
    torch.manual_seed(0)
    directory = tmp_path / name
    save_pretrained(HybridLM(HybridConfig(**TINY)), directory)
    if changes:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def recipe_file(tmp_path: Path, **model_changes) -> Path:
    """The quick-start recipe with ``model_changes``, writing its run under ``tmp_path``."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["model"].update(model_changes)
    recipe["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train(*overrides: str) -> Callable[[Path], list[str]]:
    """``hybrid train`` of the quick-start recipe with ``overrides``, run under tmp_path."""
    return lambda tmp: ["train", str(QUICKSTART), f"output_dir={tmp / 'runs'}", *overrides,
                        "--no-progress"]  # fmt: skip


def a_file(tmp_path: Path, name: str = "afile", content: bytes = b"") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def generate(tmp: Path, model: Path, *options: str) -> list[str]:
    return ["generate", "--checkpoint", str(model), "--prompt", "hi", *options]


def hf_dir(tmp_path: Path, **changes) -> Path:
    """A tiny transformers Bamba directory with ``changes`` in its config.json."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from tests.hf_models import bamba_config

    directory = tmp_path / "hf"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(bamba_config()).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def sharded_hf_dir(tmp_path: Path, index: str) -> Path:
    directory = hf_dir(tmp_path)
    (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
    (directory / "model.safetensors.index.json").write_text(index)
    return directory


def model_with_tokenizer(tmp_path: Path, content: bytes) -> Path:
    directory = tiny_model(tmp_path)
    (directory / "tokenizer.json").write_bytes(content)
    return directory


CASES = [
    # Recipes and their overrides.
    Case(
        "recipe missing",
        lambda tmp: ["train", str(tmp / "nope.yaml")],
        r"nope\.yaml: no such recipe file",
    ),
    Case(
        "recipe not YAML",
        lambda tmp: ["train", str(a_file(tmp, "r.yaml", b"a: [1,"))],
        r"r\.yaml: not valid YAML",
    ),
    Case(
        "recipe not UTF-8",
        lambda tmp: ["train", str(a_file(tmp, "r.yaml", b"name: \xff\n"))],
        r"r\.yaml: not UTF-8 text",
    ),
    Case(
        "recipe a list",
        lambda tmp: ["train", str(a_file(tmp, "r.yaml", b"- 1\n"))],
        r"r\.yaml: expected a mapping of recipe sections",
    ),
    Case(
        "layer_overrides a list in a recipe",
        lambda tmp: ["train", str(recipe_file(tmp, layer_overrides=[{"window": 4}]))],
        r"model\.layer_overrides: must map sublayer indices to options, got list",
    ),
    Case(
        "layer_overrides key not an index",
        train("model.layer_overrides.x.window=3"),
        r"model\.layer_overrides: key 'x' is not a sublayer index",
    ),
    Case(
        "layer_overrides index out of range",
        train("model.layer_overrides.99.window=3"),
        r"model\.layer_overrides: index 99 is not a sublayer index",
    ),
    Case(
        "init_std a string",
        train("model.init_std=abc"),
        r"model\.init_std: must be a finite number, got 'abc'",
    ),
    Case(
        "norm_eps a string",
        train("model.norm_eps=small"),
        r"model\.norm_eps: must be a finite number, got 'small'",
    ),
    Case(
        "d_model a float",
        train("model.d_model=64.5"),
        r"model\.d_model: must be an integer, got 64\.5",
    ),
    Case(
        "tie_embeddings a string",
        train("model.tie_embeddings=maybe"),
        r"model\.tie_embeddings: must be true or false, got 'maybe'",
    ),
    Case(
        "attention heads a string",
        train("model.attention.n_heads=two"),
        r"model\.attention\.n_heads: must be an integer or null, got 'two'",
    ),
    Case(
        "mamba2 d_state a float",
        train("model.mamba2.d_state=1.5"),
        r"model\.mamba2\.d_state: must be an integer, got 1\.5",
    ),
    Case(
        "dt_limit of one number",
        train("model.mamba2.dt_limit=[0.1]"),
        r"model\.mamba2\.dt_limit: must be a list of 2 numbers, got \[0\.1\]",
    ),
    Case(
        "an infinite init_std",
        train("model.init_std=.inf"),
        r"model\.init_std: must be a finite number, got inf",
    ),
    Case(
        "an infinite learning rate",
        train("optim.lr=.inf"),
        r"optim\.lr: input should be a finite number",
    ),
    Case(
        "a NaN weight decay",
        train("optim.weight_decay=.nan"),
        r"optim\.weight_decay: input should be a finite number",
    ),
    Case("unknown recipe key", train("optim.learning_rate=1"), r"optim\.learning_rate"),
    Case(
        "unknown model option",
        train("model.mamba2.dstate=8"),
        r"model\.mamba2\.dstate: unknown option; did you mean 'd_state'\?",
    ),
    Case("unknown pattern symbol", train("model.pattern=MQ-"), r"model\.pattern"),
    Case(
        "run name escaping output_dir",
        train("name=../escaped"),
        r"name: must be one directory name inside output_dir",
    ),
    Case(
        "absolute run name",
        lambda tmp: train(f"name={tmp / 'abs'}")(tmp),
        r"name: must be one directory name inside output_dir",
    ),
    Case(
        "output_dir a file",
        lambda tmp: ["train", str(QUICKSTART), f"output_dir={a_file(tmp)}", "--no-progress"],
        r"output_dir: .*afile/quickstart: its parent .*afile is a file, not a directory",
    ),
    Case("resume without a run", train("--resume"), r"last\.ckpt: no checkpoint to resume from"),
    Case(
        "a model too large for memory",
        train("model.d_model=1000000"),
        r"model \(d_model 1000000, vocab_size 257\): training .*: needs about .* free on cpu",
    ),
    Case(
        "a vocabulary too large for memory",
        train("model.vocab_size=1000000000"),
        r"model \(d_model 192, vocab_size 1000000000\): training .* free on cpu",
    ),
    # Model directories and hybrid generate.
    Case("checkpoint missing", lambda tmp: generate(tmp, tmp / "missing"), r"missing"),
    Case(
        "config.json not JSON",
        lambda tmp: generate(
            tmp, (d := tiny_model(tmp), (d / "config.json").write_text("{"), d)[2]
        ),
        r"config\.json: not valid JSON",
    ),
    Case(
        "layer_overrides a list in config.json",
        lambda tmp: generate(tmp, tiny_model(tmp, layer_overrides=[1])),
        r"config\.json: layer_overrides: must map sublayer indices to options, got list",
    ),
    Case(
        "a string d_model in config.json",
        lambda tmp: generate(tmp, tiny_model(tmp, d_model="32")),
        r"config\.json: d_model: must be an integer, got '32'",
    ),
    Case(
        "tokenizer.json not JSON",
        lambda tmp: generate(tmp, model_with_tokenizer(tmp, b"{not json")),
        r"tokenizer\.json: not a tokenizers tokenizer\.json",
    ),
    Case(
        "tokenizer.json empty",
        lambda tmp: generate(tmp, model_with_tokenizer(tmp, b"")),
        r"tokenizer\.json: not a tokenizers tokenizer\.json",
    ),
    Case(
        "a CUDA device without CUDA",
        lambda tmp: generate(tmp, tiny_model(tmp), "--device", "cuda"),
        r"--device: cuda requested but CUDA is not available",
    ),
    Case(
        "a device that is none",
        lambda tmp: generate(tmp, tiny_model(tmp), "--device", "gpu0"),
        r"--device: 'gpu0' is not a device",
    ),
    Case(
        "more new tokens than memory holds",
        lambda tmp: generate(tmp, tiny_model(tmp), "--max-new-tokens", "3000000000"),
        r"inference cache of 1 x 3000000002 tokens: needs about .* free on cpu",
    ),
    Case(
        "an empty prompt",
        lambda tmp: ["generate", "--checkpoint", str(tiny_model(tmp)), "--prompt", ""],
        r"--prompt: empty after tokenization",
    ),
    # hybrid convert.
    Case(
        "convert --out a file",
        lambda tmp: [
            "convert",
            "--to-hf",
            str(tiny_model(tmp)),
            "--model-type",
            "bamba",
            "--out",
            str(a_file(tmp)),
        ],
        r"--out: .*afile: it is a file, not a directory",
    ),
    Case(
        "convert --out under a file",
        lambda tmp: [
            "convert",
            "--to-hf",
            str(tiny_model(tmp)),
            "--model-type",
            "bamba",
            "--out",
            str(a_file(tmp) / "x"),
        ],
        r"--out: .*afile/x: its parent .*afile is a file, not a directory",
    ),
    Case(
        "convert to a type that cannot hold the model",
        lambda tmp: [
            "convert",
            "--to-hf",
            str(tiny_model(tmp)),
            "--model-type",
            "bamba",
            "--out",
            str(tmp / "out"),
        ],
        r"bamba: cannot express pattern 'M\*-'",
    ),
    Case(
        "convert to an unknown type",
        lambda tmp: [
            "convert",
            "--to-hf",
            str(tiny_model(tmp)),
            "--model-type",
            "gpt9",
            "--out",
            str(tmp / "out"),
        ],
        r"model_type 'gpt9' is not supported",
    ),
    Case(
        "convert --to-hf without a type",
        lambda tmp: ["convert", "--to-hf", str(tiny_model(tmp)), "--out", str(tmp / "out")],
        r"--model-type: required with --to-hf",
    ),
    Case(
        "from_hf: a string hidden_size",
        lambda tmp: [
            "convert",
            "--from-hf",
            str(hf_dir(tmp, hidden_size="32")),
            "--out",
            str(tmp / "out"),
        ],
        r"hf/config\.json: hidden_size: must be a number .*, got '32'",
    ),
    Case(
        "from_hf: a string eps",
        lambda tmp: [
            "convert",
            "--from-hf",
            str(hf_dir(tmp, rms_norm_eps="1e-5")),
            "--out",
            str(tmp / "out"),
        ],
        r"hf/config\.json: rms_norm_eps: must be a number .*, got '1e-5'",
    ),
    Case(
        "from_hf: a number where a string belongs",
        lambda tmp: [
            "convert",
            "--from-hf",
            str(hf_dir(tmp, hidden_act=3)),
            "--out",
            str(tmp / "out"),
        ],
        r"hf/config\.json: hidden_act: must be a string .*, got 3",
    ),
    Case(
        "from_hf: an unknown model type",
        lambda tmp: [
            "convert",
            "--from-hf",
            str(hf_dir(tmp, model_type="gpt9")),
            "--out",
            str(tmp / "out"),
        ],
        r"model_type 'gpt9' is not supported",
    ),
    Case(
        "from_hf: config.json a list",
        lambda tmp: [
            "convert",
            "--from-hf",
            str((d := hf_dir(tmp), (d / "config.json").write_text("[]"), d)[2]),
            "--out",
            str(tmp / "out"),
        ],
        r"hf/config\.json: expected a JSON object",
    ),
    Case(
        "from_hf: an index that is not JSON",
        lambda tmp: [
            "convert",
            "--from-hf",
            str(sharded_hf_dir(tmp, "{bad")),
            "--out",
            str(tmp / "out"),
        ],
        r"model\.safetensors\.index\.json: not a JSON index of shards",
    ),
    Case(
        "from_hf: an index without weight_map",
        lambda tmp: [
            "convert",
            "--from-hf",
            str(sharded_hf_dir(tmp, "{}")),
            "--out",
            str(tmp / "out"),
        ],
        r"model\.safetensors\.index\.json: no weight_map",
    ),
    Case(
        "from_hf: not a directory",
        lambda tmp: ["convert", "--from-hf", str(tmp / "nothing"), "--out", str(tmp / "out")],
        r"nothing: no such directory",
    ),
    # hybrid info.
    Case(
        "info: a zero context",
        lambda tmp: ["info", "M*-", "--context", "0"],
        r"--context: must be a positive integer",
    ),
    Case("info: a string vocab", lambda tmp: ["info", "M*-", "vocab_size=many"], r"vocab_size"),
    # hybrid eval.
    Case(
        "eval --out a file (checked before the evaluation)",
        lambda tmp: [
            "eval",
            "mqar",
            "--checkpoint",
            str(tiny_model(tmp)),
            "--examples",
            "2",
            "--seq-lens",
            "64",
            "--kv-pairs",
            "2",
            "--out",
            str(a_file(tmp)),
            "--no-progress",
        ],
        r"--out: .*afile: it is a file, not a directory",
    ),
    Case("eval an unknown task", lambda tmp: ["eval", "nosuchtask"], r"nosuchtask"),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime in ns)."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_user_error_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written by accident lands where it is seen
    argv = case.setup(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert re.search(r"^hybrid [a-z ]+: error: ", lines[0]), lines[0]
    assert re.search(case.message, lines[0]), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(tmp_path) == before


def test_the_catalogue_is_at_least_50_cases():
    assert len(CASES) >= 50
    assert len({case.name for case in CASES}) == len(CASES)


def test_a_checkpoints_modules_are_imported_only_when_trusted(tmp_path, monkeypatch, capsys):
    """The module writes a file when imported: without --trust-remote-code it never runs."""
    (tmp_path / "lab_blocks_for_trust_test.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('ran')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tiny_model(tmp_path, modules=["lab_blocks_for_trust_test"])
    ran = tmp_path / "lab_blocks_for_trust_test.ran"
    argv = ["generate", "--checkpoint", str(model), "--prompt", "x", "--max-new-tokens", "2"]
    assert main(argv) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not ran.exists()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_model(model)
    assert not ran.exists()
    assert main([*argv, "--trust-remote-code"]) == 0
    assert ran.exists()
    ran.unlink()
    load_model(model)  # imported now: loading again runs nothing new and needs no flag
    assert not ran.exists()


@pytest.mark.parametrize(
    "name", ["init_std a string", "tokenizer.json not JSON", "convert --out a file"]
)
def test_the_installed_command_exits_2_without_a_traceback(name, tmp_path):
    case = next(case for case in CASES if case.name == name)
    argv = case.setup(tmp_path)
    before = snapshot(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "hybrid.cli", *argv],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert re.search(case.message, done.stderr), done.stderr
    assert snapshot(tmp_path) == before

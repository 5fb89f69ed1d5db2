"""``--quantize`` / ``--kv-dtype`` / ``--state-dtype`` on ``hybrid generate`` and
``hybrid eval``, ``hybrid info --kv-dtype``, and their one-line errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("torchao")

from hybrid import HybridConfig, HybridLM
from hybrid.accounting import describe
from hybrid.checkpoint import save_pretrained
from hybrid.cli import main
from hybrid.quantize import quantize
from hybrid.tokenizer import ByteTokenizer

CONFIG = {
    "pattern": ["M", {"block": "attention", "window": 8}, "*", "E"],
    "vocab_size": 256,
    "d_model": 32,
    "mamba2": {"d_state": 8, "headdim": 8},
    "attention": {"n_heads": 2},
    "moe": {"n_experts": 4, "expert_hidden_size": 32},
}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**CONFIG)).eval()
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_generate_quantized_is_the_quantized_models_greedy_output(checkpoint, capsys, scheme):
    model, path = checkpoint
    prompt = "def f(x):"
    code = main(["generate", "--checkpoint", str(path), "--prompt", prompt,
                 "--max-new-tokens", "10", "--temperature", "0", "--quantize", scheme,
                 "--kv-dtype", "int8", "--state-dtype", "bfloat16"])  # fmt: skip
    assert code == 0
    quantized = copy.deepcopy(model)
    quantize(quantized, scheme)
    quantized.cache_precision = type(model.cache_precision).of(
        kv_dtype="int8", state_dtype="bfloat16"
    )
    ids = torch.tensor([ByteTokenizer().encode(prompt)])
    decoder = ByteTokenizer().decoder()  # what the command prints with
    expected = "".join(decoder.feed(t) for t in quantized.generate(ids, 10)[0, ids.shape[1] :])
    assert capsys.readouterr().out == prompt + expected + "\n"


def test_eval_records_the_precision(checkpoint, tmp_path):
    _, path = checkpoint
    out = tmp_path / "ppl"
    code = main(["eval", "ppl", "--checkpoint", str(path), "--quantize", "int4",
                 "--group-size", "16", "--kv-dtype", "int8", "--train-length", "32",
                 "--multiples", "1", "2", "--samples", "2", "--no-progress",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["precision"] == {
        "quantize": "int4", "group_size": 16, "kv_dtype": "int8", "state_dtype": None
    }  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantize", "int3"], "argument --quantize: invalid choice: 'int3' (choose from"),
        (["--quantize", "int4", "--group-size", "24"], "--group-size: 24 does not divide the"),
        (["--group-size", "32"], "--group-size: only with --quantize int4"),
        (["--quantize", "int8", "--group-size", "32"], "--group-size: int8 uses one scale"),
        (["--kv-dtype", "int4"], "argument --kv-dtype: invalid choice: 'int4'"),
        (["--state-dtype", "int8"], "argument --state-dtype: invalid choice: 'int8'"),
    ],
)
def test_bad_precision_options_are_one_line(checkpoint, capsys, extra, message):
    _, path = checkpoint
    try:
        code = main(["generate", "--checkpoint", str(path), "--prompt", "x", *extra])
    except SystemExit as exit:  # argparse's own checks exit from the parser
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err


def test_info_kv_dtype_shows_the_allocated_bytes(capsys):
    config = HybridConfig(**CONFIG)
    int8 = describe(config, 4096, torch.bfloat16, kv_dtype="int8")
    bf16 = describe(config, 4096, torch.bfloat16)
    # The default accounting (a formula per block) and an allocation on the meta device agree.
    assert (
        describe(config, 4096, torch.bfloat16, kv_dtype="bfloat16").cache_bytes == bf16.cache_bytes
    )
    head_dim, slots = 16, 4096 + 8  # full attention + the window-8 ring
    saved = 2 * slots * (2 * head_dim - (head_dim + 2))  # per kv head: 2 bf16 bytes -> int8 + scale
    assert bf16.cache_bytes - int8.cache_bytes == saved * 2  # two kv heads
    assert main(["info", "M*", "--d-model", "32", "--context", "4096", "--kv-dtype", "int8",
                 "--state-dtype", "bfloat16", "attention.n_heads=2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "KV in int8 (+ scales), conv state in bfloat16, SSM state in bfloat16" in out

"""Checkpoint directories and `hybrid generate` on a randomly initialised saved model."""

import json

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.checkpoint import load_pretrained, save_pretrained
from hybrid.cli import main
from hybrid.tokenizer import ByteTokenizer

CONFIG = {
    "pattern": ["M", {"block": "attention", "window": 8}, "S", "E"],
    "vocab_size": 256,
    "d_model": 32,
    "mamba2": {"d_state": 8, "headdim": 8},
    "attention": {"n_heads": 2},
    "moe": {"n_experts": 4, "expert_hidden_size": 16},
    "tie_embeddings": True,
}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**CONFIG)).eval()
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_save_and_load_round_trip(checkpoint):
    model, path = checkpoint
    loaded = load_pretrained(path)
    ids = torch.randint(0, 256, (2, 11))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight is loaded.embedding.weight
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


def test_generate_streams_the_models_tokens(checkpoint, capsys):
    model, path = checkpoint
    prompt = "def scale(values, factor):"
    code = main(["generate", "--checkpoint", str(path), "--prompt", prompt,
                 "--max-new-tokens", "12", "--temperature", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    ids = torch.tensor([ByteTokenizer().encode(prompt)])
    expected = model.generate(ids, 12)[0, ids.shape[1] :].tolist()
    assert out == prompt + bytes(expected).decode("utf-8", errors="replace") + "\n"


def test_generate_compile_gives_the_same_tokens_and_says_it_compiles(checkpoint, capsys):
    import hybrid.model

    model, path = checkpoint
    hybrid.model._announced = False
    prompt = "x = ["
    argv = ["generate", "--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "6",
            "--temperature", "0"]  # fmt: skip
    assert main([*argv, "--compile"]) == 0
    captured = capsys.readouterr()
    ids = torch.tensor([ByteTokenizer().encode(prompt)])
    expected = model.generate(ids, 6)[0, ids.shape[1] :].tolist()
    assert captured.out == prompt + bytes(expected).decode("utf-8", errors="replace") + "\n"
    assert "compiling the decode step with torch.compile" in captured.err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such checkpoint directory"),
        ("no_weights", "missing model.safetensors"),
        ("bad_json", "config.json: not valid JSON"),
        ("bad_config", "config.json: d_model: must be a positive integer"),
        ("corrupt", "model.safetensors: not a readable safetensors file"),
        ("other_shapes", "weights do not match config.json"),
    ],
)
def test_bad_checkpoints_exit_2_with_one_line(checkpoint, setup, message, capsys):
    _, path = checkpoint
    if setup == "missing":
        path = path.parent / "nope"
    elif setup == "no_weights":
        (path / "model.safetensors").unlink()
    elif setup == "bad_json":
        (path / "config.json").write_text("{not json")
    elif setup == "bad_config":
        (path / "config.json").write_text(json.dumps({**CONFIG, "d_model": 0}))
    elif setup == "corrupt":
        (path / "model.safetensors").write_bytes(b"garbage")
    elif setup == "other_shapes":
        (path / "config.json").write_text(json.dumps({**CONFIG, "d_model": 64}))
    code = main(["generate", "--checkpoint", str(path), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_generate_rejects_bad_sampling_arguments(checkpoint, capsys):
    _, path = checkpoint
    code = main(["generate", "--checkpoint", str(path), "--prompt", "x", "--top-p", "0"])
    assert code == 2 and "top_p: must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("offset_from_end", [1, 1000])
def test_a_flipped_bit_in_the_weights_fails_loading(checkpoint, offset_from_end):
    _, path = checkpoint
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    assert len(data) - offset_from_end >= 8 + int.from_bytes(data[:8], "little")
    data[len(data) - offset_from_end] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor data do not match their "
                                         "checksum"):  # fmt: skip
        load_pretrained(path)

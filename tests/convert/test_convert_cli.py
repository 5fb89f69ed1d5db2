"""`hybrid convert` both ways and `hybrid generate` on a transformers directory with a
tokenizer.json (a tiny BPE trained here on the standard library's own source)."""

import inspect
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from hybrid.checkpoint import load_model, load_pretrained  # noqa: E402
from hybrid.cli import main  # noqa: E402
from hybrid.tokenizer import load_tokenizer  # noqa: E402
from tests.hf_models import llama_config  # noqa: E402


@pytest.fixture
def hf_directory(tmp_path):
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([inspect.getsource(json)], trainer)
    torch.manual_seed(0)
    config = llama_config(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path / "llama"
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return model, directory


def test_generate_on_a_transformers_directory(hf_directory, capsys):
    model, directory = hf_directory
    prompt = "def dumps(obj):"
    code = main(["generate", "--checkpoint", str(directory), "--prompt", prompt,
                 "--max-new-tokens", "10", "--temperature", "0"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    tokenizer = load_tokenizer(directory)
    ids = torch.tensor([tokenizer.encode(prompt)])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                              min_new_tokens=10, do_sample=False, pad_token_id=0)  # fmt: skip
    decoder = tokenizer.decoder()
    text = "".join(decoder.feed(t) for t in expected[0, ids.shape[1] :].tolist())
    assert out == prompt + text + "\n"


def test_convert_both_ways(hf_directory, tmp_path, capsys):
    model, directory = hf_directory
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert main(["convert", "--from-hf", str(directory), "--out", str(ours)]) == 0
    assert (ours / "tokenizer.json").is_file()
    assert main(["convert", "--to-hf", str(ours), "--model-type", "llama", "--out", str(back)]) == 0
    reloaded = transformers.LlamaForCausalLM.from_pretrained(back).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
        torch.testing.assert_close(load_pretrained(ours)(ids).logits, model(ids).logits)
        torch.testing.assert_close(load_model(directory)(ids).logits, model(ids).logits)


def test_convert_to_hf_reads_a_run_directory(hf_directory, tmp_path, capsys):
    """``--to-hf`` takes what ``generate --checkpoint`` takes: here a run directory, whose
    exported ``model/`` (with its tokenizer) is written out."""
    model, directory = hf_directory
    run, back = tmp_path / "run", tmp_path / "back"
    assert main(["convert", "--from-hf", str(directory), "--out", str(run / "model")]) == 0
    assert main(["convert", "--to-hf", str(run), "--model-type", "llama", "--out", str(back)]) == 0
    assert (back / "tokenizer.json").read_text() == (directory / "tokenizer.json").read_text()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(back).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_convert_errors_are_one_line(hf_directory, tmp_path, capsys):
    _, directory = hf_directory
    ours = tmp_path / "ours"
    main(["convert", "--from-hf", str(directory), "--out", str(ours)])
    capsys.readouterr()
    code = main(["convert", "--to-hf", str(ours), "--model-type", "gpt2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "model_type 'gpt2' is not supported" in err and err.count("\n") == 1
    code = main(["convert", "--to-hf", str(ours), "--model-type", "mamba2", "--out", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err.count("\n") == 1
    code = main(["convert", "--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert code == 2 and "no such directory" in capsys.readouterr().err

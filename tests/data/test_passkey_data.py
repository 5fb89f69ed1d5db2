"""Passkey retrieval as a training source (``data.source.format: passkey``)."""

from __future__ import annotations

import re

import pytest
import torch

from hybrid.data.errors import DataError
from hybrid.data.synthetic import PasskeyDataModule, PasskeyExamples
from hybrid.labels import IGNORE_INDEX
from hybrid.recipe import DataConfig, TokenizerConfig
from hybrid.synthetic.haystack import fixed_tokens
from hybrid.synthetic.mqar import TEST_STREAM, TRAIN_STREAM
from hybrid.synthetic.passkey import (
    QUESTION,
    TASK_DESCRIPTION,
    needle,
    passkey_example,
    passkey_prompt,
)
from hybrid.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()


def text(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8")


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_an_example_is_the_evaluation_prompt_then_its_answer(depth):
    inputs, targets, answer = passkey_example(BYTES, 400, 12345, depth)
    assert len(inputs) == len(targets) == 400 and answer == len(" 12345.")
    assert inputs[1:] == targets[:-1]
    # the same prompt `hybrid eval passkey` asks at this length, then the answer
    prompt = passkey_prompt(BYTES, 400 + 1 - answer, depth, 12345)
    assert inputs[: len(prompt.ids)] == prompt.ids
    assert text(targets).endswith(QUESTION + " 12345.")
    assert text(targets[-answer:]) == " 12345."


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_a_shorter_prompt_follows_another_document(fraction):
    inputs, targets, answer = passkey_example(BYTES, 400, 12345, 0.5, fraction)
    ids = inputs + targets[-1:]
    eos = ids.index(BYTES.eos_id)
    assert ids.count(BYTES.eos_id) == 1 and text(ids[:eos]).startswith(" The grass is green.")
    # after the end-of-document id: the evaluation prompt of the remaining length, the answer
    length = len(ids) - eos - 1 - answer
    assert ids[eos + 1 : eos + 1 + length] == passkey_prompt(BYTES, length, 0.5, 12345).ids
    shortest = fixed_tokens(BYTES, TASK_DESCRIPTION + "\n", [needle(12345)], "\n" + QUESTION)
    room = 400 + 1 - answer
    assert length == shortest + round(fraction * (room - shortest))
    assert text(ids[-answer:]) == " 12345."


def test_examples_are_seeded_labelled_on_the_answer_and_streams_differ():
    train = PasskeyExamples(BYTES, 600, 50, seed=7, stream=TRAIN_STREAM)
    again = PasskeyExamples(BYTES, 600, 50, seed=7, stream=TRAIN_STREAM)
    test = PasskeyExamples(BYTES, 600, 50, seed=7, stream=TEST_STREAM)
    keys, starts, lengths = set(), [], []
    for index in range(50):
        inputs, labels = train[index]
        assert inputs.shape == labels.shape == (600,) and inputs.dtype == torch.int64
        assert torch.equal(inputs, again[index][0])
        answer = labels[labels != IGNORE_INDEX]
        assert (labels[:-7] == IGNORE_INDEX).all() and len(answer) == 7
        prompt = inputs[inputs.tolist().index(256) + 1 :] if 256 in inputs else inputs
        key = re.search(r"pass key is (\d{5})\.", text(prompt)).group(1)
        assert text(answer) == f" {key}."  # the label is the hidden key
        keys.add(key)
        starts.append(text(prompt).index("The pass key is"))
        lengths.append(len(prompt))
    # keys vary; needles spread over the filler, prompt lengths over the room (~250-594)
    assert len(keys) == 50 and max(starts) - min(starts) > 150
    assert min(lengths) < 300 and max(lengths) > 550
    assert not torch.equal(train[0][0], test[0][0])
    everything = PasskeyExamples(BYTES, 300, 5, seed=7, stream=TRAIN_STREAM, supervise="all")
    inputs, labels = everything[0]
    assert torch.equal(inputs[1:], labels[:-1]) and (labels != IGNORE_INDEX).all()
    with pytest.raises(IndexError):
        train[50]


def test_data_module_errors_name_the_field(tmp_path):
    data = DataConfig.model_validate({"source": {"format": "passkey"}, "seq_len": 64})
    module = PasskeyDataModule(
        data, TokenizerConfig(), seed=0, micro_batch_size=2, grad_accum=1, run_dir=tmp_path
    )
    with pytest.raises(DataError, match=r"^data\.seq_len: 64 is too short .* needs \d+ tokens"):
        module.prepare()


def test_training_on_passkey_logs_accuracy_and_evaluates(tmp_path, capsys):
    import json

    from hybrid.cli import main
    from hybrid.recipe import validate_recipe
    from hybrid.train.run import train
    from tests.train.runs import read_metrics

    recipe = validate_recipe(
        {
            "name": "passkey", "output_dir": str(tmp_path),
            "model": {"pattern": "M-*-", "d_model": 32, "attention": {"n_heads": 2, "window": 64},
                      "mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 64}},
            "data": {"source": {"format": "passkey"}, "seq_len": 320,
                     "passkey": {"train_examples": 64, "val_examples": 8}},
            "trainer": {"max_steps": 3, "micro_batch_size": 4, "val_every": 3, "log_every": 1},
            "logging": {"wandb": False}, "eval": {"max_new_tokens": 0},
        }
    )  # fmt: skip
    result = train(recipe, progress_bar=False)
    assert result.steps == 3 and 0 < result.unigram_val_loss < 3
    accuracies = [r["val/accuracy"] for r in read_metrics(recipe.run_dir) if "val/accuracy" in r]
    assert accuracies and all(0 <= a <= 1 for a in accuracies)
    # the run evaluates beyond its training length with the same prompt format
    code = main(["eval", "passkey", "--checkpoint", str(recipe.run_dir), "--lengths", "320",
                 "640", "--depths", "0.5", "--trials", "1", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((recipe.run_dir / "eval" / "passkey" / "results.json").read_text())
    assert [row["length"] for row in results["rows"]] == [320, 640]

"""Passkey scoring: a decoder that is right on known items gives exactly that accuracy."""

from __future__ import annotations

import re

import pytest
import torch

from hybrid.eval import inference, passkey
from hybrid.tokenizer import ByteTokenizer


@pytest.mark.parametrize(
    ("text", "key", "correct"),
    [
        (" 12345. Remember", 12345, True),
        ("12345", 12345, True),
        (" 1234", 12345, False),
        (" 123456", 12345, False),
        (" 54321 12345", 12345, False),
        ("", 12345, False),
    ],
)
def test_score_takes_the_first_number(text, key, correct):
    assert passkey.score(text, key) is correct


def fake_decoder(calls):
    """Answers the key (read from the prompt) when less filler precedes the needle than
    follows it, a wrong key otherwise; records (prompt lengths, max_new_tokens)."""

    def decode(model, prompts, max_new_tokens, *, chunk_size):
        calls.append(([len(p) for p in prompts], max_new_tokens, chunk_size))
        answers = []
        for prompt in prompts:
            text = bytes(prompt).decode()
            needle = re.search(r" The pass key is (\d+)\. .*? is the pass key\.", text)
            haystack = text[text.index("\n") + 1 : text.rindex("\n")]
            before = haystack.index(needle.group())
            right = before < len(haystack) - len(needle.group()) - before
            key = needle.group(1)
            answers.append(list(f" {key if right else 99999}.".encode()))
        return answers

    return decode


def test_accuracy_counts_exactly_the_right_answers(monkeypatch, tiny_model):
    calls = []
    monkeypatch.setattr(inference, "greedy_continuations", fake_decoder(calls))
    results = passkey.run_passkey(
        tiny_model, ByteTokenizer(), lengths=[1024, 512], depths=[0.0, 0.25, 0.75, 1.0],
        trials=3, seed=7, batch_size=5, chunk_size=64,
    )  # fmt: skip
    cells = {(r["length"], r["depth"]): r for r in results["rows"]}
    assert sorted(cells) == [(n, d) for n in (512, 1024) for d in (0.0, 0.25, 0.75, 1.0)]
    for (_, depth), row in cells.items():
        assert row["trials"] == 3
        assert row["accuracy"] == (1.0 if depth < 0.5 else 0.0)
    assert results["accuracy"] == 0.5
    # every prompt had its exact length; batches of 5, answers of 5 digits + margin
    lengths = [n for batch, _, _ in calls for n in batch]
    assert lengths == [512] * 12 + [1024] * 12
    assert [len(batch) for batch, _, _ in calls] == [5, 5, 5, 5, 4]
    assert {new for _, new, _ in calls} == {6 + passkey.ANSWER_MARGIN}
    assert {chunk for _, _, chunk in calls} == {64}
    keys = [s["key"] for s in results["samples"]]
    assert all(10000 <= k <= 99999 for k in keys) and len(set(keys)) > 20
    again = passkey.run_passkey(tiny_model, ByteTokenizer(), [1024, 512], [0.0, 0.25, 0.75, 1.0],
                                3, seed=7)  # fmt: skip
    assert [s["key"] for s in again["samples"]] == keys  # seeded


def test_a_real_model_runs_end_to_end(tiny_model):
    results = passkey.run_passkey(tiny_model, ByteTokenizer(), [300], [0.5], trials=2,
                                  chunk_size=64)  # fmt: skip
    (row,) = results["rows"]
    assert row["trials"] == 2 and 0.0 <= row["accuracy"] <= 1.0
    assert all(isinstance(s["output"], str) for s in results["samples"])


def test_greedy_continuations_of_padded_batches_equal_single_prompts(tiny_model):
    torch.manual_seed(1)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (37, 20, 5)]
    batched = inference.greedy_continuations(tiny_model, prompts, 6, chunk_size=8)
    for prompt, got in zip(prompts, batched, strict=True):
        alone = tiny_model.generate(torch.tensor([prompt]), 6)[0, len(prompt) :].tolist()
        assert got == alone


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depths": [0.5, 1.01]}, r"depths: 1.01 is outside \[0, 1\]"),
        ({"depths": [-0.1]}, r"depths: -0.1 is outside \[0, 1\]"),
        ({"lengths": [0]}, "lengths: must be positive integers"),
        ({"lengths": [100]}, "lengths: 100 tokens is too short for the passkey prompt"),
        ({"lengths": [512], "max_context": 500}, "exceeds the maximum context of 500"),
        ({"trials": 0}, "trials: must be positive"),
    ],
)
def test_bad_arguments_fail_before_any_model_work(monkeypatch, tiny_model, kwargs, message):
    monkeypatch.setattr(inference, "greedy_continuations", None)  # never reached
    arguments = {"lengths": [256], "depths": [0.5], "trials": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        passkey.run_passkey(tiny_model, ByteTokenizer(), **arguments)

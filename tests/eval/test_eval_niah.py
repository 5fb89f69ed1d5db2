"""RULER-style needles: the prompts hold what the question asks (solved here from the text
alone), and scoring counts exactly the right answers."""

from __future__ import annotations

import random
import re
from itertools import pairwise

import pytest

from hybrid.eval import inference, niah
from hybrid.synthetic.haystack import build_prompt
from hybrid.tokenizer import ByteTokenizer


def solve(text: str) -> list[str]:
    """The expected answers, read from the prompt text alone."""
    if "VAR " in text:
        value = re.search(r"assigned the value (\d+) in the text", text).group(1)
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})\.", text))
        names = []
        for name in assigned:  # in order of appearance: a chain is written in order
            source = assigned[name]
            while source.startswith("VAR "):
                source = assigned[source[4:]]
            if source == value:
                names.append(name)
        return names
    asked = re.search(r"magic numbers for (.+?) mentioned in the provided text\?", text).group(1)
    keys = re.split(r", and |, ", asked)
    found = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", text)
    return [value for key in keys for k, value in found if k == key]


def fake_decoder(model, prompts, max_new_tokens, *, chunk_size):
    """Right (in reverse order) for even-length prompts; for odd ones, the first answer
    replaced by a wrong one."""
    outputs = []
    for prompt in prompts:
        answers = solve(bytes(prompt).decode())[::-1]
        if len(prompt) % 2:
            answers[-1] = "0000000" if answers[-1].isdigit() else "QQQQQ"
        outputs.append(list((" " + ", ".join(answers) + ".").encode()))
    return outputs


def test_prompts_hold_the_answers_and_scoring_counts_them(monkeypatch, tiny_model):
    monkeypatch.setattr(inference, "greedy_continuations", fake_decoder)
    options = niah.Options(distractors=2, values=3, queries=2, chains=2, hops=2)
    results = niah.run_niah(tiny_model, ByteTokenizer(), lengths=[801, 1000], samples=3, seed=4,
                            options=options, batch_size=4)  # fmt: skip
    sizes = {"single": 1, "multikey": 1, "multivalue": 3, "multiquery": 2, "vt": 3}
    for sample in results["samples"]:
        assert len(sample["answers"]) == sizes[sample["variant"]]
        assert len(sample["needle_depths"]) == {"multikey": 3, "multivalue": 3, "multiquery": 2,
                                                "vt": 6}.get(sample["variant"], 1)  # fmt: skip
    for row in results["rows"]:
        k = sizes[row["variant"]]
        right = row["length"] % 2 == 0
        assert row["samples"] == 3
        assert row["accuracy"] == (1.0 if right else 0.0)
        assert row["recall"] == pytest.approx(1.0 if right else (k - 1) / k)
    assert results["accuracy"] == dict.fromkeys(niah.VARIANTS, 0.5)


@pytest.mark.parametrize(
    ("text", "answers", "exact", "recall"),
    [
        (" 111, 222.", ["222", "111"], True, 1.0),
        (" 111, 333, 222", ["222", "111"], False, 0.5),
        (" 111.", ["111", "222"], False, 0.5),
        (" ABCDE, FGHIJ and VAR", ["FGHIJ", "ABCDE"], True, 1.0),
    ],
)
def test_score(text, answers, exact, recall):
    pattern = niah.NAME if answers[0].isalpha() else niah.NUMBER
    assert niah.score(text, answers, pattern) == (exact, pytest.approx(recall))


def test_variable_tracking_assignments_come_after_their_source():
    tokenizer = ByteTokenizer()
    for seed in range(5):
        sample = niah.make_sample("vt", random.Random(seed), niah.Options(chains=3, hops=4))
        filler = niah.make_filler(tokenizer, "sentences", seed)
        prompt = build_prompt(tokenizer, 900, sample.prefix, sample.needles, sample.suffix, filler)
        text = bytes(prompt.ids).decode()
        for previous, name in pairwise(sample.answers):
            assert text.index(f"VAR {previous} =") < text.index(f"VAR {name} = VAR {previous}.")


def test_bad_arguments(tiny_model):
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match="variants: unknown variant 'needle'"):
        niah.run_niah(tiny_model, tokenizer, [1000], ["single", "needle"])
    with pytest.raises(ValueError, match="lengths: 300 tokens is too short for a single prompt"):
        niah.run_niah(tiny_model, tokenizer, [300], ["single"])
    with pytest.raises(ValueError, match="haystack: 'essay' is not one of repeat, sentences"):
        niah.run_niah(tiny_model, tokenizer, [1000], ["single"], haystack="essay")

"""Prompt assembly: exact token length, needles at the requested depth, special tokens once."""

from __future__ import annotations

import pytest

from hybrid.synthetic.haystack import PASSKEY_FILLER, build_prompt, generated_filler, passkey_filler
from hybrid.synthetic.passkey import QUESTION, TASK_DESCRIPTION, passkey_prompt
from hybrid.tokenizer import ByteTokenizer, train_bpe

LONGEST_SENTENCE = max(len(s) + 1 for s in PASSKEY_FILLER)  # bytes, with its leading space


def find(ids: list[int], needle: list[int]) -> list[int]:
    """Every start of ``needle`` in ``ids``."""
    return [i for i in range(len(ids) - len(needle) + 1) if ids[i : i + len(needle)] == needle]


@pytest.mark.parametrize("length", [300, 777, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_has_the_exact_length_and_the_needle_at_its_depth(length, depth):
    tokenizer = ByteTokenizer()
    prompt = passkey_prompt(tokenizer, length, depth, 12345)
    assert len(prompt.ids) == length
    text = bytes(prompt.ids).decode()
    assert text.startswith(TASK_DESCRIPTION + "\n") and text.endswith("\n" + QUESTION)
    needle = tokenizer.encode(" The pass key is 12345. Remember it. 12345 is the pass key.")
    (start,) = find(prompt.ids, needle)
    head = len(tokenizer.encode(TASK_DESCRIPTION + "\n"))
    filler = length - head - len(tokenizer.encode("\n" + QUESTION)) - len(needle)
    # the needle goes in at a sentence boundary: within half a sentence of the exact depth
    assert abs((start - head) / filler - depth) <= LONGEST_SENTENCE / 2 / filler + 1e-9
    # and relative to the whole prompt, off by at most the fixed text around the filler
    assert abs(start / length - depth) <= (length - filler) / length + LONGEST_SENTENCE / filler
    assert prompt.needle_starts == [start]
    assert prompt.depths[0] == pytest.approx((start - head) / filler)


def test_needles_at_the_same_depth_keep_their_order_and_all_fit():
    tokenizer = ByteTokenizer()
    needles = [(0.5, " first."), (0.5, " second."), (0.2, " early."), (1.0, " last.")]
    prompt = build_prompt(tokenizer, 500, "P\n", needles, "\nQ", passkey_filler(tokenizer))
    text = bytes(prompt.ids).decode()
    assert len(prompt.ids) == 500
    positions = [text.index(t) for _, t in needles]
    assert positions[2] < positions[0] < positions[1] < positions[3]
    assert text.endswith(" last.\nQ")


def test_a_bpe_tokenizer_gives_exact_lengths_too():
    corpus = [" ".join(PASSKEY_FILLER) * 20, "The pass key is 12345. Remember it." * 10]
    tokenizer = train_bpe(corpus, vocab_size=300, max_bytes=100_000)
    for length in (250, 401):
        prompt = passkey_prompt(tokenizer, length, 0.5, 54321)
        assert len(prompt.ids) == length
        assert "54321. Remember it." in tokenizer._tokenizer.decode(prompt.ids)


class BosTokenizer(ByteTokenizer):
    """Bytes shifted by one, with a BOS id 0 before every text (as Llama's tokenizer does)."""

    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return [0] + [b + 1 for b in text.encode("utf-8")]


def test_a_tokenizer_that_adds_bos_to_every_text_gets_one_bos():
    prompt = passkey_prompt(BosTokenizer(), 400, 0.3, 11111)
    assert len(prompt.ids) == 400
    assert prompt.ids[0] == 0 and 0 not in prompt.ids[1:]


def test_too_short_a_length_and_a_bad_depth_are_refused():
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match="length 100: too short for the prompt"):
        passkey_prompt(tokenizer, 100, 0.5, 12345)
    with pytest.raises(ValueError, match=r"depth 1.5: must be within \[0, 1\]"):
        passkey_prompt(tokenizer, 500, 1.5, 12345)


def test_generated_filler_is_seeded():
    tokenizer = ByteTokenizer()
    a, b, c = (generated_filler(tokenizer, seed) for seed in (1, 1, 2))
    assert a == b and a != c
    ids, boundaries = a.tokens(1000)
    assert len(ids) == 1000 and boundaries[0] == 0 and boundaries[-1] == 1000
    assert all(bytes(ids[s : s + 5]) == b" The " for s in boundaries[:-1])

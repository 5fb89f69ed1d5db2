"""Synthetic haystacks: filler sentences with needles at relative depths, assembled token by
token to an exact length.

A prompt is ``prefix + haystack + suffix``, where the haystack is filler sentences with the
needle sentences inserted. Every piece is tokenized on its own and the ids are concatenated,
so the prompt's length in tokens is exact for any tokenizer (the filler is cut to fill what the
other pieces leave). A needle goes in at the sentence boundary of the filler nearest to its
depth: ``depth = filler tokens before the needle / all filler tokens``, 0 right after the
prefix, 1 right before the suffix.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from hybrid.tokenizer import Tokenizer

PASSKEY_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
"""The filler of the passkey test (Landmark attention), repeated in this order."""

_ADJECTIVES = (
    "quiet", "bright", "old", "small", "heavy", "gentle", "distant", "warm", "silver", "narrow",
    "busy", "patient", "hidden", "round", "early", "simple",
)  # fmt: skip
_NOUNS = (
    "river", "garden", "window", "teacher", "village", "bridge", "market", "forest", "letter",
    "engine", "harbor", "painter", "kitchen", "mountain", "library", "lantern",
)  # fmt: skip
_VERBS = (
    "watches", "follows", "passes", "remembers", "finds", "crosses", "carries", "paints",
    "reaches", "visits",
)  # fmt: skip


@dataclass(frozen=True)
class Filler:
    """Filler sentences as token ids (each with its leading space), used in order, cycling."""

    sentences: tuple[tuple[int, ...], ...]

    def tokens(self, n_tokens: int) -> tuple[list[int], list[int]]:
        """The first ``n_tokens`` filler ids and the sentence boundaries among them.

        Returns (ids, boundaries): ids has ``n_tokens`` entries (the last sentence may be cut);
        boundaries are the positions in [0, n_tokens] where a sentence starts or the filler
        ends, ascending, always including 0 and ``n_tokens``.
        """
        ids: list[int] = []
        boundaries = [0]
        index = 0
        while len(ids) < n_tokens:
            ids.extend(self.sentences[index % len(self.sentences)])
            boundaries.append(len(ids))
            index += 1
        del ids[n_tokens:]
        boundaries = [b for b in boundaries if b < n_tokens] + [n_tokens]
        return ids, boundaries


@dataclass(frozen=True)
class Prompt:
    """An assembled prompt.

    Attributes:
        ids: the token ids, exactly the requested length.
        needle_starts: index in ``ids`` of each needle's first token (in the order given).
        depths: each needle's achieved depth (filler tokens before it / filler tokens).
        haystack_start: index in ``ids`` where the haystack begins (after the prefix).
        filler_tokens: filler tokens in the haystack (needles excluded).
    """

    ids: list[int]
    needle_starts: list[int]
    depths: list[float]
    haystack_start: int
    filler_tokens: int


def special_affixes(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds around every text (a BOS before, an EOS after), if any."""
    empty, probe = tokenizer.encode(""), tokenizer.encode("a")
    lead = 0
    while lead < min(len(empty), len(probe)) and empty[lead] == probe[lead]:
        lead += 1
    return empty[:lead], empty[lead:]


def encode_segment(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text``'s ids without the special ids the tokenizer adds to every text, so that
    separately encoded pieces can be concatenated."""
    ids = tokenizer.encode(text)
    lead, trail = special_affixes(tokenizer)
    if lead and ids[: len(lead)] == lead:
        ids = ids[len(lead) :]
    if trail and ids[len(ids) - len(trail) :] == trail:
        ids = ids[: len(ids) - len(trail)]
    return ids


def passkey_filler(tokenizer: Tokenizer) -> Filler:
    """The passkey test's five sentences, repeated."""
    return Filler(tuple(tuple(encode_segment(tokenizer, f" {s}")) for s in PASSKEY_FILLER))


def generated_filler(tokenizer: Tokenizer, seed: int, n_sentences: int = 64) -> Filler:
    """``n_sentences`` seeded random sentences ("The quiet river follows the old bridge."),
    for a haystack that does not repeat with a short period."""
    rng = random.Random(f"filler-{seed}")
    sentences = []
    for _ in range(n_sentences):
        text = (
            f" The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
            f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}."
        )
        sentences.append(tuple(encode_segment(tokenizer, text)))
    return Filler(tuple(sentences))


def fixed_tokens(tokenizer: Tokenizer, prefix: str, needles: Sequence[str], suffix: str) -> int:
    """Tokens a prompt spends outside the filler: the shortest prompt these pieces allow."""
    lead, _ = special_affixes(tokenizer)
    pieces = [prefix, *needles, suffix]
    return len(lead) + sum(len(encode_segment(tokenizer, piece)) for piece in pieces)


def build_prompt(
    tokenizer: Tokenizer,
    length: int,
    prefix: str,
    needles: Sequence[tuple[float, str]],
    suffix: str,
    filler: Filler,
) -> Prompt:
    """``prefix`` + filler with ``needles`` (depth, text) inserted + ``suffix``, exactly
    ``length`` tokens.

    Needles at the same boundary keep the order given (so a chain given in order of increasing
    depth stays in order). Needle texts should start with a space (they follow a sentence).

    Raises:
        ValueError: a depth outside [0, 1], or ``length`` too short for the fixed pieces.
    """
    for depth, _ in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth}: must be within [0, 1]")
    lead, _ = special_affixes(tokenizer)
    prefix_ids = lead + encode_segment(tokenizer, prefix)
    suffix_ids = encode_segment(tokenizer, suffix)
    needle_ids = [encode_segment(tokenizer, text) for _, text in needles]
    n_filler = length - len(prefix_ids) - len(suffix_ids) - sum(map(len, needle_ids))
    if n_filler < 0:
        minimum = length - n_filler
        raise ValueError(
            f"length {length}: too short for the prompt, which needs at least {minimum} tokens "
            "with this tokenizer"
        )
    filler, boundaries = filler.tokens(n_filler)
    # (insertion point in the filler, order given) for each needle
    points = sorted(
        (min(boundaries, key=lambda b: (abs(b - depth * n_filler), b)), index)
        for index, (depth, _) in enumerate(needles)
    )
    ids = list(prefix_ids)
    starts = [0] * len(needles)
    cursor = 0
    for point, index in points:
        ids.extend(filler[cursor:point])
        cursor = point
        starts[index] = len(ids)
        ids.extend(needle_ids[index])
    ids.extend(filler[cursor:])
    ids.extend(suffix_ids)
    achieved = [0.0] * len(needles)
    for point, index in points:
        achieved[index] = point / n_filler if n_filler else 0.0
    return Prompt(ids, starts, achieved, len(prefix_ids), n_filler)

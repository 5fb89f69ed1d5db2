"""Passkey-retrieval prompts (the Landmark-attention format): a 5-digit key hidden at a relative
depth in repeated filler, and the training sequences that end with its answer.

The prompt: the task description, the filler ("The grass is green. The sky is blue. ...")
with the needle "The pass key is N. Remember it. N is the pass key." at the requested depth,
then "What is the pass key? The pass key is". Its length in tokens (of the given tokenizer) is
exact. ``hybrid eval passkey`` (:mod:`hybrid.eval.passkey`) asks these prompts;
``data.source.format: passkey`` (:mod:`hybrid.data.synthetic`) trains on them.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from hybrid.synthetic.haystack import (
    Filler,
    Prompt,
    build_prompt,
    encode_segment,
    fixed_tokens,
    passkey_filler,
)

if TYPE_CHECKING:
    from hybrid.tokenizer import Tokenizer

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
QUESTION = "What is the pass key? The pass key is"
PREFIX, SUFFIX = TASK_DESCRIPTION + "\n", "\n" + QUESTION  # around the filler


def needle(key: int) -> str:
    """The needle sentence for ``key``."""
    return f" The pass key is {key}. Remember it. {key} is the pass key."


def passkey_key(seed: int, length: int, depth: float, trial: int) -> int:
    """The seeded random 5-digit key of one trial."""
    return random.Random(f"passkey-{seed}-{length}-{depth}-{trial}").randint(10000, 99999)


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, key: int) -> Prompt:
    """The prompt of exactly ``length`` tokens with ``key``'s needle at ``depth``."""
    return build_prompt(
        tokenizer, length, PREFIX, [(depth, needle(key))], SUFFIX, passkey_filler(tokenizer)
    )


def shortest_prompt(tokenizer: Tokenizer, key: int) -> int:
    """Tokens of ``key``'s prompt without any filler: the shortest length it can be asked at."""
    return fixed_tokens(tokenizer, PREFIX, [needle(key)], SUFFIX)


def passkey_example(
    tokenizer: Tokenizer,
    seq_len: int,
    key: int,
    depth: float,
    length_fraction: float = 1.0,
    filler: Filler | None = None,
) -> tuple[list[int], list[int], int]:
    """One training sequence: the passkey prompt, then the answer `` KEY.``.

    The prompt is exactly the one ``hybrid eval passkey`` asks, of a length between the shortest
    prompt (``length_fraction`` 0) and all the room the answer leaves (1). When it is shorter
    than that room, filler text ending with the end-of-document id comes first (another
    document, as in packed training data), so the question sits at varying positions. The
    sequence has ``seq_len + 1`` ids; the model reads the first ``seq_len`` (``inputs``) and
    predicts the next id at each position (``targets``).

    Returns:
        (inputs, targets, answer_tokens): two lists of ``seq_len`` ids; the answer is the last
        ``answer_tokens`` targets.

    Raises:
        ValueError: ``seq_len`` too short for the prompt and the answer.
    """
    answer = encode_segment(tokenizer, f" {key}.")
    room = seq_len + 1 - len(answer)
    shortest = shortest_prompt(tokenizer, key)
    if room < shortest:
        raise ValueError(
            f"seq_len: {seq_len} is too short for a passkey example, which needs "
            f"{shortest + len(answer) - 1} tokens with this tokenizer"
        )
    length = shortest + round(min(max(length_fraction, 0.0), 1.0) * (room - shortest))
    filler = passkey_filler(tokenizer) if filler is None else filler
    prompt = build_prompt(tokenizer, length, PREFIX, [(depth, needle(key))], SUFFIX, filler)
    lead = room - length
    before = filler.tokens(lead - 1)[0] + [tokenizer.eos_id] if lead else []
    ids = before + prompt.ids + answer
    return ids[:-1], ids[1:], len(answer)

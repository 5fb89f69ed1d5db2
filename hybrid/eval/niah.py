"""Needles in a haystack in the style of RULER, on synthetic haystacks: accuracy vs length.

Variants (RULER's templates; keys are word pairs such as ``amber-falcon``, values 7-digit
numbers, needles at seeded random depths):

- ``single``: one needle "One of the special magic numbers for KEY is: VALUE.", asked for KEY;
- ``multikey``: the same, plus distractor needles with other keys and values;
- ``multivalue``: one key with several values, all of which must be recalled;
- ``multiquery``: several keys, each with its value, all asked at once;
- ``vt`` (variable tracking): chains ``VAR X1 = 12345.``, ``VAR X2 = VAR X1.``, ... (one asked,
  the others distractors with other values); every variable of the asked chain must be named.

The haystack is the passkey filler repeated (``repeat``) or seeded generated sentences
(``sentences``). The continuation is decoded greedily; a sample is correct when the first k
answers of the expected kind in it (numbers; 5-letter upper-case names for ``vt``), k the
number expected, are exactly the expected ones in any order. ``recall`` counts the fraction of
expected answers among those k.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from hybrid.eval import inference
from hybrid.eval.progress import batches, progress_bar
from hybrid.synthetic.haystack import (
    Filler,
    build_prompt,
    encode_segment,
    fixed_tokens,
    generated_filler,
    passkey_filler,
)

if TYPE_CHECKING:
    from hybrid.model import HybridLM
    from hybrid.tokenizer import Tokenizer

VARIANTS = ("single", "multikey", "multivalue", "multiquery", "vt")
HAYSTACKS = ("repeat", "sentences")
DEFAULT_LENGTHS = [256, 512, 1024, 2048]
ANSWER_MARGIN = 4  # decoded tokens beyond the expected answer's own
NUMBER, NAME = r"\d+", r"\b[A-Z]{5}\b"

_KEY_WORDS = (
    ("amber", "brave", "calm", "dusty", "eager", "fancy", "giant", "hollow", "icy", "jolly",
     "keen", "lively", "mellow", "noble", "odd", "proud"),
    ("falcon", "badger", "cedar", "dolphin", "ember", "fig", "glacier", "heron", "iris",
     "jaguar", "kettle", "lemur", "meadow", "nutmeg", "otter", "pebble"),
)  # fmt: skip

KEYS = [(a, b) for a in _KEY_WORDS[0] for b in _KEY_WORDS[1]]


@dataclass(frozen=True)
class Options:
    """Sizes of the harder variants."""

    distractors: int = 3  # multikey: needles with other keys
    values: int = 4  # multivalue: values of the one key
    queries: int = 4  # multiquery: keys asked
    chains: int = 2  # vt: chains, one asked
    hops: int = 4  # vt: assignments after the first in each chain


@dataclass(frozen=True)
class Sample:
    """One question before assembly: the pieces of the prompt and what must come back."""

    prefix: str
    needles: list[tuple[float, str]]
    suffix: str
    answers: list[str]
    pattern: str  # regex of one answer in the continuation


def _magic(query: str) -> tuple[str, str]:
    prefix = (
        "Some special magic numbers are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the numbers afterwards.\n"
    )
    suffix = (
        f"\nWhat are all the special magic numbers for {query} mentioned in the provided text? "
        f"The special magic numbers for {query} mentioned in the provided text are"
    )
    return prefix, suffix


def _needle(key: str, value: int) -> str:
    return f" One of the special magic numbers for {key} is: {value}."


def _join(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def make_sample(variant: str, rng: random.Random, options: Options) -> Sample:
    """The pieces of one ``variant`` question, drawn from ``rng``."""
    if variant == "vt":
        return _variable_tracking(rng, options)
    n_keys = {"multikey": 1 + options.distractors, "multiquery": options.queries}.get(variant, 1)
    keys = [f"{a}-{b}" for a, b in rng.sample(KEYS, n_keys)]
    if variant == "multivalue":
        values = rng.sample(range(1_000_000, 10_000_000), options.values)
        needles = [(rng.random(), _needle(keys[0], value)) for value in values]
        prefix, suffix = _magic(keys[0])
        return Sample(prefix, needles, suffix, [str(v) for v in values], NUMBER)
    values = rng.sample(range(1_000_000, 10_000_000), len(keys))
    needles = [(rng.random(), _needle(key, value)) for key, value in zip(keys, values, strict=True)]
    asked = keys if variant == "multiquery" else keys[:1]
    prefix, suffix = _magic(_join(asked))
    return Sample(prefix, needles, suffix, [str(v) for v in values[: len(asked)]], NUMBER)


def _variable_tracking(rng: random.Random, options: Options) -> Sample:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names: set[str] = set()
    while len(names) < options.chains * (options.hops + 1):
        names.add("".join(rng.choice(letters) for _ in range(5)))
    shuffled = rng.sample(sorted(names), len(names))
    values = rng.sample(range(10_000, 100_000), options.chains)
    needles, chains = [], []
    for chain_index, value in enumerate(values):
        chain = shuffled[chain_index * (options.hops + 1) : (chain_index + 1) * (options.hops + 1)]
        depths = sorted(rng.random() for _ in chain)  # assignments stay in order
        texts = [f" VAR {chain[0]} = {value}."]
        texts += [f" VAR {name} = VAR {previous}." for previous, name in pairwise(chain)]
        needles += list(zip(depths, texts, strict=True))
        chains.append(chain)
    prefix = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    )
    suffix = (
        f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text "
        f"above. Answer: According to the chain(s) of variable assignment in the text above, "
        f"{len(chains[0])} variables are assigned the value {values[0]}, they are:"
    )
    return Sample(prefix, needles, suffix, chains[0], NAME)


def score(text: str, answers: Sequence[str], pattern: str) -> tuple[bool, float]:
    """(exact, recall): the first ``len(answers)`` matches of ``pattern`` in ``text`` equal
    ``answers`` as a set; the fraction of ``answers`` among them."""
    found = re.findall(pattern, text)[: len(answers)]
    hits = len(set(found) & set(answers))
    return sorted(found) == sorted(answers), hits / len(answers)


def make_filler(tokenizer: Tokenizer, haystack: str, seed: int) -> Filler:
    """The filler of ``haystack`` (``repeat`` or ``sentences``)."""
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack: {haystack!r} is not one of {', '.join(HAYSTACKS)}")
    return passkey_filler(tokenizer) if haystack == "repeat" else generated_filler(tokenizer, seed)


def check_variants(variants: Sequence[str]) -> None:
    """Raises ValueError for an empty list or an unknown variant."""
    if not variants:
        raise ValueError("variants: give at least one variant")
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"variants: unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


def run_niah(
    model: HybridLM,
    tokenizer: Tokenizer,
    lengths: Sequence[int] = tuple(DEFAULT_LENGTHS),
    variants: Sequence[str] = VARIANTS,
    samples: int = 5,
    seed: int = 0,
    *,
    haystack: str = "repeat",
    options: Options | None = None,
    chunk_size: int = inference.DEFAULT_CHUNK_SIZE,
    batch_size: int = 1,
    max_context: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of each variant at each length, ``samples`` seeded questions each.

    Returns ``{"task", "settings", "accuracy" (per variant), "rows", "samples"}``: ``rows`` has
    one entry per (variant, length) with ``correct``, ``samples``, ``accuracy`` and ``recall``.

    Raises:
        ValueError: before any model work: an unknown variant or haystack, a non-positive
            length or count, a length too short for a prompt or beyond ``max_context``.
    """
    options = options or Options()
    lengths = sorted(set(lengths))
    variants = list(dict.fromkeys(variants))
    check_variants(variants)
    for name in ("distractors", "values", "queries", "chains", "hops"):
        inference.check_positive(name, [getattr(options, name)])
    if max(options.distractors + 1, options.queries) > len(KEYS):
        raise ValueError(f"distractors, queries: at most {len(KEYS)} keys in one prompt")
    inference.check_positive("samples", [samples])
    inference.check_positive("batch-size", [batch_size])
    inference.check_positive("chunk-size", [chunk_size])
    inference.check_lengths("lengths", lengths, max_context)
    filler = make_filler(tokenizer, haystack, seed)
    items = []
    for variant in variants:
        for length in lengths:
            for index in range(samples):
                rng = random.Random(f"niah-{seed}-{variant}-{length}-{index}")
                sample = make_sample(variant, rng, options)
                texts = [text for _, text in sample.needles]
                needed = fixed_tokens(tokenizer, sample.prefix, texts, sample.suffix)
                answer = len(encode_segment(tokenizer, " " + ", ".join(sample.answers) + "."))
                items.append((variant, length, index, sample, answer + ANSWER_MARGIN, needed))
    shortest = max(item[-1] for item in items)
    for variant, length, _, _, _, needed in items:
        if length < needed:
            raise ValueError(
                f"lengths: {length} tokens is too short for a {variant} prompt, which needs "
                f"{needed} tokens with this tokenizer (every length must be at least {shortest})"
            )
    items = [item[:-1] for item in items]
    max_new_tokens = max(item[-1] for item in items)
    inference.check_context(
        model, "lengths", lengths, extra_tokens=max_new_tokens, batch_size=batch_size,
        max_context=max_context,
    )  # fmt: skip
    records = []
    with progress_bar(len(items), "niah", progress) as bar:
        for batch in batches(items, batch_size):
            prompts = [
                build_prompt(tokenizer, length, s.prefix, s.needles, s.suffix, filler)
                for _, length, _, s, _ in batch
            ]
            new_tokens = max(item[-1] for item in batch)
            outputs = inference.greedy_continuations(
                model, [p.ids for p in prompts], new_tokens, chunk_size=chunk_size
            )
            for (variant, length, index, sample, _), prompt, output in zip(
                batch, prompts, outputs, strict=True
            ):
                text = inference.decode_text(tokenizer, output)
                correct, recall = score(text, sample.answers, sample.pattern)
                records.append(
                    {
                        "variant": variant,
                        "length": length,
                        "index": index,
                        "answers": sample.answers,
                        "needle_depths": prompt.depths,
                        "output": text,
                        "correct": correct,
                        "recall": recall,
                    }
                )
            bar.update(len(batch))
    rows = []
    for variant in variants:
        for length in lengths:
            cell = [r for r in records if r["variant"] == variant and r["length"] == length]
            correct = sum(r["correct"] for r in cell)
            rows.append(
                {
                    "variant": variant,
                    "length": length,
                    "samples": len(cell),
                    "correct": correct,
                    "accuracy": correct / len(cell),
                    "recall": sum(r["recall"] for r in cell) / len(cell),
                }
            )
    accuracy = {
        variant: sum(r["correct"] for r in records if r["variant"] == variant)
        / sum(r["variant"] == variant for r in records)
        for variant in variants
    }
    return {
        "task": "niah",
        "settings": {
            "lengths": lengths,
            "variants": variants,
            "samples": samples,
            "seed": seed,
            "haystack": haystack,
            **asdict(options),
            "chunk_size": chunk_size,
            "batch_size": batch_size,
            "max_context": max_context,
            "decoding": "greedy",
            "scoring": "first k answers in the continuation equal the k expected (any order)",
        },
        "accuracy": accuracy,
        "rows": rows,
        "samples": records,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hybrid eval niah`` options."""
    defaults = Options()
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, metavar="TOKENS",
        help=f"context lengths in tokens of the checkpoint's tokenizer (default {DEFAULT_LENGTHS})",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
        help=f"any of {', '.join(VARIANTS)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=5, help="questions per cell (default 5)")
    parser.add_argument(
        "--haystack", default="repeat", choices=HAYSTACKS,
        help="filler: 'repeat' (the passkey sentences) or 'sentences' (seeded generated ones)",
    )  # fmt: skip
    parser.add_argument("--distractors", type=int, default=defaults.distractors,
                        help="multikey: needles with other keys")  # fmt: skip
    parser.add_argument("--values", type=int, default=defaults.values,
                        help="multivalue: values of the one key")  # fmt: skip
    parser.add_argument("--queries", type=int, default=defaults.queries,
                        help="multiquery: keys asked at once")  # fmt: skip
    parser.add_argument("--chains", type=int, default=defaults.chains,
                        help="vt: chains of assignments (one asked)")  # fmt: skip
    parser.add_argument("--hops", type=int, default=defaults.hops,
                        help="vt: assignments after the first in each chain")  # fmt: skip


def _options(args: argparse.Namespace) -> Options:
    return Options(args.distractors, args.values, args.queries, args.chains, args.hops)


def check_arguments(args: argparse.Namespace) -> None:
    """Checks that need no model (run before the checkpoint is loaded)."""
    inference.check_lengths("--lengths", args.lengths, args.max_context)
    check_variants(args.variants)
    if args.haystack not in HAYSTACKS:
        raise ValueError(f"--haystack: {args.haystack!r} is not one of {', '.join(HAYSTACKS)}")
    inference.check_positive("--samples", [args.samples])


def evaluate(
    args: argparse.Namespace, model: HybridLM, tokenizer: Tokenizer, progress: bool
) -> dict[str, Any]:
    """``hybrid eval niah``: :func:`run_niah` with the parsed options."""
    return run_niah(
        model, tokenizer, args.lengths, args.variants, args.samples, args.seed,
        haystack=args.haystack, options=_options(args), chunk_size=args.chunk_size,
        batch_size=args.batch_size, max_context=args.max_context, progress=progress,
    )  # fmt: skip

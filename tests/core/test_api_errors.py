"""The Python API's half of the malformed-input catalogue (the CLI's is
tests/cli/test_user_errors.py): each bad call raises a ValueError whose message is one line
naming the argument, field or file, and writes or changes no file. scripts/torture.py counts
both halves."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.checkpoint import load_model, load_pretrained, read_training_checkpoint, save_pretrained
from hybrid.inference.cache_io import load_cache
from hybrid.inference.generation import generate
from hybrid.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "pattern": "M*",
    "d_model": 32,
    "vocab_size": 64,
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 16},
    "attention": {"n_heads": 2},
}


def config(**changes) -> HybridConfig:
    return HybridConfig(**{**TINY, **changes})


def model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(config()).eval()


def ids(*shape: int, value: int = 1, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype)


def a_file(tmp: Path) -> Path:
    """A text file that :func:`check_api_case` writes before each call."""
    return tmp / "f.txt"


@dataclass(frozen=True)
class ApiCase:
    """``call(tmp)`` must raise a one-line ValueError matching ``message``."""

    name: str
    call: Callable[[Path], object]
    message: str


API_CASES = [
    ApiCase("config: integer field a string", lambda tmp: config(d_model="abc"),
            r"^d_model: must be an integer, got 'abc'$"),
    ApiCase("config: unknown block letter", lambda tmp: config(pattern="MX"),
            r"^pattern\[1\]: unknown block 'X'"),
    ApiCase("config: layer_overrides a list", lambda tmp: config(layer_overrides=[1]),
            r"^layer_overrides: must map sublayer indices"),
    ApiCase("config: init_std NaN", lambda tmp: config(init_std=float("nan")),
            r"^init_std: must be a finite number, got nan$"),
    ApiCase("config: vocab_size 0", lambda tmp: config(vocab_size=0),
            r"^vocab_size: must be a positive integer"),
    ApiCase("config: unknown block option",
            lambda tmp: config(mamba2={**TINY["mamba2"], "bogus": 1}),
            r"^mamba2\.bogus: unknown option; valid: d_state"),
    ApiCase("config: block option a string", lambda tmp: config(mamba2={"d_state": "8"}),
            r"^mamba2\.d_state: must be an integer, got '8'$"),
    ApiCase("load_recipe: no such file", lambda tmp: load_recipe(tmp / "nope.yaml"),
            r"nope\.yaml: no such recipe file$"),
    ApiCase("load_recipe: override of the wrong type",
            lambda tmp: load_recipe(ROOT / "recipes/quickstart.yaml", ["model.d_model=abc"]),
            r"^model\.d_model: must be an integer"),
    ApiCase("load_recipe: unknown override",
            lambda tmp: load_recipe(ROOT / "recipes/quickstart.yaml", ["model.nope=1"]),
            r"^model\.nope: unknown config field"),
    ApiCase("load_pretrained: no config.json",
            lambda tmp: load_pretrained(tmp / "empty"),
            r"empty: missing config\.json$"),
    ApiCase("load_pretrained: a file", lambda tmp: load_pretrained(a_file(tmp)),
            r"f\.txt: no such checkpoint directory$"),
    ApiCase("load_model: no such path", lambda tmp: load_model(tmp / "missing"),
            r"missing: no such checkpoint directory$"),
    ApiCase("save_pretrained: onto a file", lambda tmp: save_pretrained(model(), a_file(tmp)),
            r"^save_pretrained: .*f\.txt: it is a file, not a directory$"),
    ApiCase("load_cache: not a cache file", lambda tmp: load_cache(model(), a_file(tmp)),
            r"f\.txt: not a readable safetensors cache file"),
    ApiCase("read_training_checkpoint: not a checkpoint",
            lambda tmp: read_training_checkpoint(a_file(tmp)),
            r"f\.txt: not a readable checkpoint"),
    ApiCase("allocate_cache: beyond memory", lambda tmp: model().allocate_cache(10**6, 10**6),
            r"^inference cache of 1000000 x 1000000 tokens: needs about .* free on cpu$"),
    ApiCase("allocate_cache: batch 0", lambda tmp: model().allocate_cache(0, 8),
            r"^batch_size: must be a positive integer"),
    ApiCase("generate: negative max_new_tokens", lambda tmp: generate(model(), ids(1, 3), -1),
            r"^max_new_tokens: must be a positive integer"),
    ApiCase("generate: token outside the vocabulary",
            lambda tmp: generate(model(), ids(1, 3, value=999), 2),
            r"^input_ids: token id 999 is outside the vocabulary \[0, 64\)$"),
    ApiCase("generate: float token ids",
            lambda tmp: generate(model(), ids(1, 3, dtype=torch.float32), 2),
            r"^input_ids: expected an integer tensor"),
    ApiCase("generate: one-dimensional ids", lambda tmp: generate(model(), ids(3), 2),
            r"^input_ids: expected a \(batch, prompt_length\) tensor"),
    ApiCase("generate: top_p above 1", lambda tmp: generate(model(), ids(1, 3), 2, top_p=2.0),
            r"^top_p: must be in \(0, 1\]"),
    ApiCase("generate: negative temperature",
            lambda tmp: generate(model(), ids(1, 3), 2, temperature=-1.0),
            r"^temperature: must be >= 0"),
    ApiCase("generate: attention_mask of another shape",
            lambda tmp: generate(model(), ids(1, 3), 2, attention_mask=torch.ones(1, 4)),
            r"^attention_mask: expected shape \(1, 3\), got \(1, 4\)$"),
    ApiCase("generate: beyond max_seqlen",
            lambda tmp: generate(model(), ids(1, 3), 5, max_seqlen=4),
            r"^max_seqlen: prompt \(3\) \+ max_new_tokens \(5\) = 8 exceeds max_seqlen=4$"),
    ApiCase("forward: token outside the vocabulary", lambda tmp: model()(ids(1, 3, value=64)),
            r"^input_ids: token id 64 is outside the vocabulary"),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime in ns)."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def check_api_case(case: ApiCase, tmp: Path) -> list[str]:
    """What is wrong with ``case``'s error (empty when it holds)."""
    a_file(tmp).write_text("not this format\n")
    (tmp / "empty").mkdir()
    before = snapshot(tmp)
    problems = []
    try:
        case.call(tmp)
        problems.append("no error")
    except ValueError as error:
        message = str(error)
        if "\n" in message:
            problems.append(f"{len(message.splitlines())} lines")
        if not re.search(case.message, message):
            problems.append(f"message {message!r}")
    except Exception as error:
        problems.append(f"{type(error).__name__} instead of ValueError: {error}")
    after = snapshot(tmp)
    if after != before or [p.name for p in (tmp / "empty").iterdir()]:
        problems.append("files written or changed")
    return problems


@pytest.mark.parametrize("case", API_CASES, ids=[case.name for case in API_CASES])
def test_api_error_is_one_line_and_writes_nothing(case, tmp_path):
    assert check_api_case(case, tmp_path) == []


def test_the_api_catalogue_has_distinct_names():
    assert len({case.name for case in API_CASES}) == len(API_CASES) >= 25

"""docs/families.md (the per-family table of parameters and cache bytes at 32K) is what
scripts/family_table.py computes from the shipped recipes today, and its numbers are those of
a model actually built and a cache actually allocated."""

from __future__ import annotations

from pathlib import Path

import torch

from hybrid import HybridLM
from hybrid.recipe import load_recipe
from tests.scripts.script_module import load_script

ROOT = Path(__file__).resolve().parents[2]


def script():
    return load_script("family_table")


def test_committed_table_is_current():
    table = script()
    assert (ROOT / "docs/families.md").read_text() == table.markdown(table.measure()), (
        "docs/families.md is stale: run python3 scripts/family_table.py --out docs"
    )


def test_rows_match_a_built_model_and_an_allocated_cache():
    table = script()
    rows = {row["recipe"]: row for row in table.measure()}
    for name in ("falcon_h1_like", "qwen3_next_like"):
        config = load_recipe(ROOT / f"recipes/{name}.yaml").hybrid_config(table.VOCAB)
        with torch.device("meta"):
            model = HybridLM(config)
            cache = model.allocate_cache(1, table.CONTEXT, torch.bfloat16)
        assert rows[name]["parameters"] == sum(p.numel() for p in model.parameters())
        assert rows[name]["cache_bytes"] == sum(cache.layer_nbytes())

"""One vocabulary rule for `hybrid train` and `hybrid info`: a recipe's ids span what its
tokenizer (or synthetic task) gives; before a tokenizer exists, the size the recipe asks for."""

from __future__ import annotations

import pytest
import yaml

from hybrid.recipe import load_model_config, validate_recipe, vocab_size
from hybrid.train.run import TrainError, build_data, model_config
from tests.train.conftest import TINY_RECIPE

MQAR = {
    "source": {"format": "mqar"},
    "seq_len": 32,
    "mqar": {"vocab_size": 64, "kv_pairs": [4], "train_examples": 8, "val_examples": 4},
}


def recipe_data(tmp_path, **sections) -> dict:
    data = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    data["output_dir"] = str(tmp_path / "runs")
    data["data"]["cache_dir"] = str(tmp_path / "cache")
    data.update(sections)
    return data


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({}, 257),  # bytes + end of document
        ({"tokenizer": {"kind": "bpe", "vocab_size": 300}}, 300),
        ({"tokenizer": {"kind": "bpe"}}, 4096),  # the schema's default
        ({"data": MQAR}, 64),
        ({"data": MQAR, "tokenizer": {"kind": "bpe", "vocab_size": 300}}, 64),  # ids are the data
    ],
)
def test_info_and_the_recipe_agree_before_any_tokenizer_exists(tmp_path, sections, expected):
    data = recipe_data(tmp_path, **sections)
    assert vocab_size(validate_recipe(data)) == expected
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_model_config(str(path)).vocab_size == expected


@pytest.mark.parametrize("data", [None, MQAR])
def test_a_run_takes_the_vocabulary_of_the_tokenizer_it_builds(tmp_path, data):
    recipe = validate_recipe(recipe_data(tmp_path, **({"data": data} if data else {})))
    tokenizer = build_data(recipe).tokenizer
    assert vocab_size(recipe, tokenizer) == tokenizer.vocab_size == vocab_size(recipe)
    assert model_config(recipe, tokenizer).vocab_size == tokenizer.vocab_size


def test_the_model_section_may_set_a_larger_vocabulary_but_not_a_smaller_one(tmp_path):
    model = TINY_RECIPE["model"]
    larger = validate_recipe(recipe_data(tmp_path, model={**model, "vocab_size": 320}))
    tokenizer = build_data(larger).tokenizer
    assert model_config(larger, tokenizer).vocab_size == 320
    smaller = validate_recipe(recipe_data(tmp_path, model={**model, "vocab_size": 200}))
    with pytest.raises(
        TrainError, match=r"model\.vocab_size: 200 is smaller than the tokenizer's 257"
    ):
        model_config(smaller, tokenizer)

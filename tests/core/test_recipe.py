"""The recipe schema: one-line errors that name the field, dotted overrides, the YAML round trip."""

import typing

import pytest
import yaml
from pydantic import ValidationError

from hybrid.recipe import (
    OptimConfig,
    Recipe,
    RecipeError,
    SourceConfig,
    TrainerConfig,
    describe_validation_error,
    load_recipe,
    recipe_to_yaml,
    validate_recipe,
)

MODEL = {
    "pattern": "M-M*-",
    "d_model": 64,
    "attention": {"n_heads": 2},
    "mamba2": {"d_state": 16, "headdim": 16},
}


def recipe_data(**sections):
    """A valid recipe's plain data: the small model plus ``sections``."""
    return {"model": dict(MODEL), **sections}


def error_of(data) -> str:
    """The RecipeError message ``validate_recipe(data)`` raises (always one line)."""
    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def override_error(path, overrides) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def recipe_file(tmp_path):
    """A recipe file with a model and an optim section only."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "small", **recipe_data(optim={"lr": 1.0e-3})}))
    return path


# Unknown keys: the closest valid key, with its full dotted path, and the section's keys.


@pytest.mark.parametrize(
    ("sections", "field", "suggestion", "valid"),
    [
        ({"optimm": {}}, "optimm", "optim", list(Recipe.model_fields)),
        ({"optim": {"lrr": 1e-3}}, "optim.lrr", "optim.lr", list(OptimConfig.model_fields)),
        (
            {"trainer": {"micro_batch": 4}},
            "trainer.micro_batch",
            "trainer.micro_batch_size",
            list(TrainerConfig.model_fields),
        ),
        (
            {"data": {"source": {"pathz": ["a.txt"]}}},
            "data.source.pathz",
            "data.source.paths",
            list(SourceConfig.model_fields),
        ),
        (  # an optional section (SourceConfig | None) is looked through too
            {"data": {"validation": {"text_feild": "body"}}},
            "data.validation.text_feild",
            "data.validation.text_field",
            list(SourceConfig.model_fields),
        ),
    ],
)
def test_unknown_key_suggests_the_closest_key_by_its_full_path(sections, field, suggestion, valid):
    message = error_of(recipe_data(**sections))
    assert message.startswith(f"{field}: unknown key; did you mean {suggestion!r}?")
    assert message.endswith(f"valid keys: {', '.join(valid)}")


def test_unknown_key_without_a_close_match_lists_the_valid_keys_only():
    message = error_of(recipe_data(optim={"zzzz": 1}))
    assert message == "optim.zzzz: unknown key; valid keys: lr, weight_decay, betas, eps, grad_clip"


# Wrong types and values name the field and show what was given.


@pytest.mark.parametrize(
    ("sections", "start", "part"),
    [
        ({"optim": {"lr": "fast"}}, "optim.lr: input should be a valid number", "(got 'fast')"),
        ({"trainer": {"max_steps": 1.5}}, "trainer.max_steps: input should be a valid integer", ""),
        ({"data": {"seq_len": [512]}}, "data.seq_len: input should be a valid integer", ""),
        ({"data": {"source": {"paths": "a.txt"}}}, "data.source.paths: input should be", "list"),
        ({"logging": {"tags": "abc"}}, "logging.tags: input should be a valid list", "'abc'"),
        ({"data": "stdlib"}, "data: input should be a valid dictionary", "(got 'stdlib')"),
        ({"name": {"a": 1}}, "name: input should be a valid string", "(got a mapping)"),
        ({"seed": "zero"}, "seed: input should be a valid integer", "(got 'zero')"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction: input should be less than 1", ""),
        ({"optim": {"lr": 0}}, "optim.lr: input should be greater than 0", "(got 0)"),
        ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas: each beta must be in [0, 1)", ""),
    ],
)
def test_wrong_type_or_value_names_the_field(sections, start, part):
    message = error_of(recipe_data(**sections))
    assert message.startswith(start)
    assert part in message
    assert "Value error" not in message  # pydantic's prefix is dropped


def test_missing_model_section_is_required():
    assert error_of({"optim": {"lr": 1e-3}}) == "model: required"


LITERAL_FIELDS = [
    ("tokenizer", "kind"),
    ("schedule", "kind"),
    ("trainer", "precision"),
    ("trainer", "accelerator"),
    ("trainer", "strategy"),
    ("logging", "wandb_mode"),
]


@pytest.mark.parametrize(("section", "field"), LITERAL_FIELDS)
def test_literal_choices_are_listed(section, field):
    section_class = typing.get_args(Recipe.model_fields[section].annotation) or (
        Recipe.model_fields[section].annotation,
    )
    choices = typing.get_args(section_class[0].model_fields[field].annotation)
    assert len(choices) >= 2
    message = error_of(recipe_data(**{section: {field: "bogus"}}))
    assert message.startswith(f"{section}.{field}: input should be ")
    assert message.endswith("(got 'bogus')")
    for choice in choices:
        assert repr(choice) in message


def test_literal_choices_in_a_nested_section():
    message = error_of(recipe_data(data={"source": {"format": "csv"}}))
    assert message == (
        "data.source.format: input should be 'text', 'jsonl', 'parquet', 'disk', 'hub', 'mqar' "
        "or 'passkey' (got 'csv')"
    )


def test_describe_validation_error_on_assignment():
    recipe = validate_recipe(recipe_data())
    with pytest.raises(ValidationError) as info:  # sections validate assignments too
        recipe.optim.lr = -1.0
    assert describe_validation_error(info.value) == "lr: input should be greater than 0 (got -1.0)"
    assert recipe.optim.lr == OptimConfig().lr


# Dotted overrides.


def test_overrides_set_nested_fields_with_yaml_scalars(recipe_file):
    recipe = load_recipe(recipe_file, ["optim.lr=3e-4", "model.d_model=128", "logging.wandb=false"])
    assert recipe.optim.lr == pytest.approx(3e-4) and isinstance(recipe.optim.lr, float)
    assert recipe.model["d_model"] == 128
    assert recipe.logging.wandb is False
    assert recipe.name == "small"  # untouched fields keep the file's values
    assert recipe.model["pattern"] == MODEL["pattern"]
    assert recipe.hybrid_config(vocab_size=50).d_model == 128


def test_overrides_apply_in_order_and_leave_the_file_alone(recipe_file):
    before = recipe_file.read_text()
    recipe = load_recipe(recipe_file, ["optim.lr=0.5", "optim.lr=0.25"])
    assert recipe.optim.lr == 0.25
    assert recipe_file.read_text() == before
    assert load_recipe(recipe_file).optim.lr == 1.0e-3


def test_override_with_a_list_value(recipe_file):
    recipe = load_recipe(
        recipe_file,
        ["data.source.paths=[a.txt, 'docs/**/*.md']", "optim.betas=[0.8, 0.99]", "logging.tags=[]"],
    )
    assert recipe.data.source.paths == ["a.txt", "docs/**/*.md"]
    assert recipe.optim.betas == (0.8, 0.99)
    assert recipe.logging.tags == []


def test_override_creates_a_section_the_file_lacks(recipe_file):
    assert "data" not in yaml.safe_load(recipe_file.read_text())
    recipe = load_recipe(
        recipe_file,
        ["data.source.format=jsonl", "data.validation.paths=[val.jsonl]", "model.moe.top_k=1"],
    )
    assert recipe.data.source.format == "jsonl"
    assert recipe.data.source.paths == []  # the rest of the new section gets its defaults
    assert recipe.data.validation is not None
    assert recipe.data.validation.paths == ["val.jsonl"]
    assert recipe.data.validation.format == "text"
    assert recipe.model["moe"] == {"top_k": 1}


@pytest.mark.parametrize(
    ("override", "start", "suggestion"),
    [
        ("optim.lrr=3e-4", "optim.lrr: unknown key", "'optim.lr'"),
        ("trainr.max_steps=5", "trainr: unknown key", "'trainer'"),
        ("data.source.pathz=[a]", "data.source.pathz: unknown key", "'data.source.paths'"),
        ("model.d_modle=128", "model.d_modle: unknown config field", "'d_model'"),
        ("model.attention.n_headz=4", "model.attention.n_headz: unknown option", "'n_heads'"),
    ],
)
def test_unknown_override_key_fails_with_a_suggestion(recipe_file, override, start, suggestion):
    message = override_error(recipe_file, [override])
    assert message.startswith(start)
    assert f"did you mean {suggestion}?" in message


def test_override_with_a_bad_value_names_the_field(recipe_file):
    message = override_error(recipe_file, ["trainer.max_steps=many"])
    assert message.startswith("trainer.max_steps: input should be a valid integer")


@pytest.mark.parametrize(
    ("override", "part"),
    [
        ("optim.lr", "expected key=value"),
        ("=3", "expected key=value"),
        ("optim.lr.x=1", "optim.lr"),
    ],
)
def test_malformed_override_is_a_recipe_error(recipe_file, override, part):
    message = override_error(recipe_file, [override])
    assert message.startswith(f"override {override!r}: ")
    assert part in message


def test_exponent_floats_reach_the_model_as_floats(recipe_file):
    recipe = load_recipe(recipe_file, ["model.norm_eps=1e-6", "model.moe.aux_loss_weight=1e-3"])
    config = recipe.hybrid_config(vocab_size=50)
    assert config.norm_eps == 1e-6
    assert config.moe.aux_loss_weight == 1e-3


# The model section is validated by building its HybridConfig.


@pytest.mark.parametrize(
    ("model", "start", "part"),
    [
        (
            {**MODEL, "d_modle": 64},
            "model.d_modle: unknown config field",
            "did you mean 'd_model'?",
        ),
        (
            {**MODEL, "attention": {"n_headz": 2}},
            "model.attention.n_headz: unknown option",
            "did you mean 'n_heads'?",
        ),
        ({**MODEL, "pattern": "M-Q"}, "model.pattern[2]: unknown block 'Q'", "M=mamba2"),
        (
            {**MODEL, "attention": {"n_heads": 2, "n_kv_heads": 3}},
            "model.attention.n_kv_heads: must divide n_heads=2",
            "got 3",
        ),
        ({k: v for k, v in MODEL.items() if k != "pattern"}, "model.pattern: required", ""),
        ("M-M*-", "model: input should be a valid dictionary", "(got 'M-M*-')"),
    ],
)
def test_model_section_errors_are_prefixed_with_model(model, start, part):
    message = error_of({"model": model})
    assert message.startswith(start)
    assert part in message


def test_bad_pattern_through_an_override(recipe_file):
    message = override_error(recipe_file, ["model.pattern=MQ"])
    assert message.startswith("model.pattern[1]: unknown block 'Q'")


def test_hybrid_config_takes_the_tokenizer_vocabulary_unless_the_model_sets_one():
    recipe = validate_recipe(recipe_data())
    config = recipe.hybrid_config(vocab_size=257)
    assert config.vocab_size == 257
    assert config.layers == ["mamba2", "mlp", "mamba2", "attention", "mlp"]
    assert config.d_model == 64
    pinned = validate_recipe({"model": {**MODEL, "vocab_size": 300}})
    assert pinned.hybrid_config(vocab_size=257).vocab_size == 300
    assert "vocab_size" not in recipe.model  # hybrid_config does not write back


# File problems name the file.


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="no such recipe file") as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("model: [unclosed\n", "not valid YAML"),
        ("model:\n  pattern: 'M'\n bad indent: 1\n", "not valid YAML"),
        ("- model\n- optim\n", "expected a mapping"),
        ("just a string\n", "expected a mapping"),
        ("", "expected a mapping"),
    ],
)
def test_unreadable_recipe_names_the_file(tmp_path, text, part):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert part in message
    assert "\n" not in message


# The resolved recipe: defaults filled in, and a YAML round trip to an equal Recipe.


def test_resolved_fills_in_every_default():
    resolved = validate_recipe({"model": {"pattern": "M-"}}).resolved()
    assert list(resolved) == list(Recipe.model_fields)
    assert resolved["name"] == "run" and resolved["seed"] == 0
    assert resolved["model"] == {"pattern": "M-"}  # model defaults belong to HybridConfig
    assert resolved["optim"] == {
        "lr": 3e-3,
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "grad_clip": 1.0,
    }
    assert resolved["data"]["seq_len"] == 256
    assert resolved["data"]["validation"] is None
    assert resolved["data"]["source"] == {
        "format": "text",
        "paths": [],
        "exclude": [],
        "text_field": "text",
        "name": None,
        "subset": None,
        "split": "train",
    }
    assert resolved["tokenizer"]["kind"] == "byte"
    assert resolved["schedule"]["kind"] == "cosine"
    assert resolved["trainer"]["max_steps"] == 1000
    assert resolved["trainer"]["threads"] is None
    assert resolved["logging"]["wandb"] is True
    assert resolved["checkpoint"]["keep"] == 2
    assert resolved["eval"]["max_new_tokens"] == 200


def test_resolved_keeps_the_given_values():
    resolved = validate_recipe(recipe_data(optim={"lr": 5e-4}, data={"seq_len": 64})).resolved()
    assert resolved["optim"]["lr"] == 5e-4 and resolved["optim"]["weight_decay"] == 0.1
    assert resolved["data"]["seq_len"] == 64 and resolved["data"]["val_fraction"] == 0.01


def full_recipe() -> Recipe:
    """A recipe with a non-default value in every section (tuples, None, lists, nesting)."""
    return validate_recipe(
        {
            "name": "round-trip",
            "seed": 7,
            "output_dir": "elsewhere",
            "model": {**MODEL, "moe": {"n_experts": 4}, "tie_embeddings": True},
            "data": {
                "source": {"format": "jsonl", "paths": ["train/*.jsonl"], "text_field": "body"},
                "validation": {"format": "jsonl", "paths": ["val.jsonl"]},
                "val_fraction": 0.05,
                "seq_len": 128,
                "max_documents": 100,
            },
            "tokenizer": {"kind": "bpe", "vocab_size": 1024, "path": "tok.json"},
            "optim": {"lr": 3e-4, "betas": [0.8, 0.99], "grad_clip": 0.0},
            "schedule": {"kind": "wsd", "warmup_steps": 10, "decay_fraction": 0.3},
            "trainer": {"max_steps": 50, "precision": "bf16-mixed", "threads": 2},
            "logging": {"wandb": False, "tags": ["a", "b"], "entity": "team"},
            "checkpoint": {"every_steps": 10, "keep": -1},
            "eval": {"prompt": "x: 'quoted'\n  and a newline", "temperature": 0.0},
        }
    )


def test_recipe_to_yaml_round_trips_to_an_equal_recipe():
    recipe = full_recipe()
    text = recipe_to_yaml(recipe)
    again = validate_recipe(yaml.safe_load(text))
    assert again == recipe
    assert again.optim.betas == (0.8, 0.99)
    assert recipe_to_yaml(again) == text
    assert list(yaml.safe_load(text)) == list(Recipe.model_fields)  # sections in schema order


def test_recipe_to_yaml_round_trips_through_a_file(tmp_path):
    recipe = full_recipe()
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_to_yaml(recipe))
    assert load_recipe(path) == recipe
    assert load_recipe(path, ["seed=8"]).seed == 8


def test_round_trip_of_layer_overrides_keeps_the_model():
    # JSON-mode dumping turns the integer keys of layer_overrides into strings; the config
    # built from the round-tripped recipe must still be the same model.
    recipe = validate_recipe({"model": {**MODEL, "layer_overrides": {3: {"window": 8}}}})
    again = validate_recipe(yaml.safe_load(recipe_to_yaml(recipe)))
    before, after = recipe.hybrid_config(vocab_size=50), again.hybrid_config(vocab_size=50)
    assert after.layer_options[3].window == 8
    assert after.fingerprint() == before.fingerprint()

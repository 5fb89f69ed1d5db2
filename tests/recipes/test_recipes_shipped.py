"""The shipped recipes: they load and build, keep their anchors' layouts, share one budget, and
the W&B sweep only sets fields that exist."""

import functools
import re
from pathlib import Path

import pytest
import torch
import yaml

from hybrid import HybridConfig, HybridLM, pattern_from_periods, pattern_from_ratios
from hybrid.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
SWEEP = RECIPES / "sweep.yaml"
BYTE_VOCAB = 257  # 256 bytes + end of document
SAME_BUDGET = [
    "baseline_attention",
    "baseline_mamba2",
    "jamba_like",
    "mamba2_hybrid_like",
    "samba_like",
    "nemotron_h_like",
    "qwen3_next_like",
    "lfm2_like",
    "falcon_h1_like",
    "olmo_hybrid_like",
    "kimi_linear_like",
]
RECIPE_PATHS = sorted(path for path in RECIPES.glob("*.yaml") if path != SWEEP)


@functools.cache
def recipe(name: str) -> Recipe:
    return load_recipe(RECIPES / f"{name}.yaml")


@functools.cache
def config(name: str) -> HybridConfig:
    return recipe(name).hybrid_config(vocab_size=BYTE_VOCAB)


@functools.cache
def active_parameters(name: str) -> int:
    """Active non-embedding parameters (MoE counts its top-k experts), built on meta."""
    with torch.device("meta"):
        model = HybridLM(config(name))
    return model.num_parameters(active=True, embeddings=False)


def test_the_same_budget_recipes_are_shipped():
    assert {path.stem for path in RECIPE_PATHS} >= {*SAME_BUDGET, "quickstart"}


@pytest.mark.parametrize("path", RECIPE_PATHS, ids=lambda path: path.stem)
def test_recipe_loads_and_builds_on_meta(path):
    loaded = recipe(path.stem)
    assert loaded.name == path.stem
    assert loaded.tokenizer.kind == "byte"
    built = config(path.stem)
    assert built.vocab_size == BYTE_VOCAB, "leave model.vocab_size to the tokenizer"
    with torch.device("meta"):
        model = HybridLM(built)
    assert model.embedding.weight.shape == (BYTE_VOCAB, built.d_model)
    assert len(model.blocks) == len(built.layers)


# The anchors' layouts, read from the resolved sublayer list.


def mixers_and_feedforwards(layers: list[str]) -> tuple[list[str], list[str]]:
    """Split a (mixer, feed-forward) * n stack into its two halves."""
    assert len(layers) % 2 == 0
    mixers, feedforwards = layers[0::2], layers[1::2]
    known = {"attention", "latent_attention", "mamba1", "mamba2", "gated_deltanet", "kda",
             "short_conv"}  # fmt: skip
    assert set(mixers) <= known, layers
    assert set(feedforwards) <= {"mlp", "moe"}, layers
    return mixers, feedforwards


def test_baseline_attention_is_attention_and_mlp_only():
    layers = config("baseline_attention").layers
    mixers, feedforwards = mixers_and_feedforwards(layers)
    assert set(mixers) == {"attention"} and set(feedforwards) == {"mlp"}
    assert all(options.rope for options in config("baseline_attention").layer_options[0::2])


def test_baseline_mamba2_is_mamba2_and_mlp_only():
    mixers, feedforwards = mixers_and_feedforwards(config("baseline_mamba2").layers)
    assert set(mixers) == {"mamba2"} and set(feedforwards) == {"mlp"}


def test_jamba_like_has_one_attention_per_8_mixers_and_moe_every_other_layer():
    built = config("jamba_like")
    mixers, feedforwards = mixers_and_feedforwards(built.layers)
    n_layers = len(mixers)
    assert n_layers % 8 == 0
    assert mixers.count("attention") * 8 == n_layers
    assert set(mixers) == {"attention", "mamba1"}
    assert [i % 8 == 4 for i in range(n_layers)] == [m == "attention" for m in mixers]
    assert [i % 2 == 1 for i in range(n_layers)] == [f == "moe" for f in feedforwards]
    assert built.pattern_string == pattern_from_periods(n_layers, 8, 4, 2, 1, mixer="mamba1")
    attention = [
        o for name, o in zip(built.layers, built.layer_options, strict=True) if name == "attention"
    ]
    assert not any(options.rope for options in attention)  # Jamba's attention has no RoPE


def test_mamba2_hybrid_like_is_megatrons_ratio_allocation():
    built = config("mamba2_hybrid_like")
    n = len(built.layers)
    assert built.pattern_string == pattern_from_ratios(n, 0.08, 0.5)
    assert built.layers.count("attention") == round(n * 0.08) >= 1
    assert built.layers.count("mlp") == round(n * 0.5)
    assert set(built.layers) == {"mamba2", "attention", "mlp"}


def test_samba_like_repeats_mamba_mlp_sliding_window_mlp():
    built = config("samba_like")
    layers = built.layers
    assert len(layers) % 4 == 0
    assert layers == ["mamba1", "mlp", "attention", "mlp"] * (len(layers) // 4)
    seq_len = recipe("samba_like").data.seq_len
    for name, options in zip(layers, built.layer_options, strict=True):
        if name == "attention":
            assert options.window is not None and options.window < seq_len


def test_nemotron_h_like_uses_mamba2_attention_relu2_mlp_and_moe():
    built = config("nemotron_h_like")
    assert set(built.layers) == {"mamba2", "attention", "mlp", "moe"}
    assert set(built.pattern_string) == set("M*-E")
    for name, options in zip(built.layers, built.layer_options, strict=True):
        if name == "mlp":
            assert options.activation == "relu2"
        elif name == "moe":
            assert options.activation == "relu2"
            assert options.router == "sigmoid" and options.n_shared_experts >= 1
        elif name == "attention":
            assert not options.rope
    # Nemotron-H keeps attention rare: one in every several mixers.
    mixers = [name for name in built.layers if name in ("mamba2", "attention")]
    assert 0 < mixers.count("attention") * 4 <= len(mixers)


def test_qwen3_next_like_is_gated_deltanet_three_to_one_with_gated_attention_and_moe():
    built = config("qwen3_next_like")
    mixers, feedforwards = mixers_and_feedforwards(built.layers)
    assert mixers == ["gated_deltanet"] * 3 + ["attention"] + ["gated_deltanet"] * 3 + ["attention"]
    assert set(feedforwards) == {"moe"}
    for name, options in zip(built.layers, built.layer_options, strict=True):
        if name == "attention":
            assert options.qk_norm and options.output_gate and options.rope_fraction == 0.25
        elif name == "gated_deltanet":
            assert options.n_v_heads == 2 * options.n_heads
        elif name == "moe":
            assert options.n_shared_experts == 1 and options.shared_gate


def test_lfm2_like_is_mostly_short_convolutions():
    built = config("lfm2_like")
    mixers, feedforwards = mixers_and_feedforwards(built.layers)
    assert set(feedforwards) == {"mlp"}
    assert mixers.count("short_conv") > 1.5 * mixers.count("attention") > 0
    assert all(o.qk_norm for n, o in zip(built.layers, built.layer_options, strict=True)
               if n == "attention")  # fmt: skip


def test_falcon_h1_like_is_attention_and_mamba2_side_by_side():
    built = config("falcon_h1_like")
    assert built.layers == ["parallel", "mlp"] * 6
    for name, options in zip(built.layers, built.layer_options, strict=True):
        if name == "parallel":
            assert [mixer for mixer, _ in options.mixers] == ["attention", "mamba2"]


def test_olmo_hybrid_like_is_gated_deltanet_three_to_one_with_post_norm_attention():
    built = config("olmo_hybrid_like")
    mixers, feedforwards = mixers_and_feedforwards(built.layers)
    assert mixers == ["gated_deltanet"] * 3 + ["attention"] + ["gated_deltanet"] * 3 + ["attention"]
    assert set(feedforwards) == {"mlp"}
    # OLMo 2's attention layers: the attention and the MLP after it are post-norm, the rest not
    attention_layers = [i for i, name in enumerate(built.layers) if name == "attention"]
    assert built.post_norm_sublayers == sorted(attention_layers + [i + 1 for i in attention_layers])
    for name, options in zip(built.layers, built.layer_options, strict=True):
        if name == "attention":
            assert options.qk_norm and options.qk_norm_scope == "projection"
            assert options.position == "none"
        elif name == "gated_deltanet":
            assert options.allow_neg_eigval and options.head_v_dim == 2 * options.head_k_dim


def test_kimi_linear_like_is_kda_three_to_one_with_latent_attention_and_moe():
    built = config("kimi_linear_like")
    mixers, feedforwards = mixers_and_feedforwards(built.layers)
    assert mixers == ["kda"] * 3 + ["latent_attention"] + ["kda"] * 3 + ["latent_attention"]
    assert feedforwards == ["mlp"] + ["moe"] * 7  # the first layer dense, as Kimi Linear
    for name, options in zip(built.layers, built.layer_options, strict=True):
        if name == "latent_attention":
            assert options.position == "none" and options.kv_lora_rank == 128
        elif name == "moe":
            assert (options.router, options.score_correction_bias) == ("sigmoid", True)
            assert (options.n_groups, options.topk_groups, options.n_shared_experts) == (2, 1, 1)


# One budget for the same-budget recipes.


def shared_sections(name: str) -> dict:
    """Everything but the name and the model section."""
    resolved = recipe(name).resolved()
    return {key: value for key, value in resolved.items() if key not in ("name", "model")}


@pytest.mark.parametrize("name", SAME_BUDGET[1:])
def test_same_budget_recipes_share_every_section_but_the_model(name):
    assert shared_sections(name) == shared_sections(SAME_BUDGET[0])
    assert config(name).d_model == config(SAME_BUDGET[0]).d_model


def test_same_budget_recipes_train_on_the_standard_library():
    data = recipe(SAME_BUDGET[0]).data
    assert data.source.format == "text"
    assert data.source.paths == ["{stdlib}/**/*.py"]
    assert data.source.exclude == ["*/site-packages/*", "*/dist-packages/*"]
    assert data.val_fraction == 0.01 and data.seq_len == 512
    assert recipe(SAME_BUDGET[0]).tokenizer.kind == "byte"


def test_same_budget_recipes_have_active_parameters_within_10_percent():
    counts = {name: active_parameters(name) for name in SAME_BUDGET}
    assert max(counts.values()) <= 1.10 * min(counts.values()), counts
    assert all(3e6 <= count <= 8e6 for count in counts.values()), counts  # CPU-sized


@pytest.mark.parametrize("name", SAME_BUDGET)
def test_the_parameter_count_in_the_comment_is_current(name):
    text = (RECIPES / f"{name}.yaml").read_text()
    stated = re.search(r"This recipe: ([\d,]+) active non-embedding parameters", text)
    assert stated, "state the active non-embedding parameter count in the header comment"
    assert int(stated.group(1).replace(",", "")) == active_parameters(name)


# The W&B sweep.


def sweep() -> dict:
    data = yaml.safe_load(SWEEP.read_text())
    assert isinstance(data, dict)
    return data


def agent_overrides(values: dict) -> list[str]:
    """The words wandb's agent puts in place of ${args_no_hyphens} for these values."""
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    except ImportError:  # wandb writes f"{name}={value}" per parameter
        return [f"{name}={value}" for name, value in values.items()]
    args = {name: {"value": value} for name, value in values.items()}
    return create_sweep_command_args({"args": args})["args_no_hyphens"]


def sweep_recipe_path() -> Path:
    recipes = [word for word in sweep()["command"] if str(word).endswith(".yaml")]
    assert len(recipes) == 1
    return ROOT / recipes[0]


def test_sweep_runs_hybrid_train_with_dotted_overrides():
    config = sweep()
    assert config["method"] in ("grid", "random", "bayes")
    assert config["metric"] == {"name": "val/loss", "goal": "minimize"}
    command = config["command"]
    assert command[0] == "${env}"
    assert command[1:3] == ["hybrid", "train"]
    assert command[-1] == "${args_no_hyphens}"
    assert sweep_recipe_path().is_file()
    assert {"model.pattern", "optim.lr"} <= set(config["parameters"])
    lr = config["parameters"]["optim.lr"]
    assert lr["distribution"] == "log_uniform_values" and 0 < lr["min"] < lr["max"]


def swept_values() -> list[tuple[str, object]]:
    """(parameter, value) for every listed value and the bounds of every distribution."""
    pairs = []
    for name, spec in sweep()["parameters"].items():
        if "values" in spec:
            pairs += [(name, value) for value in spec["values"]]
        elif "value" in spec:
            pairs.append((name, spec["value"]))
        else:
            pairs += [(name, spec["min"]), (name, spec["max"])]
    return pairs


@pytest.mark.parametrize(("name", "value"), swept_values(), ids=lambda item: str(item))
def test_every_swept_value_is_a_valid_recipe_override(name, value):
    loaded = load_recipe(sweep_recipe_path(), agent_overrides({name: value}))
    applied = loaded
    for part in name.split("."):
        applied = applied[part] if isinstance(applied, dict) else getattr(applied, part)
    if isinstance(value, float):
        assert applied == pytest.approx(value)
    else:
        assert applied == value
    loaded.hybrid_config(vocab_size=BYTE_VOCAB)


@pytest.mark.parametrize(
    "name, model_type",
    [
        ("qwen3_next_like", "qwen3_next"),
        ("lfm2_like", "lfm2"),
        ("falcon_h1_like", "falcon_h1"),
        ("olmo_hybrid_like", "olmo_hybrid"),
        ("kimi_linear_like", "kimi_linear"),
    ],
)
def test_anchor_recipes_are_expressible_as_their_transformers_type(name, model_type):
    """Each anchor layout is one its transformers class can hold (``to_hf``'s config side)."""
    from hybrid.convert import converter

    assert converter(model_type).config_to_hf(config(name))["model_type"] == model_type

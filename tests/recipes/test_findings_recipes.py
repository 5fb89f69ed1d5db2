"""The findings' recipes validate and differ only where the comparison says they do."""

from __future__ import annotations

from pathlib import Path

from hybrid.recipe import load_model_config, load_recipe

FINDINGS = Path(__file__).resolve().parents[2] / "recipes" / "findings"


def test_mqar_recipes_differ_only_in_the_layout():
    recipes = {
        path.stem: load_recipe(path).resolved() for path in sorted(FINDINGS.glob("mqar_*.yaml"))
    }
    patterns = {name: recipe["model"].pop("pattern") for name, recipe in recipes.items()}
    assert patterns == {
        "mqar_attention": "*-*-",
        "mqar_mamba2": "M-M-",
        "mqar_hybrid": "M-*-",
        "mqar_deltanet": "D-D-",
        "mqar_kda": "K-K-",
        "mqar_shortconv": "C-C-",
    }
    for recipe in recipes.values():
        recipe.pop("name")
    first, *others = recipes.values()
    assert all(other == first for other in others)
    assert first["data"]["source"]["format"] == "mqar"
    config = load_model_config(str(FINDINGS / "mqar_hybrid.yaml"))
    assert config.vocab_size == first["data"]["mqar"]["vocab_size"]


def test_passkey_recipes_differ_only_in_the_layout_and_the_window():
    recipes = {
        path.stem: load_recipe(path).resolved() for path in sorted(FINDINGS.glob("passkey_*.yaml"))
    }
    assert sorted(recipes) == ["passkey_attention", "passkey_mamba2_swa", "passkey_samba"]
    models = {name: recipe.pop("model") for name, recipe in recipes.items()}
    patterns = {name: model.pop("pattern") for name, model in models.items()}
    assert patterns == {
        "passkey_attention": "*-*-",
        "passkey_samba": "S-*-",
        "passkey_mamba2_swa": "M-*-",
    }
    assert "window" not in models["passkey_attention"]["attention"]  # full attention
    windows = {
        models[name]["attention"].pop("window") for name in ("passkey_samba", "passkey_mamba2_swa")
    }
    for recipe in recipes.values():
        recipe.pop("name")
    first, *others = recipes.values()
    assert all(other == first for other in others)
    assert first["data"]["source"]["format"] == "passkey"
    (window,) = windows
    assert window < first["data"]["seq_len"]  # the needle is usually beyond the window
    first_model, *other_models = models.values()
    assert all(model == first_model for model in other_models)

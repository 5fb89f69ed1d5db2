"""``init_from``: a run starts from another model's weights (fine-tuning)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from hybrid.checkpoint import load_model
from hybrid.cli import main
from hybrid.recipe import load_recipe
from hybrid.train.run import TrainError, train


class RecordStartWeights(pl.Callback):
    """Copies the model's weights when training starts (before the first step)."""

    def on_train_start(self, trainer, module) -> None:
        self.weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def train_source(tiny_recipe, **sections):
    """A 2-step run to start from; its recipe."""
    recipe = load_recipe(tiny_recipe(name="source", trainer={"max_steps": 2}, **sections))
    train(recipe, progress_bar=False)
    return recipe


@pytest.mark.parametrize("form", ["run", "model", "ckpt"])
def test_run_starts_from_the_source_weights_and_a_fresh_step_count(tiny_recipe, form):
    source = train_source(tiny_recipe).run_dir
    init_from = {
        "run": source,
        "model": source / "model",
        "ckpt": source / "checkpoints" / "last.ckpt",
    }[form]
    recipe = load_recipe(
        tiny_recipe(name="tuned", init_from=str(init_from), trainer={"max_steps": 3}, seed=11)
    )
    seen = RecordStartWeights()
    result = train(recipe, progress_bar=False, callbacks=[seen])
    expected = load_model(source).state_dict()
    assert seen.weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(seen.weights[name], tensor, rtol=0, atol=0, msg=name)
    assert result.steps == 3  # the step count and the schedule start afresh
    tuned = load_model(recipe.run_dir).state_dict()
    assert any(not torch.equal(tuned[name], expected[name]) for name in expected)


def test_without_init_from_the_same_seed_starts_elsewhere(tiny_recipe):
    source = train_source(tiny_recipe).run_dir
    seen = RecordStartWeights()
    train(load_recipe(tiny_recipe(name="fresh")), progress_bar=False, callbacks=[seen])
    expected = load_model(source).state_dict()
    assert not torch.equal(seen.weights["embedding.weight"], expected["embedding.weight"])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"d_model": 48}, "'embedding.weight' is (257, 32) there and (257, 48) in the recipe's"),
        ({"pattern": "M*"}, "has 'sublayers.2."),
        ({"pattern": "M*EE"}, "has no 'sublayers.3."),
    ],
)
def test_a_model_that_does_not_fit_fails_with_one_line(tiny_recipe, capsys, model, message):
    source = train_source(tiny_recipe).run_dir
    path = tiny_recipe(name="tuned", init_from=str(source), model=model)
    capsys.readouterr()
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"init_from: {source}" in err and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_options_without_weights_may_change(tiny_recipe):
    source = train_source(tiny_recipe).run_dir
    recipe = load_recipe(
        tiny_recipe(name="windowed", init_from=str(source), model={"attention": {"window": 8}})
    )
    assert train(recipe, progress_bar=False).steps == 6


def test_a_bpe_run_fine_tunes_with_the_source_tokenizer(tiny_recipe):
    bpe = {"kind": "bpe", "vocab_size": 300}
    source = train_source(tiny_recipe, tokenizer=bpe).run_dir
    recipe = load_recipe(
        tiny_recipe(name="tuned", init_from=str(source), tokenizer=bpe, trainer={"max_steps": 1})
    )
    train(recipe, progress_bar=False)
    tuned = recipe.run_dir / "tokenizer.json"
    assert tuned.read_text() == (source / "tokenizer.json").read_text()
    saved = load_recipe(recipe.run_dir / "recipe.yaml")
    assert saved.tokenizer.path == str(source / "model" / "tokenizer.json")


def test_resume_continues_from_its_own_checkpoint_not_init_from(tiny_recipe):
    source = train_source(tiny_recipe).run_dir
    path = tiny_recipe(name="tuned", init_from=str(source), trainer={"max_steps": 2})
    recipe = load_recipe(path)
    train(recipe, progress_bar=False)
    own = load_model(recipe.run_dir / "checkpoints" / "last.ckpt").state_dict()
    with pytest.raises(TrainError, match="already holds a run"):
        train(recipe, progress_bar=False)
    longer = load_recipe(path, ["trainer.max_steps=4"])
    seen = RecordStartWeights()
    train(longer, resume=True, progress_bar=False, callbacks=[seen])
    for name, tensor in own.items():
        torch.testing.assert_close(seen.weights[name], tensor, rtol=0, atol=0, msg=name)


def test_a_sources_modules_are_imported_only_with_trust_remote_code(
    tiny_recipe, tmp_path, monkeypatch, capsys
):
    """The module writes a file when imported: without --trust-remote-code it never runs."""
    module = "lab_blocks_for_init_from_trust_test"
    (tmp_path / f"{module}.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('ran')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    source = train_source(tiny_recipe).run_dir / "model"
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "modules": [module]}))
    ran = tmp_path / f"{module}.ran"
    path = tiny_recipe(name="tuned", init_from=str(source))
    capsys.readouterr()
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"init_from: {source}" in err and "--trust-remote-code" in err, err
    assert err.count("\n") == 1 and not ran.exists()
    assert not (load_recipe(path).run_dir / "checkpoints").exists()
    assert main(["train", str(path), "--no-progress", "--trust-remote-code"]) == 0
    assert ran.exists()

"""`hybrid train` in-process on a tiny recipe: outputs, logged metrics, resume, bad input."""

from __future__ import annotations

import math
import os
import shutil
import signal

import lightning.pytorch as pl
import pytest
import torch
import yaml

from hybrid.checkpoint import load_model, read_training_checkpoint, resolve_checkpoint
from hybrid.cli import main
from hybrid.recipe import load_recipe, validate_recipe
from hybrid.train.module import (
    NonFiniteLossError,
    NonFiniteWeightsError,
    first_non_finite_parameter,
)
from hybrid.train.optim import lr_multiplier
from hybrid.train.run import train
from tests.train.conftest import TINY_RECIPE
from tests.train.runs import read_metrics, train_losses


class CtrlCAfter(pl.Callback):
    """Sends this process a SIGINT (Ctrl-C) once ``steps`` optimizer steps are done."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.steps:
            os.kill(os.getpid(), signal.SIGINT)
            self.steps = -1  # once (with accumulation, several micro-batches end at a step)


class PoisonWeights(pl.Callback):
    """Makes the loss NaN from optimizer step ``step`` on."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, *_):
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.model.final_norm.weight.fill_(float("nan"))


class PoisonUpdate(pl.Callback):
    """Makes the gradients of optimizer step ``step`` infinite: a finite loss whose update
    turns the weights to NaN (as a learning rate or an init far too large does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == self.step:
            module.model.final_norm.weight.grad.fill_(float("inf"))


def weights(path) -> dict[str, torch.Tensor]:
    return read_training_checkpoint(path)["state_dict"]


def test_run_writes_recipe_checkpoints_model_and_metrics(tiny_recipe):
    recipe = load_recipe(tiny_recipe())
    result = train(recipe, progress_bar=False)
    run = recipe.run_dir
    assert result.steps == 6 and result.val_loss is not None and math.isfinite(result.val_loss)
    assert validate_recipe(yaml.safe_load((run / "recipe.yaml").read_text())) == recipe
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step000006.ckpt"], ckpts  # keep=1: the newest step file
    assert read_training_checkpoint(run / "checkpoints" / "last.ckpt")["meta"]["recipe"] == (
        recipe.resolved()
    )
    assert {p.name for p in (run / "model").iterdir()} >= {"config.json", "model.safetensors"}
    assert result.sample.startswith(recipe.eval.prompt)

    rows = read_metrics(run)
    losses = train_losses(run)
    assert sorted(losses) == list(range(6))
    columns = set().union(*rows)
    expected = {"train/loss", "train/ppl", "val/loss", "val/ppl", "lr", "grad_norm"}
    expected |= {"tokens_per_s", "tokens_seen", "train/aux_loss"}
    expected |= {f"moe/layer2/expert{e}" for e in range(4)}
    expected |= {"moe/layer2/load_balance_loss", "moe/layer2/router_entropy"}
    assert expected <= columns, expected - columns
    for row in rows:
        if "train/ppl" in row:
            assert row["train/ppl"] == pytest.approx(math.exp(row["train/loss"]), rel=1e-5)
        if "moe/layer2/expert0" in row:
            fractions = [row[f"moe/layer2/expert{e}"] for e in range(4)]
            assert sum(fractions) == pytest.approx(1.0)
    multiplier = lr_multiplier(recipe.schedule, recipe.trainer.max_steps)
    lrs = {int(r["step"]): r["lr"] for r in rows if "lr" in r}
    for step, lr in lrs.items():
        assert lr == pytest.approx(recipe.optim.lr * multiplier(step)), step
    tokens_per_step = recipe.trainer.micro_batch_size * recipe.data.seq_len
    seen = sorted(r["tokens_seen"] for r in rows if "tokens_seen" in r)
    assert seen[-1] == 6 * tokens_per_step and all(s % tokens_per_step == 0 for s in seen)

    hparams = yaml.safe_load(next((run / "csv").glob("version_*/hparams.yaml")).read_text())
    model = load_model(run)
    assert hparams["params/active"] == model.num_parameters(active=True)
    assert hparams["pattern"] == "M*E" and hparams["cache/bytes_per_token"] > 0
    assert "git_commit" in hparams and hparams["data"]["unigram_val_loss"] > 0


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_recipe):
    whole = load_recipe(tiny_recipe(name="whole", trainer={"grad_accum": 2}))
    train(whole, progress_bar=False)
    split = load_recipe(tiny_recipe(name="split", trainer={"grad_accum": 2}))
    first = train(split, progress_bar=False, callbacks=[CtrlCAfter(3)])
    assert first.interrupted and first.steps == 4  # stops at the end of the next step
    second = train(split, resume=True, progress_bar=False)
    assert second.steps == 6

    expected, got = train_losses(whole.run_dir), train_losses(split.run_dir)
    assert sorted(got) == sorted(expected) == list(range(6))
    for step in range(6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    a = weights(whole.run_dir / "checkpoints" / "last.ckpt")
    b = weights(split.run_dir / "checkpoints" / "last.ckpt")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_recipe):
    recipe = load_recipe(tiny_recipe())
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(recipe, progress_bar=False, callbacks=[PoisonWeights(3)])
    last = recipe.run_dir / "checkpoints" / "last.ckpt"
    state = weights(last)
    assert all(torch.isfinite(t).all() for t in state.values())
    assert torch.load(last, weights_only=True)["global_step"] == 2
    load_model(last)  # still loads


def test_nonfinite_weights_from_a_finite_loss_are_never_checkpointed(tiny_recipe):
    recipe = load_recipe(tiny_recipe(checkpoint={"every_steps": 1}))
    message = r"final_norm\.weight is not finite after step 4"
    with pytest.raises(NonFiniteWeightsError, match=message):
        train(recipe, progress_bar=False, callbacks=[PoisonUpdate(3)])
    last = recipe.run_dir / "checkpoints" / "last.ckpt"
    assert all(torch.isfinite(t).all() for t in weights(last).values())
    assert torch.load(last, weights_only=True)["global_step"] == 3
    for step_file in (recipe.run_dir / "checkpoints").glob("step*.ckpt"):
        assert all(torch.isfinite(t).all() for t in weights(step_file).values()), step_file


def test_first_non_finite_parameter_names_it():
    layer = torch.nn.Linear(3, 2)
    assert first_non_finite_parameter(layer) is None
    with torch.no_grad():
        layer.bias[1] = float("nan")
    assert first_non_finite_parameter(layer) == "bias"
    with torch.no_grad():
        layer.weight[0, 0] = float("-inf")
    assert first_non_finite_parameter(layer) == "weight"


def test_generate_from_a_training_checkpoint_without_the_recipe(tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe())
    train(recipe, progress_bar=False)
    capsys.readouterr()
    last = recipe.run_dir / "checkpoints" / "last.ckpt"
    model = load_model(last)
    prompt = "import json"
    ids = torch.tensor([list(prompt.encode())])
    expected = model.generate(ids, 10)[0, ids.shape[1] :].tolist()
    text = bytes(t for t in expected if t < 256).decode("utf-8", errors="replace")
    for checkpoint in (last, recipe.run_dir):
        code = main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompt,
                     "--max-new-tokens", "10", "--temperature", "0"])  # fmt: skip
        assert code == 0
        assert capsys.readouterr().out == prompt + text + "\n"


def test_corrupt_checkpoints_fail_with_one_line(tiny_recipe, capsys):
    path = tiny_recipe()
    recipe = load_recipe(path)
    train(recipe, progress_bar=False)
    last = recipe.run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    code = main(["generate", "--checkpoint", str(last), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "last.ckpt: not a readable checkpoint" in err and err.count("\n") == 1
    code = main(["train", str(path), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "last.ckpt: not a readable checkpoint" in err and err.count("\n") == 1


def test_existing_run_needs_resume_and_resume_needs_a_run(tiny_recipe, capsys):
    path = tiny_recipe(trainer={"max_steps": 2})
    assert main(["train", str(path), "--resume", "--no-progress"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(["train", str(path), "--no-progress"]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert main(["train", str(path), "--no-progress"]) == 2
    assert "already holds a run; add --resume" in capsys.readouterr().err


def test_resume_refuses_a_changed_model(tiny_recipe, capsys):
    path = tiny_recipe(trainer={"max_steps": 2})
    assert main(["train", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "model.d_model=48", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained with another model config" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"source": {"format": "text", "paths": ["/nonexistent/*.txt"]}}}, "paths"),
        ({"optim": {"lrr": 1.0}}, "optim.lrr: unknown key; did you mean 'optim.lr'?"),
        ({"trainer": {"max_steps": "many"}}, "trainer.max_steps:"),
        ({"model": {"pattern": "MQ"}}, "model."),
        ({"empty": True}, "empty"),
        ({"trainer": {"strategy": "fsdp", "accelerator": "cpu"}}, "trainer.strategy: fsdp"),
        ({"data": {"document_boundaries": "split"}}, "data.document_boundaries:"),
        ({"trainer": {"activation_checkpointing": -1}}, "trainer.activation_checkpointing:"),
        ({"init_from": "/nonexistent/run"}, "init_from: /nonexistent/run: no such checkpoint"),
    ],
)
def test_bad_input_fails_before_the_model_is_built(
    tiny_recipe, tmp_path, monkeypatch, capsys, change, message
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr("hybrid.train.module.HybridLM", no_model)
    if change.pop("empty", False):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "a.txt").write_text("")
        change = {"data": {"source": {"format": "text", "paths": [str(tmp_path / "empty/*.txt")]}}}
    path = tiny_recipe(**change)
    code = main(["train", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_bpe_run_saves_its_tokenizer_for_generation_and_resume(tiny_recipe, capsys):
    path = tiny_recipe(tokenizer={"kind": "bpe", "vocab_size": 300}, trainer={"max_steps": 2})
    recipe = load_recipe(path)
    train(recipe, progress_bar=False)
    capsys.readouterr()
    saved = (recipe.run_dir / "tokenizer.json").read_text()
    assert load_model(recipe.run_dir).config.vocab_size == 300
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(saved)
    prompt = "def dumps(obj):"
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    model = load_model(recipe.run_dir)
    new = model.generate(ids, 6)[0, ids.shape[1] :].tolist()
    expected = tokenizer.decode(ids[0].tolist() + new)
    for checkpoint in (recipe.run_dir / "checkpoints" / "last.ckpt", recipe.run_dir):
        code = main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompt,
                     "--max-new-tokens", "6", "--temperature", "0"])  # fmt: skip
        assert code == 0
        assert capsys.readouterr().out.rstrip("\n") == expected.rstrip("\ufffd")
    # a resumed run reuses the saved tokenizer instead of training a new one
    resumed = load_recipe(path, ["trainer.max_steps=3"])
    assert train(resumed, resume=True, progress_bar=False).steps == 3
    assert (recipe.run_dir / "tokenizer.json").read_text() == saved


def test_convert_to_hf_of_a_training_checkpoint_writes_its_stored_tokenizer(tiny_recipe, capsys):
    """``hybrid convert --to-hf`` on a ``.ckpt``: the model inside it, and the BPE tokenizer
    stored in it written as tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    model = {"pattern": "*-", "mamba2": {}, "moe": {}}
    path = tiny_recipe(model=model, tokenizer={"kind": "bpe", "vocab_size": 300},
                       trainer={"max_steps": 2})  # fmt: skip
    recipe = load_recipe(path)
    train(recipe, progress_bar=False)
    last, out = recipe.run_dir / "checkpoints" / "last.ckpt", recipe.run_dir.parent / "hf"
    code = main(["convert", "--to-hf", str(last), "--model-type", "llama", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "tokenizer.json").read_text() == (recipe.run_dir / "tokenizer.json").read_text()
    theirs = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, load_model(last)(ids).logits)


USER_BLOCK = """
from dataclasses import dataclass
import torch
from hybrid import Block, register_block

@dataclass
class GainOptions:
    init: float = 1.0

    def resolve(self, d_model, where):
        return self

@register_block("recipe_gain", symbol="G", options=GainOptions, role="feedforward")
class Gain(Block):
    def __init__(self, d_model, options, layer_idx):
        super().__init__(d_model, options, layer_idx)
        self.weight = torch.nn.Parameter(torch.full((d_model,), options.init))

    def forward(self, hidden):
        return hidden * self.weight
"""


def test_user_blocks_from_modules_listed_in_the_recipe(tiny_recipe, tmp_path, monkeypatch):
    (tmp_path / "lab_gain_blocks.py").write_text(USER_BLOCK)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = {**TINY_RECIPE["model"], "pattern": "M*G", "modules": ["lab_gain_blocks"],
             "blocks": {"recipe_gain": {"init": 0.5}}}  # fmt: skip
    recipe = load_recipe(tiny_recipe(model=model, trainer={"max_steps": 2}))
    result = train(recipe, progress_bar=False)
    assert result.steps == 2
    loaded = load_model(recipe.run_dir)
    assert loaded.config.layers == ["mamba2", "attention", "recipe_gain"]
    gain = loaded.state_dict()["sublayers.2.block.weight"]
    assert not torch.allclose(gain, torch.full_like(gain, 0.5))  # trained


def test_bf16_mixed_precision_trains(tiny_recipe):
    """The precision plumbing (on CPU: torch.autocast to bfloat16; ``auto`` picks it on GPU)."""
    recipe = load_recipe(tiny_recipe(trainer={"max_steps": 3, "precision": "bf16-mixed"}))
    result = train(recipe, progress_bar=False)
    assert result.steps == 3 and math.isfinite(result.val_loss)
    losses = train_losses(recipe.run_dir)
    assert all(math.isfinite(v) for v in losses.values()) and losses[2] < losses[0]


def test_training_flops_per_token_counts_matmuls_and_attention():
    from hybrid import HybridConfig
    from hybrid.train.run import training_flops_per_token

    config = HybridConfig(
        pattern="*-*-", vocab_size=100, d_model=64, attention={"n_heads": 4, "window": 16}
    )
    d, hidden = 64, config.layer_options[1].hidden_size
    per_layer = 4 * d * d + 3 * d * hidden + 2 * d  # q, k, v, o; gate, up, down; two norms
    matmul_params = 2 * per_layer + d  # plus the final norm
    attention = 2 * 6 * 4 * 16 * 16  # per layer: 6 x heads x head_dim x min(window, L)
    expected = 6 * matmul_params + 6 * 100 * 64 + attention
    assert training_flops_per_token(config, seq_len=128) == expected


def test_progress_bar_in_a_log_file_redraws_at_the_log_cadence(tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe(trainer={"max_steps": 6, "log_every": 3, "val_every": 6}))
    train(recipe, progress_bar=True)  # captured stdout is not a terminal
    out = capsys.readouterr().out
    shown = {step for step in range(7) if f"| {step}/6 [" in out}
    assert shown <= {0, 3, 6} and {3, 6} <= shown, out
    assert out.count("| 3/6 [") == 1, out  # one line per redraw


def test_resume_applies_changed_optimizer_settings_and_says_so(tiny_recipe, capsys):
    path = tiny_recipe(schedule={"kind": "constant", "warmup_steps": 0})
    first = train(load_recipe(path), progress_bar=False, callbacks=[CtrlCAfter(2)])
    assert first.interrupted and first.steps == 3
    capsys.readouterr()
    changed = load_recipe(path, ["optim.lr=5e-4", "optim.weight_decay=0.02",
                                 "optim.betas=[0.8,0.9]"])  # fmt: skip
    train(changed, resume=True, progress_bar=False)
    err = capsys.readouterr().err
    assert "resume: applied optim.lr: 0.003 -> 0.0005; optim.weight_decay: 0.1 -> 0.02; " \
        "optim.betas: (0.9, 0.95) -> (0.8, 0.9)" in err  # fmt: skip
    lrs = {int(r["step"]): r["lr"] for r in read_metrics(changed.run_dir) if "lr" in r}
    assert [lrs[s] for s in (0, 1, 2)] == pytest.approx([3e-3] * 3)
    assert [lrs[s] for s in (3, 4, 5)] == pytest.approx([5e-4] * 3)  # what recipe.yaml says
    state = torch.load(changed.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    groups = state["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.02, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.9) and g["lr"] == pytest.approx(5e-4) for g in groups)
    assert yaml.safe_load((changed.run_dir / "recipe.yaml").read_text())["optim"]["lr"] == 5e-4


def checkpoint_names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_off_grid_stops_and_resumes_leave_no_versioned_last_checkpoints(tiny_recipe):
    """Lightning's ModelCheckpoint, finding a last.ckpt it did not write (StopAndSave's, at a
    Ctrl-C off the step grid), used to add last-v1.ckpt, last-v2.ckpt, ... at validations."""
    path = tiny_recipe(trainer={"max_steps": 400, "val_every": 2},
                       checkpoint={"every_steps": 1000})  # fmt: skip
    first = train(load_recipe(path), progress_bar=False, callbacks=[CtrlCAfter(3)])
    assert first.interrupted
    assert checkpoint_names(first.run_dir) == ["last.ckpt"]
    train(load_recipe(path), resume=True, progress_bar=False, callbacks=[CtrlCAfter(6)])
    assert checkpoint_names(first.run_dir) == ["last.ckpt"]
    train(load_recipe(path, ["trainer.max_steps=9"]), resume=True, progress_bar=False)
    assert checkpoint_names(first.run_dir) == ["last.ckpt"]
    last = first.run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 9


def test_orphan_step_checkpoints_of_a_killed_run_are_pruned_to_keep(tiny_recipe):
    path = tiny_recipe(checkpoint={"every_steps": 2, "keep": 2})
    run = train(load_recipe(path), progress_bar=False).run_dir
    assert checkpoint_names(run) == ["last.ckpt", "step000004.ckpt", "step000006.ckpt"]
    # A kill between writing a step file and removing the oldest leaves one too many.
    shutil.copy(run / "checkpoints" / "step000004.ckpt", run / "checkpoints" / "step000002.ckpt")
    train(load_recipe(path, ["trainer.max_steps=8"]), resume=True, progress_bar=False)
    assert checkpoint_names(run) == ["last.ckpt", "step000006.ckpt", "step000008.ckpt"]


def test_a_run_killed_while_exporting_falls_back_to_its_last_checkpoint(tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe())
    run = train(recipe, progress_bar=False).run_dir
    shutil.rmtree(run / "model")
    (run / "model").mkdir()
    (run / "model" / ".model.safetensors.123.abcd.tmp").write_bytes(b"partial")
    assert resolve_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(run), "--prompt", "import", "--max-new-tokens", "3"]
    assert main(argv) == 0, capsys.readouterr().err

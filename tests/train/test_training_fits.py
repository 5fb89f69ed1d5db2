"""``check_training_fits``: a run too large for its memory is refused before anything starts,
on the CPU and on GPUs (whose free memory is stood in for here)."""

from __future__ import annotations

import pytest
import torch

import hybrid.memory
from hybrid.model import HybridLM
from hybrid.recipe import load_recipe, vocab_size
from hybrid.train import run

GIB = 1024**3


def parameters_of(recipe) -> int:
    with torch.device("meta"):
        return HybridLM(recipe.hybrid_config(vocab_size(recipe))).num_parameters()


@pytest.fixture
def memory(monkeypatch):
    """Free bytes per device type, as the test sets them; the run is on a GPU."""
    free = {"cpu": 64 * GIB, "cuda": 80 * GIB}
    seen = []

    def available(device="cpu"):
        device = torch.device(device)
        seen.append(device)
        return free[device.type]

    monkeypatch.setattr(hybrid.memory, "available_bytes", available)
    monkeypatch.setattr(run, "_on_gpu", lambda recipe: True)
    return free, seen


def gpu_recipe(tiny_recipe, **trainer):
    return load_recipe(
        tiny_recipe(model={"d_model": 4096}, trainer={"accelerator": "gpu", **trainer})
    )


def test_a_gpu_run_checks_the_host_for_building_and_the_gpu_for_training(tiny_recipe, memory):
    free, seen = memory
    recipe = gpu_recipe(tiny_recipe)
    parameters = parameters_of(recipe)
    free["cuda"] = 16 * parameters + 10 * GIB
    run.check_training_fits(recipe)  # fits
    assert [device.type for device in seen] == ["cpu", "cuda"]
    free["cuda"] = 16 * parameters - 1
    with pytest.raises(ValueError, match=r"training .* the logits .* free on cuda:0"):
        run.check_training_fits(recipe)
    free["cpu"] = 4 * parameters - 1
    with pytest.raises(ValueError, match=r"building .* float32 parameters: .* free on cpu$"):
        run.check_training_fits(recipe)


def test_fsdp_divides_the_training_state_over_the_devices(tiny_recipe, memory, monkeypatch):
    free, _ = memory
    recipe = gpu_recipe(tiny_recipe, devices=4, strategy="fsdp")
    parameters = parameters_of(recipe)
    free["cuda"] = 16 * parameters // 2  # half of the whole: too little unsharded, enough / 4
    run.check_training_fits(recipe)
    with pytest.raises(ValueError, match="sharded over 4 devices"):
        free["cuda"] = 16 * parameters // 4 - 1
        run.check_training_fits(recipe)
    with pytest.raises(ValueError, match="free on cuda:0"):
        free["cuda"] = 16 * parameters // 2
        run.check_training_fits(gpu_recipe(tiny_recipe, devices=4, strategy="ddp"))
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match="free on cuda:3"):
        run.check_training_fits(gpu_recipe(tiny_recipe, devices=4, strategy="ddp"))

"""trainer.threads and trainer.flush_denormal: set for a run, restored after, on every thread."""

from __future__ import annotations

import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch

from hybrid.recipe import load_recipe
from hybrid.train.cpu import cpu_settings, subnormals
from hybrid.train.run import train


def subnormals_left(numel: int) -> int:
    """Nonzero entries of subnormal * 1.5 over ``numel`` elements (0 where flushed)."""
    return int((subnormals(numel) * 1.5).count_nonzero())


def test_the_probe_values_are_subnormal_floats():
    values = subnormals(4)
    assert (values > 0).all() and (values < torch.finfo(torch.float32).tiny).all()


def run_fresh(code: str) -> str:
    """Runs ``code`` in a fresh Python process with 2 torch threads; its stdout."""
    script = f"import torch\ntorch.set_num_threads(2)\n{code}"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_flushing_before_the_first_parallel_op_reaches_every_thread():
    out = run_fresh(
        "from hybrid.train.cpu import flush_denormals, subnormals\n"
        "print(flush_denormals(), int((subnormals(1 << 20) * 1.5).count_nonzero()))"
    )
    supported, left = out.split()
    if supported == "None":
        pytest.skip("this CPU has no flush-to-zero mode")
    assert (supported, left) == ("True", "0")


def test_flushing_after_the_pool_started_is_reported_as_partial():
    out = run_fresh(
        "(torch.randn(1 << 20) * 2).sum()  # starts the thread pool\n"
        "from hybrid.train.cpu import flush_denormals, subnormals\n"
        "print(flush_denormals(), int((subnormals(1 << 20) * 1.5).count_nonzero()))"
    )
    supported, left = out.split()
    if supported == "None":
        pytest.skip("this CPU has no flush-to-zero mode")
    assert supported == "False" and int(left) > 0


def test_cpu_settings_hold_inside_and_are_restored_after():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this process's pool started long ago
        with cpu_settings(1, flush_denormal=True):
            assert torch.get_num_threads() == 1
            assert subnormals_left(1) == 0
    assert torch.get_num_threads() == threads
    assert subnormals_left(1) == 1
    with cpu_settings(None, flush_denormal=False):
        assert subnormals_left(1) == 1


class RecordSettings(pl.Callback):
    """Records the thread count and whether this thread flushes, at the first step."""

    def on_train_start(self, trainer, module) -> None:
        self.threads = torch.get_num_threads()
        self.flushes = subnormals_left(1) == 0


@pytest.mark.parametrize("flush", [True, False])
def test_train_runs_with_the_recipe_settings(tiny_recipe, flush):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    recipe = load_recipe(
        tiny_recipe(trainer={"max_steps": 1, "threads": 1, "flush_denormal": flush})
    )
    threads = torch.get_num_threads()
    seen = RecordSettings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(recipe, progress_bar=False, callbacks=[seen])
    assert (seen.threads, seen.flushes) == (1, flush)
    assert torch.get_num_threads() == threads and subnormals_left(1) == 1

"""The run's loss-curve PNG and the duration estimate printed at the start."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from hybrid.recipe import load_recipe
from hybrid.train.callbacks import DurationEstimate, human_duration
from hybrid.train.curves import read_losses
from hybrid.train.run import train
from tests.train.runs import read_metrics


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_a_finished_run_draws_its_loss_curve(tiny_recipe, capsys):
    recipe = load_recipe(tiny_recipe())
    result = train(recipe, progress_bar=False)
    assert result.loss_curve == recipe.run_dir / "loss_curve.png"
    width, height = png_size(result.loss_curve)
    assert width > 300 and height > 200
    curve = read_losses(recipe.run_dir, recipe.trainer.max_steps)
    logged = {int(r["step"]) + 1: r["train/loss"] for r in read_metrics(recipe.run_dir)
              if "train/loss" in r}  # fmt: skip
    assert curve.train == logged and sorted(curve.train) == [1, 2, 3, 4, 5, 6]
    assert sorted(curve.val) == [3, 6]  # val_every 3; the final validation is step 6 again
    assert "estimated time to finish: about" in capsys.readouterr().out


def test_the_curve_merges_resumed_sessions(tmp_path):
    header = "epoch,step,train/loss,val/loss\n"
    for version, rows in (
        (0, "0,0,3.0,\n0,1,2.5,\n0,1,,2.6\n"),
        (1, "0,1,2.4,\n0,2,2.0,\n1,3,,1.9\n"),
    ):
        folder = tmp_path / "csv" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text(header + rows)
    curve = read_losses(tmp_path, max_steps=3)
    assert curve.train == {1: 3.0, 2: 2.4, 3: 2.0}  # the later session's step 2 wins
    assert curve.val == {2: 2.6, 3: 1.9}  # the after-fit validation logs max_steps itself


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_estimate_times_steps_after_the_first(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("hybrid.train.callbacks.time.perf_counter", clock)
    lines: list[str] = []
    estimate = DurationEstimate(val_every=50, val_batches=6, grad_accum=1, skip=1, measure=4,
                                write=lines.append)  # fmt: skip
    trainer = SimpleNamespace(global_step=0, max_steps=100, is_global_zero=True)
    durations = [30.0] + [2.0] * 10  # a slow first step (allocations), then 2 s each
    for duration in durations:
        clock.now += duration
        trainer.global_step += 1
        estimate.on_train_batch_end(trainer)
    assert len(lines) == 1
    # Timed from the end of step 1 to that of step 5: 2 s/step; 95 steps left and 2
    # validations of 6 batches at a third of a step each.
    assert estimate.estimate_s == pytest.approx(95 * 2.0 + 2 * 6 * 2.0 / 3)
    assert lines[0].startswith("estimated time to finish: about 3 min 18 s (95 more steps")


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(40.2, "about 40 s"), (95, "about 1 min 35 s"), (4000, "about 1 h 6 min")],
)
def test_human_duration(seconds, words):
    assert human_duration(seconds) == words

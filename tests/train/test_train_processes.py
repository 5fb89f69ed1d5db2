"""`hybrid train` as separate processes: 2-process DDP on CPU (gloo), Ctrl-C, kill -9, and
an offline W&B run read back from its run file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hybrid.checkpoint import read_training_checkpoint
from tests.train.runs import read_metrics, train_losses
from tests.train.wandb_reader import read_config, read_history, read_summary

HYBRID = [sys.executable, "-m", "hybrid.cli"]


def environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **extra}
    env.pop("WANDB_API_KEY", None)
    return env


def run_hybrid(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HYBRID, *args], capture_output=True, text=True, timeout=timeout, env=environment(**env)
    )


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tiny_recipe):
    # The MoE balance / z losses are computed per rank on its own micro-batch (as Megatron's
    # default does), which is not linear in the batch; without them everything is.
    model = {"moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 32,
                     "aux_loss_weight": 0.0, "z_loss_weight": 0.0}}  # fmt: skip
    one = tiny_recipe(name="one", model=model, trainer={"micro_batch_size": 4, "max_steps": 4})
    two = tiny_recipe(
        name="two",
        model=model,
        trainer={
            "micro_batch_size": 2,
            "max_steps": 4,
            "devices": 2,
            "strategy": "ddp",
            "accelerator": "cpu",
        },
    )
    for recipe in (one, two):
        done = run_hybrid("train", str(recipe), "--no-progress")
        assert done.returncode == 0, done.stderr[-3000:]
    runs = one.parent / "runs"
    expected, got = train_losses(runs / "one"), train_losses(runs / "two")
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    a = read_training_checkpoint(runs / "one" / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_training_checkpoint(runs / "two" / "checkpoints" / "last.ckpt")["state_dict"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_a_checkpoint_that_resumes(tiny_recipe, signum, code):
    path = tiny_recipe(trainer={"max_steps": 400}, checkpoint={"every_steps": 1000})
    run = path.parent / "runs" / "tiny"
    process = subprocess.Popen(
        [*HYBRID, "train", str(path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
    )  # fmt: skip
    wait_for(lambda: len(train_losses(run)) >= 3 if run.exists() else False, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    assert f"interrupted by {signal.Signals(signum).name} at step" in err and "--resume" in err
    last = run / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step < 400
    done = run_hybrid("train", str(path), "trainer.max_steps=" + str(step + 2), "--resume",
                      "--no-progress")  # fmt: skip
    # a changed max_steps changes the schedule, not the model: resuming is allowed
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == step + 2


def test_a_second_run_in_the_same_directory_is_refused_naming_the_holder(tiny_recipe):
    path = tiny_recipe(trainer={"max_steps": 100_000}, checkpoint={"every_steps": 2, "keep": 1})
    run = path.parent / "runs" / "tiny"
    first = subprocess.Popen(
        [*HYBRID, "train", str(path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
    )  # fmt: skip
    try:
        wait_for(lambda: (run / "checkpoints" / "last.ckpt").is_file(), first)
        for extra in ([], ["--resume"]):
            second = run_hybrid("train", str(path), *extra, "--no-progress")
            assert second.returncode == 2, second.stderr[-3000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr[-3000:]
            assert f"another hybrid train is running in it (PID {first.pid} on" in lines[0]
            assert "Traceback" not in second.stderr
            assert first.poll() is None  # the first run goes on
            assert len(sorted((run / "csv").glob("version_*"))) == 1, "a second log was started"
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130
    assert not (run / ".lock.owner").exists()
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    done = run_hybrid("train", str(path), f"trainer.max_steps={step + 1}", "--resume",
                      "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]  # the lock went with the first process


def test_kill_9_never_leaves_an_unloadable_last_checkpoint(tiny_recipe):
    path = tiny_recipe(trainer={"max_steps": 400}, checkpoint={"every_steps": 1, "keep": 1})
    last = path.parent / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    for delay in (0.0, 0.37, 0.81):
        resume = ["--resume"] if last.exists() else []
        process = subprocess.Popen(
            [*HYBRID, "train", str(path), "--no-progress", *resume],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment(),
        )  # fmt: skip
        wait_for(last.exists, process)
        time.sleep(delay)
        process.kill()
        process.wait()
        checkpoint = torch.load(last, weights_only=True)
        assert checkpoint["global_step"] > 0
        read_training_checkpoint(last)
    leftovers = [p.name for p in last.parent.iterdir() if not p.name.endswith(".ckpt")]
    assert not leftovers or all(name.startswith(".") for name in leftovers), leftovers
    # Resumed to the end, the CSV log (all launches together) has a loss for every step.
    final = torch.load(last, weights_only=True)["global_step"] + 2
    done = run_hybrid("train", str(path), f"trainer.max_steps={final}", "--resume",
                      "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logged = train_losses(path.parent / "runs" / "tiny")
    assert set(range(final)) <= set(logged), sorted(set(range(final)) - set(logged))


def test_offline_wandb_run_contains_the_logged_metrics(tiny_recipe):
    path = tiny_recipe(logging={"wandb": True, "wandb_mode": "offline", "project": "test"})
    done = run_hybrid("train", str(path), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    run = path.parent / "runs" / "tiny"
    assert "wandb sync" in done.stdout
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history = read_history(files[0])
    logged = {int(row["trainer/global_step"]): row["train/loss"] for row in history
              if "train/loss" in row}  # fmt: skip
    assert logged == pytest.approx(train_losses(run), rel=1e-6)
    assert any("val/loss" in row for row in history)
    assert any("moe/layer2/router_entropy" in row for row in history)
    # the end of the run: the loss-curve image and the sample
    images = [row for row in history if "loss_curve/_type" in row]  # nested keys, flattened
    assert len(images) == 1 and images[0]["loss_curve/_type"] == "images/separated", images
    (image,) = images[0]["loss_curve/filenames"]
    assert (files[0].parent / "files" / image).is_file()
    summary = read_summary(files[0])
    assert summary["eval/sample"] and summary["eval/sample"] in done.stdout  # printed too
    config = read_config(files[0])
    csv_params = read_metrics(run)
    assert csv_params and config["pattern"] == "M*E"
    assert config["recipe"]["trainer"]["max_steps"] == 6 and config["params/active"] > 0

"""Lightning callbacks and plugins: throughput (tokens/s, tokens seen, MFU on GPU), the final /
Ctrl-C checkpoint, and atomic checkpoint files."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar

from hybrid.atomic import atomic_path, stale_temporaries
from hybrid.checksum import CHECKPOINT_KEY, structure_digest

# Dense bf16 peak FLOP/s by device name fragment (no sparsity), for MFU on GPU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class Throughput(pl.Callback):
    """Logs ``tokens_per_s`` (also on the progress bar), ``tokens_seen`` and, on a GPU with a
    known peak, ``mfu`` = achieved model FLOP/s / peak (``flops_per_token`` counts forward +
    backward: 6 x active parameters plus the attention scores).

    Args:
        tokens_per_step: tokens in one optimizer step over all devices.
        flops_per_token: training FLOPs per token.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self._last_step: int | None = None
        self._last_time = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_) -> None:
        step = trainer.global_step
        now = time.perf_counter()
        if self._last_step is None:
            self._last_step, self._last_time = step, now
            return
        if step == self._last_step:
            return  # inside gradient accumulation
        rate = (step - self._last_step) * self.tokens_per_step / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        metrics = {"tokens_per_s": rate, "tokens_seen": float(step * self.tokens_per_step)}
        peak = peak_flops(pl_module.device)
        if peak is not None:
            metrics["mfu"] = rate * self.flops_per_token / (peak * trainer.world_size)
        pl_module.log_dict(metrics, rank_zero_only=True)
        pl_module.log("tok/s", rate, prog_bar=True, logger=False, rank_zero_only=True)


class StopAndSave(pl.Callback):
    """Writes ``last.ckpt`` at the final step, and turns Ctrl-C and SIGTERM into a clean stop.

    The first SIGINT or SIGTERM (what ``timeout``, SLURM and ``docker stop`` send) asks the run
    to stop: at the end of the current optimizer step (every rank agrees on which: the request
    is all-reduced) ``last.ckpt`` is written and fit returns, so ``--resume`` continues exactly
    there; ``signal_name`` says which signal it was. A second signal interrupts at once.
    Checkpoints are written from ``on_train_batch_end``, the point Lightning's loops expect to
    resume from.

    Args:
        path: the ``last.ckpt`` path.
        every_steps: the step-checkpoint period (those steps already write ``last.ckpt``).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, path: Path, every_steps: int) -> None:
        self.path = Path(path)
        self.every_steps = every_steps
        self.requested = False
        self.signal_name: str | None = None
        self.stopped_step: int | None = None
        self._step = 0
        self._previous_handlers: dict[int, Any] = {}

    def request_stop(self, signum: int | None = None, *_: Any) -> None:
        """The SIGINT / SIGTERM handler (also callable directly, without a signal)."""
        self.requested = True
        if signum is not None and self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        self._restore_handlers()  # a second signal interrupts at once

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            # Replaces Lightning's own SIGTERM handler for the loop (restored afterwards),
            # which would end fit without a checkpoint.
            self._previous_handlers = {
                signum: signal.signal(signum, self.request_stop) for signum in self.SIGNALS
            }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, _: Any) -> None:
        self.on_train_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if trainer.global_step == self._step:
            return  # inside gradient accumulation
        self._step = trainer.global_step
        stop = trainer.strategy.reduce_boolean_decision(self.requested, all=False)
        if stop:
            trainer.should_stop = True
            self.stopped_step = trainer.global_step
        final = trainer.global_step >= trainer.max_steps
        if (stop or final) and trainer.global_step % self.every_steps != 0:
            trainer.save_checkpoint(self.path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint through :func:`hybrid.atomic.atomic_path` (a temporary file
    beside the target, fsynced and renamed onto it), so a kill at any moment leaves either the
    previous complete file or the new complete file (Lightning's own transaction stages the
    file in the system temp directory and moves it, which is a non-atomic copy across
    filesystems). Each carries a digest of its whole content (:func:`hybrid.checksum.
    structure_digest`), which :func:`hybrid.checkpoint.read_training_checkpoint` checks."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        checkpoint = {**checkpoint, CHECKPOINT_KEY: structure_digest(checkpoint)}
        with atomic_path(path) as temporary:
            torch.save(checkpoint, temporary)


def remove_stale_temporaries(directory: Path) -> None:
    """Deletes temporary files that a killed checkpoint save left behind in ``directory``."""
    for temporary in stale_temporaries(directory, "*.ckpt"):
        temporary.unlink(missing_ok=True)


class StepProgressBar(TQDMProgressBar):
    """A bar over optimizer steps to ``max_steps`` (the training data is an endless stream,
    so Lightning's per-epoch bar would count micro-batches with no end), with the loss and
    tokens/s.

    Args:
        every: redraw every this many steps (and at the last): 1 on a terminal; a log file
            (stdout not a terminal) gets a line per redraw, so the trainer passes its
            ``log_every`` there.
    """

    def __init__(self, every: int = 1) -> None:
        super().__init__()
        self.every = every

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = 0
        bar.n = trainer.global_step
        bar.set_description("train")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        due = step % self.every == 0 or step >= trainer.max_steps
        if bar is not None and step != bar.n and due:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def init_validation_tqdm(self):
        """Validation runs without a bar of its own (its loss joins the training bar)."""
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if "tok/s" in metrics:
            metrics["tok/s"] = f"{float(metrics['tok/s']):.0f}"
        return metrics


class DurationEstimate(pl.Callback):
    """Says once, in words, how long the run will take, from the first timed steps.

    The first ``skip`` steps are not timed (allocations, lazy initialisation); the next
    ``measure`` are. The estimate covers the remaining steps and the validations still due
    (each ``val_batches`` forward passes, counted as a third of a training micro-batch each).
    On a terminal the line goes through the progress bar's writer, so the bar stays intact.
    """

    def __init__(
        self, *, val_every: int, val_batches: int, grad_accum: int, skip: int = 1,
        measure: int = 4, write=None,
    ) -> None:  # fmt: skip
        self.val_every = val_every
        self.val_batches = val_batches
        self.grad_accum = grad_accum
        self.skip = skip
        self.measure = measure
        self.write = write
        self._first_step: int | None = None  # where this session started (resumes too)
        self._start: tuple[int, float] | None = None
        self.estimate_s: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if self.estimate_s is not None or not trainer.is_global_zero:
            return
        step, now = trainer.global_step, time.perf_counter()
        if self._first_step is None:
            self._first_step = step - 1
        if self._start is None:
            if step >= self._first_step + self.skip:
                self._start = (step, now)
            return
        start_step, start_time = self._start
        if step - start_step < self.measure:
            return
        per_step = (now - start_time) / (step - start_step)
        remaining = max(trainer.max_steps - step, 0)
        validations = remaining // self.val_every + 1  # plus the final one
        per_validation = self.val_batches * per_step / (3 * self.grad_accum)
        self.estimate_s = remaining * per_step + validations * per_validation
        message = (
            f"estimated time to finish: {human_duration(self.estimate_s)} "
            f"({remaining} more steps at {per_step:.2f} s/step, {validations} validation"
            f"{'s' * (validations != 1)})"
        )
        (self.write or _write_line)(message)


def _write_line(message: str) -> None:
    """On a terminal through tqdm (the bar is cleared and redrawn below the line); into a log
    file as a line of its own (a redraw there would repeat the bar's last line)."""
    if sys.stdout.isatty():
        from tqdm import tqdm

        tqdm.write(message)
    else:
        sys.stdout.write(f"\n{message}\n")
        sys.stdout.flush()


def human_duration(seconds: float) -> str:
    """95 -> 'about 1 min 35 s'; 40 -> 'about 40 s'; 4000 -> 'about 1 h 7 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"about {seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"about {minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"about {hours} h {minutes} min"

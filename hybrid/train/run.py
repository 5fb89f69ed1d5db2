"""``hybrid train``: a recipe in, a trained, tracked, resumable run directory out.

Run directory (``{output_dir}/{name}``)::

    recipe.yaml           the fully resolved recipe (defaults filled in, overrides applied)
    tokenizer.json        BPE runs only (byte-level needs none)
    checkpoints/          step{N}.ckpt every checkpoint.every_steps, and last.ckpt
    csv/version_K/        metrics.csv (one version per launch) and hparams.yaml
    wandb/                W&B files (offline runs are synced later with ``wandb sync``)
    model/                config.json + model.safetensors (+ tokenizer.json): for generation
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hybrid.memory import require_fits
from hybrid.outputs import require_output_dir
from hybrid.recipe import Recipe, recipe_to_yaml, vocab_size
from hybrid.train.run_lock import check_not_running, run_lock

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from hybrid.config import HybridConfig
    from hybrid.tokenizer import Tokenizer
    from hybrid.train.callbacks import StopAndSave
    from hybrid.train.module import HybridLightningModule

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


class TrainError(ValueError):
    """A user-facing problem with a run (one line naming the file or field)."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    val_loss: float | None
    unigram_val_loss: float
    sample: str | None
    interrupted: bool = False
    signal_name: str | None = None  # the signal that interrupted the run (SIGINT, SIGTERM)
    wandb_offline_dir: Path | None = None  # an offline W&B run, for `wandb sync`
    loss_curve: Path | None = None  # RUN/loss_curve.png


def last_checkpoint(recipe: Recipe) -> Path:
    return recipe.run_dir / CHECKPOINT_DIR / LAST


def _quiet_lightning() -> None:
    """Silence Lightning's info lines and advice that does not apply to our setup (we print
    our own summary)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*infinite.*",
        ".*`val_check_interval`.*",
        ".*LeafSpec.*",
        ".*is deprecated.*",
        ".*exists and is not empty.*",  # a resumed run's checkpoint directory
    ):
        warnings.filterwarnings("ignore", message=pattern)


def train(
    recipe: Recipe,
    *,
    resume: bool = False,
    progress_bar: bool = True,
    callbacks: list | None = None,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Train ``recipe`` (resuming from ``last.ckpt`` with ``resume``).

    ``trust_remote_code``: let an ``init_from`` checkpoint import the modules its config lists
    (see :func:`hybrid.checkpoint.require_trusted_modules`); the recipe's own ``modules`` are
    the user's and need no opt-in.

    Everything that can be wrong with the recipe or the data is checked before the model is
    built. Raises :class:`TrainError` / ``DataError`` / ``RecipeError`` (one line each) for user
    errors, and :class:`~hybrid.train.module.NonFiniteLossError` when the loss stops being
    finite (the last good checkpoint is left as it was).

    ``trainer.threads`` and ``trainer.flush_denormal`` hold while it runs (see
    :func:`hybrid.train.cpu.cpu_settings`); the calling thread's settings are restored after.
    """
    from hybrid.train.cpu import cpu_settings

    with cpu_settings(recipe.trainer.threads, recipe.trainer.flush_denormal):
        return _train(
            recipe, resume=resume, progress_bar=progress_bar, callbacks=callbacks,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip


def _train(
    recipe: Recipe,
    *,
    resume: bool,
    progress_bar: bool,
    callbacks: list | None,
    trust_remote_code: bool,
) -> TrainResult:
    """The phases of a run, in order: every check before the data is prepared, the data
    before the model, the model before the trainer."""
    import lightning.pytorch as pl

    from hybrid.train.callbacks import StopAndSave

    _quiet_lightning()
    if not _is_child_process():
        check_not_running(recipe.run_dir)
    check_run_dir(recipe, resume=resume)
    check_strategy(recipe)
    check_training_fits(recipe)
    recipe = prepare_init_from(recipe, resume=resume)
    pl.seed_everything(recipe.seed, workers=True, verbose=False)

    data = build_data(recipe)
    config = model_config(recipe, data.tokenizer)
    if resume:
        check_resumable(last_checkpoint(recipe), config)
    start_weights = None if resume else initial_weights_of(recipe, config, trust_remote_code)

    lock = contextlib.nullcontext() if _is_child_process() else run_lock(recipe.run_dir)
    with lock:
        check_run_dir(recipe, resume=resume)  # again: another run may have ended meanwhile
        write_run_dir(recipe, data.tokenizer)
        module = build_module(recipe, config, start_weights, data.tokenizer)
        loggers, wandb_mode = start_tracking(recipe, module, data.stats, resume=resume)
        announce_run(recipe, module, data.stats, wandb_mode, resume=resume)

        stopper = StopAndSave(last_checkpoint(recipe), recipe.checkpoint.every_steps)
        trainer = build_trainer(recipe, config, loggers, stopper, progress_bar, callbacks or [])
        ckpt_path = last_checkpoint(recipe) if resume else None
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        if trainer.is_global_zero:
            prune_step_checkpoints(recipe.run_dir / CHECKPOINT_DIR, recipe.checkpoint.keep)
        if stopper.stopped_step is not None:
            unigram = data.stats["unigram_val_loss"]
            return TrainResult(
                recipe.run_dir, stopper.stopped_step, None, unigram, None, interrupted=True,
                signal_name=stopper.signal_name,
            )  # fmt: skip
        return finish_run(recipe, trainer, module, data, loggers, wandb_mode)


def check_training_fits(recipe: Recipe) -> None:
    """Refuse a run that cannot fit, before any data is prepared or any file written.

    On the CPU: weights, gradients and AdamW moments (16 bytes per parameter) and one
    micro-batch's logits (with their gradient) against the free memory. On GPUs: the float32
    weights, which are built in host memory first, against the host's free memory; then the
    16 bytes per parameter (divided over the devices with ``trainer.strategy: fsdp``) and the
    logits against this process's GPU.

    Raises:
        ValueError: one line with the estimate and the free memory.
    """
    from hybrid.model import HybridLM

    config = recipe.hybrid_config(vocab_size(recipe))
    with torch.device("meta"):
        parameters = HybridLM(config).num_parameters()
    tokens = recipe.trainer.micro_batch_size * recipe.data.seq_len
    logits = 3 * 4 * tokens * config.vocab_size
    model = f"model (d_model {config.d_model}, vocab_size {config.vocab_size})"
    if not _on_gpu(recipe):
        require_fits(
            16 * parameters + logits,
            f"{model}: training {parameters:,} parameters and the logits of {tokens:,} tokens",
        )
        return
    require_fits(4 * parameters, f"{model}: building {parameters:,} float32 parameters")
    shards = recipe.trainer.devices * recipe.trainer.num_nodes
    sharded = recipe.trainer.strategy == "fsdp"
    per_device = 16 * parameters // (shards if sharded else 1)
    require_fits(
        per_device + logits,
        f"{model}: training {parameters:,} parameters"
        f"{f' sharded over {shards} devices' if sharded else ''} "
        f"and the logits of {tokens:,} tokens",
        _this_process_gpu(),
    )


def _this_process_gpu() -> torch.device:
    """The CUDA device Lightning gives this process (its local rank)."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _is_child_process() -> bool:
    """Whether this process is one that Lightning's DDP launcher started (a rank other than
    the first on its node, or a node other than the first)."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def check_run_dir(recipe: Recipe, *, resume: bool) -> None:
    """A resumed run needs ``last.ckpt``; a new one must not overwrite a run already there.

    Raises:
        TrainError: one line naming the checkpoint or the run directory.
    """
    require_output_dir(recipe.run_dir, "output_dir")
    last = last_checkpoint(recipe)
    if resume and not last.is_file():
        raise TrainError(f"{last}: no checkpoint to resume from")
    if not resume and last.is_file() and not _is_child_process():
        raise TrainError(
            f"{recipe.run_dir}: already holds a run; add --resume to continue it, or set "
            "name=... or output_dir=... for a new one"
        )


def _on_gpu(recipe: Recipe) -> bool:
    """Whether the run's accelerator is a CUDA device."""
    accelerator = recipe.trainer.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_strategy(recipe: Recipe) -> None:
    """Refuses a strategy the accelerator cannot run.

    Raises:
        TrainError: ``trainer.strategy: ...``.
    """
    if recipe.trainer.strategy == "fsdp" and not _on_gpu(recipe):
        raise TrainError(
            "trainer.strategy: fsdp needs CUDA devices (Lightning's FSDP does not run on CPU); "
            "use ddp"
        )


def prepare_init_from(recipe: Recipe, *, resume: bool) -> Recipe:
    """For a run that starts from ``init_from`` weights (not a resumed one): checks that the
    source exists and returns the recipe with the source's tokenizer (see
    :func:`~hybrid.train.initial_weights.with_source_tokenizer`); else ``recipe`` itself.

    Raises:
        TrainError: ``init_from: ...`` naming the path.
    """
    from hybrid.train.initial_weights import check_init_source, with_source_tokenizer

    if not recipe.init_from or resume:
        return recipe
    try:
        check_init_source(recipe.init_from)
    except ValueError as error:
        raise TrainError(f"init_from: {error}") from None
    return with_source_tokenizer(recipe)


def build_data(recipe: Recipe) -> pl.LightningDataModule:
    """The run's data module, prepared: its ``tokenizer`` and ``stats`` are set (a BPE
    tokenizer trained or loaded, the corpus tokenized, or a synthetic task's examples made).

    Raises:
        DataError: one line naming the source or field.
    """
    import datasets

    from hybrid.data import HybridDataModule
    from hybrid.data.synthetic import MQARDataModule, PasskeyDataModule

    synthetic = {"mqar": MQARDataModule, "passkey": PasskeyDataModule}
    data_module = synthetic.get(recipe.data.source.format, HybridDataModule)
    data = data_module(
        recipe.data,
        recipe.tokenizer,
        seed=recipe.seed,
        micro_batch_size=recipe.trainer.micro_batch_size,
        grad_accum=recipe.trainer.grad_accum,
        run_dir=recipe.run_dir,
    )
    datasets.disable_progress_bars()  # our own progress bar and one-line errors only
    data.prepare()
    return data


def model_config(recipe: Recipe, tokenizer: Tokenizer) -> HybridConfig:
    """The model section as a config, its vocabulary :func:`~hybrid.recipe.vocab_size` unless
    the section sets one.

    Raises:
        RecipeError: a bad model field.
        TrainError: a ``model.vocab_size`` too small for the tokenizer's ids.
    """
    config = recipe.hybrid_config(vocab_size(recipe, tokenizer))
    if config.vocab_size < tokenizer.vocab_size:
        raise TrainError(
            f"model.vocab_size: {config.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    return config


def initial_weights_of(
    recipe: Recipe, config: HybridConfig, trust_remote_code: bool = False
) -> dict[str, torch.Tensor] | None:
    """The ``init_from`` state dict for a model of ``config``; None without ``init_from``.

    Raises:
        TrainError: ``init_from: ...`` naming the first parameter that does not fit.
    """
    from hybrid.train.initial_weights import initial_weights

    if not recipe.init_from:
        return None
    try:
        return initial_weights(recipe.init_from, config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise TrainError(f"init_from: {error}") from None


def prune_step_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest ``step*.ckpt`` files (by step; -1 keeps all): a run
    killed between writing a step checkpoint and removing the oldest leaves one too many,
    which Lightning's own bookkeeping (restored from last.ckpt) never learns of. Returns the
    removed paths."""
    if keep < 0 or not directory.is_dir():
        return []
    steps = sorted(
        (path for path in directory.glob("step*.ckpt") if path.stem[4:].isdigit()),
        key=lambda path: int(path.stem[4:]),
    )
    removed = steps[: max(0, len(steps) - keep)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def write_run_dir(recipe: Recipe, tokenizer: Tokenizer) -> None:
    """Creates the run directory; rank 0 removes what a killed save left in ``checkpoints/``
    and writes ``recipe.yaml`` and the tokenizer."""
    from lightning.pytorch.utilities import rank_zero_only

    from hybrid.atomic import atomic_write_text
    from hybrid.train.callbacks import remove_stale_temporaries

    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        remove_stale_temporaries(run_dir / CHECKPOINT_DIR)
        prune_step_checkpoints(run_dir / CHECKPOINT_DIR, recipe.checkpoint.keep)
        atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
        tokenizer.save(run_dir)


def build_module(
    recipe: Recipe,
    config: HybridConfig,
    start_weights: dict[str, torch.Tensor] | None,
    tokenizer: Tokenizer | None = None,
) -> HybridLightningModule:
    """The LightningModule (its model initialised, or loaded with ``start_weights``), carrying
    the run's ``tokenizer.json`` for its checkpoints and its end-of-document id (packed
    documents are kept apart with ``data.document_boundaries: reset``)."""
    from hybrid.train.module import HybridLightningModule

    module = HybridLightningModule(
        config, recipe, _tokenizer_json(recipe.run_dir), eos_id=getattr(tokenizer, "eos_id", None)
    )
    if start_weights is not None:
        module.model.load_state_dict(start_weights)
    return module


def start_tracking(
    recipe: Recipe, module: HybridLightningModule, stats: dict, *, resume: bool
) -> tuple[list, str | None]:
    """The run's loggers (see :func:`~hybrid.train.tracking.build_loggers`), each given
    :func:`run_summary` as hyperparameters; and the W&B mode (None when W&B is off)."""
    from hybrid.train.tracking import build_loggers

    loggers, wandb_mode = build_loggers(recipe.logging, recipe.run_dir, recipe.name, resume=resume)
    for logger in loggers:
        logger.log_hyperparams(run_summary(recipe, module, stats))
    return loggers, wandb_mode


def announce_run(
    recipe: Recipe,
    module: HybridLightningModule,
    stats: dict,
    wandb_mode: str | None,
    *,
    resume: bool,
) -> None:
    """Prints :func:`describe_run` (rank 0 only)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(describe_run(recipe, module, stats, tokens_per_step(recipe), wandb_mode, resume))


def tokens_per_step(recipe: Recipe) -> int:
    """Tokens in one optimizer step over all devices."""
    trainer = recipe.trainer
    world = trainer.devices * trainer.num_nodes
    return trainer.micro_batch_size * trainer.grad_accum * world * recipe.data.seq_len


def _precision(recipe: Recipe) -> str:
    """``trainer.precision``, with ``auto`` resolved: bf16 mixed where the GPU has bf16, else
    float32."""
    precision = recipe.trainer.precision
    if precision == "auto":
        return "bf16-mixed" if _on_gpu(recipe) and torch.cuda.is_bf16_supported() else "32-true"
    return precision


def _strategy(recipe: Recipe) -> Any:
    """``trainer.strategy`` as Lightning takes it: DDP off the GPU talks over gloo; ``fsdp``
    is FSDP2 (``fully_shard``, applied in the module's ``configure_model``) through
    Lightning's ModelParallelStrategy, data-parallel over every device, with checkpoints
    gathered into one file (what ``--resume`` and ``hybrid generate`` read)."""
    strategy: Any = recipe.trainer.strategy
    if strategy == "ddp" and not _on_gpu(recipe):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo")
    if strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        trainer = recipe.trainer
        return ModelParallelStrategy(
            data_parallel_size=trainer.devices * trainer.num_nodes,
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
        )
    return strategy


def build_trainer(
    recipe: Recipe,
    config: HybridConfig,
    loggers: list,
    stopper: StopAndSave,
    progress_bar: bool,
    callbacks: list,
) -> pl.Trainer:
    """The Lightning trainer of the recipe's ``trainer`` section, with its callbacks in this
    order: step checkpoints (plus ``last.ckpt``, written atomically), throughput, ``stopper``,
    the progress bar (with ``progress_bar``), the duration estimate, then ``callbacks``."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hybrid.train.callbacks import (
        AtomicCheckpointIO,
        DurationEstimate,
        StepProgressBar,
        Throughput,
    )

    trainer_config = recipe.trainer
    checkpoints = ModelCheckpoint(
        dirpath=recipe.run_dir / CHECKPOINT_DIR,
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=recipe.checkpoint.every_steps,
        save_top_k=recipe.checkpoint.keep,
        monitor="step",
        mode="max",
        save_last=True,
        # Overwrite last.ckpt (written by StopAndSave off the grid, or by an earlier launch)
        # instead of adding last-v1.ckpt, last-v2.ckpt, ...
        enable_version_counter=False,
    )
    throughput = Throughput(
        tokens_per_step(recipe), training_flops_per_token(config, recipe.data.seq_len)
    )
    progress = [StepProgressBar(progress_every(trainer_config.log_every))] if progress_bar else []
    estimate = DurationEstimate(
        val_every=trainer_config.val_every,
        val_batches=trainer_config.val_batches,
        grad_accum=trainer_config.grad_accum,
    )
    return pl.Trainer(
        accelerator=trainer_config.accelerator,
        devices=trainer_config.devices,
        num_nodes=trainer_config.num_nodes,
        strategy=_strategy(recipe),
        precision=_precision(recipe),
        max_steps=trainer_config.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=trainer_config.grad_accum,
        gradient_clip_val=recipe.optim.grad_clip or None,
        val_check_interval=trainer_config.val_every * trainer_config.grad_accum,
        check_val_every_n_epoch=None,
        limit_val_batches=trainer_config.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_config.log_every,
        logger=loggers,
        callbacks=[checkpoints, throughput, stopper, *progress, estimate, *callbacks],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        default_root_dir=str(recipe.run_dir),
    )


def finish_run(
    recipe: Recipe,
    trainer: pl.Trainer,
    module: HybridLightningModule,
    data: pl.LightningDataModule,
    loggers: list,
    wandb_mode: str | None,
) -> TrainResult:
    """After a run that reached ``max_steps``: the final validation loss; rank 0 exports the
    generation-ready ``model/`` directory, samples the eval prompt and closes an offline W&B
    run."""
    from lightning.pytorch.loggers import CSVLogger

    from hybrid.train.curves import plot_loss_curve

    metrics = trainer.validate(module, datamodule=data, verbose=False)
    val_loss = metrics[0].get("val/loss") if metrics else None
    sample = wandb_offline_dir = loss_curve = None
    unigram = data.stats["unigram_val_loss"]
    if trainer.is_global_zero:
        model = module.model.float().cpu().eval()
        export_model(model, data.tokenizer, recipe.run_dir / "model")
        sample = sample_completion(model, data.tokenizer, recipe)
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                logger.save()  # flush the rows the curve is drawn from
        loss_curve = plot_loss_curve(
            recipe.run_dir, tokens_per_step(recipe), recipe.trainer.max_steps, unigram,
            title=f"{recipe.name}: {module.config.pattern_string}",
        )  # fmt: skip
        log_run_end_to_wandb(loggers, loss_curve, sample)
        wandb_offline_dir = finish_wandb(loggers) if wandb_mode == "offline" else None
    return TrainResult(
        recipe.run_dir,
        trainer.global_step,
        val_loss,
        unigram,
        sample,
        wandb_offline_dir=wandb_offline_dir,
        loss_curve=loss_curve,
    )


def describe_run(
    recipe: Recipe, module, stats: dict, tokens_per_step: int, wandb_mode: str | None, resume: bool
) -> str:
    """The lines printed when a run starts."""
    from hybrid.units import human_count

    model = module.model
    train_tokens = stats.get("train_tokens")
    examples = stats.get("train_examples")  # a synthetic task: tokens are the labelled ones
    kind = "labelled " if examples else ""
    corpus = f"{human_count(train_tokens)} {kind}training tokens" if train_tokens else "streaming"
    if examples:
        corpus = f"{human_count(examples)} examples, {corpus}"
    tracking = "CSV" + (f" + W&B ({wandb_mode})" if wandb_mode else "")
    return "\n".join(
        [
            f"{'resuming' if resume else 'training'} {recipe.run_dir}: "
            f"{module.config.pattern_string}, {human_count(model.num_parameters())} parameters "
            f"({human_count(model.num_parameters(active=True))} active)",
            f"data: {corpus}, {human_count(stats['val_tokens'])} {kind}validation tokens; unigram "
            f"baseline {stats['unigram_val_loss']:.3f} nats/token",
            f"{recipe.trainer.max_steps} steps x {tokens_per_step:,} tokens; tracking: {tracking}",
            *([f"weights from: {recipe.init_from}"] if recipe.init_from and not resume else []),
        ]
    )


def log_run_end_to_wandb(loggers: list, loss_curve: Path | None, sample: str | None) -> None:
    """Give the W&B run what the run directory gets at the end: the loss-curve image (with the
    unigram baseline line) and the eval prompt's sample, in the run summary."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            if loss_curve is not None:
                logger.log_image("loss_curve", [str(loss_curve)])
            if sample is not None:
                logger.experiment.summary["eval/sample"] = sample


def finish_wandb(loggers: list) -> Path | None:
    """Closes the W&B run (so its files are complete) and returns its directory."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            directory = Path(run.dir).parent  # .../offline-run-<time>-<id>/files
            run.finish()
            return directory
    return None


def _tokenizer_json(run_dir: Path) -> str | None:
    path = run_dir / "tokenizer.json"
    return path.read_text() if path.is_file() else None


def progress_every(log_every: int) -> int:
    """Steps between progress-bar redraws: every step on a terminal, else ``log_every`` (each
    redraw is a line in a log file)."""
    return 1 if sys.stdout.isatty() else log_every


def check_resumable(path: Path, config) -> None:
    """Refuses a checkpoint that is unreadable or was trained with another model config."""
    from hybrid.checkpoint import read_training_checkpoint

    meta = read_training_checkpoint(path)["meta"]
    if meta["fingerprint"] != config.fingerprint():
        raise TrainError(
            f"{path}: trained with another model config than the recipe's (fingerprint "
            f"{meta['fingerprint']} != {config.fingerprint()}); restore the model section"
        )


def training_flops_per_token(config, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x active non-embedding parameters, plus the LM
    head, plus 6 x the attention score / value products (causal: half of 2 * L * d each)."""
    from hybrid.model import HybridLM

    with torch.device("meta"):
        model = HybridLM(config)
    flops = 6 * (model.num_parameters(active=True, embeddings=False))
    flops += 6 * config.vocab_size * config.d_model
    mixers = []
    for name, options in zip(config.layers, config.layer_options, strict=True):
        mixers.extend(options.mixers if name == "parallel" else [(name, options)])
    for name, options in mixers:
        if name == "attention":
            context = min(seq_len, options.window or seq_len)
            flops += 6 * options.n_heads * options.head_dim * context
    return float(flops)


def run_summary(recipe: Recipe, module, stats: dict) -> dict[str, Any]:
    """Hyperparameters logged with the run: the recipe, model size, cache, data, commit."""
    from hybrid.accounting import describe
    from hybrid.provenance import source_commit

    config = module.config
    model = module.model
    short, long = 1024, 2048
    cache_short = describe(config, short, torch.bfloat16).cache_bytes
    cache_long = describe(config, long, torch.bfloat16).cache_bytes
    per_token = (cache_long - cache_short) / (long - short)
    return {
        "recipe": recipe.resolved(),
        "params/total": model.num_parameters(),
        "params/active": model.num_parameters(active=True),
        "params/non_embedding": model.num_parameters(embeddings=False),
        "pattern": config.pattern_string,
        "cache/bytes_per_token": per_token,
        "cache/bytes_fixed": cache_short - per_token * short,
        "data": dict(stats),
        "git_commit": source_commit(),
        "command": " ".join(sys.argv),
    }


def export_model(model, tokenizer, directory: Path) -> None:
    """Writes the generation-ready model directory (config, safetensors, tokenizer)."""
    from hybrid.checkpoint import save_pretrained

    save_pretrained(model, directory)
    tokenizer.save(directory)


def sample_completion(model, tokenizer, recipe: Recipe) -> str | None:
    """The recipe's eval prompt continued by the trained model (seeded)."""
    options = recipe.eval
    if options.max_new_tokens == 0 or not options.prompt or not hasattr(tokenizer, "encode"):
        return None  # (a synthetic task has no text)
    ids = tokenizer.encode(options.prompt)
    output = model.generate(
        torch.tensor([ids]),
        options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        stop_token_ids=[tokenizer.eos_id],
        seed=recipe.seed,
    )
    decoder = tokenizer.decoder()
    new = [int(t) for t in output[0, len(ids) :] if int(t) != tokenizer.eos_id]
    return options.prompt + "".join(decoder.feed(token) for token in new)


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(loss)

"""The LightningModule: next-token loss plus the MoE auxiliary losses, AdamW, the schedule."""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from hybrid.config import HybridConfig
from hybrid.labels import IGNORE_INDEX
from hybrid.model import HybridLM
from hybrid.recipe import Recipe
from hybrid.train.optim import apply_optim_changes, build_optimizer, lr_multiplier

CHECKPOINT_KEY = "hybrid"  # our metadata inside a Lightning checkpoint


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the step is not applied."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss is {value} at step {step}; the run was stopped")
        self.step = step


class NonFiniteWeightsError(NonFiniteLossError):
    """A parameter became NaN or infinite (an update from a finite loss can do it: a learning
    rate or an init far too large); nothing from that step is checkpointed."""

    def __init__(self, step: int, name: str) -> None:
        RuntimeError.__init__(self, f"parameter {name} is not finite after step {step}; the run "
                              "was stopped")  # fmt: skip
        self.step = step


def first_non_finite_parameter(module: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None (one device
    synchronisation: a norm per parameter, then one check)."""
    named = [(name, p.detach()) for name, p in module.named_parameters() if p.numel()]
    if not named:
        return None
    norms = torch.stack(torch._foreach_norm([p for _, p in named]))
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


class HybridLightningModule(pl.LightningModule):
    """Trains a :class:`HybridLM` on packed rows of token ids.

    A batch is (micro_batch, seq_len + 1) int64: ``row[:-1]`` are the inputs and ``row[1:]``
    the targets. The loss is the mean cross-entropy over all tokens plus the weighted MoE
    auxiliary losses the model returns (``out.aux_loss``).

    With ``data.document_boundaries: reset`` and an ``eos_id``, every end-of-document id in
    the inputs opens a new document (it ends one document and, like GPT-2's
    ``<|endoftext|>``, is the first token the next one is predicted from): the model gets the
    rows' ``seq_idx``, so each document is trained as if alone and every target is kept.

    Args:
        config: the model.
        recipe: the run's recipe (optimizer, schedule, logging cadence, data.document_boundaries,
            trainer.activation_checkpointing and trainer.compile).
        tokenizer_json: the run's ``tokenizer.json`` text (None for byte-level); stored in every
            checkpoint so it generates without the run directory.
        eos_id: the tokenizer's end-of-document id (None: rows are not split into documents).

    Raises:
        ValueError: one line: packed documents with a mixer that cannot keep them apart, or
            activation checkpointing of a block that cannot be re-run.
    """

    def __init__(
        self,
        config: HybridConfig,
        recipe: Recipe,
        tokenizer_json: str | None,
        eos_id: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.recipe = recipe
        self.tokenizer_json = tokenizer_json
        self.model = HybridLM(config)
        reset = recipe.data.document_boundaries == "reset"
        self.eos_id = eos_id if reset else None
        if self.eos_id is not None:
            self.model.check_separates_documents()
        every = recipe.trainer.checkpoint_every()
        if every:
            self.model.enable_activation_checkpointing(every)
        if recipe.trainer.moe_balance == "global":
            for block in self.model.blocks:
                if hasattr(type(block), "global_balance"):
                    block.global_balance = True
        if recipe.trainer.compile:
            self.model.compile()

    def configure_model(self) -> None:
        """FSDP2 (``trainer.strategy: fsdp``, Lightning's ModelParallelStrategy): each
        sublayer is a ``fully_shard`` unit over the data-parallel mesh, then the whole model
        (embedding, tied head and final norm); nothing to do under other strategies."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        shard_mesh = mesh["data_parallel"]
        for sublayer in self.model.sublayers:
            fully_shard(sublayer, mesh=shard_mesh)
        fully_shard(self.model, mesh=shard_mesh)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits

    def document_ids(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """``seq_idx`` (batch, n) of packed input rows: each end-of-document id starts a new
        document; None when documents are not separated or the rows hold none."""
        if self.eos_id is None:
            return None
        opens = inputs == self.eos_id
        if not bool(opens[:, 1:].any()):
            return None
        return opens.cumsum(1)

    @staticmethod
    def _inputs_and_targets(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed rows (batch, seq_len + 1) shift into inputs and targets; a synthetic task's
        ``(inputs, labels)`` pair (labels -100 where nothing is predicted) is used as is."""
        if isinstance(batch, (list, tuple)):
            return batch[0], batch[1]
        return batch[:, :-1], batch[:, 1:]

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(lm loss, total loss, model output) for one micro-batch."""
        inputs, targets = self._inputs_and_targets(batch)
        seq_idx = None if isinstance(batch, (list, tuple)) else self.document_ids(inputs)
        out = self.model(inputs, seq_idx=seq_idx)
        lm_loss = F.cross_entropy(
            out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
        )
        total = lm_loss if out.aux_loss is None else lm_loss + out.aux_loss
        return lm_loss, total, out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        lm_loss, total, out = self._loss(batch)
        finite = torch.isfinite(total.detach())
        if not self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True):
            raise NonFiniteLossError(self.trainer.global_step, float(total.detach()))
        self.log("train/loss", lm_loss, prog_bar=True, sync_dist=True)
        self.log("train/ppl", lm_loss.detach().exp(), sync_dist=True)
        if out.aux_loss is not None:
            self.log("train/aux_loss", out.aux_loss, sync_dist=True)
        if out.router_stats and self._is_log_step():
            self._log_router_stats(out.router_stats)
        return total

    def _is_log_step(self) -> bool:
        return self.trainer.global_step % self.recipe.trainer.log_every == 0

    def _log_router_stats(self, router_stats: dict[int, dict[str, torch.Tensor]]) -> None:
        """Per MoE layer: fraction of routed tokens per expert, balance loss, router entropy."""
        for layer, stats in router_stats.items():
            counts = stats["tokens_per_expert"].float()
            fractions = counts / counts.sum().clamp_min(1)
            metrics = {f"moe/layer{layer}/expert{e}": f for e, f in enumerate(fractions.tolist())}
            metrics[f"moe/layer{layer}/load_balance_loss"] = float(stats["load_balance_loss"])
            metrics[f"moe/layer{layer}/router_entropy"] = float(stats["router_entropy"])
            self.log_dict(metrics, rank_zero_only=True)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        lm_loss, _, out = self._loss(batch)
        self.log("val/loss", lm_loss, prog_bar=True, sync_dist=True)
        if isinstance(batch, (list, tuple)):  # a recall task: accuracy on labelled positions
            targets = batch[1]
            mask = targets != IGNORE_INDEX
            hits = (out.logits.argmax(-1)[mask] == targets[mask]).float().mean()
            self.log("val/accuracy", hits, prog_bar=True, sync_dist=True)
        return lm_loss

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", loss.exp(), sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Logs the global gradient norm before clipping (Lightning clips after this hook)."""
        if not self._is_log_step():
            return
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
            norm = torch.linalg.vector_norm(norms)
            self.log("grad_norm", norm, rank_zero_only=True)
        self.log("lr", optimizer.param_groups[0]["lr"], rank_zero_only=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The step, then a check that every weight is still finite (before any callback can
        checkpoint them)."""
        super().optimizer_step(*args, **kwargs)
        name = first_non_finite_parameter(self.model)
        if self.trainer.strategy.reduce_boolean_decision(name is not None, all=False):
            raise NonFiniteWeightsError(self.trainer.global_step + 1, name or "on another rank")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keeps the optim section the checkpoint was trained with (see on_train_start)."""
        recipe = checkpoint.get(CHECKPOINT_KEY, {}).get("recipe") or {}
        self._resumed_optim = recipe.get("optim")

    def on_train_start(self) -> None:
        """On a resume, the recipe's changed optim settings are applied to the restored
        optimizer (Lightning restores the old ones), and each change is printed."""
        saved = getattr(self, "_resumed_optim", None)
        if not saved:
            return
        scheduler = self.lr_schedulers()
        changes = apply_optim_changes(self.optimizers().optimizer, scheduler, saved,
                                      self.recipe.optim)  # fmt: skip
        if changes and self.trainer.is_global_zero:
            print(f"resume: applied {'; '.join(changes)}", file=sys.stderr, flush=True)

    def configure_optimizers(self) -> dict:
        optimizer = build_optimizer(self.model, self.recipe.optim)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_multiplier(self.recipe.schedule, self.recipe.trainer.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds what loading needs without the recipe: the model config and the tokenizer.
        Refuses (NonFiniteWeightsError) to let non-finite weights be written."""
        name = first_non_finite_parameter(self.model)
        if name is not None:
            raise NonFiniteWeightsError(self.trainer.global_step, name)
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "config": self.config.to_dict(),
            "fingerprint": self.config.fingerprint(),
            "tokenizer_json": self.tokenizer_json,
            "recipe": self.recipe.resolved(),
        }

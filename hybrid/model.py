"""``HybridLM``: assembles registered blocks into a language model. It only assembles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hybrid.config import HybridConfig
from layers.base import Block, BlockOutput
from layers.moe import Experts
from layers.norm import RMSNorm
from layers.registry import get_block


@dataclass
class HybridOutput:
    """What :meth:`HybridLM.forward` returns.

    Attributes:
        logits: (batch, seqlen, vocab_size).
        aux_loss: sum of the MoE layers' weighted auxiliary losses (None without MoE).
        router_stats: per MoE sublayer index, its routing statistics (``tokens_per_expert``,
            ``load_balance_loss``, ``z_loss``, ``router_entropy``).
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    router_stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class Sublayer(nn.Module):
    """Pre-norm residual wrapper: ``x + block(norm(x))``."""

    def __init__(self, block: Block, d_model: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.block = block

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, BlockOutput | None]:
        out = self.block(self.norm(hidden))
        if isinstance(out, BlockOutput):
            return hidden + out.hidden, out
        return hidden + out, None


class HybridLM(nn.Module):
    """A language model whose sublayers follow ``config.layers``.

    ``model(input_ids)`` with input_ids (batch, seqlen) returns a :class:`HybridOutput` whose
    ``logits`` are (batch, seqlen, vocab_size).
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.sublayers = nn.ModuleList(
            Sublayer(
                get_block(name).block_class(config.d_model, options, index),
                config.d_model,
                config.norm_eps,
            )
            for index, (name, options) in enumerate(
                zip(config.layers, config.layer_options, strict=True)
            )
        )
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @property
    def blocks(self) -> list[Block]:
        """The blocks, one per sublayer, in order."""
        return [sublayer.block for sublayer in self.sublayers]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) projections and embeddings; residual writers scaled down.

        Block-specific parameters (SSM dynamics, convs, norms, time-step projections marked
        ``_no_reinit``) keep the initialisation their block gave them.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear) and not getattr(module.weight, "_no_reinit", False):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, Experts):
                for weight in (module.gate_proj, module.up_proj, module.down_proj):
                    if weight is not None:
                        nn.init.normal_(weight, std=std)
        residual_std = std / math.sqrt(len(self.sublayers))
        for block in self.blocks:
            for projection in block.residual_projections():
                nn.init.normal_(projection.weight, std=residual_std)
            experts = getattr(block, "experts", None)
            if isinstance(experts, Experts):
                nn.init.normal_(experts.down_proj, std=residual_std)

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Fail clearly on ids outside ``[0, vocab_size)`` instead of reading garbage rows."""
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids: expected shape (batch, seqlen), got {tuple(input_ids.shape)}"
            )
        if input_ids.numel() == 0:
            raise ValueError("input_ids: empty")
        low, high = torch.aminmax(input_ids)
        if low < 0 or high >= self.config.vocab_size:
            bad = int(low) if low < 0 else int(high)
            raise ValueError(
                f"input_ids: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})"
            )

    def forward(self, input_ids: torch.Tensor) -> HybridOutput:
        """Shapes: input_ids (batch, seqlen) -> logits (batch, seqlen, vocab_size)."""
        self.check_token_ids(input_ids)
        hidden = self.embedding(input_ids)
        aux_loss, router_stats = None, {}
        for index, sublayer in enumerate(self.sublayers):
            hidden, extra = sublayer(hidden)
            if extra is not None:
                if extra.aux_loss is not None:
                    aux_loss = extra.aux_loss if aux_loss is None else aux_loss + extra.aux_loss
                if extra.stats:
                    router_stats[index] = extra.stats
        logits = self.lm_head(self.final_norm(hidden))
        return HybridOutput(logits, aux_loss, router_stats)

    def num_parameters(self, *, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count; ``active`` counts only top-k experts of MoE blocks.

        ``embeddings=False`` leaves out the input embedding (and the LM head when untied).
        """
        total = sum(p.numel() for p in self.parameters())
        if active:
            total -= sum(
                sum(p.numel() for p in block.parameters()) - block.active_parameters()
                for block in self.blocks
            )
        if not embeddings:
            total -= self.embedding.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

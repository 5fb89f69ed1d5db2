"""Mixture-of-experts feed-forward: top-k routing, grouped expert compute, no token dropping."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import Block, BlockOutput, TokenContext
from layers.mlp import ACTIVATIONS, GATED, FeedForward, activate, default_hidden_size
from layers.options import require, require_choice, require_positive_int
from layers.registry import register_block


@dataclass
class MoEOptions:
    """Options of the ``moe`` block.

    Attributes:
        n_experts: routed experts.
        top_k: experts per token.
        expert_hidden_size: inner width of each expert; None gives the dense MLP default.
        activation: expert activation (as for ``mlp``: swiglu, geglu, gelu, relu2, silu).
        n_shared_experts: experts every token passes through (0 for none).
        shared_hidden_size: inner width of the shared expert; None gives
            ``n_shared_experts * expert_hidden_size``.
        shared_gate: scale the shared expert's output of each token by
            ``sigmoid(shared_gate(x))``, a ``Linear(d_model, 1)`` (Qwen2-MoE, Qwen3-Next);
            needs a shared expert.
        router: "softmax" (Mixtral / Jamba) or "sigmoid" (DeepSeek-V3 / Nemotron-H).
        normalize_top_k: renormalise the selected weights to sum to 1.
        routed_scaling: factor on the routed output (sigmoid routers use > 1).
        score_correction_bias: a per-expert bias used only for choosing experts (sigmoid
            routing with auxiliary-loss-free balancing); kept as a buffer.
        n_groups / topk_groups: group-limited routing: experts are split in ``n_groups``
            groups and only the ``topk_groups`` best groups (by the sum of their top-2
            scores) are eligible.
        aux_loss_weight: weight of the Switch load-balancing loss in the training loss.
        z_loss_weight: weight of the router z-loss.
        bias: biases on the expert projections.
    """

    n_experts: int = 8
    top_k: int = 2
    expert_hidden_size: int | None = None
    activation: str = "swiglu"
    n_shared_experts: int = 0
    shared_hidden_size: int | None = None
    shared_gate: bool = False
    router: str = "softmax"
    normalize_top_k: bool = True
    routed_scaling: float = 1.0
    score_correction_bias: bool = False
    n_groups: int = 1
    topk_groups: int = 1
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    bias: bool = False

    def resolve(self, d_model: int, where: str) -> MoEOptions:
        require_positive_int(self.n_experts, f"{where}.n_experts")
        require_positive_int(self.top_k, f"{where}.top_k")
        require(
            self.top_k <= self.n_experts,
            f"{where}.top_k",
            f"must be <= n_experts={self.n_experts}; got {self.top_k}",
        )
        require_choice(self.activation, tuple(ACTIVATIONS), f"{where}.activation")
        require_choice(self.router, ("softmax", "sigmoid"), f"{where}.router")
        require(
            isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
            f"{where}.n_shared_experts",
            f"must be an integer >= 0; got {self.n_shared_experts!r}",
        )
        require(
            isinstance(self.shared_gate, bool),
            f"{where}.shared_gate",
            f"must be true or false; got {self.shared_gate!r}",
        )
        require(
            not self.shared_gate or self.n_shared_experts > 0,
            f"{where}.shared_gate",
            "gates the shared expert; it needs n_shared_experts >= 1",
        )
        require_positive_int(self.n_groups, f"{where}.n_groups")
        require(
            self.n_experts % self.n_groups == 0,
            f"{where}.n_groups",
            f"must divide n_experts={self.n_experts}; got {self.n_groups}",
        )
        require(
            isinstance(self.topk_groups, int) and 1 <= self.topk_groups <= self.n_groups,
            f"{where}.topk_groups",
            f"must be in [1, n_groups={self.n_groups}]; got {self.topk_groups!r}",
        )
        require(
            self.aux_loss_weight >= 0 and self.z_loss_weight >= 0,
            f"{where}.aux_loss_weight",
            "loss weights must be >= 0",
        )
        hidden = self.expert_hidden_size or default_hidden_size(d_model, self.activation)
        require_positive_int(hidden, f"{where}.expert_hidden_size")
        shared = self.shared_hidden_size or self.n_shared_experts * hidden
        return dataclasses.replace(self, expert_hidden_size=hidden, shared_hidden_size=shared)


class Experts(nn.Module):
    """``n_experts`` feed-forward networks stored as stacked weights.

    Weights: gate/up (n_experts, hidden, d_model), down (n_experts, d_model, hidden).
    """

    def __init__(
        self, n_experts: int, d_model: int, hidden: int, activation: str, bias: bool
    ) -> None:
        super().__init__()
        self.activation = activation
        self.gated = activation in GATED
        self.act = ACTIVATIONS[activation]
        self.gate_proj = (
            nn.Parameter(torch.empty(n_experts, hidden, d_model)) if self.gated else None
        )
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.up_bias = nn.Parameter(torch.zeros(n_experts, hidden)) if bias else None
        self.gate_bias = (
            nn.Parameter(torch.zeros(n_experts, hidden)) if bias and self.gated else None
        )
        self.down_bias = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        for weight, fan_in in (
            (self.gate_proj, d_model),
            (self.up_proj, d_model),
            (self.down_proj, hidden),
        ):
            if weight is not None:
                nn.init.normal_(weight, std=1.0 / math.sqrt(fan_in))

    def reset_projections(self, std: float) -> None:
        """Redraw the expert weights from Normal(0, std), as the model does for nn.Linear."""
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            if weight is not None:
                nn.init.normal_(weight, std=std)

    def stacked(self, name: str) -> torch.Tensor | None:
        """The weight ``name`` for all experts, (n_experts, out, in); dequantized when
        :func:`hybrid.quantize.quantize` has replaced it with a quantized weight."""
        weight = getattr(self, name)
        return weight if weight is None or isinstance(weight, torch.Tensor) else weight.dequantize()

    def expert_forward(self, expert: int, tokens: torch.Tensor) -> torch.Tensor:
        """Run expert ``expert`` on ``tokens`` (n, d_model) -> (n, d_model)."""

        def bias(b: torch.Tensor | None) -> torch.Tensor | None:
            return None if b is None else b[expert]

        up = F.linear(tokens, self.up_proj[expert], bias(self.up_bias))
        gate = None
        if self.gated:
            gate = F.linear(tokens, self.gate_proj[expert], bias(self.gate_bias))
        inner = activate(self.activation, up, gate)
        return F.linear(inner, self.down_proj[expert], bias(self.down_bias))


@register_block("moe", symbol="E", options=MoEOptions, role="feedforward")
class MoE(Block):
    """Mixture-of-experts sublayer. Shapes: (batch, seqlen, d_model) -> :class:`BlockOutput`.

    Tokens are sorted by expert and each expert runs once on its contiguous slice (a loop over
    experts, never over tokens); every token reaches all of its top-k experts.

    ``global_balance`` (a training setting, ``trainer.moe_balance: global``): the
    load-balancing loss counts the experts' tokens over every data-parallel rank (an
    all-reduce of the counts), not this rank's micro-batch alone.
    """

    global_balance: bool = False

    def __init__(self, d_model: int, options: MoEOptions, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        self.router = nn.Linear(d_model, options.n_experts, bias=False)
        if options.score_correction_bias:
            self.register_buffer("score_bias", torch.zeros(options.n_experts))
        else:
            self.score_bias = None
        self.experts = Experts(
            options.n_experts, d_model, options.expert_hidden_size, options.activation, options.bias
        )
        self.shared = (
            FeedForward(d_model, options.shared_hidden_size, options.activation, options.bias)
            if options.n_shared_experts
            else None
        )
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if options.shared_gate else None

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose experts for ``tokens`` (n, d_model).

        Returns router logits (n, n_experts) and weights (n, top_k) in float32 or wider, and
        expert indices (n, top_k).
        """
        opts = self.options
        dtype = torch.promote_types(tokens.dtype, torch.float32)  # never route in bf16
        logits = F.linear(tokens.to(dtype), self.router.weight.to(dtype))
        scores = logits.softmax(-1) if opts.router == "softmax" else logits.sigmoid()
        choice = scores if self.score_bias is None else scores + self.score_bias
        if opts.n_groups > 1:
            grouped = choice.view(-1, opts.n_groups, opts.n_experts // opts.n_groups)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(opts.topk_groups, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        indices = choice.topk(opts.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if opts.normalize_top_k:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, weights * opts.routed_scaling, indices

    def forward(
        self,
        hidden: torch.Tensor,
        cache: None = None,
        context: TokenContext | None = None,
    ) -> BlockOutput | torch.Tensor:
        if context is not None and context.static_start is not None:
            return self.forward_dense(hidden)
        opts = self.options
        tokens = hidden.reshape(-1, hidden.shape[-1])  # (n, d_model)
        logits, weights, indices = self.route(tokens)
        if context is not None and context.decoding and tokens.shape[0] <= opts.top_k:
            # A decode step of a few rows: each token's experts directly, no sorting.
            return self._per_token(tokens, weights, indices).view_as(hidden)

        flat_experts = indices.flatten()  # (n * top_k,) slot s belongs to token s // top_k
        order = flat_experts.argsort(stable=True)
        counts = torch.bincount(flat_experts, minlength=opts.n_experts)
        token_of_slot = order // opts.top_k
        grouped = tokens[token_of_slot]  # (n * top_k, d_model), sorted by expert
        outputs = [
            self.experts.expert_forward(expert, chunk)
            for expert, chunk in enumerate(grouped.split(counts.tolist()))
            if chunk.shape[0]
        ]
        expert_out = torch.cat(outputs) if outputs else grouped
        expert_out = expert_out * weights.flatten()[order, None].to(expert_out.dtype)
        combined = torch.zeros_like(tokens, dtype=expert_out.dtype)
        combined.index_add_(0, token_of_slot, expert_out)
        if self.shared is not None:
            combined = combined + self.shared_output(tokens)
        if context is not None and context.decoding:
            return combined.view_as(hidden)  # no losses nor statistics at inference

        load_balance, z_loss = router_losses(
            logits, indices, opts.n_experts, global_counts=self.global_balance and self.training
        )
        aux = opts.aux_loss_weight * load_balance + opts.z_loss_weight * z_loss
        stats = {
            "tokens_per_expert": counts.detach(),
            "load_balance_loss": load_balance.detach(),
            "z_loss": z_loss.detach(),
            "router_entropy": router_entropy(logits).detach(),
        }
        return BlockOutput(combined.view_as(hidden), aux, stats)

    def shared_output(self, tokens: torch.Tensor) -> torch.Tensor:
        """The shared expert on ``tokens`` (n, d_model) -> (n, d_model), each row scaled by
        its sigmoid gate when ``shared_gate`` is set."""
        out = self.shared(tokens)
        if self.shared_gate is not None:
            out = out * torch.sigmoid(self.shared_gate(tokens))
        return out

    def _per_token(
        self, tokens: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        """Each token through its own top-k experts, (n, d_model) -> (n, d_model); for decode
        steps of at most ``top_k`` rows, where sorting tokens by expert costs more than it
        saves. Reads the chosen experts' indices on the host."""
        rows = []
        for token, chosen, weight in zip(tokens, indices.tolist(), weights, strict=True):
            token = token[None]
            out = sum(
                self.experts.expert_forward(expert, token) * weight[slot].to(token.dtype)
                for slot, expert in enumerate(chosen)
            )
            if self.shared is not None:
                out = out + self.shared_output(token)
            rows.append(out)
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def forward_dense(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by the sparse routing weights.

        ``n_experts / top_k`` times the FLOPs of :meth:`forward`, but no shape depends on the
        routing, so a one-token decode step can be compiled or captured as a CUDA graph.
        Returns hidden states only (no auxiliary losses at decode time).
        Shapes: (batch, seqlen, d_model) -> same.
        """
        experts = self.experts
        tokens = hidden.reshape(-1, hidden.shape[-1])  # (t, d_model)
        _, weights, indices = self.route(tokens)
        dense = torch.zeros(tokens.shape[0], self.options.n_experts, dtype=weights.dtype,
                            device=tokens.device).scatter(1, indices, weights)  # fmt: skip
        up = torch.einsum("td,ehd->teh", tokens, experts.stacked("up_proj"))
        if experts.up_bias is not None:
            up = up + experts.up_bias
        gate = None
        if experts.gated:
            gate = torch.einsum("td,ehd->teh", tokens, experts.stacked("gate_proj"))
            if experts.gate_bias is not None:
                gate = gate + experts.gate_bias
        inner = activate(experts.activation, up, gate)
        out = torch.einsum("teh,edh->ted", inner, experts.stacked("down_proj"))
        if experts.down_bias is not None:
            out = out + experts.down_bias
        combined = torch.einsum("te,ted->td", dense.to(out.dtype), out)
        if self.shared is not None:
            combined = combined + self.shared_output(tokens)
        return combined.view_as(hidden)

    def active_parameters(self) -> int:
        experts = sum(p.numel() for p in self.experts.parameters())
        total = sum(p.numel() for p in self.parameters())
        return total - experts + experts * self.options.top_k // self.options.n_experts

    def residual_weights(self) -> list[nn.Parameter]:
        shared = [] if self.shared is None else [self.shared.down_proj.weight]
        return [*shared, self.experts.down_proj]


def router_losses(
    logits: torch.Tensor, indices: torch.Tensor, n_experts: int, *, global_counts: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-Transformer load-balancing loss and ST-MoE router z-loss.

    load_balance = n_experts * sum_e f_e * P_e, with f_e the fraction of routing slots sent to
    expert e and P_e the mean softmax probability of e (1 when perfectly balanced);
    z_loss = mean over tokens of logsumexp(logits)^2. ``global_counts``: f_e over the slots of
    every rank of the default process group (all-reduced; P_e stays this rank's, so the
    gradient needs no communication), as global-batch balancing does (Qwen's MoE training);
    without an initialised process group it is this rank's.

    Shapes: logits (n, n_experts), indices (n, top_k) -> two scalars.
    """
    probs = logits.softmax(-1)
    counts = torch.bincount(indices.flatten(), minlength=n_experts).to(probs)
    if global_counts and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    fraction = counts / counts.sum().clamp_min(1)
    load_balance = n_experts * torch.sum(fraction * probs.mean(0))
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    return load_balance, z_loss


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the routing distribution. Shapes: (n, n_experts) -> scalar."""
    log_probs = logits.log_softmax(-1)
    return -(log_probs.exp() * log_probs).sum(-1).mean()

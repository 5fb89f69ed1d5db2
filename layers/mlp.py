"""Dense feed-forward block: SwiGLU by default, GeGLU, GELU or squared ReLU as options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import Block
from layers.ops.kernels import needs_autograd
from layers.options import require_choice, require_positive_int
from layers.registry import register_block

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: torch.square(F.relu(x)),
    "silu": F.silu,
}
GATED = frozenset({"swiglu", "geglu"})
# The same activations overwriting their input, for fresh projection outputs without autograd
# (one pass less and no new tensor); gelu has no in-place form.
ACTIVATIONS_INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swiglu": lambda x: F.silu(x, inplace=True),
    "relu2": lambda x: F.relu_(x).square_(),
    "silu": lambda x: F.silu(x, inplace=True),
}


def activate(activation: str, up: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``act(gate) * up`` for gated activations, else ``act(up)``.

    ``up`` and ``gate`` must be fresh projection outputs that nothing else reads: without
    autograd they are overwritten in place. Shapes: (..., hidden) -> (..., hidden).
    """
    inplace = ACTIVATIONS_INPLACE.get(activation)
    if inplace is None or needs_autograd(up, gate):
        if gate is None:
            return ACTIVATIONS[activation](up)
        return ACTIVATIONS[activation](gate) * up
    if gate is None:
        return inplace(up)
    return inplace(gate).mul_(up)


def default_hidden_size(d_model: int, activation: str) -> int:
    """Llama's 8/3 * d_model for gated activations, 4 * d_model otherwise, rounded up to 64."""
    hidden = 8 * d_model // 3 if activation in GATED else 4 * d_model
    return -(-hidden // 64) * 64


@dataclass
class MLPOptions:
    """Options of the ``mlp`` block.

    Attributes:
        hidden_size: inner width; None gives :func:`default_hidden_size`.
        activation: swiglu | geglu (gated), gelu | relu2 | silu (not gated; relu2 is
            Nemotron-H's squared ReLU).
        bias: biases on the projections.
    """

    hidden_size: int | None = None
    activation: str = "swiglu"
    bias: bool = False

    def resolve(self, d_model: int, where: str) -> MLPOptions:
        require_choice(self.activation, tuple(ACTIVATIONS), f"{where}.activation")
        hidden = self.hidden_size or default_hidden_size(d_model, self.activation)
        require_positive_int(hidden, f"{where}.hidden_size")
        return MLPOptions(hidden, self.activation, self.bias)


class FeedForward(nn.Module):
    """``down(act(gate(x)) * up(x))`` when gated, else ``down(act(up(x)))``.

    Shapes: (..., d_model) -> (..., d_model).
    """

    def __init__(self, d_model: int, hidden_size: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.activation = activation
        self.gated = activation in GATED
        self.act = ACTIVATIONS[activation]
        if self.gated:
            self.gate_proj = nn.Linear(d_model, hidden_size, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden_size, bias=bias)
        self.down_proj = nn.Linear(hidden_size, d_model, bias=bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(hidden) if self.gated else None
        return self.down_proj(activate(self.activation, self.up_proj(hidden), gate))


@register_block("mlp", symbol="-", options=MLPOptions, role="feedforward")
class MLP(Block):
    """Dense feed-forward sublayer. Shapes: (batch, seqlen, d_model) -> same."""

    # Off CUDA, sequences longer than this go through in segments of this many tokens, so
    # that the (segment, hidden_size) intermediates stay in the CPU's cache (the same result;
    # see Mamba2.segment_length). None: never.
    segment_length: int | None = 2048

    def __init__(self, d_model: int, options: MLPOptions, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        self.ffn = FeedForward(d_model, options.hidden_size, options.activation, options.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        segment = self.segment_length
        if segment and hidden.shape[1] > segment and not hidden.is_cuda:
            return torch.cat([self.ffn(part) for part in hidden.split(segment, 1)], 1)
        return self.ffn(hidden)

    def residual_weights(self) -> list[nn.Parameter]:
        return [self.ffn.down_proj.weight]

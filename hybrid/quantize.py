"""Weight-only quantization of a :class:`~hybrid.model.HybridLM` for inference.

``quantize(model, "int8")`` or ``quantize(model, "int4")`` replaces, in place, the weights of
the projections that hold most of the parameters: attention q/k/v/o, MLP and shared-expert
gate/up/down, MoE expert weights, and the Mamba in/out projections (every ``nn.Linear`` of a
block, custom blocks included, except the names in :data:`KEEP_FLOAT`). SSM dynamics
(``A_log``, ``D``, ``dt_bias``, Mamba-1's ``x_proj`` / ``dt_proj``), conv weights, norms,
MoE routers and shared-expert gates, embeddings and the output head stay in float unless
``embeddings=True``.

Where the work is done:

- By default every quantized weight is a :class:`~layers.quantized.QuantizedWeight`
  (torchao's affine quantization arithmetic; int4 codes packed two per byte, because
  torchao 0.18 keeps CPU int4 weights unpacked in int8 and its packed int4 formats are
  CUDA-only; MoE expert stacks, which torchao's configs do not handle). Int8 layers compute
  ``(x @ q^T) * scale``: the per-row scale is applied to the outputs, not to the weight.
- ``int8_backend="torchao"`` uses torchao's ``Int8WeightOnlyConfig`` (its ``Int8Tensor``)
  for int8 ``nn.Linear`` layers instead: the format torchao's CUDA and inductor paths know.
  On CPU the two decode at the same speed (docs/bench_quant.md); ours is the default so that
  every quantized weight is one kind of plain buffers (layers, experts and embeddings alike).

Quantize after any ``model.to(dtype)``: a later cast would also cast the scales.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from layers.moe import Experts
from layers.quantized import (
    DEFAULT_GROUP_SIZE,
    SCHEMES,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeight,
    check_group_size,
    torchao_primitives,
)

KEEP_FLOAT = ("router", "shared_gate", "x_proj", "dt_proj")
"""Routing, the shared expert's gate and the SSM time-step projections stay in float."""
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")
INT8_BACKENDS = ("hybrid", "torchao")


@dataclass(frozen=True)
class Quantization:
    """What :func:`quantize` did: the scheme, the int4 group size, and the counts."""

    scheme: str
    group_size: int | None
    linear_layers: int
    expert_weights: int
    embeddings: bool


def check_scheme(scheme: object, option: str = "quantize") -> str:
    """``scheme`` if it is one of :data:`SCHEMES`, else a one-line ``ValueError``."""
    if scheme not in SCHEMES:
        raise ValueError(f"{option}: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme  # type: ignore[return-value]


def quantize(
    model: nn.Module,
    scheme: str,
    *,
    group_size: int | None = None,
    embeddings: bool = False,
    int8_backend: str = "hybrid",
) -> Quantization:
    """Quantize ``model``'s projection weights in place to ``scheme`` ("int8" or "int4").

    ``group_size``: inputs per int4 scale (default 32); it must divide every quantized width.
    ``embeddings``: also the token embeddings and the output head (one quantized table
    when they are tied). ``int8_backend``: "hybrid" (ours, the default) or "torchao" (its
    ``Int8Tensor``) for int8 ``nn.Linear`` layers. Every check runs before anything changes.

    Returns what was done (also kept as ``model.quantization``).

    Raises:
        ValueError: one line: unknown scheme or int8 backend, a group size for int8, a group
            size that does not divide a width, or a model that is already quantized.
        ImportError: torchao is not installed.
    """
    check_scheme(scheme)
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"quantize: the model is already quantized ({model.quantization.scheme})")
    if scheme == "int8" and group_size is not None:
        raise ValueError("group_size: int8 uses one scale per output row; group_size is for int4")
    if int8_backend not in INT8_BACKENDS:
        raise ValueError(
            f"int8_backend: unknown backend {int8_backend!r}; choose one of "
            f"{', '.join(INT8_BACKENDS)}"
        )
    group = DEFAULT_GROUP_SIZE if group_size is None else group_size
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith("sublayers.")
        and name.rsplit(".", 1)[-1] not in KEEP_FLOAT
    ]
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]
    if scheme == "int4":
        for name, module in linears:
            check_group_size(group, module.in_features, name)
        for name, module in experts:
            for weight in EXPERT_WEIGHTS:
                if getattr(module, weight) is not None:
                    check_group_size(group, getattr(module, weight).shape[-1], f"{name}.{weight}")
        if embeddings:
            check_group_size(group, model.embedding.embedding_dim, "embedding")
    torchao_primitives()  # the ImportError, if any, before anything changes

    if scheme == "int8" and int8_backend == "torchao":
        _torchao_int8(model, {id(module) for _, module in linears})
    else:
        for name, module in linears:
            parent, attr = _parent(model, name)
            setattr(parent, attr, QuantizedLinear(module, scheme, group))
    expert_count = 0
    for _, module in experts:
        for weight in EXPERT_WEIGHTS:
            tensor = getattr(module, weight)
            if tensor is not None:
                quantized = QuantizedWeight(tensor, scheme, group)
                delattr(module, weight)
                setattr(module, weight, quantized)
                expert_count += 1
    if embeddings:
        _quantize_embeddings(model, scheme, group)
    done = Quantization(
        scheme, group if scheme == "int4" else None, len(linears), expert_count, embeddings
    )
    model.quantization = done
    return done


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: float parameters (tied ones once), quantized
    codes, scales and zero points, and torchao tensors' inner tensors."""
    total, seen = 0, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _torchao_int8(model: nn.Module, targets: set[int]) -> None:
    """torchao's int8 weight-only quantization of the ``nn.Linear`` modules in ``targets``."""
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    finally:
        quiet.setLevel(level)
    quantize_(
        model,
        Int8WeightOnlyConfig(set_inductor_config=False),
        filter_fn=lambda module, _name: id(module) in targets,
    )


def _quantize_embeddings(model: nn.Module, scheme: str, group: int) -> None:
    """Embedding table and output head (shared when tied) as quantized weights."""
    tied = model.lm_head.weight is model.embedding.weight
    table = QuantizedWeight(model.embedding.weight, scheme, group)
    head = table if tied else QuantizedWeight(model.lm_head.weight, scheme, group)
    model.embedding = QuantizedEmbedding(table)
    model.lm_head = QuantizedLinear.from_weight(head, model.lm_head.bias)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr

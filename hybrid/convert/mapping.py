"""Tensor names between our state dict and a transformers one: one table, both directions.

A converter describes a checkpoint by a table, our tensor name -> transformers tensor name,
with ``{}`` where a layer index goes (our sublayer index on the left, the transformers layer
index on the right)::

    "sublayers.{}.block.in_proj.weight": "model.layers.{}.mixer.in_proj.weight"

An entry that is not a plain rename is a :class:`Transform` (:class:`PerExpert`: one stacked
tensor of ours is one tensor per expert of theirs; :class:`ZeroCentred`: a norm weight stored
as its offset from 1). :class:`NameMap` applies a table to the tensors of one model config, in
either direction, so the two directions cannot drift apart. A table may name tensors a config
does not have (biases, say): only our model's tensors are mapped. A tensor the table needs and
the checkpoint lacks fails by name, as does one the checkpoint has and the table does not
consume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from hybrid.config import HybridConfig
from hybrid.convert.common import take


class Transform(ABC):
    """One tensor of ours that is not a single renamed tensor of theirs."""

    @abstractmethod
    def renamed(self, rename: Callable[[str], str]) -> Transform:
        """The same transform with every transformers name passed through ``rename``."""

    @abstractmethod
    def from_hf(self, state: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """Our tensor of ``shape``, popping what it is made of from ``state``."""

    @abstractmethod
    def to_hf(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transformers tensors of our ``tensor``, by name."""


@dataclass(frozen=True)
class PerExpert(Transform):
    """Our stacked expert weight (n_experts, out, in) as ``save_pretrained`` writes it: one
    ``(out, in)`` tensor per expert, ``{expert}`` in ``name`` standing for its index. A state
    dict of transformers' modules holds the stacked tensor itself, as ``packed``; both read.
    """

    name: str
    packed: str

    def renamed(self, rename: Callable[[str], str]) -> PerExpert:
        return PerExpert(rename(self.name), rename(self.packed))

    def from_hf(self, state: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        if self.packed in state:
            return state.pop(self.packed)
        return torch.stack([take(state, self.expert(e)) for e in range(shape[0])])

    def to_hf(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.expert(e): tensor[e] for e in range(tensor.shape[0])}

    def expert(self, index: int) -> str:
        return self.name.replace("{expert}", str(index))


@dataclass(frozen=True)
class ZeroCentred(Transform):
    """Our RMSNorm weight ``w`` as a checkpoint whose norm multiplies by ``1 + weight``
    (Qwen3-Next, Gemma): theirs is ``w - 1``. The offset is added in float32, so that a
    bfloat16 checkpoint's small weights are not rounded at 1 on the way in."""

    name: str

    def renamed(self, rename: Callable[[str], str]) -> ZeroCentred:
        return ZeroCentred(rename(self.name))

    def from_hf(self, state: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        return take(state, self.name).float() + 1

    def to_hf(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: (tensor.float() - 1).to(tensor.dtype)}


Entry = str | Transform
Table = dict[str, Entry]


def renamed(entry: Entry, rename: Callable[[str], str]) -> Entry:
    """``entry`` with its transformers name(s) passed through ``rename``."""
    return rename(entry) if isinstance(entry, str) else entry.renamed(rename)


def nest(table: Table, ours: str, theirs: str) -> Table:
    """``table`` with ``ours`` before each of our names and ``theirs`` before each of theirs
    (a block's table placed in a layer: ``nest(ATTENTION, "sublayers.{}.block.",
    "model.layers.{}.self_attn.")``)."""
    return {ours + name: renamed(entry, lambda hf: theirs + hf) for name, entry in table.items()}


def at_layer(table: Table, ours: int, theirs: int) -> Table:
    """``table`` with ``{}`` filled in: our sublayer index ``ours``, their layer ``theirs``."""
    return {
        name.replace("{}", str(ours)): renamed(entry, lambda hf: hf.replace("{}", str(theirs)))
        for name, entry in table.items()
    }


def model_table(
    top: Table,
    sublayers: Mapping[str, Table],
    config: HybridConfig,
    layer_of: Callable[[int], int] = lambda index: index,
) -> Table:
    """The table of ``config``'s model: ``top`` (embedding, final norm, head) and, for each of
    our sublayers, the table of its block family (``sublayers[name]``) at its index, in
    transformers layer ``layer_of(index)``."""
    table = dict(top)
    for index, name in enumerate(config.layers):
        if name not in sublayers:
            raise ValueError(f"no transformers names for {name} sublayers ({', '.join(sublayers)})")
        table |= at_layer(sublayers[name], index, layer_of(index))
    return table


def our_tensor_shapes(config: HybridConfig) -> dict[str, torch.Size]:
    """Name -> shape of our model's state dict for ``config`` (built on the meta device, so no
    memory). With tied embeddings ``lm_head.weight`` is left out: it is ``embedding.weight``.
    """
    from hybrid.model import HybridLM

    with torch.device("meta"):
        state = HybridLM(config).state_dict()
    return {
        name: tensor.shape
        for name, tensor in state.items()
        if not (config.tie_embeddings and name == "lm_head.weight")
    }


# Tensors some checkpoints carry that are recomputed at load time, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class NameMap:
    """A table applied to the tensors of one model config, in either direction."""

    def __init__(self, table: Table, config: HybridConfig, model_type: str) -> None:
        self.shapes = our_tensor_shapes(config)
        unnamed = [name for name in self.shapes if name not in table]
        if unnamed:
            raise ValueError(f"{model_type}: no transformers name for our tensors {unnamed[:3]}")
        self.entries = {name: table[name] for name in self.shapes}
        self.tied = config.tie_embeddings
        self.model_type = model_type

    def from_hf(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict from a transformers one; a missing or an unused tensor fails.

        A tied checkpoint that still stores ``lm_head.weight`` has it dropped.
        """
        state = dict(state)
        ours = {
            name: take(state, entry)
            if isinstance(entry, str)
            else entry.from_hf(state, self.shapes[name])
            for name, entry in self.entries.items()
        }
        if self.tied:
            state.pop("lm_head.weight", None)
        left = [name for name in state if not name.endswith(IGNORED_SUFFIXES)]
        if left:
            more = f" and {len(left) - 3} more" if len(left) > 3 else ""
            raise ValueError(
                f"{self.model_type}: weights {', '.join(left[:3])}{more} have no place in the "
                "model (a config option that adds them is not handled)"
            )
        return ours

    def to_hf(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A transformers state dict from ours (a tied ``lm_head.weight`` is not written)."""
        out: dict[str, torch.Tensor] = {}
        for name, entry in self.entries.items():
            if name not in state:
                raise ValueError(f"{self.model_type}: weights: missing tensor {name!r}")
            if isinstance(entry, str):
                out[entry] = state[name]
            else:
                out.update(entry.to_hf(state[name]))
        return out

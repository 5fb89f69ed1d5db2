"""Several mixers side by side in one sublayer: ``sum_i out_i * mixer_i(x * in_i)``.

Falcon-H1 runs attention and Mamba-2 in parallel on the same normalised input and adds their
outputs, each scaled by a multiplier; Hymba's parallel heads are the same shape. Written in a
pattern as ``[*M]`` (the symbols inside the brackets share one sublayer) or in list form as
``{"block": "parallel", "mixers": ["attention", {"block": "mamba2", "d_state": 64}],
"output_multipliers": [1.0, 0.5]}``. Each inner mixer keeps its own cache entry.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layers.base import Block, BlockOutput, CacheEntry, TokenContext
from layers.options import require
from layers.registry import get_block, register_block


@dataclass
class ParallelOptions:
    """Options of the ``parallel`` block.

    Attributes:
        mixers: the inner mixers, each a registry name or symbol or ``{"block": name,
            ...options}`` (options over the model's options of that family); resolved by
            :class:`hybrid.HybridConfig` into ``(name, options)`` pairs.
        input_multipliers: one per mixer, scaling its input; None: all 1.
        output_multipliers: one per mixer, scaling its output before the sum; None: all 1.
    """

    mixers: list[Any] = field(default_factory=list)
    input_multipliers: list[float] | None = None
    output_multipliers: list[float] | None = None

    def resolve(self, d_model: int, where: str) -> ParallelOptions:
        require(
            isinstance(self.mixers, (list, tuple)) and len(self.mixers) >= 2,
            f"{where}.mixers",
            f"needs at least two mixers side by side; got {self.mixers!r}",
        )
        for index, item in enumerate(self.mixers):
            require(
                isinstance(item, tuple) and len(item) == 2,
                f"{where}.mixers[{index}]",
                "is not resolved (build the model through HybridConfig)",
            )
        multipliers = {}
        for name in ("input_multipliers", "output_multipliers"):
            values = getattr(self, name)
            if values is None:
                values = [1.0] * len(self.mixers)
            ok = isinstance(values, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            )
            require(ok, f"{where}.{name}", f"must be a list of numbers; got {values!r}")
            require(
                len(values) == len(self.mixers),
                f"{where}.{name}",
                f"needs one per mixer ({len(self.mixers)}); got {len(values)}",
            )
            multipliers[name] = [float(v) for v in values]
        return dataclasses.replace(self, mixers=list(self.mixers), **multipliers)


def resolve_mixers(
    items: Any,
    resolve_one: Any,
    where: str,
) -> list[tuple[str, Any]]:
    """The ``(name, options)`` of each inner mixer of a ``parallel`` sublayer.

    ``items``: the user's list; ``resolve_one(name, overrides, where)`` resolves one block as
    the config resolves a sublayer. Raises a one-line ValueError for a feed-forward, a nested
    ``parallel`` or an item of the wrong form.
    """
    require(
        isinstance(items, (list, tuple)),
        f"{where}.mixers",
        f"must be a list of mixers; got {items!r}",
    )
    resolved = []
    for index, item in enumerate(items):
        at = f"{where}.mixers[{index}]"
        if isinstance(item, tuple) and len(item) == 2 and not isinstance(item[1], dict):
            resolved.append(item)  # already resolved
            continue
        if isinstance(item, dict):
            require("block" in item, at, f"a mapping needs a 'block' key; got keys {list(item)}")
            name, overrides = item["block"], {k: v for k, v in item.items() if k != "block"}
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict):
            name, overrides = item[0], dict(item[1])
        else:
            name, overrides = item, {}
        require(isinstance(name, str), at, f"block name must be a string; got {name!r}")
        spec = get_block(name, where=at)
        require(spec.name != "parallel", at, "a parallel sublayer cannot hold another one")
        require(
            spec.role == "mixer",
            at,
            f"{spec.name!r} is a feed-forward; only token mixers run side by side",
        )
        resolved.append((spec.name, resolve_one(spec.name, overrides, at)))
    return resolved


@dataclass
class ParallelCache(CacheEntry):
    """One cache entry per inner mixer (None for mixers without state).

    Tensors are named ``"{i}.{field}"`` after the inner entry ``i``'s fields.
    """

    parts: list[CacheEntry | None]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{index}.{name}": tensor
            for index, part in enumerate(self.parts)
            if part is not None
            for name, tensor in part.tensors().items()
        }

    def set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        index, field_name = name.split(".", 1)
        self.parts[int(index)].set_tensor(field_name, tensor)

    def plain_fields(self) -> dict[str, Any]:
        return {
            "parts": [
                None
                if part is None
                else {"type": type(part).__name__, "fields": part.plain_fields()}
                for part in self.parts
            ]
        }

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts if part is not None)

    def select(self, indices: torch.Tensor) -> None:
        for part in self.parts:
            if part is not None:
                part.select(indices)

    def copy(self) -> ParallelCache:
        return ParallelCache([None if part is None else part.copy() for part in self.parts])

    def checkpoint(self) -> ParallelCache:
        return ParallelCache([None if p is None else p.checkpoint() for p in self.parts])

    def rollback(self, saved: CacheEntry | None) -> None:
        if saved is None:
            return
        for part, part_saved in zip(self.parts, saved.parts, strict=True):
            if part is not None:
                part.rollback(part_saved)

    def fill_random(self, length: int, generator: torch.Generator) -> None:
        for part in self.parts:
            if part is not None:
                part.fill_random(length, generator)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.tensors()
        if set(tensors) != set(own):
            raise ValueError(
                f"cache entry fields differ: saved {sorted(tensors)}, expected {sorted(own)}"
            )
        for index, part in enumerate(self.parts):
            if part is not None:
                prefix = f"{index}."
                part.load_tensors(
                    {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
                )


@register_block("parallel", symbol="P", options=ParallelOptions)
class Parallel(Block):
    """Mixers side by side on one input, outputs summed. Shapes: (batch, seqlen, d_model) ->
    same."""

    def __init__(self, d_model: int, options: ParallelOptions, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        self.mixers = nn.ModuleList(
            get_block(name).block_class(d_model, inner, layer_idx) for name, inner in options.mixers
        )
        self.takes_context = [
            "context" in inspect.signature(mixer.forward).parameters for mixer in self.mixers
        ]
        # Instance attributes: they depend on what is inside.
        self.separates_documents = all(
            takes and type(mixer).separates_documents
            for takes, mixer in zip(self.takes_context, self.mixers, strict=True)
        )
        self.recomputable = all(type(mixer).recomputable for mixer in self.mixers)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: ParallelCache | None = None,
        context: TokenContext | None = None,
    ) -> torch.Tensor:
        opts = self.options
        total = None
        for index, mixer in enumerate(self.mixers):
            x = (
                hidden
                if opts.input_multipliers[index] == 1
                else hidden * opts.input_multipliers[index]
            )
            part = None if cache is None else cache.parts[index]
            if self.takes_context[index] and (part is not None or context is not None):
                out = mixer(x, cache=part, context=context)
            else:
                out = mixer(x)
            if isinstance(out, BlockOutput):
                out = out.hidden
            if opts.output_multipliers[index] != 1:
                out = out * opts.output_multipliers[index]
            total = out if total is None else total + out
        return total

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device: torch.device
    ) -> ParallelCache:
        return ParallelCache(
            [mixer.allocate_cache(batch_size, max_seqlen, dtype, device) for mixer in self.mixers]
        )

    @classmethod
    def inference_state_bytes(
        cls, d_model: int, options: ParallelOptions, context: int, dtype: torch.dtype
    ) -> int:
        return sum(
            get_block(name).block_class.inference_state_bytes(d_model, inner, context, dtype)
            for name, inner in options.mixers
        )

    def active_parameters(self) -> int:
        return sum(mixer.active_parameters() for mixer in self.mixers)

    def residual_weights(self) -> list[nn.Parameter]:
        return [weight for mixer in self.mixers for weight in mixer.residual_weights()]

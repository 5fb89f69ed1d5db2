"""The protocol every registered block follows: its cache entries, token context and output.

A block maps ``(batch, seqlen, d_model) -> (batch, seqlen, d_model)``. The model wraps it in a
pre-norm residual sublayer, so a block never normalises its own input. A block that has extra
training signals (MoE auxiliary losses, routing statistics) returns a :class:`BlockOutput`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class TokenContext:
    """Where the new tokens of a forward call sit; given to blocks when it is not trivial.

    Attributes:
        start: absolute index of the first new token in the cache's timeline (pads included);
            0 without a cache.
        positions: (batch, n) int64 position of each new token among its row's real tokens
            (what RoPE rotates by; left padding does not advance it).
        valid: (batch, n) bool, False at left-padding positions, or None when all are real.
        static_start: ``start`` as a 0-d int64 tensor, set for static-shape decode steps
            (one token per row, no padding): blocks then update their cache in place and read
            it whole with masks, so no shape depends on the step — what ``torch.compile`` and
            CUDA graphs need.
        decoding: a decode step at inference (one token per row, no padding; set with
            ``static_start`` too): blocks may leave out what only training reads (MoE
            auxiliary losses and router statistics) and read only the filled part of a cache.
        seq_idx: (batch, n) int64 document of each token of a packed row, canonical (0, 0, 1,
            1, 2, ...: see :func:`layers.ops._common.document_index`), or None (one document
            per row). Token-mixing blocks must not mix across documents: scans restart,
            convolutions and attention stay inside the document. ``positions`` then restart
            at 0 at every document start. Only without a cache.
    """

    start: int
    positions: torch.Tensor
    valid: torch.Tensor | None = None
    static_start: torch.Tensor | None = None
    decoding: bool = False
    seq_idx: torch.Tensor | None = None


class CacheEntry:
    """One sublayer's inference state; tensor attributes hold a leading batch dimension.

    Subclasses are dataclasses of tensors (and plain Python settings). ``select``, ``nbytes``
    and the save/load helpers work on every tensor field, so a new entry type only declares
    its fields.
    """

    def tensors(self) -> dict[str, torch.Tensor]:
        """The entry's tensors by field name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Replace the tensor :meth:`tensors` names ``name`` (e.g. moved to another device)."""
        setattr(self, name, tensor)

    def plain_fields(self) -> dict[str, Any]:
        """The entry's settings that are not tensors (e.g. ``KVCache.window``), by field name:
        what a saved cache records to check it is read back into the same kind of entry."""
        tensors = self.tensors()
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in tensors
        }

    @property
    def nbytes(self) -> int:
        """Bytes held by the entry's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def select(self, indices: torch.Tensor) -> None:
        """Keep (and reorder to) the batch rows ``indices`` (beam search, finished rows)."""
        for name, tensor in self.tensors().items():
            setattr(self, name, tensor.index_select(0, indices.to(tensor.device)))

    def copy(self) -> CacheEntry:
        """A deep copy (tensors cloned)."""
        return dataclasses.replace(self, **{k: t.clone() for k, t in self.tensors().items()})

    def checkpoint(self) -> CacheEntry | None:
        """What :meth:`rollback` needs to undo the tokens fed after this call (a copy here)."""
        return self.copy()

    def rollback(self, saved: CacheEntry | None) -> None:
        """Return to the state :meth:`checkpoint` saved."""
        if saved is not None:
            for name, tensor in saved.tensors().items():
                setattr(self, name, tensor.clone())

    def fill_random(self, length: int, generator: torch.Generator) -> None:
        """Look as if ``length`` real tokens had gone in, with random content (decode benchmarks).

        This default suits state whose size does not grow with the tokens (conv and SSM
        states): every floating-point tensor gets Normal(0, 0.1) noise drawn from ``generator``
        (a CPU generator), whatever ``length``. Entries that keep per-token slots override it.
        """
        for tensor in self.tensors().values():
            if tensor.is_floating_point():
                noise = 0.1 * torch.randn(tensor.shape, generator=generator)
                tensor.copy_(noise.to(device=tensor.device, dtype=tensor.dtype))

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into this entry, checking names, shapes and dtypes."""
        own = self.tensors()
        if set(tensors) != set(own):
            raise ValueError(
                f"cache entry fields differ: saved {sorted(tensors)}, expected {sorted(own)}"
            )
        for name, tensor in tensors.items():
            if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
                raise ValueError(
                    f"cache entry {name}: saved {tuple(tensor.shape)} {tensor.dtype}, expected "
                    f"{tuple(own[name].shape)} {own[name].dtype}"
                )
            own[name].copy_(tensor)


@dataclass
class BlockOutput:
    """A block's output when it carries more than hidden states.

    Attributes:
        hidden: (batch, seqlen, d_model).
        aux_loss: scalar already weighted by the block's own loss weights, added to the
            training loss.
        stats: named tensors for logging (e.g. ``tokens_per_expert``, ``load_balance_loss``).
    """

    hidden: torch.Tensor
    aux_loss: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Block(nn.Module):
    """Base class of registered blocks.

    Subclasses take ``(d_model, options, layer_idx)`` in ``__init__`` and implement
    ``forward(hidden, cache=None, context=None) -> Tensor | BlockOutput``: ``cache`` is the
    block's own :class:`CacheEntry` (from :meth:`allocate_cache`) whose state the new tokens
    continue and which the call updates; ``context`` is a :class:`TokenContext` (positions
    and left padding). The model passes both only when it has them, so a stateless block
    whose forward takes ``hidden`` alone still works without a cache. They may override:

    - :meth:`allocate_cache` — this block's cache entry (None: the block keeps no state);
    - :meth:`inference_state_bytes` — bytes of inference state one sequence needs at a given
      context length (KV for attention, conv + SSM state for SSM blocks, 0 for feed-forwards);
    - :meth:`active_parameters` — parameters used per token (MoE: only top-k experts);
    - :meth:`residual_weights` — the weights that write into the residual stream.

    Class attributes a token-mixing block sets: ``separates_documents = True`` when it honours
    ``context.seq_idx`` (packed training rows with ``data.document_boundaries: reset`` are
    refused otherwise); ``recomputable = False`` when running its forward twice would not
    give the same result (activation checkpointing is then refused).

    At model init every ``nn.Linear`` and ``nn.Embedding`` weight is drawn from Normal(0, std)
    unless it is flagged ``_no_reinit``; a submodule that holds projection weights as plain
    parameters (MoE experts) draws them itself in a ``reset_projections(std)`` method, which
    the model calls on every module that has one. Everything else keeps the block's own init.
    """

    block_name: ClassVar[str] = ""
    separates_documents: ClassVar[bool] = False
    recomputable: ClassVar[bool] = True

    def __init__(self, d_model: int, options: Any, layer_idx: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.options = options
        self.layer_idx = layer_idx

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device: torch.device
    ) -> CacheEntry | None:
        """The inference-cache entry for ``batch_size`` sequences of up to ``max_seqlen``."""
        return None

    @classmethod
    def inference_state_bytes(
        cls, d_model: int, options: Any, context: int, dtype: torch.dtype
    ) -> int:
        """Bytes of inference cache for one sequence of ``context`` tokens."""
        return 0

    def active_parameters(self) -> int:
        """Parameters that take part in processing one token."""
        return sum(p.numel() for p in self.parameters())

    def residual_weights(self) -> list[nn.Parameter]:
        """Weights of the projections that write into the residual stream.

        The model draws them with a smaller std at init (std / sqrt(number of sublayers)).
        """
        return []


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype`` (what :meth:`Block.inference_state_bytes` counts)."""
    return torch.empty((), dtype=dtype).element_size()

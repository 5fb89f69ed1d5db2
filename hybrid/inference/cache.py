"""``HybridCache``: one inference cache for every layer type.

It holds a typed entry per sublayer — attention keys/values (a ring buffer for sliding
windows), conv + SSM state for Mamba layers, nothing for feed-forwards — and the timeline
they share. Each block allocates and updates its own entry; this object only holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layers.base import CacheEntry, TokenContext
from layers.ops import document_index, document_starts

FLOAT_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
KV_DTYPES = ("int8", *FLOAT_DTYPES)


@dataclass(frozen=True)
class CachePrecision:
    """How a cache stores its tensors.

    Attributes:
        dtype: keys, values and conv states (None: the model's dtype).
        kv_dtype: attention keys and values when they differ from ``dtype``: ``"int8"``
            (per-token, per-head scales; :class:`~layers.kv_int8.Int8KVCache`) or a float
            dtype; None: ``dtype``.
        state_dtype: SSM recurrent states (None: float32, or float64 for float64 models);
            bfloat16 halves them, each decode step still computing in float32.
    """

    dtype: torch.dtype | None = None
    kv_dtype: str | torch.dtype | None = None
    state_dtype: torch.dtype | None = None

    @classmethod
    def of(
        cls,
        dtype: torch.dtype | str | None = None,
        kv_dtype: torch.dtype | str | None = None,
        state_dtype: torch.dtype | str | None = None,
    ) -> CachePrecision:
        """Checked settings from dtypes or their names; one-line ``ValueError`` otherwise."""
        kv = None if kv_dtype is None else (
            "int8" if kv_dtype in ("int8", torch.int8) else _float_dtype("kv_dtype", kv_dtype)
        )  # fmt: skip
        return cls(
            dtype=None if dtype is None else _float_dtype("dtype", dtype),
            kv_dtype=kv,
            state_dtype=None if state_dtype is None else _float_dtype("state_dtype", state_dtype),
        )

    def names(self) -> dict[str, str | None]:
        """The settings as names (JSON), None where unset."""

        def name(value: object) -> str | None:
            return None if value is None else str(value).removeprefix("torch.")

        return {
            "dtype": name(self.dtype),
            "kv_dtype": name(self.kv_dtype),
            "state_dtype": name(self.state_dtype),
        }


def with_precision(entry: CacheEntry | None, precision: CachePrecision) -> CacheEntry | None:
    """``entry`` (just allocated, empty) stored as ``precision`` says: attention keys and
    values in ``kv_dtype``, SSM states in ``state_dtype``; other entries unchanged."""
    from layers.attention import KVCache
    from layers.kv_int8 import Int8KVCache
    from layers.parallel import ParallelCache
    from layers.ssm_cache import SSMCache

    if isinstance(entry, ParallelCache):
        entry.parts = [with_precision(part, precision) for part in entry.parts]
        return entry
    if isinstance(entry, KVCache) and precision.kv_dtype is not None:
        if precision.kv_dtype == "int8":
            return (entry.int8_type or Int8KVCache).like(entry)
        entry.keys = entry.keys.to(precision.kv_dtype)
        entry.values = entry.values.to(precision.kv_dtype)
    if isinstance(entry, SSMCache) and precision.state_dtype is not None:
        entry.ssm_state = entry.ssm_state.to(precision.state_dtype)
    return entry


def _float_dtype(option: str, value: object) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in FLOAT_DTYPES:
        return FLOAT_DTYPES[value.removeprefix("torch.")]
    allowed = KV_DTYPES if option == "kv_dtype" else tuple(FLOAT_DTYPES)
    raise ValueError(f"{option}: unknown {value!r}; choose one of {', '.join(allowed)}")


@dataclass
class CacheCheckpoint:
    """A point :meth:`HybridCache.rollback` can return to."""

    length: int
    real_lengths: torch.Tensor
    batch_size: int
    entries: list[CacheEntry | None]


class HybridCache:
    """The inference state of a batch of sequences for one :class:`hybrid.HybridLM`.

    Attributes:
        entries: one per sublayer, None for stateless blocks.
        batch_size, max_seqlen: the capacity it was allocated for.
        length: tokens consumed so far by every row (left padding included).
        real_lengths: (batch,) int64, real (non-padding) tokens consumed by each row.
        fingerprint: the model config's fingerprint; a cache only fits the model it came from.
        precision: the dtypes it was allocated with (what :func:`~hybrid.inference.cache_io`
            records, so a saved cache is read back into the same kinds of entries).
    """

    def __init__(
        self,
        entries: list[CacheEntry | None],
        *,
        batch_size: int,
        max_seqlen: int,
        fingerprint: str,
        device: torch.device,
        precision: CachePrecision | None = None,
    ) -> None:
        self.entries = entries
        self.batch_size = batch_size
        self.max_seqlen = max_seqlen
        self.fingerprint = fingerprint
        self.precision = precision or CachePrecision()
        self.length = 0
        self.real_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries."""
        return sum(self.layer_nbytes())

    def layer_nbytes(self) -> list[int]:
        """Bytes held by each sublayer's entry (0 for stateless blocks)."""
        return [0 if entry is None else entry.nbytes for entry in self.entries]

    def advance(self, n_tokens: int, valid: torch.Tensor | None) -> None:
        """Record that ``n_tokens`` more tokens (``valid`` (batch, n) marks real ones) went in."""
        self.length += n_tokens
        self.real_lengths += n_tokens if valid is None else valid.sum(1)

    def select(self, indices: torch.Tensor) -> None:
        """Keep and reorder batch rows (beam search reorder, dropping finished sequences).

        indices: (new_batch,) int64 row indices, repeats allowed.
        """
        for entry in self.entries:
            if entry is not None:
                entry.select(indices)
        self.real_lengths = self.real_lengths.index_select(0, indices.to(self.real_lengths.device))
        self.batch_size = int(indices.numel())

    def checkpoint(self) -> CacheCheckpoint:
        """Remember the current state, so tokens fed afterwards can be rolled back.

        Costs a copy of the SSM states and sliding-window rings (small, bounded by the window),
        nothing for full-attention KV.
        """
        return CacheCheckpoint(
            length=self.length,
            real_lengths=self.real_lengths.clone(),
            batch_size=self.batch_size,
            entries=[None if e is None else e.checkpoint() for e in self.entries],
        )

    def rollback(self, checkpoint: CacheCheckpoint) -> None:
        """Forget every token fed since ``checkpoint`` (attention lengths and SSM states)."""
        if checkpoint.batch_size != self.batch_size:
            raise ValueError("checkpoint: taken before the cache's rows were selected")
        for entry, saved in zip(self.entries, checkpoint.entries, strict=True):
            if entry is not None:
                entry.rollback(saved)
        self.length = checkpoint.length
        self.real_lengths = checkpoint.real_lengths.clone()

    def copy(self) -> HybridCache:
        """A deep copy (tensors cloned)."""
        clone = HybridCache(
            [None if e is None else e.copy() for e in self.entries],
            batch_size=self.batch_size,
            max_seqlen=self.max_seqlen,
            fingerprint=self.fingerprint,
            device=self.real_lengths.device,
            precision=self.precision,
        )
        clone.length = self.length
        clone.real_lengths = self.real_lengths.clone()
        return clone


def token_context(
    input_ids: torch.Tensor,
    cache: HybridCache | None,
    attention_mask: torch.Tensor | None,
    seq_idx: torch.Tensor | None = None,
) -> TokenContext | None:
    """Positions and padding of the new tokens; None when they are plain 0..n-1, no pads.

    ``seq_idx`` (batch, n): the document of each token of packed rows (see
    :func:`document_context`).

    Raises:
        ValueError: a cache of another batch size or too short for the new tokens, an
            attention mask that is not left padding, or a bad ``seq_idx``.
    """
    if seq_idx is not None:
        return document_context(input_ids, cache, attention_mask, seq_idx)
    if cache is None and attention_mask is None:
        return None
    batch, n = input_ids.shape
    start = 0 if cache is None else cache.length
    if cache is not None:
        if batch != cache.batch_size:
            raise ValueError(
                f"input_ids: batch size {batch} does not match the cache's {cache.batch_size}"
            )
        if start + n > cache.max_seqlen:
            raise ValueError(
                f"input_ids: {n} new tokens after {start} cached exceed the cache's "
                f"max_seqlen={cache.max_seqlen}"
            )
    valid = None
    if attention_mask is not None:
        if attention_mask.dim() == 2 and attention_mask.shape[1] == start + n and start:
            attention_mask = attention_mask[:, start:]  # a mask over the whole sequence
        if attention_mask.shape != (batch, n):
            raise ValueError(
                f"attention_mask: expected shape ({batch}, {n}) (or ({batch}, {start + n})); "
                f"got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        seen_real = cache is not None and bool((cache.real_lengths > 0).any())
        steps = valid[:, 1:].int() - valid[:, :-1].int()
        if bool((steps < 0).any()) or (seen_real and not bool(valid[cache.real_lengths > 0].all())):
            raise ValueError(
                "attention_mask: only left padding is supported (zeros before a row's first "
                "real token, none after it)"
            )
        if bool(valid.all()):
            valid = None
    prior = (
        torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        if cache is None
        else cache.real_lengths
    )
    if valid is None:
        positions = prior[:, None] + torch.arange(n, device=input_ids.device)
    else:
        positions = (prior[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
    return TokenContext(start=start, positions=positions, valid=valid)


def document_context(
    input_ids: torch.Tensor,
    cache: HybridCache | None,
    attention_mask: torch.Tensor | None,
    seq_idx: torch.Tensor,
) -> TokenContext:
    """The context of packed rows: canonical document indices, positions restarting at 0 at
    every document start (what RoPE and sinusoidal encodings then see).

    ``seq_idx`` (batch, n) integer, as mamba_ssm's: a change of value starts a document.

    Raises:
        ValueError: one line: a cache or attention mask given with it (packed documents are
            for training and scoring whole rows), or a shape or dtype that does not fit.
    """
    if cache is not None or attention_mask is not None:
        what = "a cache" if cache is not None else "an attention_mask"
        raise ValueError(f"seq_idx: packed documents cannot be combined with {what}")
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.shape != input_ids.shape:
        shape = tuple(seq_idx.shape) if isinstance(seq_idx, torch.Tensor) else type(seq_idx)
        raise ValueError(
            f"seq_idx: expected shape {tuple(input_ids.shape)} like input_ids; got {shape}"
        )
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise ValueError(f"seq_idx: must hold integers; got {seq_idx.dtype}")
    docs = document_index(seq_idx.to(input_ids.device))
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(docs)
    starts = torch.where(document_starts(docs), index, 0).cummax(1).values
    return TokenContext(start=0, positions=index - starts, seq_idx=docs)

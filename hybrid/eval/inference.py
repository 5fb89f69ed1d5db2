"""Long contexts in bounded memory: greedy answers after a chunked prefill, per-token losses
computed chunk by chunk, and the checks that a context fits before any work."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hybrid.accounting import describe
from hybrid.inference.generation import generate
from hybrid.units import human_bytes

if TYPE_CHECKING:
    from hybrid.model import HybridLM
    from hybrid.tokenizer import Tokenizer

DEFAULT_CHUNK_SIZE = 1024


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths as one left-padded batch.

    Returns ``(ids, mask)``, both (batch, longest) int64: each row's ids end at the last
    column, ``mask`` is 1 on real tokens and 0 on the ``pad_id`` padding before them (the
    ``attention_mask`` that :meth:`HybridLM.forward` and generation take).
    """
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, longest - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, longest - len(sequence) :] = 1
    return ids, mask


def greedy_continuations(
    model: HybridLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[list[int]]:
    """Greedy continuations of a batch of prompts, ``max_new_tokens`` ids each.

    The prompts are left-padded to the longest (with an attention mask) and prefilled through
    the cache ``chunk_size`` tokens at a time, so memory is the cache plus one chunk's logits,
    (batch, chunk_size, vocab).
    """
    device = model.embedding.weight.device
    ids, mask = left_pad(prompts)
    padded = bool((mask == 0).any())
    out = generate(
        model,
        ids.to(device),
        max_new_tokens,
        attention_mask=mask.to(device) if padded else None,
        prefill_chunk_size=chunk_size,
    )
    return out[:, ids.shape[1] :].tolist()


def _chunk_logits(
    model: HybridLM, ids: torch.Tensor, attention_mask: torch.Tensor | None, chunk_size: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, logits)`` for the inputs ``ids[:, :-1]`` fed through the cache
    ``chunk_size`` tokens at a time; ``logits`` (batch, end - start, vocab) predict
    ``ids[:, start + 1 : end + 1]``. ``attention_mask`` (batch, n + 1) is 0 at left padding,
    which then never enters the model's state."""
    batch, n = ids.shape[0], ids.shape[1] - 1
    cache = model.allocate_cache(batch, n)
    mask = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        mask = attention_mask.to(ids.device)[:, :-1]
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        chunk_mask = None if mask is None else mask[:, start:end]
        yield start, end, model(ids[:, start:end], cache=cache, attention_mask=chunk_mask).logits


@torch.inference_mode()
def token_losses(
    model: HybridLM,
    ids: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy (nats) at every position of ``ids`` (batch, n + 1) -> (batch, n),
    float32.

    The inputs ``ids[:, :-1]`` go through the cache ``chunk_size`` tokens at a time and each
    chunk's loss is taken at once, so no (n, vocab) logits are ever held: memory is the cache
    plus (batch, chunk_size, vocab). ``attention_mask`` (batch, n + 1), 0 at left padding
    (:func:`left_pad`), keeps the padding out of the model's state; the losses at padded
    positions are meaningless.
    """
    device = model.embedding.weight.device
    ids = ids.to(device)
    losses = torch.empty(ids.shape[0], ids.shape[1] - 1, dtype=torch.float32, device=device)
    for start, end, logits in _chunk_logits(model, ids, attention_mask, chunk_size):
        losses[:, start:end] = F.cross_entropy(
            logits.float().transpose(1, 2), ids[:, start + 1 : end + 1], reduction="none"
        )
    return losses.cpu()


@torch.inference_mode()
def token_logprobs(
    model: HybridLM,
    ids: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token of ``ids`` (batch, n + 1), and whether it is the
    argmax there: ``(logprobs, greedy)``, both (batch, n), on the CPU.

    ``logprobs`` is float32, or float64 for a float64 model. Chunking and ``attention_mask``
    are those of :func:`token_losses`; the values at padded positions are meaningless.
    """
    device = model.embedding.weight.device
    ids = ids.to(device)
    dtype = torch.promote_types(model.embedding.weight.dtype, torch.float32)
    logprobs = torch.empty(ids.shape[0], ids.shape[1] - 1, dtype=dtype, device=device)
    greedy = torch.empty(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=device)
    for start, end, logits in _chunk_logits(model, ids, attention_mask, chunk_size):
        targets = ids[:, start + 1 : end + 1, None]
        table = torch.log_softmax(logits.to(dtype), dim=-1)  # (batch, chunk, vocab)
        logprobs[:, start:end] = table.gather(-1, targets)[..., 0]
        greedy[:, start:end] = table.argmax(-1) == targets[..., 0]
    return logprobs.cpu(), greedy.cpu()


def decode_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of ``ids`` (ids that are no text, such as end-of-document, are dropped)."""
    decoder = tokenizer.decoder()
    return "".join(decoder.feed(int(token)) for token in ids)


def check_positive(name: str, values: Sequence[int]) -> None:
    """Raises ValueError unless ``values`` is a non-empty list of positive integers."""
    if not values:
        raise ValueError(f"{name}: give at least one value")
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: must be positive integers; got {value!r}")


def check_lengths(name: str, lengths: Sequence[int], max_context: int | None) -> None:
    """Raises ValueError unless ``lengths`` are positive and at most ``max_context`` (if given)."""
    check_positive(name, lengths)
    if max_context is not None and max(lengths) > max_context:
        raise ValueError(
            f"{name}: {max(lengths)} tokens exceeds the maximum context of {max_context} tokens"
        )


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (RAM for the CPU), if known."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_context(
    model: HybridLM,
    name: str,
    lengths: Sequence[int],
    *,
    extra_tokens: int = 0,
    batch_size: int = 1,
    max_context: int | None = None,
) -> None:
    """Fail before any work when a context cannot be run.

    ``lengths`` (reported as ``name``) must be positive and at most ``max_context`` (when
    given); the cache for the longest length plus ``extra_tokens`` (answer tokens) for
    ``batch_size`` sequences must fit in the device's memory.

    Raises:
        ValueError: one line naming the option and the limit.
    """
    check_lengths(name, lengths, max_context)
    longest = max(lengths)
    dtype = model.embedding.weight.dtype
    needed = describe(model.config, longest + extra_tokens, dtype).cache_bytes * batch_size
    available = device_memory(model.embedding.weight.device)
    if available is not None and needed > available:
        raise ValueError(
            f"{name}: {longest} tokens needs an inference cache of {human_bytes(needed)} "
            f"(batch {batch_size}), more than the device's {human_bytes(available)} of memory"
        )

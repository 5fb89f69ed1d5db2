"""Long contexts in bounded memory: greedy answers after a chunked prefill, per-token losses
computed chunk by chunk, and the checks that a context fits before any work."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hybrid.accounting import describe, human_bytes
from hybrid.inference.generation import generate

if TYPE_CHECKING:
    from hybrid.model import HybridLM
    from hybrid.tokenizer import Tokenizer

DEFAULT_CHUNK_SIZE = 1024


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
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    padded = bool((mask == 0).any())
    out = generate(
        model,
        ids.to(device),
        max_new_tokens,
        attention_mask=mask.to(device) if padded else None,
        prefill_chunk_size=chunk_size,
    )
    return out[:, longest:].tolist()


@torch.inference_mode()
def token_losses(
    model: HybridLM, ids: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Next-token cross-entropy (nats) at every position of ``ids`` (batch, n + 1) -> (batch, n),
    float32.

    The inputs ``ids[:, :-1]`` go through the cache ``chunk_size`` tokens at a time and each
    chunk's loss is taken at once, so no (n, vocab) logits are ever held: memory is the cache
    plus (batch, chunk_size, vocab).
    """
    device = model.embedding.weight.device
    ids = ids.to(device)
    batch, n = ids.shape[0], ids.shape[1] - 1
    cache = model.allocate_cache(batch, n)
    losses = torch.empty(batch, n, dtype=torch.float32, device=device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        logits = model(ids[:, start:end], cache=cache).logits  # (batch, chunk, vocab)
        losses[:, start:end] = F.cross_entropy(
            logits.float().transpose(1, 2), ids[:, start + 1 : end + 1], reduction="none"
        )
    return losses.cpu()


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

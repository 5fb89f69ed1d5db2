"""Token selection for generation: penalties, temperature, top-k / top-p / min-p, sampling.

One decoding step turns next-token logits ``(batch, vocab)`` into token ids ``(batch,)``:

1. :func:`apply_penalties` — repetition (CTRL / HF), presence and frequency (OpenAI) penalties
   from per-row counts of the tokens seen so far;
2. :func:`filter_logits` — temperature, then top-k, then top-p, then min-p; removed entries
   become ``-inf``;
3. :func:`sample` — argmax when greedy, otherwise one multinomial draw from the softmax.

:func:`probabilities` returns exactly the distribution :func:`sample` draws from (one-hot at
the argmax when greedy), which speculative decoding needs for both the draft and the target.
Everything is batched, runs on the logits' device and computes in float32 (float64 stays
float64), so bfloat16 logits are fine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from layers.options import require


def _require_number(value: Any, where: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    require(ok, where, f"must be a number; got {value!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """How one token is chosen from the next-token logits.

    Attributes:
        temperature: logits are divided by it; 0 means greedy (argmax), and the filters below
            then change nothing since each of them keeps the argmax.
        top_k: keep the ``top_k`` largest logits (tokens tied with the k-th are kept too);
            0 turns it off.
        top_p: nucleus: keep the most probable tokens until their probability sums to at
            least ``top_p`` (the token that crosses it included); 1 turns it off.
        min_p: keep tokens whose probability is at least ``min_p`` times the largest
            probability; 0 turns it off.
        repetition_penalty: CTRL / HF rule for tokens already seen: a positive logit is
            divided by it, a negative one multiplied; 1 turns it off.
        presence_penalty: subtracted once from the logit of every token already seen.
        frequency_penalty: subtracted once per occurrence of a token already seen.

    Raises:
        ValueError: one line starting with the argument's name.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        _require_number(self.temperature, "temperature")
        require(self.temperature >= 0, "temperature", f"must be >= 0; got {self.temperature!r}")
        require(
            math.isfinite(self.temperature),
            "temperature",
            f"must be finite; got {self.temperature!r}",
        )
        top_k_is_int = isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
        require(top_k_is_int, "top_k", f"must be an integer; got {self.top_k!r}")
        require(self.top_k >= 0, "top_k", f"must be >= 0; got {self.top_k!r}")
        _require_number(self.top_p, "top_p")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1]; got {self.top_p!r}")
        _require_number(self.min_p, "min_p")
        require(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1]; got {self.min_p!r}")
        _require_number(self.repetition_penalty, "repetition_penalty")
        require(
            0 < self.repetition_penalty < math.inf,
            "repetition_penalty",
            f"must be > 0 and finite; got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require_number(value, name)
            require(math.isfinite(value), name, f"must be finite; got {value!r}")

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax (temperature 0)."""
        return self.temperature == 0


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # Half-precision softmax and cumulative sums lose too much for top-p and min-p thresholds.
    return torch.promote_types(logits.dtype, torch.float32)


def _check_logits(logits: torch.Tensor, token_counts: torch.Tensor | None = None) -> None:
    require(
        logits.dim() == 2 and logits.is_floating_point(),
        "logits",
        f"must be a floating (batch, vocab) tensor; got {logits.dtype} {tuple(logits.shape)}",
    )
    if token_counts is not None:
        require(
            token_counts.shape == logits.shape,
            "token_counts",
            f"must have the logits' shape {tuple(logits.shape)}; got {tuple(token_counts.shape)}",
        )


def apply_penalties(
    logits: torch.Tensor, token_counts: torch.Tensor | None, config: SamplingConfig
) -> torch.Tensor:
    """Penalise tokens already seen: repetition penalty first, then presence and frequency.

    Args:
        logits: (batch, vocab) float.
        token_counts: (batch, vocab) integer counts of the tokens seen so far in each row
            (whether the prompt counts is the caller's choice); None: no penalty.
        config: the penalties.

    Returns:
        (batch, vocab) penalised logits in float32 (float64 if given float64).
    """
    _check_logits(logits, token_counts)
    logits = logits.to(_compute_dtype(logits))
    if token_counts is None:
        return logits
    seen = token_counts > 0
    if config.repetition_penalty != 1:
        # Dividing a negative logit would raise it, so negatives are multiplied instead.
        penalised = torch.where(
            logits > 0, logits / config.repetition_penalty, logits * config.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if config.frequency_penalty != 0:
        logits = logits - token_counts.to(logits.dtype) * config.frequency_penalty
    if config.presence_penalty != 0:
        logits = logits - seen.to(logits.dtype) * config.presence_penalty
    return logits


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then min-p; removed tokens get ``-inf``.

    Each filter sees the distribution the previous ones left (softmax of the surviving
    logits), so e.g. top-p sums probabilities renormalised over the top-k tokens, and min-p
    compares with the largest probability of that distribution — not with the first logit.
    Every filter keeps the most probable token, so at least one token always survives.
    Greedy (temperature 0) keeps the argmax alone (the first one on ties), which makes
    ``softmax`` of the result the one-hot distribution greedy decoding draws from.

    Args:
        logits: (batch, vocab) float, usually already penalised.
        config: the filters.

    Returns:
        (batch, vocab) float32 (float64 if given float64) logits, ``-inf`` where removed.
    """
    _check_logits(logits)
    logits = logits.to(_compute_dtype(logits))
    neg_inf = torch.tensor(-math.inf, dtype=logits.dtype, device=logits.device)
    if config.greedy:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(1, logits.argmax(dim=-1, keepdim=True), True)
        return torch.where(keep, logits, neg_inf)

    logits = logits / config.temperature
    vocab = logits.shape[-1]
    if 0 < config.top_k < vocab:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = torch.where(logits >= kth, logits, neg_inf)
    if config.top_p < 1:
        # Skipped at 1 because a rounded cumulative sum can fall short of 1 and drop the tail.
        probs = torch.softmax(logits, dim=-1)
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        n_kept = (mass_before < config.top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        # A threshold rather than the sorted prefix itself, so ties are kept together and the
        # result does not depend on how the sort orders them.
        threshold = sorted_probs.gather(1, n_kept - 1)
        logits = torch.where(probs >= threshold, logits, neg_inf)
    if config.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        threshold = config.min_p * probs.max(dim=-1, keepdim=True).values
        logits = torch.where(probs >= threshold, logits, neg_inf)
    return logits


def probabilities(
    logits: torch.Tensor, config: SamplingConfig, token_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """The exact distribution :func:`sample` draws from.

    Args:
        logits: (batch, vocab) float.
        config: penalties and filters.
        token_counts: (batch, vocab) integer counts for the penalties, or None.

    Returns:
        (batch, vocab) float32 (float64 if given float64); rows sum to 1, exactly 0 where
        filtered, one-hot at the argmax when greedy.
    """
    return torch.softmax(filter_logits(apply_penalties(logits, token_counts, config), config), -1)


def sample(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
    token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose one token per row.

    Args:
        logits: (batch, vocab) float.
        config: penalties, filters and temperature.
        generator: random source (on the logits' device) for reproducible draws; None uses
            the global one. Unused when greedy.
        token_counts: (batch, vocab) integer counts for the penalties, or None.

    Returns:
        (batch,) int64 token ids.
    """
    penalised = apply_penalties(logits, token_counts, config)
    if config.greedy:
        return penalised.argmax(dim=-1)
    probs = torch.softmax(filter_logits(penalised, config), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def update_counts(token_counts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Counts after each row has seen one more token (a new tensor; the input is unchanged).

    Args:
        token_counts: (batch, vocab) integer counts.
        tokens: (batch,) token ids.

    Returns:
        (batch, vocab) counts, same dtype, with 1 added at ``tokens[b]`` in row ``b``.
    """
    index = tokens.to(device=token_counts.device, dtype=torch.int64).view(-1, 1)
    return token_counts.scatter_add(1, index, torch.ones_like(index, dtype=token_counts.dtype))


def count_tokens(
    ids: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row token counts of a batch of sequences, e.g. the prompts before generation.

    Args:
        ids: (batch, seqlen) token ids.
        vocab_size: columns of the result.
        mask: (batch, seqlen) bool, True where a position counts (e.g. False on left
            padding); None counts every position.

    Returns:
        (batch, vocab_size) int64 counts.
    """
    ids = ids.to(torch.int64)
    ones = torch.ones_like(ids) if mask is None else mask.to(torch.int64)
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.int64, device=ids.device)
    return counts.scatter_add(1, ids, ones)

"""Speculative decoding for hybrid models: a draft proposes, the target verifies in one pass.

Works with SSM state as well as KV: before the target verifies the drafted tokens, its cache
is checkpointed; on a rejection both caches roll back (attention lengths and SSM states) and
re-absorb only the accepted tokens. Acceptance follows Leviathan et al. / Chen et al.: draft
token ``x`` is kept with probability ``min(1, p(x) / q(x))``, a rejection draws from
``norm(max(0, p - q))``, so the output distribution is exactly the target's. With greedy
settings the output is token-for-token the target's greedy output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hybrid.inference.generation import check_prompt
from hybrid.inference.sampling import SamplingConfig, probabilities

if TYPE_CHECKING:
    from hybrid.model import HybridLM


@dataclass
class SpeculativeResult:
    """Tokens and statistics of one speculative generation.

    Attributes:
        tokens: (1, prompt_length + new_tokens).
        new_tokens: tokens generated.
        drafted / accepted: draft tokens proposed / kept by the target.
        rounds: draft-then-verify rounds (one target forward each, two after a rejection).
        seconds: wall time of the generation.
    """

    tokens: torch.Tensor
    new_tokens: int
    drafted: int
    accepted: int
    rounds: int
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def _draw(dist: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    """One token from a (vocab,) distribution (argmax when greedy)."""
    if greedy:
        return int(dist.argmax())
    return int(torch.multinomial(dist, 1, generator=generator))


def speculative_generate(
    target: HybridLM,
    draft: HybridLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    num_draft_tokens: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    max_seqlen: int | None = None,
) -> SpeculativeResult:
    """Generate with ``draft`` proposing ``num_draft_tokens`` tokens a round for ``target``.

    ``input_ids`` is one prompt, (1, prompt_length). Any HybridLM with the target's
    vocabulary can draft (a smaller hybrid, a pure SSM, or the target itself).

    Raises:
        ValueError: a draft with another vocabulary, a batch of several prompts,
            num_draft_tokens < 1, and the checks of :func:`hybrid.inference.generation.generate`.
    """
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"draft: vocabulary size {draft.config.vocab_size} differs from the target's "
            f"{target.config.vocab_size}"
        )
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens: must be a positive integer; got {num_draft_tokens!r}")
    capacity = check_prompt(target, input_ids, max_new_tokens, None, max_seqlen)
    if input_ids.shape[0] != 1:
        raise ValueError("input_ids: speculative decoding takes one prompt, shape (1, length)")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    device = input_ids.device
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    stops = set(stop_token_ids)
    start_time = time.perf_counter()

    def feed(model: HybridLM, cache, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=device)
        return model(ids, cache=cache).logits[0]

    with torch.inference_mode():
        # Room for one round's drafts beyond the last token.
        target_cache = target.allocate_cache(1, capacity + num_draft_tokens + 1)
        draft_cache = draft.allocate_cache(1, capacity + num_draft_tokens + 1)
        prompt = input_ids[0].tolist()
        if len(prompt) > 1:
            feed(target, target_cache, prompt[:-1])
            feed(draft, draft_cache, prompt[:-1])
        # Tokens each model has yet to absorb into its cache.
        target_pending, draft_pending = prompt[-1:], prompt[-1:]
        new: list[int] = []
        drafted = accepted_total = rounds = 0
        while len(new) < max_new_tokens:
            rounds += 1
            k = min(num_draft_tokens, max_new_tokens - len(new) - 1)
            drafts, draft_dists, draft_checkpoint = [], [], None
            tokens = draft_pending
            for i in range(k):
                dist = probabilities(feed(draft, draft_cache, tokens)[-1:], sampling)[0]
                if i == 0:
                    draft_checkpoint = draft_cache.checkpoint()  # draft_pending absorbed
                tokens = [_draw(dist, sampling.greedy, generator)]
                drafts.append(tokens[0])
                draft_dists.append(dist)

            target_checkpoint = target_cache.checkpoint()
            logits = feed(target, target_cache, target_pending + drafts)
            target_dists = probabilities(logits[len(target_pending) - 1 :], sampling)  # (k+1, V)
            accepted, correction = 0, None
            for i, token in enumerate(drafts):
                ratio = target_dists[i, token] / draft_dists[i][token]
                u = torch.rand((), generator=generator, device=device)
                if u < ratio:
                    accepted += 1
                    continue
                residual = (target_dists[i] - draft_dists[i]).clamp(min=0)
                residual = residual / residual.sum() if residual.sum() > 0 else target_dists[i]
                correction = _draw(residual, sampling.greedy, generator)
                break
            drafted += k
            accepted_total += accepted
            if correction is None:  # every draft kept: the target's next token comes free
                correction = _draw(target_dists[k], sampling.greedy, generator)
                draft_pending = [*drafts[-1:], correction] if k else [*draft_pending, correction]
                target_pending = [correction]
            else:
                target_cache.rollback(target_checkpoint)
                feed(target, target_cache, target_pending + drafts[:accepted])
                target_pending = [correction]
                draft_cache.rollback(draft_checkpoint)
                draft_pending = [*drafts[:accepted], correction]
            round_tokens = [*drafts[:accepted], correction]
            for token in round_tokens:
                new.append(token)
                if token in stops or len(new) == max_new_tokens:
                    break
            if new[-1] in stops:
                break

    tokens = torch.cat([input_ids, torch.tensor([new], device=device)], dim=1)
    seconds = time.perf_counter() - start_time
    return SpeculativeResult(tokens, len(new), drafted, accepted_total, rounds, seconds)

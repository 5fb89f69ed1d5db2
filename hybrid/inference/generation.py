"""Generation on top of the inference cache: sampling, streaming, stop tokens, beam search.

Prompts of different lengths are given left-padded with an ``attention_mask`` (0 on padding),
the convention of transformers' ``generate``. Padding never enters any state, so each row's
tokens are the ones it would get alone.

:class:`HybridLM` inherits ``generate`` / ``stream`` / ``beam_search`` from
:class:`GenerationMixin` (as mamba_ssm's models do): this module never imports the model, and
the functions work on any model with ``allocate_cache``, ``decode_step``, ``compiled_decode_step``,
``config.vocab_size`` and a ``forward(ids, cache=..., attention_mask=...)`` returning logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from hybrid.inference.cache import HybridCache
from hybrid.inference.cuda_graph import CUDAGraphDecodeStep
from hybrid.inference.sampling import SamplingConfig, count_tokens, sample, update_counts


class DecodingModel(Protocol):
    """What generation needs of a model (:class:`hybrid.HybridLM` is one)."""

    config: Any  # has ``vocab_size``

    def __call__(
        self,
        input_ids: torch.Tensor,
        *,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Any:  # has ``logits`` (batch, n, vocab_size)
        ...

    def allocate_cache(self, batch_size: int, max_seqlen: int) -> HybridCache: ...

    def decode_step(
        self, tokens: torch.Tensor, cache: HybridCache, position: int | torch.Tensor
    ) -> torch.Tensor: ...

    def compiled_decode_step(self, mode: str | None = None) -> Callable[..., torch.Tensor]: ...


def check_prompt(
    model: DecodingModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None,
    max_seqlen: int | None,
) -> int:
    """Validate generation inputs before any work; return the cache length to allocate.

    Raises:
        ValueError: one line naming the argument.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids: expected a (batch, prompt_length) tensor of token ids")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: empty prompt (shape {tuple(input_ids.shape)})")
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens: must be a positive integer; got {max_new_tokens!r}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected shape {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}"
            )
        if not bool(attention_mask.bool().any(1).all()):
            raise ValueError("attention_mask: every row needs at least one real prompt token")
    needed = input_ids.shape[1] + max_new_tokens
    if max_seqlen is not None and needed > max_seqlen:
        raise ValueError(
            f"max_seqlen: prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = "
            f"{needed} exceeds max_seqlen={max_seqlen}"
        )
    return max_seqlen or needed


def check_cuda_graph(device: torch.device, compile: bool | str) -> None:
    """Raise a one-line ValueError unless ``cuda_graph=True`` can work with these settings."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph: needs the model and input_ids on CUDA; they are on {device}")
    if compile in ("reduce-overhead", "max-autotune"):  # the torch.compile modes with CUDA graphs
        raise ValueError(
            f"cuda_graph: compile={compile!r} makes CUDA graphs itself; use compile=True "
            "(or 'max-autotune-no-cudagraphs') with cuda_graph=True"
        )


def prefill(
    model: DecodingModel,
    input_ids: torch.Tensor,
    cache: HybridCache,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Feed a prompt into ``cache`` (in chunks of ``chunk_size`` to bound memory).

    Returns the logits of the last position, (batch, vocab).
    """
    length = input_ids.shape[1]
    step = chunk_size or length
    for start in range(0, length, step):
        mask = None if attention_mask is None else attention_mask[:, start : start + step]
        logits = model(input_ids[:, start : start + step], cache=cache, attention_mask=mask).logits
    return logits[:, -1]


def stream(
    model: DecodingModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    seed: int | None = None,
    max_seqlen: int | None = None,
    prefill_chunk_size: int | None = None,
    compile: bool | str = False,
    cuda_graph: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the new tokens one step at a time, (batch,) each.

    A row that produced a stop token is finished: it yields ``pad_token_id`` afterwards.
    The stream ends after ``max_new_tokens`` steps or when every row is finished. Decoding
    runs the model's eager ``decode_step`` (one-token paths, attention over the filled part of
    its cache); ``compile=True`` (or a ``torch.compile`` mode such as ``"reduce-overhead"``)
    compiles its static-shape form first. ``cuda_graph=True`` (CUDA only) records the static
    step, compiled or not, as one CUDA graph after the prefill and replays it per token
    (:class:`hybrid.inference.cuda_graph.CUDAGraphDecodeStep`).
    """
    if not 0 <= pad_token_id < model.config.vocab_size:
        raise ValueError(
            f"pad_token_id: must be in [0, {model.config.vocab_size}); got {pad_token_id}"
        )
    sampling = sampling or SamplingConfig(temperature=0.0)
    capacity = check_prompt(model, input_ids, max_new_tokens, attention_mask, max_seqlen)
    device = input_ids.device
    if cuda_graph:
        check_cuda_graph(device, compile)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    penalised = (
        sampling.repetition_penalty != 1.0
        or sampling.presence_penalty != 0.0
        or sampling.frequency_penalty != 0.0
    )
    with torch.inference_mode():
        cache = model.allocate_cache(input_ids.shape[0], capacity)
        counts = None
        if penalised:
            mask = None if attention_mask is None else attention_mask.bool()
            counts = count_tokens(input_ids, model.config.vocab_size, mask)
        logits = prefill(model, input_ids, cache, attention_mask, prefill_chunk_size)
        if compile:
            decode = model.compiled_decode_step(None if compile is True else compile)
        else:
            decode = model.decode_step
        if cuda_graph:
            decode = CUDAGraphDecodeStep(decode)
        static = bool(compile) or cuda_graph
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample(logits, sampling, generator, counts)
            token = torch.where(finished, pad_token_id, token)
            yield token
            finished |= torch.isin(token, stops)
            if step == max_new_tokens - 1 or bool(finished.all()):
                return
            if counts is not None:
                counts = update_counts(counts, token)
            # The static step (compiled, CUDA graph) takes the index as a tensor, so that its
            # shapes never change; the eager one as an int, to read only the filled cache.
            position = torch.tensor(cache.length, device=device) if static else cache.length
            logits = decode(token[:, None], cache, position)
            cache.advance(1, None)


def generate(
    model: DecodingModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    seed: int | None = None,
    num_beams: int = 1,
    max_seqlen: int | None = None,
    prefill_chunk_size: int | None = None,
    compile: bool | str = False,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """The prompt followed by the new tokens, (batch, prompt_length + new).

    ``temperature`` 0 is greedy. ``compile`` compiles the decode step and ``cuda_graph``
    replays it as a CUDA graph (see :func:`stream`).
    ``num_beams`` > 1 runs beam search (greedy scoring by
    summed log-probabilities; sampling options must stay at their defaults). The number of
    new tokens is ``max_new_tokens`` unless every row stopped earlier.

    Raises:
        ValueError: before any work, naming the bad argument (empty prompt, temperature < 0,
            top_p outside (0, 1], top_k < 0, num_beams < 1, prompt + new > max_seqlen, ...).
    """
    sampling = SamplingConfig(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ValueError(f"num_beams: must be a positive integer; got {num_beams!r}")
    if num_beams > 1:
        if compile or cuda_graph:
            raise ValueError(
                "num_beams: beam search reorders its cache every step through the model's "
                "forward; compile and cuda_graph apply to the static decode step only"
            )
        if sampling != SamplingConfig(temperature=0.0):
            raise ValueError(
                "num_beams: beam search scores by log-probability; leave the "
                "sampling options (temperature, top_k, ...) at their defaults"
            )
        return beam_search(
            model, input_ids, max_new_tokens, num_beams=num_beams,
            attention_mask=attention_mask, stop_token_ids=stop_token_ids,
            pad_token_id=pad_token_id, max_seqlen=max_seqlen,
        )  # fmt: skip
    tokens = list(
        stream(
            model, input_ids, max_new_tokens, attention_mask=attention_mask, sampling=sampling,
            stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, seed=seed,
            max_seqlen=max_seqlen, prefill_chunk_size=prefill_chunk_size, compile=compile,
            cuda_graph=cuda_graph,
        )
    )  # fmt: skip
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


def beam_search(
    model: DecodingModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    num_beams: int,
    attention_mask: torch.Tensor | None = None,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Beam search on the cache: every step keeps the ``num_beams`` continuations with the
    highest summed log-probability, reordering the cache (KV and SSM state alike) to follow
    them. A beam that emits a stop token is finished: it continues with ``pad_token_id`` at no
    cost, keeping its score. Returns the best beam per row, (batch, prompt_length + new).
    """
    capacity = check_prompt(model, input_ids, max_new_tokens, attention_mask, max_seqlen)
    batch, vocab = input_ids.shape[0], model.config.vocab_size
    device = input_ids.device
    stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    expand = torch.arange(batch, device=device).repeat_interleave(num_beams)
    with torch.inference_mode():
        cache = model.allocate_cache(batch * num_beams, capacity)
        mask = None if attention_mask is None else attention_mask[expand]
        logits = prefill(model, input_ids[expand], cache, mask)
        # Only the first beam of each row is live at the start, so beams do not duplicate.
        scores = torch.full((batch, num_beams), float("-inf"), device=device)
        scores[:, 0] = 0.0
        finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
        history = torch.empty(batch, num_beams, 0, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            logprobs = torch.log_softmax(logits.float(), dim=-1).view(batch, num_beams, vocab)
            # A finished beam's only continuation is the pad token, at log-probability 0.
            done = torch.full_like(logprobs, float("-inf"))
            done[..., pad_token_id] = 0.0
            logprobs = torch.where(finished[..., None], done, logprobs)
            candidates = (scores[..., None] + logprobs).view(batch, num_beams * vocab)
            scores, flat = candidates.topk(num_beams, dim=-1)  # sorted, best first
            parent, token = flat // vocab, flat % vocab
            finished = finished.gather(1, parent) | torch.isin(token, stops)
            history = torch.cat([history.gather(1, parent[..., None].expand_as(history)),
                                 token[..., None]], dim=-1)  # fmt: skip
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            rows = (torch.arange(batch, device=device)[:, None] * num_beams + parent).flatten()
            cache.select(rows)
            logits = model(token.view(-1, 1), cache=cache).logits[:, -1]
    return torch.cat([input_ids, history[:, 0]], dim=1)


class GenerationMixin:
    """``generate``, ``stream`` and ``beam_search`` as methods of the model they run on."""

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """The prompt followed by new tokens, (batch, prompt_length + new); see
        :func:`generate` for the options."""
        return generate(self, input_ids, max_new_tokens, **options)

    def stream(
        self, input_ids: torch.Tensor, max_new_tokens: int, **options
    ) -> Iterator[torch.Tensor]:
        """Yield the new tokens step by step, (batch,) each; see :func:`stream`."""
        yield from stream(self, input_ids, max_new_tokens, **options)

    def beam_search(
        self, input_ids: torch.Tensor, max_new_tokens: int, *, num_beams: int, **options
    ) -> torch.Tensor:
        """The best of ``num_beams`` beams per row; see :func:`beam_search`."""
        return beam_search(self, input_ids, max_new_tokens, num_beams=num_beams, **options)

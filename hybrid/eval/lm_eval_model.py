"""Our models in EleutherAI's lm-evaluation-harness: the ``hybrid`` model of its registry.

Importing this module imports ``lm_eval`` and registers :class:`HybridEvalLM` as ``hybrid``;
lm-eval finds models only by import (its registry is filled by imports; 0.4.13 scans no entry
points), so ``python -m hybrid.eval.lm_eval_cli`` (lm-eval's own command line after this
import) and ``hybrid eval lm-eval`` are the ways in::

    python -m hybrid.eval.lm_eval_cli --model hybrid --model_args checkpoint=runs/quickstart \\
        --tasks lambada_openai,hellaswag --batch_size 8

Batches are left-padded with an attention mask (:func:`hybrid.eval.inference.left_pad`), so
padding never enters a conv or SSM state nor is attended to: each request scores as it would
alone. Scoring runs :func:`hybrid.eval.inference.token_logprobs` (a chunked prefill through the
inference cache); generation streams greedy (or sampled) tokens from
:func:`hybrid.inference.generation.stream` and stops a row at the first stop string or the
end-of-document token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lm_eval.models  # noqa: F401  (the built-in models, registered before ours: see below)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from hybrid.eval import inference
from hybrid.inference.generation import stream
from hybrid.inference.sampling import SamplingConfig

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

    from hybrid.model import HybridLM
    from hybrid.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
"""Context window when neither ``max_length`` nor the checkpoint's training length is known."""

DEFAULT_MAX_GEN_TOKS = 256
"""New tokens per ``generate_until`` request unless the task's ``max_gen_toks`` says otherwise
(lm-eval's default)."""

MODEL_ARGS = (
    "checkpoint", "device", "dtype", "batch_size", "max_batch_size", "max_length",
    "max_gen_toks", "chunk_size", "seed", "trust_remote_code",
)  # fmt: skip
"""The ``--model_args`` keys :class:`HybridEvalLM` takes (``max_batch_size`` is accepted and
ignored: lm-eval passes it, and only ``batch_size=auto`` would use it)."""

SAMPLING_KWARGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
"""Generation kwargs of a task that map onto :class:`SamplingConfig`; ``until``,
``max_gen_toks`` (and its aliases) and ``do_sample`` are handled too, anything else is an
error."""


class ModelArgsError(ValueError):
    """Bad ``--model_args`` (one line naming the key); the command lines print it as one line
    and exit 2."""


def _positive_int(name: str, value: Any) -> int:
    """``value`` (an int, or the string lm-eval may pass) as a positive int."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelArgsError(f"model_args: {name} must be a positive integer; got {value!r}")
    return value


def _batch_size(value: Any) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        raise ModelArgsError(
            "model_args: batch_size=auto is not supported; give a number of requests"
        )
    return _positive_int("batch_size", value)


def _check_keys(keys: Iterable[str]) -> None:
    unknown = sorted(set(keys) - set(MODEL_ARGS))
    if unknown:
        raise ModelArgsError(
            f"model_args: unknown key {unknown[0]!r}; valid keys: {', '.join(MODEL_ARGS)}"
        )


def _check_checkpoint(checkpoint: Any) -> None:
    if checkpoint is None or checkpoint == "":
        raise ModelArgsError(
            "model_args: checkpoint=PATH is required (a run directory, a .ckpt file or a "
            "model directory)"
        )
    if not Path(str(checkpoint)).exists():
        raise ModelArgsError(f"model_args: checkpoint {checkpoint}: no such file or directory")


def _flag(name: str, value: Any) -> bool:
    """``value`` (a bool, or the text lm-eval may pass) as a bool."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ModelArgsError(f"model_args: {name} must be True or False; got {value!r}")
    return value


def _dtype(name: str | None) -> torch.dtype:
    from hybrid.cli.parsing import DTYPES

    name = name or "float32"
    if name not in DTYPES:
        raise ModelArgsError(
            f"model_args: dtype must be one of {', '.join(sorted(DTYPES))}; got {name!r}"
        )
    return DTYPES[name]


def check_model_args(options: Mapping[str, Any]) -> None:
    """The checks of ``--model_args`` that need no model (run before lm-eval loads anything):
    known keys, a checkpoint that exists, a dtype name, positive integers.

    Raises:
        ModelArgsError: one line naming the key.
    """
    _check_keys(options)
    _check_checkpoint(options.get("checkpoint"))
    _dtype(options.get("dtype"))
    if options.get("batch_size") is not None:
        _batch_size(options["batch_size"])
    for key in ("max_length", "max_gen_toks", "chunk_size"):
        if options.get(key) is not None:
            _positive_int(key, options[key])
    if options.get("trust_remote_code") is not None:
        _flag("trust_remote_code", options["trust_remote_code"])


def _device(name: str | torch.device | None) -> torch.device:
    """``None`` or ``auto``: CUDA when available, else the CPU. A CUDA device without CUDA
    falls back to the CPU with a warning, as lm-eval's own models do (its command line passes
    ``cuda:0`` whenever ``--device`` is not given)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ModelArgsError(
            f"model_args: device {name!r} is not a device (cpu, cuda, cuda:1, auto)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: running on the CPU", name)
        return torch.device("cpu")
    return device


def _load(
    checkpoint: str | Path,
    device: str | torch.device | None,
    dtype: str | None,
    trust_remote_code: bool = False,
) -> tuple[HybridLM, Tokenizer]:
    """The model and tokenizer of ``checkpoint`` (any path :func:`load_model` takes)."""
    from hybrid.checkpoint import load_model
    from hybrid.tokenizer import load_tokenizer

    _check_checkpoint(checkpoint)
    try:
        model = load_model(
            checkpoint, device=_device(device), dtype=_dtype(dtype),
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        tokenizer = load_tokenizer(checkpoint)
    except ValueError as error:
        raise ModelArgsError(f"model_args: checkpoint {checkpoint}: {error}") from None
    return model.eval(), tokenizer


def default_max_length(checkpoint: str | Path | None) -> int:
    """The checkpoint's training length (``data.seq_len``) when recorded, else
    :data:`DEFAULT_MAX_LENGTH`."""
    from hybrid.eval.checkpoints import training_length

    found = training_length(checkpoint) if checkpoint is not None else None
    return found or DEFAULT_MAX_LENGTH


@register_model("hybrid")
class HybridEvalLM(TemplateLM):
    """A :class:`~hybrid.model.HybridLM` with its tokenizer, as an lm-eval language model.

    Args:
        checkpoint: a run directory, ``.ckpt`` file or model directory (loaded with
            :func:`hybrid.checkpoint.load_model` and :func:`hybrid.tokenizer.load_tokenizer`),
            or an already loaded model (then ``tokenizer`` is required; ``device`` and
            ``dtype`` are ignored).
        tokenizer: the tokenizer of an already loaded model.
        device: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        batch_size: requests per forward (left-padded); default 1.
        max_length: the context window: longer contexts lose their left part, rolling
            log-likelihoods use windows of it; default the checkpoint's training length, else
            :data:`DEFAULT_MAX_LENGTH`.
        max_gen_toks: new tokens per ``generate_until`` request unless its task says.
        chunk_size: prefill chunk through the inference cache (bounds the logits' memory).
        seed: seed of sampled generation (greedy needs none).
        trust_remote_code: let the checkpoint's config import the modules it lists (runs their
            code; as transformers' ``trust_remote_code``); default False.

    Raises:
        ModelArgsError: an unknown or bad argument, one line naming it.
    """

    def __init__(
        self,
        checkpoint: str | Path | HybridLM | None = None,
        tokenizer: Tokenizer | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_length: int | str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        chunk_size: int | str = inference.DEFAULT_CHUNK_SIZE,
        seed: int = 1234,
        trust_remote_code: bool | str = False,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        _check_keys(unknown)
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ModelArgsError(f"model_args: seed must be an integer; got {seed!r}")
        self.seed = seed
        if isinstance(checkpoint, torch.nn.Module):
            if tokenizer is None:
                raise ModelArgsError("model_args: a loaded model needs its tokenizer")
            model, source = checkpoint.eval(), None
        else:
            if tokenizer is not None:
                raise ModelArgsError(
                    "model_args: tokenizer goes with a loaded model; a checkpoint brings its own"
                )
            model, tokenizer = _load(
                checkpoint, device, dtype, _flag("trust_remote_code", trust_remote_code)
            )
            source = checkpoint
        self.model: HybridLM = model
        self.tokenizer: Tokenizer = tokenizer  # type: ignore[assignment]
        self._device = model.embedding.weight.device
        self.max_length = (
            default_max_length(source)
            if max_length is None
            else _positive_int("max_length", max_length)
        )
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ModelArgsError(
                f"model_args: the tokenizer's {tokenizer.vocab_size} ids exceed the model's "
                f"vocabulary of {model.config.vocab_size}"
            )
        try:
            inference.check_context(
                model, "max_length", [self.max_length], batch_size=self.batch_size
            )
        except ValueError as error:
            raise ModelArgsError(f"model_args: {error}") from None
        self.progress = True  # False: no progress bars of ours (``hybrid eval --no-progress``)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> HybridEvalLM:
        """The model of ``--model_args`` (``arg_dict``) and lm-eval's own ``--batch_size`` /
        ``--device`` flags (``additional_config``, which its command line always fills: a
        key given in both is taken from ``--model_args`` instead of failing as a duplicate)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> HybridEvalLM:
        """:meth:`create_from_arg_obj` of ``key=value,key=value`` text."""
        return cls.create_from_arg_obj(
            lm_utils.simple_parse_args_string(arg_string), additional_config
        )

    # --- tokens ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The end-of-document id: the conditioning token of an empty context and of a rolling
        log-likelihood's first window, and a stop token of generation."""
        if self.tokenizer.eos_id is None:
            raise ValueError(
                "the tokenizer has no end-of-document token, which empty contexts and "
                "loglikelihood_rolling condition on"
            )
        return self.tokenizer.eos_id

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """The ids of ``string`` (our tokenizers add no special tokens)."""
        return self.tokenizer.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; ids that are no text (end-of-document) are dropped."""
        return inference.decode_text(self.tokenizer, ids)

    # --- log-likelihoods ------------------------------------------------------------------

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` of each ``(context, continuation)``
        request; an empty context conditions on the end-of-document token (lm-eval's
        :class:`TemplateLM` encodes the pairs, :meth:`_loglikelihood_tokens` scores them)."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
    ) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is the greedy one)`` for each
        ``(key, context_ids, continuation_ids)``.

        A context longer than ``max_length`` minus the continuation loses its left part.
        Requests are sorted longest first and scored ``batch_size`` at a time: left-padded,
        every row's continuation ends at the batch's last column, (batch, longest + 1) ids.
        """
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("loglikelihood: a request needs context and continuation ids")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"loglikelihood: a continuation of {len(continuation)} tokens exceeds "
                    f"max_length={self.max_length}"
                )
        collator = Collator(
            requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2]))
        )
        results = []
        bar = tqdm(
            total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.progress
        )
        with bar:
            for batch in collator.get_batched(n=self.batch_size):
                sequences = [(ctx + cont)[-(self.max_length + 1) :] for _, ctx, cont in batch]
                ids, mask = inference.left_pad(sequences)
                logprobs, greedy = inference.token_logprobs(
                    self.model, ids, chunk_size=self.chunk_size, attention_mask=mask
                )  # (batch, longest - 1) each
                for row, (key, _, continuation) in enumerate(batch):
                    n = len(continuation)
                    answer = (
                        float(logprobs[row, -n:].double().sum()),
                        bool(greedy[row, -n:].all()),
                    )
                    results.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(len(batch))
        return collator.get_original(results)

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """The log-likelihood of each whole text, conditioned on the end-of-document token.

        A text longer than ``max_length`` is scored in lm-eval's disjoint rolling windows
        (``get_rolling_token_windows``, context 1): every token is predicted once, each window
        from at most ``max_length`` tokens.
        """
        windows: list[tuple[None, list[int], list[int]]] = []
        counts = []
        for (text,) in (request.args for request in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            mine = [(None, *lm_utils.make_disjoint_window(pair)) for pair in pairs]
            windows.extend(mine)
            counts.append(len(mine))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for request, count in zip(requests, counts, strict=True):
            total = sum(score for score, _ in scores[start : start + count])
            start += count
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation -----------------------------------------------------------------------

    def _sampling(self, kwargs: dict[str, Any]) -> SamplingConfig:
        """The sampling of a task's generation kwargs (after ``normalize_gen_kwargs``)."""
        kwargs = dict(kwargs)
        do_sample = kwargs.pop("do_sample", False)
        unknown = sorted(set(kwargs) - set(SAMPLING_KWARGS))
        if unknown:
            raise ValueError(
                f"generate_until: unsupported generation kwarg {unknown[0]!r}; supported: "
                f"until, max_gen_toks, do_sample, {', '.join(SAMPLING_KWARGS)}"
            )
        if not do_sample:
            kwargs["temperature"] = 0.0
        return SamplingConfig(**kwargs)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context until its first stop string (left out of the
        text), the end-of-document token or ``max_gen_toks`` new tokens.

        Requests with the same generation kwargs run ``batch_size`` at a time, left-padded;
        a context longer than ``max_length - max_gen_toks`` loses its left part.
        """
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        results = []
        bar = tqdm(
            total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress
        )
        with bar:
            for batch in collator.get_batched(n=self.batch_size):
                contexts = [context for context, _ in batch]
                texts = self._generate(contexts, batch[0][1])
                for (context, gen_kwargs), text in zip(batch, texts, strict=True):
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(len(batch))
        return collator.get_original(results)

    def _generate(self, contexts: Sequence[str], gen_kwargs: dict[str, Any]) -> list[str]:
        """One batch of :meth:`generate_until` (the same ``gen_kwargs`` for every row)."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(
                f"generate_until: expected a dict of generation kwargs; got {gen_kwargs!r}"
            )
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = [stop for stop in kwargs.pop("until") if stop]
        max_new = kwargs.pop("max_gen_toks")
        sampling = self._sampling(kwargs)
        room = self.max_length - max_new
        if room < 1:
            raise ValueError(
                f"generate_until: max_gen_toks={max_new} leaves no room for a context in "
                f"max_length={self.max_length}"
            )
        prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-room:] for c in contexts]
        ids, mask = inference.left_pad(prompts)
        eos = self.tokenizer.eos_id
        decoders = [self.tokenizer.decoder() for _ in contexts]
        texts = [""] * len(contexts)
        done = [False] * len(contexts)
        steps = stream(
            self.model,
            ids.to(self._device),
            max_new,
            attention_mask=mask.to(self._device) if bool((mask == 0).any()) else None,
            sampling=sampling,
            stop_token_ids=() if eos is None else (eos,),
            pad_token_id=0 if eos is None else eos,
            seed=self.seed,
            prefill_chunk_size=self.chunk_size,
        )
        for tokens in steps:  # (batch,) new ids
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if token == eos:
                    done[row] = True
                    continue
                texts[row] += decoders[row].feed(token)
                done[row] = any(stop in texts[row] for stop in until)
            if all(done):
                steps.close()  # the other rows stop too: no further decode steps
                break
        return [postprocess_generated_text(text, until, None) for text in texts]

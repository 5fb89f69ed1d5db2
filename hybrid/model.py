"""``HybridLM``: assembles registered blocks into a language model. It only assembles."""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybrid.config import HybridConfig
from hybrid.inference.cache import CachePrecision, HybridCache, token_context, with_precision
from hybrid.inference.generation import GenerationMixin
from hybrid.memory import available_bytes, require_fits
from layers.base import Block, BlockOutput, CacheEntry, TokenContext
from layers.norm import RMSNorm
from layers.positions import sinusoidal_encoding
from layers.registry import get_block


@dataclass
class HybridOutput:
    """What :meth:`HybridLM.forward` returns.

    Attributes:
        logits: (batch, seqlen, vocab_size).
        aux_loss: sum of the MoE layers' weighted auxiliary losses (None without MoE).
        router_stats: per MoE sublayer index, its routing statistics (``tokens_per_expert``,
            ``load_balance_loss``, ``z_loss``, ``router_entropy``).
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    router_stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class Sublayer(nn.Module):
    """Residual wrapper: ``x + multiplier * block(norm(x))`` (pre-norm), or with ``post_norm``
    ``x + multiplier * norm(block(x))`` (OLMo 2's placement)."""

    def __init__(
        self,
        block: Block,
        d_model: int,
        eps: float,
        multiplier: float = 1.0,
        post_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.block = block
        self.multiplier = multiplier
        self.post_norm = post_norm
        # Per-token blocks (and simple user blocks) take ``hidden`` alone.
        self.takes_context = "context" in inspect.signature(block.forward).parameters

    def forward(
        self,
        hidden: torch.Tensor,
        cache: CacheEntry | None = None,
        context: TokenContext | None = None,
    ) -> tuple[torch.Tensor, BlockOutput | None]:
        normed = hidden if self.post_norm else self.norm(hidden)
        if self.takes_context and (cache is not None or context is not None):
            out = self.block(normed, cache=cache, context=context)
        else:
            out = self.block(normed)
        extra = out if isinstance(out, BlockOutput) else None
        if extra is not None:
            out = out.hidden
        if self.post_norm:
            out = self.norm(out)
        if self.multiplier != 1:
            out = out * self.multiplier
        return hidden + out, extra


_COMPILE_NOTE = (
    "hybrid: compiling the decode step with torch.compile; the first generation waits for it "
    "(on 2 CPU cores about 20-30 s the first time on a machine, 4-5 s once torch's on-disk "
    "cache has it), then each token is about 2x faster than the default eager step"
)
_announced = False


def announce_compile() -> None:
    """Say once per process, on stderr, that the decode step is being compiled and what it
    costs (measured by scripts/bench_vs_hf.py)."""
    global _announced
    if not _announced:
        _announced = True
        print(_COMPILE_NOTE, file=sys.stderr, flush=True)


# Weights per sublayer in units of d_model^2, generous enough that a model this bound calls
# small is small (an 8-expert MoE of width 4 d_model is 96); above a quarter of the free
# memory the exact count (a model built on the meta device, about 0.1 s) decides.
_ROUGH_SUBLAYER_WEIGHTS = 128


def check_parameters_fit(config: HybridConfig) -> None:
    """Refuse a model whose float32 weights exceed the free memory, before building it."""
    if torch.get_default_device().type == "meta":
        return
    d, layers = config.d_model, len(config.layers)
    rough = 4 * (2 * config.vocab_size * d + layers * _ROUGH_SUBLAYER_WEIGHTS * d * d)
    free = available_bytes(torch.get_default_device())
    if free is None or rough <= free // 4:
        return
    with torch.device("meta"):
        model = HybridLM(config)
    nbytes = sum(p.numel() for p in model.parameters()) * torch.get_default_dtype().itemsize
    require_fits(
        nbytes, f"model of d_model {d}, vocab_size {config.vocab_size}, {layers} sublayers"
    )


class HybridLM(GenerationMixin, nn.Module):
    """A language model whose sublayers follow ``config.layers``.

    ``model(input_ids)`` with input_ids (batch, seqlen) returns a :class:`HybridOutput` whose
    ``logits`` are (batch, seqlen, vocab_size); ``generate`` / ``stream`` / ``beam_search`` come
    from :class:`~hybrid.inference.generation.GenerationMixin`.

    With ``attention.position: sinusoidal`` the model adds the original Transformer's
    encoding of each token's position (among its row's real tokens) to the token embeddings,
    which are first multiplied by ``sqrt(d_model)`` as in Vaswani et al. (2017); the attention
    sublayers then add no positions of their own.
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        check_parameters_fit(config)
        self.config = config
        self.cache_precision = CachePrecision()  # kv / state dtypes of caches by default
        self.checkpoint_every = 0  # activation checkpointing: every n-th sublayer (0: off)
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.sinusoidal = config.absolute_position == "sinusoidal"
        self.sublayers = nn.ModuleList(
            Sublayer(
                get_block(name).block_class(config.d_model, options, index),
                config.d_model,
                config.norm_eps,
                config.residual_multiplier,
                post_norm=index in config.post_norm_sublayers,
            )
            for index, (name, options) in enumerate(
                zip(config.layers, config.layer_options, strict=True)
            )
        )
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @property
    def blocks(self) -> list[Block]:
        """The blocks, one per sublayer, in order."""
        return [sublayer.block for sublayer in self.sublayers]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) projections and embeddings; residual writers scaled down.

        Modules that keep projection weights as plain parameters draw them in their own
        ``reset_projections(std)``; each block's ``residual_weights()`` then get
        ``init_std / sqrt(n_sublayers)``. Block-specific parameters (SSM dynamics, convs, norms,
        time-step projections marked ``_no_reinit``) keep the initialisation their block gave
        them.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear) and not getattr(module.weight, "_no_reinit", False):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif hasattr(module, "reset_projections"):
                module.reset_projections(std)
        residual_std = std / math.sqrt(len(self.sublayers))
        for block in self.blocks:
            for weight in block.residual_weights():
                nn.init.normal_(weight, std=residual_std)

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Fail clearly on ids outside ``[0, vocab_size)`` instead of reading garbage rows."""
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids: expected shape (batch, seqlen), got {tuple(input_ids.shape)}"
            )
        if input_ids.numel() == 0:
            raise ValueError("input_ids: empty")
        low, high = torch.aminmax(input_ids)
        if low < 0 or high >= self.config.vocab_size:
            bad = int(low) if low < 0 else int(high)
            raise ValueError(
                f"input_ids: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})"
            )

    def require_cache_fits(
        self,
        batch_size: int,
        max_seqlen: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Refuse (one-line ValueError) a cache for ``batch_size`` x ``max_seqlen`` tokens
        whose bytes (keys and values in ``dtype``) exceed the free memory of ``device`` (default:
        the model's)."""
        device = self.embedding.weight.device if device is None else device
        if device.type == "meta":
            return
        dtype = dtype or self.embedding.weight.dtype
        nbytes = batch_size * sum(
            get_block(name).block_class.inference_state_bytes(
                self.config.d_model, options, max_seqlen, dtype
            )
            for name, options in zip(self.config.layers, self.config.layer_options, strict=True)
        )
        require_fits(nbytes, f"inference cache of {batch_size} x {max_seqlen} tokens", device)

    def allocate_cache(
        self,
        batch_size: int,
        max_seqlen: int,
        dtype: torch.dtype | str | None = None,
        *,
        kv_dtype: torch.dtype | str | None = None,
        state_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> HybridCache:
        """An empty inference cache for ``batch_size`` sequences of up to ``max_seqlen`` tokens.

        ``device``: where its tensors live (default: the model's; ``"meta"`` gives the shapes
        and dtypes without memory). A cache larger than the device's free memory is refused.

        ``dtype`` is that of keys, values and conv states (default: the model's).
        ``kv_dtype``: attention keys and values in ``"int8"`` (per-token, per-head scales) or
        another float dtype (default: ``dtype``). ``state_dtype``: SSM states (default
        float32, or wider; ``torch.bfloat16`` halves them). Unset ``kv_dtype`` /
        ``state_dtype`` fall back to ``model.cache_precision`` (what ``generate`` and the
        evaluations then use; set by ``--kv-dtype`` / ``--state-dtype``).
        """
        for name, value in (("batch_size", batch_size), ("max_seqlen", max_seqlen)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer; got {value!r}")
        defaults = self.cache_precision
        precision = CachePrecision.of(
            dtype,
            defaults.kv_dtype if kv_dtype is None else kv_dtype,
            defaults.state_dtype if state_dtype is None else state_dtype,
        )
        for index, sublayer in enumerate(self.sublayers):
            if get_block(self.config.layers[index]).role == "mixer" and not sublayer.takes_context:
                raise ValueError(
                    f"layers[{index}]: block {self.config.layers[index]!r} mixes tokens but its "
                    "forward takes no cache/context, so it cannot run with an inference cache"
                )
        dtype = precision.dtype or self.embedding.weight.dtype
        precision = dataclasses.replace(precision, dtype=dtype)
        device = self.embedding.weight.device if device is None else torch.device(device)
        self.require_cache_fits(batch_size, max_seqlen, dtype, device)
        entries = [
            block.allocate_cache(batch_size, max_seqlen, dtype, device) for block in self.blocks
        ]
        return HybridCache(
            [with_precision(entry, precision) for entry in entries],
            batch_size=batch_size,
            max_seqlen=max_seqlen,
            fingerprint=self.config.fingerprint(),
            device=device,
            precision=precision,
        )

    def enable_activation_checkpointing(self, every: int = 1) -> None:
        """Recompute every ``every``-th sublayer's activations in the backward (torch's
        non-reentrant ``checkpoint``; RNG state preserved, so results are unchanged) instead
        of keeping them; 0 turns it off. Applies in training mode with gradients on.

        Raises:
            ValueError: one line: a negative ``every``, or a block that sets
                ``recomputable = False`` among the sublayers it would recompute.
        """
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(
                f"activation_checkpointing: must be a number of sublayers >= 0; got {every!r}"
            )
        for index in range(0, len(self.sublayers), every or len(self.sublayers) + 1):
            block = self.sublayers[index].block
            if not block.recomputable:  # an instance's (parallel: its mixers') or the class's
                raise ValueError(
                    f"activation_checkpointing: layers[{index}] (block "
                    f"{self.config.layers[index]!r}) sets recomputable = False: its forward "
                    "cannot be re-run in the backward; checkpoint every n-th sublayer around "
                    "it or turn checkpointing off"
                )
        self.checkpoint_every = every

    def check_separates_documents(self) -> None:
        """One-line ``ValueError`` unless every token-mixing sublayer honours ``seq_idx``."""
        for index, sublayer in enumerate(self.sublayers):
            name = self.config.layers[index]
            if get_block(name).role != "mixer":
                continue
            if not (sublayer.takes_context and sublayer.block.separates_documents):
                raise ValueError(
                    f"layers[{index}]: block {name!r} mixes tokens but does not keep packed "
                    "documents apart (it needs separates_documents = True and to honour "
                    "context.seq_idx); set data.document_boundaries: none to train without"
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> HybridOutput:
        """Logits for ``input_ids`` (batch, n) -> (batch, n, vocab_size).

        With ``cache``, the tokens continue what the cache has seen (one token is a decode
        step, more are a prefill chunk) and the cache is updated. ``attention_mask``
        (batch, n) — or (batch, cached + n) — is 0 at left-padding positions: padding never
        enters conv or SSM state, is never attended to, and does not advance positions.
        ``seq_idx`` (batch, n) integer: the document of each token of packed rows (a change of
        value starts one; no cache, no mask): every sublayer then treats each document as if
        it ran alone — scans and convs restart, attention is block-diagonal, positions
        restart at 0.
        """
        self.check_token_ids(input_ids)
        if seq_idx is not None:
            self.check_separates_documents()
        context = token_context(input_ids, cache, attention_mask, seq_idx)
        hidden = self.embed(input_ids, None if context is None else context.positions)
        aux_loss, router_stats = None, {}
        every = self.checkpoint_every if self.training and torch.is_grad_enabled() else 0
        for index, sublayer in enumerate(self.sublayers):
            entry = None if cache is None else cache.entries[index]
            if every and cache is None and index % every == 0:
                hidden, extra = checkpoint(sublayer, hidden, None, context, use_reentrant=False)
            else:
                hidden, extra = sublayer(hidden, entry, context)
            if extra is not None:
                if extra.aux_loss is not None:
                    aux_loss = extra.aux_loss if aux_loss is None else aux_loss + extra.aux_loss
                if extra.stats:
                    router_stats[index] = extra.stats
        if cache is not None:
            cache.advance(input_ids.shape[1], None if context is None else context.valid)
        return HybridOutput(self.logits(hidden), aux_loss, router_stats)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm, LM head and logit multiplier: (..., d_model) -> (..., vocab_size)."""
        logits = self.lm_head(self.final_norm(hidden))
        multiplier = self.config.logit_multiplier
        return logits if multiplier == 1 else logits * multiplier

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (batch, n, d_model) of ``input_ids`` (batch, n), plus the
        sinusoidal encoding of ``positions`` (batch, n; None: 0..n-1) when the model uses it."""
        hidden = self.embedding(input_ids)
        if self.config.embedding_multiplier != 1:
            hidden = hidden * self.config.embedding_multiplier
        if not self.sinusoidal:
            return hidden
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if hidden.dtype == torch.float64:
            positions = positions.to(torch.float64)  # the encoding in float64 too
        encoding = sinusoidal_encoding(positions, self.config.d_model)
        return hidden * math.sqrt(self.config.d_model) + encoding.to(hidden.dtype)

    def decode_step(
        self, tokens: torch.Tensor, cache: HybridCache, position: int | torch.Tensor
    ) -> torch.Tensor:
        """One decoding step: ``tokens`` (batch, 1) at absolute index ``position`` (equal to
        ``cache.length``). Returns logits (batch, vocab_size).

        With ``position`` an int (the eager step that ``generate`` runs by default) blocks take
        their one-token paths and attention reads only the filled part of its cache. With a
        0-d int64 tensor no shape depends on the step (caches are updated in place and read
        whole with masks), so the step can be compiled (``torch.compile``) or captured as a
        CUDA graph. Either way it does not check the ids nor advance ``cache.length`` /
        ``cache.real_lengths``: :meth:`HybridCache.advance` does that after the call.
        """
        positions = cache.real_lengths[:, None]
        if isinstance(position, torch.Tensor):
            context = TokenContext(-1, positions, static_start=position, decoding=True)
        else:
            context = TokenContext(position, positions, decoding=True)
        hidden = self.embed(tokens, positions)
        for sublayer, entry in zip(self.sublayers, cache.entries, strict=True):
            hidden, _ = sublayer(hidden, entry, context)
        return self.logits(hidden[:, -1:])[:, -1]

    def compiled_decode_step(self, mode: str | None = None):
        """:meth:`decode_step` compiled with ``torch.compile`` (once per model and mode).

        On CPU this fuses the step's many small operations (about 2.3x faster than the eager
        step for a 10 M-parameter hybrid, after a compile of 19-27 s the first time on a
        machine and 4-5 s in later processes); ``mode="reduce-overhead"``
        asks for CUDA graphs on GPU. Shapes are static: a new batch size or cache capacity
        compiles again.
        """
        compiled = self.__dict__.setdefault("_compiled_decode_steps", {})
        if mode not in compiled:
            announce_compile()
            compiled[mode] = torch.compile(self.decode_step, dynamic=False, mode=mode)
        return compiled[mode]

    def num_parameters(self, *, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count; ``active`` counts only top-k experts of MoE blocks.

        ``embeddings=False`` leaves out the input embedding (and the LM head when untied).
        """
        total = sum(p.numel() for p in self.parameters())
        if active:
            total -= sum(
                sum(p.numel() for p in block.parameters()) - block.active_parameters()
                for block in self.blocks
            )
        if not embeddings:
            total -= self.embedding.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

"""Mamba-2 (SSD) block: in-projection, causal conv, state-space duality scan, gated RMSNorm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from layers.base import Block, TokenContext
from layers.norm import GatedRMSNorm, SiluGate
from layers.ops import effective_dt, ssd_scan, ssd_update
from layers.options import require, require_positive_int
from layers.registry import register_block
from layers.ssm_cache import SSMCache, causal_conv_silu, depthwise_conv, state_matrix
from layers.ssm_init import init_dt_bias, mark_no_weight_decay


@dataclass
class Mamba2Options:
    """Options of the ``mamba2`` block (defaults are mamba_ssm's).

    Attributes:
        d_state: state size N per head.
        headdim: channels per head P.
        expand: inner width = expand * d_model (unless ``n_heads`` is given).
        n_heads: heads; when set, inner width = n_heads * headdim (Nemotron-H's convention).
        ngroups: groups sharing B and C (nheads must be a multiple).
        d_conv: causal conv width.
        chunk_size: SSD chunk length.
        conv_bias / bias: biases of the conv and of the in/out projections.
        dt_min / dt_max / dt_init_floor: time-step initialisation range.
        dt_limit: clamp on the time step after softplus.
        a_init_range: A initialised uniformly in this range (A = -exp(A_log)).
        norm_eps: epsilon of the gated RMSNorm.
        rmsnorm: close the block with the gated RMSNorm; False: ``y * silu(z)`` alone (as
            mamba_ssm's ``rmsnorm`` option; Falcon-H1's ``mamba_rms_norm``).
        norm_before_gate: ``rmsnorm(y) * silu(z)`` instead of ``rmsnorm(y * silu(z))``.
    """

    d_state: int = 128
    headdim: int = 64
    expand: int = 2
    n_heads: int | None = None
    ngroups: int = 1
    d_conv: int = 4
    chunk_size: int = 256
    conv_bias: bool = True
    bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    a_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-5
    rmsnorm: bool = True
    norm_before_gate: bool = False

    def d_inner(self, d_model: int) -> int:
        return self.n_heads * self.headdim if self.n_heads else self.expand * d_model

    def resolve(self, d_model: int, where: str) -> Mamba2Options:
        for name in ("d_state", "headdim", "expand", "ngroups", "d_conv", "chunk_size"):
            require_positive_int(getattr(self, name), f"{where}.{name}")
        if self.n_heads is not None:
            require_positive_int(self.n_heads, f"{where}.n_heads")
        d_inner = self.d_inner(d_model)
        require(
            d_inner % self.headdim == 0,
            f"{where}.headdim",
            f"must divide the inner width expand*d_model={d_inner}; got {self.headdim}",
        )
        nheads = d_inner // self.headdim
        for name in ("rmsnorm", "norm_before_gate", "conv_bias", "bias"):
            value = getattr(self, name)
            require(
                isinstance(value, bool), f"{where}.{name}", f"must be true or false; got {value!r}"
            )
        require(
            nheads % self.ngroups == 0,
            f"{where}.ngroups",
            f"must divide the number of heads {nheads}; got {self.ngroups}",
        )
        require(
            0 < self.dt_min <= self.dt_max,
            f"{where}.dt_min",
            f"need 0 < dt_min <= dt_max; got {self.dt_min}, {self.dt_max}",
        )
        return Mamba2Options(**{**self.__dict__, "dt_limit": tuple(self.dt_limit),
                                "a_init_range": tuple(self.a_init_range)})  # fmt: skip


@register_block("mamba2", symbol="M", options=Mamba2Options)
class Mamba2(Block):
    """Mamba-2 sublayer. Shapes: (batch, seqlen, d_model) -> same.

    The scan runs mamba_ssm's ``mamba_chunk_scan_combined`` and the conv ``causal_conv1d_fn``
    on CUDA when they import, and our chunked SSD in plain PyTorch otherwise.
    """

    separates_documents = True
    # Without a cache off CUDA, sequences longer than this run in segments of this many
    # tokens, the scan's state and the conv's last inputs carried from one to the next
    # (exactly the same result, to rounding): each segment's activations stay in the CPU's
    # cache, where whole 16K-token tensors would stream from memory in every elementwise op
    # (scripts/bench_train.py measures it). None: never.
    segment_length: int | None = 2048

    def __init__(self, d_model: int, options: Mamba2Options, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        self.d_inner = options.d_inner(d_model)
        self.nheads = self.d_inner // options.headdim
        self.conv_dim = self.d_inner + 2 * options.ngroups * options.d_state
        d_in_proj = self.d_inner + self.conv_dim + self.nheads  # [z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=options.bias)
        self.conv1d = depthwise_conv(self.conv_dim, options.d_conv, options.conv_bias)
        self.dt_bias = nn.Parameter(
            init_dt_bias(self.nheads, options.dt_min, options.dt_max, options.dt_init_floor)
        )
        a_low, a_high = options.a_init_range
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(a_low, a_high).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        mark_no_weight_decay(self.dt_bias, self.A_log, self.D)
        self.norm = (
            GatedRMSNorm(self.d_inner, options.ngroups, options.norm_eps, options.norm_before_gate)
            if options.rmsnorm
            else SiluGate()
        )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=options.bias)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: SSMCache | None = None,
        context: TokenContext | None = None,
    ) -> torch.Tensor:
        opts = self.options
        length = hidden.shape[1]
        valid = None if context is None or context.valid is None else context.valid[..., None]
        seq_idx = None if context is None else context.seq_idx
        segment = self.segment_length
        if cache is None and valid is None and segment and length > segment and not hidden.is_cuda:
            return self._forward_in_segments(hidden, seq_idx, segment)
        z, xbc, dt = self.in_proj(hidden).split_with_sizes(
            [self.d_inner, self.conv_dim, self.nheads], -1
        )
        step = cache is not None and length == 1 and valid is None
        xbc = causal_conv_silu(xbc, self.conv1d, cache, valid, step, seq_idx)  # (b, l, conv)
        A = state_matrix(self)
        group_width = opts.ngroups * opts.d_state
        if step:
            # One decoding step: the recurrence directly, on the cache's state in place.
            batch = hidden.shape[0]
            x, B, C = xbc[:, 0].split_with_sizes([self.d_inner, group_width, group_width], -1)
            state = cache.working_state()
            y = ssd_update(
                state,
                x.view(batch, self.nheads, opts.headdim),
                dt[:, 0],
                A,
                B.view(batch, opts.ngroups, opts.d_state),
                C.view(batch, opts.ngroups, opts.d_state),
                D=self.D,
                dt_bias=self.dt_bias,
                dt_softplus=True,
                dt_limit=opts.dt_limit,
            ).view(batch, 1, self.d_inner)
            cache.store_state(state)
        else:
            dt_args = {"dt_bias": self.dt_bias, "dt_softplus": True, "dt_limit": opts.dt_limit}
            if valid is not None:
                dt = effective_dt(dt, **dt_args) * valid  # dt = 0: padding leaves the state
                dt_args = {}
            x, B, C = xbc.split([self.d_inner, group_width, group_width], -1)
            y = ssd_scan(
                rearrange(x, "b l (h p) -> b l h p", p=opts.headdim),
                dt,
                A,
                rearrange(B, "b l (g n) -> b l g n", g=opts.ngroups),
                rearrange(C, "b l (g n) -> b l g n", g=opts.ngroups),
                chunk_size=opts.chunk_size,
                D=self.D,
                initial_state=None if cache is None else cache.ssm_state,
                return_final_state=cache is not None,
                seq_idx=seq_idx,
                **dt_args,
            )
            if cache is not None:
                y, final_state = y
                cache.ssm_state.copy_(final_state)  # the buffer stays contiguous, in place
            y = rearrange(y, "b l h p -> b l (h p)")
        return self.out_proj(self.norm(y, z))

    def _forward_in_segments(
        self, hidden: torch.Tensor, seq_idx: torch.Tensor | None, segment: int
    ) -> torch.Tensor:
        """:meth:`forward` without a cache, ``segment`` tokens at a time: each segment's conv
        sees the previous ``d_conv - 1`` inputs (and their documents), its scan starts from the
        previous segment's final state, zeroed in rows where a document starts with the
        segment. Shapes: hidden (b, l, d_model), seq_idx (b, l) or None -> (b, l, d_model)."""
        opts = self.options
        group_width = opts.ngroups * opts.d_state
        overlap = opts.d_conv - 1
        A = state_matrix(self)
        outputs, state, tail = [], None, None
        for start in range(0, hidden.shape[1], segment):
            end = min(start + segment, hidden.shape[1])
            z, xbc, dt = self.in_proj(hidden[:, start:end]).split_with_sizes(
                [self.d_inner, self.conv_dim, self.nheads], -1
            )
            window = xbc if tail is None else torch.cat([tail, xbc], 1)
            lead = window.shape[1] - xbc.shape[1]
            docs = None if seq_idx is None else seq_idx[:, start - lead : end]
            tail = window[:, -overlap:] if overlap else None
            xbc = causal_conv_silu(window, self.conv1d, None, None, False, docs)[:, lead:]
            if state is not None and seq_idx is not None:
                same = seq_idx[:, start] == seq_idx[:, start - 1]  # (b,)
                state = state * same.to(state.dtype).view(-1, 1, 1, 1)
            x, B, C = xbc.split([self.d_inner, group_width, group_width], -1)
            y, state = ssd_scan(
                rearrange(x, "b l (h p) -> b l h p", p=opts.headdim),
                dt,
                A,
                rearrange(B, "b l (g n) -> b l g n", g=opts.ngroups),
                rearrange(C, "b l (g n) -> b l g n", g=opts.ngroups),
                chunk_size=opts.chunk_size,
                D=self.D,
                initial_state=state,
                return_final_state=True,
                seq_idx=None if seq_idx is None else seq_idx[:, start:end],
                dt_bias=self.dt_bias,
                dt_softplus=True,
                dt_limit=opts.dt_limit,
            )
            y = rearrange(y, "b l h p -> b l (h p)")
            outputs.append(self.out_proj(self.norm(y, z)))
        return torch.cat(outputs, 1)

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device: torch.device
    ) -> SSMCache:
        opts = self.options
        state_shape = (self.nheads, opts.headdim, opts.d_state)
        return SSMCache.zeros(batch_size, self.conv_dim, opts.d_conv, state_shape, dtype, device)

    @classmethod
    def inference_state_bytes(
        cls, d_model: int, options: Mamba2Options, context: int, dtype: torch.dtype
    ) -> int:
        d_inner = options.d_inner(d_model)
        conv_dim = d_inner + 2 * options.ngroups * options.d_state
        return SSMCache.sequence_bytes(conv_dim, options.d_conv, d_inner * options.d_state, dtype)

    def residual_weights(self) -> list[nn.Parameter]:
        return [self.out_proj.weight]

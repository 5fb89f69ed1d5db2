"""Mamba-1 block: selective scan with per-channel diagonal A, optional inner norms on dt, B
and C (Jamba's with weights, FalconMamba's without)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from layers.base import Block, TokenContext
from layers.norm import RMSNorm, upcast
from layers.ops import effective_dt, selective_scan, selective_scan_update
from layers.options import require, require_positive_int
from layers.registry import register_block
from layers.ssm_cache import SSMCache, causal_conv_silu, depthwise_conv, state_matrix
from layers.ssm_init import init_dt_bias, mark_no_weight_decay


@dataclass
class Mamba1Options:
    """Options of the ``mamba1`` block (defaults are mamba_ssm's).

    Attributes:
        d_state: state size per channel.
        expand: inner width = expand * d_model.
        dt_rank: rank of the time-step projection; None gives ceil(d_model / 16).
        d_conv: causal conv width.
        conv_bias / bias: biases of the conv and of the in/out projections.
        inner_norms: RMSNorm on dt, B and C before the scan (Jamba).
        inner_norm_weights: the inner norms have learned weights (Jamba); False: they only
            normalise (FalconMamba's weight-free RMSNorms, no tensors).
        dt_min / dt_max / dt_init_floor / dt_scale: time-step initialisation.
        norm_eps: epsilon of the inner norms.
    """

    d_state: int = 16
    expand: int = 2
    dt_rank: int | None = None
    d_conv: int = 4
    conv_bias: bool = True
    bias: bool = False
    inner_norms: bool = False
    inner_norm_weights: bool = True
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    norm_eps: float = 1e-6

    def resolve(self, d_model: int, where: str) -> Mamba1Options:
        for name in ("d_state", "expand", "d_conv"):
            require_positive_int(getattr(self, name), f"{where}.{name}")
        dt_rank = self.dt_rank if self.dt_rank is not None else math.ceil(d_model / 16)
        require_positive_int(dt_rank, f"{where}.dt_rank")
        require(
            0 < self.dt_min <= self.dt_max,
            f"{where}.dt_min",
            f"need 0 < dt_min <= dt_max; got {self.dt_min}, {self.dt_max}",
        )
        return Mamba1Options(**{**self.__dict__, "dt_rank": dt_rank})


@register_block("mamba1", symbol="S", options=Mamba1Options)
class Mamba1(Block):
    """Mamba-1 (S6) sublayer. Shapes: (batch, seqlen, d_model) -> same.

    The scan runs mamba_ssm's ``selective_scan_fn`` on CUDA when it imports, and our chunked
    plain-PyTorch scan otherwise.
    """

    separates_documents = True

    def __init__(self, d_model: int, options: Mamba1Options, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        self.d_inner = options.expand * d_model
        d_state, dt_rank = options.d_state, options.dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=options.bias)
        self.conv1d = depthwise_conv(self.d_inner, options.d_conv, options.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, self.d_inner, bias=True)
        dt_std = dt_rank**-0.5 * options.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        with torch.no_grad():
            self.dt_proj.bias.copy_(
                init_dt_bias(self.d_inner, options.dt_min, options.dt_max, options.dt_init_floor)
            )
        self.dt_proj.weight._no_reinit = True  # keep the scaled init above
        A = repeat(torch.arange(1, d_state + 1, dtype=torch.float32), "n -> d n", d=self.d_inner)
        self.A_log = nn.Parameter(A.log())
        self.D = nn.Parameter(torch.ones(self.d_inner))
        mark_no_weight_decay(self.A_log, self.D, self.dt_proj.bias)
        if options.inner_norms and options.inner_norm_weights:
            self.dt_norm = RMSNorm(dt_rank, options.norm_eps)
            self.b_norm = RMSNorm(d_state, options.norm_eps)
            self.c_norm = RMSNorm(d_state, options.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=options.bias)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: SSMCache | None = None,
        context: TokenContext | None = None,
    ) -> torch.Tensor:
        valid = None if context is None or context.valid is None else context.valid[..., None]
        seq_idx = None if context is None else context.seq_idx
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        step = cache is not None and hidden.shape[1] == 1 and valid is None
        x = causal_conv_silu(x, self.conv1d, cache, valid, step, seq_idx)  # (b, l, d_inner)
        dt, B, C = self.inner_norms(self.x_proj(x))
        dt = F.linear(dt, self.dt_proj.weight)  # (b, l, d_inner); bias goes in the scan
        dt_args = {"delta_bias": self.dt_proj.bias, "delta_softplus": True}
        if valid is not None:
            dt = effective_dt(dt, self.dt_proj.bias, True) * valid  # padding leaves the state
            dt_args = {}
        A = state_matrix(self)
        if step:
            state = cache.working_state()
            y = selective_scan_update(
                state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=self.D, z=z[:, 0], **dt_args,
            )  # fmt: skip
            cache.store_state(state)
            return self.out_proj(y[:, None, :])
        y = selective_scan(
            x.transpose(1, 2),
            dt.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D,
            z=z.transpose(1, 2),
            initial_state=None if cache is None else cache.ssm_state,
            return_final_state=cache is not None,
            seq_idx=seq_idx,
            **dt_args,
        )
        if cache is not None:
            y, final_state = y
            cache.ssm_state.copy_(final_state)  # the buffer stays contiguous, in place
        return self.out_proj(y.transpose(1, 2))

    def inner_norms(self, dt_b_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split ``x_proj``'s output (..., dt_rank + 2 * d_state) into dt, B, C and, with
        ``inner_norms``, RMS-normalise each (scaled by learned weights, as Jamba, unless
        ``inner_norm_weights`` is off, as FalconMamba). When dt_rank == d_state the three norms
        run as one call over a (..., 3, d_state) view (the same arithmetic; a decode step
        saves a dozen small operations per sublayer)."""
        opts = self.options
        sizes = [opts.dt_rank, opts.d_state, opts.d_state]
        if not opts.inner_norms:
            return tuple(dt_b_c.split_with_sizes(sizes, -1))
        if not opts.inner_norm_weights:
            parts = upcast(dt_b_c).split_with_sizes(sizes, -1)
            normed = [F.rms_norm(part, part.shape[-1:], eps=opts.norm_eps) for part in parts]
            return tuple(part.to(dt_b_c.dtype) for part in normed)
        norms = (self.dt_norm, self.b_norm, self.c_norm)
        if opts.dt_rank != opts.d_state or len({norm.eps for norm in norms}) > 1:
            parts = dt_b_c.split_with_sizes(sizes, -1)
            return tuple(norm(part) for norm, part in zip(norms, parts, strict=True))
        x = upcast(dt_b_c).unflatten(-1, (3, opts.d_state))
        weight = torch.stack([upcast(norm.weight) for norm in norms])  # (3, d_state)
        normed = (F.rms_norm(x, (opts.d_state,), eps=self.dt_norm.eps) * weight).to(dt_b_c.dtype)
        return tuple(normed.unbind(-2))

    def allocate_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device: torch.device
    ) -> SSMCache:
        opts = self.options
        state_shape = (self.d_inner, opts.d_state)
        return SSMCache.zeros(batch_size, self.d_inner, opts.d_conv, state_shape, dtype, device)

    @classmethod
    def inference_state_bytes(
        cls, d_model: int, options: Mamba1Options, context: int, dtype: torch.dtype
    ) -> int:
        d_inner = options.expand * d_model
        return SSMCache.sequence_bytes(d_inner, options.d_conv, d_inner * options.d_state, dtype)

    def residual_weights(self) -> list[nn.Parameter]:
        return [self.out_proj.weight]

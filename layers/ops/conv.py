"""Depthwise causal 1-d convolution (the short conv in front of Mamba's SSM).

Layout follows causal-conv1d: channels first, ``x`` is (batch, dim, seqlen) and ``weight`` is
(dim, width). The conv state carried between calls is the last ``width - 1`` *inputs*, so a
sequence can be processed in pieces (prefill then per-token decoding) with identical results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import causal_conv1d_ops, needs_autograd, use_kernels

__all__ = ["causal_conv1d", "causal_conv1d_step"]

# causal-conv1d only compiles kernels for these filter widths.
_KERNEL_WIDTHS = (2, 3, 4)
# ... and these input and weight dtypes.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_activation(activation: str | None) -> bool:
    """Return True if SiLU should be applied; "swish" is accepted as an alias."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return activation is not None


def _tail(x: torch.Tensor, n: int) -> torch.Tensor:
    """Last ``n`` steps of (batch, dim, seqlen), left-padded with zeros when seqlen < n.

    Always a fresh contiguous tensor: a view would keep the whole sequence alive in a cache.
    """
    if x.shape[-1] < n:
        return F.pad(x, (n - x.shape[-1], 0))
    return x[..., x.shape[-1] - n :].contiguous()


def _conv_taps(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> torch.Tensor:
    """Depthwise causal conv as ``width`` shifted multiply-adds, keeping x's memory layout.

    x: (batch, dim, seqlen); weight: (dim, width); initial_state: (batch, dim, width - 1) or
    None (zeros). For channel-last memory (the transposed (batch, seqlen, dim) activations of
    the Mamba blocks) this is ~4x faster than F.conv1d, which first copies to channel-first.
    Each tap adds into a shifted slice of the output, so the input is never padded or copied;
    the initial state only reaches the first ``width - 1`` outputs.
    """
    width = weight.shape[1]
    seqlen = x.shape[-1]
    # (width, dim, 1): contiguous per tap so the innermost loop over channels is unit-stride.
    taps = weight.t().contiguous().unsqueeze(-1)
    y = x * taps[-1] if bias is None else torch.addcmul(bias.unsqueeze(-1), x, taps[-1])
    for k in range(width - 1):
        shift = width - 1 - k  # tap k reads the input ``shift`` steps back
        if shift < seqlen:
            y[..., shift:].addcmul_(x[..., : seqlen - shift], taps[k])
        if initial_state is not None:
            head = min(shift, seqlen)
            y[..., :head].addcmul_(initial_state[..., k : k + head], taps[k])
    return y


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv: ``y[:, d, t] = bias[d] + sum_k weight[d, k] * xx[:, d, t + k]``.

    ``xx`` is ``initial_state | x`` (zeros in place of ``initial_state`` when it is None).

    Args:
        x: (batch, dim, seqlen).
        weight: (dim, width).
        bias: (dim,) or None.
        activation: None or "silu".
        initial_state: (batch, dim, width - 1), the inputs preceding ``x``; zeros if None.
        return_final_state: also return the last ``width - 1`` inputs of ``initial_state | x``.

    Returns:
        y: (batch, dim, seqlen) in x's dtype, and if requested final_state:
        (batch, dim, width - 1) in x's dtype. On the PyTorch path y keeps x's memory layout:
        channel-last x (a transposed (batch, seqlen, dim) tensor) gives channel-last y.
    """
    silu = _check_activation(activation)
    dim, width = weight.shape
    if x.shape[1] != dim:
        raise ValueError(f"x has {x.shape[1]} channels but weight has {dim}")

    ops = causal_conv1d_ops() if initial_state is None and width in _KERNEL_WIDTHS else None
    if ops is not None and use_kernels(x, weight):
        # The kernel needs channel-last strides for initial/final states; we only call it
        # without states and slice the final state ourselves, which is exact and cheap.
        y = ops.causal_conv1d_fn(x, weight, bias, activation="silu" if silu else None)
        if return_final_state:
            return y, _tail(x, width - 1)
        return y

    dtype_in = x.dtype
    # Match causal-conv1d's reference: compute in the weight's dtype, return x's dtype.
    xw = x.to(weight.dtype)
    if xw.stride(1) == 1 and xw.shape[-1] > 1:
        # Channel-last memory: the output stays in it.
        init = None if initial_state is None else initial_state.to(xw.dtype)
        y = _conv_taps(xw, weight, bias, init)
    else:
        if initial_state is None:
            initial_state = xw.new_zeros(x.shape[0], dim, width - 1)
        xx = torch.cat([initial_state.to(xw.dtype), xw], dim=-1)
        y = F.conv1d(xx, weight.unsqueeze(1), bias, groups=dim)
    if silu:
        y = F.silu(y, inplace=not y.requires_grad)
    y = y.to(dtype_in)
    if return_final_state:
        return y, _final_inputs(xw, initial_state, width - 1).to(dtype_in)
    return y


def _final_inputs(x: torch.Tensor, initial_state: torch.Tensor | None, n: int) -> torch.Tensor:
    """The last ``n`` inputs of ``initial_state | x`` (zeros for a missing initial state)."""
    if x.shape[-1] >= n or initial_state is None:
        return _tail(x, n)
    return _tail(torch.cat([initial_state.to(x.dtype), x], dim=-1), n)


def causal_conv1d_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of :func:`causal_conv1d`.

    On CUDA, without autograd, for widths 2-4, with x and conv_state of one dtype (float32,
    float16 or bfloat16) and bias of the weight's dtype, this calls causal-conv1d's
    ``causal_conv1d_update`` on a copy of ``conv_state``.

    Args:
        x: (batch, dim), the new input.
        conv_state: (batch, dim, width - 1), the previous ``width - 1`` inputs (not modified).
        weight: (dim, width).
        bias: (dim,) or None.
        activation: None or "silu".

    Returns:
        y: (batch, dim) in x's dtype, new_state: (batch, dim, width - 1) in conv_state's dtype,
        a new tensor.
    """
    silu = _check_activation(activation)
    if (
        weight.shape[1] in _KERNEL_WIDTHS
        and x.dtype == conv_state.dtype
        and x.dtype in _KERNEL_DTYPES
        and weight.dtype in _KERNEL_DTYPES
        and (bias is None or bias.dtype == weight.dtype)
        and use_kernels(x, conv_state, weight, bias)
        and not needs_autograd(x, conv_state, weight, bias)
    ):
        ops = causal_conv1d_ops()
        if ops is not None:
            # causal-conv1d >= 1.4 accepts any state length >= width - 1 (older versions
            # wanted exactly width columns) and shifts the state in place.
            new_state = conv_state.clone()
            y = ops.causal_conv1d_update(
                x,
                new_state,
                weight,
                None if bias is None else bias.contiguous(),
                "silu" if silu else None,
            )
            return y, new_state
    # Functional (no in-place state update), so the step is autograd-friendly.
    window = torch.cat([conv_state.to(weight.dtype), x.to(weight.dtype).unsqueeze(-1)], dim=-1)
    y = torch.einsum("bdw,dw->bd", window, weight)
    if bias is not None:
        y = y + bias
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), window[..., 1:].to(conv_state.dtype)

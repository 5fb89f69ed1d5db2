"""Where the causal conv runs: causal-conv1d's kernels on CUDA when they import, else PyTorch."""

from __future__ import annotations

import torch

from ..kernels import causal_conv1d_ops, needs_autograd, use_kernels
from .sequence import _check_activation, _tail, causal_conv1d_torch
from .step import causal_conv1d_step_torch, causal_conv1d_update_torch

__all__ = ["causal_conv1d", "causal_conv1d_step", "causal_conv1d_update"]

# causal-conv1d only compiles kernels for these filter widths.
_KERNEL_WIDTHS = (2, 3, 4)
# ... and these input and weight dtypes.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
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
        seq_idx: (batch, seqlen) integer document of each token (packed rows), or None: a tap
            that would read an earlier document reads zero instead (the initial state belongs
            to the first document). The final state is still the raw last inputs. The kernel
            takes it as int32 and needs channel-last x (the Mamba blocks' layout).

    Returns:
        y: (batch, dim, seqlen) in x's dtype, and if requested final_state:
        (batch, dim, width - 1) in x's dtype. On the PyTorch path y keeps x's memory layout
        (see :func:`causal_conv1d_torch`).
    """
    silu = _check_activation(activation)
    dim, width = weight.shape
    if x.shape[1] != dim:
        raise ValueError(f"x has {x.shape[1]} channels but weight has {dim}")

    ops = causal_conv1d_ops() if initial_state is None and width in _KERNEL_WIDTHS else None
    if seq_idx is not None and x.stride(1) != 1:
        ops = None  # causal-conv1d takes seq_idx only for channel-last x
    if ops is not None and use_kernels(x, weight):
        # The kernel needs channel-last strides for initial/final states; we only call it
        # without states and slice the final state ourselves, which is exact and cheap.
        extra = {} if seq_idx is None else {"seq_idx": seq_idx.to(torch.int32).contiguous()}
        y = ops.causal_conv1d_fn(x, weight, bias, activation="silu" if silu else None, **extra)
        if return_final_state:
            return y, _tail(x, width - 1)
        return y

    return causal_conv1d_torch(
        x,
        weight,
        bias,
        activation=activation,
        initial_state=initial_state,
        return_final_state=return_final_state,
        seq_idx=seq_idx,
    )


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
    return causal_conv1d_step_torch(x, conv_state, weight, bias, activation=activation)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> torch.Tensor:
    """:func:`causal_conv1d_step` shifting ``conv_state`` in place (a cache's fixed buffer).

    What decoding calls: causal-conv1d's ``causal_conv1d_update`` on ``conv_state`` itself
    under :func:`causal_conv1d_step`'s conditions, else :func:`causal_conv1d_update_torch`
    (or, with autograd on, :func:`causal_conv1d_step` and a copy into ``conv_state``).
    Shapes as in :func:`causal_conv1d_step`; returns y (batch, dim) in x's dtype.
    """
    silu = _check_activation(activation)
    if needs_autograd(x, conv_state, weight, bias):
        y, new_state = causal_conv1d_step(x, conv_state, weight, bias, activation=activation)
        conv_state.copy_(new_state)
        return y
    if (
        weight.shape[1] in _KERNEL_WIDTHS
        and x.dtype == conv_state.dtype
        and x.dtype in _KERNEL_DTYPES
        and weight.dtype in _KERNEL_DTYPES
        and (bias is None or bias.dtype == weight.dtype)
        and use_kernels(x, conv_state, weight, bias)
    ):
        ops = causal_conv1d_ops()
        if ops is not None:
            return ops.causal_conv1d_update(
                x, conv_state, weight, None if bias is None else bias.contiguous(),
                "silu" if silu else None,
            )  # fmt: skip
    return causal_conv1d_update_torch(x, conv_state, weight, bias, activation=activation)

"""What Mamba-1 and Mamba-2 carry between calls, and the causal conv that reads and writes it.

Both blocks pass their scan input through a depthwise causal conv and a SiLU. Their cache entry
is the conv window (the last ``d_conv - 1`` inputs) and the scan's recurrent state; a sequence
fed in pieces (prefill chunks, then one token at a time) gives the outputs of one full call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layers.base import CacheEntry, dtype_bytes
from layers.norm import upcast
from layers.ops import causal_conv1d, causal_conv1d_update


@dataclass
class SSMCache(CacheEntry):
    """Inference state of one Mamba sublayer: the conv window and the recurrent state.

    Attributes:
        conv_state: (batch, conv_dim, d_conv - 1), the last inputs of the causal conv, in the
            model's dtype.
        ssm_state: float32 (or wider; bfloat16 when the cache is allocated with
            ``state_dtype=torch.bfloat16``, still updated in float32); Mamba-2
            (batch, nheads, headdim, d_state), Mamba-1 (batch, d_inner, d_state).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    @classmethod
    def zeros(
        cls,
        batch_size: int,
        conv_dim: int,
        d_conv: int,
        state_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> SSMCache:
        """An empty entry: conv window in ``dtype``, state (batch_size, *state_shape) in float32.

        The state is float64 for float64 models: it accumulates over the whole sequence.
        """
        return cls(
            conv_state=torch.zeros(batch_size, conv_dim, d_conv - 1, dtype=dtype, device=device),
            ssm_state=torch.zeros(
                batch_size,
                *state_shape,
                dtype=torch.promote_types(dtype, torch.float32),
                device=device,
            ),
        )

    def working_state(self) -> torch.Tensor:
        """The state a decode step updates in place: ``ssm_state`` itself when it is float32
        or wider, else (a bfloat16 / float16 state) a float32 copy that
        :meth:`store_state` rounds back into it."""
        state = self.ssm_state
        return state if state.dtype in (torch.float32, torch.float64) else state.float()

    def store_state(self, state: torch.Tensor) -> None:
        """Write back what :meth:`working_state` returned (nothing to do when it is the
        buffer itself)."""
        if state is not self.ssm_state:
            self.ssm_state.copy_(state)

    @staticmethod
    def sequence_bytes(conv_dim: int, d_conv: int, state_size: int, dtype: torch.dtype) -> int:
        """Bytes of one sequence's entry: the conv window in ``dtype``, ``state_size`` float32s."""
        return conv_dim * (d_conv - 1) * dtype_bytes(dtype) + state_size * 4


@dataclass
class ConvCache(CacheEntry):
    """Inference state of a sublayer whose only memory is its short conv (LFM2's short conv).

    Attributes:
        conv_state: (batch, channels, d_conv - 1), the conv's last inputs, in the model's dtype.
    """

    conv_state: torch.Tensor

    @classmethod
    def zeros(
        cls, batch_size: int, channels: int, d_conv: int, dtype: torch.dtype, device: torch.device
    ) -> ConvCache:
        return cls(torch.zeros(batch_size, channels, d_conv - 1, dtype=dtype, device=device))


def depthwise_conv(channels: int, d_conv: int, bias: bool) -> nn.Conv1d:
    """The block's short conv, laid out as mamba_ssm's (and transformers') ``conv1d``.

    Only its weight (channels, 1, d_conv) and bias are used (by :func:`causal_conv_silu`); the
    padding is there for checkpoint and module compatibility.
    """
    return nn.Conv1d(channels, channels, d_conv, groups=channels, padding=d_conv - 1, bias=bias)


def causal_conv_silu(
    x: torch.Tensor,
    conv: nn.Conv1d,
    cache: SSMCache | ConvCache | None,
    valid: torch.Tensor | None,
    step: bool,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """``silu(causal depthwise conv(x))``, continuing ``cache``'s conv window and updating it.

    Args:
        x: (batch, seqlen, channels).
        conv: from :func:`depthwise_conv`.
        cache: the block's entry, or None (training, a forward without cache).
        valid: (batch, seqlen, 1) bool, False at left padding, or None (all real).
        step: one token per row, with a cache and no padding: the window is updated in place
            (fixed addresses, as CUDA graphs need); otherwise it is replaced.
        seq_idx: (batch, seqlen) document of each token (packed rows, no cache), or None.
        activation: "silu", or None for the conv alone (LFM2's short conv).

    Returns:
        (batch, seqlen, channels), zero at padding positions.
    """
    if valid is not None:
        x = x * valid  # padding never enters the conv window
    weight = conv.weight[:, 0]  # (d, w)
    if step:
        out = causal_conv1d_update(
            x[:, 0], cache.conv_state, weight, conv.bias, activation=activation
        )
        return out[:, None, :]
    out = causal_conv1d(
        x.transpose(1, 2),
        weight,
        conv.bias,
        activation=activation,
        initial_state=None if cache is None else cache.conv_state,
        return_final_state=cache is not None,
        seq_idx=seq_idx,
    )
    if cache is not None:
        out, conv_state = out
        cache.conv_state.copy_(conv_state)  # in place: decoding updates this buffer
    out = out.transpose(1, 2)
    if valid is not None:
        out = out * valid  # the conv bias must not turn padding into input
    return out


def state_matrix(block: nn.Module) -> torch.Tensor:
    """``A = -exp(A_log)`` of an SSM block in float32 (or wider), the shape of ``A_log``.

    Without autograd (decoding) it is kept on the block while ``A_log`` is unchanged (same
    storage, same in-place version), so a decode step does not recompute it per token.
    """
    A_log = block.A_log
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return -torch.exp(upcast(A_log))
    key = (A_log.data_ptr(), A_log._version, A_log.dtype, A_log.device)
    cached = block.__dict__.get("_state_matrix")
    if cached is None or cached[0] != key:
        cached = (key, -torch.exp(upcast(A_log)))
        block.__dict__["_state_matrix"] = cached
    return cached[1]

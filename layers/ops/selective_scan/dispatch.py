"""Where the selective scan runs: mamba_ssm's kernels on CUDA when they import, else PyTorch."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .._common import compute_dtype
from ..kernels import mamba_ssm_ops, needs_autograd, use_kernels
from .chunk import selective_scan_torch
from .step import selective_scan_step_torch, selective_scan_update_torch

__all__ = ["selective_scan", "selective_scan_step", "selective_scan_update"]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan with the semantics of mamba_ssm's ``selective_scan_fn``.

    Args:
        u: (batch, dim, seqlen).
        delta: (batch, dim, seqlen), raw; effective delta = softplus(delta + delta_bias) if
            delta_softplus else delta + delta_bias.
        A: (dim, d_state), negative.
        B, C: (batch, d_state, seqlen), or (batch, ngroups, d_state, seqlen) where channel d
            uses group d // (dim // ngroups).
        D: (dim,) skip connection, or None.
        z: (batch, dim, seqlen) gate, y * silu(z), or None.
        delta_bias: (dim,) or None.
        initial_state: (batch, dim, d_state) or None (zeros). The CUDA kernel has no initial
            state, so passing one always takes the PyTorch path.
        return_final_state: also return the state after the last step.
        seq_idx: (batch, seqlen) integer document of each token (packed rows), or None: the
            state restarts from zero wherever the value changes (``initial_state`` belongs to
            the first document). mamba_ssm's Mamba-1 kernel has no such argument, so this
            takes the PyTorch path.

    Returns:
        y: (batch, dim, seqlen) in u's dtype (possibly a transposed view, see
        :func:`selective_scan_torch`), and if requested final_state: (batch, dim, d_state) in
        float32 (float64 for float64 inputs).
    """
    ops = None
    if initial_state is None and seq_idx is None and use_kernels(u, delta, A, B, C):
        ops = mamba_ssm_ops()
    if ops is not None:
        # The kernel expects fp32 parameters (as mamba_ssm's own Mamba block passes them).
        return ops.selective_scan_fn(
            u,
            delta,
            A.float(),
            B,
            C,
            D=None if D is None else D.float(),
            z=z,
            delta_bias=None if delta_bias is None else delta_bias.float(),
            delta_softplus=delta_softplus,
            return_last_state=return_final_state,
        )
    return selective_scan_torch(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        return_final_state=return_final_state,
        seq_idx=seq_idx,
    )


def selective_scan_step(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of :func:`selective_scan` (functional: ``state`` is not modified).

    On CUDA, without autograd and with no float64 input, this calls mamba_ssm's
    ``selective_state_update`` on a copy of ``state``.

    Args:
        state: (batch, dim, d_state), float32 (or float64).
        u, delta: (batch, dim); z: (batch, dim) or None.
        A: (dim, d_state).
        B, C: (batch, d_state) or (batch, ngroups, d_state).
        D, delta_bias, delta_softplus: as in :func:`selective_scan`.

    Returns:
        y: (batch, dim) in u's dtype, new_state: like ``state`` (same dtype), a new tensor.
    """
    tensors = (state, u, delta, A, B, C, D, z, delta_bias)
    if (
        use_kernels(*tensors)
        and compute_dtype(*tensors) == torch.float32
        and not needs_autograd(*tensors)
    ):
        ops = mamba_ssm_ops()
        if ops is not None:
            return _selective_scan_step_kernel(
                ops, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus
            )
    return selective_scan_step_torch(
        state, u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus
    )


def _selective_scan_step_kernel(
    ops: SimpleNamespace,
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_scan_step` through ``selective_state_update``.

    Shared B/C use the kernel's single-head form: state (batch, dim, d_state), u/delta/z
    (batch, dim), A (dim, d_state), B/C (batch, d_state), D/delta_bias (dim,). Grouped B/C
    (batch, ngroups, d_state) use the multi-head form with one "head" per group: state
    (batch, ngroups, dim // ngroups, d_state), and so on; the state is a view of the copy.
    """
    # The kernel updates its state argument in place; contiguous so that it can be viewed.
    new_state = state.clone(memory_format=torch.contiguous_format)
    y = _selective_scan_update_kernel(
        ops, new_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus
    )
    return y, new_state


def _selective_scan_update_kernel(
    ops: SimpleNamespace,
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> torch.Tensor:
    """``selective_state_update`` on ``state`` itself (contiguous; updated in place), in the
    forms of :func:`_selective_scan_step_kernel`. Returns y (batch, dim)."""
    batch, dim = u.shape
    d_state = A.shape[-1]
    # Some mamba_ssm 2.x releases raise a TypeError for D=None or dt_bias=None (their stride
    # arguments unpack ``*... else 0``); zeros are exact no-ops.
    if D is None:
        D = u.new_zeros(dim)
    if delta_bias is None:
        delta_bias = delta.new_zeros(dim)
    A = A.float()
    if B.dim() == 2:
        return ops.selective_state_update(
            state, u, delta, A, B, C, D=D, z=z, dt_bias=delta_bias, dt_softplus=delta_softplus
        )
    ngroups = B.shape[1]
    heads = (batch, ngroups, dim // ngroups)
    y = ops.selective_state_update(
        state.view(*heads, d_state),
        u.reshape(heads),
        delta.reshape(heads),
        A.reshape(*heads[1:], d_state),
        B,
        C,
        D=D.reshape(heads[1:]),
        z=None if z is None else z.reshape(heads),
        dt_bias=delta_bias.reshape(heads[1:]),
        dt_softplus=delta_softplus,
    )
    return y.reshape(batch, dim)


def selective_scan_update(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """:func:`selective_scan_step` that updates ``state`` in place and returns y (batch, dim).

    What decoding calls: ``selective_state_update`` on ``state`` itself on CUDA (the
    conditions of :func:`selective_scan_step`), :func:`selective_scan_update_torch` on CPU;
    with autograd or autocast on, a state narrower than the inputs or not contiguous, the
    functional step and a copy into ``state``.
    """
    tensors = (state, u, delta, A, B, C, D, z, delta_bias)
    kw = {"D": D, "z": z, "delta_bias": delta_bias, "delta_softplus": delta_softplus}
    if needs_autograd(*tensors) or torch.is_autocast_enabled(u.device.type):
        y, new_state = selective_scan_step(state, u, delta, A, B, C, **kw)
        state.copy_(new_state)
        return y
    dtype = compute_dtype(*tensors)
    contiguous = state.is_contiguous()
    if dtype == torch.float32 and contiguous and use_kernels(*tensors):
        ops = mamba_ssm_ops()
        if ops is not None:
            return _selective_scan_update_kernel(ops, state, u, delta, A, B, C, **kw)
    if state.dtype != dtype or not contiguous:
        y, new_state = selective_scan_step_torch(state, u, delta, A, B, C, **kw)
        state.copy_(new_state)
        return y
    return selective_scan_update_torch(state, u, delta, A, B, C, **kw)

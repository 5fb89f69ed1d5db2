"""Mamba-1 selective scan through upstream's ``selective_scan_ref`` (the CUDA
``selective_scan_fn``'s specification) and the Triton ``selective_state_update`` (interpreted),
each against our CPU path and the float64 recurrence of references.py."""

from __future__ import annotations

import pytest
import torch

from layers.ops import selective_scan, selective_scan_step
from tests.kernel_mode import references

DIM, D_STATE = 12, 4


def make(seqlen: int, ngroups: int | None, *, batch: int = 2, seed: int = 0) -> dict:
    """ngroups None: B/C shared by every channel, (batch, d_state, seqlen)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    bc = (batch, D_STATE, seqlen) if ngroups is None else (batch, ngroups, D_STATE, seqlen)
    return {
        "u": r(batch, DIM, seqlen),
        "delta": r(batch, DIM, seqlen) * 0.5 - 1.0,
        "A": -(torch.rand(DIM, D_STATE, generator=g) * 2 + 0.1),
        "B": r(*bc),
        "C": r(*bc),
        "D": r(DIM),
        "z": r(batch, DIM, seqlen),
        "delta_bias": r(DIM) * 0.5,
        "initial_state": r(batch, DIM, D_STATE),
    }


def options(data: dict, case: dict) -> dict:
    kw = {"delta_softplus": case.get("delta_softplus", False)}
    kw |= {name: data[name] for name in ("D", "z", "delta_bias", "initial_state") if case.get(name)}
    return kw


def scan_with_grads(scan, data: dict, case: dict, dtype: torch.dtype):
    leaves = {k: v.to(dtype, copy=True).requires_grad_() for k, v in data.items()}
    y, state = scan(*(leaves[k] for k in ("u", "delta", "A", "B", "C")), **options(leaves, case))
    g = torch.Generator().manual_seed(1)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum()
    loss = (
        loss + (state.double() * torch.randn(state.shape, generator=g, dtype=torch.float64)).sum()
    )
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    return (y.detach().double(), state.detach().double()), grads


def ours(*args, **kw):
    return selective_scan(*args, return_final_state=True, **kw)


SCAN_CASES = [
    pytest.param({"ngroups": None}, id="shared-BC-raw-delta"),
    pytest.param(
        {"ngroups": 3, "D": True, "z": True, "delta_bias": True, "delta_softplus": True},
        id="grouped-every-option",
    ),
]


@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_forward_and_backward(case, kernels, torch_paths):
    data = make(23, case["ngroups"])
    if not case.get("delta_softplus"):
        data["delta"] = data["delta"].abs()
    kernel_out, kernel_grads = scan_with_grads(ours, data, case, torch.float32)
    assert kernels.names == ["selective_scan_fn"]
    kernels.clear()
    with torch_paths():
        torch_out, torch_grads = scan_with_grads(ours, data, case, torch.float32)
    assert not kernels.names
    ref_out, ref_grads = scan_with_grads(references.selective_scan, data, case, torch.float64)
    for other in (torch_out, ref_out):
        for mine, theirs in zip(kernel_out, other, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert kernel_grads.keys() == torch_grads.keys() == ref_grads.keys()
    for name, grad in kernel_grads.items():
        scale = ref_grads[name].abs().max().item()
        for other in (torch_grads[name], ref_grads[name]):
            torch.testing.assert_close(
                grad.double(), other.double(), rtol=1e-4, atol=1e-4 * scale, msg=name
            )


def test_scan_with_initial_state_keeps_the_torch_path(kernels):
    """The CUDA kernel has no initial state."""
    data = make(5, None)
    selective_scan(*(data[k] for k in ("u", "delta", "A", "B", "C")),
                   delta_softplus=True, initial_state=data["initial_state"])  # fmt: skip
    assert not kernels.names


STEP_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"D": True, "z": True, "delta_bias": True, "delta_softplus": True}, id="all"),
    pytest.param({"z": True, "delta_softplus": True}, id="z-no-bias"),
]


@pytest.mark.parametrize("ngroups", [None, 1, 3])
@pytest.mark.parametrize("case", STEP_CASES)
def test_step_through_selective_state_update(ngroups, case, kernels, torch_paths):
    """Shared B/C: the kernel's single-head form; grouped: one kernel head per group."""
    data = make(3, ngroups)
    if not case.get("delta_softplus"):
        data["delta"] = data["delta"].abs()
    kw = options(data, case)
    state = data["initial_state"]
    ref_y, ref_state = references.selective_scan(
        *(data[k] for k in ("u", "delta", "A", "B", "C")), initial_state=state, **kw
    )
    with torch.inference_mode():
        for t in range(3):
            # Slices of (batch, dim, seqlen) tensors: strided, as the blocks pass them.
            u, delta, B, C = (data[k][..., t] for k in ("u", "delta", "B", "C"))
            step_kw = dict(kw, z=kw["z"][..., t]) if "z" in kw else kw
            kernels.clear()
            y, new_state = selective_scan_step(state, u, delta, data["A"], B, C, **step_kw)
            assert kernels.names == ["selective_state_update"]
            with torch_paths():
                y_torch, state_torch = selective_scan_step(
                    state, u, delta, data["A"], B, C, **step_kw
                )
            torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(new_state, state_torch, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y.double(), ref_y[..., t], rtol=1e-5, atol=1e-5)
            state = new_state
    torch.testing.assert_close(state.double(), ref_state, rtol=1e-5, atol=1e-5)


def test_step_keeps_the_torch_path_for_autograd_and_float64(kernels):
    data = make(1, None)
    u = data["u"][..., 0].clone().requires_grad_()
    rest = [data["delta"][..., 0], data["A"], data["B"][..., 0], data["C"][..., 0]]
    selective_scan_step(data["initial_state"], u, *rest)
    with torch.inference_mode():
        selective_scan_step(data["initial_state"].double(), u.detach(), *rest)
    assert not kernels.names

"""Mamba-2 SSD through mamba_ssm's Triton kernels (interpreted): ``mamba_chunk_scan_combined``
for sequences, ``selective_state_update`` for decode steps; each against our CPU path and the
float64 recurrence of references.py.

``seq_idx`` (several documents in one row, the state restarting at each): the kernel against
our CPU path and against each document scanned alone by the float64 recurrence.
"""

from __future__ import annotations

import pytest
import torch

from layers.ops import ssd_scan, ssd_step
from tests.kernel_mode import references

CHUNK = 16
NHEADS, HEADDIM, D_STATE = 4, 4, 8


def make(seqlen: int, ngroups: int, *, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "x": r(batch, seqlen, NHEADS, HEADDIM),
        "dt": r(batch, seqlen, NHEADS) * 0.5 - 1.0,
        "A": -(torch.rand(NHEADS, generator=g) * 2 + 0.1),
        "B": r(batch, seqlen, ngroups, D_STATE),
        "C": r(batch, seqlen, ngroups, D_STATE),
        "D_head": r(NHEADS),
        "D_headdim": r(NHEADS, HEADDIM),
        "z": r(batch, seqlen, NHEADS, HEADDIM),
        "dt_bias": r(NHEADS) * 0.5,
        "initial_state": r(batch, NHEADS, HEADDIM, D_STATE),
    }


def options(data: dict[str, torch.Tensor], case: dict) -> dict:
    """The ssd_scan / ssd_step keyword arguments a case names."""
    kw = {"dt_softplus": case.get("dt_softplus", False)}
    if "D" in case:
        kw["D"] = data[f"D_{case['D']}"]
    for name in ("z", "dt_bias", "initial_state"):
        if case.get(name):
            kw[name] = data[name]
    if "dt_limit" in case:
        kw["dt_limit"] = case["dt_limit"]
    return kw


SCAN_CASES = [
    pytest.param(
        {
            "seqlen": 37,
            "ngroups": 2,
            "D": "head",
            "z": True,
            "dt_bias": True,
            "dt_softplus": True,
            "initial_state": True,
        },
        id="every-option-across-chunks",
    ),
    pytest.param(
        {
            "seqlen": 16,
            "ngroups": 1,
            "D": "headdim",
            "dt_bias": True,
            "dt_softplus": True,
            "dt_limit": (0.05, 0.5),
        },
        id="dt-limit-one-chunk",
    ),
    pytest.param({"seqlen": 5, "ngroups": 4, "initial_state": True}, id="raw-dt-short"),
]


def scan_with_grads(scan, data: dict[str, torch.Tensor], case: dict, dtype: torch.dtype):
    """``scan``'s (y, final_state) and the gradients of a fixed random loss of both."""
    leaves = {k: v.to(dtype, copy=True).requires_grad_() for k, v in data.items()}
    kw = options(leaves, case)
    y, state = scan(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], **kw)
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ws = torch.randn(state.shape, generator=g, dtype=torch.float64)
    loss = (y.double() * wy).sum() + (state.double() * ws).sum()
    loss.backward()
    used = [k for k, v in leaves.items() if v.grad is not None]
    return (y.detach().double(), state.detach().double()), {k: leaves[k].grad for k in used}


def ours(x, dt, A, B, C, **kw):
    return ssd_scan(x, dt, A, B, C, chunk_size=CHUNK, return_final_state=True, **kw)


@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_forward_and_backward(case, kernels, torch_paths):
    data = make(case["seqlen"], case["ngroups"])
    if not case.get("dt_softplus"):
        data["dt"] = data["dt"].abs()  # raw dt must be positive without softplus
    kernel_out, kernel_grads = scan_with_grads(ours, data, case, torch.float32)
    assert kernels.names == ["mamba_chunk_scan_combined"]
    kernels.clear()
    with torch_paths():
        torch_out, torch_grads = scan_with_grads(ours, data, case, torch.float32)
    assert not kernels.names
    ref_out, ref_grads = scan_with_grads(references.ssd, data, case, torch.float64)

    for kernel, other in [(kernel_out, torch_out), (kernel_out, ref_out)]:
        torch.testing.assert_close(kernel[0], other[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kernel[1], other[1], rtol=1e-4, atol=1e-4)
    assert kernel_grads.keys() == torch_grads.keys() == ref_grads.keys()
    for name, grad in kernel_grads.items():
        scale = ref_grads[name].abs().max().item()
        for other in (torch_grads[name], ref_grads[name]):
            torch.testing.assert_close(
                grad.double(), other.double(), rtol=1e-4, atol=1e-4 * scale, msg=name
            )


STEP_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"D": "head", "dt_bias": True, "dt_softplus": True}, id="D-head-bias"),
    pytest.param({"D": "headdim", "z": True, "dt_bias": True, "dt_softplus": True}, id="all"),
    pytest.param({"z": True, "dt_softplus": True}, id="z-no-bias"),
]


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("case", STEP_CASES)
def test_step_through_selective_state_update(ngroups, case, kernels, torch_paths):
    """Three decode steps from a random state equal the recurrence over those three tokens."""
    data = make(3, ngroups)
    if not case.get("dt_softplus"):
        data["dt"] = data["dt"].abs()  # raw dt must be positive without softplus
    kw = options(data, case)
    state = data["initial_state"]
    ref_y, ref_state = references.ssd(
        data["x"], data["dt"], data["A"], data["B"], data["C"], initial_state=state, **kw
    )
    with torch.inference_mode():
        for t in range(3):
            token = [data[k][:, t] for k in ("x", "dt")]
            bc = [data[k][:, t] for k in ("B", "C")]
            step_kw = dict(kw, z=kw["z"][:, t]) if "z" in kw else kw
            before = state.clone()
            kernels.clear()
            y, new_state = ssd_step(state, *token, data["A"], *bc, **step_kw)
            assert kernels.names == ["selective_state_update"]
            assert torch.equal(state, before), "the step changed the state passed in"
            with torch_paths():
                y_torch, state_torch = ssd_step(state, *token, data["A"], *bc, **step_kw)
            assert len(kernels.names) == 1
            torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(new_state, state_torch, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y.double(), ref_y[:, t], rtol=1e-5, atol=1e-5)
            state = new_state
    torch.testing.assert_close(state.double(), ref_state, rtol=1e-5, atol=1e-5)
    # dt, A and dt_bias went in as stride-0 expands over headdim: the kernel's tied path.
    assert kernels.tie_hdim == [True]


def test_step_keeps_the_torch_path_where_the_kernel_does_not_apply(kernels):
    """selective_state_update has no dt_limit clamp, no backward and computes in float32."""
    data = make(1, 2)
    args = [data[k][:, 0] for k in ("x", "dt")] + [data["A"]]
    args += [data[k][:, 0] for k in ("B", "C")]
    state = data["initial_state"]
    with torch.inference_mode():
        ssd_step(state, *args, dt_softplus=True, dt_limit=(0.01, 0.1))
        ssd_step(state.double(), *args, dt_softplus=True)
    x = args[0].clone().requires_grad_()
    y, new_state = ssd_step(state, x, *args[1:], dt_softplus=True)
    (y.sum() + new_state.sum()).backward()
    assert x.grad is not None
    assert not kernels.names
    with torch.inference_mode():
        ssd_step(state, *args, dt_softplus=True)
    assert kernels.names == ["selective_state_update"]


def test_scan_with_documents(kernels, torch_paths):
    """Packed rows: the kernel (given seq_idx as int32) equals the CPU path, forward and
    backward, and every document equals the float64 recurrence run on it alone."""
    case = {"D": "head", "z": True, "dt_bias": True, "dt_softplus": True}
    data = make(37, 2)
    starts = [[0, 10, 21], [0, 30]]  # documents cross chunk borders (CHUNK = 16)
    seq_idx = torch.zeros(2, 37, dtype=torch.long)
    for row, row_starts in enumerate(starts):
        for start in row_starts[1:]:
            seq_idx[row, start:] += 1

    def packed(x, dt, A, B, C, **kw):
        return ssd_scan(x, dt, A, B, C, chunk_size=CHUNK, seq_idx=seq_idx, **kw)

    def run(scan):
        leaves = {k: v.clone().requires_grad_() for k, v in data.items()}
        y = scan(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"],
                 **options(leaves, case))  # fmt: skip
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (y * weight).sum().backward()
        return y.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}

    kernel_y, kernel_grads = run(packed)
    assert kernels.names == ["mamba_chunk_scan_combined"]
    with torch_paths():
        torch_y, torch_grads = run(packed)
    torch.testing.assert_close(kernel_y, torch_y, rtol=1e-4, atol=1e-4)
    assert kernel_grads.keys() == torch_grads.keys()
    for name, grad in kernel_grads.items():
        scale = torch_grads[name].abs().max().item()
        torch.testing.assert_close(grad, torch_grads[name], rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip

    for row, row_starts in enumerate(starts):
        for start, end in zip(row_starts, [*row_starts[1:], 37], strict=True):
            piece = {k: v.double() for k, v in data.items()}
            for name in ("x", "dt", "B", "C", "z"):
                piece[name] = piece[name][row : row + 1, start:end]
            y_alone, _ = references.ssd(piece["x"], piece["dt"], piece["A"], piece["B"],
                                        piece["C"], **options(piece, case))  # fmt: skip
            torch.testing.assert_close(kernel_y[row : row + 1, start:end].double(), y_alone,
                                       rtol=1e-4, atol=1e-4)  # fmt: skip

"""Causal depthwise conv through causal-conv1d's references (``causal_conv1d_ref`` and
``causal_conv1d_update_ref``, the CUDA kernels' specification), against our CPU path and the
float64 loop of references.py."""

from __future__ import annotations

import pytest
import torch

from layers.ops import causal_conv1d, causal_conv1d_step
from tests.kernel_mode import references

BATCH, DIM, SEQLEN = 2, 6, 9


def make(width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(BATCH, DIM, SEQLEN, generator=g),
        "weight": torch.randn(DIM, width, generator=g),
        "bias": torch.randn(DIM, generator=g),
    }


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sequence_forward_and_backward(width, activation, with_bias, kernels, torch_paths):
    data = make(width)
    bias_key = ("bias",) if with_bias else ()

    def run():
        leaves = {k: data[k].clone().requires_grad_() for k in ("x", "weight", *bias_key)}
        y, final = causal_conv1d(
            leaves["x"], leaves["weight"], leaves.get("bias"), activation=activation,
            return_final_state=True,
        )  # fmt: skip
        (y * torch.linspace(-1, 1, SEQLEN)).sum().backward()
        return y.detach(), final, {k: v.grad for k, v in leaves.items()}

    y, final, grads = run()
    assert kernels.names == ["causal_conv1d_fn"]
    kernels.clear()
    with torch_paths():
        y_torch, final_torch, grads_torch = run()
    assert not kernels.names
    ref_y, ref_final = references.causal_conv(
        data["x"], data["weight"], data.get("bias") if with_bias else None,
        silu=activation == "silu",
    )  # fmt: skip
    torch.testing.assert_close(y, y_torch)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_torch)
    torch.testing.assert_close(final.double(), ref_final)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_torch[name], msg=name)


def test_sequence_with_initial_state_keeps_the_torch_path(kernels):
    """We call the kernel only without states (it wants channel-last state strides)."""
    data = make(4)
    causal_conv1d(data["x"], data["weight"], initial_state=torch.zeros(BATCH, DIM, 3))
    causal_conv1d(data["x"], torch.randn(DIM, 5))  # width 5: no kernel
    assert not kernels.names


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_step_through_causal_conv1d_update(width, activation, with_bias, kernels, torch_paths):
    """Steps from a random state, enough of them to shift every initial column out."""
    data = make(width)
    bias = data["bias"] if with_bias else None
    state = torch.randn(BATCH, DIM, width - 1, generator=torch.Generator().manual_seed(2))
    ref_y, ref_final = references.causal_conv(
        data["x"], data["weight"], bias, silu=activation == "silu", initial_state=state
    )
    with torch.inference_mode():
        for t in range(SEQLEN):
            x = data["x"][:, :, t]
            before = state.clone()
            kernels.clear()
            y, new_state = causal_conv1d_step(x, state, data["weight"], bias, activation=activation)
            assert kernels.names == ["causal_conv1d_update"]
            assert torch.equal(state, before), "the step changed the state passed in"
            with torch_paths():
                y_torch, state_torch = causal_conv1d_step(
                    x, state, data["weight"], bias, activation=activation
                )
            torch.testing.assert_close(y, y_torch)
            torch.testing.assert_close(new_state, state_torch)
            torch.testing.assert_close(y.double(), ref_y[:, :, t], rtol=1e-5, atol=1e-5)
            state = new_state
    torch.testing.assert_close(state.double(), ref_final)


def test_step_keeps_the_torch_path_outside_the_kernel_limits(kernels):
    x = torch.randn(BATCH, DIM)
    with torch.inference_mode():
        causal_conv1d_step(x, torch.randn(BATCH, DIM, 4), torch.randn(DIM, 5))  # width 5
        causal_conv1d_step(x.bfloat16(), torch.randn(BATCH, DIM, 3), torch.randn(DIM, 4))
        causal_conv1d_step(x, torch.randn(BATCH, DIM, 3), torch.randn(DIM, 4),
                           torch.randn(DIM).double())  # fmt: skip
    causal_conv1d_step(x.requires_grad_(), torch.randn(BATCH, DIM, 3), torch.randn(DIM, 4))
    assert not kernels.names
    with torch.inference_mode():
        causal_conv1d_step(x.detach().bfloat16(), torch.randn(BATCH, DIM, 3).bfloat16(),
                           torch.randn(DIM, 4))  # fmt: skip
    assert kernels.names == ["causal_conv1d_update"]

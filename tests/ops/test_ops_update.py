"""The in-place one-token updates decoding runs (ssd_update, selective_scan_update,
causal_conv1d_update), token by token against the float64 sequential recurrences
(``*_naive``), in float64 and in float32; and their fallbacks (autograd, a state that is not
contiguous) against the functional steps."""

from __future__ import annotations

import pytest
import torch

from layers.ops import (
    causal_conv1d_naive,
    causal_conv1d_step,
    causal_conv1d_update,
    selective_scan_naive,
    selective_scan_update,
    ssd_naive,
    ssd_step,
    ssd_update,
)

STEPS = 7


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("D_shape", ["head", "channel", None])
def test_ssd_update_follows_the_recurrence(dtype, ngroups, D_shape):
    g = torch.Generator().manual_seed(1)
    batch, nheads, headdim, d_state = 2, 4, 3, 5
    x = randn(g, batch, STEPS, nheads, headdim)
    dt = torch.rand(batch, STEPS, nheads, generator=g, dtype=torch.float64) - 0.5
    A = -(torch.rand(nheads, generator=g, dtype=torch.float64) * 2 + 0.1)
    B, C = randn(g, batch, STEPS, ngroups, d_state), randn(g, batch, STEPS, ngroups, d_state)
    D = {"head": randn(g, nheads), "channel": randn(g, nheads, headdim), None: None}[D_shape]
    z, dt_bias, init = (
        randn(g, batch, STEPS, nheads, headdim),
        randn(g, nheads),
        randn(g, batch, nheads, headdim, d_state),
    )
    opts = {"dt_bias": dt_bias, "dt_softplus": True}
    y_ref, final_ref = ssd_naive(x, dt, A, B, C, D=D, z=z, initial_state=init, **opts)

    def cast(t):
        return None if t is None else t.to(dtype)

    state = init.to(dtype).clone()
    address = state.data_ptr()
    ys = []
    with torch.inference_mode():
        for t in range(STEPS):
            ys.append(
                ssd_update(
                    state,
                    cast(x[:, t]),
                    cast(dt[:, t]),
                    cast(A),
                    cast(B[:, t]),
                    cast(C[:, t]),
                    D=cast(D),
                    z=cast(z[:, t]),
                    dt_bias=cast(dt_bias),
                    dt_softplus=True,
                )
            )
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert state.data_ptr() == address, "the state must be updated in place"
    torch.testing.assert_close(torch.stack(ys, 1).double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state.double(), final_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ngroups", [None, 2])
def test_selective_scan_update_follows_the_recurrence(dtype, ngroups):
    g = torch.Generator().manual_seed(2)
    batch, dim, d_state = 2, 6, 4
    u, delta = randn(g, batch, dim, STEPS), randn(g, batch, dim, STEPS) * 0.5
    A = -torch.rand(dim, d_state, generator=g, dtype=torch.float64) * 3
    bc = (batch, d_state, STEPS) if ngroups is None else (batch, ngroups, d_state, STEPS)
    B, C = randn(g, *bc), randn(g, *bc)
    D, z, bias = randn(g, dim), randn(g, batch, dim, STEPS), randn(g, dim)
    init = randn(g, batch, dim, d_state)
    opts = {"D": D, "delta_bias": bias, "delta_softplus": True}
    y_ref, final_ref = selective_scan_naive(u, delta, A, B, C, z=z, initial_state=init, **opts)
    state = init.to(dtype).clone()
    ys = []
    with torch.inference_mode():
        for t in range(STEPS):
            ys.append(
                selective_scan_update(
                    state,
                    u[..., t].to(dtype),
                    delta[..., t].to(dtype),
                    A.to(dtype),
                    B[..., t].to(dtype),
                    C[..., t].to(dtype),
                    D=D.to(dtype),
                    z=z[..., t].to(dtype),
                    delta_bias=bias.to(dtype),
                    delta_softplus=True,
                )
            )
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(torch.stack(ys, -1).double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state.double(), final_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_conv1d_update_follows_the_conv(activation, dtype):
    g = torch.Generator().manual_seed(3)
    batch, dim, width = 2, 5, 4
    x, w, b = randn(g, batch, dim, STEPS), randn(g, dim, width), randn(g, dim)
    init = randn(g, batch, dim, width - 1)
    y_ref, final_ref = causal_conv1d_naive(x, w, b, activation, init)
    state = init.to(dtype).clone()
    address = state.data_ptr()
    with torch.inference_mode():
        ys = [
            causal_conv1d_update(
                x[..., t].to(dtype), state, w.to(dtype), b.to(dtype), activation=activation
            )
            for t in range(STEPS)
        ]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert state.data_ptr() == address
    torch.testing.assert_close(torch.stack(ys, -1).double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state.double(), final_ref, rtol=tol, atol=tol)


def test_ssd_update_with_autograd_or_a_strided_state_takes_the_functional_step():
    g = torch.Generator().manual_seed(4)
    x, dt, A = randn(g, 2, 4, 3), randn(g, 2, 4), -torch.rand(4, generator=g, dtype=torch.float64)
    B, C = randn(g, 2, 1, 5), randn(g, 2, 1, 5)
    init = randn(g, 2, 4, 5, 3).transpose(-1, -2)  # (2, 4, 3, 5), not contiguous
    y_ref, state_ref = ssd_step(init, x, dt, A, B, C, dt_softplus=True)
    state = init.clone(memory_format=torch.preserve_format)
    assert not state.is_contiguous()
    with torch.inference_mode():
        y = ssd_update(state, x, dt, A, B, C, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
    x = x.clone().requires_grad_()
    state = init.contiguous()
    y = ssd_update(state, x, dt, A, B, C, dt_softplus=True)
    y.sum().backward()
    assert x.grad is not None and torch.allclose(state, state_ref)


def test_causal_conv1d_update_with_autograd_keeps_the_gradient():
    g = torch.Generator().manual_seed(5)
    x = randn(g, 2, 3).requires_grad_()
    w, state = randn(g, 3, 4), randn(g, 2, 3, 3)
    y_ref, state_ref = causal_conv1d_step(x, state, w, activation="silu")
    y = causal_conv1d_update(x, state, w, activation="silu")
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(state, state_ref)

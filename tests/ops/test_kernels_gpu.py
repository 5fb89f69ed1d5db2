"""CUDA kernels (mamba-ssm, causal-conv1d) against our PyTorch paths. Needs a GPU."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from layers.ops import (
    causal_conv1d,
    causal_conv1d_ops,
    causal_conv1d_step,
    mamba_ssm_ops,
    selective_scan,
    selective_scan_step,
    selective_scan_torch,
    ssd_chunked_torch,
    ssd_scan,
    ssd_step,
)

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _require(loader):
    if not torch.cuda.is_available() or loader() is None:
        pytest.skip("needs CUDA and the kernel package")


@pytest.fixture(autouse=True)
def _kernels_enabled(monkeypatch):
    monkeypatch.delenv("HYBRID_DISABLE_KERNELS", raising=False)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@needs_cuda
@pytest.mark.parametrize("seqlen", [1, 100, 513])
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_kernel_matches_torch(seqlen, with_state):
    _require(mamba_ssm_ops)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, p, n, ngroups = 2, 8, 32, 16, 2

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g)

    x, dt = r(b, seqlen, h, p), r(b, seqlen, h)
    A = -torch.rand(h, device="cuda", generator=g) * 4 - 0.5
    B, C = r(b, seqlen, ngroups, n), r(b, seqlen, ngroups, n)
    kw = dict(
        chunk_size=64,
        D=r(h),
        z=r(b, seqlen, h, p),
        dt_bias=r(h) - 2,
        dt_softplus=True,
        dt_limit=(0.001, 0.5),
        initial_state=r(b, h, p, n) if with_state else None,
        return_final_state=True,
    )
    y_k, final_k = ssd_scan(x, dt, A, B, C, **kw)
    y_t, final_t = ssd_chunked_torch(x, dt, A, B, C, **kw)
    assert y_k.dtype == y_t.dtype and final_k.dtype == final_t.dtype == torch.float32
    assert _rel(y_k, y_t) < 1e-3 and _rel(final_k, final_t) < 1e-3


@needs_cuda
@pytest.mark.parametrize("seqlen", [1, 100, 513])
@pytest.mark.parametrize("grouped", [False, True])
def test_selective_scan_kernel_matches_torch(seqlen, grouped):
    _require(mamba_ssm_ops)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, n = 2, 64, 16

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g)

    bc = (b, 2, n, seqlen) if grouped else (b, n, seqlen)
    u, delta = r(b, d, seqlen), r(b, d, seqlen)
    A = -torch.rand(d, n, device="cuda", generator=g) * 4 - 0.5
    B, C = r(*bc), r(*bc)
    kw = dict(
        D=r(d), z=r(b, d, seqlen), delta_bias=r(d) - 2, delta_softplus=True, return_final_state=True
    )
    y_k, final_k = selective_scan(u, delta, A, B, C, **kw)
    y_t, final_t = selective_scan_torch(u, delta, A, B, C, **kw)
    assert _rel(y_k, y_t) < 1e-3 and _rel(final_k, final_t) < 1e-3


@needs_cuda
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("seqlen", [1, 3, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d_kernel_matches_torch(width, seqlen, with_state, monkeypatch):
    _require(causal_conv1d_ops)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d = 2, 64
    x = torch.randn(b, d, seqlen, device="cuda", generator=g)
    w = torch.randn(d, width, device="cuda", generator=g)
    bias = torch.randn(d, device="cuda", generator=g)
    init = torch.randn(b, d, width - 1, device="cuda", generator=g) if with_state else None
    kw = dict(activation="silu", initial_state=init, return_final_state=True)
    y_k, final_k = causal_conv1d(x, w, bias, **kw)
    monkeypatch.setenv("HYBRID_DISABLE_KERNELS", "1")
    y_t, final_t = causal_conv1d(x, w, bias, **kw)
    torch.testing.assert_close(y_k, y_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final_k, final_t)


def _spy(monkeypatch, module: str, loader: str, name: str) -> list[int]:
    """Count the calls of the real kernel ``name`` made through ``module``'s ``loader``."""
    mod = importlib.import_module(module)
    ops = getattr(mod, loader)()
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return getattr(ops, name)(*args, **kwargs)

    spied = SimpleNamespace(**{**vars(ops), name: counted})
    monkeypatch.setattr(mod, loader, lambda: spied)
    return calls


def _step_both(monkeypatch, step, state, *args, **kwargs):
    """``step`` with the kernels and with HYBRID_DISABLE_KERNELS=1; the state stays untouched."""
    before = state.clone()
    with torch.inference_mode():
        y_k, state_k = step(state, *args, **kwargs)
        assert torch.equal(state, before), "the kernel path modified the state passed in"
        with monkeypatch.context() as patch:
            patch.setenv("HYBRID_DISABLE_KERNELS", "1")
            y_t, state_t = step(state, *args, **kwargs)
    assert y_k.dtype == y_t.dtype and state_k.dtype == state_t.dtype == state.dtype
    return y_k, state_k, y_t, state_t


@needs_cuda
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("d_per_headdim", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_step_kernel_matches_torch(ngroups, d_per_headdim, dtype, monkeypatch):
    _require(mamba_ssm_ops)
    calls = _spy(monkeypatch, "layers.ops.ssd.dispatch", "mamba_ssm_ops", "selective_state_update")
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, p, n = 3, 8, 32, 16

    def r(*s, dt=torch.float32):
        return torch.randn(*s, device="cuda", generator=g).to(dt)

    state = r(b, h, p, n)
    A = -torch.rand(h, device="cuda", generator=g) * 4 - 0.5
    kw = dict(D=r(h, p) if d_per_headdim else r(h), dt_bias=r(h) - 2, dt_softplus=True)
    for _ in range(4):
        x, z = r(b, h, p, dt=dtype), r(b, h, p, dt=dtype)
        B, C = r(b, ngroups, n, dt=dtype), r(b, ngroups, n, dt=dtype)
        y_k, state_k, y_t, state_t = _step_both(
            monkeypatch, ssd_step, state, x, r(b, h, dt=dtype), A, B, C, z=z, **kw
        )
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y_k, y_t, rtol=tol, atol=tol)
        torch.testing.assert_close(state_k, state_t, rtol=1e-4, atol=1e-4)
        state = state_k
    assert len(calls) == 4


@needs_cuda
def test_ssd_step_kernel_without_optional_arguments(monkeypatch):
    """D=None and dt_bias=None crash some mamba_ssm versions; the dispatcher passes zeros."""
    _require(mamba_ssm_ops)
    calls = _spy(monkeypatch, "layers.ops.ssd.dispatch", "mamba_ssm_ops", "selective_state_update")
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, p, n = 2, 4, 16, 8

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g)

    args = (r(b, h, p), torch.rand(b, h, device="cuda", generator=g), -torch.rand(h).cuda())
    y_k, state_k, y_t, state_t = _step_both(
        monkeypatch, ssd_step, r(b, h, p, n), *args, r(b, 1, n), r(b, 1, n)
    )
    torch.testing.assert_close(y_k, y_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state_k, state_t, rtol=1e-4, atol=1e-4)
    assert len(calls) == 1


@needs_cuda
def test_ssd_scan_then_kernel_steps_match_the_full_scan():
    _require(mamba_ssm_ops)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, L, prefix, h, p, n = 2, 40, 33, 8, 16, 16

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g)

    x, dt, z = r(b, L, h, p), r(b, L, h), r(b, L, h, p)
    A = -torch.rand(h, device="cuda", generator=g) * 4 - 0.5
    B, C = r(b, L, 2, n), r(b, L, 2, n)
    kw = dict(D=r(h), dt_bias=r(h) - 2, dt_softplus=True)
    with torch.inference_mode():
        y_full = ssd_chunked_torch(x, dt, A, B, C, chunk_size=16, z=z, **kw)
        ys, state = ssd_scan(
            x[:, :prefix], dt[:, :prefix], A, B[:, :prefix], C[:, :prefix], chunk_size=16,
            z=z[:, :prefix], return_final_state=True, **kw,
        )  # fmt: skip
        ys = [ys]
        for t in range(prefix, L):
            y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], z=z[:, t], **kw)
            ys.append(y[:, None])
    assert _rel(torch.cat(ys, dim=1), y_full) < 1e-3


@needs_cuda
@pytest.mark.parametrize("ngroups", [None, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_step_kernel_matches_torch(ngroups, dtype, monkeypatch):
    _require(mamba_ssm_ops)
    calls = _spy(
        monkeypatch, "layers.ops.selective_scan.dispatch", "mamba_ssm_ops", "selective_state_update"
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d, n = 3, 64, 16

    def r(*s, dt=torch.float32):
        return torch.randn(*s, device="cuda", generator=g).to(dt)

    state = r(b, d, n)
    A = -torch.rand(d, n, device="cuda", generator=g) * 4 - 0.5
    bc = (b, n) if ngroups is None else (b, ngroups, n)
    kw = dict(D=r(d), delta_bias=r(d) - 2, delta_softplus=True)
    for _ in range(4):
        u, delta, z = r(b, d, dt=dtype), r(b, d, dt=dtype), r(b, d, dt=dtype)
        y_k, state_k, y_t, state_t = _step_both(
            monkeypatch, selective_scan_step, state, u, delta, A, r(*bc), r(*bc), z=z, **kw
        )
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y_k, y_t, rtol=tol, atol=tol)
        torch.testing.assert_close(state_k, state_t, rtol=1e-4, atol=1e-4)
        state = state_k
    assert len(calls) == 4


@needs_cuda
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_step_kernel_matches_torch(width, dtype, activation, monkeypatch):
    """Our (batch, dim, width - 1) conv state goes to causal_conv1d_update as is."""
    _require(causal_conv1d_ops)
    calls = _spy(
        monkeypatch, "layers.ops.conv.dispatch", "causal_conv1d_ops", "causal_conv1d_update"
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d = 3, 64

    def r(*s, dt=torch.float32):
        return torch.randn(*s, device="cuda", generator=g).to(dt)

    weight, bias = r(d, width), r(d)
    state = r(b, d, width - 1, dt=dtype)
    for _ in range(width + 1):
        x = r(b, d, dt=dtype)
        y_k, state_k, y_t, state_t = _step_both(
            monkeypatch,
            lambda s, *args, x=x, **kw: causal_conv1d_step(x, s, *args, **kw),
            state,
            weight,
            bias,
            activation=activation,
        )
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y_k, y_t, rtol=tol, atol=tol)
        torch.testing.assert_close(state_k, state_t, rtol=0, atol=0)
        state = state_k
    assert len(calls) == width + 1

"""CUDA kernels (mamba-ssm, causal-conv1d) against our PyTorch paths. Needs a GPU."""

from __future__ import annotations

import pytest
import torch

from layers.ops import (
    causal_conv1d,
    causal_conv1d_ops,
    mamba_ssm_ops,
    selective_scan,
    selective_scan_torch,
    ssd_chunked_torch,
    ssd_scan,
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

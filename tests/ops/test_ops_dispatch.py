"""Kernel dispatch plumbing, checked on CPU with stand-ins for the CUDA kernels.

No GPU here, so the real kernels cannot run (tests/ops/test_kernels_gpu.py does that on a GPU).
These stand-ins have the exact Python signatures of mamba_ssm 2.x / causal-conv1d 1.x, check
the shapes those kernels document, and compute with our PyTorch path. Routing the blocks
through them shows that every argument reaches the kernel under the right name and layout.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hybrid import HybridConfig, HybridLM
from layers.ops import selective_scan_torch, ssd_chunked_torch

# layers.ops re-exports functions under its submodules' names, so fetch the modules themselves.
conv_module = importlib.import_module("layers.ops.conv")
selective_scan_module = importlib.import_module("layers.ops.selective_scan")
ssd_module = importlib.import_module("layers.ops.ssd")
CALLS: list[str] = []


def mamba_chunk_scan_combined(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
    seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
    return_final_states=False, return_varlen_states=False,
):  # fmt: skip
    batch, seqlen, nheads, _ = x.shape
    assert dt.shape == (batch, seqlen, nheads) and A.shape == (nheads,)
    assert B.shape[:2] == (batch, seqlen) and B.shape == C.shape and B.dim() == 4
    assert isinstance(chunk_size, int) and seq_idx is None and cu_seqlens is None
    CALLS.append("mamba_chunk_scan_combined")
    return ssd_chunked_torch(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
        dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=initial_states,
        return_final_state=return_final_states,
    )  # fmt: skip


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False,
):  # fmt: skip
    batch, dim, seqlen = u.shape
    assert delta.shape == u.shape and A.shape[0] == dim and A.dtype == torch.float32
    assert B.shape in ((batch, A.shape[1], seqlen),) or B.dim() == 4
    CALLS.append("selective_scan_fn")
    return selective_scan_torch(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        return_final_state=return_last_state,
    )  # fmt: skip


def causal_conv1d_fn(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
    final_states_out=None, activation=None,
):  # fmt: skip
    assert x.dim() == 3 and weight.shape == (x.shape[1], weight.shape[1])
    assert activation in (None, "silu", "swish") and initial_states is None
    CALLS.append("causal_conv1d_fn")
    width = weight.shape[1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(y) if activation else y


@pytest.fixture
def stand_in_kernels(monkeypatch):
    mamba = SimpleNamespace(
        mamba_chunk_scan_combined=mamba_chunk_scan_combined, selective_scan_fn=selective_scan_fn
    )
    conv = SimpleNamespace(causal_conv1d_fn=causal_conv1d_fn)
    for module in (ssd_module, selective_scan_module):
        monkeypatch.setattr(module, "mamba_ssm_ops", lambda: mamba)
        monkeypatch.setattr(module, "use_kernels", lambda *tensors: True)
    monkeypatch.setattr(conv_module, "causal_conv1d_ops", lambda: conv)
    monkeypatch.setattr(conv_module, "use_kernels", lambda *tensors: True)
    CALLS.clear()
    yield


@pytest.mark.parametrize("pattern", ["M", "S", "MS*-"])
def test_blocks_route_through_the_kernel_signatures(pattern, stand_in_kernels):
    config = HybridConfig(
        pattern,
        vocab_size=32,
        d_model=32,
        mamba2={"d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16},
        mamba1={"d_state": 4, "inner_norms": True},
    )
    torch.manual_seed(0)
    model = HybridLM(config)
    ids = torch.randint(0, 32, (2, 37))
    routed = model(ids).logits
    expected_calls = {"causal_conv1d_fn"}
    expected_calls |= {"mamba_chunk_scan_combined"} if "M" in pattern else set()
    expected_calls |= {"selective_scan_fn"} if "S" in pattern else set()
    assert set(CALLS) == expected_calls
    CALLS.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYBRID_DISABLE_KERNELS", "1")
        for module in (ssd_module, selective_scan_module, conv_module):
            patch.setattr(module, "use_kernels", lambda *tensors: False)
        direct = model(ids).logits
    assert not CALLS
    torch.testing.assert_close(routed, direct)

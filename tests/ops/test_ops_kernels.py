"""Kernel loaders and dispatch switches (CPU-side behaviour)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from layers.ops import causal_conv1d_ops, mamba_ssm_ops, use_kernels

ROOT = Path(__file__).resolve().parents[2]


def test_loaders_are_cached_and_never_raise():
    assert mamba_ssm_ops() is mamba_ssm_ops()
    assert causal_conv1d_ops() is causal_conv1d_ops()
    ops = mamba_ssm_ops()
    if ops is not None:
        for name in ("mamba_chunk_scan_combined", "selective_scan_fn", "selective_state_update"):
            assert callable(getattr(ops, name))
    conv = causal_conv1d_ops()
    if conv is not None:
        assert callable(conv.causal_conv1d_fn) and callable(conv.causal_conv1d_update)


def test_use_kernels_needs_cuda_tensors(monkeypatch):
    monkeypatch.delenv("HYBRID_DISABLE_KERNELS", raising=False)
    x = torch.zeros(2)
    assert not use_kernels(x)
    assert not use_kernels()
    assert not use_kernels(None)
    if torch.cuda.is_available():
        xc = x.cuda()
        assert use_kernels(xc, None, xc)
        assert not use_kernels(xc, x)
        monkeypatch.setenv("HYBRID_DISABLE_KERNELS", "1")
        assert not use_kernels(xc)


def test_importing_ops_does_not_import_kernel_packages():
    code = (
        "import sys, layers.ops; "
        "bad = [m for m in ('mamba_ssm', 'causal_conv1d') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

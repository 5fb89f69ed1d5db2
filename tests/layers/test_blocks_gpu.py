"""GPU: whole blocks and a hybrid model on the kernel path against the plain-PyTorch path.

Skipped, not failed, without CUDA or without the mamba-ssm / causal-conv1d kernels.
"""

import os

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from layers.ops import causal_conv1d_ops, mamba_ssm_ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        torch.cuda.is_available() and (mamba_ssm_ops() is None or causal_conv1d_ops() is None),
        reason="needs the mamba-ssm and causal-conv1d kernels",
    ),
]

CONFIG = {
    "vocab_size": 64,
    "d_model": 64,
    "mamba2": {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 32},
    "mamba1": {"d_state": 8, "inner_norms": True},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "moe": {"n_experts": 4},
}


def run_both_paths(model, ids, monkeypatch):
    kernel = model(ids).logits
    monkeypatch.setenv("HYBRID_DISABLE_KERNELS", "1")
    reference = model(ids).logits
    monkeypatch.delenv("HYBRID_DISABLE_KERNELS")
    return kernel, reference


@pytest.mark.parametrize("pattern", ["M", "S", "M-S*-E"])
@pytest.mark.parametrize("length", [1, 77, 300])
def test_kernel_path_matches_torch_path(pattern, length, monkeypatch):
    assert os.environ.get("HYBRID_DISABLE_KERNELS") != "1"
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(pattern, **CONFIG)).cuda()
    ids = torch.randint(0, 64, (2, length), device="cuda")
    kernel, reference = run_both_paths(model, ids, monkeypatch)
    torch.testing.assert_close(kernel, reference, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pattern", ["M", "M-S*-E"])
def test_packed_documents_on_the_kernel_path_match_the_torch_path(pattern, monkeypatch):
    """seq_idx through mamba_chunk_scan_combined and causal_conv1d_fn (int32, channel-last)
    gives the PyTorch path's logits, which equal each document run alone (tests/layers)."""
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(pattern, **CONFIG)).cuda()
    ids = torch.randint(0, 64, (2, 300), device="cuda")
    seq_idx = torch.zeros(2, 300, dtype=torch.long, device="cuda")
    seq_idx[0, 40:] += 1
    seq_idx[0, 41:] += 1
    seq_idx[1, 200:] += 1
    kernel = model(ids, seq_idx=seq_idx).logits
    monkeypatch.setenv("HYBRID_DISABLE_KERNELS", "1")
    reference = model(ids, seq_idx=seq_idx).logits
    torch.testing.assert_close(kernel, reference, rtol=1e-3, atol=1e-3)

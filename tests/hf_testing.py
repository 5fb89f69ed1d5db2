"""Helpers shared by the tests that compare against transformers."""

from __future__ import annotations

import importlib
import math

import pytest
import torch


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # not installed, or installed with its CUDA build skipped
        return False
    return True


# With mamba-ssm / causal-conv1d importable, transformers sends the SSM scans and convs to their
# CUDA kernels even for CPU tensors, so its plain-PyTorch reference paths would not run.
needs_torch_ssm_path = pytest.mark.skipif(
    _imports("mamba_ssm") or _imports("causal_conv1d"),
    reason="transformers dispatches to the mamba_ssm / causal_conv1d CUDA kernels when they import",
)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights in ranges where every term matters: norms away from 1, nonzero biases, varied A,
    projections at unit gain (transformers' init leaves norms at 1 and most outputs tiny).
    Returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(module.named_parameters())
    tensors.update(
        (name, buf)
        for name, buf in module.named_buffers()
        if name.endswith("e_score_correction_bias")
    )
    with torch.no_grad():
        for name, p in tensors.items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                value = torch.empty(p.shape).uniform_(1.0, 8.0, generator=gen).log()
            elif leaf == "dt_bias" or name.endswith("dt_proj.bias"):
                value = torch.randn(p.shape, generator=gen) * 0.5 - 2.0  # softplus ~ 0.13
            elif leaf == "weight" and "norm" in name:
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            elif p.dim() >= 2:
                value = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
            else:  # biases, D, correction bias
                value = 0.3 * torch.randn(p.shape, generator=gen)
            p.copy_(value)
    return module.eval()

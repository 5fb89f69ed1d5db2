"""The short_conv block (LFM2): against the float64 formula written out, options, cache bytes.
(Against transformers' Lfm2ShortConv: tests/layers/test_vs_transformers.py; cache, padding
and documents: the shared suites.)"""

from __future__ import annotations

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.accounting import describe


def block(**options):
    config = HybridConfig(["short_conv"], vocab_size=16, d_model=8, short_conv=options)
    return HybridLM(config).sublayers[0].block


@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_formula(bias):
    """out_proj(C * conv(B * x)), the conv as an explicit sum over its taps."""
    torch.manual_seed(0)
    ours = block(d_conv=3, bias=bias).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    B, C, v = ours.in_proj(x).chunk(3, -1)
    gated = B * v  # (2, 9, 8)
    w = ours.conv.weight[:, 0]  # (8, 3)
    conv = torch.zeros_like(gated)
    for t in range(9):
        for tap in range(3):
            source = t - (2 - tap)
            if source >= 0:
                conv[:, t] += w[:, tap] * gated[:, source]
    if bias:
        conv = conv + ours.conv.bias
    expected = ours.out_proj(C * conv)
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)


def test_bad_options():
    with pytest.raises(ValueError, match=r"^short_conv\.d_conv: must be a positive integer"):
        block(d_conv=0)
    with pytest.raises(ValueError, match=r"^short_conv\.bias: must be true or false, got 'yes'$"):
        block(bias="yes")


def test_cache_is_the_conv_window():
    config = HybridConfig("C", vocab_size=16, d_model=8, short_conv={"d_conv": 4})
    cache = HybridLM(config).allocate_cache(2, 100)
    assert cache.nbytes == 2 * 8 * 3 * 4
    assert describe(config, 10_000, torch.float32).cache_bytes == cache.nbytes // 2

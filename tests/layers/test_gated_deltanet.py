"""The gated_deltanet block: options and their one-line errors, the block against the float64
recurrence, the kernels' varlen offsets, cache bytes. (Against transformers' Qwen3-Next layer:
tests/layers/test_vs_transformers.py; cache, padding and documents: the shared suites.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from hybrid import HybridConfig, HybridLM
from hybrid.accounting import describe
from layers.ops.delta import gated_delta_naive
from layers.ops.delta.dispatch import _cu_seqlens


def block(**options):
    config = HybridConfig(["gated_deltanet"], vocab_size=16, d_model=32, gated_deltanet=options)
    return HybridLM(config).sublayers[0].block, config


def test_defaults_resolve():
    _, config = block()
    options = config.layer_options[0]
    assert (options.n_heads, options.n_v_heads, options.head_k_dim, options.head_v_dim) == (
        1, 1, 64, 64,
    )  # fmt: skip
    _, config = block(n_heads=2, n_v_heads=6, head_k_dim=8)
    assert config.layer_options[0].head_v_dim == 8


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_heads": 2, "n_v_heads": 3},
         r"^gated_deltanet\.n_v_heads: must be a multiple of n_heads=2; got 3$"),
        ({"head_k_dim": 0}, r"^gated_deltanet\.head_k_dim: must be a positive integer, got 0$"),
        ({"n_heads": 1.5}, r"^gated_deltanet\.n_heads: must be an integer or null, got 1\.5$"),
        ({"dt_min": 0.5, "dt_max": 0.1}, r"^gated_deltanet\.dt_min: need 0 < dt_min <= dt_max"),
        ({"a_init_range": [0, 4]}, r"^gated_deltanet\.a_init_range: need 0 < low <= high"),
        ({"heads": 2}, r"^gated_deltanet"),
        ({"allow_neg_eigval": 1}, r"^gated_deltanet\.allow_neg_eigval: must be"),
    ],
)  # fmt: skip
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        block(**options)


@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_block_matches_float64_recurrence(allow_neg_eigval):
    """The whole block (projections, conv, norms, gate) in float64 against the same steps
    written out with the token-by-token recurrence; with ``allow_neg_eigval`` beta is
    2 sigmoid(b), in (0, 2)."""
    torch.manual_seed(0)
    ours, _ = block(
        n_heads=2, n_v_heads=4, head_k_dim=8, head_v_dim=4, chunk_size=4,
        allow_neg_eigval=allow_neg_eigval,
    )  # fmt: skip
    ours = ours.double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    opts = ours.options
    qkv, z, b, a = ours.in_proj(x).split_with_sizes(ours.split_sizes, -1)
    w = ours.conv1d.weight[:, 0]
    padded = F.pad(qkv.transpose(1, 2), (opts.d_conv - 1, 0))
    conv = sum(w[:, i, None] * padded[..., i : i + 11] for i in range(opts.d_conv))
    q, k, v = F.silu(conv).transpose(1, 2).split([16, 16, 16], -1)
    q, k = (rearrange(t, "b l (h d) -> b l h d", d=8) for t in (q, k))
    q, k = (t / (t.square().sum(-1, keepdim=True) + 1e-6).sqrt() for t in (q, k))  # fla's l2norm
    v = rearrange(v, "b l (h d) -> b l h d", d=4)
    g = -ours.A_log.exp() * F.softplus(a + ours.dt_bias)
    o, _ = gated_delta_naive(q, k, v, g, b.sigmoid() * (2 if allow_neg_eigval else 1))
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + opts.norm_eps) * ours.norm.weight
    o = o * F.silu(rearrange(z, "b l (h d) -> b l h d", d=4))
    expected = ours.out_proj(rearrange(o, "b l h d -> b l (h d)"))
    torch.testing.assert_close(ours(x), expected, rtol=1e-10, atol=1e-12)


def test_without_output_gate():
    ours, _ = block(n_heads=2, head_k_dim=8, output_gate=False)
    assert ours.in_proj.out_features == 3 * 16 + 2 * 2
    assert ours(torch.randn(1, 5, 32)).shape == (1, 5, 32)


def test_varlen_offsets_for_the_kernels():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [3, 3, 3, 3, 7]])
    assert _cu_seqlens(seq_idx).tolist() == [0, 2, 5, 9, 10]


def test_cache_bytes():
    config = HybridConfig(
        "D", vocab_size=16, d_model=32,
        gated_deltanet={"n_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 4},
    )  # fmt: skip
    cache = HybridLM(config).allocate_cache(1, 100)
    conv_dim = 2 * 16 + 16
    assert cache.nbytes == conv_dim * 3 * 4 + 4 * 8 * 4 * 4
    assert describe(config, 100, torch.float32).cache_bytes == cache.nbytes
    assert describe(config, 10_000, torch.float32).cache_bytes == cache.nbytes  # fixed size

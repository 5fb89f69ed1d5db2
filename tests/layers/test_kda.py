"""The kda block (Kimi Delta Attention): options and their one-line errors, the block against
its steps written out in float64, against transformers' Kimi Linear layer, cache bytes.
(Cache, padding and documents: the shared suites in tests/inference/test_cache.py and
tests/layers/test_documents.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from hybrid import HybridConfig, HybridLM
from hybrid.accounting import describe
from layers.ops.delta import gated_delta_naive


def block(d_model=32, **options):
    config = HybridConfig(["kda"], vocab_size=16, d_model=d_model, kda=options)
    return HybridLM(config).sublayers[0].block, config


def test_defaults_resolve():
    _, config = block(n_heads=2, head_k_dim=8, head_v_dim=4)
    options = config.layer_options[0]
    assert (options.n_v_heads, options.decay_rank, options.gate_rank) == (2, 8, 4)
    ours, _ = block(n_heads=2, head_k_dim=8, decay_rank=3, gate_rank=5)
    assert ours.in_proj.out_features == 3 * 16 + 2 + 3 + 5
    assert ours.f_b_proj.weight.shape == (16, 3) and ours.g_b_proj.weight.shape == (16, 5)
    assert ours.dt_bias.shape == (16,) and ours.A_log.shape == (2,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decay_rank": 0}, r"^kda\.decay_rank: must be a positive integer, got 0$"),
        ({"gate_rank": 1.5}, r"^kda\.gate_rank: must be an integer or null, got 1\.5$"),
        ({"n_heads": 2, "n_v_heads": 3}, r"^kda\.n_v_heads: must be a multiple of n_heads=2"),
        ({"head_k_dim": -1}, r"^kda\.head_k_dim: must be a positive integer"),
        ({"ranks": 2}, r"^kda"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        block(**options)


def written_out(ours, x, beta_scale=1.0):
    """The block's steps in float64 from its weights: conv, fla's l2norm, the per-channel
    decay, the recurrence (float64 token by token), the sigmoid-gated per-head norm."""
    opts = ours.options
    length, dk, dv = x.shape[1], opts.head_k_dim, opts.head_v_dim
    key, value = opts.n_heads * dk, opts.n_v_heads * dv
    qkv, b, f_a, g_a = ours.in_proj(x).split([2 * key + value, opts.n_v_heads,
                                              opts.decay_rank, opts.gate_rank], -1)  # fmt: skip
    w = ours.conv1d.weight[:, 0]
    padded = F.pad(qkv.transpose(1, 2), (opts.d_conv - 1, 0))
    conv = sum(w[:, i, None] * padded[..., i : i + length] for i in range(opts.d_conv))
    q, k, v = F.silu(conv).transpose(1, 2).split([key, key, value], -1)
    q, k = (rearrange(t, "b l (h d) -> b l h d", d=dk) for t in (q, k))
    q, k = (t / (t.square().sum(-1, keepdim=True) + 1e-6).sqrt() for t in (q, k))
    v = rearrange(v, "b l (h d) -> b l h d", d=dv)
    a = rearrange(ours.f_b_proj(f_a) + ours.dt_bias, "b l (h d) -> b l h d", d=dk)
    g = -ours.A_log.exp()[:, None] * torch.log1p(a.exp())  # softplus, written out
    o, _ = gated_delta_naive(q, k, v, g, beta_scale * b.sigmoid())
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + opts.norm_eps) * ours.norm.weight
    o = o * rearrange(ours.g_b_proj(g_a), "b l (h d) -> b l h d", d=dv).sigmoid()
    return ours.out_proj(rearrange(o, "b l h d -> b l (h d)"))


@pytest.mark.parametrize(
    "options",
    [
        {"n_heads": 2, "head_k_dim": 8, "chunk_size": 4},
        {"n_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 4, "chunk_size": 64,
         "decay_rank": 3, "gate_rank": 2, "allow_neg_eigval": True},
    ],
)  # fmt: skip
def test_block_matches_float64_written_out(options):
    torch.manual_seed(0)
    ours, _ = block(**options)
    ours = ours.double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    expected = written_out(ours, x, 2.0 if options.get("allow_neg_eigval") else 1.0)
    torch.testing.assert_close(ours(x), expected, rtol=1e-10, atol=1e-12)


def test_cache_bytes():
    config = HybridConfig(
        "K", vocab_size=16, d_model=32,
        kda={"n_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "head_v_dim": 4},
    )  # fmt: skip
    cache = HybridLM(config).allocate_cache(1, 100)
    conv_dim = 2 * 16 + 16
    assert cache.nbytes == conv_dim * 3 * 4 + 4 * 8 * 4 * 4
    assert describe(config, 10_000, torch.float32).cache_bytes == cache.nbytes  # fixed size


def hf_layer_and_ours():
    """transformers' KimiLinearDeltaAttention (random weights), its config, and our block with
    its weights."""
    from transformers import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

    torch.manual_seed(3)
    hf_config = KimiLinearConfig(
        hidden_size=32, num_hidden_layers=1, linear_num_heads=2, linear_head_dim=8,
        linear_conv_kernel_dim=4, rms_norm_eps=1e-5, layer_types=["linear_attention"],
        num_attention_heads=2, vocab_size=16,
    )  # fmt: skip
    theirs = KimiLinearDeltaAttention(hf_config, 0).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0, 0.3)
        theirs.forget_gate.A_log.uniform_(0, 2)
    ours, _ = block(n_heads=2, head_k_dim=8, norm_eps=1e-5)
    gate = theirs.forget_gate
    with torch.no_grad():
        ours.in_proj.weight.copy_(torch.cat([
            theirs.q_proj.weight, theirs.k_proj.weight, theirs.v_proj.weight,
            theirs.b_proj.weight, gate.f_a_proj.weight, theirs.g_a_proj.weight,
        ]))  # fmt: skip
        ours.conv1d.weight.copy_(theirs.conv1d.weight)
        ours.f_b_proj.weight.copy_(gate.f_b_proj.weight)
        ours.dt_bias.copy_(gate.dt_bias)
        ours.A_log.copy_(gate.A_log.flatten())
        ours.g_b_proj.weight.copy_(theirs.g_b_proj.weight)
        ours.norm.weight.copy_(theirs.o_norm.weight)
        ours.out_proj.weight.copy_(theirs.o_proj.weight)
    return theirs, hf_config, ours.eval()


def test_matches_transformers_kimi_linear_layer():
    """Prefill and one-token steps against transformers' torch path (its chunked prefill and
    its recurrent step), float32."""
    from transformers import DynamicCache

    theirs, hf_config, ours = hf_layer_and_ours()
    x = torch.randn(2, 70, 32)  # two chunks of theirs, a short last one
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
        # prefill 66 tokens into caches, then 4 steps
        hf_cache = DynamicCache(config=hf_config)
        cache = ours.allocate_cache(2, 70, torch.float32, x.device)
        theirs(x[:, :66], cache=hf_cache)
        ours(x[:, :66], cache=cache)
        for t in range(66, 70):
            step = ours(x[:, t : t + 1], cache=cache)
            torch.testing.assert_close(step, theirs(x[:, t : t + 1], cache=hf_cache))
            torch.testing.assert_close(step, expected[:, t : t + 1], rtol=1e-4, atol=1e-5)

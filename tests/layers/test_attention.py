"""Attention against an explicit float64 softmax(QK^T / sqrt(d) [- slope (i - j)]) V written
here."""

import math

import pytest
import torch

from hybrid import HybridConfig
from layers.attention import Attention, causal_attention
from layers.base import TokenContext


def softmax_attention_reference(q, k, v, window=None, slopes=None, scale=None):
    """q (b, h, lq, d), k/v (b, hkv, lk, d); queries are the last lq positions; ``slopes``
    (a list per query head): ALiBi's ``- slope * (query position - key position)``;
    ``scale``: the factor of q.k (None: 1 / sqrt(d))."""
    batch, heads, lq, dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            for i in range(lq):
                pos = lk - lq + i
                scores = []
                for j in range(lk):
                    visible = j <= pos and (window is None or j > pos - window)
                    factor = 1 / math.sqrt(dim) if scale is None else scale
                    score = (q[b, h, i] @ k[b, kv, j]).item() * factor
                    if slopes is not None:
                        score -= slopes[h] * (pos - j)
                    scores.append(score if visible else -math.inf)
                scores = torch.tensor(scores, dtype=q.dtype)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[b, h, i] = weights @ v[b, kv]
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("lq,lk", [(9, 9), (3, 9), (1, 9), (5, 5)])
@pytest.mark.parametrize("window", [None, 1, 3, 20])
def test_causal_attention_bottom_right(heads, kv_heads, lq, lk, window):
    torch.manual_seed(0)
    q = torch.randn(2, heads, lq, 8, dtype=torch.float64)
    k = torch.randn(2, kv_heads, lk, 8, dtype=torch.float64)
    v = torch.randn(2, kv_heads, lk, 8, dtype=torch.float64)
    expected = softmax_attention_reference(q, k, v, window)
    for block_size in (1, 2, 1024):
        got = causal_attention(q, k, v, window=window, block_size=block_size)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def rope_reference(x, theta, rotary_dim):
    """x (b, l, h, d): rotate pairs (i, i + rotary_dim/2) by pos * theta^(-2i/rotary_dim)."""
    out = x.clone()
    half = rotary_dim // 2
    for pos in range(x.shape[1]):
        for i in range(half):
            angle = pos * theta ** (-2 * i / rotary_dim)
            a, b = x[:, pos, :, i], x[:, pos, :, i + half]
            out[:, pos, :, i] = a * math.cos(angle) - b * math.sin(angle)
            out[:, pos, :, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def attention_block_reference(block, x):
    opts = block.options
    b, length, _ = x.shape
    q = (x @ block.q_proj.weight.T).view(b, length, opts.n_heads, opts.head_dim)
    k = (x @ block.k_proj.weight.T).view(b, length, opts.n_kv_heads, opts.head_dim)
    v = (x @ block.v_proj.weight.T).view(b, length, opts.n_kv_heads, opts.head_dim)
    if opts.qkv_bias:
        q = q + block.q_proj.bias.view(opts.n_heads, opts.head_dim)
        k = k + block.k_proj.bias.view(opts.n_kv_heads, opts.head_dim)
        v = v + block.v_proj.bias.view(opts.n_kv_heads, opts.head_dim)
    if opts.qk_norm:  # RMSNorm over each head, or over all heads of the projection together
        dims = (-1,) if opts.qk_norm_scope == "head" else (-2, -1)

        def rms(t, weight):
            scale = torch.rsqrt(t.square().mean(dims, keepdim=True) + opts.qk_norm_eps)
            return t * scale * weight.view(t.shape[-len(dims) :])

        q, k = rms(q, block.q_norm.weight), rms(k, block.k_norm.weight)
    if opts.rope:
        rotary_dim = int(opts.head_dim * opts.rope_fraction)
        q, k = (
            rope_reference(q, opts.rope_theta, rotary_dim),
            rope_reference(k, opts.rope_theta, rotary_dim),
        )
    slopes = None
    if opts.position == "alibi":  # the paper's slopes for 2, 4 or 8 heads: 2^(-8 h / n)
        slopes = [2.0 ** (-8 * (h + 1) / opts.n_heads) for h in range(opts.n_heads)]
    out = softmax_attention_reference(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        opts.window,
        slopes,
        opts.softmax_scale,
    )
    return out.transpose(1, 2).reshape(b, length, -1) @ block.o_proj.weight.T


@pytest.mark.parametrize(
    "options",
    [
        {"n_heads": 4},
        {"n_heads": 4, "n_kv_heads": 2, "rope_theta": 500.0},
        {"n_heads": 4, "n_kv_heads": 1, "window": 3},
        {"n_heads": 2, "rope": False, "qkv_bias": True},
        {"n_heads": 4, "n_kv_heads": 2, "rope_fraction": 0.5, "head_dim": 12},
        {"n_heads": 4, "position": "none"},
        {"n_heads": 4, "n_kv_heads": 2, "position": "alibi"},
        {"n_heads": 8, "n_kv_heads": 1, "position": "alibi", "window": 4, "head_dim": 4},
        {"n_heads": 2, "position": "alibi", "qkv_bias": True},
        {"n_heads": 4, "n_kv_heads": 2, "softmax_scale": 0.9},  # Granite's attention_multiplier
        {"n_heads": 4, "position": "alibi", "softmax_scale": 0.05},
        {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "qk_norm_eps": 1e-3},  # Qwen3
        {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "qk_norm_scope": "projection"},  # OLMo 2
    ],
)
def test_attention_block_matches_reference(options):
    torch.manual_seed(1)
    config = HybridConfig("*", vocab_size=8, d_model=32, attention=options)
    block = Attention(32, config.layer_options[0], 0).double()
    if options.get("qk_norm"):
        for norm in (block.q_norm, block.k_norm):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    if options.get("qkv_bias"):
        for proj in (block.q_proj, block.k_proj, block.v_proj):
            torch.nn.init.normal_(proj.bias)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(block(x), attention_block_reference(block, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("length", [3, 4, 9])
def test_fill_random_sets_the_slots_a_prefill_would(window, length):
    """KVCache.fill_random (decode benchmarks) leaves the ring in the state a real prefill of
    ``length`` tokens leaves it in, with random keys and values in the kept slots only."""
    config = HybridConfig("*", vocab_size=8, d_model=16, attention={"n_heads": 2, "window": window})
    block = Attention(16, config.layer_options[0], 0)
    filled, fed = (block.allocate_cache(2, 12, torch.float32, torch.device("cpu")) for _ in "ab")
    filled.fill_random(length, torch.Generator().manual_seed(0))
    context = TokenContext(start=0, positions=torch.arange(length).expand(2, -1))
    block(torch.randn(2, length, 16), cache=fed, context=context)
    assert torch.equal(filled.key_index, fed.key_index) and torch.equal(filled.valid, fed.valid)
    kept = filled.key_index >= 0  # (batch, capacity)
    for tensor in (filled.keys, filled.values):
        assert torch.equal(tensor.ne(0).any(-1).any(1), kept)


def test_bad_qk_norm_scope_fails_with_one_line():
    with pytest.raises(ValueError, match=r"^attention\.qk_norm_scope: must be one of head, "
                       r"projection; got 'heads'$"):  # fmt: skip
        HybridConfig("*", vocab_size=8, d_model=16, attention={"qk_norm_scope": "heads"})

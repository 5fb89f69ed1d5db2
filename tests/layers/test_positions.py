"""Position encodings: ALiBi's slopes and biases, the sinusoidal encoding, against the formulas
of their papers written here; each encoding with the cache (chunked prefill, decode, left
padding, the static decode step) exactly as RoPE; one-line errors."""

import math
import random

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from layers.attention import causal_attention
from layers.positions import alibi_slopes, sinusoidal_encoding
from tests.inference.test_cache import (
    BASE,
    WINDOWED,
    chunked_logits,
    left_pad,
    random_split,
    relative_error,
)
from tests.layers.test_attention import softmax_attention_reference

POSITIONS = ["rope", "none", "alibi", "sinusoidal"]


def test_alibi_slopes_are_the_papers():
    """Press et al.: for n heads (a power of two) the geometric sequence starting at
    2^(-8/n) with that ratio; otherwise the nearest lower power of two's slopes followed by
    every other slope of the next power of two."""
    assert alibi_slopes(8) == [2.0**-h for h in range(1, 9)]
    assert alibi_slopes(16) == pytest.approx([2.0 ** (-h / 2) for h in range(1, 17)])
    assert alibi_slopes(6) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    assert alibi_slopes(1) == [2.0**-8]


def test_alibi_slopes_match_bloom():
    """transformers' BLOOM builds ALiBi as slope * key position; its slopes are ours."""
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for heads in range(1, 13):
        alibi = bloom.build_alibi_tensor(torch.ones(1, 2), heads, torch.float64)  # (h, 1, 2)
        slopes = alibi[:, 0, 1].tolist()  # BLOOM computes them in float32
        assert slopes == pytest.approx(alibi_slopes(heads), rel=1e-6), heads


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("lq,lk", [(9, 9), (3, 9), (1, 9)])
@pytest.mark.parametrize("window", [None, 3])
def test_alibi_attention_matches_reference(heads, kv_heads, lq, lk, window):
    torch.manual_seed(0)
    q = torch.randn(2, heads, lq, 8, dtype=torch.float64)
    k = torch.randn(2, kv_heads, lk, 8, dtype=torch.float64)
    v = torch.randn(2, kv_heads, lk, 8, dtype=torch.float64)
    slopes = alibi_slopes(heads)
    expected = softmax_attention_reference(q, k, v, window, slopes)
    for block_size in (2, 1024):
        got = causal_attention(
            q, k, v, window=window, block_size=block_size,
            slopes=torch.tensor(slopes, dtype=torch.float64),
        )  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("width", [8, 7, 1])
def test_sinusoidal_encoding_formula(width):
    positions = torch.tensor([[0, 1, 5], [2, 40, 999]], dtype=torch.float64)
    got = sinusoidal_encoding(positions, width)
    assert got.shape == (2, 3, width) and got.dtype == torch.float64
    for row in range(2):
        for col in range(3):
            p = positions[row, col].item()
            for channel in range(width):
                angle = p / 10000.0 ** (2 * (channel // 2) / width)
                want = math.sin(angle) if channel % 2 == 0 else math.cos(angle)
                assert got[row, col, channel].item() == pytest.approx(want, abs=1e-12)


def test_sinusoidal_model_adds_the_encoding_to_scaled_embeddings():
    config = HybridConfig("*-*-", vocab_size=40, d_model=32, attention={"position": "sinusoidal"})
    assert config.absolute_position == "sinusoidal"
    model = HybridLM(config).double()
    assert all(block.rotary is None for block in model.blocks[0::2])
    ids = torch.randint(0, 40, (2, 9))
    explicit = model.embedding.weight[ids] * math.sqrt(32)
    explicit = explicit + sinusoidal_encoding(torch.arange(9, dtype=torch.float64), 32)
    torch.testing.assert_close(model.embed(ids, None), explicit, rtol=1e-12, atol=1e-12)
    plain = HybridLM(HybridConfig("*-*-", vocab_size=40, d_model=32))
    assert plain.config.absolute_position is None
    torch.testing.assert_close(plain.embed(ids, None), plain.embedding(ids))


def make_model(pattern, position, seed):
    torch.manual_seed(seed)
    attention = {**BASE["attention"], "position": position}
    return HybridLM(HybridConfig(pattern, **{**BASE, "attention": attention})).eval()


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("pattern", ["*", ["*", WINDOWED], "M-S*-E"], ids=["full", "window", "M"])
def test_positions_with_the_cache(position, pattern):
    """Chunked prefill + decode equal the full forward; a left-padded batch (in one call and
    in chunks) equals each sequence alone; left-padded prefill + decode equals alone."""
    model = make_model(pattern, position, seed=3)
    rng = random.Random(position)
    with torch.no_grad():
        for length in (1, 9, 25):
            ids = torch.randint(0, 40, (2, length))
            full = model(ids).logits
            for first in {1, length // 2 or 1, length}:
                got, _ = chunked_logits(model, ids, random_split(rng, length, first), 32)
                assert relative_error(got, full) < 1e-4, (length, first)
        gen = torch.Generator().manual_seed(1)
        sequences = [torch.randint(1, 40, (n,), generator=gen).tolist() for n in (13, 4, 1, 9)]
        ids, mask = left_pad(sequences)
        batched = model(ids, attention_mask=mask).logits
        chunked, _ = chunked_logits(model, ids, [5, 1, 7], attention_mask=mask)
        for row, seq in enumerate(sequences):
            alone = model(torch.tensor([seq])).logits[0]
            real = slice(ids.shape[1] - len(seq), None)
            assert relative_error(batched[row, real], alone) < 1e-4, row
            assert relative_error(chunked[row, real], alone) < 1e-4, row
        cache = model.allocate_cache(4, ids.shape[1] + 3)
        model(ids, cache=cache, attention_mask=mask)
        continuation = torch.randint(1, 40, (4, 3), generator=gen)
        decoded = torch.cat([model(continuation[:, i : i + 1], cache=cache).logits
                             for i in range(3)], dim=1)  # fmt: skip
        for row, seq in enumerate(sequences):
            alone = model(torch.tensor([seq + continuation[row].tolist()])).logits[0, -3:]
            assert relative_error(decoded[row], alone) < 1e-4, row


@pytest.mark.parametrize("position", POSITIONS)
def test_positions_in_the_eager_and_static_decode_steps(position):
    model = make_model(["M", WINDOWED, "*", "-"], position, seed=4)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]])
    steps = torch.randint(0, 40, (2, 8))  # wraps the window ring
    with torch.no_grad():
        caches = [model.allocate_cache(2, 20) for _ in range(3)]
        for cache in caches:
            model(ids, cache=cache, attention_mask=mask)
        forward, eager, static = caches
        for i in range(steps.shape[1]):
            expected = model(steps[:, i : i + 1], cache=forward).logits[:, -1]
            got_eager = model.decode_step(steps[:, i : i + 1], eager, eager.length)
            got_static = model.decode_step(steps[:, i : i + 1], static, torch.tensor(static.length))
            eager.advance(1, None)
            static.advance(1, None)
            assert relative_error(got_eager, expected) < 1e-5, i
            assert relative_error(got_static, expected) < 1e-5, i


@pytest.mark.parametrize(
    "options, message",
    [
        ({"attention": {"position": "relative"}},
         r"^attention\.position: must be one of rope, none, alibi, sinusoidal; got 'relative'$"),
        ({"attention": {"position": "rope", "rope": False}},
         r"^attention\.rope: false contradicts"),
        ({"attention": {"position": "alibi", "rope_scaling": {"rope_type": "linear", "factor": 2}}},
         r"^attention\.rope_scaling: scales RoPE; it needs position: rope, got 'alibi'$"),
        ({"attention": {"position": "sinusoidal"}, "layer_overrides": {2: {"position": "alibi"}}},
         r"^layers\[2\]\.attention\.position: is 'alibi' but layers\[0\] uses 'sinusoidal'"),
    ],
)  # fmt: skip
def test_bad_positions_fail_with_one_line(options, message):
    with pytest.raises(ValueError, match=message) as error:
        HybridConfig("*-*-", vocab_size=8, d_model=16, **options)
    assert "\n" not in str(error.value)

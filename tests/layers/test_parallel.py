"""Mixers side by side in one sublayer (``[*M]`` / ``{"block": "parallel", ...}``): the sum of
the inner mixers run alone, the pattern syntax and its errors, inner options, the cache
(saved and loaded), FLOPs. Cache, padding and documents: also the shared suites."""

from __future__ import annotations

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.accounting import describe
from hybrid.inference.cache_io import load_cache, save_cache
from hybrid.train.run import training_flops_per_token

SIZES = {
    "vocab_size": 40,
    "d_model": 32,
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
    "gated_deltanet": {"n_heads": 2, "head_k_dim": 8},
}


def config(pattern, **extra):
    return HybridConfig(pattern, **{**SIZES, **extra})


def test_output_is_the_multiplied_sum_of_the_mixers_alone():
    torch.manual_seed(0)
    built = config([{"block": "parallel", "mixers": ["attention", "mamba2", "gated_deltanet"],
                     "input_multipliers": [1.0, 0.5, 2.0],
                     "output_multipliers": [0.25, 1.0, -1.5]}])  # fmt: skip
    block = HybridLM(built).double().sublayers[0].block
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    attention, mamba, delta = block.mixers
    expected = 0.25 * attention(x) + mamba(0.5 * x) - 1.5 * delta(2.0 * x)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_bracket_syntax_and_list_form_build_the_same_layout():
    short = config("[*M]-")
    long = config([{"block": "parallel", "mixers": ["attention", "mamba2"]}, "mlp"])
    assert short.layers == long.layers == ["parallel", "mlp"]
    assert short.layer_options == long.layer_options
    assert short.pattern_string == "[*M]-"
    names = [name for name, _ in short.layer_options[0].mixers]
    assert names == ["attention", "mamba2"]


def test_inner_mixers_take_the_family_options_and_their_own_overrides():
    built = config([{"block": "parallel", "mixers": [
        {"block": "attention", "window": 4}, {"block": "mamba2", "d_state": 4}]}])  # fmt: skip
    (_, attention), (_, mamba) = built.layer_options[0].mixers
    assert attention.n_heads == 4 and attention.n_kv_heads == 2 and attention.window == 4
    assert mamba.d_state == 4 and mamba.headdim == 8


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("[*M", r"^pattern: '\[' is never closed with '\]'$"),
        ("*M]", r"^pattern\[2\]: '\]' without an opening '\['$"),
        ("[*[M]]", r"^pattern\[1\]: '\[' inside '\[\.\.\.\]': groups do not nest$"),
        ("[M]", r"^pattern\[1\]: '\[\.\.\.\]' needs at least two mixers side by side; got M$"),
        ("[*-]", r"^layers\[0\]\.parallel\.mixers\[1\]: 'mlp' is a feed-forward; only token"),
        ("[*Q]", r"^pattern\[1\]: unknown block"),
        ([{"block": "parallel", "mixers": ["attention", "parallel"]}],
         r"^layers\[0\]\.parallel\.mixers\[1\]: a parallel sublayer cannot hold another one$"),
        ([{"block": "parallel", "mixers": ["attention", "mamba2"], "output_multipliers": [1]}],
         r"^layers\[0\]\.parallel\.output_multipliers: needs one per mixer \(2\); got 1$"),
        ([{"block": "parallel", "mixers": ["attention", "mamba2"], "input_multipliers": "x"}],
         r"^layers\[0\]\.parallel\.input_multipliers: must be a list of numbers or null, got 'x'$"),
        ([{"block": "parallel", "mixers": [{"block": "mamba2", "d_stat": 4}, "attention"]}],
         r"^layers\[0\]\.parallel\.mixers\[0\]\.d_stat: unknown option; did you mean 'd_state'"),
        ("P", r"^layers\[0\]\.parallel\.mixers: needs at least two mixers side by side"),
    ],
)  # fmt: skip
def test_bad_parallel_sublayers(pattern, message):
    with pytest.raises(ValueError, match=message):
        config(pattern)


def test_cache_entries_per_mixer_saved_and_loaded(tmp_path):
    torch.manual_seed(1)
    model = HybridLM(config("[*M]-[MD]")).eval()
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        cache = model.allocate_cache(2, 16)
        model(ids[:, :8], cache=cache)
        save_cache(cache, tmp_path / "cache.safetensors")
        restored = load_cache(model, tmp_path / "cache.safetensors")
        expected = model(ids[:, 8:], cache=cache).logits
        got = model(ids[:, 8:], cache=restored).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert [len(entry.parts) for entry in cache.entries if entry is not None] == [2, 2]
    one = model.allocate_cache(1, 16)
    assert one.nbytes == describe(model.config, 16, torch.float32).cache_bytes


def test_flops_count_the_attention_inside():
    inside = training_flops_per_token(config("[*M]-"), 1024)
    alone = training_flops_per_token(config("*M-"), 1024)
    # the same blocks and attention products; one pre-norm (d_model weights) fewer
    assert inside == alone - 6 * 32

"""The pattern language: symbol strings, lists, Jamba periods, Megatron ratios."""

import random

import pytest

from hybrid import (
    HybridConfig,
    parse_pattern,
    pattern_from_periods,
    pattern_from_ratios,
    pattern_string,
    periods_from_pattern,
    ratios_from_pattern,
)

MAMBA2_HYBRID_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"


def test_symbols_mean_the_megatron_blocks():
    config = HybridConfig("M-M*-ME", vocab_size=16, d_model=64)
    assert config.layers == ["mamba2", "mlp", "mamba2", "attention", "mlp", "mamba2", "moe"]


def test_mamba1_symbol_and_separators_are_ignored():
    assert [name for name, _ in parse_pattern("S- | *E\n")] == ["mamba1", "mlp", "attention", "moe"]


def test_jamba_block_from_periods_exactly():
    # Jamba: 8 layers, attention at period 8 offset 4, MoE at period 2 offset 1, Mamba-1 mixers.
    pattern = pattern_from_periods(8, 8, 4, 2, 1, mixer="mamba1")
    expected = []
    for layer in range(8):
        expected.append("attention" if layer == 4 else "mamba1")
        expected.append("moe" if layer % 2 == 1 else "mlp")
    assert [name for name, _ in parse_pattern(pattern)] == expected
    assert pattern == "S-SES-SE*-SES-SE"


def test_mamba2_hybrid_8b_from_ratios_exactly():
    assert pattern_from_ratios(56, attention=0.08, mlp=0.5) == MAMBA2_HYBRID_8B


def test_ratio_allocation_starts_and_ends_with_mamba():
    for n in range(10, 60):
        pattern = pattern_from_ratios(n, attention=0.1, mlp=0.0)
        assert pattern[0] == "M" and pattern[-1] == "M", pattern
        assert pattern.count("*") == round(n * 0.1)


def test_list_form_with_overrides_resolves_per_layer():
    config = HybridConfig(
        ["mamba2", {"block": "attention", "window": 8}, ("attention", {"n_kv_heads": 1}), "-"],
        vocab_size=16,
        d_model=64,
        attention={"n_heads": 4},
        mamba2={"d_state": 16, "headdim": 16},
    )
    assert config.layers == ["mamba2", "attention", "attention", "mlp"]
    assert config.layer_options[1].window == 8 and config.layer_options[1].n_kv_heads == 4
    assert config.layer_options[2].window is None and config.layer_options[2].n_kv_heads == 1


def test_layer_overrides_field():
    config = HybridConfig(
        "M*M*",
        vocab_size=16,
        d_model=64,
        mamba2={"headdim": 16},
        layer_overrides={3: {"window": 4}},
    )
    assert [o.window for o in config.layer_options[1::2]] == [None, 4]


def test_round_trip_string_list():
    rng = random.Random(0)
    for _ in range(50):
        pattern = "".join(rng.choice("MS*-E") for _ in range(rng.randint(1, 30)))
        names = [name for name, _ in parse_pattern(pattern)]
        assert pattern_string(names) == pattern
        assert [name for name, _ in parse_pattern(names)] == names


def test_round_trip_periods():
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(1, 24)
        attn_period = rng.choice([None, *range(1, n + 1)])
        attn_offset = rng.randrange(attn_period) if attn_period else 0
        expert_period = rng.choice([None, *range(1, n + 1)])
        expert_offset = rng.randrange(expert_period) if expert_period else 0
        mixer = rng.choice(["mamba1", "mamba2"])
        pattern = pattern_from_periods(
            n, attn_period, attn_offset, expert_period, expert_offset, mixer=mixer
        )
        assert pattern_from_periods(**periods_from_pattern(pattern)) == pattern


def test_round_trip_ratios():
    for n in range(1, 64):
        for attention in (0.0, 0.08, 0.125, 0.25):
            for mlp in (0.0, 0.3, 0.5):
                try:
                    pattern = pattern_from_ratios(n, attention=attention, mlp=mlp)
                except ValueError:
                    continue
                assert pattern_from_ratios(**ratios_from_pattern(pattern)) == pattern
    assert ratios_from_pattern(MAMBA2_HYBRID_8B)["n_sublayers"] == 56


def test_non_periodic_and_non_megatron_patterns_are_refused():
    with pytest.raises(ValueError, match="not periodic"):
        periods_from_pattern("*-S-S-*-*-")
    with pytest.raises(ValueError, match="not a Megatron ratio allocation"):
        ratios_from_pattern("*MMM")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: parse_pattern(""), "pattern"),
        (lambda: parse_pattern("M-?"), "pattern[2]"),
        (lambda: parse_pattern(["mamba2", "mamba3"]), "pattern[1]"),
        (lambda: parse_pattern([{"window": 3}]), "pattern[0]"),
        (lambda: pattern_from_periods(8, 0, 0), "attn_layer_period"),
        (lambda: pattern_from_periods(8, 4, 4), "attn_layer_offset"),
        (lambda: pattern_from_periods(8, 8, 4, mixer="mlp"), "mixer"),
        (lambda: pattern_from_ratios(10, attention=0.6, mlp=0.6), "attention, mlp"),
        (lambda: pattern_from_ratios(10, attention=0.01), "attention"),
        (lambda: pattern_from_ratios(10, mlp=1.5), "mlp"),
        (lambda: pattern_from_ratios(0), "n_sublayers"),
    ],
)
def test_bad_patterns_fail_with_one_line_naming_the_field(call, field):
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert message.startswith(field + ":") and "\n" not in message


def test_unknown_symbol_lists_the_known_blocks():
    with pytest.raises(ValueError) as error:
        parse_pattern("MQ")
    for listed in ("M=mamba2", "*=attention", "-=mlp", "E=moe", "S=mamba1"):
        assert listed in str(error.value)

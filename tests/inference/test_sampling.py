"""Token selection: each rule against a plain per-row reference written here in numpy / Python."""

import math

import numpy as np
import pytest
import torch

from hybrid.inference.sampling import (
    SamplingConfig,
    apply_penalties,
    count_tokens,
    filter_logits,
    probabilities,
    sample,
    update_counts,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def np_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    finite = np.isfinite(row)
    out = np.zeros_like(row)
    exp = np.exp(row[finite] - row[finite].max())
    out[finite] = exp / exp.sum()
    return out


def kept(logits):
    """Boolean numpy mask of the tokens filter_logits left."""
    return torch.isfinite(logits).numpy()


def random_logits(batch=4, vocab=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=generator) * 2


# --- reference filters, one row at a time ---------------------------------------------------


def ref_top_k(row, k):
    order = sorted(range(len(row)), key=lambda i: -row[i])
    mask = np.zeros(len(row), dtype=bool)
    mask[order[:k]] = True
    return mask


def ref_top_p(probs, p):
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    mask = np.zeros(len(probs), dtype=bool)
    total = 0.0
    for i in order:
        mask[i] = True
        total += probs[i]
        if total >= p:
            break
    return mask


def ref_min_p(probs, min_p):
    return probs >= min_p * max(probs)


def masked(row, mask):
    return np.where(mask, row, -np.inf)


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature: must be >= 0; got -1.0"),
        ({"temperature": math.inf}, "temperature: must be finite"),
        ({"temperature": "hot"}, "temperature: must be a number"),
        ({"top_k": -3}, "top_k: must be >= 0; got -3"),
        ({"top_k": 2.5}, "top_k: must be an integer"),
        ({"top_k": True}, "top_k: must be an integer"),
        ({"top_p": 0}, "top_p: must be in (0, 1]; got 0"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1]"),
        ({"top_p": math.nan}, "top_p: must be in (0, 1]"),
        ({"min_p": -0.1}, "min_p: must be in [0, 1]"),
        ({"min_p": 1.1}, "min_p: must be in [0, 1]"),
        ({"repetition_penalty": 0}, "repetition_penalty: must be > 0"),
        ({"repetition_penalty": -1.2}, "repetition_penalty: must be > 0"),
        ({"presence_penalty": math.nan}, "presence_penalty: must be finite"),
        ({"frequency_penalty": math.inf}, "frequency_penalty: must be finite"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError) as error:
        SamplingConfig(**kwargs)
    assert str(error.value).startswith(message)


def test_defaults_are_valid_and_greedy_means_temperature_zero():
    assert not SamplingConfig().greedy
    assert SamplingConfig(temperature=0).greedy
    assert SamplingConfig(top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=0.5).top_p == 1.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"^logits:"):
        sample(torch.zeros(5), SamplingConfig())
    with pytest.raises(ValueError, match=r"^token_counts:"):
        apply_penalties(torch.zeros(2, 5), torch.zeros(2, 4, dtype=torch.long), SamplingConfig())


# --- greedy and temperature -----------------------------------------------------------------


def test_greedy_is_argmax_and_probabilities_one_hot():
    logits = random_logits(batch=6, vocab=40)
    config = SamplingConfig(temperature=0, top_k=3, top_p=0.5, min_p=0.2)
    expected = [max(range(40), key=lambda i, row=row: row[i]) for row in logits.tolist()]
    assert sample(logits, config).tolist() == expected
    probs = probabilities(logits, config)
    assert torch.equal(probs, torch.nn.functional.one_hot(torch.tensor(expected), 40).float())


def test_greedy_uses_penalised_logits():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    counts = torch.tensor([[1, 0, 0]])
    config = SamplingConfig(temperature=0, repetition_penalty=1.5)
    assert sample(logits, config).item() == 0
    assert sample(logits, config, token_counts=counts).item() == 1
    assert probabilities(logits, config, counts)[0].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_scales_logits(temperature):
    logits = random_logits()
    probs = probabilities(logits, SamplingConfig(temperature=temperature))
    for row, got in zip(logits.tolist(), probs, strict=True):
        expected = np_softmax(np.array(row) / temperature)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


# --- filters --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7, 29, 30, 100])
def test_top_k_keeps_exactly_k(k):
    logits = random_logits()
    out = filter_logits(logits, SamplingConfig(top_k=k))
    for row, got in zip(logits.tolist(), kept(out), strict=True):
        np.testing.assert_array_equal(got, ref_top_k(row, k))
        assert got.sum() == min(k, 30)
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], logits[finite])


def test_top_k_keeps_ties_with_the_kth():
    logits = torch.tensor([[5.0, 1.0, 3.0, 3.0, 0.0]])
    assert kept(filter_logits(logits, SamplingConfig(top_k=2)))[0].tolist() == [
        True,
        False,
        True,
        True,
        False,
    ]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_keeps_smallest_prefix_reaching_p(p):
    logits = random_logits(batch=8)
    out = filter_logits(logits, SamplingConfig(top_p=p))
    for row, got in zip(logits.tolist(), kept(out), strict=True):
        np.testing.assert_array_equal(got, ref_top_p(np_softmax(row), p))


def test_top_p_includes_the_token_that_crosses_p():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    for p, n in [(0.4, 1), (0.75, 2), (0.85, 3)]:
        assert kept(filter_logits(logits, SamplingConfig(top_p=p)))[0].sum() == n


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.5, 0.9])
def test_min_p_is_relative_to_the_max_probability(min_p):
    # The first logit is the smallest, so a threshold taken from it (mamba_ssm's bug) differs.
    logits = torch.tensor([[-2.0, 3.0, 2.5, 1.0, 0.0, -1.0, 2.9]])
    out = filter_logits(logits, SamplingConfig(min_p=min_p))
    probs = np_softmax(logits[0].tolist())
    expected = ref_min_p(probs, min_p)
    np.testing.assert_array_equal(kept(out)[0], expected)
    first_logit_threshold = logits[0].numpy() >= min_p * logits[0, 0].item()
    first_prob_threshold = probs >= min_p * probs[0]
    assert not np.array_equal(expected, first_logit_threshold)
    assert not np.array_equal(expected, first_prob_threshold)


def test_min_p_on_random_batch():
    logits = random_logits(batch=8)
    out = filter_logits(logits, SamplingConfig(min_p=0.1))
    for row, got in zip(logits.tolist(), kept(out), strict=True):
        np.testing.assert_array_equal(got, ref_min_p(np_softmax(row), 0.1))


def filter_in_order(row, order, temperature, top_k, top_p, min_p):
    """Apply the steps named by ``order`` ("t", "k", "p", "m") one after another."""
    row = np.array(row, dtype=np.float64)
    for step in order:
        if step == "t":
            row = row / temperature
        elif step == "k":
            row = masked(row, ref_top_k(row.tolist(), top_k))
        elif step == "p":
            row = masked(row, ref_top_p(np_softmax(row), top_p))
        else:
            row = masked(row, ref_min_p(np_softmax(row), min_p))
    return row


def test_filters_compose_in_order_temperature_top_k_top_p_min_p():
    row = [1.4, 1.3, 0.8, 0.2, -0.1, -0.4, -0.5, -1.4]
    params = (2.0, 6, 0.6, 0.5)
    got = filter_logits(
        torch.tensor([row]), SamplingConfig(temperature=2.0, top_k=6, top_p=0.6, min_p=0.5)
    )[0].numpy()
    expected = filter_in_order(row, "tkpm", *params)
    assert np.isfinite(expected).tolist() == [True] * 3 + [False] * 5
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
    finite = np.isfinite(got)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6)
    # The case tells the orders apart: each other order keeps a different set.
    for other in ("tpkm", "tkmp", "kpmt"):
        assert not np.array_equal(np.isfinite(filter_in_order(row, other, *params)), finite)


def test_filters_compose_on_random_batch():
    logits = random_logits(batch=16, vocab=50, seed=3)
    config = SamplingConfig(temperature=1.3, top_k=20, top_p=0.8, min_p=0.05)
    out = filter_logits(logits, config)
    for row, got in zip(logits.tolist(), kept(out), strict=True):
        expected = filter_in_order(row, "tkpm", 1.3, 20, 0.8, 0.05)
        np.testing.assert_array_equal(got, np.isfinite(expected))


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(top_p=1e-9),
        SamplingConfig(min_p=1.0),
        SamplingConfig(top_k=1),
        SamplingConfig(temperature=1e-3, top_k=1, top_p=1e-9, min_p=1.0),
    ],
)
def test_the_argmax_is_always_kept(config):
    logits = random_logits(batch=8, vocab=50)
    out = kept(filter_logits(logits, config))
    argmax = logits.argmax(dim=-1)
    assert out.sum(axis=1).tolist() == [1] * 8
    assert out[np.arange(8), argmax.numpy()].all()


def test_min_p_one_keeps_tied_maxima():
    logits = torch.tensor([[1.0, 4.0, 4.0, 2.0]])
    assert kept(filter_logits(logits, SamplingConfig(min_p=1.0)))[0].tolist() == [
        False,
        True,
        True,
        False,
    ]


# --- penalties ------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0, 3.0]])
    counts = torch.tensor([[1, 1, 0, 0, 3, 2]])
    out = apply_penalties(logits, counts, SamplingConfig(repetition_penalty=2.0))
    assert out[0].tolist() == [1.0, -4.0, 2.0, -2.0, 0.0, 1.5]
    # Below 1 it rewards repetition, by the same rule.
    out = apply_penalties(logits, counts, SamplingConfig(repetition_penalty=0.5))
    assert out[0].tolist() == [4.0, -1.0, 2.0, -2.0, 0.0, 6.0]


def test_presence_and_frequency_penalties():
    logits = random_logits(batch=3, vocab=10)
    counts = torch.randint(0, 4, (3, 10), generator=torch.Generator().manual_seed(1))
    config = SamplingConfig(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, counts, config)
    for b in range(3):
        for v in range(10):
            logit, count = logits[b, v].item(), counts[b, v].item()
            if count > 0:
                logit = logit / 1.3 if logit > 0 else logit * 1.3
                logit -= 0.5 + 0.25 * count
            assert out[b, v].item() == pytest.approx(logit, rel=1e-6, abs=1e-6)


def test_no_counts_or_neutral_config_leaves_logits_unchanged():
    logits = random_logits()
    counts = torch.ones_like(logits, dtype=torch.long)
    assert torch.equal(apply_penalties(logits, None, SamplingConfig(presence_penalty=1.0)), logits)
    assert torch.equal(apply_penalties(logits, counts, SamplingConfig()), logits)


def test_update_counts_and_count_tokens():
    counts = torch.zeros(3, 5, dtype=torch.long)
    tokens = torch.tensor([4, 0, 4])
    new = update_counts(update_counts(counts, tokens), torch.tensor([4, 1, 2]))
    assert counts.sum() == 0
    assert new.tolist() == [[0, 0, 0, 0, 2], [1, 1, 0, 0, 0], [0, 0, 1, 0, 1]]
    ids = torch.tensor([[1, 1, 3, 0], [2, 2, 2, 4]])
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    expected = np.zeros((2, 5), dtype=np.int64)
    for b, row in enumerate(ids.tolist()):
        for t, token in enumerate(row):
            expected[b, token] += int(mask[b, t])
    np.testing.assert_array_equal(count_tokens(ids, 5, mask).numpy(), expected)
    assert count_tokens(ids, 5).sum(dim=1).tolist() == [4, 4]


# --- the distribution and sampling ----------------------------------------------------------

FULL = SamplingConfig(
    temperature=0.8, top_k=5, top_p=0.95, min_p=0.02, repetition_penalty=1.2, presence_penalty=0.1
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probabilities_sum_to_one_and_vanish_exactly_where_filtered(dtype):
    logits = random_logits(batch=8, vocab=50).to(dtype)
    counts = torch.randint(0, 2, (8, 50), generator=torch.Generator().manual_seed(2))
    probs = probabilities(logits, FULL, counts)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(8))
    filtered = ~torch.isfinite(filter_logits(apply_penalties(logits, counts, FULL), FULL))
    assert filtered.any()
    assert torch.equal(probs == 0, filtered)
    # bfloat16 logits are computed in float32: the same as upcasting first.
    assert torch.equal(probs, probabilities(logits.float(), FULL, counts))


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_reproducible(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    logits = random_logits(batch=64, vocab=100).to(device)

    def draw(seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return torch.stack([sample(logits, FULL, generator) for _ in range(5)])

    first = draw(1234)
    assert first.dtype == torch.int64 and first.shape == (5, 64)
    assert torch.equal(first, draw(1234))
    assert not torch.equal(first, draw(4321))


@pytest.mark.parametrize("device", DEVICES)
def test_empirical_distribution_matches_probabilities(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    draws = 20000
    logits = torch.tensor([[1.0, 2.0, 0.5, -3.0, 1.5, 0.2]], device=device)
    counts = torch.tensor([[0, 1, 0, 0, 2, 0]], device=device)
    config = SamplingConfig(
        temperature=1.2, top_k=5, top_p=0.97, repetition_penalty=1.1, frequency_penalty=0.2
    )
    expected = probabilities(logits, config, counts)[0].cpu().numpy()
    assert (expected == 0).sum() >= 1 and (expected > 0).sum() >= 4
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = sample(logits.expand(draws, -1), config, generator, counts.expand(draws, -1))
    empirical = np.bincount(tokens.cpu().numpy(), minlength=6) / draws
    assert np.abs(empirical - expected).max() < 0.02
    assert (empirical[expected == 0] == 0).all()

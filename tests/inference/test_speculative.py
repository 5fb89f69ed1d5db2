"""Speculative decoding with SSM state: greedy equals the target's greedy output token for
token; sampling reproduces the target's distribution; cache checkpoint / rollback."""

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.inference.speculative import speculative_generate

SHARED = {
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
    "mamba1": {"d_state": 4},
    "attention": {"n_heads": 2},
    "kda": {"n_heads": 2, "head_k_dim": 8, "chunk_size": 4},
    "latent_attention": {"n_heads": 2, "kv_lora_rank": 8},
    "moe": {"n_experts": 4, "expert_hidden_size": 16},
}


def build(pattern, vocab=20, d_model=16, seed=0):
    torch.manual_seed(seed)
    return HybridLM(HybridConfig(pattern, vocab_size=vocab, d_model=d_model, **SHARED)).eval()


TARGET_PATTERN = ["M", {"block": "attention", "window": 4}, "S", "*", "E"]


@pytest.mark.parametrize("draft_pattern", ["M", "S-", "*", "K-", "L-"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_token_for_token_the_targets(draft_pattern, k):
    target = build(TARGET_PATTERN, d_model=32)
    draft = build(draft_pattern, seed=1)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    expected = target.generate(prompt, 20)
    result = speculative_generate(target, draft, prompt, 20, num_draft_tokens=k)
    assert torch.equal(result.tokens, expected)
    assert result.new_tokens == 20 and 0 <= result.accepted <= result.drafted


def test_target_as_its_own_draft_accepts_everything():
    target = build(TARGET_PATTERN, d_model=32)
    result = speculative_generate(target, target, torch.tensor([[2, 7]]), 17, num_draft_tokens=4)
    assert result.acceptance_rate == 1.0
    assert result.rounds == 4  # 5 tokens a round (4 drafts + 1 free), the last round shorter
    assert torch.equal(result.tokens, target.generate(torch.tensor([[2, 7]]), 17))


def test_sampling_follows_the_target_distribution():
    vocab = 3
    target = build(TARGET_PATTERN, vocab=vocab, d_model=32, seed=3)
    draft = build("M", vocab=vocab, seed=4)
    prompt = [1, 2, 0]
    # Exact target probabilities of the first two new tokens, from full forwards.
    with torch.no_grad():
        first = torch.softmax(target(torch.tensor([prompt])).logits[0, -1], -1)
        joint = torch.zeros(vocab, vocab)
        for a in range(vocab):
            second = torch.softmax(target(torch.tensor([[*prompt, a]])).logits[0, -1], -1)
            joint[a] = first[a] * second
    runs = 800
    counts = torch.zeros(vocab, vocab)
    accepted = drafted = 0
    for run in range(runs):
        result = speculative_generate(
            target, draft, torch.tensor([prompt]), 3, num_draft_tokens=2, temperature=1.0, seed=run
        )
        a, b = result.tokens[0, 3:5].tolist()
        counts[a, b] += 1
        accepted, drafted = accepted + result.accepted, drafted + result.drafted
    expected = joint * runs
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 26.1, chi_square  # 8 degrees of freedom, p = 0.001
    assert 0 < accepted < drafted  # both branches of the acceptance rule ran


@pytest.mark.parametrize(
    "pattern", [TARGET_PATTERN, ["K", {"block": "latent_attention", "window": 4}, "L", "D"]]
)
def test_checkpoint_and_rollback_restore_every_layer_type(pattern):
    model = build(pattern, d_model=32)
    ids = torch.randint(0, 20, (2, 14))
    with torch.no_grad():
        cache = model.allocate_cache(2, 20)
        model(ids[:, :8], cache=cache)
        saved = cache.checkpoint()
        model(torch.randint(0, 20, (2, 5)), cache=cache)  # tokens to forget (ring wraps)
        cache.rollback(saved)
        assert cache.length == 8
        got = model(ids[:, 8:], cache=cache).logits
        expected = model(ids).logits[:, 8:]
    assert ((got - expected).norm() / expected.norm()) < 1e-4


def test_bad_speculative_arguments():
    target = build("M*")
    with pytest.raises(ValueError, match=r"^draft: vocabulary size 30 differs"):
        speculative_generate(target, build("M", vocab=30), torch.tensor([[1]]), 3)
    with pytest.raises(ValueError, match=r"^input_ids: speculative decoding takes one prompt"):
        speculative_generate(target, target, torch.tensor([[1], [2]]), 3)
    with pytest.raises(ValueError, match=r"^num_draft_tokens"):
        speculative_generate(target, target, torch.tensor([[1]]), 3, num_draft_tokens=0)
    with pytest.raises(ValueError, match=r"^temperature"):
        speculative_generate(target, target, torch.tensor([[1]]), 3, temperature=-1.0)

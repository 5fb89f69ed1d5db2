"""MoE against a per-token loop over the chosen experts (every forward path: grouped, per-token
decode, dense static decode); aux losses against their formulas."""

import math

import pytest
import torch

from hybrid import HybridConfig
from layers.moe import MoE


def expert_reference(experts, e, token):
    up = experts.up_proj[e] @ token
    if experts.gated:
        gate = experts.gate_proj[e] @ token
        inner = gate * torch.sigmoid(gate) * up
    else:
        inner = torch.clamp(up, min=0) ** 2
    return experts.down_proj[e] @ inner


def moe_reference(block, x):
    """Loop over tokens; for each, score experts, pick top-k, sum weighted expert outputs."""
    opts = block.options
    tokens = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(tokens)
    chosen = []
    for t, token in enumerate(tokens):
        logits = block.router.weight @ token
        if opts.router == "softmax":
            scores = torch.exp(logits - logits.max())
            scores = scores / scores.sum()
        else:
            scores = 1 / (1 + torch.exp(-logits))
        choice = scores + (block.score_bias if block.score_bias is not None else 0)
        eligible = list(range(opts.n_experts))
        if opts.n_groups > 1:
            size = opts.n_experts // opts.n_groups
            group_scores = [
                sorted(choice[g * size : (g + 1) * size].tolist())[-2:]
                for g in range(opts.n_groups)
            ]
            best = sorted(range(opts.n_groups), key=lambda g: -sum(group_scores[g]))[
                : opts.topk_groups
            ]
            eligible = [e for e in eligible if e // size in best]
        top = sorted(eligible, key=lambda e: -choice[e].item())[: opts.top_k]
        weights = [scores[e] for e in top]
        if opts.normalize_top_k:
            total = sum(weights)
            weights = [w / total for w in weights]
        for e, w in zip(top, weights, strict=True):
            out[t] += w * opts.routed_scaling * expert_reference(block.experts, e, token)
        if block.shared is not None:
            shared = block.shared(token[None])[0]
            if block.shared_gate is not None:
                shared = shared / (1 + torch.exp(-(block.shared_gate.weight[0] @ token)))
            out[t] += shared
        chosen.append(top)
    return out.view_as(x), chosen


CASES = [
    {"n_experts": 4, "top_k": 2},
    {"n_experts": 4, "top_k": 2, "normalize_top_k": False},
    {"n_experts": 8, "top_k": 1, "n_shared_experts": 1},
    {
        "n_experts": 8,
        "top_k": 3,
        "router": "sigmoid",
        "routed_scaling": 2.5,
        "activation": "relu2",
        "score_correction_bias": True,
        "n_groups": 4,
        "topk_groups": 2,
        "n_shared_experts": 2,
    },
    # Qwen3-Next's: softmax top-k, a shared expert of its own width behind a sigmoid gate
    {"n_experts": 8, "top_k": 2, "n_shared_experts": 1, "shared_hidden_size": 20,
     "shared_gate": True},
    {"n_experts": 4, "top_k": 3, "normalize_top_k": False, "n_shared_experts": 1,
     "shared_gate": True},
]  # fmt: skip


def random_block(options: dict, seed: int) -> MoE:
    """A float64 MoE block of ``options`` (experts 24 wide) with a unit-scale router, a random
    correction bias and a shared-expert gate large enough to matter."""
    torch.manual_seed(seed)
    config = HybridConfig("E", vocab_size=8, d_model=16, moe={**options, "expert_hidden_size": 24})
    block = MoE(16, config.layer_options[0], 0).double()
    torch.nn.init.normal_(block.router.weight)
    if block.score_bias is not None:
        block.score_bias.normal_()
    if block.shared_gate is not None:
        torch.nn.init.normal_(block.shared_gate.weight, std=0.5)
    return block


@pytest.mark.parametrize("options", CASES)
def test_moe_matches_per_token_loop(options):
    block = random_block(options, seed=0)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    out = block(x)
    expected, chosen = moe_reference(block, x)
    torch.testing.assert_close(out.hidden, expected)
    with torch.no_grad():  # in-place activations
        torch.testing.assert_close(block(x).hidden, expected)
    counts = torch.zeros(options["n_experts"], dtype=torch.long)
    for top in chosen:
        counts[top] += 1
    assert torch.equal(out.stats["tokens_per_expert"], counts)
    assert counts.sum() == 21 * options["top_k"]  # no token dropped


def test_aux_losses_match_their_formulas():
    torch.manual_seed(2)
    config = HybridConfig(
        "E",
        vocab_size=8,
        d_model=16,
        moe={"n_experts": 4, "top_k": 2, "aux_loss_weight": 0.3, "z_loss_weight": 0.7},
    )
    block = MoE(16, config.layer_options[0], 0).double()
    torch.nn.init.normal_(block.router.weight)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out = block(x)
    tokens = x.reshape(-1, 16)
    n, experts, k = tokens.shape[0], 4, 2
    load_balance, z_loss = 0.0, 0.0
    mean_prob = [0.0] * experts
    routed = [0] * experts
    for token in tokens:
        logits = (block.router.weight @ token).tolist()
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        z_loss += lse**2 / n
        probs = [math.exp(v - lse) for v in logits]
        for e in range(experts):
            mean_prob[e] += probs[e] / n
        for e in sorted(range(experts), key=lambda e: -probs[e])[:k]:
            routed[e] += 1
    load_balance = experts * sum(routed[e] / (n * k) * mean_prob[e] for e in range(experts))
    assert out.stats["load_balance_loss"].item() == pytest.approx(load_balance, rel=1e-10)
    assert out.stats["z_loss"].item() == pytest.approx(z_loss, rel=1e-10)
    assert out.aux_loss.item() == pytest.approx(0.3 * load_balance + 0.7 * z_loss, rel=1e-10)


def test_aux_loss_has_gradient_to_the_router():
    config = HybridConfig("E", vocab_size=8, d_model=16, moe={"n_experts": 4})
    block = MoE(16, config.layer_options[0], 0)
    block(torch.randn(2, 5, 16)).aux_loss.backward()
    assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0


def test_active_parameters_count_top_k_experts():
    config = HybridConfig(
        "E",
        vocab_size=8,
        d_model=16,
        moe={"n_experts": 8, "top_k": 2, "expert_hidden_size": 32, "n_shared_experts": 1},
    )
    block = MoE(16, config.layer_options[0], 0)
    per_expert = 3 * 16 * 32
    shared = 3 * 16 * 32
    router = 16 * 8
    assert sum(p.numel() for p in block.parameters()) == router + 8 * per_expert + shared
    assert block.active_parameters() == router + 2 * per_expert + shared


@pytest.mark.parametrize("options", CASES)
def test_decode_paths_match_per_token_loop(options):
    """A decode step of at most top_k rows runs each token's experts directly; more rows run
    the grouped path without statistics."""
    from layers.base import TokenContext

    block = random_block(options, seed=3)
    for rows in (1, options["top_k"], options["top_k"] + 2):
        x = torch.randn(rows, 1, 16, dtype=torch.float64)
        decoding = TokenContext(start=5, positions=torch.zeros(rows, 1), decoding=True)
        expected, _ = moe_reference(block, x)
        torch.testing.assert_close(block(x, context=decoding), expected)


def test_shared_gate_parameters_are_counted_active():
    options = {"n_experts": 8, "top_k": 2, "expert_hidden_size": 32, "n_shared_experts": 1}
    config = HybridConfig("E", vocab_size=8, d_model=16, moe={**options, "shared_gate": True})
    block = MoE(16, config.layer_options[0], 0)
    assert block.shared_gate.weight.shape == (1, 16)
    ungated = MoE(16, HybridConfig("E", d_model=16, moe=options).layer_options[0], 0)
    assert ungated.shared_gate is None
    assert block.active_parameters() == ungated.active_parameters() + 16


@pytest.mark.parametrize(
    "options, message",
    [
        ({"shared_gate": True}, "needs n_shared_experts >= 1"),
        ({"n_shared_experts": 1, "shared_gate": 1}, "must be true or false"),
    ],
)
def test_shared_gate_is_validated(options, message):
    with pytest.raises(ValueError, match=f"moe.shared_gate: .*{message}"):
        HybridConfig("E", d_model=16, moe=options)


@pytest.mark.parametrize("options", CASES)
def test_dense_decode_path_equals_grouped_path(options):
    from layers.base import TokenContext

    block = random_block(options, seed=1)
    x = torch.randn(3, 1, 16, dtype=torch.float64)
    static = TokenContext(start=5, positions=torch.zeros(3, 1), static_start=torch.tensor(5))
    torch.testing.assert_close(block(x, context=static), block(x).hidden)
    with torch.no_grad():  # in-place activations
        torch.testing.assert_close(block(x, context=static), block(x).hidden)

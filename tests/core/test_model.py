"""HybridLM assembly: shapes, aux losses, token-id checks, parameter counts."""

import pytest
import torch

from hybrid import HybridConfig, HybridLM

SMALL = {
    "vocab_size": 50,
    "d_model": 32,
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 16},
    "mamba1": {"d_state": 4},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "moe": {"n_experts": 4, "top_k": 2, "expert_hidden_size": 32},
}


@pytest.mark.parametrize("pattern", ["M", "S", "*", "-", "E", "M-M*-ME", "S-SES-SE*-SES-SE"])
def test_forward_shapes(pattern):
    model = HybridLM(HybridConfig(pattern, **SMALL))
    out = model(torch.randint(0, 50, (3, 21)))
    assert out.logits.shape == (3, 21, 50)
    assert (out.aux_loss is not None) == ("E" in pattern)
    assert sorted(out.router_stats) == [i for i, s in enumerate(pattern) if s == "E"]


def test_model_is_a_pre_norm_residual_composition():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig("M*-E", **SMALL)).double()
    ids = torch.randint(0, 50, (2, 9))
    hidden = model.embedding.weight[ids]
    for sublayer in model.sublayers:
        normed = (
            hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-5) * sublayer.norm.weight
        )
        out = sublayer.block(normed)
        hidden = hidden + (out.hidden if hasattr(out, "hidden") else out)
    final = (
        hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-5) * model.final_norm.weight
    )
    torch.testing.assert_close(model(ids).logits, final @ model.lm_head.weight.T)


def test_multipliers_scale_embeddings_residual_writes_and_logits():
    """embedding / residual / logit multipliers (Granite, Falcon-H1) in the same composition."""
    torch.manual_seed(0)
    config = HybridConfig(
        "M*-", **SMALL, embedding_multiplier=3.0, residual_multiplier=0.25, logit_multiplier=0.5
    )
    model = HybridLM(config).double()
    ids = torch.randint(0, 50, (2, 9))
    hidden = model.embedding.weight[ids] * 3.0
    for sublayer in model.sublayers:
        normed = (
            hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-5) * sublayer.norm.weight
        )
        hidden = hidden + 0.25 * sublayer.block(normed)
    final = (
        hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-5) * model.final_norm.weight
    )
    expected = 0.5 * final @ model.lm_head.weight.T
    torch.testing.assert_close(model(ids).logits, expected)
    cache = model.allocate_cache(2, 9)  # the cached path: prefill then one-token steps
    steps = [model(ids[:, :5], cache=cache).logits]
    steps += [model(ids[:, i : i + 1], cache=cache).logits for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), expected)


def test_post_norm_sublayers_normalise_the_block_output():
    """``post_norm_sublayers`` (OLMo 2's placement): ``x + m * norm(block(x))`` there,
    ``x + m * block(norm(x))`` elsewhere, in the forward and the cached path alike."""
    torch.manual_seed(0)
    config = HybridConfig("M-*-", **SMALL, post_norm_sublayers=[3, 2], residual_multiplier=0.5)
    assert config.post_norm_sublayers == [2, 3]
    model = HybridLM(config).double()
    for sublayer in model.sublayers:  # norm weights away from 1, so a misplaced norm shows
        torch.nn.init.uniform_(sublayer.norm.weight, 0.5, 1.5)
    ids = torch.randint(0, 50, (2, 9))

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    hidden = model.embedding.weight[ids]
    for index, sublayer in enumerate(model.sublayers):
        if index >= 2:
            hidden = hidden + 0.5 * rms(sublayer.block(hidden), sublayer.norm.weight)
        else:
            hidden = hidden + 0.5 * sublayer.block(rms(hidden, sublayer.norm.weight))
    expected = rms(hidden, model.final_norm.weight) @ model.lm_head.weight.T
    torch.testing.assert_close(model(ids).logits, expected)
    cache = model.allocate_cache(2, 9)
    steps = [model(ids[:, :5], cache=cache).logits]
    steps += [model(ids[:, i : i + 1], cache=cache).logits for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), expected)


@pytest.mark.parametrize(
    "value, message",
    [
        ([4], r"^post_norm_sublayers: index 4 is not a sublayer index in \[0, 4\)$"),
        ([1, 1], r"^post_norm_sublayers: lists a sublayer twice: \[1, 1\]$"),
        ("1", r"^post_norm_sublayers: must be"),
        ([True], r"^post_norm_sublayers: must be"),
    ],
)
def test_post_norm_sublayers_errors(value, message):
    with pytest.raises(ValueError, match=message):
        HybridConfig("M-*-", **SMALL, post_norm_sublayers=value)


def test_post_norm_sublayers_enter_the_fingerprint_only_when_set():
    plain = HybridConfig("M-*-", **SMALL)
    assert HybridConfig("M-*-", **SMALL, post_norm_sublayers=[]).fingerprint() == (
        plain.fingerprint()
    )
    assert HybridConfig("M-*-", **SMALL, post_norm_sublayers=[2]).fingerprint() != (
        plain.fingerprint()
    )


@pytest.mark.parametrize(
    "field, value", [("embedding_multiplier", "2"), ("logit_multiplier", float("nan")),
                     ("residual_multiplier", True)],
)  # fmt: skip
def test_multipliers_must_be_finite_numbers(field, value):
    with pytest.raises(ValueError, match=f"^{field}: must be a finite number"):
        HybridConfig("M", **SMALL, **{field: value})


def test_causality():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig("M*S-E", **SMALL))
    ids = torch.randint(0, 50, (1, 30))
    changed = ids.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 50
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_backward_reaches_every_parameter():
    model = HybridLM(HybridConfig("M*S-E", **SMALL))
    out = model(torch.randint(0, 50, (2, 17)))
    (out.logits.square().mean() + out.aux_loss).backward()
    missing = [
        name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()
    ]
    assert not missing


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([[1, 50]]), "token id 50 is outside the vocabulary \\[0, 50\\)"),
        (torch.tensor([[-1, 2]]), "token id -1"),
        (torch.tensor([[1.0, 2.0]]), "integer tensor"),
        (torch.tensor([1, 2]), "shape \\(batch, seqlen\\)"),
    ],
)
def test_bad_token_ids_raise(ids, message):
    model = HybridLM(HybridConfig("-", **SMALL))
    with pytest.raises(ValueError, match=message):
        model(ids)


def test_tied_embeddings_and_parameter_counts():
    tied = HybridLM(HybridConfig("M-E", tie_embeddings=True, **SMALL))
    untied = HybridLM(HybridConfig("M-E", **SMALL))
    assert tied.lm_head.weight is tied.embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == 50 * 32
    assert tied.num_parameters(embeddings=False) == untied.num_parameters(embeddings=False)
    experts = sum(p.numel() for p in untied.sublayers[2].block.experts.parameters())
    assert untied.num_parameters() - untied.num_parameters(active=True) == experts // 2


def test_residual_projections_start_smaller():
    model = HybridLM(HybridConfig("M*-", **SMALL))
    std = model.sublayers[1].block.o_proj.weight.std().item()
    assert std == pytest.approx(0.02 / 3**0.5, rel=0.2)
    assert model.sublayers[1].block.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_bf16_autocast_forward_backward_is_finite_and_close():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig("M*S-E", **SMALL))
    ids = torch.randint(0, 50, (2, 40))
    reference = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    error = (out.logits.float() - reference).norm() / reference.norm()
    assert error < 0.05, error

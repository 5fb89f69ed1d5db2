"""Whole hybrids with every SSM op on the upstream kernels: forward, backward, chunked prefill +
decode and greedy generation equal our CPU path (and, for the forward, the model in float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hybrid import HybridConfig, HybridLM

VOCAB = 64
MAMBA2 = {"d_state": 8, "headdim": 8, "chunk_size": 16}

MODELS = {
    # Bamba: Mamba-2 layers with one GQA attention layer, SwiGLU MLPs.
    "bamba": {"pattern": "M-M*-", "mamba2": MAMBA2,
              "attention": {"n_heads": 4, "n_kv_heads": 2}},
    # Jamba: Mamba-1 with the dt/B/C RMSNorms, MoE, attention without RoPE.
    "jamba": {"pattern": "S-SE*-", "mamba1": {"d_state": 4, "inner_norms": True},
              "moe": {"n_experts": 4, "top_k": 2},
              "attention": {"n_heads": 4, "n_kv_heads": 1, "rope": False}},
    # Nemotron-H: grouped Mamba-2, squared-ReLU MLP, sigmoid-routed MoE. (A dt_limit would
    # keep the decode steps off selective_state_update, which has no clamp: test_ssd.py.)
    "nemotron_h": {"pattern": "M-ME*", "mamba2": MAMBA2 | {"ngroups": 2},
                   "mlp": {"activation": "relu2"},
                   "moe": {"n_experts": 4, "top_k": 2, "router": "sigmoid"},
                   "attention": {"n_heads": 4, "n_kv_heads": 2, "rope": False}},
    # Qwen3-Next: Gated DeltaNet (two value heads per key head) and gated attention with
    # partial RoPE and q/k norms, MoE with a gated shared expert.
    "qwen3_next": {"pattern": "DEDE*E",
                   "gated_deltanet": {"n_heads": 2, "n_v_heads": 4, "head_k_dim": 16,
                                      "head_v_dim": 16, "chunk_size": 64},
                   "moe": {"n_experts": 4, "top_k": 2, "n_shared_experts": 1,
                           "shared_gate": True},
                   "attention": {"n_heads": 4, "n_kv_heads": 2, "rope_fraction": 0.25,
                                 "qk_norm": True, "output_gate": True}},
    # Kimi Linear: Kimi Delta Attention (a decay per key channel, low-rank decay and gate),
    # NoPE latent attention (its cache holds the latent once), sigmoid-routed MoE with a
    # shared expert. Small: interpreted chunk_kda runs one program per (token, value head).
    "kimi_linear": {"pattern": "KEKL-",
                    "kda": {"n_heads": 1, "head_k_dim": 8, "head_v_dim": 8, "chunk_size": 64},
                    "moe": {"n_experts": 4, "top_k": 2, "router": "sigmoid",
                            "n_shared_experts": 1},
                    "latent_attention": {"n_heads": 2, "kv_lora_rank": 16,
                                         "position": "none"}},
}  # fmt: skip
KERNELS = {
    "bamba": {"mamba_chunk_scan_combined", "causal_conv1d_fn"},
    "jamba": {"selective_scan_fn", "causal_conv1d_fn"},
    "nemotron_h": {"mamba_chunk_scan_combined", "causal_conv1d_fn"},
    "qwen3_next": {"chunk_gated_delta_rule", "causal_conv1d_fn"},
    "kimi_linear": {"chunk_kda", "causal_conv1d_fn"},
}
STEP_KERNEL = {
    "bamba": "selective_state_update",
    "jamba": "selective_state_update",
    "nemotron_h": "selective_state_update",
    "qwen3_next": "fused_recurrent_gated_delta_rule",
    "kimi_linear": "fused_recurrent_kda",
}
n_ssm_layers = {name: sum(s in "MSDK" for s in m["pattern"]) for name, m in MODELS.items()}


def build(name: str) -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(vocab_size=VOCAB, d_model=32, **MODELS[name]))
    return model.eval()


def tokens(batch: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_backward(name, kernels, torch_paths):
    model = build(name)
    ids = tokens(2, 37)  # across chunk boundaries

    def loss_and_grads(model: HybridLM):
        model.zero_grad()
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    logits, grads = loss_and_grads(model)
    assert set(kernels.names) == KERNELS[name]
    kernels.clear()
    with torch_paths():
        logits_torch, grads_torch = loss_and_grads(model)
        logits_64 = copy.deepcopy(model).double()(ids[:, :-1]).logits
    assert not kernels.names
    torch.testing.assert_close(logits, logits_torch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits.double(), logits_64, rtol=1e-4, atol=1e-4)
    assert grads.keys() == grads_torch.keys() == dict(model.named_parameters()).keys()
    for param, grad in grads.items():
        scale = grads_torch[param].abs().max().item()
        torch.testing.assert_close(grad, grads_torch[param], rtol=1e-3, atol=1e-4 * scale,
                                   msg=param)  # fmt: skip


def prefill_and_decode(model: HybridLM, ids: torch.Tensor, mask: torch.Tensor, chunk: int,
                       prompt: int) -> torch.Tensor:  # fmt: skip
    """Logits of ``ids`` from a prefill of ``prompt`` tokens in chunks, then one-token steps."""
    with torch.inference_mode():
        cache = model.allocate_cache(ids.shape[0], ids.shape[1])
        logits = []
        for start in range(0, prompt, chunk):
            end = min(start + chunk, prompt)
            logits.append(
                model(ids[:, start:end], cache=cache, attention_mask=mask[:, :end]).logits
            )
        for t in range(prompt, ids.shape[1]):
            step = model(ids[:, t : t + 1], cache=cache, attention_mask=mask[:, : t + 1]).logits
            logits.append(step)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("name", MODELS)
def test_chunked_prefill_then_decode(name, kernels, torch_paths):
    """Left-padded rows: the padding must stay out of the conv and SSM states on both paths."""
    model = build(name)
    ids = tokens(2, 25)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits = prefill_and_decode(model, ids, mask, chunk=9, prompt=21)
    steps = 4 * n_ssm_layers[name]
    assert kernels.names.count("causal_conv1d_update") == steps
    assert kernels.names.count(STEP_KERNEL[name]) == steps
    kernels.clear()
    with torch_paths():
        logits_torch = prefill_and_decode(model, ids, mask, chunk=9, prompt=21)
        with torch.inference_mode():
            full = model(ids, attention_mask=mask).logits
    assert not kernels.names
    torch.testing.assert_close(logits, logits_torch, rtol=1e-4, atol=1e-4)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], full[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation(name, kernels, torch_paths):
    model = build(name)
    prompt = tokens(2, 11)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    generated = model.generate(prompt, 6, attention_mask=mask, prefill_chunk_size=8)
    assert STEP_KERNEL[name] in kernels.names
    kernels.clear()
    with torch_paths():
        expected = model.generate(prompt, 6, attention_mask=mask, prefill_chunk_size=8)
    assert not kernels.names
    assert torch.equal(generated, expected)

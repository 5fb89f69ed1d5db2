"""Weight-only quantization: each quantized layer against a dequantize-then-matmul reference
written here, quantized models against the float model (bounds below), and a quantized model
through the cache, generation, speculative decoding and a cached prefill + decode.

The per-weight bound: int8 rows are ``q * s`` with ``s = max|row| / 127``, so every weight is
within ``s / 2`` of the float one; int4 groups are ``(q - z) * s`` with
``s = (max - min) / 15`` (rounded to float16), within ``s / 2`` plus the scale's rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from hybrid import HybridConfig, HybridLM
from hybrid.inference.speculative import speculative_generate
from hybrid.quantize import KEEP_FLOAT, quantize, weight_bytes
from layers.moe import Experts
from layers.quantized import QuantizedLinear, QuantizedWeight

PATTERN = "M-*-SE"  # Mamba-2, MLP, attention, MLP, Mamba-1, MoE


def build(pattern: str = PATTERN, seed: int = 0, **extra) -> HybridLM:
    torch.manual_seed(seed)
    config = HybridConfig(
        pattern, vocab_size=97, d_model=64,
        attention={"n_heads": 4, "n_kv_heads": 2},
        mamba2={"d_state": 16, "headdim": 16, "chunk_size": 16},
        mamba1={"d_state": 8},
        moe={"n_experts": 4, "top_k": 2, "expert_hidden_size": 64},
        **extra,
    )  # fmt: skip
    return HybridLM(config).eval()


def reference_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8, float64: (dequantized weight, per-row scale)."""
    w = weight.double()
    scale = w.abs().amax(-1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale, scale


def reference_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric uint4, float64 but for the scale, which is stored in float16:
    (dequantized weight, per-group scale)."""
    w = weight.double().unflatten(-1, (-1, group))
    low = w.amin(-1, keepdim=True).clamp(max=0)
    high = w.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 15).half().double()
    zero = torch.round(-low / scale).clamp(0, 15)
    q = torch.round(w / scale + zero).clamp(0, 15)
    return ((q - zero) * scale).flatten(-2), scale.expand_as(w).flatten(-2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(48, 64), (3, 40, 96)])
def test_quantized_weight_within_half_a_step(scheme, shape):
    torch.manual_seed(1)
    weight = torch.randn(shape) * torch.rand(shape[:-1])[..., None]  # rows of varied range
    quantized = QuantizedWeight(weight, scheme, group_size=32)
    deq = quantized.dequantize().double()
    if scheme == "int8":
        expected, scale = reference_int8(weight)
        assert quantized.qdata.dtype == torch.int8 and quantized.qdata.shape == shape
    else:
        expected, scale = reference_int4(weight, 32)
        assert quantized.qdata.dtype == torch.uint8
        assert quantized.qdata.shape == (*shape[:-1], shape[-1] // 2)  # two codes per byte
    error = (deq - weight.double()).abs()
    assert (error <= scale / 2 * 1.01 + 1e-7).all()  # + float16 scale and zero rounding
    # The same values as the rounding written here, except where float rounding tips a tie.
    assert (deq - expected).abs().le(scale * 1.01 + 1e-7).all()
    assert (deq - expected).abs().gt(1e-4 * scale).float().mean() < 0.02
    assert torch.equal(quantized[1].double(), deq[1])  # one expert / row block


@pytest.mark.parametrize(
    ("scheme", "backend"), [("int8", "hybrid"), ("int8", "torchao"), ("int4", "hybrid")]
)
def test_quantized_linear_is_dequantize_then_matmul(scheme, backend):
    """Each quantized layer of a model equals x @ W_deq.T + b with W_deq rebuilt from its own
    codes and scales by the formulas above (float64), for our int8 layers and torchao's."""
    model = build()
    quantize(model, scheme, int8_backend=backend)
    kinds = set()
    x = torch.randn(5, 64)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            w = module.weight
            kinds.add("hybrid")
            codes, scale = w.codes().double(), w.scale.double()
            if scheme == "int8":
                deq = codes * scale
            else:
                deq = ((codes.unflatten(-1, (-1, w.group_size)) - w.zero[..., None].double())
                       * scale[..., None]).flatten(-2)  # fmt: skip
        elif type(getattr(module, "weight", None)).__name__ == "Int8Tensor":
            w = module.weight  # torchao's int8 weight: qdata (out, in), scale (out, 1)
            kinds.add("torchao")
            deq = w.qdata.double() * w.scale.double()
        else:
            continue
        inputs = x if module.in_features == x.shape[-1] else torch.randn(5, module.in_features)
        expected = inputs.double() @ deq.T
        if module.bias is not None:
            expected = expected + module.bias.double()
        with torch.no_grad():
            got = module(inputs).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
        checked += 1
    assert checked == 14  # q, k, v, o; 2 gated MLPs x 3; Mamba-2 and Mamba-1 in / out
    assert kinds == {backend}


def test_which_weights_are_quantized():
    model = build()
    float_model = copy.deepcopy(model)
    info = quantize(model, "int4")
    assert (info.scheme, info.group_size, info.expert_weights) == ("int4", 32, 3)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert not any(name.rsplit(".", 1)[-1] in KEEP_FLOAT for name in names)
    assert {"router", "x_proj", "dt_proj"} <= {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    experts = next(m for m in model.modules() if isinstance(m, Experts))
    assert isinstance(experts.up_proj, QuantizedWeight)
    for name in ("A_log", "D", "dt_bias", "conv1d.weight", "norm.weight", "embedding.weight"):
        kept = [p for n, p in model.named_parameters() if n.endswith(name)]
        assert kept and all(p.dtype == torch.float32 for p in kept), name
    assert torch.equal(model.embedding.weight, float_model.embedding.weight)
    assert weight_bytes(model) < 0.45 * weight_bytes(float_model)


@pytest.mark.parametrize(
    ("scheme", "bound"),
    [("int8", 0.02), ("int4", 0.25)],  # max |logit difference| / max |logit|
)
def test_quantized_logits_close_to_float(scheme, bound):
    model = build()
    ids = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        reference = model(ids).logits
        quantize(model, scheme)
        logits = model(ids).logits
    relative = (logits - reference).abs().max() / reference.abs().max()
    assert relative < bound
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree > (0.95 if scheme == "int8" else 0.7)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_embeddings_quantized_when_asked_and_tied_table_shared(scheme):
    model = build(tie_embeddings=True)
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        reference = model(ids).logits
        quantize(model, scheme, embeddings=True)
        logits = model(ids).logits
    assert model.lm_head.weight is model.embedding.weight  # one quantized table
    assert (logits - reference).abs().max() / reference.abs().max() < 0.3


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_runs_cache_generation_and_speculative(scheme):
    target = build()
    draft = copy.deepcopy(target)
    quantize(draft, scheme)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    # Cached prefill in chunks + decode equals the quantized model's full forward.
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        full = draft(ids).logits
        cache = draft.allocate_cache(1, 30)
        parts = [draft(ids[:, :16], cache=cache).logits]
        parts += [draft(ids[:, t : t + 1], cache=cache).logits for t in range(16, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    greedy = draft.generate(prompt, 12)
    assert greedy.shape == (1, 20)
    # The quantized model drafting for its float original: speculative decoding stays exact.
    result = speculative_generate(target, draft, prompt, 12, num_draft_tokens=3)
    assert torch.equal(result.tokens, target.generate(prompt, 12))
    assert result.acceptance_rate > 0.3


def test_bad_quantize_arguments():
    model = build()
    with pytest.raises(ValueError, match=r"^quantize: unknown scheme 'int3'; choose one of int8"):
        quantize(model, "int3")
    with pytest.raises(ValueError, match=r"^group_size: 24 does not divide the input width 64"):
        quantize(model, "int4", group_size=24)
    with pytest.raises(ValueError, match=r"^group_size: int8 uses one scale per output row"):
        quantize(model, "int8", group_size=32)
    assert getattr(model, "quantization", None) is None  # nothing changed by a refusal
    assert all(not isinstance(m, QuantizedLinear) for m in model.modules())
    with pytest.raises(ValueError, match=r"^int8_backend: unknown backend 'fbgemm'; choose one"):
        quantize(model, "int8", int8_backend="fbgemm")
    quantize(model, "int8")
    with pytest.raises(ValueError, match=r"^quantize: the model is already quantized \(int8\)"):
        quantize(model, "int4")


def test_compiled_decode_of_a_quantized_model_with_an_int8_cache():
    """torch.compile of the static decode step through our int8 weights, the packed
    int4 experts and the int8 KV cache gives the eager tokens (about 25 s on 2 CPU cores)."""
    model = build("M*E")
    quantize(model, "int8")
    experts = next(m for m in model.modules() if isinstance(m, Experts))
    experts.up_proj = QuantizedWeight(experts.up_proj.dequantize(), "int4")  # both schemes
    model.cache_precision = type(model.cache_precision).of(kv_dtype="int8")
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(model.generate(prompt, 8, compile=True), model.generate(prompt, 8))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_shared_experts_gate_stays_float_like_the_router(scheme):
    torch.manual_seed(0)
    moe = {"n_experts": 4, "top_k": 2, "expert_hidden_size": 64, "n_shared_experts": 1,
           "shared_gate": True}  # fmt: skip
    model = HybridLM(HybridConfig("E", vocab_size=97, d_model=64, moe=moe)).eval()
    quantize(model, scheme)
    gates = {n: m for n, m in model.named_modules() if n.endswith(("shared_gate", "router"))}
    assert len(gates) == 2
    for name, module in gates.items():
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32, name
    shared = {
        n: type(m) for n, m in model.named_modules() if ".shared." in n and n.endswith("_proj")
    }
    assert shared and all(kind is QuantizedLinear for kind in shared.values()), shared

"""GPU: decoding with the static step compiled and/or replayed as a CUDA graph equals eager
decoding.

Skipped, not failed, without CUDA.
"""

import pytest
import torch

from hybrid import HybridConfig, HybridLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("mode", ["reduce-overhead", True])
def test_compiled_cuda_decode_equals_eager(mode):
    torch.manual_seed(0)
    config = HybridConfig(
        ["M", {"block": "attention", "window": 8}, "S", "*", "-"],
        vocab_size=64,
        d_model=64,
        mamba2={"d_state": 16, "headdim": 16},
        attention={"n_heads": 4, "n_kv_heads": 2},
    )
    model = HybridLM(config).cuda().eval()
    prompt = torch.randint(0, 64, (2, 17), device="cuda")
    eager = model.generate(prompt, 24)
    assert torch.equal(model.generate(prompt, 24, compile=mode), eager)


def _hybrid_on_cuda() -> HybridLM:
    torch.manual_seed(0)
    config = HybridConfig(
        ["M", {"block": "attention", "window": 8}, "S", "*", "E", "-"],
        vocab_size=64,
        d_model=64,
        mamba2={"d_state": 16, "headdim": 16},
        attention={"n_heads": 4, "n_kv_heads": 2},
        moe={"n_experts": 4, "top_k": 2},
    )
    return HybridLM(config).cuda().eval()


@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_generation_equals_eager(compile):
    model = _hybrid_on_cuda()
    prompt = torch.randint(0, 64, (2, 17), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    eager = model.generate(prompt, 24, attention_mask=mask)
    graphed = model.generate(prompt, 24, attention_mask=mask, compile=compile, cuda_graph=True)
    assert torch.equal(graphed, eager)


@torch.inference_mode()
def test_cuda_graph_step_records_once_and_again_after_select_and_rollback():
    from hybrid.inference.cuda_graph import CUDAGraphDecodeStep

    model = _hybrid_on_cuda()
    prompt = torch.randint(0, 64, (3, 9), device="cuda")
    cache = model.allocate_cache(3, 40)
    model(prompt, cache=cache)
    eager_cache = cache.copy()
    graphed = CUDAGraphDecodeStep(model.decode_step)
    stream = torch.randint(0, 64, (12, 3, 1), device="cuda")

    def both(token):
        position = torch.tensor(cache.length, device="cuda")
        mine = graphed(token, cache, position)
        theirs = model.decode_step(token, eager_cache, position)
        cache.advance(1, None)
        eager_cache.advance(1, None)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)

    for token in stream[:5]:
        both(token)
    assert graphed.captures == 1
    saved, eager_saved = cache.checkpoint(), eager_cache.checkpoint()
    for token in stream[5:8]:
        both(token)
    cache.rollback(saved)
    eager_cache.rollback(eager_saved)
    for token in stream[8:10]:
        both(token)
    assert graphed.captures == 2
    rows = torch.tensor([2, 0], device="cuda")
    cache.select(rows)
    eager_cache.select(rows)
    for token in stream[10:]:
        both(token[rows])
    assert graphed.captures == 3

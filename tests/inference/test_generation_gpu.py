"""GPU: decoding with the compiled static step under CUDA graphs equals eager decoding.

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

"""Dense feed-forward against its formula."""

import pytest
import torch
import torch.nn.functional as F

from hybrid import HybridConfig
from layers.mlp import MLP


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu2", "silu"])
def test_mlp_matches_formula(activation):
    torch.manual_seed(0)
    config = HybridConfig(
        "-", vocab_size=8, d_model=16, mlp={"activation": activation, "bias": True}
    )
    block = MLP(16, config.layer_options[0], 0).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ffn = block.ffn
    up = x @ ffn.up_proj.weight.T + ffn.up_proj.bias
    if activation in ("swiglu", "geglu"):
        gate = x @ ffn.gate_proj.weight.T + ffn.gate_proj.bias
        act = (
            gate * torch.sigmoid(gate)
            if activation == "swiglu"
            else F.gelu(gate, approximate="tanh")
        )
        inner = act * up
    elif activation == "relu2":
        inner = torch.clamp(up, min=0) ** 2
    elif activation == "gelu":
        inner = 0.5 * up * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (up + 0.044715 * up**3)))
    else:
        inner = up * torch.sigmoid(up)
    expected = inner @ ffn.down_proj.weight.T + ffn.down_proj.bias
    torch.testing.assert_close(block(x), expected)
    with torch.no_grad():  # the in-place activation path
        torch.testing.assert_close(block(x), expected)
    with torch.inference_mode():
        torch.testing.assert_close(block(x), expected)

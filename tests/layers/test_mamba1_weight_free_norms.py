"""The mamba1 option ``inner_norm_weights: false`` (FalconMamba's weight-free RMSNorms on dt, B
and C): no tensors, and the function of the weighted norms with their weights at one."""

import pytest
import torch

from hybrid import HybridConfig
from layers.mamba1 import Mamba1


def block(options: dict) -> Mamba1:
    config = HybridConfig("S", vocab_size=8, d_model=16, mamba1=options)
    return Mamba1(16, config.layer_options[0], 0).double()


@pytest.mark.parametrize(
    "options",
    [
        {"d_state": 6, "dt_rank": 3, "norm_eps": 1e-2},
        {"d_state": 4, "dt_rank": 4, "norm_eps": 1e-2},  # the weighted norms' fused path
    ],
)
def test_weight_free_norms_are_weighted_norms_at_one(options):
    torch.manual_seed(0)
    weighted = block({**options, "inner_norms": True})
    weight_free = block({**options, "inner_norms": True, "inner_norm_weights": False})
    state = weighted.state_dict()
    norms = {name for name in state if name.split(".")[0] in ("dt_norm", "b_norm", "c_norm")}
    assert len(norms) == 3
    assert set(weight_free.state_dict()) == set(state) - norms
    with torch.no_grad():
        torch.nn.init.normal_(weighted.in_proj.weight, std=0.3)
        torch.nn.init.normal_(weighted.x_proj.weight, std=1.0)  # dt, B, C norms far from eps
        weighted.D.add_(0.3 * torch.randn_like(weighted.D))
    weight_free.load_state_dict({k: v for k, v in weighted.state_dict().items() if k not in norms})
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    torch.testing.assert_close(weight_free(u), weighted(u), rtol=1e-12, atol=1e-12)
    # and the norms do something: without them the output differs
    plain = block(options)
    plain.load_state_dict(weight_free.state_dict())
    assert not torch.allclose(plain(u), weight_free(u), rtol=1e-3, atol=1e-3)

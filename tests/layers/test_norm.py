"""RMSNorm and the gated, grouped RMSNorm against their formulas, with and without autograd
(without it they take an in-place path)."""

import pytest
import torch

from layers.norm import GatedRMSNorm, RMSNorm, SiluGate


def rms_reference(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_rms_norm_matches_formula(mode):
    torch.manual_seed(0)
    norm = RMSNorm(12, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    before = x.clone()
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode(mode == "inference"):
        out = norm(x)
    torch.testing.assert_close(out, rms_reference(before, norm.weight.detach(), 1e-5))
    assert torch.equal(x, before), "the input is left alone"


@pytest.mark.parametrize("n_groups", [1, 3])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_gated_rms_norm_matches_formula(n_groups, mode):
    torch.manual_seed(0)
    norm = GatedRMSNorm(12, n_groups=n_groups, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    gate = torch.randn(2, 7, 12, dtype=torch.float64)
    inputs = (x.clone(), gate.clone())
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode(mode == "inference"):
        out = norm(x, gate)
    gated = (x * gate * torch.sigmoid(gate)).view(2, 7, n_groups, 12 // n_groups)
    weight = norm.weight.detach().view(n_groups, 12 // n_groups)
    expected = rms_reference(gated, weight, 1e-5).view(2, 7, 12)
    torch.testing.assert_close(out, expected)
    assert torch.equal(x, inputs[0]) and torch.equal(gate, inputs[1]), "inputs are left alone"


@pytest.mark.parametrize("n_groups", [1, 3])
def test_gated_rms_norm_before_gate_matches_formula(n_groups):
    """``norm_before_gate``: rmsnorm(x) * weight * silu(gate) per group (Falcon-H1's option)."""
    torch.manual_seed(0)
    norm = GatedRMSNorm(12, n_groups=n_groups, eps=1e-5, norm_before_gate=True).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    gate = torch.randn(2, 7, 12, dtype=torch.float64)
    grouped = x.view(2, 7, n_groups, 12 // n_groups)
    weight = norm.weight.detach().view(n_groups, 12 // n_groups)
    expected = rms_reference(grouped, weight, 1e-5).view(2, 7, 12) * gate * torch.sigmoid(gate)
    torch.testing.assert_close(norm(x, gate), expected)


def test_silu_gate_is_the_gate_alone():
    x, gate = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(SiluGate()(x, gate), x * gate / (1 + torch.exp(-gate)))


def test_norms_keep_low_precision_dtype():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert RMSNorm(8)(x).dtype == torch.bfloat16
        assert GatedRMSNorm(8, 2)(x, x).dtype == torch.bfloat16

"""Mamba-2 and Mamba-1 blocks against whole-block float64 references written plainly here
(per-token state recurrence, explicit gated norm) on the per-tap conv of conv/naive.py."""

import math

import pytest
import torch

from hybrid import HybridConfig
from layers.mamba1 import Mamba1
from layers.mamba2 import Mamba2
from layers.ops import causal_conv1d_naive


def silu(x):
    return x / (1 + torch.exp(-x))


def softplus(x):
    return torch.log1p(torch.exp(x))


def conv_reference(x, weight, bias):
    """x (l, d), weight (d, w): y[t] = bias + sum_k weight[:, k] * x[t - (w-1) + k]."""
    return causal_conv1d_naive(x.T[None], weight, bias)[0][0].T


def mamba2_reference(block, u):
    """One sequence at a time, one token at a time."""
    opts = block.options
    d_inner, nheads, p, n, g = block.d_inner, block.nheads, opts.headdim, opts.d_state, opts.ngroups
    out = []
    for seq in u:
        proj = seq @ block.in_proj.weight.T
        z, xbc, dt = (
            proj[:, :d_inner],
            proj[:, d_inner : d_inner + block.conv_dim],
            proj[:, -nheads:],
        )
        xbc = silu(conv_reference(xbc, block.conv1d.weight[:, 0], block.conv1d.bias))
        x, B, C = xbc[:, :d_inner], xbc[:, d_inner : d_inner + g * n], xbc[:, d_inner + g * n :]
        A = -torch.exp(block.A_log)
        state = torch.zeros(nheads, p, n, dtype=u.dtype)
        ys = []
        for t in range(seq.shape[0]):
            y_t = torch.zeros(d_inner, dtype=u.dtype)
            for h in range(nheads):
                group = h // (nheads // g)
                delta = softplus(dt[t, h] + block.dt_bias[h])
                x_h = x[t, h * p : (h + 1) * p]
                B_g, C_g = B[t, group * n : (group + 1) * n], C[t, group * n : (group + 1) * n]
                state[h] = torch.exp(delta * A[h]) * state[h] + delta * torch.outer(x_h, B_g)
                y_t[h * p : (h + 1) * p] = state[h] @ C_g + block.D[h] * x_h
            ys.append(y_t)
        y = torch.stack(ys)
        if not opts.rmsnorm:  # the gate alone
            normed = y * silu(z)
        else:  # per group of d_inner / g channels, around the gate or before it
            gated = y if opts.norm_before_gate else y * silu(z)
            size = d_inner // g
            normed = (
                torch.cat(
                    [
                        gated[:, i * size : (i + 1) * size]
                        / torch.sqrt(
                            gated[:, i * size : (i + 1) * size].pow(2).mean(-1, keepdim=True)
                            + opts.norm_eps
                        )
                        for i in range(g)
                    ],
                    dim=-1,
                )
                * block.norm.weight
            )
            if opts.norm_before_gate:
                normed = normed * silu(z)
        out.append(normed @ block.out_proj.weight.T)
    return torch.stack(out)


def mamba1_reference(block, u):
    opts = block.options
    d_inner, n, r = block.d_inner, opts.d_state, opts.dt_rank
    out = []
    for seq in u:
        proj = seq @ block.in_proj.weight.T
        x, z = proj[:, :d_inner], proj[:, d_inner:]
        x = silu(conv_reference(x, block.conv1d.weight[:, 0], block.conv1d.bias))
        dbl = x @ block.x_proj.weight.T
        dt, B, C = dbl[:, :r], dbl[:, r : r + n], dbl[:, r + n :]
        if opts.inner_norms:

            def rms(v, w):
                return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + opts.norm_eps) * w

            dt, B, C = (
                rms(dt, block.dt_norm.weight),
                rms(B, block.b_norm.weight),
                rms(C, block.c_norm.weight),
            )
        delta = softplus(dt @ block.dt_proj.weight.T + block.dt_proj.bias)
        A = -torch.exp(block.A_log)
        state = torch.zeros(d_inner, n, dtype=u.dtype)
        ys = []
        for t in range(seq.shape[0]):
            state = (
                torch.exp(delta[t, :, None] * A) * state
                + (delta[t] * x[t])[:, None] * B[t][None, :]
            )
            ys.append(state @ C[t] + block.D * x[t])
        y = torch.stack(ys) * silu(z)
        out.append(y @ block.out_proj.weight.T)
    return torch.stack(out)


def randomize(block):
    """Move the defaults off their special values so every term matters."""
    with torch.no_grad():
        for name, param in block.named_parameters():
            if (
                name in ("D", "norm.weight")
                or name.endswith("norm.weight")
                or name.endswith("bias")
            ):
                param.add_(0.3 * torch.randn_like(param))


@pytest.mark.parametrize(
    "options,length",
    [
        ({"d_state": 8, "headdim": 8, "chunk_size": 4}, 13),
        ({"d_state": 8, "headdim": 8, "chunk_size": 4}, 16),
        ({"d_state": 4, "headdim": 4, "ngroups": 2, "chunk_size": 8, "d_conv": 3}, 19),
        (
            {
                "d_state": 4,
                "headdim": 8,
                "n_heads": 6,
                "ngroups": 3,
                "chunk_size": 5,
                "conv_bias": False,
            },
            7,
        ),
        ({"d_state": 4, "headdim": 4, "ngroups": 2, "chunk_size": 8, "rmsnorm": False}, 11),
        ({"d_state": 4, "headdim": 4, "ngroups": 2, "chunk_size": 8, "norm_before_gate": True}, 11),
    ],
)
def test_mamba2_block_matches_sequential_reference(options, length):
    torch.manual_seed(0)
    config = HybridConfig("M", vocab_size=8, d_model=16, mamba2=options)
    block = Mamba2(16, config.layer_options[0], 0).double()
    torch.nn.init.normal_(block.in_proj.weight, std=0.3)
    randomize(block)
    u = torch.randn(2, length, 16, dtype=torch.float64)
    torch.testing.assert_close(block(u), mamba2_reference(block, u), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "options,length",
    [
        ({"d_state": 4}, 1),
        ({"d_state": 4}, 21),
        ({"d_state": 6, "inner_norms": True, "dt_rank": 3, "d_conv": 2}, 40),
        ({"d_state": 4, "expand": 1, "conv_bias": False}, 300),
    ],
)
def test_mamba1_block_matches_sequential_reference(options, length):
    torch.manual_seed(0)
    config = HybridConfig("S", vocab_size=8, d_model=16, mamba1=options)
    block = Mamba1(16, config.layer_options[0], 0).double()
    torch.nn.init.normal_(block.in_proj.weight, std=0.3)
    randomize(block)
    u = torch.randn(2, length, 16, dtype=torch.float64)
    torch.testing.assert_close(block(u), mamba1_reference(block, u), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "options,length",
    [
        ({"d_state": 4}, 21),
        ({"d_state": 6, "inner_norms": True, "dt_rank": 3, "d_conv": 2}, 40),
        ({"d_state": 4, "expand": 1, "conv_bias": False}, 300),
    ],
)
def test_mamba1_block_gradients_match_sequential_reference(options, length):
    """Input and parameter gradients of the block (hand-written scan backward) against
    autograd through the token-by-token float64 reference."""
    torch.manual_seed(0)
    config = HybridConfig("S", vocab_size=8, d_model=16, mamba1=options)
    block = Mamba1(16, config.layer_options[0], 0).double()
    torch.nn.init.normal_(block.in_proj.weight, std=0.3)
    randomize(block)
    u = torch.randn(2, length, 16, dtype=torch.float64)
    weight = torch.randn(2, length, 16, dtype=torch.float64)
    grads = []
    for forward in (block, lambda x: mamba1_reference(block, x)):
        x = u.clone().requires_grad_()
        block.zero_grad()
        (forward(x) * weight).sum().backward()
        grads.append({"input": x.grad, **{n: p.grad.clone() for n, p in block.named_parameters()}})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("pattern", ["M", "S"])
def test_ssm_math_stays_float32_under_bf16_autocast(pattern):
    torch.manual_seed(0)
    config = HybridConfig(pattern, vocab_size=8, d_model=32, mamba2={"d_state": 16, "headdim": 16})
    block = (Mamba2 if pattern == "M" else Mamba1)(32, config.layer_options[0], 0)
    u = torch.randn(2, 64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = block(u)
    high = block(u)
    assert block.A_log.dtype == torch.float32 and block.D.dtype == torch.float32
    assert torch.isfinite(low).all()
    # bf16 projections, float32 scan: close to the float32 block, far from bf16 rounding garbage
    error = (low.float() - high).norm() / high.norm()
    assert error < 0.05, error


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["M", "S"])
def test_forward_backward_finite_at_65536_tokens(pattern):
    torch.manual_seed(0)
    config = HybridConfig(
        pattern,
        vocab_size=8,
        d_model=16,
        mamba2={"d_state": 16, "headdim": 8, "chunk_size": 256},
        mamba1={"d_state": 8},
    )
    block = (Mamba2 if pattern == "M" else Mamba1)(16, config.layer_options[0], 0)
    u = torch.randn(1, 65536, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(u)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    for name, param in block.named_parameters():
        assert torch.isfinite(param.grad).all(), name
    assert not math.isnan(out.float().std().item())


@pytest.mark.parametrize("pattern", ["M", "S"])
def test_ssm_cache_fill_random_fills_both_states(pattern):
    config = HybridConfig(pattern, vocab_size=8, d_model=16, mamba2={"d_state": 8, "headdim": 8})
    block = (Mamba2 if pattern == "M" else Mamba1)(16, config.layer_options[0], 0)
    cache = block.allocate_cache(2, 32, torch.bfloat16, torch.device("cpu"))
    before = {name: t.clone() for name, t in cache.tensors().items()}
    cache.fill_random(20, torch.Generator().manual_seed(0))
    for name, tensor in cache.tensors().items():
        assert tensor.shape == before[name].shape and tensor.dtype == before[name].dtype
        assert tensor.ne(0).float().mean() > 0.9, name
    per_sequence = block.inference_state_bytes(16, block.options, 20, torch.bfloat16)
    assert cache.nbytes == 2 * per_sequence

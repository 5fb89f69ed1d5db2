"""causal_conv1d / causal_conv1d_step against the per-tap float64 reference (conv/naive.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.ops import causal_conv1d, causal_conv1d_naive, causal_conv1d_step


def make(batch, dim, seqlen, width, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, seqlen, generator=g, dtype=dtype)
    w = torch.randn(dim, width, generator=g, dtype=dtype)
    b = torch.randn(dim, generator=g, dtype=dtype)
    s = torch.randn(batch, dim, width - 1, generator=g, dtype=dtype)
    return x, w, b, s


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("seqlen", [1, 2, 7, 33])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_reference(width, seqlen, with_state, activation):
    x, w, b, s = make(2, 5, seqlen, width)
    init = s if with_state else None
    y, final = causal_conv1d(
        x, w, b, activation=activation, initial_state=init, return_final_state=True
    )
    y_ref, final_ref = causal_conv1d_naive(x, w, b, activation, init)
    assert y.shape == (2, 5, seqlen) and final.shape == (2, 5, width - 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=0)


def test_no_bias_and_plain_output():
    x, w, _, _ = make(1, 3, 9, 3)
    y = causal_conv1d(x, w)
    torch.testing.assert_close(y, causal_conv1d_naive(x, w)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split", [1, 2, 5])
def test_two_pieces_equal_whole(split):
    x, w, b, _ = make(2, 4, 12, 4)
    y, final = causal_conv1d(x, w, b, activation="silu", return_final_state=True)
    y1, s1 = causal_conv1d(x[..., :split], w, b, activation="silu", return_final_state=True)
    y2, s2 = causal_conv1d(
        x[..., split:], w, b, activation="silu", initial_state=s1, return_final_state=True
    )
    torch.testing.assert_close(torch.cat([y1, y2], -1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, final, rtol=0, atol=0)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_step_matches_scan(activation):
    x, w, b, s = make(2, 6, 10, 4)
    y_ref, final_ref = causal_conv1d_naive(x, w, b, activation, s)
    state = s.clone()
    ys = []
    for t in range(x.shape[-1]):
        y_t, state = causal_conv1d_step(x[..., t], state, w, b, activation=activation)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, -1), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final_ref)
    assert torch.equal(s, make(2, 6, 10, 4)[3]), "step must not modify its input state"


def test_gradcheck():
    x, w, b, s = make(2, 3, 6, 3)
    inputs = tuple(t.requires_grad_() for t in (x, w, b, s))

    def fn(x, w, b, s):
        return causal_conv1d(x, w, b, activation="silu", initial_state=s, return_final_state=True)

    assert torch.autograd.gradcheck(fn, inputs)


def test_dtypes_follow_input():
    x, w, b, s = make(1, 4, 5, 4, dtype=torch.float32)
    y, final = causal_conv1d(
        x.bfloat16(), w, b, initial_state=s.bfloat16(), return_final_state=True
    )
    assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16
    y_ref, _ = causal_conv1d_naive(x.bfloat16(), w, b, None, s.bfloat16())
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)


def test_rejects_unknown_activation():
    x, w, _, _ = make(1, 2, 3, 2)
    with pytest.raises(ValueError):
        causal_conv1d(x, w, activation="relu")


def test_silu_alias_matches_functional():
    x, w, b, _ = make(1, 2, 4, 2)
    torch.testing.assert_close(
        causal_conv1d(x, w, b, activation="silu"), F.silu(causal_conv1d(x, w, b))
    )


@pytest.mark.parametrize("width", [1, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 2, 9])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_channel_last_input_matches_reference(width, seqlen, with_state, with_bias):
    """(batch, seqlen, dim) activations passed as a transposed view take the tap-loop path."""
    x, w, b, s = make(2, 5, seqlen, width)
    b, s = b if with_bias else None, s if with_state else None
    x_cl = x.transpose(1, 2).contiguous().transpose(1, 2)
    y, final = causal_conv1d(
        x_cl, w, b, activation="silu", initial_state=s, return_final_state=True
    )
    y_ref, final_ref = causal_conv1d_naive(x, w, b, "silu", s)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=0)
    if seqlen > 1:
        assert y.stride(1) == 1, "output keeps the channel-last layout"


def test_gradcheck_channel_last():
    x, w, b, s = make(2, 3, 6, 3)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    inputs = tuple(t.requires_grad_() for t in (x, w, b, s))

    def fn(x, w, b, s):
        return causal_conv1d(x, w, b, activation="silu", initial_state=s, return_final_state=True)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("seqlen", [1, 3, 9])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_channel_last_gradients_match_reference(width, seqlen, with_state, with_bias, activation):
    """The tap path's hand-written backward gives the float64 reference's autograd gradients
    for every input (x, weight, bias, initial state), whichever of them need one."""
    x, w, b, s = make(2, 5, seqlen, width)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    b, s = b if with_bias else None, s if with_state else None
    inputs = [t.requires_grad_() for t in (x, w, b, s) if t is not None]
    weights = torch.randn(2, 5, seqlen, dtype=torch.float64)
    y = causal_conv1d(x, w, b, activation=activation, initial_state=s)
    got = torch.autograd.grad((y * weights).sum(), inputs)
    y_ref, _ = causal_conv1d_naive(x, w, b, activation, s)
    expected = torch.autograd.grad((y_ref * weights).sum(), inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_channel_last_only_weight_needs_gradient():
    """A frozen input (no grad) still gives the weight's gradient; no gradient for x."""
    x, w, b, _ = make(1, 4, 8, 4)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w.requires_grad_()
    (grad,) = torch.autograd.grad(causal_conv1d(x, w, b, activation="silu").sum(), [w])
    (expected,) = torch.autograd.grad(causal_conv1d_naive(x, w, b, "silu")[0].sum(), [w])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_gradcheck_documents(width, with_state):
    """With seq_idx the taps are masked at document starts; their backward is checked
    numerically (channel-first input also takes this path)."""
    x, w, b, s = make(2, 3, 9, width)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
    inputs = tuple(t.requires_grad_() for t in ((x, w, b, s) if with_state else (x, w, b)))

    def fn(x, w, b, s=None):
        return causal_conv1d(x, w, b, activation="silu", initial_state=s, seq_idx=seq_idx)

    assert torch.autograd.gradcheck(fn, inputs)

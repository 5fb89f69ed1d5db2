"""The gated delta rule: chunked and one-token paths against the float64 token-by-token
recurrence (layers/ops/delta/naive.py), gradients, pieces, documents, a float32 tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.ops.delta import (
    gated_delta_chunked_torch,
    gated_delta_naive,
    gated_delta_rule,
    gated_delta_step,
)

f64 = {"dtype": torch.float64}


def make(batch, seqlen, nk, nv, dk, dv, dtype=torch.float64, seed=0):
    """Inputs as Gated DeltaNet makes them: unit q and k, beta in (0, 1), g <= 0."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, seqlen, nk, dk, generator=gen, **f64), dim=-1)
    k = F.normalize(torch.randn(batch, seqlen, nk, dk, generator=gen, **f64), dim=-1)
    v = torch.randn(batch, seqlen, nv, dv, generator=gen, **f64)
    beta = torch.rand(batch, seqlen, nv, generator=gen, **f64)
    g = -torch.rand(batch, seqlen, nv, generator=gen, **f64) * 0.5
    state = torch.randn(batch, nv, dk, dv, generator=gen, **f64)
    return tuple(t.to(dtype) for t in (q, k, v, g, beta, state))


SHAPES = [  # (batch, seqlen, nk, nv, dk, dv, chunk)
    (1, 1, 1, 1, 4, 4, 4),
    (2, 7, 2, 2, 4, 6, 4),
    (2, 16, 1, 3, 8, 4, 8),
    (1, 33, 2, 4, 6, 5, 8),
    (3, 20, 2, 2, 4, 4, 64),
]


@pytest.mark.parametrize(("batch", "seqlen", "nk", "nv", "dk", "dv", "chunk"), SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrence(batch, seqlen, nk, nv, dk, dv, chunk, with_state):
    q, k, v, g, beta, state = make(batch, seqlen, nk, nv, dk, dv)
    init = state if with_state else None
    o, final = gated_delta_chunked_torch(
        q, k, v, g, beta, chunk_size=chunk, initial_state=init, return_final_state=True
    )
    o_ref, final_ref = gated_delta_naive(q, k, v, g, beta, initial_state=init)
    assert o.shape == (batch, seqlen, nv, dv) and final.shape == (batch, nv, dk, dv)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_matches_recurrence_with_negative_eigenvalues(chunk):
    """beta in (0, 2) (``allow_neg_eigval``): the transition I - beta k k^T can have an
    eigenvalue in (-1, 0); the chunked form still matches the recurrence, state and all."""
    q, k, v, g, beta, state = make(2, 21, 2, 4, 6, 5, seed=3)
    beta = 2 * beta
    assert beta.max() > 1.5
    o, final = gated_delta_chunked_torch(
        q, k, v, g, beta, chunk_size=chunk, initial_state=state, return_final_state=True
    )
    o_ref, final_ref = gated_delta_naive(q, k, v, g, beta, initial_state=state)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_scale_and_strong_decay():
    """A given scale, decays down to exp(-30) per step (exponents clamped, never inf / nan)."""
    q, k, v, g, beta, state = make(2, 19, 1, 2, 4, 4)
    g = g * 60
    o, final = gated_delta_chunked_torch(
        q, k, v, g, beta, chunk_size=8, scale=0.3, initial_state=state, return_final_state=True
    )
    o_ref, final_ref = gated_delta_naive(q, k, v, g, beta, scale=0.3, initial_state=state)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_state", [False, True])
def test_gradients_match_recurrence(with_state):
    q, k, v, g, beta, state = make(2, 13, 2, 4, 4, 3)
    inputs = [q, k, v, g, beta] + ([state] if with_state else [])
    for t in inputs:
        t.requires_grad_()
    init = state if with_state else None
    weights = torch.randn(2, 13, 4, 3, **f64)
    o, final = gated_delta_chunked_torch(
        q, k, v, g, beta, chunk_size=4, initial_state=init, return_final_state=True
    )
    got = torch.autograd.grad((o * weights).sum() + final.square().sum(), inputs)
    o_ref, final_ref = gated_delta_naive(q, k, v, g, beta, initial_state=init)
    expected = torch.autograd.grad((o_ref * weights).sum() + final_ref.square().sum(), inputs)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gradcheck():
    q, k, v, g, beta, state = make(1, 6, 1, 2, 3, 2)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, g, beta, state))

    def fn(q, k, v, g, beta, state):
        return gated_delta_chunked_torch(
            q, k, v, g, beta, chunk_size=4, initial_state=state, return_final_state=True
        )

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("chunk", [3, 4, 64])
def test_documents_restart_the_state(chunk):
    """With seq_idx every document gives what it gives alone (the initial state belongs to the
    first); documents start on and off chunk boundaries, labels may repeat."""
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], [4] * 6 + [0] * 3 + [4] * 3])
    q, k, v, g, beta, state = make(2, 12, 2, 2, 4, 3)
    o, final = gated_delta_chunked_torch(
        q, k, v, g, beta, chunk_size=chunk, initial_state=state, return_final_state=True,
        seq_idx=seq_idx,
    )  # fmt: skip
    o_ref, final_ref = gated_delta_naive(q, k, v, g, beta, initial_state=state, seq_idx=seq_idx)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    # ... and the reference itself: the second document of row 0 alone, from zero.
    alone, _ = gated_delta_naive(*(t[:1, 4:7] for t in (q, k, v, g, beta)))
    torch.testing.assert_close(o[:1, 4:7], alone, rtol=1e-10, atol=1e-10)


def test_two_pieces_equal_whole():
    q, k, v, g, beta, _ = make(2, 21, 1, 2, 4, 4)
    whole = gated_delta_chunked_torch(q, k, v, g, beta, chunk_size=4)
    first, state = gated_delta_chunked_torch(
        *(t[:, :9] for t in (q, k, v, g, beta)), chunk_size=4, return_final_state=True
    )
    second = gated_delta_chunked_torch(
        *(t[:, 9:] for t in (q, k, v, g, beta)), chunk_size=4, initial_state=state
    )
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32])
def test_steps_match_recurrence(state_dtype):
    q, k, v, g, beta, state = make(2, 9, 2, 4, 4, 3)
    o_ref, final_ref = gated_delta_naive(q, k, v, g, beta, initial_state=state)
    work = state.to(state_dtype).clone()
    outputs = [gated_delta_step(work, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
               for t in range(9)]  # fmt: skip
    tol = 1e-10 if state_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.stack(outputs, 1), o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(work.double(), final_ref, rtol=tol, atol=tol)


def test_float32_is_close_to_float64():
    """float32 inputs at a realistic length: relative error of the output below 1e-5."""
    q, k, v, g, beta, _ = make(1, 300, 2, 4, 16, 16, dtype=torch.float32, seed=3)
    o = gated_delta_rule(q, k, v, g, beta, chunk_size=64)
    assert o.dtype == torch.float32
    o_ref, _ = gated_delta_naive(q, k, v, g, beta)
    assert ((o.double() - o_ref).norm() / o_ref.norm()).item() < 1e-5


def test_bad_heads():
    q, k, v, g, beta, _ = make(1, 4, 2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"value heads \(3\) must be a multiple of key heads"):
        gated_delta_rule(q, k, v, g, beta)

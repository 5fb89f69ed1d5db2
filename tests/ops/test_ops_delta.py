"""The gated delta rule: chunked and one-token paths against the float64 token-by-token
recurrence (layers/ops/delta/naive.py), gradients, pieces, documents, a float32 tolerance; with
a decay per key channel (Kimi Delta Attention) also against a recurrence written out here."""

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


# A decay per key channel (Kimi Delta Attention): g (batch, seqlen, nv, dk).


def channel_recurrence(q, k, v, g, beta, state, scale=None):
    """Kimi Delta Attention written out element by element in float64, independent of
    layers/: ``S[d, :] *= exp(g_t[d])``, then the delta-rule write and the read."""
    batch, seqlen, nv, dv = v.shape
    nk, dk = k.shape[2:]
    scale = dk**-0.5 if scale is None else scale
    S = state.double().clone()
    out = torch.zeros(batch, seqlen, nv, dv, **f64)
    for b in range(batch):
        for h in range(nv):
            kh = h // (nv // nk)
            for t in range(seqlen):
                for d in range(dk):
                    S[b, h, d] *= torch.exp(g[b, t, h, d])
                kt, qt = k[b, t, kh], q[b, t, kh]
                read = sum(kt[d] * S[b, h, d] for d in range(dk))
                delta = beta[b, t, h] * (v[b, t, h] - read)
                for d in range(dk):
                    S[b, h, d] += kt[d] * delta
                out[b, t, h] = scale * sum(qt[d] * S[b, h, d] for d in range(dk))
    return out, S


def channel_decay(batch, seqlen, nv, dk, strength, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return -torch.rand(batch, seqlen, nv, dk, generator=gen, **f64) * strength


@pytest.mark.parametrize(
    ("batch", "seqlen", "nk", "nv", "dk", "dv", "chunk"),
    [
        (1, 1, 1, 1, 4, 4, 4),
        (2, 7, 2, 2, 4, 3, 4),
        (1, 37, 1, 2, 3, 2, 32),
        (1, 20, 1, 1, 2, 2, 64),
    ],
)
def test_channel_decay_matches_written_out_recurrence(batch, seqlen, nk, nv, dk, dv, chunk):
    """Chunks of up to 64 tokens (sub-chunks of 16, a short last one), decays down to e^-4
    per step and channel, so a chunk's cumulative decay reaches e^-150: the products must stay
    referred to a point between their tokens, or exp would overflow."""
    q, k, v, _, beta, state = make(batch, seqlen, nk, nv, dk, dv)
    g = channel_decay(batch, seqlen, nv, dk, strength=4.0)
    o, final = gated_delta_chunked_torch(
        q, k, v, g, beta, chunk_size=chunk, initial_state=state, return_final_state=True
    )
    o_ref, final_ref = channel_recurrence(q, k, v, g, beta, state)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    # the library's float64 specification agrees with the written-out one
    o_naive, final_naive = gated_delta_naive(q, k, v, g, beta, initial_state=state)
    torch.testing.assert_close(o_naive, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final_naive, final_ref, rtol=1e-10, atol=1e-10)


def test_channel_decay_equal_across_channels_is_the_head_decay():
    q, k, v, g, beta, state = make(2, 19, 2, 4, 4, 3)
    per_head = gated_delta_chunked_torch(q, k, v, g, beta, chunk_size=8, initial_state=state)
    g_channels = g.unsqueeze(-1).expand(-1, -1, -1, 4)
    per_channel = gated_delta_chunked_torch(
        q, k, v, g_channels, beta, chunk_size=8, initial_state=state
    )
    torch.testing.assert_close(per_channel, per_head, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [4, 64])
def test_channel_decay_documents_and_pieces(chunk):
    seq_idx = torch.tensor([[0] * 5 + [1] * 20 + [2] * 5, [3] * 30])
    q, k, v, _, beta, state = make(2, 30, 1, 2, 4, 3)
    g = channel_decay(2, 30, 2, 4, strength=1.0)
    o = gated_delta_chunked_torch(
        q, k, v, g, beta, chunk_size=chunk, initial_state=state, seq_idx=seq_idx
    )
    o_ref, _ = gated_delta_naive(q, k, v, g, beta, initial_state=state, seq_idx=seq_idx)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    first, mid = gated_delta_chunked_torch(
        *(t[:, :11] for t in (q, k, v, g, beta)), chunk_size=chunk, return_final_state=True
    )
    second = gated_delta_chunked_torch(
        *(t[:, 11:] for t in (q, k, v, g, beta)), chunk_size=chunk, initial_state=mid
    )
    whole = gated_delta_chunked_torch(q, k, v, g, beta, chunk_size=chunk)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-10)


def test_channel_decay_steps_and_gradients():
    q, k, v, _, beta, state = make(1, 9, 1, 2, 3, 2)
    g = channel_decay(1, 9, 2, 3, strength=2.0)
    o_ref, final_ref = channel_recurrence(q, k, v, g, beta, state)
    work = state.clone()
    steps = [gated_delta_step(work, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
             for t in range(9)]  # fmt: skip
    torch.testing.assert_close(torch.stack(steps, 1), o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(work, final_ref, rtol=1e-10, atol=1e-10)

    pieces = (*(t[:, :6] for t in (q, k, v, g, beta)), state)
    inputs = tuple(t.clone().requires_grad_() for t in pieces)

    def fn(q, k, v, g, beta, state):
        return gated_delta_chunked_torch(
            q, k, v, g, beta, chunk_size=4, initial_state=state, return_final_state=True
        )

    assert torch.autograd.gradcheck(fn, inputs)


def test_channel_decay_float32_strong_decay_stays_finite():
    """float32 at 300 tokens with decays down to e^-20 per step: finite, close to float64."""
    q, k, v, _, beta, _ = make(1, 300, 2, 2, 16, 16, dtype=torch.float32, seed=3)
    g = channel_decay(1, 300, 2, 16, strength=20.0).float()
    o = gated_delta_rule(q, k, v, g, beta, chunk_size=64)
    o_ref, _ = gated_delta_naive(q, k, v, g, beta)
    assert torch.isfinite(o).all()
    assert ((o.double() - o_ref).norm() / o_ref.norm()).item() < 1e-5


def written_out_products(x, y, cs):
    """``M[i, j] = sum_d x[i, d] y[j, d] exp(cs[i, d] - cs[j, d])`` for j <= i, 0 above, in
    float64 with the exponent of each pair formed on its own."""
    x, y, cs = (t.double() for t in (x, y, cs))
    exponent = (cs.unsqueeze(-2) - cs.unsqueeze(-3)).clamp(max=0)  # (..., Q, Q, d)
    M = (x.unsqueeze(-2) * y.unsqueeze(-3) * exponent.exp()).sum(-1)
    return M.tril()


@pytest.mark.parametrize(
    ("dtype", "length", "strength", "blocks"),
    [
        (torch.float32, 64, 0.5, (64, True)),  # one matmul for the chunk
        (torch.float32, 64, 2.0, (16, True)),  # factored blocks of 16, matmuls between them
        (torch.float32, 61, 4.0, (8, True)),  # a short last block
        (torch.float32, 64, 30.0, (8, False)),  # blocks of 8 computed exactly
        (torch.float64, 64, 3.0, (64, True)),
        (torch.float64, 64, 60.0, (8, False)),
        (torch.float32, 5, 30.0, (5, False)),  # a chunk shorter than a block, exactly
    ],
)
def test_channel_decayed_products_every_path(dtype, length, strength, blocks):
    """The per-channel decayed products of the chunked path take the cheapest block split the
    decay allows; each split equals the products written out pair by pair, and stays finite
    (float32 decays down to e^-30 per token reach e^-1900 across a chunk)."""
    from layers.ops.delta.chunk import _channel_decayed_products, product_blocks

    gen = torch.Generator().manual_seed(4)
    x, y = (torch.randn(2, 3, length, 16, generator=gen, dtype=dtype) for _ in range(2))
    g = -torch.rand(2, 3, length, 16, generator=gen, dtype=dtype) * strength
    g[..., 0] = -strength  # one channel decays at the full strength everywhere
    cs = g.cumsum(-2)
    assert product_blocks(cs) == blocks
    M = _channel_decayed_products(x, y, cs)
    assert torch.isfinite(M).all()
    expected = written_out_products(x, y, cs)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(M.double().tril(), expected, rtol=tol, atol=tol)

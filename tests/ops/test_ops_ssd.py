"""Mamba-2 SSD ops against the sequential per-token float64 recurrence (ssd/naive.py)."""

from __future__ import annotations

import time

import pytest
import torch

from layers.ops import causal_conv1d, ssd_chunked_torch, ssd_naive, ssd_scan, ssd_step
from layers.ops.ssd import chunk as ssd_chunk

CHUNK = 16


def make(
    batch=2, seqlen=20, nheads=4, headdim=3, d_state=5, ngroups=2, dtype=torch.float64, seed=0
):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        x=r(batch, seqlen, nheads, headdim),
        dt=torch.rand(batch, seqlen, nheads, generator=g, dtype=dtype) * 0.5,
        A=-(torch.rand(nheads, generator=g, dtype=dtype) * 2 + 0.1),
        B=r(batch, seqlen, ngroups, d_state),
        C=r(batch, seqlen, ngroups, d_state),
        D=r(nheads),
        D2=r(nheads, headdim),
        z=r(batch, seqlen, nheads, headdim),
        dt_bias=r(nheads) * 0.5,
        init=r(batch, nheads, headdim, d_state),
    )


def run(fn, d, *, D=None, z=False, dt_opts=False, init=False, chunk_size=CHUNK, final=True):
    kwargs = dict(
        D=D,
        z=d["z"] if z else None,
        initial_state=d["init"] if init else None,
    )
    if dt_opts:
        kwargs.update(dt_bias=d["dt_bias"], dt_softplus=True, dt_limit=(0.05, 0.6))
    out = fn(
        d["x"],
        d["dt"],
        d["A"],
        d["B"],
        d["C"],
        chunk_size=chunk_size,
        return_final_state=final,
        **kwargs,
    )
    ref = ssd_naive(d["x"], d["dt"], d["A"], d["B"], d["C"], **kwargs)
    return out, ref


@pytest.mark.parametrize("seqlen", [1, 7, CHUNK, 3 * CHUNK + 5])
@pytest.mark.parametrize("ngroups", [1, 2, 4])
@pytest.mark.parametrize("init", [False, True])
def test_matches_reference(seqlen, ngroups, init):
    d = make(seqlen=seqlen, ngroups=ngroups)
    (y, final), (y_ref, final_ref) = run(ssd_chunked_torch, d, init=init)
    assert y.shape == d["x"].shape and y.dtype == torch.float64
    assert final.shape == (2, 4, 3, 5) and final.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("D_kind", [None, "heads", "heads_headdim"])
@pytest.mark.parametrize("z", [False, True])
@pytest.mark.parametrize("dt_opts", [False, True])
def test_options_match_reference(D_kind, z, dt_opts):
    d = make(seqlen=2 * CHUNK + 3)
    D = {None: None, "heads": d["D"], "heads_headdim": d["D2"]}[D_kind]
    (y, final), (y_ref, final_ref) = run(ssd_chunked_torch, d, D=D, z=z, dt_opts=dt_opts, init=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_dt_limit_is_applied():
    d = make(seqlen=9)
    kw = dict(dt_bias=d["dt_bias"], dt_softplus=True, chunk_size=CHUNK)
    args = (d["x"], d["dt"], d["A"], d["B"], d["C"])
    y_lim = ssd_chunked_torch(*args, dt_limit=(0.3, 0.4), **kw)
    y_ref, _ = ssd_naive(*args, dt_bias=d["dt_bias"], dt_softplus=True, dt_limit=(0.3, 0.4))
    torch.testing.assert_close(y_lim, y_ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y_lim, ssd_chunked_torch(*args, **kw))


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_chunk_size_does_not_change_result(chunk_size):
    d = make(seqlen=37)
    (y, final), (y_ref, final_ref) = run(
        ssd_chunked_torch, d, D=d["D"], z=True, init=True, chunk_size=chunk_size
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("limit", [-1.0, 1.0, 1e9])
def test_factored_and_segsum_paths_agree(monkeypatch, ngroups, limit):
    """Heads switch between the factorised and the segment-sum within-chunk paths by decay range.

    limit -1: all heads on the segment-sum path; 1: mixed; 1e9: all factorised.
    """
    monkeypatch.setitem(ssd_chunk._FACTOR_RANGE, torch.float64, limit)
    d = make(seqlen=3 * CHUNK + 1, ngroups=ngroups)
    d["A"] = torch.tensor([-0.01, -3.0, -0.05, -0.4], dtype=torch.float64)
    (y, final), (y_ref, final_ref) = run(ssd_chunked_torch, d, D=d["D"], init=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_float32_fast_decay_heads():
    """Decay ranges far beyond the factorisation limit, in float32, stay accurate and finite."""
    d = make(seqlen=2 * 64 + 9, nheads=4, headdim=4, d_state=8, ngroups=2)
    d["A"] = torch.tensor([-0.01, -30.0, -0.5, -200.0], dtype=torch.float64)
    d32 = {k: v.float() for k, v in d.items()}
    y, final = ssd_chunked_torch(
        d32["x"],
        d32["dt"],
        d32["A"],
        d32["B"],
        d32["C"],
        chunk_size=64,
        initial_state=d32["init"],
        return_final_state=True,
    )
    y_ref, final_ref = ssd_naive(d["x"], d["dt"], d["A"], d["B"], d["C"], initial_state=d["init"])
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-5
    assert ((final.double() - final_ref).norm() / final_ref.norm()).item() < 1e-5


def test_dispatch_on_cpu_uses_torch_path():
    d = make(seqlen=11)
    (y, final), (y_ref, final_ref) = run(ssd_scan, d, D=d["D2"], z=True, dt_opts=True, init=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    y_only = ssd_scan(d["x"], d["dt"], d["A"], d["B"], d["C"], chunk_size=CHUNK)
    assert isinstance(y_only, torch.Tensor)


@pytest.mark.parametrize("split", [1, CHUNK - 3, CHUNK + 2])
def test_two_pieces_equal_whole(split):
    """Prefill in two calls (conv state + SSM state handed over) == one call."""
    d = make(seqlen=2 * CHUNK + 4, ngroups=2)
    g = torch.Generator().manual_seed(1)
    batch, seqlen, nheads, headdim = d["x"].shape
    channels = nheads * headdim
    xc = torch.randn(batch, channels, seqlen, generator=g, dtype=torch.float64)
    w = torch.randn(channels, 4, generator=g, dtype=torch.float64)
    kw = dict(D=d["D"], z=None, dt_bias=d["dt_bias"], dt_softplus=True, chunk_size=CHUNK)

    def block(xc, conv_state, ssm_state, sl):
        x, conv_final = causal_conv1d(
            xc, w, activation="silu", initial_state=conv_state, return_final_state=True
        )
        x = x.transpose(1, 2).reshape(batch, -1, nheads, headdim)
        y, ssm_final = ssd_scan(
            x,
            d["dt"][:, sl],
            d["A"],
            d["B"][:, sl],
            d["C"][:, sl],
            initial_state=ssm_state,
            return_final_state=True,
            **kw,
        )
        return y, conv_final, ssm_final

    y, conv_f, ssm_f = block(xc, None, None, slice(None))
    y1, c1, s1 = block(xc[..., :split], None, None, slice(0, split))
    y2, c2, s2 = block(xc[..., split:], c1, s1, slice(split, None))
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c2, conv_f)
    torch.testing.assert_close(s2, ssm_f, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_step_matches_scan(ngroups):
    d = make(seqlen=6, ngroups=ngroups)
    opts = dict(D=d["D2"], dt_bias=d["dt_bias"], dt_softplus=True, dt_limit=(0.05, 0.6))
    y_scan, final_scan = ssd_chunked_torch(
        d["x"],
        d["dt"],
        d["A"],
        d["B"],
        d["C"],
        chunk_size=CHUNK,
        z=d["z"],
        initial_state=d["init"],
        return_final_state=True,
        **opts,
    )
    state = d["init"].clone()
    for t in range(6):
        y_t, state = ssd_step(
            state,
            d["x"][:, t],
            d["dt"][:, t],
            d["A"],
            d["B"][:, t],
            d["C"][:, t],
            z=d["z"][:, t],
            **opts,
        )
        torch.testing.assert_close(y_t, y_scan[:, t], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final_scan, rtol=1e-10, atol=1e-10)
    assert torch.equal(d["init"], make(seqlen=6, ngroups=ngroups)["init"])


def test_step_float32_state_bf16_input():
    d = make(seqlen=1, dtype=torch.float32)
    state = d["init"].float()
    y, new = ssd_step(
        state, d["x"][:, 0].bfloat16(), d["dt"][:, 0], d["A"], d["B"][:, 0], d["C"][:, 0]
    )
    assert y.dtype == torch.bfloat16 and new.dtype == torch.float32


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("limit", [-1.0, 0.5, 1e9])  # segment-sum, mixed, factorised
def test_gradcheck(monkeypatch, limit, ngroups):
    monkeypatch.setitem(ssd_chunk._FACTOR_RANGE, torch.float64, limit)
    d = make(batch=1, seqlen=7, nheads=4, headdim=2, d_state=3, ngroups=ngroups)
    d["A"] = torch.tensor([-0.01, -3.0, -0.05, -0.4], dtype=torch.float64)
    names = ["x", "dt", "A", "B", "C", "D", "init", "z", "dt_bias"]
    inputs = tuple(d[k].clone().requires_grad_() for k in names)

    def fn(x, dt, A, B, C, D, init, z, dt_bias):
        return ssd_chunked_torch(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=3,
            D=D,
            z=z,
            dt_bias=dt_bias,
            dt_softplus=True,
            initial_state=init,
            return_final_state=True,
        )

    assert torch.autograd.gradcheck(fn, inputs)


def test_float32_close_to_float64_reference():
    d = make(batch=2, seqlen=3 * 64 + 5, nheads=4, headdim=8, d_state=16, ngroups=2)
    d32 = {k: v.float() for k, v in d.items()}
    y, final = ssd_chunked_torch(
        d32["x"],
        d32["dt"],
        d32["A"],
        d32["B"],
        d32["C"],
        chunk_size=64,
        D=d32["D"],
        initial_state=d32["init"],
        return_final_state=True,
    )
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    y_ref, final_ref = ssd_naive(
        d["x"], d["dt"], d["A"], d["B"], d["C"], D=d["D"], initial_state=d["init"]
    )
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-5
    assert ((final.double() - final_ref).norm() / final_ref.norm()).item() < 1e-5


def test_float32_factorised_near_range_limit():
    """Decay range just under the float32 factorisation limit: factors up to e^+-27."""
    d = make(seqlen=64, nheads=2, headdim=4, d_state=8, ngroups=1)
    d["dt"] = torch.full_like(d["dt"], 0.5)
    d["A"] = torch.tensor([-1.7, -0.1], dtype=torch.float64)  # range 63 * 0.85 = 53.6 < 60
    d32 = {k: v.float() for k, v in d.items()}
    y, final = ssd_chunked_torch(
        d32["x"],
        d32["dt"],
        d32["A"],
        d32["B"],
        d32["C"],
        chunk_size=64,
        initial_state=d32["init"],
        return_final_state=True,
    )
    y_ref, final_ref = ssd_naive(d["x"], d["dt"], d["A"], d["B"], d["C"], initial_state=d["init"])
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-5
    assert ((final.double() - final_ref).norm() / final_ref.norm()).item() < 1e-5


def test_bf16_autocast_keeps_state_float32():
    d = make(seqlen=40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, final = ssd_scan(
            d["x"].bfloat16(),
            d["dt"],
            d["A"],
            d["B"].bfloat16(),
            d["C"].bfloat16(),
            chunk_size=CHUNK,
            D=d["D"],
            z=d["z"].bfloat16(),
            initial_state=d["init"],
            return_final_state=True,
        )
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert torch.isfinite(final).all() and torch.isfinite(y.float()).all()
    y_ref, final_ref = ssd_naive(
        d["x"].bfloat16(),
        d["dt"],
        d["A"],
        d["B"].bfloat16(),
        d["C"].bfloat16(),
        D=d["D"],
        z=d["z"].bfloat16(),
        initial_state=d["init"],
    )
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=5e-2)


@pytest.mark.slow
def test_long_sequence_forward_backward_finite():
    seqlen = 65536
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, seqlen, 2, 4, generator=g, requires_grad=True)
    dt = torch.randn(1, seqlen, 2, generator=g, requires_grad=True)
    A = torch.tensor([-1.0, -8.0], requires_grad=True)
    B = torch.randn(1, seqlen, 1, 4, generator=g, requires_grad=True)
    C = torch.randn(1, seqlen, 1, 4, generator=g, requires_grad=True)
    start = time.perf_counter()
    y, final = ssd_chunked_torch(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=256,
        dt_bias=torch.full((2,), -2.0),
        dt_softplus=True,
        return_final_state=True,
    )
    (y.square().mean() + final.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    for t in (x, dt, A, B, C):
        assert torch.isfinite(t.grad).all()
    assert time.perf_counter() - start < 20

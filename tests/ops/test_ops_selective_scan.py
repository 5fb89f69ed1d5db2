"""Mamba-1 selective scan ops against the sequential per-token float64 recurrence
(selective_scan/naive.py)."""

from __future__ import annotations

import importlib
import time

import pytest
import torch

from layers.ops import (
    causal_conv1d,
    selective_scan,
    selective_scan_naive,
    selective_scan_step,
    selective_scan_torch,
)

CHUNK = 16
# By path: ``layers.ops.selective_scan`` is also the name of the function.
scan_module = importlib.import_module("layers.ops.selective_scan.chunk")


def make(batch=2, dim=6, seqlen=20, d_state=3, ngroups=None, dtype=torch.float64, seed=0):
    """ngroups=None gives B/C as (batch, d_state, seqlen)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    bc = (batch, d_state, seqlen) if ngroups is None else (batch, ngroups, d_state, seqlen)
    return dict(
        u=r(batch, dim, seqlen),
        delta=torch.rand(batch, dim, seqlen, generator=g, dtype=dtype) * 0.5,
        A=-(torch.rand(dim, d_state, generator=g, dtype=dtype) * 2 + 0.1),
        B=r(*bc),
        C=r(*bc),
        D=r(dim),
        z=r(batch, dim, seqlen),
        delta_bias=r(dim) * 0.5,
        init=r(batch, dim, d_state),
    )


def run(
    d, *, fn=selective_scan_torch, D=False, z=False, bias=False, init=False, grad=False, **extra
):
    kwargs = dict(
        D=d["D"] if D else None,
        z=d["z"] if z else None,
        delta_bias=d["delta_bias"] if bias else None,
        delta_softplus=bias,
        initial_state=d["init"] if init else None,
    )
    args = [d[k] for k in ("u", "delta", "A", "B", "C")]
    if grad:  # the differentiable path (otherwise the in-place inference path runs)
        args = [a.clone().requires_grad_() for a in args]
    out = fn(*args, return_final_state=True, **kwargs, **extra)
    ref = selective_scan_naive(*(d[k] for k in ("u", "delta", "A", "B", "C")), **kwargs)
    return tuple(o.detach() for o in out), ref


@pytest.mark.parametrize("seqlen", [1, 7, CHUNK, 3 * CHUNK + 5])
@pytest.mark.parametrize("ngroups", [None, 1, 2])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_matches_reference(seqlen, ngroups, init, grad):
    d = make(seqlen=seqlen, ngroups=ngroups)
    (y, final), (y_ref, final_ref) = run(d, init=init, grad=grad, chunk_size=CHUNK)
    assert y.shape == d["u"].shape and y.dtype == torch.float64
    assert final.shape == (2, 6, 3) and final.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("D", [False, True])
@pytest.mark.parametrize("z", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_options_match_reference(D, z, bias, grad):
    d = make(seqlen=2 * CHUNK + 3, ngroups=2)
    (y, final), (y_ref, final_ref) = run(d, D=D, z=z, bias=bias, init=True, grad=grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
def test_chunk_size_does_not_change_result(chunk_size):
    d = make(seqlen=41)
    (y, final), (y_ref, final_ref) = run(d, D=True, z=True, init=True, chunk_size=chunk_size)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grad", [False, True])
def test_huge_decay_exponents(grad):
    """exp(delta * A) underflows to ~0 here; the clamped fast paths must agree with exact."""
    d = make(seqlen=3 * CHUNK)
    d["delta"] = d["delta"] * 200  # exponents down to about -200
    (y, final), (y_ref, final_ref) = run(d, init=True, grad=grad, chunk_size=CHUNK)
    torch.testing.assert_close(y, y_ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(final, final_ref, rtol=1e-8, atol=1e-8)


def test_dispatch_on_cpu_uses_torch_path():
    d = make(seqlen=13, ngroups=3)
    (y, final), (y_ref, final_ref) = run(d, fn=selective_scan, D=True, z=True, bias=True, init=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    y_only = selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"])
    assert isinstance(y_only, torch.Tensor) and y_only.shape == d["u"].shape


@pytest.mark.parametrize("split", [1, CHUNK - 3, CHUNK + 2])
def test_two_pieces_equal_whole(split):
    """Prefill in two calls (conv state + SSM state handed over) == one call."""
    d = make(seqlen=2 * CHUNK + 4)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    kw = dict(D=d["D"], delta_bias=d["delta_bias"], delta_softplus=True)

    def block(sl, conv_state, ssm_state):
        x, conv_final = causal_conv1d(
            d["u"][..., sl],
            w,
            activation="silu",
            initial_state=conv_state,
            return_final_state=True,
        )
        y, ssm_final = selective_scan(
            x,
            d["delta"][..., sl],
            d["A"],
            d["B"][..., sl],
            d["C"][..., sl],
            z=d["z"][..., sl],
            initial_state=ssm_state,
            return_final_state=True,
            **kw,
        )
        return y, conv_final, ssm_final

    y, conv_f, ssm_f = block(slice(None), None, None)
    y1, c1, s1 = block(slice(0, split), None, None)
    y2, c2, s2 = block(slice(split, None), c1, s1)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c2, conv_f)
    torch.testing.assert_close(s2, ssm_f, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ngroups", [None, 2])
def test_step_matches_scan(ngroups):
    d = make(seqlen=6, ngroups=ngroups)
    opts = dict(D=d["D"], delta_bias=d["delta_bias"], delta_softplus=True)
    y_scan, final_scan = selective_scan_torch(
        d["u"],
        d["delta"],
        d["A"],
        d["B"],
        d["C"],
        z=d["z"],
        initial_state=d["init"],
        return_final_state=True,
        **opts,
    )
    state = d["init"].clone()
    for t in range(6):
        y_t, state = selective_scan_step(
            state,
            d["u"][..., t],
            d["delta"][..., t],
            d["A"],
            d["B"][..., t],
            d["C"][..., t],
            z=d["z"][..., t],
            **opts,
        )
        torch.testing.assert_close(y_t, y_scan[..., t], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final_scan, rtol=1e-10, atol=1e-10)
    assert torch.equal(d["init"], make(seqlen=6, ngroups=ngroups)["init"])


def test_gradcheck():
    d = make(batch=2, dim=4, seqlen=9, d_state=3, ngroups=2)
    names = ["u", "delta", "A", "B", "C", "D", "init", "z", "delta_bias"]
    inputs = tuple(d[k].clone().requires_grad_() for k in names)

    def fn(u, delta, A, B, C, D, init, z, delta_bias):
        return selective_scan_torch(
            u,
            delta,
            A,
            B,
            C,
            D=D,
            z=z,
            delta_bias=delta_bias,
            delta_softplus=True,
            initial_state=init,
            return_final_state=True,
            chunk_size=4,
        )

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_without_initial_state():
    d = make(batch=1, dim=2, seqlen=10, d_state=2)
    inputs = tuple(d[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C"))

    def fn(*args):
        return selective_scan_torch(*args, return_final_state=True, chunk_size=3)

    assert torch.autograd.gradcheck(fn, inputs)


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "init")


def gradients(fn, d, names, seed=1):
    """Gradients w.r.t. ``names`` of a fixed random linear functional of fn's (y, final)."""
    inputs = {k: d[k].clone().requires_grad_() for k in names}
    y, final = fn(**inputs)
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    wf = torch.randn(final.shape, generator=g, dtype=torch.float64)
    ((y.double() * wy).sum() + (final.double() * wf).sum()).backward()
    return {k: inputs[k].grad.double() for k in names}


def torch_scan(chunk_size=None, **kw):
    """selective_scan_torch with every option on, inputs by name (see GRAD_NAMES)."""
    return selective_scan_torch(
        kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"],
        delta_bias=kw["delta_bias"], delta_softplus=True, initial_state=kw.get("init"),
        return_final_state=True, chunk_size=chunk_size,
    )  # fmt: skip


def reference_scan(**kw):
    return selective_scan_naive(
        kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"],
        delta_bias=kw["delta_bias"], delta_softplus=True, initial_state=kw.get("init"),
    )  # fmt: skip


@pytest.mark.parametrize("segment_elems", [1, 100, 650, 1000, 1 << 18])
@pytest.mark.parametrize("chunk_size", [5, 16, None])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("ngroups", [None, 2])
def test_gradients_match_reference(monkeypatch, segment_elems, chunk_size, init, ngroups):
    """The hand-written backward against autograd through the sequential float64 recurrence,
    with one or several chunks and one or several backward segments per chunk (so that the
    checkpoints, the carried-in share of later chunks' checkpoints and the gradient carried
    back across chunk ends are all exercised)."""
    monkeypatch.setattr(scan_module, "_SEGMENT_ELEMS", segment_elems)
    d = make(seqlen=37, ngroups=ngroups)
    names = GRAD_NAMES if init else GRAD_NAMES[:-1]
    ours = gradients(lambda **kw: torch_scan(chunk_size, **kw), d, names)
    ref = gradients(reference_scan, d, names)
    for name in names:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-9, atol=1e-9, msg=name)


def test_gradcheck_several_segments(monkeypatch):
    monkeypatch.setattr(scan_module, "_SEGMENT_ELEMS", 40)  # a few steps per segment
    d = make(batch=2, dim=4, seqlen=11, d_state=3, ngroups=2)
    inputs = {k: d[k].clone().requires_grad_() for k in GRAD_NAMES}

    def fn(*args):
        return torch_scan(4, **dict(zip(GRAD_NAMES, args, strict=True)))

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


@pytest.mark.parametrize("chunk_size", [None, 64])
def test_float32_gradients_close_to_float64_reference(chunk_size):
    """Training-sized float32 scan: every gradient within 1e-5 (relative norm) of float64."""
    d = make(batch=2, dim=64, seqlen=512, d_state=16, ngroups=2)
    d32 = {k: v.float() for k, v in d.items()}
    ours = gradients(lambda **kw: torch_scan(chunk_size, **kw), d32, GRAD_NAMES)
    ref = gradients(reference_scan, d, GRAD_NAMES)
    for name in GRAD_NAMES:
        error = (ours[name] - ref[name]).norm() / ref[name].norm()
        assert error < 1e-5, (name, error.item())


@pytest.mark.parametrize("grad", [False, True])
def test_float32_close_to_float64_reference(grad):
    d = make(batch=2, dim=32, seqlen=300, d_state=16)
    d32 = {k: v.float() for k, v in d.items()}
    (y, final), _ = run(d32, D=True, init=True, grad=grad)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    y_ref, final_ref = selective_scan_naive(
        d["u"], d["delta"], d["A"], d["B"], d["C"], D=d["D"], initial_state=d["init"]
    )
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-5
    assert ((final.double() - final_ref).norm() / final_ref.norm()).item() < 1e-5


def test_bf16_autocast_keeps_state_float32():
    d = make(seqlen=40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, final = selective_scan(
            d["u"].bfloat16(),
            d["delta"].bfloat16(),
            d["A"],
            d["B"].bfloat16(),
            d["C"].bfloat16(),
            D=d["D"],
            z=d["z"].bfloat16(),
            initial_state=d["init"],
            return_final_state=True,
        )
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert torch.isfinite(final).all() and torch.isfinite(y.float()).all()
    y_ref, final_ref = selective_scan_naive(
        d["u"].bfloat16(),
        d["delta"].bfloat16(),
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
    u = torch.randn(1, 4, seqlen, generator=g, requires_grad=True)
    delta = torch.randn(1, 4, seqlen, generator=g, requires_grad=True)
    A = (-torch.arange(1.0, 5.0).repeat(4, 1)).requires_grad_()
    B = torch.randn(1, 4, seqlen, generator=g, requires_grad=True)
    C = torch.randn(1, 4, seqlen, generator=g, requires_grad=True)
    start = time.perf_counter()
    y, final = selective_scan_torch(
        u,
        delta,
        A,
        B,
        C,
        delta_bias=torch.full((4,), -2.0),
        delta_softplus=True,
        return_final_state=True,
    )
    (y.square().mean() + final.square().mean()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    for t in (u, delta, A, B, C):
        assert torch.isfinite(t.grad).all()
    with torch.no_grad():  # the in-place inference path
        y2 = selective_scan_torch(
            u, delta, A, B, C, delta_bias=torch.full((4,), -2.0), delta_softplus=True
        )
    torch.testing.assert_close(y2, y.detach())
    assert time.perf_counter() - start < 20

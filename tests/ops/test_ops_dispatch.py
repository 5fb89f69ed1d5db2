"""Kernel dispatch plumbing, checked on CPU with stand-ins for the CUDA kernels.

No GPU here, so the real kernels cannot run (tests/ops/test_kernels_gpu.py does that on a GPU).
These stand-ins have the exact Python signatures of mamba_ssm 2.x / causal-conv1d 1.4+, check
the shapes those kernels document, and compute with our PyTorch path (the scans) or the
kernels' own reference formulas (the one-token updates, which also update their state argument
in place as the kernels do). Routing the ops and blocks through them shows that every argument
reaches the kernel under the right name and layout.
"""

from __future__ import annotations

import contextlib
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hybrid import HybridConfig, HybridLM
from layers.ops import (
    causal_conv1d_step,
    selective_scan_step,
    selective_scan_torch,
    ssd_chunked_torch,
    ssd_step,
)

# The modules that choose kernel or PyTorch, by path (layers.ops.selective_scan is also the
# name of a function).
conv_module = importlib.import_module("layers.ops.conv.dispatch")
selective_scan_module = importlib.import_module("layers.ops.selective_scan.dispatch")
ssd_module = importlib.import_module("layers.ops.ssd.dispatch")
CALLS: list[str] = []
# Whether each selective_state_update call took the kernel's tied-headdim path (one dt and A
# per head, detected from stride-0 expands as in mamba_ssm's Mamba2.step).
TIE_HDIM: list[bool] = []


def mamba_chunk_scan_combined(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
    seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
    return_final_states=False, return_varlen_states=False,
):  # fmt: skip
    batch, seqlen, nheads, _ = x.shape
    assert dt.shape == (batch, seqlen, nheads) and A.shape == (nheads,)
    assert B.shape[:2] == (batch, seqlen) and B.shape == C.shape and B.dim() == 4
    assert isinstance(chunk_size, int) and seq_idx is None and cu_seqlens is None
    CALLS.append("mamba_chunk_scan_combined")
    return ssd_chunked_torch(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
        dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=initial_states,
        return_final_state=return_final_states,
    )  # fmt: skip


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False,
):  # fmt: skip
    batch, dim, seqlen = u.shape
    assert delta.shape == u.shape and A.shape[0] == dim and A.dtype == torch.float32
    assert B.shape in ((batch, A.shape[1], seqlen),) or B.dim() == 4
    CALLS.append("selective_scan_fn")
    return selective_scan_torch(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        return_final_state=return_last_state,
    )  # fmt: skip


def causal_conv1d_fn(
    x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
    final_states_out=None, activation=None,
):  # fmt: skip
    assert x.dim() == 3 and weight.shape == (x.shape[1], weight.shape[1])
    assert activation in (None, "silu", "swish") and initial_states is None
    CALLS.append("causal_conv1d_fn")
    width = weight.shape[1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(y) if activation else y


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
    state_batch_indices=None,
):  # fmt: skip
    """mamba_ssm 2.x: state (batch, [nheads,] dim, dstate) is updated in place; returns out."""
    has_heads = state.dim() > 3
    if not has_heads:  # single-head form: every argument lacks the heads dimension
        assert x.dim() == dt.dim() == A.dim() == B.dim() == C.dim() == 2
        state, x, dt, A = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        D = None if D is None else D.unsqueeze(0)
        z = None if z is None else z.unsqueeze(1)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    batch, nheads, dim, dstate = state.shape
    ngroups = B.shape[1]
    assert x.shape == dt.shape == (batch, nheads, dim) and A.shape == (nheads, dim, dstate)
    assert nheads % ngroups == 0 and B.shape == C.shape == (batch, ngroups, dstate)
    assert z is None or z.shape == x.shape
    assert state_batch_indices is None
    # The real wrapper (some 2.x releases) unpacks ``*(D.stride(0), D.stride(1)) if D is not None
    # else 0``, a TypeError for None; the dispatcher must always pass D and dt_bias.
    if D is None or dt_bias is None:
        raise TypeError("argument after * must be an iterable, not int")
    assert D.shape == dt_bias.shape == (nheads, dim)
    TIE_HDIM.append(
        A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0
    )
    CALLS.append("selective_state_update")
    # selective_state_update_ref's formula, in float32 like the Triton kernel.
    dt = dt.float() + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.float().repeat_interleave(nheads // ngroups, dim=1)[:, :, None, :]
    Ch = C.float().repeat_interleave(nheads // ngroups, dim=1)[:, :, None, :]
    new = state.float() * torch.exp(dt[..., None] * A.float()) + (dt * x.float())[..., None] * Bh
    state.copy_(new)
    out = (new * Ch).sum(-1) + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)


def causal_conv1d_update(
    x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None
):
    """causal-conv1d 1.4+: conv_state (batch, dim, state_len >= width - 1), updated in place."""
    assert activation in (None, "silu", "swish")
    assert cache_seqlens is None and conv_state_indices is None
    kernel_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    assert x.dtype in kernel_dtypes and weight.dtype in kernel_dtypes
    assert conv_state.dtype == x.dtype
    unsqueeze = x.dim() == 2
    if unsqueeze:
        x = x.unsqueeze(-1)
    batch, dim, _ = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    assert 2 <= width <= 4 and weight.shape == (dim, width)
    assert conv_state.shape == (batch, dim, state_len) and state_len >= width - 1
    assert bias is None or (bias.shape == (dim,) and bias.dtype == weight.dtype)
    assert bias is None or bias.stride(-1) == 1
    CALLS.append("causal_conv1d_update")
    # causal_conv1d_update_ref's formula.
    x_new = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
    conv_state.copy_(x_new[:, :, -state_len:])
    out = F.conv1d(x_new, weight.unsqueeze(1), bias, groups=dim)[:, :, -x.shape[-1] :]
    if unsqueeze:
        out = out.squeeze(-1)
    return (out if activation is None else F.silu(out)).to(x.dtype)


@pytest.fixture
def stand_in_kernels(monkeypatch):
    mamba = SimpleNamespace(
        mamba_chunk_scan_combined=mamba_chunk_scan_combined,
        selective_scan_fn=selective_scan_fn,
        selective_state_update=selective_state_update,
    )
    conv = SimpleNamespace(
        causal_conv1d_fn=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update
    )
    for module in (ssd_module, selective_scan_module):
        monkeypatch.setattr(module, "mamba_ssm_ops", lambda: mamba)
        monkeypatch.setattr(module, "use_kernels", lambda *tensors: True)
    monkeypatch.setattr(conv_module, "causal_conv1d_ops", lambda: conv)
    monkeypatch.setattr(conv_module, "use_kernels", lambda *tensors: True)
    CALLS.clear()
    TIE_HDIM.clear()
    yield


@contextlib.contextmanager
def torch_paths():
    """Inside: the ops take their PyTorch paths again (on top of ``stand_in_kernels``)."""
    with pytest.MonkeyPatch.context() as patch:
        for module in (ssd_module, selective_scan_module, conv_module):
            patch.setattr(module, "use_kernels", lambda *tensors: False)
        yield


@pytest.mark.parametrize("pattern", ["M", "S", "MS*-"])
def test_blocks_route_through_the_kernel_signatures(pattern, stand_in_kernels):
    config = HybridConfig(
        pattern,
        vocab_size=32,
        d_model=32,
        mamba2={"d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16},
        mamba1={"d_state": 4, "inner_norms": True},
    )
    torch.manual_seed(0)
    model = HybridLM(config)
    ids = torch.randint(0, 32, (2, 37))
    routed = model(ids).logits
    expected_calls = {"causal_conv1d_fn"}
    expected_calls |= {"mamba_chunk_scan_combined"} if "M" in pattern else set()
    expected_calls |= {"selective_scan_fn"} if "S" in pattern else set()
    assert set(CALLS) == expected_calls
    CALLS.clear()
    with torch_paths():
        direct = model(ids).logits
    assert not CALLS
    torch.testing.assert_close(routed, direct)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32)


def _run_both(step, state: torch.Tensor, *args, **kwargs):
    """``step`` through the stand-in kernel and through the PyTorch path.

    Checks that the caller's state is left alone by both and that a new state comes back.
    """
    before = state.clone()
    CALLS.clear()
    y_k, state_k = step(state, *args, **kwargs)
    routed = list(CALLS)
    assert torch.equal(state, before), "the step modified the state passed in"
    assert state_k.data_ptr() != state.data_ptr()
    CALLS.clear()
    with torch_paths():
        y_t, state_t = step(state, *args, **kwargs)
    assert not CALLS
    assert y_k.dtype == y_t.dtype and state_k.dtype == state_t.dtype == state.dtype
    assert y_k.shape == y_t.shape and state_k.shape == state_t.shape
    torch.testing.assert_close(y_k, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_k, state_t, rtol=1e-5, atol=1e-5)
    return routed, y_k, state_k


SSD_OPTIONS = [
    {},
    {"D": "head", "dt_bias": True, "dt_softplus": True},
    {"D": "headdim", "z": True, "dt_bias": True, "dt_softplus": True},
    {"z": True, "dt_softplus": True},
]


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("options", SSD_OPTIONS)
def test_ssd_step_routes_through_selective_state_update(ngroups, options, stand_in_kernels):
    torch.manual_seed(0)
    batch, nheads, headdim, d_state = 2, 4, 8, 5
    state = _randn(batch, nheads, headdim, d_state)
    A = -torch.rand(nheads) * 2 - 0.1
    kw = {"dt_softplus": options.get("dt_softplus", False)}
    if options.get("D") == "head":
        kw["D"] = _randn(nheads)
    elif options.get("D") == "headdim":
        kw["D"] = _randn(nheads, headdim)
    if options.get("z"):
        kw["z"] = _randn(batch, nheads, headdim)
    if options.get("dt_bias"):
        kw["dt_bias"] = _randn(nheads) - 1
    for _ in range(3):  # a few tokens, each step starting from the previous state
        x = _randn(batch, nheads, headdim)
        dt = torch.rand(batch, nheads) if not kw["dt_softplus"] else _randn(batch, nheads)
        B, C = _randn(batch, ngroups, d_state), _randn(batch, ngroups, d_state)
        routed, _, state = _run_both(ssd_step, state, x, dt, A, B, C, **kw)
        assert routed == ["selective_state_update"]
    # dt, A and dt_bias reach the kernel as stride-0 expands over headdim, like Mamba2.step.
    assert TIE_HDIM and all(TIE_HDIM)


def test_ssd_step_with_dt_limit_keeps_the_torch_path(stand_in_kernels):
    """selective_state_update has no dt_limit clamp."""
    torch.manual_seed(0)
    state, x = _randn(2, 4, 8, 5), _randn(2, 4, 8)
    args = (_randn(2, 4), -torch.rand(4) - 0.1, _randn(2, 1, 5), _randn(2, 1, 5))
    ssd_step(state, x, *args, dt_softplus=True, dt_limit=(0.01, 0.1))
    assert not CALLS
    ssd_step(state, x, *args, dt_softplus=True, dt_limit=(0.0, float("inf")))
    assert CALLS == ["selective_state_update"]


def test_steps_keep_the_torch_path_for_autograd_and_float64(stand_in_kernels):
    """The update kernels have no backward, and compute in float32."""
    torch.manual_seed(0)
    state = _randn(2, 4, 8, 5)
    x = _randn(2, 4, 8).requires_grad_()
    args = (_randn(2, 4), -torch.rand(4) - 0.1, _randn(2, 1, 5), _randn(2, 1, 5))
    y, new_state = ssd_step(state, x, *args, dt_softplus=True)
    (y.sum() + new_state.sum()).backward()
    assert x.grad is not None and not CALLS
    with torch.no_grad():
        ssd_step(state, x, *args, dt_softplus=True)
    assert CALLS == ["selective_state_update"]
    CALLS.clear()
    ssd_step(state.double(), x.detach(), *args, dt_softplus=True)
    u = _randn(2, 6).requires_grad_()
    A1 = -torch.rand(6, 3) - 0.1
    selective_scan_step(_randn(2, 6, 3), u, _randn(2, 6), A1, _randn(2, 3), _randn(2, 3))
    selective_scan_step(
        _randn(2, 6, 3).double(), u.detach(), _randn(2, 6), A1, _randn(2, 3), _randn(2, 3)
    )
    conv_x = _randn(2, 6).requires_grad_()
    causal_conv1d_step(conv_x, _randn(2, 6, 3), _randn(6, 4))
    causal_conv1d_step(conv_x.detach().double(), _randn(2, 6, 3).double(), _randn(6, 4))
    assert not CALLS


SELECTIVE_OPTIONS = [
    {},
    {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
    {"z": True, "delta_softplus": True},
]


@pytest.mark.parametrize("ngroups", [None, 1, 3])
@pytest.mark.parametrize("options", SELECTIVE_OPTIONS)
def test_selective_scan_step_routes_through_selective_state_update(
    ngroups, options, stand_in_kernels
):
    """Shared B/C: single-head form; grouped B/C: one kernel head per group."""
    torch.manual_seed(0)
    batch, dim, d_state = 2, 12, 4
    state = _randn(batch, dim, d_state)
    A = -torch.rand(dim, d_state) * 2 - 0.1
    kw = {"delta_softplus": options.get("delta_softplus", False)}
    if options.get("D"):
        kw["D"] = _randn(dim)
    if options.get("delta_bias"):
        kw["delta_bias"] = _randn(dim) - 1
    bc = (batch, d_state) if ngroups is None else (batch, ngroups, d_state)
    for _ in range(3):
        u = _randn(batch, dim)
        delta = _randn(batch, dim) if kw["delta_softplus"] else torch.rand(batch, dim)
        if options.get("z"):
            kw["z"] = _randn(batch, dim)
        routed, y, state = _run_both(
            selective_scan_step, state, u, delta, A, _randn(*bc), _randn(*bc), **kw
        )
        assert routed == ["selective_state_update"]
        assert y.shape == (batch, dim) and state.shape == (batch, dim, d_state)
    assert not any(TIE_HDIM)


def test_selective_scan_step_accepts_strided_inputs(stand_in_kernels):
    """Slices of (batch, seqlen, dim) activations, as the Mamba-1 block passes them."""
    torch.manual_seed(0)
    batch, dim, d_state = 2, 12, 4
    state = _randn(batch, dim, d_state).transpose(1, 2).contiguous().transpose(1, 2)
    u, delta, z = (_randn(batch, 3, dim)[:, 1] for _ in range(3))
    B, C = (_randn(batch, 3, 2, d_state)[:, 1] for _ in range(2))
    A = -torch.rand(dim, d_state) - 0.1
    routed, _, _ = _run_both(
        selective_scan_step, state, u, delta, A, B, C, z=z, D=_randn(dim), delta_softplus=True
    )
    assert routed == ["selective_state_update"]


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_causal_conv1d_step_routes_through_causal_conv1d_update(
    width, activation, with_bias, stand_in_kernels
):
    """Our (batch, dim, width - 1) state goes to the kernel as is (causal-conv1d >= 1.4)."""
    torch.manual_seed(0)
    batch, dim = 2, 6
    weight = _randn(dim, width)
    bias = _randn(dim) if with_bias else None
    state = _randn(batch, dim, width - 1)
    for _ in range(width + 1):  # enough tokens to shift every initial column out
        x = _randn(batch, dim)
        routed, _, state = _run_both(
            lambda s, *args, x=x, **kw: causal_conv1d_step(x, s, *args, **kw),
            state,
            weight,
            bias,
            activation=activation,
        )
        assert routed == ["causal_conv1d_update"]
        assert state.shape == (batch, dim, width - 1)
        torch.testing.assert_close(state[..., -1], x)


def test_causal_conv1d_step_keeps_the_torch_path_outside_the_kernel_limits(stand_in_kernels):
    torch.manual_seed(0)
    batch, dim = 2, 6
    x = _randn(batch, dim)
    causal_conv1d_step(x, _randn(batch, dim, 4), _randn(dim, 5))  # width 5
    causal_conv1d_step(x.bfloat16(), _randn(batch, dim, 3), _randn(dim, 4))  # state dtype
    causal_conv1d_step(x, _randn(batch, dim, 3), _randn(dim, 4), _randn(dim).double())  # bias
    assert not CALLS
    causal_conv1d_step(x.bfloat16(), _randn(batch, dim, 3).bfloat16(), _randn(dim, 4))
    assert CALLS == ["causal_conv1d_update"]


@pytest.mark.parametrize("pattern", ["M", "S", "MS*-"])
def test_decoding_routes_through_the_update_kernels(pattern, stand_in_kernels):
    """Prefill with the cache, then one-token steps: the blocks' step paths use the kernels."""
    config = HybridConfig(
        pattern,
        vocab_size=32,
        d_model=32,
        mamba2={"d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16},
        mamba1={"d_state": 4, "inner_norms": True},
    )
    torch.manual_seed(0)
    model = HybridLM(config)
    ids = torch.randint(0, 32, (2, 24))

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            cache = model.allocate_cache(2, ids.shape[1])
            logits = [model(ids[:, :19], cache=cache).logits]
            for t in range(19, ids.shape[1]):
                logits.append(model(ids[:, t : t + 1], cache=cache).logits)
        return torch.cat(logits, dim=1)

    routed = decode()
    n_mamba = pattern.count("M") + pattern.count("S")
    assert CALLS.count("selective_state_update") == 5 * n_mamba
    assert CALLS.count("causal_conv1d_update") == 5 * n_mamba
    CALLS.clear()
    with torch_paths():
        direct = decode()
    assert not CALLS
    torch.testing.assert_close(routed, direct, rtol=1e-4, atol=1e-4)
    # And the decoded logits match a full forward.
    with torch.inference_mode(), torch_paths():
        full = model(ids).logits
    torch.testing.assert_close(routed, full, rtol=1e-4, atol=1e-4)

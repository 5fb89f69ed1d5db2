"""The gated delta rule through flash-linear-attention's Triton kernels (interpreted):
``chunk_gated_delta_rule`` for sequences (with documents as fla's varlen ``cu_seqlens``),
``fused_recurrent_gated_delta_rule`` for decode steps, and for a decay per key channel (Kimi
Delta Attention, g (batch, seqlen, nv_heads, head_k_dim)) ``chunk_kda`` and
``fused_recurrent_kda``; each against our CPU path and the float64 recurrence of references.py.

Tolerances, measured: the largest differences over the four scan cases and the two step cases,
seeds 0-4, fp32 kernel vs our fp32 CPU path / vs float64 (in brackets, for comparison, our fp32
CPU path vs float64): scan outputs 1.2e-6 / 1.1e-6 (8e-7), final states 3.3e-6 / 1.1e-6
(2.3e-6), gradients 5.5e-6 / 4.8e-6 (2.6e-6) of each gradient's largest entry; decode steps
1e-7 in the output (6e-8 before the second step case had a custom scale) and 2.4e-7 in the
state. The kernel is as close to float64 as our CPU path
is: both round in fp32 a chunked computation done in different orders. The bounds (SCAN_TOL,
GRAD_TOL, STEP_TOL) are about ten times those; a wrong argument shows far above them (beta
passed where fla reads gk, the bug these tests found in the step: NaN).

The same for the five kda scan cases and the two kda step cases (g per key channel in [-3, 0]
per token): scan outputs 7.2e-7 / 6.3e-7 (3.4e-7), final states 1.9e-6 / 1.3e-6 (1.8e-6),
gradients 6.7e-6 / 6.4e-6 (5.0e-6) (the largest: g's); decode steps 8e-8 in the output and
2.4e-7 in the state; the same bounds hold them with a margin of seven or more. The bug these
found: chunk_kda asserts a float32 initial state, which a bfloat16 state cache did not give it.

Runtime: interpreted, chunk_kda's intra-chunk forward is one program per (token, value head),
about 45 ms each on one CPU core, so its cases are smaller than the per-head ones (all kda tests
together about a minute).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.ops.delta import gated_delta_rule, gated_delta_step
from tests.kernel_mode import references

CHUNK = 64  # fla's chunk; our CPU path's chunk_size, to compare like with like
SCAN_TOL = 3e-5  # outputs and final states, absolute and relative
GRAD_TOL = 5e-5  # relative, and absolute in units of the gradient's largest entry
STEP_TOL = 3e-6


def make(seqlen: int, nk: int, nv: int, dk: int, dv: int, *, batch: int = 2, seed: int = 0,
         channel: bool = False):  # fmt: skip
    """Inputs as a Gated DeltaNet block makes them: q, k unit vectors per head, g <= 0 (decay
    per token between exp(-1.5) and 1), beta in (0, 1). ``channel``: g per key channel, as a
    Kimi Delta Attention block makes it, each between -3 and 0 (decays to exp(-3) ~ 0.05 per
    token, so a channel forgets within a few tokens and another keeps its past)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if channel:
        g = -3.0 * torch.rand(batch, seqlen, nv, dk, generator=gen)
    else:
        g = -1.5 * torch.rand(batch, seqlen, nv, generator=gen)
    return {
        "q": F.normalize(r(batch, seqlen, nk, dk), dim=-1),
        "k": F.normalize(r(batch, seqlen, nk, dk), dim=-1),
        "v": r(batch, seqlen, nv, dv),
        "g": g,
        "beta": torch.sigmoid(r(batch, seqlen, nv)),
        "initial_state": r(batch, nv, dk, dv) * 0.5,
    }


SCAN_CASES = [
    pytest.param(
        {"seqlen": 100, "heads": (2, 4, 16, 32), "initial_state": True, "final_state": True},
        id="gva-states-across-chunks",
    ),
    pytest.param(
        {"seqlen": 64, "heads": (2, 2, 32, 16), "scale": 0.3}, id="one-chunk-scale-output-only"
    ),
    pytest.param({"seqlen": 37, "heads": (1, 2, 16, 16), "final_state": True}, id="final-state"),
    pytest.param(
        {"seqlen": 96, "heads": (2, 4, 16, 16), "documents": True}, id="documents-across-chunks"
    ),
    # A decay per key channel: fla's chunk_kda. Smaller than the cases above: its intra-chunk
    # forward runs one interpreted program per (token, value head), about 45 ms each here.
    pytest.param(
        dict(seqlen=80, heads=(1, 2, 16, 16), initial_state=True, final_state=True, channel=True),
        id="kda-gva-states-across-chunks",
    ),
    pytest.param(
        {"seqlen": 40, "heads": (2, 2, 16, 16), "scale": 0.3, "channel": True},
        id="kda-part-chunk-scale-output-only",
    ),
    pytest.param(
        {"seqlen": 24, "heads": (1, 1, 16, 32), "final_state": True, "channel": True},
        id="kda-final-state",
    ),
    pytest.param(
        {"seqlen": 20, "heads": (1, 2, 32, 16), "initial_state": True, "channel": True},
        id="kda-gva-initial-state",
    ),
    pytest.param(
        {"seqlen": 80, "heads": (1, 2, 16, 16), "documents": "long", "channel": True},
        id="kda-documents-across-chunks",
    ),
]


def seq_idx(seqlen: int) -> torch.Tensor:
    """Row 0: three documents, one ending inside the first chunk, one across the chunk edge,
    a short last one; row 1: two documents, the second starting at the chunk edge."""
    first = [0] * 20 + [1] * (seqlen - 36) + [2] * 16
    second = [7] * CHUNK + [3] * (seqlen - CHUNK)
    return torch.tensor([first, second])


def long_documents(seqlen: int) -> torch.Tensor:
    """Row 0: a short document ending inside the first chunk, then one longer than fla's
    chunk (fla chunks each document of its varlen form on its own, so only a document longer
    than 64 tokens crosses one of its chunk edges); row 1: three documents, the last starting
    at the chunk edge."""
    first = [0] * 10 + [1] * (seqlen - 10)
    second = [7] * 30 + [3] * (CHUNK - 30) + [5] * (seqlen - CHUNK)
    return torch.tensor([first, second])


def scan_with_grads(scan, data: dict[str, torch.Tensor], case: dict, dtype: torch.dtype):
    """``scan``'s output (and final state) and the gradients of a fixed random loss of them."""
    names = ["q", "k", "v", "g", "beta"] + (["initial_state"] if case.get("initial_state") else [])
    leaves = {n: data[n].to(dtype, copy=True).requires_grad_() for n in names}
    kw = {"scale": case.get("scale"), "initial_state": leaves.get("initial_state")}
    if case.get("documents"):
        documents = long_documents if case["documents"] == "long" else seq_idx
        kw["seq_idx"] = documents(case["seqlen"])
    o, state = scan(*(leaves[n] for n in names[:5]), final_state=case.get("final_state"), **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    if state is not None:
        loss = loss + (state.double() * torch.randn(state.shape, generator=gen).double()).sum()
    loss.backward()
    outs = (o.detach().double(), None if state is None else state.detach().double())
    return outs, {n: leaf.grad for n, leaf in leaves.items()}


def ours(q, k, v, g, beta, *, final_state, **kw):
    out = gated_delta_rule(
        q, k, v, g, beta, chunk_size=CHUNK, return_final_state=bool(final_state), **kw
    )
    return out if final_state else (out, None)


def reference(q, k, v, g, beta, *, final_state, **kw):
    o, state = references.gated_delta(q, k, v, g, beta, **kw)
    return o, state if final_state else None


@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_forward_and_backward(case, kernels, torch_paths):
    channel = case.get("channel", False)
    data = make(case["seqlen"], *case["heads"], channel=channel)
    kernel_out, kernel_grads = scan_with_grads(ours, data, case, torch.float32)
    assert kernels.names == ["chunk_kda" if channel else "chunk_gated_delta_rule"]
    kernels.clear()
    with torch_paths():
        torch_out, torch_grads = scan_with_grads(ours, data, case, torch.float32)
    assert not kernels.names
    ref_out, ref_grads = scan_with_grads(reference, data, case, torch.float64)

    for other in (torch_out, ref_out):
        torch.testing.assert_close(kernel_out[0], other[0], rtol=SCAN_TOL, atol=SCAN_TOL)
        if case.get("final_state"):
            torch.testing.assert_close(kernel_out[1], other[1], rtol=SCAN_TOL, atol=SCAN_TOL)
    assert kernel_grads.keys() == torch_grads.keys() == ref_grads.keys()
    for name, grad in kernel_grads.items():
        scale = ref_grads[name].abs().max().item()
        for other in (torch_grads[name], ref_grads[name]):
            torch.testing.assert_close(
                grad.double(), other.double(), rtol=GRAD_TOL, atol=GRAD_TOL * scale, msg=name
            )


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize(
    "heads, scale", [((2, 4, 16, 32), None), ((2, 2, 32, 16), 0.3)], ids=["gva", "mha-scale"]
)
def test_step_through_fused_recurrent(heads, scale, channel, kernels, torch_paths):
    """Three decode steps from a random state equal the recurrence over those three tokens
    (fused_recurrent_gated_delta_rule, or fused_recurrent_kda for a decay per key channel)."""
    name = "fused_recurrent_kda" if channel else "fused_recurrent_gated_delta_rule"
    data = make(3, *heads, channel=channel)
    state = data["initial_state"].clone()
    ref_o, ref_state = references.gated_delta(
        *(data[n] for n in ("q", "k", "v", "g", "beta")), scale=scale, initial_state=state
    )
    with torch.inference_mode():
        for t in range(3):
            token = [data[n][:, t] for n in ("q", "k", "v", "g", "beta")]
            kernels.clear()
            torch_state = state.clone()
            o = gated_delta_step(state, *token, scale=scale)  # in place
            assert kernels.names == [name]
            with torch_paths():
                o_torch = gated_delta_step(torch_state, *token, scale=scale)
            assert len(kernels.names) == 1
            torch.testing.assert_close(o, o_torch, rtol=STEP_TOL, atol=STEP_TOL)
            torch.testing.assert_close(state, torch_state, rtol=STEP_TOL, atol=STEP_TOL)
            torch.testing.assert_close(o.double(), ref_o[:, t], rtol=STEP_TOL, atol=STEP_TOL)
    torch.testing.assert_close(state.double(), ref_state, rtol=STEP_TOL, atol=STEP_TOL)


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
def test_keeps_the_torch_path_where_the_kernels_do_not_apply(channel, kernels):
    """float64 anywhere (fla's kernels compute in float32 and fail on float64 operands),
    documents with a state in or out (fla's varlen form takes one state per document, ours is
    one per row), autograd through a step (fused_recurrent is called without a backward);
    the same for a decay per key channel (chunk_kda, fused_recurrent_kda)."""
    data = make(8, 1, 2, 16, 16, channel=channel)
    qkvgb = [data[n] for n in ("q", "k", "v", "g", "beta")]
    state = data["initial_state"]
    docs = torch.tensor([[0] * 4 + [1] * 4] * 2)
    with torch.inference_mode():
        o64 = gated_delta_rule(*(t.double() for t in qkvgb))
        _, state64 = gated_delta_rule(*qkvgb, initial_state=state.double(), return_final_state=True)
        gated_delta_rule(*qkvgb, seq_idx=docs, initial_state=state)
        gated_delta_rule(*qkvgb, seq_idx=docs, return_final_state=True)
        step = [t[:, 0] for t in qkvgb]
        gated_delta_step(state.double(), *step)
        gated_delta_step(state.clone(), *(t.double() for t in step))
    assert o64.dtype == state64.dtype == torch.float64
    q = step[0].clone().requires_grad_()
    o = gated_delta_step(state.clone(), q, *step[1:])
    o.sum().backward()
    assert q.grad is not None
    assert not kernels.names
    with torch.inference_mode():
        gated_delta_rule(*qkvgb, seq_idx=docs)
        gated_delta_step(state.clone(), *step)
    if channel:
        assert kernels.names == ["chunk_kda", "fused_recurrent_kda"]
    else:
        assert kernels.names == ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]


@pytest.mark.parametrize("channel", [False, True], ids=["gdn", "kda"])
def test_scan_from_a_bfloat16_state(channel, kernels, torch_paths):
    """A bfloat16 initial state (a cache allocated with ``state_dtype="bfloat16"``) with
    float32 inputs: the kernel still runs (fla's chunk_kda asserts a float32 initial state, so
    the dispatch hands it the state in float32) and agrees with the CPU path."""
    data = make(8, 1, 2, 16, 16, channel=channel)
    qkvgb = [data[n] for n in ("q", "k", "v", "g", "beta")]
    state = data["initial_state"].bfloat16()
    with torch.inference_mode():
        o, final = gated_delta_rule(*qkvgb, initial_state=state, return_final_state=True)
        assert kernels.names == ["chunk_kda" if channel else "chunk_gated_delta_rule"]
        with torch_paths():
            o_torch, final_torch = gated_delta_rule(
                *qkvgb, initial_state=state, return_final_state=True
            )
    assert final.dtype == final_torch.dtype == torch.float32
    torch.testing.assert_close(o, o_torch, rtol=SCAN_TOL, atol=SCAN_TOL)
    torch.testing.assert_close(final, final_torch, rtol=SCAN_TOL, atol=SCAN_TOL)

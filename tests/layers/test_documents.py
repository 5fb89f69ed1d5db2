"""Packed rows with document boundaries (``seq_idx``): each document as if it ran alone.

References: the float64 recurrences of the ops run on each document separately (the state
of a document starts from zero; the initial state belongs to the first), and for the model
each document run alone through the same weights, logits and gradients.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from hybrid.config import HybridConfig
from hybrid.model import HybridLM
from layers.base import Block
from layers.ops import (
    causal_conv1d,
    causal_conv1d_naive,
    document_index,
    selective_scan_naive,
    ssd_naive,
    ssd_scan,
)
from layers.ops.selective_scan.chunk import selective_scan_torch
from layers.registry import register_block

CUTS = [[5, 6, 20], [1, 33]]  # document starts of two rows of 37 tokens (a 1-token document)
LENGTH = 37


def packed_seq_idx(cuts: list[list[int]], length: int, labels=None) -> torch.Tensor:
    seq = torch.zeros(len(cuts), length, dtype=torch.long)
    for row, starts in enumerate(cuts):
        for start in starts:
            seq[row, start:] += 1
    return seq if labels is None else labels(seq)


def documents(cuts: list[list[int]], length: int):
    """(row, k, start, end) of every document."""
    for row, starts in enumerate(cuts):
        bounds = [0, *starts, length]
        for k, (start, end) in enumerate(itertools.pairwise(bounds)):
            yield row, k, start, end


def test_document_index_counts_starts():
    seq = torch.tensor([[7, 7, 3, 3, 7, 9], [0, 0, 0, 0, 0, 0]])
    assert document_index(seq).tolist() == [[0, 0, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("chunk_size", [4, 8, 64])
def test_ssd_scan_restarts_at_documents(chunk_size):
    torch.manual_seed(0)
    b, h, p, g, n = 2, 4, 3, 2, 5
    f64 = {"dtype": torch.float64}
    x = torch.randn(b, LENGTH, h, p, **f64, requires_grad=True)
    dt = torch.rand(b, LENGTH, h, **f64, requires_grad=True)
    A = (-torch.rand(h, **f64) * 2).requires_grad_()
    B = torch.randn(b, LENGTH, g, n, **f64, requires_grad=True)
    C = torch.randn(b, LENGTH, g, n, **f64, requires_grad=True)
    D = torch.ones(h, **f64)
    init = torch.randn(b, h, p, n, **f64)
    # Labels that come back (0 1 0) are distinct documents, as a change of value starts one.
    seq = packed_seq_idx(CUTS, LENGTH, labels=lambda s: s % 2)
    y, final = ssd_scan(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=init,
        return_final_state=True, seq_idx=seq,
    )  # fmt: skip
    weights = torch.randn_like(y)
    got = torch.autograd.grad((y * weights).sum() + final.sum(), [x, dt, A, B, C])
    loss = 0.0
    for row, k, s, e in documents(CUTS, LENGTH):
        one = slice(row, row + 1)
        yr, fr = ssd_naive(
            x[one, s:e], dt[one, s:e], A, B[one, s:e], C[one, s:e], D=D,
            initial_state=init[one] if k == 0 else None,
        )  # fmt: skip
        torch.testing.assert_close(y[one, s:e], yr, rtol=1e-10, atol=1e-10)
        loss = loss + (yr * weights[one, s:e]).sum()
        if e == LENGTH:
            torch.testing.assert_close(final[one], fr, rtol=1e-10, atol=1e-10)
            loss = loss + fr.sum()
    expected = torch.autograd.grad(loss, [x, dt, A, B, C])
    for name, a, r in zip(["x", "dt", "A", "B", "C"], got, expected, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [None, 3, 8, 40])
def test_selective_scan_restarts_at_documents(chunk_size, dtype):
    torch.manual_seed(0)
    b, d, n = 2, 6, 4
    u = torch.randn(b, d, LENGTH, dtype=dtype, requires_grad=True)
    delta = torch.randn(b, d, LENGTH, dtype=dtype, requires_grad=True)
    A = (-torch.rand(d, n, dtype=dtype) * 2).requires_grad_()
    B = torch.randn(b, n, LENGTH, dtype=dtype, requires_grad=True)
    C = torch.randn(b, n, LENGTH, dtype=dtype, requires_grad=True)
    init = torch.randn(b, d, n, dtype=dtype)
    seq = packed_seq_idx(CUTS, LENGTH)
    y, final = selective_scan_torch(
        u, delta, A, B, C, delta_softplus=True, initial_state=init, return_final_state=True,
        seq_idx=seq, chunk_size=chunk_size,
    )  # fmt: skip
    weights = torch.randn_like(y)
    got = torch.autograd.grad((y * weights).sum() + final.sum(), [u, delta, A, B, C])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    loss = 0.0
    for row, k, s, e in documents(CUTS, LENGTH):
        one = slice(row, row + 1)
        yr, fr = selective_scan_naive(
            u[one, :, s:e], delta[one, :, s:e], A, B[one, :, s:e], C[one, :, s:e],
            delta_softplus=True, initial_state=init[one] if k == 0 else None,
        )  # fmt: skip
        torch.testing.assert_close(y[one, :, s:e].double(), yr, rtol=tol, atol=tol)
        loss = loss + (yr * weights[one, :, s:e].double()).sum()
        if e == LENGTH:
            torch.testing.assert_close(final[one].double(), fr, rtol=tol, atol=tol)
            loss = loss + fr.sum()
    expected = torch.autograd.grad(loss, [u, delta, A, B, C])
    for name, a, r in zip(["u", "delta", "A", "B", "C"], got, expected, strict=True):
        torch.testing.assert_close(a.double(), r.double(), rtol=10 * tol, atol=10 * tol, msg=name)


@pytest.mark.parametrize("layout", ["channel-first", "channel-last"])
def test_causal_conv_stays_inside_documents(layout):
    torch.manual_seed(0)
    b, d, w = 2, 5, 4
    weight, bias = torch.randn(d, w, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    if layout == "channel-first":
        x = torch.randn(b, d, LENGTH, dtype=torch.float64)
    else:
        x = torch.randn(b, LENGTH, d, dtype=torch.float64).transpose(1, 2)
    init = torch.randn(b, d, w - 1, dtype=torch.float64)
    seq = packed_seq_idx(CUTS, LENGTH)
    y = causal_conv1d(x, weight, bias, activation="silu", initial_state=init, seq_idx=seq)
    for row, k, s, e in documents(CUTS, LENGTH):
        one = slice(row, row + 1)
        expected, _ = causal_conv1d_naive(
            x[one, :, s:e], weight, bias, activation="silu",
            initial_state=init[one] if k == 0 else None,
        )  # fmt: skip
        torch.testing.assert_close(y[one, :, s:e], expected, rtol=1e-12, atol=1e-12)


def build(pattern: str, position: str = "rope", seed: int = 0, window: int | None = None):
    torch.manual_seed(seed)
    config = HybridConfig(
        pattern, vocab_size=61, d_model=32,
        attention={"n_heads": 4, "n_kv_heads": 2, "position": position, "window": window},
        mamba2={"d_state": 8, "headdim": 8, "chunk_size": 8},
        mamba1={"d_state": 4},
        gated_deltanet={"n_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "chunk_size": 8},
        kda={"n_heads": 2, "n_v_heads": 4, "head_k_dim": 8, "chunk_size": 8},
        latent_attention={"n_heads": 2, "kv_lora_rank": 16, "position": position},
        moe={"n_experts": 4, "top_k": 2, "expert_hidden_size": 32},
    )  # fmt: skip
    return HybridLM(config)


def random_pattern(rng: random.Random) -> str:
    mixers, feedforwards = "MSDC*", "-E"
    return "".join(rng.choice(mixers) + rng.choice(feedforwards) for _ in range(rng.randint(1, 3)))


CASES = [
    ("M-*-", "rope", None),
    ("S-*E", "alibi", None),
    ("*-*-", "sinusoidal", None),
    ("M-S-*-", "none", None),
    ("D-*-D-", "rope", None),
    ("K-*-K-", "rope", None),
    ("L-M-L-", "rope", None),
    ("L-K-", "none", None),
    ("C-*-C-", "rope", None),
    ("[*M]-[DC]-", "rope", None),
    ("*-M-", "rope", 6),  # sliding window
] + [(random_pattern(random.Random(seed)), "rope", None) for seed in range(4)]


@pytest.mark.parametrize(("pattern", "position", "window"), CASES)
def test_packed_row_equals_each_document_alone(pattern, position, window):
    """Logits and parameter gradients of a packed batch equal those of every document run
    alone (float32; tolerance 2e-5 relative to each tensor's scale)."""
    model = build(pattern, position, window=window)
    ids = torch.randint(0, 61, (2, LENGTH))
    seq = packed_seq_idx(CUTS, LENGTH)
    weights = torch.randn(2, LENGTH, 61)
    logits = model(ids, seq_idx=seq).logits
    (logits * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for row, _, s, e in documents(CUTS, LENGTH):
        alone = model(ids[row : row + 1, s:e]).logits
        scale = alone.abs().max()
        torch.testing.assert_close(
            logits[row : row + 1, s:e] / scale, alone / scale, rtol=0, atol=2e-5
        )
        (alone * weights[row : row + 1, s:e]).sum().backward()
    for name, param in model.named_parameters():
        if param.grad is None:
            assert name not in packed_grads
            continue
        scale = param.grad.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(
            packed_grads[name] / scale, param.grad / scale, rtol=0, atol=5e-5, msg=name
        )


def test_positions_restart_at_each_document():
    from hybrid.inference.cache import token_context

    ids = torch.zeros(1, 8, dtype=torch.long)
    context = token_context(ids, None, None, torch.tensor([[3, 3, 3, 5, 5, 1, 1, 1]]))
    assert context.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert context.seq_idx.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]


def test_one_document_per_row_changes_nothing():
    model = build("M-S-*E")
    ids = torch.randint(0, 61, (2, 20))
    same = model(ids, seq_idx=torch.zeros(2, 20, dtype=torch.long)).logits
    torch.testing.assert_close(same, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_bad_seq_idx():
    model = build("M-*-")
    ids = torch.randint(0, 61, (2, 10))
    with pytest.raises(ValueError, match=r"^seq_idx: expected shape \(2, 10\) like input_ids"):
        model(ids, seq_idx=torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^seq_idx: must hold integers; got torch.float32"):
        model(ids, seq_idx=torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"^seq_idx: packed documents cannot be combined with a"):
        model(ids, seq_idx=torch.zeros(2, 10, dtype=torch.long), cache=model.allocate_cache(2, 16))
    with pytest.raises(ValueError, match=r"^seq_idx: packed documents cannot be combined with an"):
        model(ids, seq_idx=torch.zeros(2, 10, dtype=torch.long), attention_mask=torch.ones(2, 10))


@dataclass
class LeakyOptions:
    def resolve(self, d_model: int, where: str) -> LeakyOptions:
        return self


@register_block("leaky_mixer", symbol="Y", options=LeakyOptions)
class LeakyMixer(Block):
    """A user mixer that knows nothing of documents (a running mean over the sequence)."""

    def __init__(self, d_model: int, options: LeakyOptions, layer_idx: int) -> None:
        super().__init__(d_model, options, layer_idx)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, hidden: torch.Tensor, cache=None, context=None) -> torch.Tensor:
        steps = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)[:, None]
        return self.proj(hidden.cumsum(1) / steps)


def test_mixer_that_ignores_documents_is_refused():
    model = HybridLM(HybridConfig("M-Y-", vocab_size=61, d_model=32, mamba2={"headdim": 8}))
    ids = torch.randint(0, 61, (1, 10))
    with pytest.raises(ValueError, match=r"^layers\[2\]: block 'leaky_mixer' mixes tokens but"):
        model(ids, seq_idx=torch.zeros(1, 10, dtype=torch.long))
    model(ids)  # without documents it runs

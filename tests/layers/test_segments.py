"""Long sequences in segments (``Mamba2.segment_length``, ``MLP.segment_length``): off CUDA,
a forward without a cache runs ``segment_length`` tokens at a time, carrying the scan's state
and the conv's last inputs across segments. The reference is the same model run whole
(segmentation off), in float64: equal logits and gradients, with and without packed
documents, including documents that start exactly at a segment boundary."""

from __future__ import annotations

import pytest
import torch

from hybrid.config import HybridConfig
from hybrid.model import HybridLM
from layers.mamba2 import Mamba2
from layers.mlp import MLP

LENGTH = 29


def build() -> HybridLM:
    torch.manual_seed(0)
    config = HybridConfig(
        "M-*-M-",
        vocab_size=50,
        d_model=32,
        attention={"n_heads": 2},
        mamba2={"d_state": 8, "headdim": 8, "chunk_size": 4},
    )
    return HybridLM(config).double()


def logits_and_grads(model, tokens, seq_idx, segment):
    saved = Mamba2.segment_length, MLP.segment_length
    Mamba2.segment_length = MLP.segment_length = segment
    try:
        model.zero_grad()
        logits = model(tokens, seq_idx=seq_idx).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    finally:
        Mamba2.segment_length, MLP.segment_length = saved
    return logits.detach(), grads


@pytest.mark.parametrize("segment", [2, 5, 8, 13])
@pytest.mark.parametrize("packed", [False, True])
def test_segments_equal_the_whole_sequence(segment, packed):
    model = build()
    tokens = torch.randint(0, 50, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    seq_idx = None
    if packed:  # row 0: starts at 8 and 16 (segment boundaries for 8), a 1-token document
        seq_idx = torch.zeros(2, LENGTH, dtype=torch.long)
        for row, starts in enumerate([[8, 16, 17], [5, 13, 26]]):
            for start in starts:
                seq_idx[row, start:] += 1
    whole, whole_grads = logits_and_grads(model, tokens, seq_idx, None)
    parts, part_grads = logits_and_grads(model, tokens, seq_idx, segment)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-10)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(part_grads[name], grad, rtol=0, atol=1e-10, msg=name)


def test_segments_are_used_and_change_the_result_only_by_rounding():
    """The segmented path runs (a wrong carried state would show: dropping it changes the
    logits), in float32 too."""
    model = build().float()
    tokens = torch.randint(0, 50, (1, LENGTH), generator=torch.Generator().manual_seed(2))
    whole, _ = logits_and_grads(model, tokens, None, None)
    parts, _ = logits_and_grads(model, tokens, None, 8)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)

    original = Mamba2._forward_in_segments

    def forgetful(self, hidden, seq_idx, segment):  # each segment from a zero state
        return torch.cat([original(self, part, None, segment) for part in hidden.split(8, 1)], 1)

    Mamba2._forward_in_segments = forgetful
    try:
        broken, _ = logits_and_grads(model, tokens, None, 8)
    finally:
        Mamba2._forward_in_segments = original
    assert (broken - whole).abs().max() > 1e-3

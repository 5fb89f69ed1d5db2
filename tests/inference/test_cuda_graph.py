"""CUDAGraphDecodeStep's bookkeeping on CPU, with a stand-in backend that binds like a graph.

A CUDA graph replays on the tensors it was recorded with. ``BindingReplay`` keeps that: a
replay runs the step on the cache's tensor objects as they were at recording, so if the cache
replaced them (select, rollback) and nothing recorded again, the replay updates stale tensors
and the logits go wrong. The real recording is tested on a GPU
(tests/inference/test_generation_gpu.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from hybrid import HybridConfig, HybridLM
from hybrid.inference.cuda_graph import CUDAGraphDecodeStep, cache_layout
from hybrid.inference.generation import check_cuda_graph
from layers.attention import KVCache


class BindingReplay:
    """Warm-up runs the step; ``record`` freezes the tensor objects the replays will use."""

    def __init__(self) -> None:
        self.warmups = 0

    def warm_up(self, run, cache) -> None:
        self.warmups += 1
        run(cache)

    def record(self, run, cache):
        frozen = copy.copy(cache)
        frozen.entries = [copy.copy(entry) for entry in cache.entries]
        output = torch.empty_like(run(cache.copy()))

        def replay() -> None:
            output.copy_(run(frozen))

        return output, replay

    def release(self) -> None:
        pass


@pytest.fixture(scope="module")
def model() -> HybridLM:
    torch.manual_seed(0)
    config = HybridConfig(
        ["M", {"block": "attention", "window": 4}, "S", "*", "E"],
        vocab_size=48,
        d_model=32,
        mamba2={"d_state": 8, "headdim": 8, "chunk_size": 8},
        mamba1={"d_state": 4},
        attention={"n_heads": 4, "n_kv_heads": 2},
        moe={"n_experts": 4, "top_k": 2},
    )
    return HybridLM(config).eval()


def prefilled(model: HybridLM, batch: int = 3, prompt: int = 6, capacity: int = 24):
    ids = torch.randint(0, 48, (batch, prompt), generator=torch.Generator().manual_seed(1))
    cache = model.allocate_cache(batch, capacity)
    model(ids, cache=cache)
    return cache


def step(decode, cache, token: torch.Tensor) -> torch.Tensor:
    logits = decode(token, cache, torch.tensor(cache.length))
    cache.advance(1, None)
    return logits


def tokens(n: int, batch: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 48, (n, batch, 1), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_replays_equal_the_eager_step_and_record_once(model):
    graphed = CUDAGraphDecodeStep(model.decode_step, backend=BindingReplay())
    cache = prefilled(model)
    eager_cache = cache.copy()
    for token in tokens(8):  # past the sliding window's ring
        torch.testing.assert_close(
            step(graphed, cache, token), step(model.decode_step, eager_cache, token)
        )
    assert graphed.captures == 1 and graphed.backend.warmups == 1
    for mine, theirs in zip(cache.entries, eager_cache.entries, strict=True):
        if mine is not None:
            for name, tensor in mine.tensors().items():
                torch.testing.assert_close(tensor, theirs.tensors()[name], msg=name)


def seen(entry, length: int) -> dict[str, torch.Tensor]:
    """What later steps can read: all of it, except a full-attention cache's slots from
    ``length`` on, which every step writes before it reads them."""
    tensors = entry.tensors()
    if isinstance(entry, KVCache) and entry.window is None:
        tensors = {
            k: (t[:, :, :length] if t.dim() == 4 else t[:, :length]) for k, t in tensors.items()
        }
    return tensors


@torch.inference_mode()
def test_recording_leaves_the_cache_as_it_was(model):
    """The warm-up runs the step on the real cache; checkpoint + rollback undo it."""
    cache = prefilled(model)
    before = cache.copy()
    graphed = CUDAGraphDecodeStep(model.decode_step, backend=BindingReplay())
    graphed._record(tokens(1)[0], cache, torch.tensor(cache.length))
    assert graphed.captures == 1
    assert torch.equal(cache.real_lengths, before.real_lengths)
    for entry, saved in zip(cache.entries, before.entries, strict=True):
        if entry is not None:
            expected = seen(saved, cache.length)
            for name, tensor in seen(entry, cache.length).items():
                assert torch.equal(tensor, expected[name]), name


@torch.inference_mode()
def test_select_records_again(model):
    graphed = CUDAGraphDecodeStep(model.decode_step, backend=BindingReplay())
    cache = prefilled(model)
    eager_cache = cache.copy()
    stream = tokens(6)
    for token in stream[:3]:
        step(graphed, cache, token)
        step(model.decode_step, eager_cache, token)
    rows = torch.tensor([2, 0])  # reorder and drop a row, as beam search does
    layout = cache_layout(cache)
    cache.select(rows)
    eager_cache.select(rows)
    assert cache_layout(cache) != layout
    for token in stream[3:]:
        token = token[rows]
        torch.testing.assert_close(
            step(graphed, cache, token), step(model.decode_step, eager_cache, token)
        )
    assert graphed.captures == 2


@torch.inference_mode()
def test_rollback_records_again(model):
    graphed = CUDAGraphDecodeStep(model.decode_step, backend=BindingReplay())
    cache = prefilled(model)
    eager_cache = cache.copy()
    step(graphed, cache, tokens(1)[0])
    step(model.decode_step, eager_cache, tokens(1)[0])
    saved, eager_saved = cache.checkpoint(), eager_cache.checkpoint()
    for token in tokens(3, seed=3):  # drafts that get rejected
        step(graphed, cache, token)
        step(model.decode_step, eager_cache, token)
    cache.rollback(saved)
    eager_cache.rollback(eager_saved)
    for token in tokens(3, seed=4):
        torch.testing.assert_close(
            step(graphed, cache, token), step(model.decode_step, eager_cache, token)
        )
    assert graphed.captures == 2


@torch.inference_mode()
def test_a_stale_recording_would_be_wrong(model):
    """Why the layout check exists: replaying across a select without recording again
    updates the old state tensors, and the logits differ (the stand-in binds like a graph)."""
    graphed = CUDAGraphDecodeStep(model.decode_step, backend=BindingReplay())
    cache = prefilled(model)
    eager_cache = cache.copy()
    step(graphed, cache, tokens(1)[0])
    step(model.decode_step, eager_cache, tokens(1)[0])
    rows = torch.tensor([1, 2, 0])
    cache.select(rows)
    eager_cache.select(rows)
    graphed._key = (id(cache), graphed._key[1], cache_layout(cache))  # pretend nothing changed
    token = tokens(1, seed=5)[0]
    stale = step(graphed, cache, token)
    assert not torch.allclose(stale, step(model.decode_step, eager_cache, token))


@torch.inference_mode()
def test_a_new_cache_or_batch_size_records_again(model):
    graphed = CUDAGraphDecodeStep(model.decode_step, backend=BindingReplay())
    step(graphed, prefilled(model), tokens(1)[0])
    step(graphed, prefilled(model), tokens(1)[0])
    step(graphed, prefilled(model, batch=2), tokens(1, batch=2)[0])
    assert graphed.captures == 3


def test_cuda_graph_option_errors(model):
    prompt = torch.randint(0, 48, (1, 4))
    with pytest.raises(ValueError, match=r"^cuda_graph: needs the model and input_ids on CUDA"):
        model.generate(prompt, 2, cuda_graph=True)
    with pytest.raises(ValueError, match=r"^num_beams: .*compile and cuda_graph"):
        model.generate(prompt, 2, num_beams=2, cuda_graph=True)
    with pytest.raises(ValueError, match=r"^cuda_graph: compile='reduce-overhead' makes CUDA"):
        check_cuda_graph(torch.device("cuda"), "reduce-overhead")
    check_cuda_graph(torch.device("cuda"), True)
    check_cuda_graph(torch.device("cuda"), "max-autotune-no-cudagraphs")

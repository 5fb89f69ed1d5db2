"""Batch-1-latency decoding: the static decode step captured once as a CUDA graph, replayed per
token.

A decode step of a small hybrid is hundreds of tiny kernels; launching them costs more than
running them. :class:`CUDAGraphDecodeStep` records the step (``model.decode_step`` or its
``torch.compile`` form) with ``torch.cuda.CUDAGraph`` and replays the recording, one launch per
token, as mamba_ssm's ``generate(cg=True)`` does. It does not go through torch.compile's
CUDA-graph trees (``mode="reduce-overhead"``), which may refuse a step that updates its caches
in place.

A graph reads and writes the addresses it was recorded with. So the step's inputs are copied
into static buffers, and at every call the cache's tensors are compared with the recorded ones
(address, shape, dtype, strides): after anything that replaces them — ``HybridCache.select``
(beam reorders, dropped rows), ``HybridCache.rollback`` (speculative decoding), another cache
or batch size — the step is recorded again (``captures`` counts the recordings).

Recording runs the step a few times first (warm-up: Triton compilation and autotuning, cuBLAS
workspaces, torch.compile), on the real cache between a ``checkpoint`` and a ``rollback``, so
the cache is left as it was and no second cache is allocated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from hybrid.inference.cache import HybridCache

__all__ = ["CUDAGraphDecodeStep", "GraphBackend", "TorchCUDAGraphs", "cache_layout"]

DecodeStep = Callable[[torch.Tensor, HybridCache, torch.Tensor], torch.Tensor]


def cache_layout(cache: HybridCache) -> tuple:
    """What a recorded graph depends on: every cache tensor's address, shape, strides, dtype."""
    tensors = [cache.real_lengths]
    for entry in cache.entries:
        if entry is not None:
            tensors.extend(entry.tensors().values())
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) for t in tensors)


def _binding(tokens: torch.Tensor, cache: HybridCache, position: torch.Tensor) -> tuple:
    """Everything a recording is only valid for."""
    inputs = (tuple(tokens.shape), tokens.dtype, tokens.device, position.device)
    return (id(cache), inputs, cache_layout(cache))


class GraphBackend(Protocol):
    """How a step is warmed up and recorded (the CUDA one, or a stand-in for tests)."""

    def warm_up(self, run: Callable[[HybridCache], torch.Tensor], cache: HybridCache) -> None: ...

    def record(
        self, run: Callable[[HybridCache], torch.Tensor], cache: HybridCache
    ) -> tuple[torch.Tensor, Callable[[], None]]:
        """Record ``run(cache)``; return its (static) output and the replay function."""
        ...

    def release(self) -> None: ...


class TorchCUDAGraphs:
    """``torch.cuda.CUDAGraph`` recording; every recording of one step shares a memory pool."""

    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self.pool = torch.cuda.graph_pool_handle()
        self.graph: torch.cuda.CUDAGraph | None = None

    def warm_up(self, run: Callable[[HybridCache], torch.Tensor], cache: HybridCache) -> None:
        # On a side stream, as torch.cuda.graphs.make_graphed_callables does, so that lazy
        # initialisations are not attributed to the capture stream.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                run(cache)
        torch.cuda.current_stream().wait_stream(side)

    def record(
        self, run: Callable[[HybridCache], torch.Tensor], cache: HybridCache
    ) -> tuple[torch.Tensor, Callable[[], None]]:
        self.release()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = run(cache)
        self.graph = graph
        return output, graph.replay

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
            self.graph = None


class CUDAGraphDecodeStep:
    """``step`` (a :meth:`HybridLM.decode_step`-like callable) recorded once, replayed per call.

    Call it as the step itself: ``logits = graphed(tokens, cache, position)`` with tokens
    (batch, 1) int64, position a 0-d int64 tensor (``cache.length``), logits (batch, vocab) a
    new tensor. Like the step, it does not advance the cache (``cache.advance(1, None)``).

    Args:
        step: the decode step; it must only update the cache in place and keep its shapes
            static (``decode_step`` does, compiled or not).
        backend: how to record; default :class:`TorchCUDAGraphs` (needs CUDA).
    """

    def __init__(self, step: DecodeStep, backend: GraphBackend | None = None) -> None:
        self.step = step
        self.backend = backend if backend is not None else TorchCUDAGraphs()
        self.captures = 0
        self._key: tuple | None = None
        self._tokens: torch.Tensor | None = None
        self._position: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._replay: Callable[[], None] | None = None

    def __call__(
        self, tokens: torch.Tensor, cache: HybridCache, position: torch.Tensor
    ) -> torch.Tensor:
        if _binding(tokens, cache, position) != self._key:
            self._record(tokens, cache, position)
        self._tokens.copy_(tokens)
        self._position.copy_(position)
        self._replay()
        return self._logits.clone()

    def _record(self, tokens: torch.Tensor, cache: HybridCache, position: torch.Tensor) -> None:
        self._key = None
        self._tokens, self._position = tokens.clone(), position.clone()

        def run(cache: HybridCache) -> torch.Tensor:
            return self.step(self._tokens, cache, self._position)

        saved = cache.checkpoint()
        self.backend.warm_up(run, cache)
        cache.rollback(saved)  # replaces the state tensors the warm-up wrote: record after
        self._logits, self._replay = self.backend.record(run, cache)
        self.captures += 1
        self._key = _binding(tokens, cache, position)

    def release(self) -> None:
        """Free the recorded graph (it also goes with this object)."""
        self.backend.release()
        self._key = self._replay = self._logits = None

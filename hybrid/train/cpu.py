"""Per-process CPU settings of a training run: thread count and flushing of subnormal floats."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# PyTorch hands an elementwise op to a thread in pieces of at least this many elements.
_GRAIN = 32768


def subnormals(numel: int) -> torch.Tensor:
    """``numel`` float32 subnormals (~5.9e-39), made from their bits: a float conversion on a
    flushing thread would already give zeros."""
    return torch.full((numel,), 0x00400000, dtype=torch.int32).view(torch.float32)


def flush_denormals() -> bool | None:
    """Turns on the CPU's flush-to-zero and denormals-are-zero modes (x86 FTZ/DAZ).

    Subnormal floats (below ~1.2e-38 in float32) cost 10-100x more per operation on x86 CPUs.
    A loss on a few positions only leaves an SSM's backward with gradients that decay into
    them between the labelled positions (``scripts/bench_sparse_loss.py``: ~1.4x per step);
    flushed, they are zeros, far below anything they would be added to.

    The modes are per thread: they reach the threads of torch's CPU pool only if the pool
    starts after this call, so call it before the process's first parallel op.

    Returns:
        None if the CPU has no such modes; else whether every thread of the pool flushes (a
        probe op spread over all of them).
    """
    if not torch.set_flush_denormal(True):
        return None
    probe = subnormals(_GRAIN * torch.get_num_threads()) * 1.5
    return not bool(probe.count_nonzero())


def _main_thread_flushes() -> bool:
    """Whether this thread flushes subnormals now (torch has no getter for the mode)."""
    return bool((subnormals(1) * 1.5) == 0)


@contextmanager
def cpu_settings(threads: int | None, flush_denormal: bool) -> Iterator[None]:
    """A run's ``trainer.threads`` and ``trainer.flush_denormal`` while the block runs; this
    thread's previous settings after it.

    Warns if the flushing reaches only some threads (the process ran parallel ops before).
    """
    previous_threads, previous_flush = torch.get_num_threads(), _main_thread_flushes()
    if threads:
        torch.set_num_threads(threads)
    if flush_denormal and flush_denormals() is False:
        warnings.warn(
            "trainer.flush_denormal: torch's CPU threads were started before the run and keep "
            "subnormal floats (slower backward with sparse losses); run `hybrid train` in a "
            "fresh process for the full effect",
            stacklevel=4,  # the caller of train()
        )
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.set_flush_denormal(previous_flush)

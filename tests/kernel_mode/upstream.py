"""The real upstream kernels, runnable on CPU tensors (the kernel test mode's machinery).

mamba-ssm's Triton kernels (``mamba_chunk_scan_combined``, ``selective_state_update``) run
under Triton's interpreter (``TRITON_INTERPRET=1``); the CUDA-only ``selective_scan_fn``,
``causal_conv1d_fn`` and ``causal_conv1d_update`` are replaced by upstream's own reference
implementations, which are their specification and share their signatures.

What it takes, all process-wide, which is why the mode runs in its own process
(tests/kernel_mode/README.md):

- empty stand-ins in ``sys.modules`` for the compiled extensions ``selective_scan_cuda`` and
  ``causal_conv1d_cuda``, so that the pure-Python parts of both packages import;
- ``torch.cuda.device`` as a null context and ``torch.cuda.get_device_properties`` as an object
  with ``multi_processor_count`` (the kernels' launch code calls both);
- ``triton.autotune`` keeping only its first config (the autotuner benchmarks on a GPU driver),
  installed before mamba_ssm is imported;
- ``TRITON_INTERPRET=1`` before triton is imported.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from types import SimpleNamespace

__all__ = ["install", "upstream_ops", "versions"]

_STAND_IN_EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")


@functools.cache
def install() -> None:
    """Make mamba_ssm and causal_conv1d importable and their Triton kernels runnable on CPU.

    Idempotent. Raises RuntimeError if triton was imported before without the interpreter.
    """
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set")
    os.environ["TRITON_INTERPRET"] = "1"
    for name in _STAND_IN_EXTENSIONS:
        sys.modules.setdefault(name, types.ModuleType(name))

    import torch
    import triton

    torch.cuda.device = lambda index=None: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(  # type: ignore[assignment]
        multi_processor_count=os.cpu_count() or 1, name="cpu (Triton interpreter)"
    )
    autotune = triton.autotune

    @functools.wraps(autotune)
    def first_config_only(configs, *args, **kwargs):
        return autotune(list(configs)[:1], *args, **kwargs)

    triton.autotune = first_config_only


@functools.cache
def upstream_ops() -> tuple[SimpleNamespace, SimpleNamespace]:
    """The namespaces that ``layers.ops.kernels`` would return on a GPU, runnable on CPU.

    Returns ``(mamba_ssm_ops, causal_conv1d_ops)`` with the attributes of
    :func:`layers.ops.kernels.mamba_ssm_ops` and :func:`layers.ops.kernels.causal_conv1d_ops`.
    """
    install()
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref, causal_conv1d_update_ref
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    mamba = SimpleNamespace(
        mamba_chunk_scan_combined=mamba_chunk_scan_combined,
        selective_scan_fn=selective_scan_ref,
        selective_state_update=selective_state_update,
    )
    conv = SimpleNamespace(
        causal_conv1d_fn=causal_conv1d_ref, causal_conv1d_update=causal_conv1d_update_ref
    )
    return mamba, conv


def versions() -> dict[str, str]:
    """Versions of the upstream packages the mode runs."""
    install()
    import causal_conv1d
    import mamba_ssm
    import torch
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "mamba_ssm": mamba_ssm.__version__,
        "causal_conv1d": causal_conv1d.__version__,
    }

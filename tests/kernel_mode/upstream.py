"""The real upstream kernels, runnable on CPU tensors (the kernel test mode's machinery).

mamba-ssm's Triton kernels (``mamba_chunk_scan_combined``, ``selective_state_update``) and
flash-linear-attention's (``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule``,
``chunk_kda``, ``fused_recurrent_kda``) run under Triton's interpreter (``TRITON_INTERPRET=1``);
the CUDA-only ``selective_scan_fn``, ``causal_conv1d_fn`` and ``causal_conv1d_update`` are
replaced by upstream's own reference implementations, which are their specification and share
their signatures.

What it takes, all process-wide, which is why the mode runs in its own process
(tests/kernel_mode/README.md):

- empty stand-ins in ``sys.modules`` for the compiled extensions ``selective_scan_cuda`` and
  ``causal_conv1d_cuda``, so that the pure-Python parts of both packages import;
- ``torch.cuda.device`` as a null context and ``torch.cuda.get_device_properties`` as an object
  with ``multi_processor_count`` (mamba-ssm's launch code calls both);
- every Triton autotuner keeps only its first config (``Autotuner.prune_configs``: the
  autotuner benchmarks on a GPU driver). Patched on the class, not on ``triton.autotune``,
  because fla's ``fla_cache_autotune`` builds its ``CachedAutotuner`` (an ``Autotuner``)
  without going through ``triton.autotune``; with a single config left Triton runs it
  without benchmarking. Neither package passes ``prune_configs_by``, so the config kept is
  each decorator's first;
- loop indices as Triton tensors in interpreted kernels: Triton 3.9's interpreter runs
  ``for i in range(n)`` (and ``tl.range``) with Python ints, where the compiler gives int32
  tensors, and fla's chunk kernels call ``i_t.to(tl.int64)`` on them. The interpreter's AST
  rewrite (``FunctionRewriter.ast_transformer``, which already wraps assignments in
  ``to_tensor``) is extended to wrap the index at the top of each such loop body;
  ``tl.static_range`` indices stay ints (constexprs when compiled);
- ``TRITON_INTERPRET=1`` before triton is imported.

fla imports without further help: with no GPU driver ``fla.utils`` takes the platform for
"cpu" (a UserWarning), every ``IS_NVIDIA_*`` flag False, ``check_shared_mem`` False (the
configs for the smallest shared memory) and ``get_multiprocessor_count`` 1; its
``input_guard`` enters no device context for CPU tensors (their device index is None).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import sys
import types
from types import SimpleNamespace

__all__ = ["fla_upstream_ops", "install", "upstream_ops", "versions"]

_STAND_IN_EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")


@functools.cache
def install() -> None:
    """Make mamba_ssm, causal_conv1d and fla importable and their Triton kernels runnable on CPU.

    Idempotent. Raises RuntimeError if triton was imported before without the interpreter.
    """
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set")
    os.environ["TRITON_INTERPRET"] = "1"
    for name in _STAND_IN_EXTENSIONS:
        sys.modules.setdefault(name, types.ModuleType(name))

    import torch
    from triton.runtime import interpreter
    from triton.runtime.autotuner import Autotuner

    torch.cuda.device = lambda index=None: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.get_device_properties = lambda device=None: SimpleNamespace(  # type: ignore[assignment]
        multi_processor_count=os.cpu_count() or 1, name="cpu (Triton interpreter)"
    )
    prune_configs = Autotuner.prune_configs

    @functools.wraps(prune_configs)
    def first_config_only(self, kwargs):
        return prune_configs(self, kwargs)[:1]

    Autotuner.prune_configs = first_config_only
    interpreter.FunctionRewriter.ast_transformer = _tensor_loop_indices(interpreter.ASTTransformer)


def _tensor_loop_indices(base: type) -> ast.NodeTransformer:
    """The interpreter's AST rewrite, plus ``i = interpreter_semantic.to_tensor(i, False)`` at
    the top of every ``for i in range(...)`` / ``tl.range(...)`` body (see the module doc)."""

    class TensorLoopIndices(base):
        def visit_For(self, node: ast.For) -> ast.For:
            node = self.generic_visit(node)
            func = node.iter.func if isinstance(node.iter, ast.Call) else None
            if getattr(func, "id", getattr(func, "attr", None)) == "range" and isinstance(
                node.target, ast.Name
            ):
                semantic = ast.Name(id="interpreter_semantic", ctx=ast.Load())
                wrapped = ast.Call(
                    func=ast.Attribute(value=semantic, attr="to_tensor", ctx=ast.Load()),
                    args=[ast.Name(id=node.target.id, ctx=ast.Load()), ast.Constant(False)],
                    keywords=[],
                )
                target = ast.Name(id=node.target.id, ctx=ast.Store())
                node.body.insert(0, ast.Assign(targets=[target], value=wrapped))
            return node

    return TensorLoopIndices()


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


@functools.cache
def fla_upstream_ops() -> SimpleNamespace:
    """The namespace that ``layers.ops.delta.fla_ops`` would return on a GPU, runnable on CPU:
    fla's ``chunk_gated_delta_rule`` and ``fused_recurrent_gated_delta_rule`` (a decay per head),
    ``chunk_kda`` and ``fused_recurrent_kda`` (a decay per key channel). fla's backend dispatch
    in front of the kda functions finds none of its alternatives here (TileLang and FlashKDA not
    installed, no Ascend NPU), so they run fla's Triton kernels."""
    install()
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    return SimpleNamespace(
        chunk_gated_delta_rule=chunk_gated_delta_rule,
        fused_recurrent_gated_delta_rule=fused_recurrent_gated_delta_rule,
        chunk_kda=chunk_kda,
        fused_recurrent_kda=fused_recurrent_kda,
    )


def versions() -> dict[str, str]:
    """Versions of the upstream packages the mode runs."""
    install()
    import causal_conv1d
    import fla
    import mamba_ssm
    import torch
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "mamba_ssm": mamba_ssm.__version__,
        "causal_conv1d": causal_conv1d.__version__,
        "fla": fla.__version__,
    }

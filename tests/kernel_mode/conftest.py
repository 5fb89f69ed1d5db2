"""The kernel test mode: CPU tensors through the kernel dispatch, with the real upstream code.

Off unless ``HYBRID_KERNEL_MODE=interpret`` (then the tests here are not even collected, so the
main suite never imports mamba_ssm, fla or triton). On, every test here gets the ``kernels``
fixture: the four dispatch modules see :func:`tests.kernel_mode.upstream.upstream_ops` and
:func:`~tests.kernel_mode.upstream.fla_upstream_ops` as the loaded kernels and take the kernel
branch for CPU tensors, and every upstream call is recorded.
``HYBRID_DISABLE_KERNELS=1`` still forces the PyTorch paths, which is how
the ``torch_paths`` fixture gives the tests the CPU path to compare against. See README.md here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

MODE_ENV = "HYBRID_KERNEL_MODE"
DISABLE_ENV = "HYBRID_DISABLE_KERNELS"

if os.environ.get(MODE_ENV) != "interpret":
    collect_ignore_glob = ["test_*.py"]
else:
    from tests.kernel_mode.upstream import fla_upstream_ops, install, upstream_ops, versions

    install()  # before anything imports triton

    def pytest_report_header(config: pytest.Config) -> str:
        pinned = ", ".join(f"{name} {version}" for name, version in versions().items())
        return f"kernel mode (Triton interpreter + upstream references): {pinned}"


@dataclass
class KernelCalls:
    """What reached the upstream kernels: function names in order, and for each
    ``selective_state_update`` whether it got the tied-headdim layout (one dt and A per head,
    stride-0 expands over headdim and d_state, as mamba_ssm's ``Mamba2.step`` passes them)."""

    names: list[str] = field(default_factory=list)
    tie_hdim: list[bool] = field(default_factory=list)

    def clear(self) -> None:
        self.names.clear()
        self.tie_hdim.clear()


def _recorded(name: str, function: Callable, calls: KernelCalls) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        calls.names.append(name)
        if name == "selective_state_update" and args[0].dim() == 4:
            dt, A, dt_bias = args[2], args[3], kwargs.get("dt_bias")
            calls.tie_hdim.append(
                A.stride(-1) == 0
                and A.stride(-2) == 0
                and dt.stride(-1) == 0
                and (dt_bias is None or dt_bias.stride(-1) == 0)
            )
        return function(*args, **kwargs)

    return wrapper


def _present_and_enabled(*tensors) -> bool:
    """``layers.ops.kernels.use_kernels`` with "on CUDA" read as "given"."""
    if os.environ.get(DISABLE_ENV) == "1":
        return False
    return any(t is not None for t in tensors)


@pytest.fixture(autouse=True)
def kernels(monkeypatch: pytest.MonkeyPatch) -> KernelCalls:
    """Route the dispatchers to the upstream code for CPU tensors; returns the call record."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    calls = KernelCalls()
    mamba, conv = upstream_ops()
    mamba = SimpleNamespace(**{n: _recorded(n, f, calls) for n, f in vars(mamba).items()})
    conv = SimpleNamespace(**{n: _recorded(n, f, calls) for n, f in vars(conv).items()})
    # By path: layers.ops.selective_scan is also the name of a function.
    for module_name in ("layers.ops.ssd.dispatch", "layers.ops.selective_scan.dispatch"):
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, "mamba_ssm_ops", lambda: mamba)
        monkeypatch.setattr(module, "use_kernels", _present_and_enabled)
    conv_module = importlib.import_module("layers.ops.conv.dispatch")
    monkeypatch.setattr(conv_module, "causal_conv1d_ops", lambda: conv)
    monkeypatch.setattr(conv_module, "use_kernels", _present_and_enabled)
    fla = fla_upstream_ops()
    fla = SimpleNamespace(**{n: _recorded(n, f, calls) for n, f in vars(fla).items()})
    delta_module = importlib.import_module("layers.ops.delta.dispatch")
    monkeypatch.setattr(delta_module, "fla_ops", lambda: fla)
    monkeypatch.setattr(delta_module, "use_kernels", _present_and_enabled)
    return calls


@contextlib.contextmanager
def _torch_paths() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DISABLE_ENV, "1")
        yield


@pytest.fixture
def torch_paths() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """``with torch_paths():`` the dispatchers take the PyTorch paths, through the real switch
    (``HYBRID_DISABLE_KERNELS=1``): the CPU path the kernels are compared with."""
    return _torch_paths

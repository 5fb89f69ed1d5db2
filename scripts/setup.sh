#!/usr/bin/env bash
# Install hybrid (editable) for CPU use. `--dev` adds the test and lint tools and the kernel
# test mode's environment (scripts/setup_kernel_mode.sh).
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): an unpinned torch
# from PyPI is the newest CUDA build with several GB of CUDA packages. An already importable
# torch is kept, so a GPU machine with its own CUDA torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [[ "${1:-}" == "--dev" ]]; then extras="[dev]"; fi
python=${PYTHON:-python3}
if ! "$python" -c "import torch" 2>/dev/null; then
  "$python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$python" -m pip install -q -e ".${extras}"
# The kernel test mode's environment (.venv-kernels: triton + the GPU extra built without
# CUDA, tests/kernel_mode/README.md); HYBRID_SKIP_KERNEL_MODE=1 leaves it out.
if [[ -n "$extras" && "${HYBRID_SKIP_KERNEL_MODE:-0}" != "1" ]]; then
  PYTHON="$python" bash scripts/setup_kernel_mode.sh
fi

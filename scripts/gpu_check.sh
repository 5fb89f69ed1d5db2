#!/usr/bin/env bash
# The one-shot GPU check (scripts/gpu_check.py): installs this package with its GPU extra
# (mamba-ssm, causal-conv1d; built against the machine's CUDA torch) unless the kernels
# already import, then runs the GPU tests and benchmarks within a time budget and writes
# docs/gpu/ (or --out). Arguments go to gpu_check.py (--budget, --only, --out, --dry-run).
# An install that fails (no registry, no compiler) is reported and the check runs without
# the kernels: the PyTorch paths on CUDA are still measured.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: error: no CUDA device visible to $python's torch; nothing was run" >&2
  exit 2
fi
kernels='from layers.ops.kernels import mamba_ssm_ops as m, causal_conv1d_ops as c
import sys; sys.exit(0 if m() and c() else 1)'
if ! "$python" -c "$kernels" 2>/dev/null; then
  echo "gpu_check: installing the GPU extra (mamba-ssm, causal-conv1d) ..."
  if ! "$python" -m pip install -q --no-build-isolation -e ".[gpu,dev]"; then
    echo "gpu_check: the GPU extra did not install; checking without the kernels" >&2
  fi
fi
exec "$python" scripts/gpu_check.py "$@"

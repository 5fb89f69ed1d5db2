#!/usr/bin/env bash
# Create .venv-kernels: the environment of the kernel test mode (tests/kernel_mode/README.md).
#
# It sees the main environment's packages (--system-site-packages: torch, hybrid, pytest) and
# adds triton and the GPU extra, mamba-ssm and causal-conv1d, installed with their CUDA builds
# skipped, and fla-core (flash-linear-attention's Triton kernels, pure Python). Nothing of it is
# imported by the main environment, whose tests keep the PyTorch paths. Pinned: the mode checks
# our dispatch against these exact upstream releases.
#
#   bash scripts/setup_kernel_mode.sh          # about 30 s with a warm pip cache
#   KERNEL_VENV=/some/dir bash scripts/setup_kernel_mode.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${KERNEL_VENV:-.venv-kernels}
TRITON_SPEC=${TRITON_SPEC:-triton==3.9.0}
MAMBA_SPEC=${MAMBA_SPEC:-mamba-ssm==2.3.2.post1}
CONV_SPEC=${CONV_SPEC:-causal-conv1d==1.7.0}
FLA_SPEC=${FLA_SPEC:-fla-core==0.6.0}

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" - "$MAMBA_SPEC" "$CONV_SPEC" "$TRITON_SPEC" \
  "$FLA_SPEC" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
wanted = dict(spec.split("==") for spec in sys.argv[1:])
sys.exit(any(version(name) != v for name, v in wanted.items()))
EOF
then
  echo "kernel mode: $venv is up to date"
  exit 0
fi

rm -rf "$venv"
"$python" -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "$TRITON_SPEC" ninja wheel packaging setuptools
# The sources are built without CUDA: only their Python parts (the Triton kernels and the
# reference implementations) are used. --no-deps: their other requirements (einops,
# transformers) come from the main environment, and the GPU-only ones (tilelang, quack,
# cutlass) would add half a gigabyte for nothing.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
  "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps "$MAMBA_SPEC" "$CONV_SPEC"
# fla-core's one requirement, einops, comes from the main environment; --no-deps keeps pip from
# replacing the CPU torch with a CUDA one.
"$venv/bin/python" -m pip install -q --no-deps "$FLA_SPEC"
echo "kernel mode: created $venv ($TRITON_SPEC, $MAMBA_SPEC, $CONV_SPEC, $FLA_SPEC)"

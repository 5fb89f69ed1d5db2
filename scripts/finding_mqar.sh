#!/usr/bin/env bash
# Findings 1-2: train the six MQAR recipes (attention, Mamba-2, Mamba-2 + one attention,
# Gated DeltaNet, Kimi Delta Attention, short convolutions; the Mamba-2 and delta-rule stacks
# hold equal state), evaluate each with `hybrid eval mqar` on test examples from a disjoint
# seed stream, and write docs/findings/mqar.{json,md,png}. About 25 minutes on 2 CPU cores.
#   bash scripts/finding_mqar.sh [extra recipe overrides, e.g. output_dir=/tmp/runs]
set -euo pipefail
cd "$(dirname "$0")/.."
output_dir=runs
for arg in "$@"; do [[ "$arg" == output_dir=* ]] && output_dir="${arg#output_dir=}"; done
for layout in attention mamba2 hybrid deltanet kda shortconv; do
  run="$output_dir/mqar_$layout"
  if [[ ! -f "$run/model/model.safetensors" ]]; then
    hybrid train "recipes/findings/mqar_$layout.yaml" logging.wandb=false --no-progress "$@"
  fi
  hybrid eval mqar --checkpoint "$run" --seq-lens 64 128 256 --kv-pairs 2 4 8 16 32 \
    --examples 256 --no-progress
done
python3 scripts/finding_mqar_report.py --runs "$output_dir" --out docs/findings

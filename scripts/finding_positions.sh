#!/usr/bin/env bash
# Finding 5 (Press et al. 2022): length extrapolation of positional encodings. Trains the five
# positions recipes (attention only with sinusoidal, RoPE, ALiBi and no encoding; Mamba-2 +
# NoPE attention) on this Python's standard library at 128 bytes, evaluates each with
# `hybrid eval ppl` at 1x-8x that length on 32 documents, and writes
# docs/findings/positions.{json,md,png}. Trainings of 1,200 steps: 5 minutes each for the
# attention-only models and 7 for the hybrid on 2 cores at 319 GFLOP/s (fp32 matmul).
#   bash scripts/finding_positions.sh [extra recipe overrides, e.g. output_dir=/tmp/runs]
set -euo pipefail
cd "$(dirname "$0")/.."
output_dir=runs
for arg in "$@"; do [[ "$arg" == output_dir=* ]] && output_dir="${arg#output_dir=}"; done
for encoding in sinusoidal rope alibi nope mamba2_nope; do
  run="$output_dir/positions_$encoding"
  if [[ ! -f "$run/model/model.safetensors" ]]; then
    hybrid train "recipes/findings/positions_$encoding.yaml" logging.wandb=false --no-progress "$@"
  fi
  hybrid eval ppl --checkpoint "$run" --train-length 128 --multiples 1 2 4 8 --samples 32 \
    --batch-size 8 --no-progress
done
python3 scripts/finding_positions_report.py --runs "$output_dir" --out docs/findings

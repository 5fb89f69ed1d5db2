#!/usr/bin/env bash
# Finding 3 (Samba): train the three passkey recipes (full RoPE attention; Mamba-1, and Mamba-2,
# + sliding-window attention) on passkey sequences of 512 bytes, evaluate each with `hybrid eval
# passkey` at 0.75x-16x that length, and write docs/findings/passkey.{json,md,png} and the
# heatmaps. About 53 minutes on 2 CPU cores: 13, 19 and 19 for the trainings, a minute for the
# evaluations.
#   bash scripts/finding_passkey.sh [extra recipe overrides, e.g. output_dir=/tmp/runs]
set -euo pipefail
cd "$(dirname "$0")/.."
output_dir=runs
for arg in "$@"; do [[ "$arg" == output_dir=* ]] && output_dir="${arg#output_dir=}"; done
for layout in attention samba mamba2_swa; do
  run="$output_dir/passkey_$layout"
  if [[ ! -f "$run/model/model.safetensors" ]]; then
    hybrid train "recipes/findings/passkey_$layout.yaml" logging.wandb=false --no-progress "$@"
  fi
  hybrid eval passkey --checkpoint "$run" --lengths 384 512 1024 2048 4096 8192 \
    --depths 0 0.25 0.5 0.75 1 --trials 8 --batch-size 8 --no-progress
  cp "$run/eval/passkey/passkey_heatmap.png" "docs/findings/passkey_heatmap_$layout.png"
done
python3 scripts/finding_passkey_report.py --runs "$output_dir" --out docs/findings

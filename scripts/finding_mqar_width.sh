#!/usr/bin/env bash
# Finding 1, the width axis (Zoology): the Mamba-2 MQAR recipe at several model widths, each
# evaluated with `hybrid eval mqar` like scripts/finding_mqar.sh, then accuracy vs width in
# docs/findings/mqar_width.{json,md,png} (the attention run of finding_mqar.sh is the
# reference line when present). Minutes on 2 CPU cores: about 5 (d_model 64), 9 (128);
# wider ones take longer.
#   bash scripts/finding_mqar_width.sh [widths...]   (default: 64 128 256)
# Recipe overrides go in OVERRIDES, e.g. OVERRIDES="output_dir=/tmp/runs".
set -euo pipefail
cd "$(dirname "$0")/.."
widths=("$@")
[[ ${#widths[@]} -eq 0 ]] && widths=(64 128 256)
read -r -a overrides <<< "${OVERRIDES:-}"
output_dir=runs
for arg in "${overrides[@]}"; do [[ "$arg" == output_dir=* ]] && output_dir="${arg#output_dir=}"; done
for width in "${widths[@]}"; do
  name="mqar_mamba2_d$width"
  if [[ ! -f "$output_dir/$name/model/model.safetensors" ]]; then
    hybrid train recipes/findings/mqar_mamba2.yaml "name=$name" "model.d_model=$width" \
      logging.wandb=false --no-progress "${overrides[@]}"
  fi
  hybrid eval mqar --checkpoint "$output_dir/$name" --seq-lens 64 --kv-pairs 2 4 8 16 \
    --examples 256 --no-progress
done
python3 scripts/finding_mqar_width_report.py --runs "$output_dir" --widths "${widths[@]}" \
  --out docs/findings

#!/usr/bin/env bash
# The quick start's main job: set up, train the quick-start recipe on this Python's standard
# library sources (about 10 minutes on 2 CPU cores), validate, and sample a completion.
# Run again, it continues the same run (--resume) and samples again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
resume=()
if [[ -f runs/quickstart/checkpoints/last.ckpt ]]; then resume=(--resume); fi
hybrid train recipes/quickstart.yaml "${resume[@]}" "$@"

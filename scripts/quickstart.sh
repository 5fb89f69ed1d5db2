#!/usr/bin/env bash
# The quick start's main job: set up, then build the quick-start model and report it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
hybrid info recipes/quickstart.yaml --context 32768
python3 scripts/forward_demo.py recipes/quickstart.yaml

#!/usr/bin/env bash
# The main job of the README: set up ./.venv, then run the offline CPU demo.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
python examples/demo.py --output_dir "${1:-out/demo}"

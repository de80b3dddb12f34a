#!/usr/bin/env bash
# The test command of the README: sets up ./.venv, then runs the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
python -m pytest -q -p no:cacheprovider "$@"

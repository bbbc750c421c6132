#!/usr/bin/env bash
# Set-up on a fresh machine, safe to re-run: installs torch only when none is importable
# (torch==2.13.0; on a CPU-only machine use the CPU wheel, on a GPU machine install the CUDA
# build you want first), then poc-lora in editable mode with every extra (dev, quant, plot).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev,all]"

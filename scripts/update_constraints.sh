#!/usr/bin/env bash
# Move constraints.txt forward: in a fresh virtual environment, install poc-lora[dev,all,serve] at the
# newest versions (no constraints; torch==2.13.0 from PyTorch's CPU index, or $TORCH_INDEX), run
# the test suite with and without HF_HUB_OFFLINE=1, and only if both pass rewrite constraints.txt
# from that environment (scripts/freeze_constraints.py). Commit the new file with the test run's
# summary. About 20 minutes on 2 cores (llama.cpp's build included) plus the downloads (torch's CPU wheel: about 200 MB).
#   bash scripts/update_constraints.sh            # the venv goes to a temporary directory
#   KEEP_VENV=.venv-update bash scripts/update_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KEEP_VENV:-$(mktemp -d)/venv}
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
"$VPY" -m pip install --quiet "torch==2.13.0" --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
PYTHON="$VPY" POC_LORA_CONSTRAINTS= bash scripts/setup.sh
# the serve extra too (as .ci/run installs it; it compiles llama.cpp, minutes): freeze_constraints.py pins it
"$VPY" -m pip install --quiet -e ".[serve]"
"$VPY" -m pip list --format=freeze | grep -iE '^(transformers|peft|accelerate|bitsandbytes|datasets|torch)=='
"$VPY" -m pytest -q
HF_HUB_OFFLINE=1 "$VPY" -m pytest -q
"$VPY" scripts/freeze_constraints.py > constraints.txt.new
mv constraints.txt.new constraints.txt
git --no-pager diff --stat -- constraints.txt || true
echo "constraints.txt rewritten from $VENV (tests passed with and without HF_HUB_OFFLINE=1)"

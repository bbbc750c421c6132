#!/usr/bin/env bash
# M = 8 Noisy-AdamW LoRA adapters on one 8-GPU machine, one adapter per GPU (no gradient
# communication), then the PoC merge into <output_dir>/merged (arXiv:2502.05784, Table 1).
#
# Expected per adapter (ESTIMATES from the paper's setup, not measured here), each GPU training its
# own adapter at the same time, so the wall time of the whole ensemble is about one adapter's:
#   Llama-2-7B, 3 epochs: ~8-12 h per A100-80GB, ~18-22 GB per GPU
#   Llama-3-8B, 3 epochs: ~10-14 h per A100-80GB, ~24-28 GB per GPU
#   1-epoch ablation:     a third of the above
# The merge itself takes seconds and needs no GPU.
#
# Usage: scripts/train_8gpu_ensemble.sh [CONFIG] [--key value ...]
#   scripts/train_8gpu_ensemble.sh configs/train/llama3_8b_commonsense.yaml
#   scripts/train_8gpu_ensemble.sh configs/train/llama2_7b_commonsense_1epoch.yaml --temperature 1e-4 \
#       --output_dir runs/l2_1epoch_T1e-4
# Rerun the same command to resume: finished adapters are skipped, unfinished ones resume.
set -euo pipefail
CONFIG=${1:-configs/train/llama2_7b_commonsense.yaml}
shift || true
NUM_GPUS=${NUM_GPUS:-8}
NUM_ADAPTERS=${NUM_ADAPTERS:-8}
cd "$(dirname "$0")/.."
exec accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes "$NUM_GPUS" \
    "$(command -v poc-lora)" ensemble --config "$CONFIG" --num_adapters "$NUM_ADAPTERS" \
    --strategy parallel --merge "$@"

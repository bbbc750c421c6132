#!/usr/bin/env bash
# M = 8 Noisy-AdamW LoRA adapters on one 8-GPU machine, one adapter per GPU (no gradient
# communication), then the PoC merge into <output_dir>/merged (arXiv:2502.05784, Table 1).
#
# Per GPU, from `poc-lora plan` (the recipe's step traced at its real shape on the meta device;
# docs/planning.md): each GPU trains its own adapter at the same time, so the ensemble's wall
# time is one adapter's:
#   Llama-2-7B, 3 epochs: 15.9 GiB per GPU (torch-allocated), 165.6 TFLOP x 31,932 steps per adapter
#   Llama-3-8B, 3 epochs: 22.7 GiB per GPU, 184.4 TFLOP x 31,932 steps per adapter
#   1-epoch ablation:     the same memory, 10,644 steps
# Time is not measured: at an assumed 125 TFLOP/s sustained (40% of an A100's bf16 peak) one
# adapter is ~11.8 h (Llama-2-7B) / ~13.1 h (Llama-3-8B). One 80 GB GPU can instead train all 8
# Llama-2-7B members together: poc-lora ensemble --strategy batched (39.1 GiB planned).
# Check another recipe or GPU first: poc-lora plan --config CONFIG --gpu_memory GB
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

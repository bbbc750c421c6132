#!/usr/bin/env bash
# One Noisy-AdamW LoRA adapter on one GPU (the paper's per-adapter recipe, arXiv:2502.05784).
#
# Expected per adapter (ESTIMATES from the paper's setup, not measured here: batch 16, cutoff 256,
# bf16, gradient checkpointing, ~31.9k steps for 3 epochs of commonsense_170k):
#   Llama-2-7B  (llama2_7b_commonsense.yaml):   ~8-12 h on an A100-80GB, ~18-22 GB GPU memory
#   Llama-3-8B  (llama3_8b_commonsense.yaml):   ~10-14 h on an A100-80GB, ~24-28 GB GPU memory
#   1-epoch ablation (*_1epoch.yaml):           a third of the above
#   QLoRA 24 GB (llama2_7b_commonsense_qlora_24gb.yaml): ~25-35 h on an RTX 4090, ~10-14 GB
#   tiny_cpu.yaml (no GPU needed):              well under a minute on 2 CPU cores
#
# Usage: scripts/train_1gpu.sh [CONFIG] [--key value ...]
#   scripts/train_1gpu.sh configs/train/llama2_7b_commonsense.yaml --seed 0 --output_dir runs/l2_a0
#   scripts/train_1gpu.sh configs/train/llama2_7b_commonsense.yaml --resume_from_checkpoint true   # after a crash
set -euo pipefail
CONFIG=${1:-configs/train/llama2_7b_commonsense.yaml}
shift || true
cd "$(dirname "$0")/.."
exec accelerate launch --config_file configs/accelerate/single_gpu.yaml "$(command -v poc-lora)" \
    train --config "$CONFIG" "$@"

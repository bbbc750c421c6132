#!/usr/bin/env bash
# One Noisy-AdamW LoRA adapter on one GPU (the paper's per-adapter recipe, arXiv:2502.05784).
#
# Per adapter, from `poc-lora plan --config CONFIG` (the step traced at its real shape on the meta
# device, docs/planning.md; batch 16, cutoff 256, bf16, activation checkpointing, 31,932 steps
# for 3 epochs of commonsense_170k); GPU memory is torch-allocated:
#   Llama-2-7B  (llama2_7b_commonsense.yaml):   15.9 GiB, 165.6 TFLOP per step
#   Llama-3-8B  (llama3_8b_commonsense.yaml):   22.7 GiB, 184.4 TFLOP per step
#   1-epoch ablation (*_1epoch.yaml):           the same memory, 10,644 steps
#   QLoRA 24 GB (llama2_7b_commonsense_qlora_24gb.yaml): 5.5 GiB (4-bit base 4.1 GiB)
#   tiny_cpu.yaml (no GPU needed):              well under a minute on 2 CPU cores
# Time is not measured: at an assumed 125 TFLOP/s sustained (40% of an A100's bf16 peak) a
# Llama-2-7B adapter is ~11.8 h, Llama-3-8B ~13.1 h. 8 members on this one GPU:
# poc-lora ensemble --strategy batched -M 8 (Llama-2-7B: 39.1 GiB planned).
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

#!/usr/bin/env bash
# The whole paper pipeline on GPU machines: M adapters -> PoC merge -> evaluation -> report.
#
#   scripts/run_pipeline.sh [CONFIG] [NUM_GPUS] [extra --key value overrides...]
#   scripts/run_pipeline.sh configs/pipeline/llama2_7b_paper.yaml 8      # one adapter per GPU
#   scripts/run_pipeline.sh configs/pipeline/llama3_8b_paper.yaml 1      # sequential, one GPU
#
# Training runs under `accelerate launch` with one process per GPU (each process trains the
# adapters j = rank mod NUM_GPUS, no gradient communication); the same command then merges,
# evaluates and writes report.md / report.json / report.png on rank 0. Rerunning resumes.
# Expected time per adapter (estimates, A100-80GB, bf16): Llama-2-7B ~8-12 h for 3 epochs,
# ~20 GB GPU memory; generation-mode evaluation of one model on the 8 suites ~2-4 h with
# batch size 16 (rank mode: minutes).
set -euo pipefail
CONFIG=${1:-configs/pipeline/llama2_7b_paper.yaml}
GPUS=${2:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
shift $(( $# > 2 ? 2 : $# ))
cd "$(dirname "$0")/.."
if [ "$GPUS" -gt 1 ]; then
  # Training in parallel, then merge + eval on rank 0 (the other ranks exit after training).
  accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes "$GPUS" \
    -m poc_lora.cli pipeline --config "$CONFIG" --strategy parallel "$@"
else
  poc-lora pipeline --config "$CONFIG" "$@"
fi

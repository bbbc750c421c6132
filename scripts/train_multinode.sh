#!/usr/bin/env bash
# M adapters over several machines, one adapter per GPU, merged by global rank 0 at the end.
# Run this same script on every node with NODE_RANK=0..NUM_NODES-1 and MASTER_ADDR = node 0's
# address; OUTPUT_DIR must be on a filesystem all nodes share (rank 0 reads every adapter to merge).
#
# Per GPU, from `poc-lora plan` (docs/planning.md): as in scripts/train_8gpu_ensemble.sh
# (Llama-2-7B 15.9 GiB, Llama-3-8B 22.7 GiB per GPU; 31,932 steps per adapter for 3 epochs);
# with NUM_NODES x GPUS_PER_NODE >= M the whole ensemble takes about one adapter's time.
#
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/train_multinode.sh configs/train/llama2_7b_commonsense.yaml
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/train_multinode.sh configs/train/llama2_7b_commonsense.yaml
set -euo pipefail
CONFIG=${1:-configs/train/llama2_7b_commonsense.yaml}
shift || true
NUM_NODES=${NUM_NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NUM_ADAPTERS=${NUM_ADAPTERS:-$((NUM_NODES * GPUS_PER_NODE))}
: "${NODE_RANK:?set NODE_RANK (0 on the main node)}" "${MASTER_ADDR:?set MASTER_ADDR (the main node)}"
cd "$(dirname "$0")/.."
exec accelerate launch --config_file configs/accelerate/multi_node.yaml \
    --num_machines "$NUM_NODES" --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
    --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}" \
    "$(command -v poc-lora)" ensemble --config "$CONFIG" --num_adapters "$NUM_ADAPTERS" \
    --strategy parallel --merge "$@"

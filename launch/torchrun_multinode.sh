#!/usr/bin/env bash
# Multi-node launch with torchrun: run this on every node.
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0's address> \
#     bash launch/torchrun_multinode.sh configs/llama3.1-405b-h100.yaml [--set key=value ...]
# torchrun numbers ranks node-major, so with TP innermost (megatron order tp-cp-ep-dp-pp)
# each TP group is one node's 8 GPUs and the CP rings run across nodes.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec torchrun --nnodes "$NNODES" --nproc_per_node "${GPUS_PER_NODE:-8}" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  -m cp_megatron.cli run "$@"

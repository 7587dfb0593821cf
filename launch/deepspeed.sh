#!/usr/bin/env bash
# Launch with the DeepSpeed launcher (pdsh/ssh to the nodes of a hostfile), from one node:
#   HOSTFILE=launch/hostfile.example bash launch/deepspeed.sh configs/llama3.1-405b-h100.yaml
# On one machine without a hostfile: deepspeed --num_gpus 2 --module cp_megatron.cli run CONFIG
# (also works on CPU, where DeepSpeed selects its CPU accelerator and we use gloo).
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:-launch/hostfile.example}" --num_gpus "${GPUS_PER_NODE:-8}" \
  --master_port "${MASTER_PORT:-29500}" --module cp_megatron.cli run "$@"

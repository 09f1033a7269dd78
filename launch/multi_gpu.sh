#!/usr/bin/env bash
# Train CART on GPU hosts.
#
# One host, all its GPUs (one process sees every GPU; the `data` mesh axis spans them):
#   launch/multi_gpu.sh gin_configs/experiments/mscoco.gin /runs/cart_coco [--gin.X=V ...]
#
# Several hosts: run this on every host with the same coordinator and its own process id;
# jax.distributed.initialize() is called from these variables (cart_jax/train/trainer.py):
#   NUM_HOSTS=2 HOST_ID=0 COORDINATOR=10.0.0.1:1234 launch/multi_gpu.sh GIN_FILE MODEL_DIR   # host 0
#   NUM_HOSTS=2 HOST_ID=1 COORDINATOR=10.0.0.1:1234 launch/multi_gpu.sh GIN_FILE MODEL_DIR   # host 1
# MODEL_DIR must be on a file system every host sees (orbax writes one checkpoint collectively).
# The GPU hosts need no TensorFlow: InputConfig.pipeline="auto" falls back to the numpy pipeline.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0"; exit 2
fi
GIN_FILE=$1; MODEL_DIR=$2; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [[ -n "${NUM_HOSTS:-}" && "${NUM_HOSTS}" -gt 1 ]]; then
  export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host:port}
  export JAX_NUM_PROCESSES=${NUM_HOSTS}
  export JAX_PROCESS_ID=${HOST_ID:?set HOST_ID}
fi
exec cart train --gin_file="${GIN_FILE}" --gin.MODEL_DIR="${MODEL_DIR}" "$@"

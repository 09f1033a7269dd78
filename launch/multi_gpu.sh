#!/usr/bin/env bash
# Train or evaluate CART with every device of one or several hosts (GPUs; or CPU processes).
#
# Train (one host, all its GPUs: one process sees every GPU, the `data` mesh axis spans them):
#   launch/multi_gpu.sh gin_configs/experiments/mscoco.gin /runs/cart_coco [--gin.X=V ...]
# Evaluate a trained run (each device searches its share of every query batch):
#   launch/multi_gpu.sh eval /runs/cart_coco [cart eval flags: --split test --json out.json ...]
# Add or remove items (the fine-tune of an add runs on every device; process 0 writes):
#   launch/multi_gpu.sh index add /runs/cart_coco --corpus NEW_CORPUS --embeddings NEW_E.npy
#
# Several hosts: the same command on every host, with one coordinator and each host's own id
# (jax.distributed.initialize() is called from these, cart_jax/train/trainer.py):
#   NUM_HOSTS=2 HOST_ID=0 COORDINATOR=10.0.0.1:1234 launch/multi_gpu.sh GIN_FILE MODEL_DIR   # host 0
#   NUM_HOSTS=2 HOST_ID=1 COORDINATOR=10.0.0.1:1234 launch/multi_gpu.sh GIN_FILE MODEL_DIR   # host 1
# MODEL_DIR (and the corpus and index) must be on a file system every host sees: process 0 writes
# MODEL_DIR's files, orbax writes each checkpoint with all processes together.
# Install: pip install -e '.[gpu]' (jax[cuda12]). The GPU hosts need no TensorFlow:
# InputConfig.pipeline="auto" falls back to the numpy pipeline.
#
# On CPU (a test of the multi-host path on one machine): JAX_PLATFORMS=cpu, processes talk
# through gloo; LOCAL_DEVICES=N gives each process N CPU devices. E.g. two processes:
#   JAX_PLATFORMS=cpu LOCAL_DEVICES=2 NUM_HOSTS=2 HOST_ID=0 COORDINATOR=localhost:29500 launch/multi_gpu.sh ... &
#   JAX_PLATFORMS=cpu LOCAL_DEVICES=2 NUM_HOSTS=2 HOST_ID=1 COORDINATOR=localhost:29500 launch/multi_gpu.sh ...
# CART: the command to run (default: `cart` when on PATH, else `python3 -m cart_jax.cli.main`).
set -euo pipefail
usage() { sed -n '2,27p' "$0"; exit 2; }
if [[ $# -lt 2 ]]; then usage; fi
if [[ -n "${CART:-}" ]]; then
  read -r -a RUN <<< "${CART}"
elif command -v cart >/dev/null 2>&1; then
  RUN=(cart)
else
  RUN=("${PYTHON:-python3}" -m cart_jax.cli.main)
fi
if [[ "${JAX_PLATFORMS:-}" == "cpu" ]]; then
  export JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}
  if [[ -n "${LOCAL_DEVICES:-}" ]]; then
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${LOCAL_DEVICES}"
  fi
else
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
fi
if [[ -n "${NUM_HOSTS:-}" && "${NUM_HOSTS}" -gt 1 ]]; then
  export JAX_COORDINATOR_ADDRESS=${COORDINATOR:?set COORDINATOR=host:port}
  export JAX_NUM_PROCESSES=${NUM_HOSTS}
  export JAX_PROCESS_ID=${HOST_ID:?set HOST_ID}
fi
if [[ "$1" == "eval" ]]; then
  MODEL_DIR=$2; shift 2
  exec "${RUN[@]}" eval --model-dir "${MODEL_DIR}" "$@"
fi
if [[ "$1" == "index" ]]; then
  if [[ $# -lt 3 ]]; then usage; fi
  ACTION=$2; MODEL_DIR=$3; shift 3
  exec "${RUN[@]}" index "${ACTION}" --model-dir "${MODEL_DIR}" "$@"
fi
if [[ "$1" == "train" ]]; then shift; fi
if [[ $# -lt 2 ]]; then usage; fi
GIN_FILE=$1; MODEL_DIR=$2; shift 2
exec "${RUN[@]}" train --gin-file="${GIN_FILE}" --gin.MODEL_DIR="${MODEL_DIR}" "$@"

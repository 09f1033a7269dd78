#!/usr/bin/env bash
# Train CART on a Cloud TPU VM (single host or a pod slice: every worker runs the same command;
# jax.distributed is initialised from the TPU environment, the mesh spans all chips).
#
#   launch/tpu_vm.sh TPU_NAME ZONE gin_configs/experiments/flickr30k.gin gs://BUCKET/cart_f30k [--gin.X=V ...]
#
# Expects the repository at ~/cart-jax on every worker (first run: SETUP=1 clones nothing, it
# installs: `pip install -e .[tpu]` needs jax[tpu]); corpora/ and runs/ paths in the gin file must be
# readable on every worker (a GCS path or a copy per worker). Checkpoints go to MODEL_DIR (orbax, GCS ok).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; GIN_FILE=$3; MODEL_DIR=$4; shift 4
EXTRA=("$@")
REMOTE_DIR=${REMOTE_DIR:-~/cart-jax}
CMD="cd ${REMOTE_DIR} && "
if [[ "${SETUP:-0}" == "1" ]]; then
  CMD+="pip install -q -e . 'jax[tpu]' && "
fi
# CART_DISTRIBUTED=1: call jax.distributed.initialize() even on a single-host slice (harmless).
CMD+="CART_DISTRIBUTED=1 cart train --gin_file=${GIN_FILE} --gin.MODEL_DIR=${MODEL_DIR} --no-progress ${EXTRA[*]:-}"
exec gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --worker=all --command "${CMD}"

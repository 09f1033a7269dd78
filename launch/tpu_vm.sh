#!/usr/bin/env bash
# Train or evaluate CART on a Cloud TPU VM: one host or a pod slice. Every worker runs the same
# command (gcloud ... ssh --worker=all); jax.distributed is initialised from the TPU environment,
# the mesh spans every chip of the slice, process 0 writes MODEL_DIR's files, orbax writes each
# checkpoint with all workers together.
#
#   launch/tpu_vm.sh TPU_NAME ZONE gin_configs/experiments/flickr30k.gin gs://BUCKET/cart_f30k [--gin.X=V ...]
#   launch/tpu_vm.sh TPU_NAME ZONE eval gs://BUCKET/cart_f30k [cart eval flags: --split test ...]
#
# MODEL_DIR may be a bucket (gs://...): it stays a URI (etils.epath; orbax writes there directly).
# CORPUS_DIR / INDEX_DIR in the gin file: a bucket too, or the same local path on every worker.
# Expects the repository at REMOTE_DIR (default ~/cart-jax) on every worker; SETUP=1 installs it
# first: pip install -e '.[tpu]' (jax[tpu], with libtpu) and gcsfs for gs:// paths without
# TensorFlow. DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail
usage() { sed -n '2,15p' "$0"; exit 2; }
if [[ $# -lt 4 ]]; then usage; fi
TPU_NAME=$1; ZONE=$2; shift 2
REMOTE_DIR=${REMOTE_DIR:-"~/cart-jax"}  # expanded on the worker
quote() { local out=() a; for a in "$@"; do out+=("$(printf '%q' "$a")"); done; echo "${out[*]}"; }
if [[ "$1" == "eval" ]]; then
  MODEL_DIR=$2; shift 2
  CART_ARGS=(eval --model-dir "${MODEL_DIR}" --quiet "$@")
else
  GIN_FILE=$1; MODEL_DIR=$2; shift 2
  CART_ARGS=(train --gin-file="${GIN_FILE}" --gin.MODEL_DIR="${MODEL_DIR}" --quiet "$@")
fi
CMD="cd ${REMOTE_DIR} && "
if [[ "${SETUP:-0}" == "1" ]]; then
  CMD+="pip install -q -e '.[tpu]' && "
fi
# CART_DISTRIBUTED=1: call jax.distributed.initialize() even on a single-host slice (harmless).
CMD+="CART_DISTRIBUTED=1 cart $(quote "${CART_ARGS[@]}")"
GCLOUD=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --worker=all --command "${CMD}")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  quote "${GCLOUD[@]}"
  exit 0
fi
exec "${GCLOUD[@]}"

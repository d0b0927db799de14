#!/usr/bin/env bash
# Serve a model repository written by triton/deploy.py with Triton Inference Server in the NGC container, on GPUs.
#
#   scripts/docker/triton_inference_server.sh [model_repository] [gpus]
#
# model_repository: folder holding <name>/config.pbtxt and <name>/<version>/model.* (default ./model_repository).
# gpus: what `docker run --gpus` takes (default all). Ports 8000 (HTTP), 8001 (gRPC) and 8002 (metrics) are
# published on the host, as in the reference's script. TRITON_CONTAINER picks the image (default 24.10, the release
# whose server, 2.51, nvidia-pytriton bundles for the CPU tests); TRITON_ARGS adds server flags.
set -euo pipefail

MODEL_REPOSITORY=$(realpath "${1:-model_repository}")
GPUS=${2:-all}
TRITON_CONTAINER=${TRITON_CONTAINER:-nvcr.io/nvidia/tritonserver:24.10-py3}

if [[ ! -d "${MODEL_REPOSITORY}" ]]; then
  echo "triton_inference_server.sh: error: model repository ${MODEL_REPOSITORY} does not exist" >&2
  exit 1
fi

# TRITON_ARGS is split into words on purpose (several flags).
# ORT_TENSORRT_FP16_ENABLE: ONNX models configured with the TensorRT accelerator build fp16 engines (reference).
# shellcheck disable=SC2086
exec docker run --rm --gpus "${GPUS}" --ipc=host --shm-size=1g --ulimit memlock=-1 --ulimit stack=67108864 \
  -p 8000:8000 -p 8001:8001 -p 8002:8002 \
  -e ORT_TENSORRT_FP16_ENABLE=1 \
  -v "${MODEL_REPOSITORY}:/models:ro" \
  "${TRITON_CONTAINER}" \
  tritonserver --model-repository=/models --strict-model-config=true --exit-on-error=true \
    --log-verbose=0 ${TRITON_ARGS:-}

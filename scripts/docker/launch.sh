#!/usr/bin/env bash
# Start the training image with the repository at /workspace/bert and results/ at /results.
#   bash scripts/docker/launch.sh [CMD] [NV_VISIBLE_DEVICES] [EXTRA_MOUNTS] [IMAGE] [DOCKER_BRIDGE]
# CMD: the command to run (default /bin/bash); NV_VISIBLE_DEVICES: GPUs to expose, all (default) or a list such as
# 0,1; EXTRA_MOUNTS: more docker options, e.g. "-v /data/bert:/workspace/bert/data"; IMAGE: default bert;
# DOCKER_BRIDGE: the container's network (default host). CMD and EXTRA_MOUNTS are split into words.
set -euo pipefail

CMD=${1:-/bin/bash}
NV_VISIBLE_DEVICES=${2:-all}
EXTRA_MOUNTS=${3:-}
IMAGE=${4:-bert}
DOCKER_BRIDGE=${5:-host}

read -ra cmd <<< "$CMD"
read -ra extra_mounts <<< "$EXTRA_MOUNTS"
interactive=()
[ -t 0 ] && [ -t 1 ] && interactive=(-it)  # a terminal gets an interactive shell; a script gets plain output
mkdir -p "$PWD/results"

docker run "${interactive[@]}" --rm \
  --gpus "\"device=$NV_VISIBLE_DEVICES\"" \
  --net="$DOCKER_BRIDGE" \
  --shm-size=1g \
  --ulimit memlock=-1 \
  --ulimit stack=67108864 \
  -v "$PWD:/workspace/bert" \
  -v "$PWD/results:/results" \
  "${extra_mounts[@]}" \
  "$IMAGE" "${cmd[@]}"

#!/usr/bin/env bash
# Build the training image from the repository's Dockerfile, and push it when asked.
#   bash scripts/docker/build.sh [URL] [PUSH]
# URL: the image name and tag (default bert; run.sub runs bert:${IMAGE_VERSION}, e.g. bert:24.12-py3).
# PUSH: push (docker push URL once built) or none (default: keep the image locally).
# FROM_IMAGE_NAME, when set, replaces the NGC PyTorch base image.
set -euo pipefail

URL=${1:-bert}
PUSH=${2:-none}
case "$PUSH" in
  push|none) ;;
  *) echo "build.sh: PUSH (argument 2) must be push or none, got '$PUSH'" >&2; exit 1 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

build_args=()
[ -n "${FROM_IMAGE_NAME:-}" ] && build_args+=(--build-arg "FROM_IMAGE_NAME=$FROM_IMAGE_NAME")
docker build --network=host --rm --pull --no-cache "${build_args[@]}" -t "$URL" .

if [ "$PUSH" = push ]; then
  docker push "$URL"
else
  echo "Keep the built image locally."
fi

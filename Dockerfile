# GPU image: NGC PyTorch (CUDA build of torch, NCCL, optional apex) plus this recipe's requirements and jemalloc.
#   bash scripts/docker/build.sh bert:24.12-py3        (run.sub's default image: bert:${IMAGE_VERSION})
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:24.12-py3
FROM ${FROM_IMAGE_NAME}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# pbzip2/pv/bzip2: Wikipedia dump handling; cabextract and iputils-ping as the reference's image; libjemalloc2: the
# allocator run.sub preloads into the preprocessing (USE_JEMALLOC); numactl: bind.sh's CPU/memory binding.
# The image's Ubuntu release decides the versions, so they are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends pbzip2 pv bzip2 cabextract iputils-ping libjemalloc2 numactl \
 && rm -rf /var/lib/apt/lists/*
ENV BERT_PREP_WORKING_DIR=/workspace/bert/data
WORKDIR /workspace/bert
COPY requirements.txt requirements-dev.txt ./
# The image's CUDA torch is kept: requirements.txt pins the CPU wheel, so that line is dropped and the installed
# torch is a constraint no other package may replace. dask-mpi and mpi4py (built against the image's Open MPI)
# serve run.sub's preprocessing under srun --mpi (data.preprocess_pretraining --schedule mpi).
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && grep -v '^torch==' requirements.txt > /tmp/requirements.txt \
 && grep -v '^-r' requirements-dev.txt > /tmp/requirements-dev.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements.txt -r /tmp/requirements-dev.txt \
    "dask-mpi>=2022.4" "mpi4py>=3.1" \
 && python -c "import torch; assert torch.cuda.is_available() or torch.version.cuda, 'the CUDA torch was replaced'"
COPY . .

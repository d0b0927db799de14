# GPU image: NGC PyTorch (CUDA build of torch, NCCL, optional apex) plus this recipe's requirements.
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:24.12-py3
FROM ${FROM_IMAGE_NAME}
RUN apt-get update && apt-get install -y --no-install-recommends pbzip2 pv bzip2 && rm -rf /var/lib/apt/lists/*
ENV BERT_PREP_WORKING_DIR=/workspace/bert/data
WORKDIR /workspace/bert
COPY requirements.txt requirements-dev.txt ./
# The image's CUDA torch is kept: install everything else, never the CPU wheel pinned in requirements.txt.
RUN grep -v '^torch==' requirements.txt > /tmp/req.txt && pip install --no-cache-dir -r /tmp/req.txt \
 && grep -v -e '^-r' requirements-dev.txt > /tmp/req-dev.txt && pip install --no-cache-dir -r /tmp/req-dev.txt
COPY . .

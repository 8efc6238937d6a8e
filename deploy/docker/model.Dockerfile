# syntax=docker/dockerfile:1
# Model service: transformers + the CUDA build of torch and torchvision, one process per GPU.
# Build from the repository root:  docker build -f deploy/docker/model.Dockerfile -t qwen3vl-model .
#
# Base: python:3.11-slim, not nvidia/cuda. The torch and torchvision wheels on PyPI for Linux x86_64 are the
# CUDA builds and carry the CUDA runtime, cuDNN and NCCL as nvidia-* wheels; the host's driver is mounted into
# the container by the NVIDIA container toolkit (compose `gpus`/device reservation, or the Kubernetes device
# plugin). One CUDA copy in the image instead of two, and the same Python as the rest of the project.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /cache/huggingface \
    && chown -R app:app /cache

RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY services/model/requirements.txt /tmp/model-requirements.txt
RUN pip install --no-cache-dir -r /tmp/model-requirements.txt && rm /tmp/model-requirements.txt

COPY services/__init__.py services/__init__.py
COPY services/protocol services/protocol
COPY services/model services/model

# Weights are downloaded once into the HF cache volume (HF_TOKEN from the environment for gated repos).
ENV MODEL_HOST=0.0.0.0 \
    MODEL_PORT=8001 \
    HF_HOME=/cache/huggingface \
    DEVICE_MAP=auto \
    TORCH_DTYPE=bfloat16
VOLUME ["/cache/huggingface"]
USER 10001:10001
EXPOSE 8001

# Liveness only (the process answers); readiness (/ready) waits for the weights and is for orchestrators.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MODEL_PORT', '8001'), timeout=2)"]

# SIGTERM drains: running generations get SHUTDOWN_GRACE_SECONDS (30) to finish, then are cancelled.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "services.model"]

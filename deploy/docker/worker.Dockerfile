# syntax=docker/dockerfile:1
# vqa-worker: the GPU worker (cloud half + codebooks). The bundled model (models/bundled/, 20 MB) is
# baked in as package data; LLaVA-1.5-7B is mounted from a Hugging Face cache at HF_HOME (see
# deploy/k8s/overlays/gpu), or VQA_MODEL names any model directory mounted into the container.
#
#     docker build -f deploy/docker/worker.Dockerfile -t REGISTRY/llava-alignedvq/worker:0.1.0-cu130 .
#     # CPU-only variant (dev overlay, laptops): same base, CPU wheel of torch
#     docker build -f deploy/docker/worker.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#       -t REGISTRY/llava-alignedvq/worker:0.1.0-cpu .
#
# Base: the CUDA *base* flavour (cudart + the NVIDIA container-toolkit environment and its
# driver-version check), not *runtime*: the torch wheels from the CUDA index bring their own CUDA
# runtime, cuBLAS and cuDNN as nvidia-* packages, and a -runtime base would ship a second copy
# (~3 GB). torch 2.13.0 on the cu130 index is a CUDA 13.0 build: the node needs driver >= 580.
# For older drivers use a cu12x index that has torch 2.13.0 and a matching nvidia/cuda:12.x base.
#
# Without a registry or download.pytorch.org (deploy/podman/run.sh does this): CUDA_BASE may be any
# image with apt and a python3 that has venv (a Debian 12 made with mmdebstrap), and TORCH_INDEX a
# file:// index of the wheels mounted for the build:
#     podman build --format docker -f deploy/docker/worker.Dockerfile \
#       --ignorefile deploy/docker/worker.Dockerfile.dockerignore \
#       --build-arg CUDA_BASE=localhost/vqa-test/debian-python:3.11-bookworm \
#       --build-arg TORCH_INDEX=file:///wheels/simple -v "$STATE/torch-index:/wheels:ro" \
#       -t REGISTRY/llava-alignedvq/worker:0.1.0-cpu .

# nvidia/cuda:13.0.2-base-ubuntu24.04, multi-arch index digest (verify: docker buildx imagetools inspect).
ARG CUDA_BASE=nvidia/cuda:13.0.2-base-ubuntu24.04@sha256:2ab6381d970b211fb93853796dc6707eb8a72575a375c422b17cf4d8b2641701

FROM ${CUDA_BASE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/models/hf \
    VQA_QUEUE=redis
# Ubuntu 24.04's CPython 3.12; the base image is pinned by digest, so is its package snapshot.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY deploy/docker/requirements/worker.txt /tmp/requirements.txt
RUN pip install --no-deps --require-hashes -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY edge_client /src/edge_client
COPY gateway /src/gateway
COPY models /src/models
RUN pip install --no-deps /src && rm -rf /src \
    && python -c "import torch, gateway.worker.runner; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app \
    && mkdir -p /models/hf && chown 10001:10001 /models/hf
USER 10001:10001
# The probe exits 0 once a live heartbeat for VQA_MODEL exists; the worker writes its first one only
# after the model and codebooks are loaded, so the start period covers loading.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 CMD ["vqa-worker", "--check"]
# SIGTERM: finish and acknowledge the batch in hand, remove the heartbeat, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vqa-worker"]

# syntax=docker/dockerfile:1
#
# clip-server image. Two variants from one file, chosen by a build argument:
#   docker build -t clip-server:cuda .                       (default: NVIDIA GPUs)
#   docker build -t clip-server:cpu --build-arg VARIANT=cpu .  (CPU-only torch wheels)
# Both run as uid 1000 and work with a read-only root filesystem: the only writable
# paths are the model cache and /tmp, declared as volumes below.

ARG VARIANT=cuda

# The torch wheels bring their own CUDA libraries (cuBLAS, cuDNN) as pip packages, so the
# CUDA "base" image suffices: it carries what the NVIDIA container toolkit needs without
# a second copy of those libraries. Its CUDA version matches the wheel index below.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS base-cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ubuntu:24.04 AS base-cpu

# Both variants share one OS and one Python (/usr/bin/python3, 3.12), so the virtual
# environment built below runs unchanged in the final stage.
# base-${VARIANT} names one of the stages above, not an image to pin (DL3006).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
# Version pins on apt packages (DL3008) would break the build at each Ubuntu security
# update, which removes the old version from the archive; the base image tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# --- build: a virtual environment with torch and the project; pip stays here ---
FROM base AS build
ARG VARIANT
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG CUDA_WHEELS=cu128
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from PyTorch's own index for the variant, in a layer of its own: it is
# most of the image and changes far less often than the code.
RUN if [ "$VARIANT" = cpu ]; then wheels=cpu; else wheels="$CUDA_WHEELS"; fi \
 && pip install --index-url "https://download.pytorch.org/whl/$wheels" \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
COPY pyproject.toml README.md /src/
COPY clip_core /src/clip_core
COPY service /src/service
# Not editable: the package (with its configs and the built-in model's weights) is
# copied into site-packages, and /src is left behind in this stage. The CPU image also
# carries the CPU engines (CLIP_ENGINE=onnxruntime|openvino); their wheels are CPU-only.
RUN if [ "$VARIANT" = cpu ]; then extras="[onnx,openvino]"; else extras=""; fi \
 && pip install "/src$extras"

# --- the image ---
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="clip-server" \
      org.opencontainers.image.description="CLIP embeddings, zero-shot labels and similarity over HTTP" \
      org.opencontainers.image.licenses="MIT" \
      clip-server.variant="${VARIANT}"

# uid and gid 1000 are taken by the base image's "ubuntu" user and group.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && (groupdel ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 clip \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin clip \
 && mkdir -p /var/cache/clip-server \
 && chown 1000:1000 /var/cache/clip-server

COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/clip/healthcheck.py

# HOME=/tmp: libraries that keep a cache under ~ (torch among them) write to the tmp
# volume, not the read-only root. Bytecode was compiled at install time.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CLIP_HOST=0.0.0.0 \
    CLIP_PORT=8000 \
    CLIP_CACHE_DIR=/var/cache/clip-server \
    CLIP_LOG_FORMAT=json

# Declared so that `docker run --read-only` works with no other flag: each gets a
# writable anonymous volume unless a named volume or tmpfs is mounted there.
VOLUME ["/var/cache/clip-server", "/tmp"]
USER 1000:1000
WORKDIR /tmp
EXPOSE 8000

# /healthz answers only once the models are loaded (uvicorn binds after start-up), hence
# the long start period; first starts that download weights may need longer still.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "/opt/clip/healthcheck.py"]

ENTRYPOINT ["clip-serve"]

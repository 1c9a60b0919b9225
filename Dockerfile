# syntax=docker/dockerfile:1
# stlm with TensorRT 11 for NVIDIA GPUs of compute capability 8.0 and newer (A100, A10, L4, H100).
#
#   docker build -t stlm-gpu .
#   docker run --rm --gpus all -v "$PWD:/work" stlm-gpu build-engine /work/onnx -o /work/engine
#
# Base: NGC TensorRT 26.08 (TensorRT 11.2, CUDA 13, Ubuntu 24.04, Python 3.12; the host needs a
# driver that supports CUDA 13). Any NGC `tensorrt:<yy.mm>-py3` tag with TensorRT 11 works:
#   docker run --rm nvcr.io/nvidia/tensorrt:26.08-py3 python3 -c "import tensorrt; print(tensorrt.__version__)"
# Without NGC access, use a CUDA 13 base image (nvidia/cuda:13.x-cudnn-runtime-ubuntu24.04) and let
# pip install TensorRT 11 from PyPI through the `gpu` extra (remove the constraints step below).
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:26.08-py3
FROM ${BASE_IMAGE} AS gpu

# The export needs torch only on the CPU (checkpoint tooling); its CPU build keeps the image small.
# Set TORCH_INDEX=https://pypi.org/simple for the CUDA build (the plugin's JIT path and its GPU tests).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/stlm \
    PATH=/opt/stlm/bin:${PATH}

# A venv that sees the image's TensorRT (system site-packages), pinned to it so that pip does
# not fetch another TensorRT from PyPI for the `gpu` extra's `tensorrt>=11`.
RUN python3 -m venv --system-site-packages /opt/stlm
RUN python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)" \
 && python3 -m pip freeze | { grep -iE '^tensorrt([-_][a-z0-9_-]+)?==' || true; } > /opt/stlm/constraints.txt \
 && cat /opt/stlm/constraints.txt

WORKDIR /opt/stlm-src
COPY pyproject.toml README.md ./
COPY stlm ./stlm
RUN pip install --extra-index-url "${TORCH_INDEX}" -c /opt/stlm/constraints.txt ".[gpu,export,plugins]"

# `onnxruntime` (base dependency) and `onnxruntime-gpu` (gpu extra) install the same module:
# keep only the GPU build. Its CUDA major must match the image's; if `stlm generate` logs that the
# CUDA provider could not start, ONNX packages run on the CPU (TensorRT engines are unaffected).
RUN pip uninstall -y onnxruntime \
 && pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.20" \
 && python -c "import onnxruntime, tensorrt, stlm; print('stlm', stlm.__version__, '| TensorRT', tensorrt.__version__, '| ONNX Runtime', onnxruntime.__version__, onnxruntime.get_available_providers())"

WORKDIR /work
ENTRYPOINT ["stlm"]
CMD ["--help"]

# -----------------------------------------------------------------------------------------------
# serve: a slim image that serves a package with `stlm serve` (ONNX Runtime on the CPU; no torch,
# no exporter), as one process or as Ray Serve replicas (the `ray` extra; also the image of the
# KubeRay RayService in deploy/). Runs as an unprivileged user.
#
#   docker build --target serve -t stlm-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/my-package:/models/stlm:ro" -e STLM_API_KEY=secret stlm-serve
#   docker run --rm -p 8000:8000 -v ... stlm-serve /models/stlm --replicas 2 --num-cpus 2
#
# STLM_EXTRAS=serve builds it without Ray (smaller). The healthcheck polls /health on port 8000.
FROM python:3.12-slim AS serve

ARG STLM_EXTRAS=serve,ray

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/stlm \
    PATH=/opt/stlm/bin:${PATH}

# wget: the health probes KubeRay adds to Ray containers use it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/stlm
WORKDIR /opt/stlm-src
COPY pyproject.toml README.md ./
COPY stlm ./stlm
# DL3013: this installs the source tree itself; its dependency floors live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[${STLM_EXTRAS}]" \
 && python -c "import importlib.util as u, stlm; assert u.find_spec('torch') is None, 'torch in the serve image'; print('stlm', stlm.__version__)"

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/stlm stlm
USER 10001:10001
WORKDIR /home/stlm
ENV HOME=/home/stlm

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["stlm", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/models/stlm"]

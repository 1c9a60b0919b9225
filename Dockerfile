# syntax=docker/dockerfile:1
# stlm on NVIDIA GPUs of compute capability 8.0 and newer (A100, A10, L4, H100/H200), one CUDA
# major: CUDA 13 (host driver >= 580; NVIDIA's compatibility table: CUDA 13.x needs driver >= 580).
#
#   docker build --target gpu -t stlm-gpu .
#   docker run --rm --gpus all -v "$PWD:/work" stlm-gpu build-engine /work/onnx -o /work/engine
#   docker run --rm --gpus all --entrypoint /opt/stlm-src/scripts/gpu_check.sh stlm-gpu   # acceptance run
#
# Two stages. A plain `docker build .` builds the last one, `serve` (the slim CPU server, below);
# the GPU image needs `--target gpu`.
# Stage `gpu` (this one, first): export, build engines, generate, serve, and the GPU checks:
# TensorRT 11, onnxruntime-gpu (CUDA 13), the CUDA 13 build of torch + triton (the plugin's JIT
# path and scripts/gpu_check.sh), pytest.
#
# Base: NGC's TensorRT image (CUDA 13, Ubuntu 24.04, Python 3.12, TensorRT 11). Any NGC
# `tensorrt:<yy.mm>-py3` tag with TensorRT 11 and CUDA 13 works:
#   docker run --rm nvcr.io/nvidia/tensorrt:26.08-py3 python3 -c "import tensorrt; print(tensorrt.__version__)"
# Without NGC access: --build-arg BASE_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04; the
# `gpu` extra then installs TensorRT 11 (CUDA 13 wheels) from PyPI (the constraints are empty).
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:26.08-py3
FROM ${BASE_IMAGE} AS gpu

# CUDA 13 builds of torch (with its triton) for the export and the plugin's JIT kernels.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
# The ONNX Runtime CUDA build for CUDA 13; it replaces the CPU `onnxruntime` (same module).
ARG ONNXRUNTIME_GPU=onnxruntime-gpu==1.31.1

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/stlm \
    PATH=/opt/stlm/bin:${PATH}

# `python3 -m venv` needs python3-venv (ensurepip) on Ubuntu images.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/stlm-src
COPY pyproject.toml README.md ./
COPY scripts ./scripts

# A venv that sees the image's TensorRT (system site-packages). The image's TensorRT distributions
# (and polygraphy) are pinned, read from importlib.metadata (robust to `name @ file://` lines and
# any other `pip freeze` format), so pip never fetches another TensorRT build from PyPI for the
# `gpu` extra's `tensorrt>=11,<12`.
RUN python3 -m venv --system-site-packages /opt/stlm \
 && python3 scripts/pin_installed.py 'tensorrt(-.*)?|polygraphy' > /opt/stlm/constraints.txt \
 && echo "constraints:" && cat /opt/stlm/constraints.txt

COPY stlm ./stlm
COPY tests ./tests
RUN pip install --extra-index-url "${TORCH_INDEX}" -c /opt/stlm/constraints.txt ".[gpu,export,plugins,serve,test]"

# The swap pip cannot express ("onnxruntime-gpu instead of onnxruntime"): both install the
# `onnxruntime` module, so remove the CPU build first, then install the CUDA 13 build pinned.
RUN pip uninstall -y onnxruntime onnxruntime-gpu \
 && pip install -c /opt/stlm/constraints.txt "${ONNXRUNTIME_GPU}" \
 && python -c "import sys; from stlm.support.gpu_env import installed_distributions, onnxruntime_conflict; \
p = onnxruntime_conflict(installed_distributions()); sys.exit(p and p.problem)" \
 && python -c "import onnxruntime, tensorrt, torch, triton, stlm; \
assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers(), onnxruntime.get_available_providers(); \
assert (torch.version.cuda or '').startswith('13'), ('torch must be a CUDA 13 build', torch.version.cuda); \
print('stlm', stlm.__version__, '| TensorRT', tensorrt.__version__, '| onnxruntime', onnxruntime.__version__, \
'| torch', torch.__version__, '| triton', triton.__version__)"

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

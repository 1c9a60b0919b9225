#!/usr/bin/env bash
# Create .venv and install stlm with everything needed to export, run, test and lint it, pinned by
# constraints.txt (the versions CI runs).
#
# torch (needed only by the reference checks and the tests) is installed first, as the CPU build
# unless an NVIDIA GPU answers: from the public index a plain `pip install torch` is a CUDA build
# of several GB. STLM_TORCH_INDEX overrides where it comes from (e.g. https://pypi.org/simple for
# the CUDA build). Extras to install: STLM_EXTRAS (default test,lint).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${STLM_EXTRAS:-test,lint}"
"$PY" -m venv .venv
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" install -q --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        index="${STLM_TORCH_INDEX:-https://pypi.org/simple}"
    else
        index="${STLM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
    echo "installing torch from ${index} (a local wheel is used when pip finds one)" >&2
    # --no-deps: only torch comes from that index; its dependencies resolve with stlm's below.
    "${PIP[@]}" install -q --no-deps --retries 1 --timeout 30 --extra-index-url "$index" -c constraints.txt torch
fi
"${PIP[@]}" install -q -c constraints.txt -e ".[${EXTRAS}]"
if .venv/bin/python -m pip list 2>/dev/null | grep -qiE '^nvidia-'; then
    echo "warning: CUDA libraries (nvidia-*) were installed into .venv" >&2
fi
echo "installed: $(.venv/bin/stlm --version); activate with: source .venv/bin/activate" >&2

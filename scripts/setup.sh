#!/usr/bin/env bash
# Create .venv and install stlm with everything needed to export, run, test and lint it, pinned by
# constraints.txt (the versions CI runs).
#
# torch (needed only by the reference checks and the tests) is installed first, as the CPU build
# unless an NVIDIA GPU answers: from the public index a plain `pip install torch` is a CUDA build
# of several GB. STLM_TORCH_INDEX overrides where it comes from (e.g. https://pypi.org/simple for
# the CUDA build). Extras to install: STLM_EXTRAS (default test,lint).
#
# Each step is announced on stderr with the seconds elapsed; pip names every package it collects and
# installs (its progress bars only on a terminal, so CI logs stay plain lines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${STLM_EXTRAS:-test,lint}"
START=$SECONDS
step() { echo "[setup ${1}/4, $((SECONDS - START)) s] ${2}" >&2; }
BAR=off
if [ -t 1 ]; then BAR=on; fi
step 1 "creating .venv with $("$PY" --version 2>&1)"
"$PY" -m venv .venv
PIP=(.venv/bin/python -m pip)
step 2 "upgrading pip"
"${PIP[@]}" install -q --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        index="${STLM_TORCH_INDEX:-https://pypi.org/simple}"
    else
        index="${STLM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
    step 3 "installing torch from ${index} (a local wheel is used when pip finds one)"
    # --no-deps: only torch comes from that index; its dependencies resolve with stlm's below.
    "${PIP[@]}" install --progress-bar "$BAR" --no-deps --retries 1 --timeout 30 --extra-index-url "$index" -c constraints.txt torch
fi
step 4 "installing stlm[${EXTRAS}] and its dependencies, pinned by constraints.txt (the longest step)"
"${PIP[@]}" install --progress-bar "$BAR" -c constraints.txt -e ".[${EXTRAS}]"
if .venv/bin/python -m pip list 2>/dev/null | grep -qiE '^nvidia-'; then
    echo "warning: CUDA libraries (nvidia-*) were installed into .venv" >&2
fi
echo "installed in $((SECONDS - START)) s: $(.venv/bin/stlm --version); activate with: source .venv/bin/activate" >&2

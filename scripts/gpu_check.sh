#!/usr/bin/env bash
# The GPU acceptance run of stlm (scripts/gpu_check.py): one command, a summary table at the end,
# within 10 minutes on one GPU, no network. On a machine without a GPU every GPU step is skipped
# with its reason. `scripts/gpu_check.sh --help` documents the steps and options.
#   PYTHON=/path/to/python scripts/gpu_check.sh [--full] [--strict] [--budget S] [--workdir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"

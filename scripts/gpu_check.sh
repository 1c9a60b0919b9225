#!/usr/bin/env bash
# GPU check of the partial-rotary plugin kernel: needs an NVIDIA GPU with PyTorch (CUDA) and Triton;
# TensorRT and an installed stlm are not needed. Takes well under 5 minutes.
#   scripts/gpu_check.sh [--quick]        (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

"$PY" - <<'EOF'
import sys, torch, triton
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda is not available (need an NVIDIA GPU and a CUDA build of PyTorch)")
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name(0)}")
EOF

"$PY" scripts/gpu_check.py "$@"

if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_partial_rotary.py
else
    echo "gpu_check: pytest not installed, skipping the @pytest.mark.gpu tests"
fi

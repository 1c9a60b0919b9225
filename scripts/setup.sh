#!/usr/bin/env bash
# Create .venv and install stlm with everything needed to export, run and test it (CPU).
# torch is pinned to 2.13.0, whose CPU build pip finds on these machines' local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "installed: $(.venv/bin/stlm --version)" >&2

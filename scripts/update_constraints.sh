#!/usr/bin/env bash
# Rewrite constraints.txt from what .venv holds now (run scripts/setup.sh, upgrade what you want, then this).
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# Reproducibility pins: the versions CI and scripts/setup.sh install (pip install -c constraints.txt ...)."
    echo "# Library requirements in pyproject.toml carry only floors. Regenerate: scripts/update_constraints.sh"
    .venv/bin/python -m pip freeze --exclude-editable | grep -viE '^(-e |stlm==|nvidia-)' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)" >&2

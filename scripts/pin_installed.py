"""Print ``name==version`` constraints for the installed distributions whose names match a pattern.

Used by the Dockerfile to pin the GPU stack a base image already has (TensorRT, CUDA Python
packages), so that ``pip install`` never replaces it with another build from PyPI. It reads
``importlib.metadata`` rather than ``pip freeze``, whose lines may be ``name @ file:///...``
(wheels installed from a local file, as in NGC images), editable installs or comments.

    python3 scripts/pin_installed.py 'tensorrt.*|nvidia-.*|cuda-.*|polygraphy' > constraints.txt

The pattern is a regular expression that must match the whole normalized name (PEP 503:
lower case, runs of ``-_.`` as ``-``). Exit status 1 when nothing matches and ``--require`` is given.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata


def normalize(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(pattern: str, dists: dict[str, str]) -> list[str]:
    """Sorted ``name==version`` lines for the names (normalized) fully matching ``pattern`` (pure)."""
    regex = re.compile(pattern)
    return sorted(f"{name}=={version}" for name, version in dists.items() if regex.fullmatch(name))


def installed() -> dict[str, str]:
    """Installed distributions of this interpreter (first found wins, as for imports)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and dist.version:
            found.setdefault(normalize(name), dist.version)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pattern", help="regular expression for the whole normalized distribution name")
    parser.add_argument("--require", action="store_true", help="fail when no installed distribution matches")
    args = parser.parse_args(argv)
    lines = pins(args.pattern, installed())
    if args.require and not lines:
        print(f"pin_installed: no installed distribution matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

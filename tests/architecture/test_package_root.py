"""The stlm/ root holds only the package's face; everything else lives in a sub-package named
after its layer (cli, package, support, runtime, export, tensorrt, plugins, serve, quality, evaluation)."""

from __future__ import annotations

from pathlib import Path

import stlm

STLM = Path(stlm.__file__).resolve().parent
ALLOWED = {"__init__.py", "__main__.py", "errors.py"}


def test_root_holds_only_the_allowed_modules() -> None:
    assert sorted(p.name for p in STLM.glob("*.py") if p.name not in ALLOWED) == []


def test_every_sub_package_is_a_package() -> None:
    folders = [p for p in STLM.iterdir() if p.is_dir() and p.name != "__pycache__" and any(p.rglob("*.py"))]
    assert len(folders) >= 10 and [p.name for p in folders if not (p / "__init__.py").is_file()] == []

"""Optional dependencies ("extras") and the error a missing one gives.

``pip install stlm`` is the light runtime (generate, bench, verify against a saved reference).
Writing packages, running transformers as a reference, serving over HTTP and the GPU paths need
extras; a command or module that needs a missing extra raises :class:`MissingExtraError` (an
:class:`~stlm.errors.StlmError`: the CLI prints ``error: ...`` with the ``pip install`` line and
exits 2) instead of a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import importlib.util
from typing import Final

from stlm.errors import BackendUnavailableError

#: extra name → the importable modules it provides (checked without importing them).
EXTRA_MODULES: Final[dict[str, tuple[str, ...]]] = {
    "export": ("onnx",),
    "reference": ("torch", "transformers"),
    "serve": ("starlette", "uvicorn", "anyio"),
    "plugins": ("triton", "onnxruntime_extensions"),
    "gpu": ("tensorrt",),
    "ray": ("ray",),
    "eval": ("lm_eval",),
}


class MissingExtraError(BackendUnavailableError):
    """A feature needs an optional dependency group (extra) that is not installed."""


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty when the extra is installed)."""
    missing = []
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def require_extra(extra: str, *, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming ``feature`` and the install line unless ``extra`` is installed."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(
            f"{feature} needs the '{extra}' extra, which is not installed (missing: {', '.join(missing)})",
            fix=f"pip install 'stlm[{extra}]'  (from a clone: pip install -e '.[{extra}]')",
        )

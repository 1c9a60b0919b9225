"""User-facing errors.

Every user mistake raises a :class:`StlmError` subclass whose message names the bad value, what
was expected, and how to fix it. The CLI prints these without a traceback and exits 2.
"""

from __future__ import annotations


class StlmError(Exception):
    """Base class for mistakes a user can fix (bad input, missing files, missing backends)."""

    def __init__(self, problem: str, *, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class CheckpointError(StlmError):
    """The checkpoint folder (or hub id) is missing, incomplete or unreadable."""


class UnsupportedModelError(StlmError):
    """The checkpoint is not a StableLM, or uses a feature stlm does not export."""


class PackageError(StlmError):
    """An exported package (ONNX or engine folder) is missing, incomplete or corrupt."""


class InvalidArgumentError(StlmError):
    """A bad argument: sampling parameter, prompt, dtype, opset, size."""


class BackendUnavailableError(StlmError):
    """The backend a package needs (TensorRT, a GPU, a provider) is not available here."""


class EngineCompatibilityError(StlmError):
    """A TensorRT engine was built for another TensorRT version or GPU."""

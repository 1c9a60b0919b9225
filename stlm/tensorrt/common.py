"""What building and running TensorRT engines share: the one guarded TensorRT import (with the
version floor), a logger that feeds Python logging and keeps TensorRT's errors for our messages,
and the rotary plugin registration.

TensorRT is imported lazily (only here, only when a TensorRT package is used), so stlm installs
and runs without it; its absence is a :class:`BackendUnavailableError`, never an ImportError.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from stlm.errors import BackendUnavailableError
from stlm.plugins.partial_rotary.spec import PLUGIN_ID

log = logging.getLogger("stlm.tensorrt")


def make_logger(trt: ModuleType) -> Any:
    """A ``trt.ILogger`` that forwards to :mod:`logging` (INFO/VERBOSE at DEBUG) and keeps the errors."""
    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.ERROR,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.DEBUG,
        sev.VERBOSE: logging.DEBUG - 5,
    }

    class _Logger(trt.ILogger):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors.append(str(msg))
            if log.isEnabledFor(level):
                log.log(level, "%s", msg)

        def recent_errors(self, n: int = 5) -> str:
            """The last ``n`` error messages, for exception text."""
            return "; ".join(self.errors[-n:]) or "no error message from TensorRT (rerun with -v)"

    return _Logger()


def register_rotary_plugin(*, required: bool) -> bool:
    """Register the ``stlm::partial_rotary`` plugin with TensorRT (``tensorrt.plugin``).

    Needed before parsing a ``--target tensorrt`` graph and before running an engine that uses
    the plugin's JIT (Python) implementation; an AOT plugin's kernel is inside the engine.
    Returns whether it is registered; when ``required``, failure is a :class:`BackendUnavailableError`.
    The plugin module keeps the one "registered" flag (it registers once per process).
    """
    try:
        from stlm.plugins.partial_rotary.plugin import register_plugin
    except ImportError as exc:
        if not required:
            log.debug("%s not registered: %s", PLUGIN_ID, exc)
            return False
        raise BackendUnavailableError(
            f"the {PLUGIN_ID} TensorRT plugin cannot be loaded ({exc})",
            fix="install stlm with the plugins and gpu extras: pip install 'stlm[gpu,plugins]' (tensorrt, triton), "
            "or use the Dockerfile",
        ) from None
    # a missing TensorRT is an error only when required; a definition TensorRT rejects always is
    return register_plugin(required=required)

"""What building and running TensorRT engines share: the one guarded TensorRT import (with the
version floor), a logger that feeds Python logging and keeps TensorRT's errors for our messages,
and the rotary plugin registration.

TensorRT is imported lazily (only here, only when a TensorRT package is used), so stlm installs
and runs without it; its absence is a :class:`BackendUnavailableError`, never an ImportError.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any, Final

from stlm.errors import BackendUnavailableError
from stlm.gpu_env import GPU_INSTALL_FIX
from stlm.plugins.partial_rotary.spec import PLUGIN_ID
from stlm.tensorrt.gpu import driver_problem_here

log = logging.getLogger("stlm.tensorrt")

MIN_TRT_MAJOR: Final = 11


def import_tensorrt() -> ModuleType:
    """``import tensorrt``, or :class:`BackendUnavailableError` saying what is missing and how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed: the Python module 'tensorrt' cannot be imported ({exc})", fix=GPU_INSTALL_FIX
        ) from None
    except (OSError, RuntimeError) as exc:  # the wheel is there but its CUDA libraries are not
        problem = driver_problem_here()  # an old driver is the usual cause: say so
        if problem is not None:
            raise BackendUnavailableError(
                f"TensorRT is installed but cannot load its libraries ({exc}): {problem.problem}", fix=problem.fix
            ) from None
        raise BackendUnavailableError(
            f"TensorRT is installed but cannot load its libraries ({exc})", fix=GPU_INSTALL_FIX
        ) from None
    version = getattr(trt, "__version__", None)
    if version is None:
        raise BackendUnavailableError(
            "TensorRT is installed but unusable: its Python module has no __version__ (a partial install, "
            "or its native libraries did not load)",
            fix=GPU_INSTALL_FIX,
        )
    major = int(str(version).split(".")[0] or 0)
    if major < MIN_TRT_MAJOR:
        raise BackendUnavailableError(
            f"stlm needs TensorRT {MIN_TRT_MAJOR} or newer; found {version}",
            fix=f"pip install 'tensorrt>={MIN_TRT_MAJOR}' (the gpu extra), or use the Dockerfile",
        )
    return trt


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

"""TensorRT builder pieces of :mod:`stlm.export.engine`: network flags, the progress monitor and the
reusable timing cache."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from stlm.support.progress import Progress
from stlm.support.staging import staged_file

log = logging.getLogger(__name__)


def network_flags(trt: ModuleType) -> int:
    """The network creation flags: strongly typed (always on in TensorRT 11) and AOT plugins preferred."""
    flags = 0
    for name in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:
            flags |= 1 << int(flag)
    return flags


def progress_monitor(trt: ModuleType, progress: Progress) -> Any | None:
    """A ``trt.IProgressMonitor`` reporting the top two levels of build phases, or None if unsupported."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, tuple[int, int]] = {}  # name → (depth, steps)

        def _report(self, phase: str, done: int) -> None:
            depth, steps = self._phases.get(phase, (9, 0))
            if depth <= 1:
                try:
                    progress(phase, done, max(steps, done))
                except Exception:
                    log.debug("progress callback failed", exc_info=True)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = 0 if not parent_phase else self._phases.get(parent_phase, (0, 0))[0] + 1
                self._phases[phase_name] = (depth, int(num_steps))
                self._report(phase_name, 0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                self._report(phase_name, int(step) + 1)
            return True

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._phases.pop(phase_name, None)

    return _Monitor()


def load_timing_cache(config: Any, path: Path | None) -> bool:
    """Give ``config`` the timing cache in ``path`` (an empty one if absent, unreadable or foreign).

    Returns whether ``path`` may be replaced by this build's cache: it is absent or was read as a
    cache for this GPU and TensorRT. A file that is not a timing cache, or one made for another GPU
    or TensorRT version, is never overwritten (stlm replaces only what it can read as its own).
    """
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
        log.info("reusing the timing cache %s (%d bytes)", path, len(data))
    cache = config.create_timing_cache(data)
    replaceable = True
    if cache is None and data:
        log.warning("%s is not a TensorRT timing cache: starting an empty one (the file is kept)", path)
        cache, replaceable = config.create_timing_cache(b""), False
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("the timing cache %s was made for another GPU or TensorRT: starting an empty one (kept)", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        replaceable = False
    return replaceable


def save_timing_cache(config: Any, path: Path) -> None:
    """Write ``config``'s timing cache to ``path`` atomically."""
    data = config.get_timing_cache().serialize()
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        tmp.write_bytes(data)
    log.info("saved the timing cache to %s", path)

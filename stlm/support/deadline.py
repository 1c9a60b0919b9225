"""Stop pure-Python work running on the calling thread once a deadline passes.

:func:`interrupt_after` arms a watchdog timer that raises :class:`DeadlineExceeded` inside the
calling thread (``PyThreadState_SetAsyncExc``) when the block has not finished in time. The
exception arrives between bytecodes, so it stops any Python loop (a Jinja template is compiled
to Python bytecode); it cannot stop one long C call, which callers bound separately (e.g. the
chat template sandbox refuses huge string products). ``cancelled`` (a callable, e.g. true once
the client disconnected) stops the block early the same way.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["DeadlineExceeded", "interrupt_after"]


class DeadlineExceeded(Exception):
    """Raised inside a block of :func:`interrupt_after` that ran past its deadline (or was cancelled)."""


def _set_async(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


_POLL = 0.05  # seconds between looks at ``cancelled``


@contextmanager
def interrupt_after(seconds: float, cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
    """Run the block; :class:`DeadlineExceeded` is raised in it after ``seconds`` (or once
    ``cancelled()`` is true, polled every 50 ms). Never leaves an exception pending once the block
    has ended."""
    target = threading.get_ident()
    lock = threading.Lock()
    done = threading.Event()
    state = {"active": True, "fired": False}

    def watch() -> None:
        deadline = time.monotonic() + seconds
        while not done.wait(min(_POLL, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or (cancelled is not None and cancelled()):
                with lock:
                    if state["active"]:
                        state["fired"] = True
                        _set_async(target, DeadlineExceeded)
                return

    watcher = threading.Thread(target=watch, name="stlm-deadline", daemon=True)
    try:
        watcher.start()
        yield
    finally:
        with lock:
            state["active"] = False
            done.set()
            if state["fired"]:
                _set_async(target, None)  # clear it if it has not been raised yet

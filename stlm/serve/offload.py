"""Blocking CPU work (JSON parsing, tokenization) off the event loop, on daemon threads.

A 4 MB prompt takes seconds to tokenize; run on the event loop it would stall every other
request (``/health`` included). The threads are daemons, so work still running when the server
exits at its shutdown deadline does not hold the process (anyio's and the default executor's
worker threads are joined at exit).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["STUCK_SECONDS", "CpuPool"]

T = TypeVar("T")
#: a pool task running longer than this makes ``/ready`` answer 503 (chat templates stop at 2 s,
#: the largest accepted prompt tokenizes in about 1 s)
STUCK_SECONDS = 10.0
_Item = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if not future.done():
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class CpuPool:
    """``await pool.run(fn)``: ``fn()`` on one of ``workers`` daemon threads (started on first use)."""

    def __init__(self, workers: int, name: str = "stlm-cpu") -> None:
        self.workers, self.name = max(1, workers), name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._busy: dict[int, float] = {}  # thread id → monotonic start of its current task

    def longest_task(self) -> float:
        """Seconds the longest-running current task has run (0 when idle): ``/ready`` reports the
        pool stuck past a deadline, since every parse, render and tokenization waits for it."""
        started = list(self._busy.values())
        return time.monotonic() - min(started) if started else 0.0

    async def run(self, fn: Callable[[], T]) -> T:
        """The result of ``fn()`` (or its exception); cancelling the caller abandons the result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._start()
        self._queue.put((fn, loop, future))
        return await future

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, loop, future = item
            if future.cancelled():
                continue
            me = threading.get_ident()
            self._busy[me] = time.monotonic()
            try:
                ok, value = True, fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                ok, value = False, exc
            finally:
                self._busy.pop(me, None)
            try:
                loop.call_soon_threadsafe(_settle, future, ok, value)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def close(self) -> None:
        """Let the threads end once the queued work is done."""
        with self._lock:
            for _ in self._threads:
                self._queue.put(None)
            self._threads.clear()

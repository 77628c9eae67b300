"""One background thread running many one-shot timers (the does-not-exist timers, backoff waits).

``threading.Timer`` costs a thread per timer; a mesh can watch thousands of resources, so the
client keeps a single heap here instead. Callbacks run on the timer thread, one at a time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable, List, Optional, Tuple

__all__ = ["TimerQueue"]

log = logging.getLogger(__name__)


class TimerQueue:
    """Schedule callbacks at monotonic deadlines; cancel them by handle."""

    def __init__(self, name: str = "meshcore-timers") -> None:
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int]] = []
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, callback: Callable[[], None]) -> int:
        """Run ``callback`` after ``delay`` seconds; returns a handle for :meth:`cancel`."""
        with self._cond:
            handle = next(self._ids)
            self._callbacks[handle] = callback
            heapq.heappush(self._heap, (time.monotonic() + delay, handle))
            self._cond.notify()
            return handle

    def cancel(self, handle: Optional[int]) -> None:
        if handle is not None:
            with self._cond:
                self._callbacks.pop(handle, None)

    def pending(self) -> int:
        with self._cond:
            return len(self._callbacks)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._callbacks.clear()
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    while self._heap and self._heap[0][1] not in self._callbacks:
                        heapq.heappop(self._heap)  # cancelled
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._closed:
                    return
                _, handle = heapq.heappop(self._heap)
                callback = self._callbacks.pop(handle)
            try:
                callback()
            except Exception:  # a timer must never kill the thread
                log.exception("meshcore timer callback failed")

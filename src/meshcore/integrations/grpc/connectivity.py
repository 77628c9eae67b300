"""``subscribe``/``unsubscribe`` of a :class:`MeshChannel`: the mesh's readiness as channel states."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, Optional

import grpc

log = logging.getLogger(__package__)  # "meshcore.integrations.grpc", as before the split


class _Connectivity:
    """``subscribe``/``unsubscribe``: the mesh's readiness for the target as channel states.

    A daemon thread (running while there are subscribers) polls the state and calls each
    callback when it changes, first with the current state.
    """

    def __init__(self, state: Callable[[], grpc.ChannelConnectivity], poll: float = 0.2) -> None:
        self._state = state
        self._poll = poll
        self._lock = threading.Lock()
        self._subscribers: Dict[Callable[[grpc.ChannelConnectivity], None], Optional[grpc.ChannelConnectivity]] = {}
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            self._subscribers[callback] = None
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="meshcore-grpc-connectivity", daemon=True)
                self._thread.start()
        self._wake.set()

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            self._subscribers.pop(callback, None)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._poll)
            self._wake.clear()
            state = self._state()
            with self._lock:
                due = [cb for cb, seen in self._subscribers.items() if seen is not state]
                for cb in due:
                    self._subscribers[cb] = state
                stopping = self._stopping
            for cb in due:
                try:
                    cb(state)
                except Exception:  # noqa: BLE001  (a subscriber's bug must not stop the others)
                    log.exception("connectivity callback %r failed", cb)
            with self._lock:
                if stopping or not self._subscribers:
                    self._thread = None
                    return

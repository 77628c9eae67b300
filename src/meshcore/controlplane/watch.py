"""Poll a resource file and hand every new version of it to a callback."""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Optional, Tuple

from ..errors import ConfigError
from ..xds.resource_file import Resources, load_resource_file

__all__ = ["FileWatcher"]

logger = logging.getLogger(__name__)


def _stamp(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class FileWatcher:
    """Reloads ``path`` when its mtime or size changes (checked every ``interval`` seconds) and calls
    ``apply(resources)``; a file that fails to load is logged and the previous resources stay."""

    def __init__(self, path: str, apply: Callable[[Resources], object], interval: float = 0.5) -> None:
        self.path = path
        self._apply = apply
        self._interval = interval
        self._stamp = _stamp(path)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "FileWatcher":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="meshcore-cp-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def check(self) -> bool:
        """Reload now if the file changed; True if new resources were applied."""
        stamp = _stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            resources = load_resource_file(self.path)
        except ConfigError as exc:
            logger.error("not reloading %s: %s", self.path, exc)
            return False
        version = self._apply(resources)
        logger.info("reloaded %s (version %s)", self.path, version)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception:  # keep watching whatever happens
                logger.exception("reloading %s failed", self.path)

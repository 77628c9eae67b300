"""Cluster circuit breakers (``circuit_breakers.thresholds``, priority DEFAULT), Envoy semantics.

Resources counted per cluster, across every request of this process:

* ``max_requests``: upstream requests (attempts, retries included) in flight;
* ``max_pending_requests``: requests waiting for a connection. meshcore sends each attempt
  at once (the HTTP client's pool does the queueing), so, as for an Envoy HTTP/1.1 pool where a
  connection carries one request, attempts beyond ``max_connections`` count as pending;
* ``max_retries``: retries in flight.

An attempt that would exceed ``max_requests`` or ``max_connections + max_pending_requests``
overflows: it fails fast (``CircuitBreakerOpen``) and counts in ``upstream_rq_pending_overflow``
(Envoy's stat for both). A retry beyond ``max_retries`` is not made (``upstream_rq_retry_overflow``)
and the request ends with the outcome it had.
"""

from __future__ import annotations

import threading
from typing import Any

from ..xds.model import CircuitBreakers

__all__ = ["CircuitBreakerState"]


class CircuitBreakerState:
    """Counters and limits of one cluster; ``thresholds`` follows the cluster's current spec."""

    __slots__ = ("thresholds", "active_requests", "active_retries", "_lock")

    def __init__(self, thresholds: Any = None) -> None:
        self.thresholds = thresholds or CircuitBreakers()
        self.active_requests = 0
        self.active_retries = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return max(0, self.active_requests - self.thresholds.max_connections)

    def try_acquire(self, retry: bool) -> str:
        """Admit one attempt: ``""`` if admitted, else ``"requests"`` or ``"retries"`` (overflow)."""
        with self._lock:
            return self.acquire_locked(retry)

    def release(self, retry: bool) -> None:
        with self._lock:
            self.release_locked(retry)

    def acquire_locked(self, retry: bool) -> str:
        """:meth:`try_acquire` for a caller that serialises access itself (one lock per cluster)."""
        t = self.thresholds
        if retry and self.active_retries >= t.max_retries:
            return "retries"
        if self.active_requests >= min(t.max_requests, t.max_connections + t.max_pending_requests):
            return "requests"
        self.active_requests += 1
        if retry:
            self.active_retries += 1
        return ""

    def release_locked(self, retry: bool) -> None:
        self.active_requests -= 1
        if retry:
            self.active_retries -= 1

"""Per-cluster request state shared by every call: circuit breakers, outlier detector, stats.

Kept by cluster name across configuration updates (a new Cluster resource updates the
thresholds and the detector's settings; counts and ejections carry over).
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from .resilience.circuit import CircuitBreakerState
from .resilience.retry import CONNECT_FAILURE, RESET, TIMEOUT
from .resilience.outlier import OutlierDetector

__all__ = ["ClusterState"]

_ERROR_STATS = {CONNECT_FAILURE: "upstream_cx_connect_fail", TIMEOUT: "upstream_rq_per_try_timeout",
                RESET: "upstream_rq_rx_reset"}

# Envoy's Grpc::Utility::grpcToHttpStatus (source/common/grpc/status.cc).
_GRPC_TO_HTTP = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
                 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


class ClusterState:
    def __init__(self, mesh: Any, name: str) -> None:
        self.mesh = mesh
        self.name = name
        self.spec: Any = None
        self.breakers = CircuitBreakerState()
        self.outlier: Optional[OutlierDetector] = None
        self.synced: Any = None  # the assignment the detector's host list was taken from
        self.stats = mesh.stats_registry.cluster(name)
        self.stats.extra = self._outlier_counters
        self.stats.gauges["upstream_rq_active"] = lambda: self.breakers.active_requests
        self.stats.gauges["upstream_rq_pending_active"] = lambda: self.breakers.pending
        self.stats.gauges["outlier_detection.ejections_active"] = (
            lambda: self.outlier.ejections_active if self.outlier is not None else 0)

    def configure(self, spec: Any) -> None:
        self.spec = spec
        if spec is None:
            return
        self.breakers.thresholds = spec.circuit_breakers
        od = spec.outlier_detection
        if od is None:
            self.outlier = None
        elif self.outlier is None:
            self.outlier = OutlierDetector(od, self._set_ejected, self.mesh._rng)
        else:
            self.outlier.spec = od

    def _outlier_counters(self) -> Dict[str, int]:
        if self.outlier is None:
            return {}
        return {f"outlier_detection.{k}": v for k, v in self.outlier.counters.items()}

    def sync_hosts(self, rt: Any) -> None:
        """Give the detector the cluster's current hosts (max_ejection_percent counts them all)."""
        self.synced = rt.eds_spec
        lb = rt.lb
        if self.outlier is not None and lb is not None:
            self.outlier.sync_hosts(ep.key for ep in lb.endpoints)

    def _set_ejected(self, key: str, ejected: bool) -> None:
        """Mark the host in every balancer of this cluster in use: the published one(s) and one
        built for a configuration still pending (new balancers also copy ejections when built)."""
        for lb in self.mesh._balancers(self.name):
            if not hasattr(lb, "set_ejected"):
                continue
            for ep in lb.endpoints:
                if ep.key == key:
                    lb.set_ejected(ep, ejected)

    # -- the request path: one lock round trip to admit an attempt, one to complete it ----------

    def admit(self, retry: bool) -> str:
        """Pass the circuit breakers and count the attempt: ``""``, or the overflowing resource."""
        stats = self.stats
        with stats._lock:
            over = self.breakers.acquire_locked(retry)
            c = stats.counters
            if over:
                name = "upstream_rq_retry_overflow" if over == "retries" else "upstream_rq_pending_overflow"
                c[name] = c.get(name, 0) + 1
                return over
            c["upstream_rq_total"] = c.get("upstream_rq_total", 0) + 1
            if retry:
                c["upstream_rq_retry"] = c.get("upstream_rq_retry", 0) + 1
            return ""

    def abandon(self, retry: bool) -> None:
        """An admitted attempt that found no endpoint: give its circuit-breaker slot back."""
        with self.stats._lock:
            self.breakers.release_locked(retry)
            c = self.stats.counters
            c["upstream_rq_total"] -= 1
            if retry:
                c["upstream_rq_retry"] -= 1

    def complete(self, a: Any) -> None:
        """An attempt ended: breakers, stats and the outlier detector learn its outcome."""
        elapsed_ms = (time.monotonic() - a._started) * 1000.0
        error = a.error
        with self.stats._lock:
            self.breakers.release_locked(a._retry)
            if error is not None:
                self.stats.finished_locked(None, _ERROR_STATS.get(error, "upstream_rq_rx_reset"), elapsed_ms)
            else:
                self.stats.finished_locked(a.status, None, elapsed_ms)
        outlier = self.outlier
        if outlier is not None:
            if error is not None:
                outlier.record(a.endpoint.key, None, True)
            else:
                status = a.status
                if a.grpc_status:  # Envoy feeds outlier detection grpcToHttpStatus(grpc-status)
                    status = _GRPC_TO_HTTP.get(a.grpc_status, 500)
                outlier.record(a.endpoint.key, status)

    def outlier_tick(self) -> None:
        if self.outlier is not None:
            self.outlier.tick()

    def outlier_record(self, endpoint: Any, status: Optional[int], local_failure: bool = False) -> None:
        if self.outlier is not None:
            self.outlier.record(endpoint.key, status, local_failure)

"""Per-cluster request state shared by every call: circuit breakers and hot counters
(``ClusterCounters``, compiled or pure twin), the outlier detector, and the cluster's stats.

Kept by cluster name across configuration updates (a new Cluster resource updates the
thresholds and the detector's settings; counts and ejections carry over). When a cluster leaves
every published configuration the mesh retires its state once it is not :meth:`ClusterState.busy`
(no request in flight): it is dropped and its stats fold into the registry's removed summary.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from .resilience.outlier import OutlierDetector

__all__ = ["ClusterState"]


class ClusterState:
    def __init__(self, mesh: Any, name: str) -> None:
        self.mesh = mesh
        self.name = name
        self.spec: Any = None
        #: endpoint key -> (cluster spec, endpoint, UpstreamTls or None): ``Mesh.upstream_tls``'s cache
        self.tls_sockets: Dict[str, Any] = {}
        #: breakers and hot stats, updated by the request path (``meshcore._fast.call_*``)
        self.counters = mesh._core.ClusterCounters()
        self.outlier: Optional[OutlierDetector] = None
        self.synced: Any = None  # the assignment the detector's host list was taken from
        self.stats = mesh.stats_registry.cluster(name)
        self.stats.core = self.counters
        self.stats.extra = self._outlier_counters
        counters = self.counters
        self.stats.gauges["upstream_rq_active"] = lambda: counters.active_requests
        self.stats.gauges["upstream_rq_pending_active"] = lambda: counters.pending
        self.stats.gauges["outlier_detection.ejections_active"] = (
            lambda: self.outlier.ejections_active if self.outlier is not None else 0)

    def busy(self) -> bool:
        """Whether requests (or retries) counted in this state are still in flight."""
        counters = self.counters
        return counters.active_requests > 0 or counters.active_retries > 0

    def close(self) -> None:
        """Retired: drop the gauges (their closures reference this state)."""
        self.stats.gauges = {}
        self.stats.extra = dict

    def configure(self, spec: Any) -> None:
        self.spec = spec
        if spec is None:
            return
        t = spec.circuit_breakers
        # an HTTP/2 cluster multiplexes: its requests are bounded by max_requests alone
        conns = (1 << 61) if spec.http2 else t.max_connections
        self.counters.set_thresholds(conns, t.max_pending_requests, t.max_requests, t.max_retries,
                                     t.retry_budget)
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

"""Envoy-like per-cluster statistics, readable from Python and exportable to Prometheus.

Counters use Envoy's cluster stat names (``upstream_rq_total``, ``upstream_rq_2xx``,
``upstream_rq_retry``, ``upstream_rq_pending_overflow``, ``outlier_detection.ejections_enforced_total``
...); ``upstream_rq_active`` is a gauge; ``upstream_rq_time`` a histogram in milliseconds with
Envoy's default buckets. :meth:`StatsRegistry.snapshot` returns plain dicts;
:func:`prometheus_collector` exposes the same numbers as ``meshcore_cluster_<name>`` metrics with
a ``cluster`` label (``prometheus_client`` is an optional dependency: ``pip install
"meshcore-xds[prometheus]"``). Nothing is sent anywhere unless you register the collector.

Removed clusters: the registry lists the clusters in use. Once a cluster has left the
configuration and its requests in flight finished, its stats leave the registry
(:meth:`StatsRegistry.retire`) and its counters are added to one bounded summary,
:meth:`StatsRegistry.removed` (``{"clusters": <how many were retired>, <counter>: <sum>, ...}``),
so totals over time stay available without one entry per cluster name ever seen.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

__all__ = ["Histogram", "ClusterStats", "StatsRegistry", "prometheus_collector", "BUCKETS_MS", "COUNTER_NAMES"]

#: Envoy's default histogram bucket bounds (milliseconds): ``BUCKETS_MS``; the counters the request
#: path keeps in C (``ClusterCounters.counter_values`` order): ``COUNTER_NAMES``. Both are defined
#: with the request path (``meshcore._fast._consts``), which imports nothing above it.
from ._fast._consts import BUCKETS_MS, COUNTER_NAMES



class Histogram:
    """Bucket counts in milliseconds over :data:`BUCKETS_MS` (plus one above every bound)."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self, counts: Optional[List[int]] = None, total: float = 0.0, count: int = 0) -> None:
        self.counts = list(counts) if counts is not None else [0] * (len(BUCKETS_MS) + 1)
        self.sum = total
        self.count = count

    def quantile(self, q: float) -> Optional[float]:
        """The upper bound of the bucket holding quantile ``q`` (``None`` when empty)."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return BUCKETS_MS[i] if i < len(BUCKETS_MS) else float("inf")
        return float("inf")

    def snapshot(self) -> Dict[str, Any]:
        cumulative, acc = [], 0
        for bound, c in zip(BUCKETS_MS, self.counts):
            acc += c
            cumulative.append((bound, acc))
        return {"count": self.count, "sum_ms": self.sum, "buckets": cumulative,
                "p50_ms": self.quantile(0.5), "p99_ms": self.quantile(0.99)}


class ClusterStats:
    """Counters, gauges and the request-time histogram of one cluster.

    The request path counts into ``core`` (a ``ClusterCounters`` of the compiled or pure
    request path: attempts, retries, overflows, per-status completions, upstream failures and
    the attempt-time histogram); rarer events (timeouts, successful retries) go through
    :meth:`inc`. ``upstream_rq_<status>``, ``upstream_rq_<class>`` and ``upstream_rq_completed``
    are derived when read.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.counters: Dict[str, int] = {}
        self.core: Any = None  # set by the cluster's request state
        self.gauges: Dict[str, Callable[[], int]] = {}
        self.extra: Callable[[], Dict[str, int]] = dict  # counters kept elsewhere (outlier detection)

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    @property
    def rq_time(self) -> Histogram:
        """The attempt-time histogram (a copy)."""
        if self.core is None:
            return Histogram()
        return Histogram(*self.core.histogram())

    def all_counters(self) -> Dict[str, int]:
        """Every counter, the derived per-class ones included."""
        with self._lock:
            out = dict(self.counters)
        statuses: Dict[Any, int] = {}
        core = self.core
        if core is not None:
            for name, n in zip(COUNTER_NAMES, core.counter_values()):
                if n:
                    out[name] = out.get(name, 0) + n
            statuses = core.statuses()
        local_5xx = out.pop("upstream_rq_5xx_local", 0)
        completed = 0
        for status, n in statuses.items():
            completed += n
            if status:
                out[f"upstream_rq_{status}"] = n
                cls = f"upstream_rq_{status // 100}xx"
                out[cls] = out.get(cls, 0) + n
        if local_5xx:
            out["upstream_rq_5xx"] = out.get("upstream_rq_5xx", 0) + local_5xx
        if completed:
            out["upstream_rq_completed"] = completed
        out.update(self.extra())
        return out

    def get(self, name: str) -> int:
        if name in self.gauges:
            return self.gauges[name]()
        return self.all_counters().get(name, 0)

    def snapshot(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(sorted(self.all_counters().items()))
        for name, read in self.gauges.items():
            out[name] = read()
        out["upstream_rq_time"] = self.rq_time.snapshot()
        return out


class StatsRegistry:
    def __init__(self) -> None:
        self._clusters: Dict[str, ClusterStats] = {}
        self._lock = threading.Lock()
        self._removed: Dict[str, int] = {"clusters": 0}

    def retire(self, name: str, stats: Optional[ClusterStats] = None) -> None:
        """Drop ``name``'s stats (``stats``: only if it is still that object) and add its
        counters to the :meth:`removed` summary."""
        with self._lock:
            current = self._clusters.get(name)
            if current is None or (stats is not None and current is not stats):
                return
            del self._clusters[name]
        counters = current.all_counters()
        with self._lock:
            removed = self._removed
            removed["clusters"] += 1
            for key, n in counters.items():
                removed[key] = removed.get(key, 0) + n

    def removed(self) -> Dict[str, int]:
        """The summed counters of every retired cluster, and how many were retired."""
        with self._lock:
            return dict(self._removed)

    def cluster(self, name: str) -> ClusterStats:
        stats = self._clusters.get(name)
        if stats is None:
            with self._lock:
                stats = self._clusters.setdefault(name, ClusterStats(name))
        return stats

    def clusters(self) -> List[ClusterStats]:
        return list(self._clusters.values())

    def snapshot(self) -> Dict[str, Dict[str, Any]]:
        return {s.name: s.snapshot() for s in self.clusters()}


def _metric_name(stat: str) -> str:
    return "meshcore_cluster_" + stat.replace(".", "_")


def prometheus_collector(registry: StatsRegistry, certificate_sources: Any = None, telemetry: Any = None) -> Any:
    """A ``prometheus_client`` collector for ``registry`` (register it with ``REGISTRY.register``).

    ``certificate_sources()`` (optional) gives ``{name: FileCertificateSource}``: each adds
    ``meshcore_certificate_expiry_seconds`` (seconds until its leaf expires), and the
    ``meshcore_certificate_reload_failures`` / ``meshcore_certificate_reloads`` counters.
    ``telemetry`` (optional, ``mesh.telemetry``): Istio's standard metrics (``istio_requests_total``
    & co) once ``telemetry.enable_istio_metrics()`` was called."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class MeshcoreCollector:
        def collect(self) -> Iterator[Any]:
            families: Dict[str, Any] = {}
            for stats in registry.clusters():
                for name, value in stats.all_counters().items():
                    fam = families.get(name)
                    if fam is None:
                        fam = families[name] = CounterMetricFamily(
                            _metric_name(name), f"Envoy cluster stat {name}", labels=["cluster"])
                    fam.add_metric([stats.name], value)
                for name, read in stats.gauges.items():
                    key = "gauge:" + name
                    fam = families.get(key)
                    if fam is None:
                        fam = families[key] = GaugeMetricFamily(
                            _metric_name(name), f"Envoy cluster gauge {name}", labels=["cluster"])
                    fam.add_metric([stats.name], read())
                h = stats.rq_time
                fam = families.get("hist")
                if fam is None:
                    fam = families["hist"] = HistogramMetricFamily(
                        "meshcore_cluster_upstream_rq_time_seconds", "Upstream request time", labels=["cluster"])
                snap = h.snapshot()
                buckets = [(str(b / 1000.0), c) for b, c in snap["buckets"]] + [("+Inf", h.count)]
                fam.add_metric([stats.name], buckets, sum_value=h.sum / 1000.0)
            yield from families.values()
            if certificate_sources is not None:
                yield from _certificate_metrics(certificate_sources(), GaugeMetricFamily, CounterMetricFamily)
            istio = getattr(telemetry, "istio_metrics", None)
            if istio is not None:
                yield from istio.families()

        def describe(self) -> List[Any]:
            return []

    return MeshcoreCollector()


def _certificate_metrics(sources: Dict[str, Any], gauge: Any, counter: Any) -> Iterator[Any]:
    expiry = gauge("meshcore_certificate_expiry_seconds",
                   "Seconds until the workload certificate expires (negative: expired)", labels=["source"])
    ok = gauge("meshcore_certificate_loaded", "1 when a good certificate set is in use", labels=["source"])
    reloads = counter("meshcore_certificate_reloads", "Good certificate sets loaded", labels=["source"])
    failures = counter("meshcore_certificate_reload_failures",
                       "Certificate reads that failed (the last good set stayed in use)", labels=["source"])
    for name, src in sorted(sources.items()):
        ident = src.identity()
        if ident.seconds_left is not None:
            expiry.add_metric([name], ident.seconds_left)
        ok.add_metric([name], 1 if ident.generation else 0)
        reloads.add_metric([name], src.reloads)
        failures.add_metric([name], src.reload_failures)
    yield from (expiry, ok, reloads, failures)

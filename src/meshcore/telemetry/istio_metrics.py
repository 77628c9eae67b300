"""Istio's standard metrics for the requests this process makes and serves: a telemetry sink.

What an Istio client sidecar's ``istio.stats`` filter reports for each outbound request (istio/proxy
source/extensions/filters/http/istio_stats/istio_stats.cc at 9ba5437, ``reporter="source"``, the
``ClientSidecar`` branch), and a server sidecar's for each request served through the server
integrations (``reporter="destination"``: see :meth:`IstioMetrics._destination_labels`), kept in
memory and exposed through ``mesh.prometheus_collector()``:

* ``istio_requests_total`` (counter), ``istio_request_duration_milliseconds``,
  ``istio_request_bytes``, ``istio_response_bytes`` (histograms, Envoy's default buckets: Istio
  sets none unless the ``sidecar.istio.io/statsHistogramBuckets`` annotation asks), and for gRPC
  ``istio_request_messages_total`` / ``istio_response_messages_total``.
* The 25 labels in the filter's order (:data:`LABELS`) with its value rules:

  - ``source_*``: this workload's bootstrap node metadata, as the filter reads its local node:
    ``WORKLOAD_NAME``, ``NAMESPACE``, ``LABELS["app"]``, ``LABELS["version"]``,
    ``LABELS["service.istio.io/canonical-name"]``, ``LABELS[...canonical-revision]``,
    ``CLUSTER_ID`` (verbatim: empty when the node lacks them, as Istio's). ``source_principal``:
    this workload's SPIFFE ID when the request went over mesh mTLS (the upstream connection's
    local certificate), else ``unknown``.
  - ``destination_*``: the peer from the response's ``x-envoy-peer-metadata`` (a sidecar'd
    server answering the exchange), else the picked endpoint's EDS ``istio.workload``
    (``name;namespace;canonical;revision;cluster``); ``unknown`` where missing, canonical revision
    ``latest``. ``destination_principal``: the server's URI SAN when the connection used mTLS and
    the cluster's TLS pins exactly one URI SAN (the certificate meshcore verified), else the
    peer's ``IDENTITY``, else ``unknown``; its namespace (``/ns/<ns>/``) wins for
    ``destination_workload_namespace``.
  - ``destination_service``: the service host of an Istio cluster name
    (``outbound|<port>|<subset>|<fqdn>``: what istiod also writes as the cluster's
    ``istio.services[0].host``), else the request's Host (the filter's host-header fallback,
    on for outbound listeners); ``destination_service_name``: the host's first label (or
    ``BlackHoleCluster``/``PassthroughCluster`` for those clusters and Istio's ``block_all`` /
    ``allow_any`` routes); ``destination_service_namespace``: a ``<name>.<ns>.svc.*`` host's
    namespace, else the peer's namespace, else ``unknown``.
  - ``request_protocol`` ``http``/``grpc``; ``response_code`` (``0``: none);
    ``grpc_response_status`` (gRPC only, else empty); ``response_flags`` (Envoy's short flags,
    ``-``); ``connection_security_policy`` ``unknown`` (never set on the client side).

Cost per request: while this sink is its mesh's only sink, the request path hands it the call
itself (``Telemetry.observe`` is the ``observe`` method of :attr:`IstioMetrics.observer`, the
request path twin's ``IstioObserver``): the usual answer (HTTP or OK gRPC; no fault, no error, no
retry flag) is counted with no record, keyed by (route, cluster, endpoint, authority, status, the peer's raw
metadata) -- one dict lookup (the compiled twin first tries the series it last found for the same
endpoint and status, by the identity of the configuration's objects) and the increments of one
``IstioSeries`` (C arrays in the compiled twin) -- about +0.7 µs
over no telemetry (``benchmarks/test_bench_telemetry.py``). Other requests, and every request
while another sink is registered, go through the record, whose label tuple is kept per (cluster,
endpoint, authority, code, grpc status, flags, protocol, route, peer, reporter, principal,
security policy). Both label caches are rebuilt every :attr:`IstioMetrics.label_ttl` seconds (TLS,
identity and endpoint metadata changes are then seen).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..stats import BUCKETS_MS
from .peer_metadata import CANONICAL_NAME, CANONICAL_REVISION, Workload, from_endpoint, node_metadata, workload_of
from .outcome import _record
from .record import RequestRecord

__all__ = ["IstioMetrics", "LABELS", "METRICS", "service_of_cluster"]

log = logging.getLogger(__name__)

#: istio_stats.cc ``all_tags_``, in order
LABELS: Tuple[str, ...] = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_canonical_service", "destination_canonical_revision", "destination_cluster", "request_protocol",
    "response_flags", "connection_security_policy", "response_code", "grpc_response_status")

METRICS: Tuple[str, ...] = ("istio_requests_total", "istio_request_duration_milliseconds", "istio_request_bytes",
                            "istio_response_bytes", "istio_request_messages_total", "istio_response_messages_total")

UNKNOWN = "unknown"
_SPECIAL_CLUSTERS = frozenset({"BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster",
                               "InboundPassthroughClusterIpv4", "InboundPassthroughClusterIpv6"})
_SPECIAL_ROUTES = {"block_all": "BlackHoleCluster", "allow_any": "PassthroughCluster"}


def service_of_cluster(cluster: Optional[str]) -> Optional[Tuple[str, str, str]]:
    """``(host, name, namespace)`` of an Istio outbound cluster name (``outbound|port|subset|fqdn``;
    name: the host's first label; namespace: the second label of a ``.svc.`` host, else ``""``),
    or ``None`` for other names."""
    if not cluster or not cluster.startswith("outbound|"):
        return None
    parts = cluster.split("|")
    if len(parts) != 4 or not parts[3]:
        return None
    host = parts[3]
    labels = host.split(".")
    namespace = labels[1] if len(labels) > 2 and labels[2] == "svc" else ""
    return host, labels[0], namespace


def _namespace_of_san(san: str) -> str:
    """``getNamespace``: ``<ns>`` of ``.../ns/<ns>/sa/...`` (``""``: none)."""
    begin = san.find("/ns/")
    if begin < 0:
        return ""
    begin += 4
    end = san.find("/", begin)
    return san[begin:] if end < 0 else san[begin:end]


def _default_core() -> Any:
    from ..call import core

    return core


def _format_bound(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else repr(float(b))



#: distinct label sets kept at most; beyond, new label sets count under one whose peer-supplied
#: labels are "unknown" (a server's callers choose its source_* values: memory stays bounded)
MAX_SERIES = 10_000


def _overflow(labels: Tuple[str, ...]) -> Tuple[str, ...]:
    """``labels`` with every value but the reporter, the response's and the protocol's replaced by
    ``unknown`` (the series beyond :data:`MAX_SERIES` are counted together there)."""
    keep = {"reporter", "request_protocol", "response_code", "grpc_response_status", "response_flags",
            "connection_security_policy"}
    return tuple(v if name in keep else "unknown" for name, v in zip(LABELS, labels))

class IstioMetrics:
    """The sink (see the module docstring): ``mesh.telemetry.enable_istio_metrics()`` makes and
    registers one. ``node_metadata`` replaces the bootstrap node's metadata as the source of the
    ``source_*`` labels; ``buckets``: histogram bounds (Envoy's defaults)."""

    label_ttl = 60.0

    def __init__(self, mesh: Any, node_metadata_override: Optional[Mapping[str, Any]] = None,
                 buckets: Sequence[float] = BUCKETS_MS) -> None:
        self._mesh = mesh
        self.buckets: Tuple[float, ...] = tuple(sorted(float(b) for b in buckets))
        node = getattr(getattr(mesh, "bootstrap", None), "node", None)
        md = dict(node_metadata_override) if node_metadata_override is not None else node_metadata(node)
        labels = md.get("LABELS") if isinstance(md.get("LABELS"), Mapping) else {}

        def s(v: Any) -> str:
            return v if isinstance(v, str) else ""

        # the Context ctor: the local node's values, verbatim (empty when absent)
        self._local = (s(md.get("WORKLOAD_NAME")), s(md.get("NAMESPACE")), s(labels.get("app")),
                       s(labels.get("version")), s(labels.get(CANONICAL_NAME)), s(labels.get(CANONICAL_REVISION)),
                       s(md.get("CLUSTER_ID")))
        self._lock = threading.Lock()
        #: the request path's counters (``IstioSeries``) of the mesh's twin
        self._core = getattr(mesh, "_core", None) or _default_core()
        self._series: Dict[Tuple[str, ...], Any] = {}
        #: record key -> (peer dict held so its id stays unique, series)
        self._keys: Dict[Tuple[Any, ...], Tuple[Any, Any]] = {}
        self._keys_until = 0.0
        #: the fast path (``Telemetry.observe`` while this is the mesh's only sink): counts the
        #: usual answer without a record, by a key of the call's own values
        self.observer = self._core.IstioObserver(self._miss)

    # -- the sink ----------------------------------------------------------------------------------

    def __call__(self, r: RequestRecord) -> None:
        peer = r.peer_metadata
        key = (r.cluster, r.upstream_host, r.authority, r.response_code, r.grpc_status, r.response_flags, r.protocol,
               r.route_name, id(peer) if peer is not None else 0, r.reporter, r.principal,
               r.connection_security_policy)
        found = self._keys.get(key)
        if found is None or found[0] is not peer or r.start_time > self._keys_until:
            series = self._series_for(key, r, peer)
        else:
            series = found[1]
        series.add(r.duration_ms, r.request_bytes, r.response_bytes, r.request_messages, r.response_messages)

    def _miss(self, call: Any, result: Any, key: Tuple[Any, ...]) -> None:
        """The observer met a key it does not know (or its keys expired): the record, its series
        (labels computed), counted; the series kept for the observer's key."""
        observer = self.observer
        if call.started > observer.until:  # the observer's keys expired: labels made again from now on
            with self._lock:
                if call.started > observer.until:
                    self._keys.clear()
                    observer.clear()
                    self._keys_until = 0.0  # (the record path then sets both deadlines again)
                    observer.until = call.started + self.label_ttl
        attempts = call.attempts
        r = _record(call, attempts[-1], result, None, observer.peers)
        peer = r.peer_metadata
        series = self._series_for((r.cluster, r.upstream_host, r.authority, r.response_code, r.grpc_status,
                                   r.response_flags, r.protocol, r.route_name, id(peer) if peer is not None else 0,
                                   r.reporter, r.principal, r.connection_security_policy), r, peer)
        with self._lock:  # (a reset() since _series_for: the series is dropped, the observer keeps no key to it)
            if self._series.get(series.labels) is series:
                keys = observer.keys
                if len(keys) >= 65536:
                    observer.clear()
                keys[key] = series
        series.add(r.duration_ms, r.request_bytes, r.response_bytes, r.request_messages, r.response_messages)

    def _series_for(self, key: Tuple[Any, ...], r: RequestRecord, peer: Any) -> Any:
        labels = self.labels_of(r)
        with self._lock:
            if r.start_time > self._keys_until:
                self._keys.clear()
                self.observer.clear()
                self._keys_until = r.start_time + self.label_ttl
                self.observer.until = time.monotonic() + self.label_ttl
            series = self._series.get(labels)
            if series is None:
                if len(self._series) >= MAX_SERIES:  # (label values callers send: a bound on memory)
                    labels = _overflow(labels)
                    series = self._series.get(labels)
                if series is None:
                    series = self._series[labels] = self._core.IstioSeries(labels, self.buckets,
                                                                          r.protocol == "grpc")
            if len(self._keys) >= 65536:
                self._keys.clear()
            self._keys[key] = (peer, series)
        return series

    # -- labels ------------------------------------------------------------------------------------

    def _tls(self, r: RequestRecord) -> Any:
        if r.endpoint is None or r.cluster is None:
            return None
        upstream_tls = getattr(self._mesh, "upstream_tls", None)
        if upstream_tls is None:
            return None
        try:
            return upstream_tls(r.cluster, r.endpoint)
        except Exception:  # noqa: BLE001  (no certificates: the request failed before any TLS)
            return None

    def _local_san(self) -> str:
        identity = getattr(self._mesh, "identity", None)
        ident = identity() if identity is not None else None
        return (ident.spiffe_id or "") if ident is not None else ""

    @staticmethod
    def _pinned_san(tls: Any) -> str:
        """The one URI SAN a cluster's TLS requires of the server (exact match), else ``""``."""
        matchers = getattr(getattr(tls, "spec", None), "san_matchers", ())
        if len(matchers) != 1:
            return ""
        m = matchers[0]
        if m.san_type in ("URI", "") and m.matcher.kind == "exact" and not m.matcher.ignore_case:
            return m.matcher.value
        return ""

    def labels_of(self, r: RequestRecord) -> Tuple[str, ...]:
        """The 25 label values (:data:`LABELS` order) of a record."""
        if r.reporter == "destination":
            return self._destination_labels(r)
        workload, namespace, app, version, canonical, revision, cluster_id = self._local
        tls = self._tls(r)
        mtls = tls is not None and getattr(tls, "mutual", False)
        local_san = self._local_san() if mtls else ""
        peer_san = self._pinned_san(tls) if mtls else ""
        peer: Optional[Workload] = None
        mx_peer: Optional[Workload] = None
        if r.peer_metadata is not None:
            mx_peer = peer = workload_of(r.peer_metadata)
        else:
            ep = r.endpoint
            md = getattr(ep, "metadata", None) if ep is not None else None
            istio = md.get("istio") if isinstance(md, Mapping) else None
            encoding = istio.get("workload") if isinstance(istio, Mapping) else None
            if isinstance(encoding, str):
                peer = from_endpoint(encoding)
        if not peer_san and mx_peer is not None:
            peer_san = mx_peer.identity
        peer_namespace = _namespace_of_san(peer_san) if peer_san else ""
        if not peer_namespace and peer is not None:
            peer_namespace = peer.namespace
        # destination service: Istio cluster metadata (here: the cluster name), Host header fallback
        service_host = service_name = r.authority or ""
        service_namespace = ""
        special = _SPECIAL_ROUTES.get(r.route_name or "")
        if special is not None:
            service_name = special
        elif r.cluster in _SPECIAL_CLUSTERS:
            service_name = r.cluster or ""
        else:
            svc = service_of_cluster(r.cluster)
            if svc is not None:
                service_host, service_name, service_namespace = svc
        grpc = r.protocol == "grpc"
        return (
            "source", workload, namespace, local_san or UNKNOWN, app, version, canonical, revision, cluster_id,
            (peer.workload_name if peer is not None else "") or UNKNOWN,
            peer_namespace or UNKNOWN,
            peer_san or UNKNOWN,
            (peer.app_name if peer is not None else "") or UNKNOWN,
            (peer.app_version if peer is not None else "") or UNKNOWN,
            service_host or UNKNOWN,
            service_name or UNKNOWN,
            service_namespace or peer_namespace or UNKNOWN,
            (peer.canonical_name if peer is not None else "") or UNKNOWN,
            (peer.canonical_revision if peer is not None else "") or "latest",
            (peer.cluster_id if peer is not None else "") or UNKNOWN,
            "grpc" if grpc else "http",
            r.response_flags or "-",
            "unknown",
            str(r.response_code or 0),
            str(r.grpc_status) if grpc and r.grpc_status is not None else "",
        )

    def _destination_labels(self, r: RequestRecord) -> Tuple[str, ...]:
        """A served request's labels, as a server sidecar's ``istio.stats`` reports them
        (``reporter="destination"``): ``source_*`` from the caller's ``x-envoy-peer-metadata``
        (``r.peer_metadata``), its principal the client certificate's SPIFFE ID (mTLS only; its
        ``/ns/<ns>/`` wins for the namespace, as on the client side); ``destination_*`` this
        workload's (its principal: this workload's SPIFFE ID under mTLS); the service: the
        request's Host (Istio reads the inbound cluster's ``istio.services``, which a proxyless
        server has none of, then falls back to the Host header) -- its first label, and the
        namespace of a ``<name>.<ns>.svc`` host, else this workload's namespace (this workload's
        own labels verbatim, as the client side's ``source_*``);
        ``connection_security_policy`` ``mutual_tls`` or ``none``."""
        workload, namespace, app, version, canonical, revision, cluster_id = self._local
        mtls = r.connection_security_policy == "mutual_tls"
        peer: Optional[Workload] = workload_of(r.peer_metadata) if r.peer_metadata is not None else None
        # the verified client certificate only: the caller's metadata is the caller's say-so
        peer_san = (r.principal or "") if mtls else ""
        peer_namespace = _namespace_of_san(peer_san) if peer_san else ""
        if not peer_namespace and peer is not None:
            peer_namespace = peer.namespace
        local_san = self._local_san() if mtls else ""
        host = r.authority or ""
        if host.startswith("[") and "]" in host:
            host = host[:host.index("]") + 1]
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        labels = host.split(".")
        service_namespace = labels[1] if len(labels) > 2 and labels[2] == "svc" else ""
        grpc = r.protocol == "grpc"
        return (
            "destination",
            (peer.workload_name if peer is not None else "") or UNKNOWN,
            peer_namespace or UNKNOWN,
            peer_san or UNKNOWN,
            (peer.app_name if peer is not None else "") or UNKNOWN,
            (peer.app_version if peer is not None else "") or UNKNOWN,
            (peer.canonical_name if peer is not None else "") or UNKNOWN,
            (peer.canonical_revision if peer is not None else "") or "latest",
            (peer.cluster_id if peer is not None else "") or UNKNOWN,
            workload, namespace, local_san or UNKNOWN, app, version,  # the local node's, verbatim (as source_*)
            host or UNKNOWN,
            (labels[0] if host else "") or UNKNOWN,
            service_namespace or namespace or UNKNOWN,
            canonical, revision, cluster_id,
            "grpc" if grpc else "http",
            r.response_flags or "-",
            "mutual_tls" if mtls else "none",
            str(r.response_code or 0),
            str(r.grpc_status) if grpc and r.grpc_status is not None else "",
        )

    # -- readers -----------------------------------------------------------------------------------

    def snapshot(self) -> List[Dict[str, Any]]:
        """Every series: ``{"labels": {name: value}, "requests": n, "duration_ms": {"count", "sum",
        "buckets": [(le, cumulative)]}, "request_bytes": ..., "response_bytes": ...,
        "request_messages": n, "response_messages": n}``."""
        out = []
        for labels, grpc, v in self._copy():
            out.append({"labels": dict(zip(LABELS, labels)), "requests": v[0],
                        "duration_ms": self._hist(v[1], v[2]),
                        "request_bytes": self._hist(v[3], v[4]),
                        "response_bytes": self._hist(v[5], v[6]),
                        "request_messages": v[7], "response_messages": v[8],
                        "grpc": grpc})
        return out

    def _copy(self) -> List[Tuple[Tuple[str, ...], bool, Tuple[Any, ...]]]:
        """``(labels, grpc, values())`` of every series."""
        with self._lock:
            series = list(self._series.values())
        return [(s.labels, s.grpc, s.values()) for s in series]

    def _hist(self, counts: List[int], total: float) -> Dict[str, Any]:
        cumulative, acc = [], 0
        for bound, c in zip(self.buckets, counts):
            acc += c
            cumulative.append((bound, acc))
        return {"count": acc + counts[-1], "sum": total, "buckets": cumulative}

    def reset(self) -> None:
        """Forget every series."""
        with self._lock:
            self._series.clear()
            self._keys.clear()
            self.observer.clear()

    def families(self) -> Iterator[Any]:
        """The ``prometheus_client`` metric families (``mesh.prometheus_collector()`` yields them)."""
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        series = self._copy()
        labels = list(LABELS)
        total = CounterMetricFamily("istio_requests_total", "Requests (Istio standard metric)", labels=labels)
        hists = [HistogramMetricFamily(name, doc, labels=labels) for name, doc in (
            ("istio_request_duration_milliseconds", "Request duration in milliseconds (Istio standard metric)"),
            ("istio_request_bytes", "Request body sizes in bytes (Istio standard metric)"),
            ("istio_response_bytes", "Response body sizes in bytes (Istio standard metric)"))]
        req_msgs = CounterMetricFamily("istio_request_messages_total", "gRPC messages sent (Istio standard metric)",
                                       labels=labels)
        resp_msgs = CounterMetricFamily("istio_response_messages_total",
                                        "gRPC messages received (Istio standard metric)", labels=labels)
        bounds = [_format_bound(b) for b in self.buckets] + ["+Inf"]
        for labels, grpc, v in series:
            values = list(labels)
            total.add_metric(values, v[0])
            for fam, counts, sm in zip(hists, (v[1], v[3], v[5]), (v[2], v[4], v[6])):
                acc, cumulative = 0, []
                for bound, c in zip(bounds, counts):
                    acc += c
                    cumulative.append((bound, acc))
                fam.add_metric(values, cumulative, sum_value=sm)
            if grpc:
                req_msgs.add_metric(values, v[7])
                resp_msgs.add_metric(values, v[8])
        yield total
        yield from hists
        if req_msgs.samples:
            yield req_msgs
            yield resp_msgs

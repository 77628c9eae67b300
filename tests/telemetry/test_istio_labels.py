"""Istio's label value rules (istio_stats.cc, the ClientSidecar branch) on records made by hand:
mTLS principals, SAN namespaces, special clusters and routes, cluster-name services, defaults,
histogram buckets, enabling and disabling."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Optional

import pytest

from meshcore._model import Endpoint
from meshcore._route_model import StringMatchSpec
from meshcore.telemetry import Telemetry
from meshcore.telemetry import peer_metadata as pm
from meshcore.telemetry.istio_metrics import LABELS, IstioMetrics, service_of_cluster
from meshcore.telemetry.record import ACTIVE, RequestRecord
from meshcore.xds.model import SanMatcherSpec

NODE = {"WORKLOAD_NAME": "client", "NAMESPACE": "shop", "CLUSTER_ID": "c1",
        "LABELS": {"app": "client-app", "version": "v3", "app.kubernetes.io/name": "ignored-locally",
                   "service.istio.io/canonical-name": "client", "service.istio.io/canonical-revision": "r3"}}
SPIFFE = "spiffe://cluster.local/ns/shop/sa/client"


class FakeMesh:
    """What the sink reads of a mesh: bootstrap node, upstream_tls, identity."""

    def __init__(self, tls: Any = None) -> None:
        self.bootstrap = None
        self._tls = tls

    def upstream_tls(self, cluster: str, endpoint: Any) -> Any:
        return self._tls

    def identity(self) -> Any:
        return SimpleNamespace(spiffe_id=SPIFFE)


def record(**kw: Any) -> RequestRecord:
    base: Dict[str, Any] = {"target": "reviews.shop.svc.cluster.local:9080",
                            "authority": "reviews.shop.svc.cluster.local:9080", "route_name": "default",
                            "cluster": "outbound|9080||reviews.shop.svc.cluster.local", "upstream_host": "10.0.0.5:9080",
                            "endpoint": Endpoint("10.0.0.5", 9080), "response_code": 200, "start_time": 1.0,
                            "duration_ms": 3.0}
    base.update(kw)
    return RequestRecord(**base)


def labels(sink: IstioMetrics, r: RequestRecord) -> Dict[str, str]:
    return dict(zip(LABELS, sink.labels_of(r)))


def test_service_of_cluster():
    assert service_of_cluster("outbound|9080||reviews.shop.svc.cluster.local") == (
        "reviews.shop.svc.cluster.local", "reviews", "shop")
    assert service_of_cluster("outbound|443|v1|api.example.com") == ("api.example.com", "api", "")
    assert service_of_cluster("inbound|9080||") is None and service_of_cluster("main") is None
    assert service_of_cluster(None) is None


def test_plaintext_unknown_peer_defaults():
    sink = IstioMetrics(FakeMesh(), NODE)
    got = labels(sink, record())
    assert got["source_workload"] == "client" and got["source_app"] == "client-app"  # the local node reads "app"
    assert got["source_principal"] == "unknown"  # no mTLS: the filter sees no local certificate
    assert (got["destination_workload"], got["destination_workload_namespace"], got["destination_principal"],
            got["destination_canonical_service"], got["destination_canonical_revision"],
            got["destination_cluster"]) == ("unknown", "unknown", "unknown", "unknown", "latest", "unknown")
    assert (got["destination_service"], got["destination_service_name"], got["destination_service_namespace"]) == (
        "reviews.shop.svc.cluster.local", "reviews", "shop")
    assert (got["grpc_response_status"], got["connection_security_policy"], got["response_flags"]) == (
        "", "unknown", "-")


def test_mtls_principals_and_san_namespace():
    matcher = SanMatcherSpec("URI", StringMatchSpec("exact", "spiffe://cluster.local/ns/books/sa/reviews"))
    tls = SimpleNamespace(mutual=True, spec=SimpleNamespace(san_matchers=(matcher,)))
    sink = IstioMetrics(FakeMesh(tls), NODE)
    peer = pm.decode(pm.encode({"WORKLOAD_NAME": "reviews-v1", "NAMESPACE": "other", "LABELS": {}}))
    got = labels(sink, record(peer_metadata=peer))
    assert got["source_principal"] == SPIFFE
    assert got["destination_principal"] == "spiffe://cluster.local/ns/books/sa/reviews"
    assert got["destination_workload_namespace"] == "books"  # the SAN's namespace wins over the peer's
    assert got["destination_workload"] == "reviews-v1" and got["destination_canonical_revision"] == "latest"


def test_peer_identity_without_a_pinned_san():
    tls = SimpleNamespace(mutual=True, spec=SimpleNamespace(san_matchers=()))
    sink = IstioMetrics(FakeMesh(tls), NODE)
    peer = pm.decode(pm.encode({"WORKLOAD_NAME": "w", "NAMESPACE": "n", "IDENTITY": "spiffe://td/ns/x/sa/y",
                                "LABELS": {}}))
    got = labels(sink, record(peer_metadata=peer))
    assert (got["destination_principal"], got["destination_workload_namespace"]) == ("spiffe://td/ns/x/sa/y", "x")


@pytest.mark.parametrize("cluster,route,service,name", [
    ("PassthroughCluster", "allow_any", "example.com:80", "PassthroughCluster"),
    ("BlackHoleCluster", "x", "example.com:80", "BlackHoleCluster"),
    ("main", "block_all", "example.com:80", "BlackHoleCluster"),
    ("main", "r", "example.com:80", "example.com:80"),  # the Host header fallback
])
def test_special_clusters_routes_and_host_fallback(cluster, route, service, name):
    sink = IstioMetrics(FakeMesh(), NODE)
    got = labels(sink, record(cluster=cluster, route_name=route, authority="example.com:80"))
    assert (got["destination_service"], got["destination_service_name"]) == (service, name)


def test_grpc_status_and_buckets():
    sink = IstioMetrics(FakeMesh(), NODE)
    for ms in (0.2, 0.5, 0.7, 4000.0, 5_000_000.0):
        sink(record(protocol="grpc", grpc_status=14, duration_ms=ms, request_bytes=0, response_bytes=600))
    [s] = sink.snapshot()
    assert s["labels"]["grpc_response_status"] == "14" and s["labels"]["request_protocol"] == "grpc"
    buckets = dict(s["duration_ms"]["buckets"])
    # Envoy's default bounds; a value on a bound counts in it (le)
    assert list(buckets) == [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                             600000, 1800000, 3600000]
    assert (buckets[0.5], buckets[1], buckets[5000], buckets[3600000], s["duration_ms"]["count"]) == (2, 3, 4, 4, 5)
    assert dict(s["response_bytes"]["buckets"])[1000] == 5 and s["request_bytes"]["sum"] == 0


def test_enable_twice_disable_and_env(monkeypatch):
    before = ACTIVE[0]
    tel = Telemetry(FakeMesh())
    sink = tel.enable_istio_metrics(node_metadata=NODE)
    assert tel.enable_istio_metrics() is sink and tel.sinks == (sink,) and ACTIVE[0] == before + 1
    assert tel.exchange is not None and pm.decode(tel.exchange.value)["WORKLOAD_NAME"] == "client"
    tel.disable_istio_metrics()
    assert (tel.sinks, tel.istio_metrics, tel.exchange, ACTIVE[0]) == ((), None, None, before)
    monkeypatch.setenv("MESHCORE_ISTIO_METRICS", "1")
    tel2 = Telemetry(FakeMesh())
    assert tel2.istio_metrics is not None and ACTIVE[0] == before + 1
    tel2.close()
    assert ACTIVE[0] == before and tel2.istio_metrics is not None  # what it recorded stays readable
    monkeypatch.setenv("MESHCORE_ISTIO_METRICS", "0")
    assert Telemetry(FakeMesh()).istio_metrics is None


def test_exchange_off_sends_nothing():
    tel = Telemetry(FakeMesh())
    tel.enable_istio_metrics(exchange=False)
    assert tel.exchange is None
    tel.disable_istio_metrics()


def test_prometheus_families_text():
    import prometheus_client  # noqa: F401
    from prometheus_client import CollectorRegistry, generate_latest

    from meshcore.stats import StatsRegistry, prometheus_collector

    tel = Telemetry(FakeMesh())
    sink = tel.enable_istio_metrics(node_metadata=NODE)
    sink(record(duration_ms=7.0, response_bytes=123))
    reg = CollectorRegistry()
    reg.register(prometheus_collector(StatsRegistry(), None, tel))
    text = generate_latest(reg).decode()
    tel.disable_istio_metrics()
    assert "# TYPE istio_requests_total counter" in text
    assert "# TYPE istio_request_duration_milliseconds histogram" in text
    line = next(l for l in text.splitlines() if l.startswith("istio_request_duration_milliseconds_bucket")
                and 'le="10"' in l)
    assert line.endswith(" 1.0")
    assert 'le="0.5"' in text and 'le="3600000"' in text and 'le="+Inf"' in text
    assert "istio_request_messages_total" not in text  # gRPC only


def test_series_are_bounded(monkeypatch):
    # label values a server's callers choose (their peer metadata) cannot grow the series forever:
    # beyond MAX_SERIES label sets, new ones count under one with those labels "unknown"
    from meshcore.telemetry import istio_metrics

    monkeypatch.setattr(istio_metrics, "MAX_SERIES", 3)
    sink = IstioMetrics(FakeMesh(), NODE)
    for i in range(6):
        sink(record(route_name=f"r{i}", cluster=f"outbound|9080||svc{i}.shop.svc.cluster.local",
                    authority=f"svc{i}.shop.svc.cluster.local:9080"))
    snap = sink.snapshot()
    assert len(snap) == 4  # three kept, the rest together
    [overflow] = [s for s in snap if s["labels"]["destination_service"] == "unknown"]
    assert overflow["requests"] == 3 and overflow["labels"]["source_workload"] == "unknown"
    assert overflow["labels"]["reporter"] == "source"


def test_peer_metadata_cache_starts_again_when_full(monkeypatch):
    monkeypatch.setattr(pm, "_CACHE_MAX", 4)
    monkeypatch.setattr(pm, "_cache", {})
    values = [pm.encode({"NAME": f"p{i}", "NAMESPACE": "ns"}) for i in range(10)]
    for v in values:
        assert pm.decode_cached(v)["NAME"].startswith("p")
    assert 1 <= len(pm._cache) <= 4  # bounded, and still caching
    assert pm.decode_cached(values[-1]) is pm.decode_cached(values[-1])


def test_server_side_principal_comes_from_the_certificate_only():
    # a caller's x-envoy-peer-metadata may claim any IDENTITY: under mTLS the source principal is
    # the verified client certificate's, and without one it stays unknown
    sink = IstioMetrics(FakeMesh(), NODE)
    claimed = {"NAME": "x", "NAMESPACE": "shop", "WORKLOAD_NAME": "caller",
               "IDENTITY": "spiffe://cluster.local/ns/admin/sa/root"}
    base = dict(reporter="destination", connection_security_policy="mutual_tls", peer_metadata=claimed,
                authority="client.shop.svc.cluster.local:8080")
    no_cert = labels(sink, record(principal=None, **base))
    assert no_cert["source_principal"] == "unknown" and no_cert["source_workload"] == "caller"
    cert = labels(sink, record(principal="spiffe://cluster.local/ns/shop/sa/caller", **base))
    assert cert["source_principal"] == "spiffe://cluster.local/ns/shop/sa/caller"


"""``meshcore.controlplane.istio_sidecar``: istiod's sidecar-shaped xDS from a mesh description.

* shape: the output for the mesh of the real Istio config dumps in ``tests/fixtures/istio/``
  (bookinfo ``productpage-v1-*.json``, Istio 1.3; ``http_config.json`` and
  ``endpoint/configdump.json``, Istio 1.2x; ``config_dump.json``, Istio 1.21) matches them for the
  same concepts: listener names and ports, RDS names, virtual host names and domain lists, the
  default route, cluster names, EDS/TLS fields, ``transport_socket_matches`` (byte for byte),
  endpoint metadata. Where current istiod writes something else than the older dump, the test
  says which istiod change it is.
* Envoy 1.40: the resources (``istio_proxy_extensions=False``: upstream Envoy has no Istio filters)
  served over ADS by meshcore's reference control plane are all ACKed (history and admin stats:
  no ``update_rejected``) and show up in ``/config_dump``; generated meshes pass
  ``envoy --mode validate`` as a static bootstrap; the faithful shape is refused by upstream Envoy
  exactly because of Istio's own filters.
* scale: ``generated(2000, seed=1)`` builds in well under 10 s; ``generated`` is deterministic.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import grpc
import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from envoy_process import EnvoyProcess, find_envoy, free_port, http_get, socket_address
from google.protobuf import json_format

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import istio_sidecar as sidecar

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "istio"
HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TYPE_URLS = {
    "listeners": "type.googleapis.com/envoy.config.listener.v3.Listener",
    "routes": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "clusters": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "endpoints": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
}
BOOKINFO = ("details", "productpage", "ratings", "reviews")


def load(rel: str) -> Any:
    return json.loads((FIXTURES / rel).read_text())


def js(message: Any) -> Dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def by_name(messages: List[Any]) -> Dict[str, Any]:
    return {getattr(m, "name", "") or m.cluster_name: m for m in messages}


def unpack_hcm(filter_: Any) -> hcm_pb2.HttpConnectionManager:
    h = hcm_pb2.HttpConnectionManager()
    assert filter_.typed_config.Unpack(h)
    return h


# -- the fixtures ---------------------------------------------------------------------------------


def dump_items(dump: Mapping[str, Any], suffix: str, key: str, inner: str) -> Dict[str, Dict[str, Any]]:
    out = {}
    for config in dump["configs"]:
        if config["@type"].endswith(suffix):
            for item in config.get(key, []):
                obj = item.get(inner) or item.get("active_state", {}).get(inner) or item
                out[obj.get("name") or obj.get("cluster_name")] = obj
    return out


PRODUCTPAGE = load("productpage-v1-7bbd79f8fd-k6j79.json")
PP_LISTENERS = dump_items(PRODUCTPAGE, "ListenersConfigDump", "dynamic_listeners", "listener")
PP_ROUTES = dump_items(PRODUCTPAGE, "RoutesConfigDump", "dynamic_route_configs", "route_config")
PP_CLUSTERS = dump_items(PRODUCTPAGE, "ClustersConfigDump", "dynamic_active_clusters", "cluster")
PP_IP = "172.30.150.216"  # the productpage pod (node id sidecar~172.30.150.216~...)


def fixture_vips() -> Dict[str, str]:
    """Each bookinfo service's ClusterIP, read from its vhost domains in RDS ``9080``."""
    out = {}
    for vh in PP_ROUTES["9080"]["virtual_hosts"]:
        name = vh["name"].split(".")[0]
        if name in BOOKINFO:
            (vip,) = [d for d in vh["domains"] if re.fullmatch(r"[\d.]+", d)]
            out[name] = vip
    return out


def bookinfo_mesh() -> Dict[str, Any]:
    """The productpage sidecar's world from the 1.3 dump: bookinfo on 9080 (VIPs from the dump),
    kube-dns (TCP 53/9153), DestinationRules with the subsets the dump has clusters for."""
    vips = fixture_vips()
    services = []
    for i, name in enumerate(BOOKINFO):
        services.append({
            "name": name, "namespace": "default", "vip": vips[name],
            "ports": [{"port": 9080, "name": "http", "protocol": "http"}],
            "endpoints": [{"ip": PP_IP if name == "productpage" else f"172.30.150.{10 + i}",
                           "labels": {"app": name, "version": "v1", "security.istio.io/tlsMode": "istio"},
                           "service_account": f"bookinfo-{name}", "workload": f"{name}-v1"}],
        })
    services.append({"name": "kube-dns", "namespace": "kube-system", "vip": "172.21.0.10",
                     "ports": [{"port": 53, "name": "dns-tcp", "protocol": "tcp"},
                               {"port": 9153, "name": "metrics", "protocol": "tcp"}],
                     "endpoints": [{"ip": "172.30.0.5", "labels": {"k8s-app": "kube-dns"}}]})
    subsets = {"details": ["v1", "v2"], "productpage": ["v1"], "ratings": ["v1", "v2", "v2-mysql", "v2-mysql-vm"],
               "reviews": ["v1", "v2", "v3"]}
    drs = [{"name": n, "namespace": "default", "host": n,
            "subsets": [{"name": s, "labels": {"version": s}} for s in ss]} for n, ss in subsets.items()]
    return {"services": services, "destination_rules": drs,
            "proxy": {"ip": PP_IP, "labels": {"app": "productpage", "version": "v1"}}}


# -- shape against the real dumps -----------------------------------------------------------------


@pytest.fixture(scope="module")
def legacy() -> Dict[str, List[Any]]:
    """What an istiod of the dump's era writes for its mesh (``domains_with_port``)."""
    return sidecar.build(bookinfo_mesh(), domains_with_port=True)


@pytest.fixture(scope="module")
def current() -> Dict[str, List[Any]]:
    return sidecar.build(bookinfo_mesh())


def test_listener_names_and_addresses(legacy: Dict[str, List[Any]]) -> None:
    ours = by_name(legacy["listeners"])
    assert list(ours) == ["172.21.0.10_53", "0.0.0.0_9080", "172.21.0.10_9153", "virtualOutbound", "virtualInbound"]
    assert set(ours) <= set(PP_LISTENERS)
    for name, lis in ours.items():
        want = PP_LISTENERS[name]["address"]["socket_address"]
        assert (lis.address.socket_address.address, lis.address.socket_address.port_value) == \
            (want["address"], want["port_value"]), name
    assert ours["virtualOutbound"].use_original_dst.value and PP_LISTENERS["virtualOutbound"]["use_original_dst"]
    for name in ("0.0.0.0_9080", "172.21.0.10_53"):  # bind_to_port false (v2: deprecated_v1.bind_to_port)
        assert ours[name].bind_to_port.value is False and PP_LISTENERS[name]["deprecated_v1"] == {"bind_to_port": False}
        assert js(ours[name])["traffic_direction"] == PP_LISTENERS[name]["traffic_direction"] == "OUTBOUND"


def test_tcp_listener_filter_chain(legacy: Dict[str, List[Any]]) -> None:
    lis = by_name(legacy["listeners"])["172.21.0.10_53"]
    (chain,) = lis.filter_chains
    (want_chain,) = PP_LISTENERS["172.21.0.10_53"]["filter_chains"]
    # 1.3 had mixer before the TCP proxy; current istiod has istio.stats (telemetry v2)
    assert [f.name for f in chain.filters] == ["istio.stats", TCP_PROXY]
    assert want_chain["filters"][-1]["name"] == "envoy.tcp_proxy"  # v2 name of TCP_PROXY
    tp = tcp_proxy_pb2.TcpProxy()
    chain.filters[-1].typed_config.Unpack(tp)
    want = want_chain["filters"][-1]["typed_config"]
    assert (tp.stat_prefix, tp.cluster) == (want["stat_prefix"], want["cluster"]) == \
        ("outbound|53||kube-dns.kube-system.svc.cluster.local",) * 2


def test_http_listener_uses_rds_named_by_port(legacy: Dict[str, List[Any]]) -> None:
    lis = by_name(legacy["listeners"])["0.0.0.0_9080"]
    want = PP_LISTENERS["0.0.0.0_9080"]
    want_http = [c for c in want["filter_chains"] if c["filters"][0]["name"] == "envoy.http_connection_manager"]
    (want_hcm,) = [c["filters"][0]["typed_config"] for c in want_http]
    (chain,) = lis.filter_chains
    assert [f.name for f in chain.filters] == [HCM]
    h = unpack_hcm(chain.filters[0])
    assert h.rds.route_config_name == want_hcm["rds"]["route_config_name"] == "9080"
    assert js(h.rds.config_source)["ads"] == want_hcm["rds"]["config_source"]["ads"] == {}
    assert h.normalize_path.value is want_hcm["normalize_path"] is True
    assert [u.upgrade_type for u in h.upgrade_configs] == [u["upgrade_type"] for u in want_hcm["upgrade_configs"]]
    assert h.use_remote_address.value is want_hcm["use_remote_address"] is False
    assert (h.tracing.client_sampling.value, h.tracing.random_sampling.value, h.tracing.overall_sampling.value) == \
        (want_hcm["tracing"]["client_sampling"]["value"], want_hcm["tracing"]["random_sampling"]["value"],
         want_hcm["tracing"]["overall_sampling"]["value"])
    # v2 filter names -> v3 names; 1.3's mixer is gone, telemetry v2/mx/alpn/grpc_stats are new
    v3 = {"envoy.cors": "envoy.filters.http.cors", "envoy.fault": "envoy.filters.http.fault",
          "envoy.router": "envoy.filters.http.router"}
    old = [v3[f["name"]] for f in want_hcm["http_filters"] if f["name"] in v3]
    names = [f.name for f in h.http_filters]
    # the 1.3 dump put cors before fault; current istiod (and the 1.21 dump) fault before cors
    assert old == ["envoy.filters.http.cors", "envoy.filters.http.fault", "envoy.filters.http.router"]
    assert set(old) <= set(names) and names[-1] == old[-1]
    assert names == ["istio.metadata_exchange", "envoy.filters.http.grpc_stats", "istio.alpn",
                     "envoy.filters.http.fault", "envoy.filters.http.cors", "istio.stats", "envoy.filters.http.router"]
    # typed_config types as the 1.21 dump has them for the same filters
    hcms = [h for h in dump_items(load("config_dump.json"), "ListenersConfigDump", "dynamic_listeners", "listener")
            ["main_internal"]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]
    types_121 = {f["name"]: f["typed_config"]["@type"] for f in hcms}
    for f in h.http_filters:
        if f.name in types_121 and not types_121[f.name].endswith("TypedStruct"):
            assert f.typed_config.type_url == types_121[f.name], f.name
    # the fallthrough chain of a 0.0.0.0 listener (istioctl authz testdata dump: PassthroughFilterChain)
    assert lis.default_filter_chain.name == "PassthroughFilterChain"
    assert [f.name for f in lis.default_filter_chain.filters] == ["istio.stats", TCP_PROXY]
    assert list(chain.filter_chain_match.application_protocols) == ["http/1.1", "h2c"]
    assert [f.name for f in lis.listener_filters] == ["envoy.filters.listener.http_inspector"]


def test_virtual_listeners(legacy: Dict[str, List[Any]]) -> None:
    ours = by_name(legacy["listeners"])
    vo = ours["virtualOutbound"]
    assert [c.name for c in vo.filter_chains] == ["virtualOutbound-blackhole", "virtualOutbound-catchall-tcp"]
    clusters = []
    for c in vo.filter_chains:
        tp = tcp_proxy_pb2.TcpProxy()
        c.filters[-1].typed_config.Unpack(tp)
        clusters.append(tp.cluster)
    want = [c["filters"][-1]["typed_config"]["cluster"] for c in PP_LISTENERS["virtualOutbound"]["filter_chains"]]
    assert clusters == want == ["BlackHoleCluster", "PassthroughCluster"]
    vi = ours["virtualInbound"]
    assert [f.name for f in vi.listener_filters] == ["envoy.filters.listener.original_dst",
                                                     "envoy.filters.listener.tls_inspector",
                                                     "envoy.filters.listener.http_inspector"]
    want_lf = [f["name"].replace("envoy.listener.", "envoy.filters.listener.")
               for f in PP_LISTENERS["virtualInbound"]["listener_filters"]]
    assert [f.name for f in vi.listener_filters] == want_lf
    port_chains = [c for c in vi.filter_chains if c.filter_chain_match.destination_port.value == 9080]
    want_port = [c for c in PP_LISTENERS["virtualInbound"]["filter_chains"]
                 if c["filter_chain_match"].get("destination_port") == 9080]
    # PERMISSIVE HTTP port: an mTLS chain (ALPN "istio..." + DownstreamTlsContext) and a plaintext chain
    assert len(port_chains) == len(want_port) == 2
    assert [c.HasField("transport_socket") for c in port_chains] == \
        ["tls_context" in c or "transport_socket" in c for c in want_port] == [True, False]
    assert "istio" in port_chains[0].filter_chain_match.application_protocols
    assert want_port[0]["filter_chain_match"]["application_protocols"] == ["istio"]
    assert [f.name for f in port_chains[1].filters][-1] == HCM
    inbound = unpack_hcm(port_chains[1].filters[-1])
    assert inbound.route_config.name == "inbound|9080||"  # 1.3: inbound|9080|http|productpage...
    assert inbound.route_config.virtual_hosts[0].domains == ["*"]


def test_vhost_domains_match_the_dump(legacy: Dict[str, List[Any]]) -> None:
    (rc,) = legacy["routes"]
    want = PP_ROUTES["9080"]
    assert rc.name == want["name"] == "9080"
    want_vh = {vh["name"]: vh for vh in want["virtual_hosts"]}
    ours = [vh for vh in rc.virtual_hosts if vh.name != "allow_any"]
    assert [vh.name for vh in ours] == [f"{n}.default.svc.cluster.local:9080" for n in BOOKINFO]
    for vh in ours:
        # Istio 1.3 also wrote "<name>.<ns>.svc.cluster" (every suffix of the FQDN); since the
        # Kubernetes-specific alt-host expansion (generateAltVirtualHostsForKubernetesService)
        # it does not. Otherwise the same list, in the same order.
        short = vh.name.split(".")[0]
        expected = [d for d in want_vh[vh.name]["domains"] if not d.startswith(f"{short}.default.svc.cluster:")
                    and d != f"{short}.default.svc.cluster"]
        assert list(vh.domains) == expected
    assert [vh.name for vh in rc.virtual_hosts][-1] == want["virtual_hosts"][-1]["name"] == "allow_any"
    assert list(rc.virtual_hosts[-1].domains) == ["*"]
    assert rc.virtual_hosts[-1].routes[0].route.cluster == "PassthroughCluster"


def test_current_domains_ignore_port(current: Dict[str, List[Any]]) -> None:
    (rc,) = current["routes"]
    assert rc.ignore_port_in_host_matching
    vips = fixture_vips()
    vh = {v.name: v for v in rc.virtual_hosts}["reviews.default.svc.cluster.local:9080"]
    assert list(vh.domains) == ["reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local.",
                                "reviews", "reviews.default.svc", "reviews.default", vips["reviews"]]
    # another namespace: no bare short name
    kube = sidecar.build(bookinfo_mesh(), proxy_namespace="kube-system")
    vh = {v.name: v for v in kube["routes"][0].virtual_hosts}["reviews.default.svc.cluster.local:9080"]
    assert list(vh.domains) == ["reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local.",
                                "reviews.default", "reviews.default.svc", vips["reviews"]]


def test_default_route_and_retry_policy(legacy: Dict[str, List[Any]], current: Dict[str, List[Any]]) -> None:
    want_vh = {vh["name"]: vh for vh in PP_ROUTES["9080"]["virtual_hosts"]}
    for res, codes in ((legacy, [503]), (current, None)):
        (rc,) = res["routes"]
        for vh in rc.virtual_hosts[:-1]:
            (route,) = [js(r) for r in vh.routes]
            (want,) = copy.deepcopy(want_vh[vh.name]["routes"])
            want.pop("typed_per_filter_config")  # mixer (1.3)
            policy, want_policy = route["route"].pop("retry_policy"), want["route"].pop("retry_policy")
            assert route == want
            # resource-exhausted left istiod's default retry_on in 1.x; 503 left it in 1.24 (#52111)
            assert policy["retry_on"] == want_policy["retry_on"].replace("resource-exhausted,", "") == \
                "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            assert policy.get("retriable_status_codes") == (codes and want_policy["retriable_status_codes"])
            assert [p["name"] for p in policy["retry_host_predicate"]] == \
                [p["name"] for p in want_policy["retry_host_predicate"]]
            for key in ("num_retries", "host_selection_retry_max_attempts"):
                assert policy[key] == want_policy[key]


def test_cluster_names(legacy: Dict[str, List[Any]]) -> None:
    ours = [c.name for c in legacy["clusters"]]
    bookinfo = {n for n in PP_CLUSTERS if n.startswith("outbound|") and n.endswith(
        tuple(f"|{s}.default.svc.cluster.local" for s in BOOKINFO))}
    kube_dns = {n for n in PP_CLUSTERS if n.endswith("|kube-dns.kube-system.svc.cluster.local")}
    assert {n for n in ours if n.startswith("outbound|")} == bookinfo | kube_dns
    assert {"BlackHoleCluster", "PassthroughCluster"} <= set(PP_CLUSTERS)
    # the 1.2x dump (endpoint/configdump.json) names inbound clusters as current istiod does; the
    # inbound passthrough cluster has been one cluster (v4+v6 source addresses) since 1.2x
    newer = set(dump_items(load("endpoint/configdump.json"), "EndpointsConfigDump", "dynamic_endpoint_configs",
                           "endpoint_config"))
    assert "inbound|9080||" in newer and "inbound|9080||" in ours
    assert ours[-4:] == ["BlackHoleCluster", "PassthroughCluster", "inbound|9080||", "InboundPassthroughCluster"]
    assert {"InboundPassthroughClusterIpv4", "BlackHoleCluster", "PassthroughCluster"} <= newer


def test_transport_socket_matches_match_the_dump() -> None:
    """``http_config.json``'s subset cluster, rebuilt: its ``transport_socket_matches`` byte for byte."""
    (want,) = dump_items(load("http_config.json"), "ClustersConfigDump", "dynamic_active_clusters", "cluster").values()
    mesh = {"services": [{"name": "productpage", "namespace": "default", "vip": "10.96.0.9",
                          "ports": [{"port": 9080, "protocol": "http"}],
                          "endpoints": [{"ip": "10.244.0.9", "service_account": sa,
                                         "labels": {"app": "productpage", "version": "v1"}}
                                        for sa in ("bookinfo-productpage", "default")]}],
            "destination_rules": [{"name": "productpage", "namespace": "default", "host": "productpage",
                                   "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
                                   "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}]}
    ours = js(by_name(sidecar.build(mesh)["clusters"])[want["name"]])
    assert ours["transport_socket_matches"] == want["transport_socket_matches"]
    for key in ("name", "type", "eds_cluster_config", "connect_timeout", "lb_policy"):
        assert ours[key] == want[key], key
    # track_remaining: off by default since DISABLE_TRACK_REMAINING_CB_METRICS defaults to true
    want_th = {k: v for k, v in want["circuit_breakers"]["thresholds"][0].items() if k != "track_remaining"}
    assert ours["circuit_breakers"]["thresholds"] == [want_th]
    md, want_md = ours["metadata"]["filter_metadata"]["istio"], want["metadata"]["filter_metadata"]["istio"]
    assert (md["services"], md["subset"]) == (want_md["services"], want_md["subset"])
    # networking.istio.io/v1alpha3 -> v1 (the stored version of current istiod)
    assert md["config"] == want_md["config"].replace("/v1alpha3/", "/v1/")
    # the cluster mx filter: now a TypedStruct of the same type (+ enable_discovery)
    (mx,) = ours["filters"]
    (want_mx,) = want["filters"]
    assert mx["name"] == want_mx["name"] == "istio.metadata_exchange"
    assert mx["typed_config"]["type_url"] == want_mx["typed_config"]["@type"]
    assert mx["typed_config"]["value"]["protocol"] == want_mx["typed_config"]["protocol"]


def test_endpoint_metadata_matches_the_dump() -> None:
    (want,) = [e for name, e in dump_items(load("endpoint/configdump.json"), "EndpointsConfigDump",
                                           "dynamic_endpoint_configs", "endpoint_config").items()
               if name == "outbound|9080||reviews.default.svc.cluster.local"]
    eps = [{"ip": lb["endpoint"]["address"]["socket_address"]["address"], "workload": wl.split(";")[0],
            "labels": {"app": "reviews", "version": wl.split(";")[3], "security.istio.io/tlsMode": "istio"}}
           for lb in want["endpoints"][0]["lb_endpoints"]
           for wl in [lb["metadata"]["filter_metadata"]["istio"]["workload"]]]
    mesh = {"services": [{"name": "reviews", "namespace": "default", "vip": "10.96.0.20",
                          "ports": [{"port": 9080, "protocol": "http"}], "endpoints": eps}]}
    (cla,) = [c for c in sidecar.build(mesh)["endpoints"] if c.cluster_name == want["cluster_name"]]
    ours = js(cla)
    expected = copy.deepcopy(want)
    expected.pop("@type")
    expected.pop("policy")  # Envoy's rendering (default overprovisioning factor), not istiod's
    for lb in expected["endpoints"][0]["lb_endpoints"]:
        lb["endpoint"].pop("health_check_config")  # idem
    expected["endpoints"][0]["lb_endpoints"].sort(key=lambda e: e["endpoint"]["address"]["socket_address"]["address"])
    ours["endpoints"][0]["lb_endpoints"].sort(key=lambda e: e["endpoint"]["address"]["socket_address"]["address"])
    assert ours == expected


def test_tls_modes_and_destination_rule_settings() -> None:
    mesh = {"services": [{"name": "a", "namespace": "default", "vip": "10.96.0.1",
                          "ports": [{"port": 8080, "protocol": "grpc"}],
                          "endpoints": [{"ip": "10.0.0.1", "locality": "r1/z1",
                                         "labels": {"version": "v1", "security.istio.io/tlsMode": "istio"}},
                                        {"ip": "10.0.0.2", "locality": "r2/z1", "labels": {"version": "v2"}}]}],
            "destination_rules": [{"name": "a", "namespace": "default", "host": "a", "trafficPolicy": {
                "connectionPool": {"tcp": {"maxConnections": 7, "connectTimeout": "250ms"},
                                   "http": {"http1MaxPendingRequests": 8, "http2MaxRequests": 9, "maxRetries": 3}},
                "outlierDetection": {"consecutive5xxErrors": 5, "consecutiveGatewayErrors": 0, "interval": "10s",
                                     "baseEjectionTime": "30s", "maxEjectionPercent": 50}},
                "subsets": [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"tls": {"mode": "DISABLE"}}},
                            {"name": "v2", "labels": {"version": "v2"},
                             "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"},
                                               "loadBalancer": {"consistentHash": {"httpHeaderName": "x-u"}}}}]}],
            "proxy": {"locality": "r1/z1"}}
    res = sidecar.build(mesh)
    clusters = {n: js(c) for n, c in by_name(res["clusters"]).items()}
    base = clusters["outbound|8080||a.default.svc.cluster.local"]
    assert base["connect_timeout"] == "0.250s"
    assert base["circuit_breakers"]["thresholds"] == [{"max_connections": 7, "max_pending_requests": 8,
                                                      "max_requests": 9, "max_retries": 3}]
    assert base["outlier_detection"] == {"consecutive_5xx": 5, "interval": "10s", "base_ejection_time": "30s",
                                         "max_ejection_percent": 50, "enforcing_consecutive_5xx": 100,
                                         "enforcing_success_rate": 0, "consecutive_gateway_failure": 0,
                                         "enforcing_consecutive_gateway_failure": 0}
    assert base["common_lb_config"] == {"healthy_panic_threshold": {}}
    assert [m["name"] for m in base["transport_socket_matches"]] == ["tlsMode-istio", "tlsMode-disabled"]
    tls = base["transport_socket_matches"][0]["transport_socket"]["typed_config"]
    assert tls["common_tls_context"]["alpn_protocols"] == ["istio-peer-exchange", "istio", "h2"]
    assert base["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "explicit_http_config"] == {"http2_protocol_options": {}}
    v1, v2 = clusters["outbound|8080|v1|a.default.svc.cluster.local"], clusters["outbound|8080|v2|a.default.svc.cluster.local"]
    assert "transport_socket_matches" not in v1 and "transport_socket" not in v1
    assert v2["transport_socket"]["typed_config"]["sni"] == "outbound_.8080_.v2_.a.default.svc.cluster.local"
    assert "transport_socket_matches" not in v2
    assert v2["lb_policy"] == "RING_HASH" and v2["ring_hash_lb_config"] == {"minimum_ring_size": "1024"}
    assert v1["circuit_breakers"] == base["circuit_breakers"]  # inherited from the DR
    clas = {c.cluster_name: js(c) for c in res["endpoints"]}
    # outlier detection + the mesh's locality LB: the other region is priority 1
    (local, remote) = clas["outbound|8080||a.default.svc.cluster.local"]["endpoints"]
    assert (local.get("priority", 0), remote["priority"]) == (0, 1)
    assert local["lb_endpoints"][0]["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"tlsMode": "istio"}
    assert "envoy.transport_socket_match" not in remote["lb_endpoints"][0]["metadata"]["filter_metadata"]
    # subset v1 disables TLS: its endpoints lose the tlsMode metadata (mtls_checker.go)
    (v1_eps,) = clas["outbound|8080|v1|a.default.svc.cluster.local"]["endpoints"]
    assert "envoy.transport_socket_match" not in v1_eps["lb_endpoints"][0]["metadata"]["filter_metadata"]


def test_virtual_service_routes() -> None:
    mesh = {"services": [{"name": "r", "namespace": "default", "vip": "10.96.0.3",
                          "ports": [{"port": 9080, "protocol": "http"}],
                          "endpoints": [{"ip": "10.0.0.3", "labels": {"version": "v1"}}]}],
            "virtual_services": [{"name": "r", "namespace": "default", "hosts": ["r"], "http": [
                {"name": "a", "match": [{"uri": {"regex": "/api/v[0-9]+/.*"}, "headers": {"x-b": {"prefix": "p"},
                                                                                         "x-a": {"exact": "e"}}},
                                        {"uri": {"exact": "/login"}, "ignoreUriCase": True, "name": "m2"}],
                 "route": [{"destination": {"host": "r", "subset": "v1"}, "weight": 90},
                           {"destination": {"host": "r.default.svc.cluster.local"}, "weight": 10}],
                 "retries": {"attempts": 0}, "timeout": "3s",
                 "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 12.5}},
                           "abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 1}}}},
                {"name": "b", "route": [{"destination": {"host": "r"}}],
                 "retries": {"attempts": 4, "perTryTimeout": "1s", "retryOn": "gateway-error,503,connect-failure"}},
                {"name": "never", "route": [{"destination": {"host": "r"}}]}]}]}
    (rc,) = sidecar.build(mesh)["routes"]
    vh = js(rc.virtual_hosts[0])
    routes = vh["routes"]
    assert [r["name"] for r in routes] == ["a", "a.m2", "b"]  # nothing after a catch-all
    a = routes[0]
    assert a["match"] == {"safe_regex": {"regex": "/api/v[0-9]+/.*"}, "case_sensitive": True, "headers": [
        {"name": "x-a", "string_match": {"exact": "e"}}, {"name": "x-b", "string_match": {"prefix": "p"}}]}
    assert routes[1]["match"] == {"path": "/login", "case_sensitive": False}
    assert a["route"]["weighted_clusters"] == {"clusters": [
        {"name": "outbound|9080|v1|r.default.svc.cluster.local", "weight": 90},
        {"name": "outbound|9080||r.default.svc.cluster.local", "weight": 10}]}
    assert "retry_policy" not in a["route"]  # attempts: 0 disables retries
    assert (a["route"]["timeout"], a["route"]["max_grpc_timeout"]) == ("3s", "3s")
    assert a["decorator"]["operation"] == "r:9080/api/v[0-9]+/.*"
    assert a["metadata"]["filter_metadata"]["istio"]["config"] == \
        "/apis/networking.istio.io/v1/namespaces/default/virtual-service/r"
    fault = a["typed_per_filter_config"]["envoy.filters.http.fault"]
    assert fault["delay"] == {"fixed_delay": "1s", "percentage": {"numerator": 125000, "denominator": "MILLION"}}
    assert fault["abort"] == {"grpc_status": 14, "percentage": {"numerator": 10000, "denominator": "MILLION"}}
    b = routes[2]["route"]
    assert b["retry_policy"]["retry_on"] == "gateway-error,connect-failure,retriable-status-codes"
    assert b["retry_policy"]["retriable_status_codes"] == [503]
    assert (b["retry_policy"]["num_retries"], b["retry_policy"]["per_try_timeout"]) == (4, "1s")
    assert routes[2]["decorator"]["operation"] == "r.default.svc.cluster.local:9080/*"


def test_generated_is_deterministic_and_covers_the_features() -> None:
    a, b = sidecar.generated(300, seed=7), sidecar.generated(300, seed=7)
    assert a == b and a != sidecar.generated(300, seed=8)
    ra, rb = sidecar.build(a), sidecar.build(b)
    for key in ra:
        assert [m.SerializeToString(deterministic=True) for m in ra[key]] == \
            [m.SerializeToString(deterministic=True) for m in rb[key]]
    text = json.dumps(a)
    for feature in ("consistentHash", "outlierDetection", "connectionPool", "ISTIO_MUTUAL", "DISABLE", "SIMPLE",
                    "subsets", "retries", "perTryTimeout", "fault", "regex", "prefix", "exact", "weight",
                    "localityLbSetting", "grpc", "tcp", "http2", "security.istio.io/tlsMode"):
        assert feature in text, feature
    assert any(c.transport_socket_matches for c in ra["clusters"])
    assert any(l.name == "virtualInbound" and len(l.filter_chains) > 6 for l in ra["listeners"])


def test_scale_2000_services() -> None:
    start = time.perf_counter()
    desc = sidecar.generated(2000, seed=1)
    res = sidecar.build(desc)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"{elapsed:.1f}s"
    assert len(desc["services"]) == 2000
    assert len(res["clusters"]) > 2000 and len(res["endpoints"]) == len([c for c in res["clusters"] if c.type == c.EDS])


def test_unsupported_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="protocol 'udp'"):
        sidecar.build({"services": [{"name": "x", "vip": "10.0.0.1", "ports": [{"port": 1, "protocol": "udp"}]}]})
    with pytest.raises(ValueError, match="vip"):
        sidecar.build({"services": [{"name": "x", "ports": [{"port": 1}]}]})
    with pytest.raises(ValueError, match="rewrite"):
        sidecar.build({"services": [{"name": "x", "vip": "10.0.0.1", "ports": [{"port": 80}]}],
                       "virtual_services": [{"name": "x", "hosts": ["x"], "http": [
                           {"rewrite": {"uri": "/"}, "route": [{"destination": {"host": "x"}}]}]}]})


# -- Envoy 1.40 -----------------------------------------------------------------------------------


def small_mesh(outbound_port: int, inbound_port: int) -> Dict[str, Any]:
    """bookinfo-ish: every feature once (VS matches/weights/retries/fault, DR pools/outlier/LB/TLS
    modes, subsets, gRPC and TCP ports), the proxy an instance of productpage."""
    mesh = bookinfo_mesh()
    mesh["services"].append({"name": "grpc-echo", "namespace": "apps", "vip": "172.21.5.5",
                             "ports": [{"port": 7070, "protocol": "grpc"}, {"port": 7071, "protocol": "tcp"}],
                             "endpoints": [{"ip": "172.30.9.1", "locality": "us-east1/us-east1-b",
                                            "labels": {"app": "grpc-echo", "version": "v1",
                                                       "security.istio.io/tlsMode": "istio"}},
                                           {"ip": "172.30.9.2", "locality": "us-west1/us-west1-a",
                                            "labels": {"app": "grpc-echo", "version": "v2"}}]})
    mesh["virtual_services"] = [{"name": "reviews", "namespace": "default", "hosts": ["reviews"], "http": [
        {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}, "uri": {"prefix": "/reviews"}}],
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
         "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 10}}}},
        {"name": "split", "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 75},
                                    {"destination": {"host": "reviews", "subset": "v3"}, "weight": 25}],
         "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx,retriable-4xx"}, "timeout": "10s"}]}]
    for dr in mesh["destination_rules"]:
        if dr["name"] == "reviews":
            dr["trafficPolicy"] = {"connectionPool": {"tcp": {"maxConnections": 100},
                                                      "http": {"http1MaxPendingRequests": 10, "http2MaxRequests": 50,
                                                               "maxRetries": 2}},
                                   "outlierDetection": {"consecutive5xxErrors": 3, "interval": "5s",
                                                        "baseEjectionTime": "30s", "maxEjectionPercent": 50}}
        if dr["name"] == "ratings":
            dr["trafficPolicy"] = {"loadBalancer": {"consistentHash": {"httpCookie": {"name": "u", "ttl": "60s"}}},
                                   "tls": {"mode": "ISTIO_MUTUAL"}}
    mesh["destination_rules"].append({"name": "grpc-echo", "namespace": "apps", "host": "grpc-echo",
                                      "trafficPolicy": {"tls": {"mode": "SIMPLE"}, "loadBalancer": {
                                          "simple": "ROUND_ROBIN", "localityLbSetting": {
                                              "distribute": [{"from": "us-east1/*",
                                                              "to": {"us-east1/*": 70, "us-west1/*": 30}}]}}}})
    mesh["proxy"]["locality"] = "us-east1/us-east1-b"
    mesh["mesh"] = {"proxy_listen_port": outbound_port, "proxy_inbound_listen_port": inbound_port}
    return mesh


def _self_signed() -> Tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshcore-test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class FakeSds(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    """Istio's agent, as far as Envoy's SDS streams go: every requested name gets a secret
    (``ROOTCA`` and ``file-root:*`` a validation context, anything else a certificate)."""

    def __init__(self) -> None:
        self.cert, self.key = _self_signed()
        self.requested: List[str] = []
        self.nacks: List[str] = []

    def _secret(self, name: str) -> secret_pb2.Secret:
        if name == "ROOTCA" or name.startswith("file-root:"):
            return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
                trusted_ca={"inline_bytes": self.cert}))
        return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
            certificate_chain={"inline_bytes": self.cert}, private_key={"inline_bytes": self.key}))

    def StreamSecrets(self, request_iterator: Any, context: Any) -> Iterator[discovery_pb2.DiscoveryResponse]:
        nonce = 0
        for req in request_iterator:
            if req.error_detail.message:
                self.nacks.append(req.error_detail.message)
            if req.response_nonce:
                continue
            self.requested.extend(req.resource_names)
            nonce += 1
            resp = discovery_pb2.DiscoveryResponse(version_info="1", nonce=str(nonce), type_url=SECRET_TYPE)
            for name in req.resource_names:
                resp.resources.add().Pack(self._secret(name))
            yield resp


class SidecarEnvoy(EnvoyProcess):
    """A real Envoy with Istio's bootstrap essentials: ADS for LDS/CDS, an ``sds-grpc`` cluster."""

    def __init__(self, xds_port: int, sds_port: int) -> None:
        def static(name: str, port: int) -> Dict[str, Any]:
            return {"name": name, "type": "STATIC", "connect_timeout": "1s",
                    "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}}},
                    "load_assignment": {"cluster_name": name, "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}]}}

        self.bootstrap = {
            "node": {"id": f"sidecar~{PP_IP}~productpage-v1.default~default.svc.cluster.local",
                     "cluster": "productpage.default"},
            "admin": {"address": socket_address(0)},
            "dynamic_resources": {
                "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
                               "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "static_resources": {"clusters": [static("xds-grpc", xds_port), static("sds-grpc", sds_port)]},
        }
        self.envoy_bin = find_envoy()
        self.log_level = "warning"
        self.startup_timeout = 60.0
        self.keep_tmp = False
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-istio-sidecar-")
        cfg = os.path.join(self.tmpdir, "envoy.json")
        with open(cfg, "w") as f:
            json.dump(self.bootstrap, f)
        self._run_envoy(cfg)

    def close(self) -> None:
        self._stop(None)

    def get_json(self, path: str) -> Any:
        status, body = http_get(self.admin_url + path, timeout=10)
        assert status == 200, body[:500]
        return json.loads(body)


def _wait(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def _serve_and_check(resources: Dict[str, List[Any]]) -> None:
    sds = FakeSds()
    sds_server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(sds, sds_server)
    sds_port = sds_server.add_insecure_port("127.0.0.1:0")
    sds_server.start()
    try:
        with ControlPlane() as cp:
            cp.set_resources([m for key in ("listeners", "routes", "clusters", "endpoints") for m in resources[key]])
            with SidecarEnvoy(cp.port, sds_port) as envoy:
                expected = {key: set(by_name(resources[key])) for key in resources}

                def acked() -> Any:
                    history = cp.history
                    resp = {(e["type_url"], e["nonce"]) for e in history if e["dir"] == "resp"}
                    reqs = [e for e in history if e["dir"] == "req" and (e["type_url"], e["nonce"]) in resp]
                    nacks = [e["error_detail"] for e in reqs if e["error_detail"] is not None]
                    assert not nacks, f"Envoy NACKed: {nacks}"
                    got = {e["type_url"] for e in reqs}
                    return got >= set(TYPE_URLS.values())

                _wait(acked, "an ACK of every type")
                dump = envoy.get_json("/config_dump?include_eds")

                def names(suffix: str, key: str, inner: str) -> set:
                    return set(dump_items(dump, suffix, key, inner))

                listeners = names("ListenersConfigDump", "dynamic_listeners", "listener")
                assert listeners == expected["listeners"], listeners ^ expected["listeners"]
                warming = [x["name"] for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump")
                           for x in c.get("dynamic_listeners", []) if "active_state" not in x]
                assert not warming, f"listeners still warming: {warming}"
                assert names("RoutesConfigDump", "dynamic_route_configs", "route_config") == expected["routes"]
                assert names("ClustersConfigDump", "dynamic_active_clusters", "cluster") == expected["clusters"]
                eds = names("EndpointsConfigDump", "dynamic_endpoint_configs", "endpoint_config")
                assert expected["endpoints"] <= eds
                stats = {s["name"]: s.get("value") for s in envoy.get_json("/stats?format=json")["stats"]
                         if "name" in s}
                rejected = {k: v for k, v in stats.items() if k.endswith("update_rejected") and v}
                assert not rejected, rejected
                assert stats["listener_manager.lds.update_success"] >= 1
                assert stats["cluster_manager.cds.update_success"] >= 1
                for rds in expected["routes"]:
                    assert stats[f"http.outbound_0.0.0.0_{rds};.rds.{rds}.update_success"] >= 1
                assert not sds.nacks and {"default", "ROOTCA"} <= set(sds.requested)
    finally:
        sds_server.stop(0)


@pytest.mark.envoy
def test_envoy_acks_everything_over_ads() -> None:
    mesh = small_mesh(free_port("127.0.0.1"), free_port("127.0.0.1"))
    resources = sidecar.build(mesh, istio_proxy_extensions=False)
    _serve_and_check(resources)


@pytest.mark.envoy
def test_envoy_acks_a_generated_mesh_over_ads() -> None:
    mesh = sidecar.generated(60, seed=11)
    mesh["mesh"] = {"proxy_listen_port": free_port("127.0.0.1"), "proxy_inbound_listen_port": free_port("127.0.0.1")}
    _serve_and_check(sidecar.build(mesh, istio_proxy_extensions=False, domains_with_port=True))


def static_bootstrap(resources: Dict[str, List[Any]]) -> bootstrap_pb2.Bootstrap:
    """The resources as a static bootstrap: RDS replaced by the inline route configurations, EDS
    and SDS left pointing at an ADS server / ``sds-grpc`` cluster that validate mode never calls."""
    routes = by_name(resources["routes"])
    b = bootstrap_pb2.Bootstrap()
    b.node.id, b.node.cluster = "sidecar~10.0.0.1~p.default~default.svc.cluster.local", "p.default"
    for lis in resources["listeners"]:
        lis = copy.deepcopy(lis)
        chains = list(lis.filter_chains) + ([lis.default_filter_chain] if lis.HasField("default_filter_chain") else [])
        for chain in chains:
            for f in chain.filters:
                if f.name == HCM:
                    h = unpack_hcm(f)
                    if h.HasField("rds"):
                        h.route_config.CopyFrom(routes[h.rds.route_config_name])
                        f.typed_config.Pack(h)
        b.static_resources.listeners.append(lis)
    b.static_resources.clusters.extend(resources["clusters"])
    for name in ("xds-grpc", "sds-grpc"):
        c = b.static_resources.clusters.add(name=name, type=0)
        c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(
            json_format.ParseDict({"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                                   "explicit_http_config": {"http2_protocol_options": {}}},
                                  c.typed_extension_protocol_options["x"]))
        del c.typed_extension_protocol_options["x"]
        ep = c.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
        c.load_assignment.cluster_name, ep.address, ep.port_value = name, "127.0.0.1", 1
    ads = b.dynamic_resources.ads_config
    ads.api_type, ads.transport_api_version = ads.GRPC, 2
    ads.grpc_services.add().envoy_grpc.cluster_name = "xds-grpc"
    return b


def envoy_validate(b: bootstrap_pb2.Bootstrap) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="meshcore-istio-validate-") as tmp:
        path = os.path.join(tmp, "bootstrap.pb")  # binary: Istio's own filter types have no JSON form here
        with open(path, "wb") as f:
            f.write(b.SerializeToString())
        return subprocess.run([find_envoy(), "--mode", "validate", "-c", path, "-l", "error", "--use-dynamic-base-id"],
                              capture_output=True, text=True, timeout=120, cwd=tmp)


@pytest.mark.envoy
@pytest.mark.parametrize("n,seed,with_port", [(400, 1, False), (200, 2, True), (150, 3, False)])
def test_generated_meshes_validate_as_static_bootstrap(n: int, seed: int, with_port: bool) -> None:
    mesh = sidecar.generated(n, seed=seed)
    mesh["mesh"] = {"proxy_listen_port": 25001, "proxy_inbound_listen_port": 25006}
    result = envoy_validate(static_bootstrap(sidecar.build(mesh, istio_proxy_extensions=False,
                                                           domains_with_port=with_port)))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


@pytest.mark.envoy
def test_upstream_envoy_refuses_istio_only_filters() -> None:
    """The faithful shape needs Istio's Envoy build (istio/proxy): upstream Envoy does not know
    ``istio.metadata_exchange`` (nor ``istio.alpn``/``istio.stats``)."""
    mesh = small_mesh(25001, 25006)
    result = envoy_validate(static_bootstrap(sidecar.build(mesh)))
    assert result.returncode != 0
    assert "Didn't find a registered implementation for 'istio.metadata_exchange'" in result.stderr + result.stdout
    only_listeners = sidecar.build(mesh)
    only_listeners["clusters"] = sidecar.build(mesh, istio_proxy_extensions=False)["clusters"]
    result = envoy_validate(static_bootstrap(only_listeners))
    assert result.returncode != 0
    assert re.search(r"Didn't find a registered implementation for 'istio\.(metadata_exchange|stats|alpn)'",
                     result.stderr + result.stdout)

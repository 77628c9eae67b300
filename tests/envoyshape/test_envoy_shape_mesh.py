"""``Mesh(xds_shape="envoy")``: a sidecar's configuration (istiod's sidecar generator shape) served over
ADS, SotW and delta, resolved per target as the sidecar's outbound path would; the shape switch by
argument and environment; refusal of decision-changing filters meshcore does not implement; TCP
services; a sidecar-shaped resource file."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest
from google.protobuf import json_format

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.controlplane import istio_sidecar as sidecar
from meshcore.xds.model import CLUSTER, LISTENER

NODE_ID = "sidecar~10.0.0.9~client-0.default~default.svc.cluster.local"


def _desc(tcp_port: int = 5432, tcp_target: int = 5432) -> Dict[str, Any]:
    return {
        "services": [
            {"name": "reviews", "namespace": "default", "vip": "10.96.0.20",
             "ports": [{"port": 9080, "name": "http", "protocol": "http"}],
             "endpoints": [{"ip": "10.244.0.7", "labels": {"app": "reviews", "version": "v1"}},
                           {"ip": "10.244.0.8", "labels": {"app": "reviews", "version": "v2"}}]},
            {"name": "ratings", "namespace": "other", "vip": "10.96.0.21",
             "ports": [{"port": 9080, "name": "http", "protocol": "http"}],
             "endpoints": [{"ip": "10.244.1.7", "labels": {"app": "ratings"}}]},
            {"name": "db", "namespace": "default", "vip": "10.96.0.30",
             "ports": [{"port": tcp_port, "name": "tcp", "protocol": "tcp", "target_port": tcp_target}],
             "endpoints": [{"ip": "127.0.0.1"}]},
        ],
        "virtual_services": [{"name": "reviews", "namespace": "default", "hosts": ["reviews"], "http": [
            {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
             "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
            {"name": "default", "route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}],
        "destination_rules": [{"name": "reviews", "namespace": "default", "host": "reviews",
                               "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 3, "interval": "5s",
                                                                      "baseEjectionTime": "30s"}},
                               "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                           {"name": "v2", "labels": {"version": "v2"}}]}],
        "proxy": {"ip": "10.0.0.9", "labels": {"app": "client"}},
    }


def _all(res: Dict[str, List[Any]]) -> List[Any]:
    return [m for key in ("listeners", "routes", "clusters", "endpoints") for m in res[key]]


def _bootstrap(port: int, **node: Any) -> Dict[str, Any]:
    return {"xds_servers": [{"server_uri": f"127.0.0.1:{port}", "channel_creds": [{"type": "insecure"}]}],
            "node": {"id": NODE_ID, **node}}


@pytest.fixture(scope="module")
def tcp_upstream() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"db-hello")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield port
    srv.close()


@pytest.fixture(scope="module")
def plane(tcp_upstream: int) -> Iterator[ControlPlane]:
    with ControlPlane() as cp:
        cp.set_resources(_all(sidecar.build(_desc(tcp_target=tcp_upstream))))
        yield cp


@pytest.fixture(params=[False, True], ids=["sotw", "delta"])
def mesh(request: Any, plane: ControlPlane) -> Iterator[meshcore.Mesh]:
    m = meshcore.Mesh(_bootstrap(plane.port), xds_shape="envoy", delta=request.param).start()
    yield m
    m.close()


@pytest.mark.parametrize("host", ["reviews", "reviews.default", "reviews.default.svc",
                                  "reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local.",
                                  "10.96.0.20"])
def test_targets_resolve_through_the_outbound_listener(mesh: meshcore.Mesh, host: str) -> None:
    target = f"{host}:9080"
    p = mesh.pick(target, "/")
    assert p.cluster == "outbound|9080|v1|reviews.default.svc.cluster.local"
    p.done()
    p = mesh.pick(target, "/", headers={"end-user": "jason"})
    assert p.cluster == "outbound|9080|v2|reviews.default.svc.cluster.local" and p.endpoint.address == "10.244.0.8"
    p.done()
    cfg = mesh.config(target)
    assert cfg.listener.name == "0.0.0.0_9080" and cfg.listener.route_config_name == "9080"
    assert cfg.resolution.kind == "http"


def test_other_namespace_needs_its_namespace(mesh: meshcore.Mesh) -> None:
    assert mesh.pick("ratings.other:9080", "/").cluster == "outbound|9080||ratings.other.svc.cluster.local"
    # a short name expands in the client's own namespace (default): no such vhost there, so the
    # catch-all (allow_any) passthrough route matches, which meshcore cannot serve
    with pytest.raises(meshcore.Unavailable, match="PassthroughCluster"):
        mesh.pick("ratings:9080", "/")


def test_cluster_settings_come_from_cds(mesh: meshcore.Mesh) -> None:
    mesh.pick("reviews:9080", "/").done()
    rt = mesh.config("reviews:9080").clusters["outbound|9080|v1|reviews.default.svc.cluster.local"]
    od = rt.spec.outlier_detection
    assert od is not None and od.consecutive_5xx == 3 and od.base_ejection_time == 30.0
    assert rt.spec.transport_socket_matches  # Istio's auto-mTLS matches arrive in this shape


def test_unknown_port_is_a_passthrough_with_a_clear_error(mesh: meshcore.Mesh) -> None:
    with pytest.raises(meshcore.Unavailable, match="pass it through to the original destination"):
        mesh.pick("example.com:4444", "/")


def test_tcp_service(mesh: meshcore.Mesh) -> None:
    with pytest.raises(meshcore.Unavailable, match="is a TCP service"):
        mesh.pick("db:5432", "/")
    sock, pick = mesh.tcp_connect("db:5432")
    try:
        assert sock.recv(20) == b"db-hello"
        assert pick.cluster == "outbound|5432||db.default.svc.cluster.local" and pick.tls is None
    finally:
        sock.close()
        pick.done()
    assert mesh.stats()[pick.cluster]["upstream_cx_total"] == 1
    assert "db:5432" not in mesh.problems()
    with pytest.raises(meshcore.Unavailable, match="served by HTTP routes"):
        mesh.tcp_endpoint("reviews:9080")


def test_the_sidecar_node_is_presented(mesh: meshcore.Mesh, plane: ControlPlane) -> None:
    mesh.pick("reviews:9080", "/").done()
    node = mesh.bootstrap.node
    assert node.id == NODE_ID and "GENERATOR" not in node.metadata.fields
    stream = max(e["stream"] for e in plane.history)  # this mesh's stream (the last one opened)
    reqs = [e for e in plane.history if e["dir"] == "req" and e["stream"] == stream]
    first = {}
    for e in reqs:
        first.setdefault(e["type_url"], e)
    for t in (LISTENER, CLUSTER):  # wildcard: no names (SotW) or "*" (delta)
        e = first[t]
        assert (e["mode"] == "sotw" and e["names"] == []) or (e["mode"] == "delta" and e["subscribe"] == ["*"]), e
    node = [e["node"] for e in reqs if e["node"] is not None][0]
    assert "GENERATOR" not in json.dumps(node) and NODE_ID in json.dumps(node)


def test_generator_grpc_is_dropped(plane: ControlPlane) -> None:
    boot = _bootstrap(plane.port, metadata={"GENERATOR": "grpc", "NAMESPACE": "default"})
    with meshcore.Mesh(boot, xds_shape="envoy") as m:
        assert "GENERATOR" not in m.bootstrap.node.metadata.fields
        assert m.pick("reviews:9080", "/").cluster.startswith("outbound|9080|v1|")


def test_shape_from_the_environment(plane: ControlPlane, monkeypatch: Any) -> None:
    monkeypatch.setenv("MESHCORE_XDS_SHAPE", "envoy")
    with meshcore.Mesh(_bootstrap(plane.port)) as m:
        assert m.xds_shape == "envoy" and m.pick("reviews:9080", "/").cluster.startswith("outbound|9080|")
    monkeypatch.setenv("MESHCORE_XDS_SHAPE", "sidecar")
    with pytest.raises(ValueError, match="MESHCORE_XDS_SHAPE must be one of grpc, envoy"):
        meshcore.Mesh(_bootstrap(plane.port))
    with pytest.raises(ValueError, match="xds_shape must be one of"):
        meshcore.Mesh(_bootstrap(plane.port), xds_shape="istio")


def test_decision_changing_filter_refuses_the_target(tcp_upstream: int) -> None:
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

    res = sidecar.build(_desc(tcp_target=tcp_upstream))
    for lst in res["listeners"]:
        if lst.name != "0.0.0.0_9080":
            continue
        for chain in lst.filter_chains:
            for f in chain.filters:
                if f.typed_config.type_url.endswith("HttpConnectionManager"):
                    hcm = hcm_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(hcm)
                    authz = hcm.http_filters.add(name="envoy.filters.http.ext_authz")
                    authz.typed_config.Pack(ext_authz_pb2.ExtAuthz())
                    hcm.http_filters.insert(0, hcm.http_filters.pop())  # before the router
                    f.typed_config.Pack(hcm)
    with ControlPlane() as cp:
        cp.set_resources(_all(res))
        with meshcore.Mesh(_bootstrap(cp.port), xds_shape="envoy") as m:
            with pytest.raises(meshcore.Unavailable, match="ext_authz.*refusing traffic"):
                m.pick("reviews:9080", "/")
            assert any("refusing traffic" in r for r in m.problems()["reviews:9080"])
            sock, pick = m.tcp_connect("db:5432")  # other destinations are unaffected
            sock.close()
            pick.done()


def test_live_updates_reach_the_envoy_shape(tcp_upstream: int) -> None:
    desc = _desc(tcp_target=tcp_upstream)
    with ControlPlane() as cp:
        cp.set_resources(_all(sidecar.build(desc)))
        with meshcore.Mesh(_bootstrap(cp.port), xds_shape="envoy", delta=True) as m:
            assert m.pick("reviews:9080", "/").endpoint.address == "10.244.0.7"
            desc["services"][0]["endpoints"][0]["ip"] = "10.244.0.99"  # an endpoint change (EDS)
            cp.set_resources(_all(sidecar.build(desc)))
            deadline = time.monotonic() + 5
            while m.pick("reviews:9080", "/").endpoint.address != "10.244.0.99":
                assert time.monotonic() < deadline, "EDS change not applied"
                time.sleep(0.02)
            desc["virtual_services"][0]["http"][1]["route"][0]["destination"]["subset"] = "v2"  # RDS change
            cp.set_resources(_all(sidecar.build(desc)))
            while m.pick("reviews:9080", "/").cluster != "outbound|9080|v2|reviews.default.svc.cluster.local":
                assert time.monotonic() < deadline, "route change not applied"
                time.sleep(0.02)


def test_a_sidecar_shaped_resource_file(tmp_path: Any, tcp_upstream: int) -> None:
    res = sidecar.build(_desc(tcp_target=tcp_upstream), istio_proxy_extensions=False)
    doc = {key: [json_format.MessageToDict(m) for m in res[key]] for key in ("listeners", "routes", "clusters",
                                                                              "endpoints")}
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps(doc))
    with meshcore.Mesh.from_file(str(path), xds_shape="envoy") as m:
        assert m.pick("reviews.default.svc.cluster.local:9080", "/").cluster.startswith("outbound|9080|v1|")
        sock, pick = m.tcp_connect("db.default:5432")
        assert sock.recv(20) == b"db-hello"
        sock.close()
        pick.done()


def test_paths_are_normalized_as_the_sidecar_hcm_does(mesh: meshcore.Mesh) -> None:
    # Istio's sidecar HCM sets normalize_path: routes see (and the upstream gets) the canonical path
    cfg = mesh.config("reviews:9080") or (mesh.pick("reviews:9080", "/").done(), mesh.config("reviews:9080"))[1]
    assert cfg.resolution.hcm.normalize_path
    with mesh.request("http://reviews:9080/x/../a%70i/./v1?q=/../", headers={"end-user": "jason"}) as attempt:
        assert attempt.path == "/api/v1?q=/../"
        assert attempt.endpoint.address == "10.244.0.8"
    with mesh.request("http://reviews:9080/plain") as attempt:
        assert attempt.path == "/plain"


@pytest.mark.parametrize("path,canonical,merge,expected", [
    ("/a%70i", True, False, "/api"), ("/a/../b", True, False, "/b"), ("/a/./b/", True, False, "/a/b/"),
    ("/a/b/..", True, False, "/a/"), ("/../x", True, False, "/x"), ("//a//b", True, False, "//a//b"),
    ("//a//b", False, True, "/a/b"), ("/a/%2e%2e/x", True, False, "/x"), ("/a%2e%2e/x", True, False, "/a../x"),
    ("/a\\b", True, False, "/a/b"), ("/a b", True, False, "/a%20b"), ("/a%2Fb", True, False, "/a%2Fb"),
    ("/x?y=/../z", True, True, "/x?y=/../z"), ("/é", True, False, "/%C3%A9"),
])
def test_normalize_path(path: str, canonical: bool, merge: bool, expected: str) -> None:
    from meshcore.xds.envoy_shape import normalize_path

    assert normalize_path(path, canonical=canonical, merge_slashes=merge) == expected


def _inline_chain(vip: str, cluster: str) -> Dict[str, Any]:
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": f"outbound_{vip}", "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
           "route_config": {"name": f"inline-{cluster}", "virtual_hosts": [
               {"name": cluster, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]}}
    return {"filter_chain_match": {"prefix_ranges": [{"address_prefix": vip, "prefix_len": 32}]},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}


def test_two_chains_of_one_listener_keep_a_route_table_each(tmp_path: Any) -> None:
    # one listener, two filter chains (by destination VIP) with inline route configurations: each
    # chain's table is built once and kept across rebuilds (keyed by the listener's name alone,
    # each chain's build replaced the other's table)
    static = {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "type": "STATIC"}
    doc = {"listeners": [{"name": "0.0.0.0_7070", "address": {"socket_address": {"address": "0.0.0.0",
                                                                                  "port_value": 7070}},
                          "filter_chains": [_inline_chain("10.96.0.50", "a"), _inline_chain("10.96.0.51", "b")]}],
           "clusters": [dict(static, name=n, load_assignment={"cluster_name": n, "endpoints": [{"lb_endpoints": [
               {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}]}]})
               for n, p in (("a", 9101), ("b", 9102))]}
    path = tmp_path / "inline.json"
    path.write_text(json.dumps(doc))
    with meshcore.Mesh.from_file(str(path), xds_shape="envoy") as m:
        assert m.pick("10.96.0.50:7070", "/").cluster == "a"
        assert m.pick("10.96.0.51:7070", "/").cluster == "b"
        tables = dict(m._publisher._tables)
        inline = [k for k in tables if k.startswith("\0inline:0.0.0.0_7070")]
        assert len(inline) == 2, list(tables)
        m._publisher.add_target("10.96.0.52:7070")  # a rebuild of every target
        assert all(m._publisher._tables[k][1] is tables[k][1] for k in inline)  # not rebuilt

"""The Envoy shape and the gRPC shape decide alike where istiod's proxyless config carries the
information, and the Envoy shape keeps what the proxyless config drops.

For generated meshes (:func:`istio_sidecar.generated`, several seeds) one control plane serves what
istiod sends an Envoy sidecar (:func:`istio_sidecar.build`) to ``Mesh(xds_shape="envoy")`` and
another what istiod's grpc generator sends a proxyless client
(:func:`istio_grpcgen.build_grpc`) to ``Mesh()``, both over ADS (SotW). Targets are every HTTP
service port, spelled as an FQDN and, in the client's namespace, as ``name``, ``name.<ns>`` and
``name.<ns>.svc``; requests take their paths and headers from the VirtualServices' matches (and
miss them). For every request both meshes must agree on the virtual host, the route (name,
position, match, action, weighted clusters, timeout, retry policy, hash policies, fault override),
the cluster, the request hash and the endpoints behind the cluster; weighted routes split alike
(loosely: each shape within 0.1 of the configured weights over 400 picks).

Cluster settings: the gRPC shape carries ``max_requests`` (``http2MaxRequests``), consistent-hash
(RING_HASH / MAGLEV) and LEAST_REQUEST load balancing and ISTIO_MUTUAL TLS; grpcgen drops outlier
detection, the other circuit-breaker limits, connect timeouts, the LEAST_CONN / RANDOM / default
policies, locality weighting and auto-mTLS. The Envoy shape has them (the fidelity gain), checked
against the DestinationRule that applies to each cluster.

Other-namespace short names (``name.<ns>``): istiod's grpc generator expands short names in the
client's own namespace only, so it sends no listener for them; the Envoy shape resolves them as
the sidecar's resolver does, to the same route as the FQDN.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import pytest

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.controlplane import istio_sidecar as sidecar
from meshcore.controlplane.istio_grpcgen import build_grpc
from meshcore.xds.client import Backoff

SEEDS = [1, 2, 3, 4, 5, 6]
N_SERVICES = 60
N_NAMESPACES = 3
NS = "default"
DOMAIN = "cluster.local"
NODE_ID = f"sidecar~10.0.0.9~client-0.{NS}~{NS}.svc.{DOMAIN}"
PROVIDERS = {"default": {"plugin_name": "file_watcher", "config": {
    "certificate_file": "/nonexistent/cert-chain.pem", "private_key_file": "/nonexistent/key.pem",
    "ca_certificate_file": "/nonexistent/root-cert.pem"}}}
REGEX_SAMPLES = {"/api/v[0-9]+/.*": "/api/v2/items", "/users/[a-z]+": "/users/bob", "^(a|b)+$": "abba"}
WEIGHT_PICKS = 400
WEIGHT_TOLERANCE = 0.1
SOURCE_IP = "10.0.0.9"


def _all(res: Mapping[str, List[Any]]) -> List[Any]:
    return [m for key in ("listeners", "routes", "clusters", "endpoints") for m in res[key]]


def _bootstrap(port: int, grpc: bool) -> Dict[str, Any]:
    boot: Dict[str, Any] = {
        "xds_servers": [{"server_uri": f"127.0.0.1:{port}", "channel_creds": [{"type": "insecure"}]}],
        "node": {"id": NODE_ID, "metadata": {"NAMESPACE": NS, **({"GENERATOR": "grpc"} if grpc else {})}}}
    if grpc:
        boot["certificate_providers"] = PROVIDERS  # grpcgen's ISTIO_MUTUAL names instance "default"
    return boot


def _fqdn(svc: Mapping[str, Any]) -> str:
    return f"{svc['name']}.{svc['namespace']}.svc.{DOMAIN}"


def _resolve(host: str, ns: str) -> str:
    return host if "." in host else f"{host}.{ns}.svc.{DOMAIN}"


class World:
    """One generated mesh served in both shapes, with the targets and requests to compare."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.desc = sidecar.generated(N_SERVICES, seed=seed, n_namespaces=N_NAMESPACES)
        self.vs_by_host: Dict[str, Dict[str, Any]] = {}
        for vs in self.desc["virtual_services"]:
            for h in vs["hosts"]:
                self.vs_by_host[_resolve(h, vs["namespace"])] = vs
        self.dr_by_host: Dict[str, Dict[str, Any]] = {
            _resolve(dr["host"], dr["namespace"]): dr for dr in self.desc["destination_rules"]}
        #: target -> the FQDN target it stands for
        self.targets: Dict[str, str] = {}
        #: other-namespace short targets (Envoy shape only) -> FQDN target
        self.foreign: Dict[str, str] = {}
        for svc in self.desc["services"]:
            for p in svc["ports"]:
                if p["protocol"] == "tcp":
                    continue
                fq = f"{_fqdn(svc)}:{p['port']}"
                self.targets[fq] = fq
                name, ns = svc["name"], svc["namespace"]
                if ns == NS:
                    for short in (name, f"{name}.{ns}", f"{name}.{ns}.svc"):
                        self.targets[f"{short}:{p['port']}"] = fq
                else:
                    self.foreign[f"{name}.{ns}:{p['port']}"] = fq
        self.sidecar_res = sidecar.build(self.desc)
        self.grpc_res = build_grpc(self.desc, list(self.targets) + list(self.foreign))

    def requests(self, fqdn_target: str) -> List[Tuple[str, Dict[str, str]]]:
        """Paths x headers from the target's VirtualService matches (hits and misses)."""
        vs = self.vs_by_host.get(fqdn_target.rsplit(":", 1)[0])
        paths = ["/", "/nothing/here"]
        headers: List[Dict[str, str]] = [{}]
        for http in (vs or {}).get("http", []):
            for m in http.get("match") or []:
                uri = m.get("uri") or {}
                if "prefix" in uri:
                    paths += [uri["prefix"], uri["prefix"].rstrip("/") + "/x"]
                elif "exact" in uri:
                    paths += [uri["exact"], uri["exact"] + "x"]
                elif "regex" in uri:
                    paths.append(REGEX_SAMPLES[uri["regex"]])
                for name, sm in (m.get("headers") or {}).items():
                    value = (sm.get("exact") or (sm["prefix"] + "-1" if "prefix" in sm else None)
                             or REGEX_SAMPLES[sm["regex"]])
                    headers += [{name: value}, {name: "zzz"}]
        headers.append({"x-user": "u-42", "cookie": "session=s1"})
        out, seen = [], set()
        for path, hdrs in itertools.product(dict.fromkeys(paths), headers):
            key = (path, tuple(sorted(hdrs.items())))
            if key not in seen:
                seen.add(key)
                out.append((path, hdrs))
        return out

    def dr_policy(self, cluster: str) -> Dict[str, Any]:
        """The DestinationRule traffic policy for ``outbound|<port>|<subset>|<fqdn>`` (subset merged,
        as istiod merges it; no port-level settings in generated meshes)."""
        _, _, subset, fqdn = cluster.split("|")
        dr = self.dr_by_host.get(fqdn)
        if dr is None:
            return {}
        tp = dict(dr.get("trafficPolicy") or {})
        for s in dr.get("subsets") or []:
            if s["name"] == subset and s.get("trafficPolicy") is not None:
                for key in ("connectionPool", "outlierDetection", "loadBalancer", "tls"):
                    if key in s["trafficPolicy"]:
                        tp[key] = s["trafficPolicy"][key]
        return tp


@pytest.fixture(scope="module", params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def world(request: Any) -> Iterator[Tuple[World, meshcore.Mesh, meshcore.Mesh]]:
    w = World(request.param)
    with ControlPlane() as envoy_cp, ControlPlane() as grpc_cp:
        envoy_cp.set_resources(_all(w.sidecar_res))
        grpc_cp.set_resources(_all(w.grpc_res))
        backoff = Backoff(0.05, 1.6, 0.2, 0.5)
        envoy = meshcore.Mesh(_bootstrap(envoy_cp.port, grpc=False), xds_shape="envoy", seed=7, backoff=backoff)
        grpc = meshcore.Mesh(_bootstrap(grpc_cp.port, grpc=True), seed=7, backoff=backoff)
        try:
            envoy.start()
            grpc.start()
            for t in w.targets:
                envoy.watch(t)
                grpc.watch(t)
            for t in w.foreign:
                envoy.watch(t)
            for t in w.targets:
                envoy.wait_ready(t, timeout=20)
                grpc.wait_ready(t, timeout=20)
            for t in w.foreign:
                envoy.wait_ready(t, timeout=20)
            assert envoy.problems() == {} and grpc.problems() == {}  # nothing NACKed or missing
            yield w, envoy, grpc
        finally:
            envoy.close()
            grpc.close()


# -- decisions --------------------------------------------------------------------------------


def _route_key(spec: Any) -> Tuple[Any, ...]:
    """What a route decides with (its compiled regex object aside)."""
    return (spec.name, spec.index, spec.path_kind, spec.path_value, spec.case_sensitive, spec.headers, spec.query,
            spec.action, spec.cluster, spec.weighted, spec.weighted_total, spec.timeout, spec.retry_policy,
            spec.hash_policies, spec.filter_overrides, spec.cluster_not_found_response_code)


def _decide(mesh: meshcore.Mesh, target: str, path: str, headers: Dict[str, str]) -> Tuple[Any, ...]:
    """The decision ``mesh.pick`` makes, as a comparable tuple (weighted routes: the route, whose
    clusters and weights are compared; the draw is compared by :func:`test_weighted_routes_split_alike`)."""
    p: Optional[meshcore.Pick] = None
    try:
        p = mesh.pick(target, path, "GET", headers, source_ip=SOURCE_IP)
        m, cluster = p.route, p.cluster
    except meshcore.NoRoute:
        return ("no-route",)
    except meshcore.Unavailable as e:  # the chosen cluster has no endpoint (a subset no endpoint has the labels of)
        cfg = mesh.config(target)
        m = cfg.route_table.match(cfg.authority, path, headers, "GET", "http", None, SOURCE_IP)
        found = re.search(r"no healthy upstream in cluster '([^']+)'", str(e))
        assert m is not None and found is not None, str(e)
        cluster = found.group(1)
    try:
        endpoints = None
        if cluster is not None:
            rt = mesh.config(target).clusters[cluster]
            endpoints = frozenset((e.address, e.port, e.weight) for e in rt.lb.endpoints)
            if p is not None:
                assert (p.endpoint.address, p.endpoint.port) in {(a, b) for a, b, _ in endpoints}
            else:
                assert not endpoints
        weighted = m.route is not None and m.route.action == "weighted"
        return ("route", m.virtual_host, _route_key(m.route), None if weighted else cluster, m.timeout,
                m.retry_policy, m.hash, m.direct_response, None if weighted else endpoints)
    finally:
        if p is not None:
            p.done()


def test_same_routing_decisions(world: Tuple[World, meshcore.Mesh, meshcore.Mesh]) -> None:
    w, envoy, grpc = world
    compared = vs_routes = no_route = 0
    for target, fq in w.targets.items():
        for path, headers in w.requests(fq):
            got_envoy = _decide(envoy, target, path, headers)
            got_grpc = _decide(grpc, target, path, headers)
            assert got_envoy == got_grpc, (target, path, headers)
            compared += 1
            # a VirtualService without a catch-all route leaves some requests unrouted (404)
            no_route += got_envoy[0] == "no-route"
            vs_routes += got_envoy[0] == "route" and got_envoy[2][0] != "default"
    assert compared > 200 and vs_routes > 20 and no_route < compared // 2, (compared, vs_routes, no_route)


def test_other_namespace_short_names(world: Tuple[World, meshcore.Mesh, meshcore.Mesh]) -> None:
    w, envoy, _ = world
    grpc_listeners = {lis.name for lis in w.grpc_res["listeners"]}
    assert w.foreign and not grpc_listeners & set(w.foreign)  # tryFindFQDN: own namespace only
    assert set(w.targets) <= grpc_listeners
    for short, fq in w.foreign.items():
        for path, headers in w.requests(fq)[:6]:
            assert _decide(envoy, short, path, headers) == _decide(envoy, fq, path, headers)


def _weighted_split(mesh: meshcore.Mesh, target: str, path: str, headers: Dict[str, str],
                    names: List[str]) -> Dict[str, float]:
    counts: Dict[str, int] = {}
    for _ in range(WEIGHT_PICKS):
        try:
            p = mesh.pick(target, path, "GET", headers)
        except meshcore.Unavailable as e:  # the drawn subset has no endpoints: the text names it
            name = next(c for c in names if repr(c) in str(e))
        else:
            name = p.cluster
            p.done()
        counts[name] = counts.get(name, 0) + 1
    return {k: v / WEIGHT_PICKS for k, v in counts.items()}


def test_weighted_routes_split_alike(world: Tuple[World, meshcore.Mesh, meshcore.Mesh]) -> None:
    w, envoy, grpc = world
    done = set()
    for target, fq in w.targets.items():
        if target != fq:
            continue
        for path, headers in w.requests(fq):
            cfg = envoy.config(target)
            m = cfg.route_table.match(cfg.authority, path, headers, "GET", "http", None, None)
            if m is None:
                continue
            spec = m.route
            if spec.action != "weighted" or spec.name in done or spec.hash_policies:
                continue
            done.add(spec.name)
            want = {c.name: c.weight / spec.weighted_total for c in spec.weighted}
            split_envoy = _weighted_split(envoy, target, path, headers, list(want))
            split_grpc = _weighted_split(grpc, target, path, headers, list(want))
            for name, share in want.items():
                assert abs(split_envoy.get(name, 0.0) - share) <= WEIGHT_TOLERANCE, (target, spec.name, split_envoy)
                assert abs(split_grpc.get(name, 0.0) - share) <= WEIGHT_TOLERANCE, (target, spec.name, split_grpc)
            assert set(split_envoy) <= set(want) and set(split_grpc) <= set(want)
    if not done:
        pytest.skip(f"seed {w.seed}: no weighted route without a hash policy")


# -- cluster settings: what grpcgen carries and what it drops -------------------------------------------


_ENVOY_SIMPLE_LB = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST",
                    "RANDOM": "RANDOM"}


def _expected_lb(lb: Optional[Mapping[str, Any]]) -> Tuple[str, str]:
    """(Envoy shape, gRPC shape) load-balancing policy istiod writes for a DR ``loadBalancer``."""
    ch = (lb or {}).get("consistentHash")
    if ch:
        policy = "MAGLEV" if "maglev" in ch else "RING_HASH"
        return policy, policy
    simple = (lb or {}).get("simple", "")
    envoy = _ENVOY_SIMPLE_LB.get(simple, "LEAST_REQUEST")  # istiod's sidecar default: LEAST_REQUEST
    return envoy, "LEAST_REQUEST" if simple == "LEAST_REQUEST" else "ROUND_ROBIN"


def test_cluster_settings(world: Tuple[World, meshcore.Mesh, meshcore.Mesh]) -> None:
    w, envoy, grpc = world
    seen: Dict[str, str] = {}
    for target in w.targets:
        for name in grpc.config(target).clusters:
            seen.setdefault(name, target)
    counts = dict.fromkeys(("outlier", "pool", "max_requests", "istio_mutual", "auto_mtls", "locality"), 0)
    for name, target in seen.items():
        e = envoy._publisher.published[target].clusters[name].spec
        g = grpc._publisher.published[target].clusters[name].spec
        tp = w.dr_policy(name)
        assert (e.kind, g.kind) == ("EDS", "EDS") and e.eds_service_name == g.eds_service_name == name
        # carried: load balancing (where gRPC has it), max_requests, ISTIO_MUTUAL
        lb = tp.get("loadBalancer")
        assert (e.policy, g.policy) == _expected_lb(lb), (name, lb)
        max_req = ((tp.get("connectionPool") or {}).get("http") or {}).get("http2MaxRequests")
        if max_req:
            counts["max_requests"] += 1
            assert e.circuit_breakers.max_requests == g.circuit_breakers.max_requests == max_req
        mode = (tp.get("tls") or {}).get("mode")
        if mode == "ISTIO_MUTUAL":
            counts["istio_mutual"] += 1
            assert e.tls is not None and g.tls is not None and g.tls.identity is not None
        # dropped by grpcgen, kept by the Envoy shape
        assert g.outlier_detection is None
        if tp.get("outlierDetection"):
            counts["outlier"] += 1
            od = tp["outlierDetection"]
            assert e.outlier_detection is not None and e.outlier_detection.consecutive_5xx == od["consecutive5xxErrors"]
        else:
            assert e.outlier_detection is None
        tcp = (tp.get("connectionPool") or {}).get("tcp") or {}
        if tcp.get("maxConnections"):
            counts["pool"] += 1
            assert e.circuit_breakers.max_connections == tcp["maxConnections"]
            assert g.circuit_breakers.max_connections == 1024  # Envoy's default: grpcgen writes none
        if "connectTimeout" in tcp:
            assert e.connect_timeout == sidecar._seconds(tcp["connectTimeout"]) and g.connect_timeout == 5.0
        if mode is None:  # no DR TLS: the sidecar's auto-mTLS; the proxyless client sends plaintext
            counts["auto_mtls"] += 1
            assert e.transport_socket_matches and e.tls is None
            assert not g.transport_socket_matches and g.tls is None
        elif mode in ("SIMPLE",):
            assert e.tls is not None and g.tls is None
        locality = (lb or {}).get("localityLbSetting") or {}
        if locality.get("distribute") or (locality.get("failover") and tp.get("outlierDetection")):
            counts["locality"] += 1
            assert dict(e.lb_options).get("locality_weighted") is True
        assert not dict(g.lb_options).get("locality_weighted")
    assert counts["outlier"] and counts["auto_mtls"], counts


# -- the grpc generator's resources themselves --------------------------------------------------


def _small_mesh() -> Dict[str, Any]:
    def ep(ip: str, version: str) -> Dict[str, Any]:
        return {"ip": ip, "labels": {"app": "x", "version": version, "security.istio.io/tlsMode": "istio"},
                "service_account": "sa"}

    return {
        "services": [
            {"name": "reviews", "namespace": NS, "vip": "10.96.0.20",
             "ports": [{"port": 9080, "protocol": "http"}],
             "endpoints": [ep("10.244.0.7", "v1"), ep("10.244.0.8", "v2"), ep("10.244.0.9", "v3")]},
            {"name": "ratings", "namespace": "other", "vip": "10.96.0.21",
             "ports": [{"port": 9080, "protocol": "http"}], "endpoints": [ep("10.244.1.7", "v1")]},
            {"name": "db", "namespace": NS, "vip": "10.96.0.30", "ports": [{"port": 5432, "protocol": "tcp"}],
             "endpoints": [ep("10.244.2.7", "v1")]},
        ],
        "virtual_services": [{"name": "reviews", "namespace": NS, "hosts": ["reviews"], "http": [
            {"name": "split", "match": [{"uri": {"prefix": "/api"}}], "timeout": "3s",
             "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                       {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20}]},
            {"name": "rest", "route": [{"destination": {"host": "reviews", "subset": "v1"}}]}]}],
        "destination_rules": [
            {"name": "reviews", "namespace": NS, "host": "reviews", "trafficPolicy": {
                "loadBalancer": {"simple": "LEAST_CONN"}, "tls": {"mode": "ISTIO_MUTUAL"},
                "connectionPool": {"tcp": {"maxConnections": 7, "connectTimeout": "1s"},
                                   "http": {"http2MaxRequests": 100, "http1MaxPendingRequests": 5}},
                "outlierDetection": {"consecutive5xxErrors": 3, "interval": "5s", "baseEjectionTime": "30s"}},
             "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2", "v3")]},
            {"name": "ratings", "namespace": "other", "host": "ratings", "trafficPolicy": {
                "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user", "maglev": {"tableSize": 65537}}}}},
        ],
        "proxy": {"ip": "10.0.0.9", "labels": {"app": "client"}},
    }


def test_grpcgen_resources() -> None:
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    reviews, ratings = f"reviews.{NS}.svc.{DOMAIN}", f"ratings.other.svc.{DOMAIN}"
    res = build_grpc(_small_mesh(), ["reviews:9080", "ratings.other:9080", f"{ratings}:9080", "reviews:1234"])
    # LDS: as requested (the other namespace's short name and the unknown port get nothing)
    assert [lis.name for lis in res["listeners"]] == [f"{ratings}:9080", "reviews:9080"]
    lis = res["listeners"][1]
    assert (lis.address.socket_address.address, lis.address.socket_address.port_value) == ("10.96.0.20", 9080)
    hcm = hcm_pb2.HttpConnectionManager()
    assert lis.api_listener.api_listener.Unpack(hcm)
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
    assert hcm.rds.route_config_name == f"outbound|9080||{reviews}" and hcm.rds.config_source.HasField("ads")
    # RDS: one virtual host, domains with ports, no catch-all; VirtualService routes' max_stream_duration
    rds = {rc.name: rc for rc in res["routes"]}
    assert set(rds) == {f"outbound|9080||{reviews}", f"outbound|9080||{ratings}"}
    rc = rds[f"outbound|9080||{reviews}"]
    assert [vh.name for vh in rc.virtual_hosts] == [f"{reviews}:9080"]
    assert {"reviews", "reviews:9080", f"{reviews}.", f"{reviews}:9080", "10.96.0.20:9080"} <= set(rc.virtual_hosts[0].domains)
    assert not rc.HasField("validate_clusters") and not rc.ignore_port_in_host_matching
    split = rc.virtual_hosts[0].routes[0]
    assert split.route.max_stream_duration.max_stream_duration.seconds == 3 and not split.route.HasField("max_grpc_timeout")
    assert rds[f"outbound|9080||{ratings}"].virtual_hosts[0].routes[0].route.HasField("max_grpc_timeout")  # default
    # CDS: the clusters the routes name, reduced
    clusters = {c.name: c for c in res["clusters"]}
    assert list(clusters) == [f"outbound|9080||{ratings}", f"outbound|9080|v1|{reviews}", f"outbound|9080|v2|{reviews}"]
    v1 = clusters[f"outbound|9080|v1|{reviews}"]
    assert v1.type == v1.EDS and v1.eds_cluster_config.service_name == v1.name and v1.alt_stat_name == v1.name + ";"
    assert v1.lb_policy == v1.ROUND_ROBIN  # LEAST_CONN: istiod only warns
    assert not v1.HasField("outlier_detection") and not v1.HasField("connect_timeout")
    assert not v1.transport_socket_matches and not v1.typed_extension_protocol_options
    (th,) = v1.circuit_breakers.thresholds
    assert th.max_requests.value == 100 and not th.HasField("max_connections") and not th.HasField("max_pending_requests")
    assert v1.transport_socket.name == "envoy.transport_sockets.tls"
    ctx = tls_pb2.UpstreamTlsContext()
    assert v1.transport_socket.typed_config.Unpack(ctx)
    common = ctx.common_tls_context
    assert common.tls_certificate_provider_instance.instance_name == "default"
    assert common.tls_certificate_certificate_provider_instance.certificate_name == "default"
    cvc = common.combined_validation_context
    assert cvc.validation_context_certificate_provider_instance.certificate_name == "ROOTCA"
    assert cvc.default_validation_context.ca_certificate_provider_instance.certificate_name == "ROOTCA"
    assert [m.exact for m in cvc.default_validation_context.match_subject_alt_names] == [
        f"spiffe://{DOMAIN}/ns/{NS}/sa/sa"]
    assert not ctx.sni and not common.alpn_protocols
    mag = clusters[f"outbound|9080||{ratings}"]
    assert mag.lb_policy == mag.MAGLEV and mag.maglev_lb_config.table_size.value == 65537
    assert not mag.HasField("transport_socket")  # no DR TLS: no auto-mTLS for proxyless clients
    # EDS: the sidecar's assignments of those clusters
    assert [c.cluster_name for c in res["endpoints"]] == list(clusters)
    eps = [lb.endpoint.address.socket_address.address for loc in res["endpoints"][1].endpoints
           for lb in loc.lb_endpoints]
    assert eps == ["10.244.0.7"]
    # a wildcard LDS request: every service port, named by FQDN
    assert [lis.name for lis in build_grpc(_small_mesh(), [])["listeners"]] == [
        f"db.{NS}.svc.{DOMAIN}:5432", f"{ratings}:9080", f"{reviews}:9080"]

"""The whole xDS path, differential: a real Envoy and a meshcore ``Mesh`` fed the same generated
RouteConfiguration, Clusters and ClusterLoadAssignments over ADS by two reference control planes
(Envoy gets a socket listener, the mesh an API listener; everything else is byte-identical).

For each request, Envoy's decision is read from response headers it adds (``%ROUTE_NAME%``,
``%UPSTREAM_CLUSTER_RAW%``, ``%UPSTREAM_HOST%``, shared/docs/peers.md section 7) and compared with
``Mesh.pick``: same route, same cluster, and, where Envoy is deterministic (ring hash and Maglev
with a header hash policy), the same endpoint. Configs vary routes (prefix, exact, regex, header
matches), policies, weights, priorities and health (unhealthy, degraded, draining) per seed.
"""

from __future__ import annotations

import random
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.xds.client import Backoff
from meshcore.xds.model import CLUSTER, ENDPOINT, ROUTE
from meshcore.xds.resource_file import parse_resources

from .test_envoy_interop import AdsEnvoy, _until, _Upstream

pytestmark = pytest.mark.envoy

TARGET = "shop.mesh.local:80"
SEEDS = range(6)
REQUESTS_PER_SEED = 40
HEALTH = ["HEALTHY", "HEALTHY", "HEALTHY", "UNKNOWN", "UNHEALTHY", "DEGRADED", "DRAINING"]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[List[_Upstream]]:
    ups = [_Upstream(f"u{i}") for i in range(10)]
    yield ups
    for u in ups:
        u.close()


def generate(seed: int, ports: List[int]) -> Tuple[Dict[str, List[Any]], List[Dict[str, Any]]]:
    """Routes, clusters and assignments for one seed, and the requests to send."""
    rng = random.Random(seed)
    clusters, assignments = [], []
    for ci, policy in enumerate(("RING_HASH", "MAGLEV", rng.choice(["RING_HASH", "MAGLEV"]))):
        name = f"c{ci}"
        clusters.append({"name": name, "type": "EDS", "connect_timeout": "1s", "lb_policy": policy,
                         "eds_cluster_config": {"eds_config": {"ads": {}}}})
        chosen = rng.sample(ports, rng.randint(2, 6))
        lles: Dict[int, List[Any]] = {}
        for k, port in enumerate(chosen):
            prio = 0 if k < 2 else rng.choice([0, 0, 1])
            health = "HEALTHY" if k == 0 else rng.choice(HEALTH)
            lles.setdefault(prio, []).append({
                "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}},
                "health_status": health, "load_balancing_weight": rng.randint(1, 5)})
        assignments.append({"cluster_name": name, "endpoints": [
            {"locality": {"zone": f"z{p}"}, "load_balancing_weight": 1, "priority": p, "lb_endpoints": eps}
            for p, eps in sorted(lles.items())]})
    hash_policy = [{"header": {"header_name": "x-user"}}]
    matchers: List[Dict[str, Any]] = [
        {"prefix": "/api/"}, {"path": "/exact"}, {"safe_regex": {"regex": "^/item/[0-9]+$"}},
        {"prefix": "/", "headers": [{"name": "x-canary", "string_match": {"exact": "1"}}]},
        {"prefix": "/static", "case_sensitive": False},
    ]
    rng.shuffle(matchers)
    routes = [{"name": f"r{i}", "match": m, "route": {"cluster": rng.choice(["c0", "c1", "c2"]),
                                                      "hash_policy": hash_policy}}
              for i, m in enumerate(matchers[:rng.randint(2, 5)])]
    routes.append({"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "c0", "hash_policy": hash_policy}})
    vhost_headers = [{"header": {"key": k, "value": v}} for k, v in (
        ("x-route-name", "%ROUTE_NAME%"), ("x-upstream-cluster-raw", "%UPSTREAM_CLUSTER_RAW%"),
        ("x-upstream-host", "%UPSTREAM_HOST%"))]
    resources = {
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "shop", "domains": ["*"], "routes": routes,
                                                          "response_headers_to_add": vhost_headers}]}],
        "clusters": clusters, "endpoints": assignments,
    }
    paths = ["/", "/api/x", "/exact", "/exact/", "/item/42", "/item/x", "/STATIC/a.css", "/static", "/other"]
    reqs = []
    for _ in range(REQUESTS_PER_SEED):
        headers = {"x-user": f"user-{rng.randint(0, 10_000)}"}
        if rng.random() < 0.3:
            headers["x-canary"] = "1"
        reqs.append({"path": rng.choice(paths), "headers": headers})
    return resources, reqs


def test_mesh_decides_like_envoy_over_ads(upstreams: List[_Upstream]) -> None:
    ports = [u.port for u in upstreams]
    with ControlPlane() as cp_envoy, ControlPlane() as cp_mesh:
        # a route configuration from the start, or Envoy waits out its 15 s initial fetch timeout
        placeholder = b.route_config("routes", [b.virtual_host("shop", ["*"], [b.route(prefix="/", direct=(200, "-"))])])
        cp_envoy.set_resources([b.http_listener("ingress", 0, route_config_name="routes", stat_prefix="ingress"),
                                placeholder])
        cp_mesh.set_resources([b.api_listener(TARGET, route_config_name="routes")])
        boot = {"xds_servers": [{"server_uri": cp_mesh.address, "channel_creds": [{"type": "insecure"}]}],
                "node": {"id": "mesh-vs-envoy"}}
        with AdsEnvoy(cp_envoy.port, "GRPC", "envoy-vs-mesh") as envoy, \
                meshcore.Mesh(boot, backoff=Backoff(0.05, 1.6, 0.2, 0.5)) as mesh:
            port = _until(lambda: envoy.listener_port("ingress"), "the listener", envoy, cp_envoy)
            compared = 0
            for seed in SEEDS:
                resources, reqs = generate(seed, ports)
                parsed = parse_resources(resources)
                mark = len(cp_envoy.history)
                for plane in (cp_envoy, cp_mesh):
                    listener = plane.resources("type.googleapis.com/envoy.config.listener.v3.Listener")
                    plane.set_resources([*listener.values(), *parsed[ROUTE].values(), *parsed[CLUSTER].values(),
                                         *parsed[ENDPOINT].values()])
                time.sleep(0.3)
                for resp in [e for e in cp_envoy.history[mark:] if e["dir"] == "resp"]:
                    ack = cp_envoy.wait_for(lambda e, r=resp: e["dir"] == "req" and e["nonce"] == r["nonce"]
                                            and e["type_url"] == r["type_url"], timeout=10, start=mark)
                    assert ack["error_detail"] is None, ack
                time.sleep(0.3)  # Envoy applies a cluster's endpoints after warming
                mesh.wait_ready(TARGET, timeout=10)
                _until(lambda: mesh.config(TARGET).route_table.spec == _spec(parsed), "the mesh routes", envoy, cp_mesh)
                for req in reqs:
                    status, _, hdrs = _get_with_headers(port, req["path"], req["headers"])
                    try:
                        p = mesh.pick(TARGET, req["path"], headers=req["headers"])
                    except meshcore.MeshError as e:
                        ours: Tuple[Any, ...] = ("error", type(e).__name__)
                    else:
                        ours = (p.route_name, p.cluster, p.endpoint.key)
                        p.done()
                    theirs = (hdrs.get("x-route-name"), hdrs.get("x-upstream-cluster-raw"), hdrs.get("x-upstream-host"))
                    where = f"seed {seed} {req}: envoy {status} {theirs} meshcore {ours}"
                    if status == 404:
                        assert ours[0] == "error", where
                        continue
                    assert status == 200, where
                    assert ours == theirs, where
                    compared += 1
            assert compared >= len(SEEDS) * REQUESTS_PER_SEED * 0.7


def _spec(parsed: Dict[str, Any]) -> Any:
    from meshcore.xds.route_config import route_config_spec

    return route_config_spec(parsed[ROUTE]["routes"])


def _get_with_headers(port: int, path: str, headers: Dict[str, str]) -> Tuple[int, str, Dict[str, str]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), {k.lower(): v for k, v in exc.headers.items()}


"""The Envoy shape against a real Envoy 1.40: the same istiod sidecar resources over ADS to an Envoy
with a sidecar bootstrap and to ``meshcore.Mesh(xds_shape="envoy")`` with the same sidecar node,
then the same requests to both, answered by real loopback upstreams that name themselves.

The world (``oracle_env.py``): a seeded mesh description (services on two shared HTTP ports, one
``reviews`` in ``default`` and one in ``other``; VirtualServices with header exact/prefix/regex and
uri prefix/exact/regex matches, weighted splits, retries, timeouts, 100 % fault aborts, routes
without a catch-all; DestinationRules with subsets (one sometimes empty), ROUND_ROBIN /
LEAST_REQUEST / RANDOM / consistent hash on ``x-user`` with ring hash or maglev, outlier
detection and connection pools), every endpoint its own 127.0.0.x address. A request to Envoy goes
to its outbound listener ``0.0.0.0_<port>`` at ``127.0.0.1:<port>`` with the Host header under
test; Envoy's access log says the route, cluster, upstream host and response flags; the upstream's
answer says which endpoint served it and what ``x-envoy-expected-rq-timeout-ms`` Envoy sent. The
same request to meshcore is ``mesh.request(f"http://{Host}{path}", target=f"{host}:{port}")``
run against the same upstreams (and ``mesh.pick`` for the same target).

Compared request by request: the outcome (upstream answer / 404 no route / fault abort status /
502 ``block_all`` direct response / 503 no healthy upstream), the route name, the cluster (for
weighted routes: both in the route's clusters), the endpoint's service and cluster membership, the
exact endpoint for consistent-hash routes with the hash header, the route timeout Envoy announces.
Three worlds (``SEEDS``) x ``N_REQUESTS`` generated requests, plus hand-made ones reaching every
outcome. Distributions (weighted splits, round robin, random, least request) loosely over 200
requests per request shape. Resilience (meshcore through the httpx integration): outlier ejection
of an always-503 endpoint and of a resetting endpoint under a retrying route; circuit breaking with
a connection pool of one and concurrent requests, also when ``http2MaxRequests`` binds
(:func:`test_max_requests_leaves_room_for_a_pending_request`). TCP:
``Mesh.tcp_connect`` against Envoy's ``<vip>_<port>`` tcp_proxy listener (the TCP service's VIP
is a loopback address Envoy binds).

``test_routing_matches_envoy_long`` (marked ``soak``; short by default, as CI runs it) compares
MESHCORE_SOAK_EXAMPLES more worlds (default 2) x MESHCORE_SOAK_REQUESTS requests (default 600).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import pytest
from envoy.service.secret.v3 import sds_pb2_grpc

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.controlplane import istio_sidecar as sidecar

from .oracle_env import (
    NODE_ID,
    EnvoyClient,
    OracleEnvoy,
    World,
    bind_world,
    envoy_acked_everything,
    envoy_listening,
    envoy_resources,
    make_world,
    mesh_sender,
    one_shot,
    read_tcp,
    wait_for,
)
from .test_istio_sidecar_builder import FakeSds

pytestmark = pytest.mark.envoy

SEEDS = [11, 12, 13]
N_REQUESTS = 500  # per seed
KINDS = ("listeners", "routes", "clusters", "endpoints")


def _all(res: Dict[str, List[Any]]) -> List[Any]:
    return [m for key in KINDS for m in res[key]]


# -------------------------------------------------------------------------------------------------
# the harness: one world, one Envoy, one Mesh
# -------------------------------------------------------------------------------------------------


def close_all(upstreams: Sequence[Any]) -> None:
    """Stop the upstreams concurrently (each ``shutdown`` waits for its server's poll loop)."""
    threads = [threading.Thread(target=u.close) for u in upstreams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Harness:
    """A world's upstreams, its resources on two control planes (Envoy's copy and meshcore's
    pristine one), the Envoy, the Mesh, and what the resources say (for the assertions)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.stack = contextlib.ExitStack()
        try:
            self._start()
        except BaseException:
            self.stack.close()
            raise

    def _start(self) -> None:
        self.world: World = make_world(self.seed)
        self.stack.callback(close_all, bind_world(self.world))
        self.resources = sidecar.build(self.world.desc, istio_proxy_extensions=False)
        self._index()
        sds = FakeSds()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(sds, server)
        sds_port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.stack.callback(server.stop, 0)
        cp_envoy = self.stack.enter_context(ControlPlane())
        cp_mesh = self.stack.enter_context(ControlPlane())
        self.envoy = OracleEnvoy(cp_envoy.port, sds_port)
        self.stack.callback(self.envoy.close)
        cp_envoy.set_resources(_all(envoy_resources(self.resources, self.envoy.access_log)))
        cp_mesh.set_resources(_all(self.resources))
        self.envoy.start()
        tcp = self.world.svc("tcpdb")
        addresses = [("127.0.0.1", p) for p in self.world.http_ports] + [(tcp.vip, self.world.tcp_port)]
        try:
            wait_for(lambda: envoy_acked_everything(cp_envoy), "Envoy to ACK every resource type")
            wait_for(lambda: envoy_listening(self.envoy, addresses), f"Envoy's outbound listeners {addresses}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nEnvoy's log:\n{self.envoy.envoy_log()[-3000:]}") from None
        self.client = EnvoyClient()
        self.stack.callback(self.client.close)
        boot = {"xds_servers": [{"server_uri": f"127.0.0.1:{cp_mesh.port}", "channel_creds": [{"type": "insecure"}]}],
                "node": {"id": NODE_ID, "metadata": {"NAMESPACE": "default"}}}
        self.mesh = self.stack.enter_context(meshcore.Mesh(boot, xds_shape="envoy"))
        self._ids = 0

    def _index(self) -> None:
        #: cluster -> endpoint ips (EDS), lb policy name (CDS)
        self.members: Dict[str, set] = {}
        for cla in self.resources["endpoints"]:
            self.members[cla.cluster_name] = {lb.endpoint.address.socket_address.address
                                              for loc in cla.endpoints for lb in loc.lb_endpoints}
        self.lb_policy: Dict[str, str] = {}
        for c in self.resources["clusters"]:
            self.lb_policy[c.name] = c.LbPolicy.Name(c.lb_policy)
        #: (rds, vhost, route) -> (clusters, weighted)
        self.routes: Dict[Tuple[str, str, str], Tuple[Tuple[str, ...], bool]] = {}
        #: routes with a fault (abort) configuration
        self.faulted: set = set()
        for rc in self.resources["routes"]:
            for vh in rc.virtual_hosts:
                for r in vh.routes:
                    if "envoy.filters.http.fault" in r.typed_per_filter_config:
                        self.faulted.add((rc.name, vh.name, r.name))
                    if r.route.HasField("weighted_clusters"):
                        names = tuple(c.name for c in r.route.weighted_clusters.clusters)
                        self.routes[(rc.name, vh.name, r.name)] = (names, True)
                    else:
                        self.routes[(rc.name, vh.name, r.name)] = ((r.route.cluster,), False)

    def next_id(self) -> str:
        self._ids += 1
        return f"{self.seed}-{self._ids}"

    def close(self) -> None:
        self.stack.close()


@pytest.fixture(scope="module")
def harnesses() -> Iterator[Dict[int, Harness]]:
    made: Dict[int, Harness] = {}
    yield made
    for h in made.values():
        h.close()


def harness_for(harnesses: Dict[int, Harness], seed: int) -> Harness:
    if seed not in harnesses:
        harnesses[seed] = Harness(seed)
    return harnesses[seed]


@pytest.fixture(scope="module")
def h(harnesses: Dict[int, Harness]) -> Harness:
    return harness_for(harnesses, SEEDS[0])


# -------------------------------------------------------------------------------------------------
# requests and outcomes
# -------------------------------------------------------------------------------------------------


@dataclass
class Req:
    port: int  # the outbound listener (service port) the application connects to
    host: str  # the Host header, as sent
    path: str
    method: str = "GET"
    headers: Tuple[Tuple[str, str], ...] = ()

    @property
    def target(self) -> str:
        """meshcore's target: the Host's host part and the listener's port."""
        host = self.host
        if host.endswith("]") or ":" not in host:
            return f"{host}:{self.port}"
        return f"{host.rsplit(':', 1)[0]}:{self.port}"

    def describe(self) -> str:
        return f"{self.method} {self.path} Host={self.host!r} port={self.port} headers={list(self.headers)}"


@dataclass
class Outcome:
    kind: str  # upstream | no_route | fault | direct | no_healthy | overflow | other
    status: int
    route: Optional[str] = None
    cluster: Optional[str] = None
    endpoint_ip: Optional[str] = None
    served_by: Optional[str] = None
    expected_timeout_ms: Optional[int] = None
    vhost: Optional[str] = None
    hashed: bool = False
    detail: str = ""


PATHS = ["/", "/api", "/api/v1/items", "/API/v2/x", "/api/v12/users/7", "/apix", "/v1/", "/v1/users", "/V1/x",
         "/static/app.js", "/static", "/login", "/LOGIN", "/Login", "/health", "/healthz", "/users/bob",
         "/users/Bob", "/users/", "/api/v1/x?q=1&b=2", "/login?next=/", "/other/path",
         # normalize_path (Istio's HCM): dot segments, percent-encoded unreserved characters
         "/static/../login", "/api/./v1/items", "/a/../health", "/%61pi/v1/x", "/users/b%6Fb", "/login/.",
         "/api//v1/x", "/api%2Fv1/x"]
HEADER_VALUES = ["jason", "Jason", "jason2", "test", "test-1", "tester", "ab", "abba", "abc", "b", "yes", "Yes",
                 "v1", "v22", "vx", "v", ""]


def gen_requests(world: World, rng: random.Random, n: int) -> List[Req]:
    routing = [s for s in world.services if not s.special]
    out = []
    for _ in range(n):
        r = rng.random()
        svc = rng.choice(routing)
        port = rng.choice(svc.ports)
        if r < 0.05:
            host = rng.choice(["nosuch", "nosuch.default.svc.cluster.local", "10.1.2.3", "example.com"])
        else:
            host = rng.choice(svc.host_variants())
            if r < 0.12:  # a port this service does not have: another service's vhosts, or block_all
                others = [p for p in world.http_ports if p not in svc.ports]
                if others:
                    port = others[0]
            if rng.random() < 0.1:
                host = host.upper() if rng.random() < 0.5 else host.capitalize()
        k = rng.random()
        if k < 0.45:
            host = f"{host}:{port}"
        elif k < 0.5:
            host = f"{host}:{rng.choice([80, 1234, world.http_ports[-1]])}"  # Istio's domains ignore the port
        headers = [("x-oracle-side", "X")]
        for name in ("end-user", "x-canary"):
            if rng.random() < 0.55:
                headers.append((name, rng.choice(HEADER_VALUES)))
        if rng.random() < 0.8:
            headers.append(("x-user", f"user-{rng.randint(0, 40)}"))
        method = "POST" if rng.random() < 0.05 else "GET"
        out.append(Req(port, host, rng.choice(PATHS), method, tuple(headers)))
    return out


def _side(req: Req, side: str) -> List[Tuple[str, str]]:
    return [(k, side if k == "x-oracle-side" else v) for k, v in req.headers]


def envoy_outcomes(h: Harness, reqs: Sequence[Req]) -> List[Outcome]:
    ids, answers = [], []
    for req in reqs:
        rid = h.next_id()
        ids.append(rid)
        headers = [("Host", req.host), ("x-oracle-id", rid), *_side(req, "envoy")]
        if req.method == "POST":
            headers.append(("Content-Length", "0"))
        answers.append(h.client.request(req.port, req.method, req.path, headers))
    log = h.envoy.log_entries(ids)
    missing = [i for i in ids if i not in log]
    assert not missing, f"no access-log entry for {len(missing)} requests (first {missing[:3]})"
    return [_envoy_outcome(status, headers, body, log[rid]) for rid, (status, headers, body) in zip(ids, answers)]


def _envoy_outcome(status: int, headers: Dict[str, str], body: bytes, entry: Dict[str, Any]) -> Outcome:
    flags, details = entry.get("flags") or "-", entry.get("details") or ""
    assert entry["code"] == status, (entry, status)
    detail = f"flags={flags} details={details}"
    if "NR" in flags.split(","):
        return Outcome("no_route", status, detail=detail)
    if "FI" in flags.split(","):
        return Outcome("fault", status, route=entry.get("route"), detail=detail)
    if "UH" in flags.split(","):
        return Outcome("no_healthy", status, route=entry.get("route"), cluster=entry.get("cluster"), detail=detail)
    if "UO" in flags.split(","):
        return Outcome("overflow", status, route=entry.get("route"), cluster=entry.get("cluster"), detail=detail)
    if details == "direct_response":
        return Outcome("direct", status, route=entry.get("route"), detail=detail)
    if details == "via_upstream":
        data = json.loads(body) if body else {}
        upstream = entry.get("upstream") or ""
        timeout = data.get("expected_timeout_ms")
        return Outcome("upstream", status, route=entry.get("route"), cluster=entry.get("cluster"),
                       endpoint_ip=upstream.rsplit(":", 1)[0] if upstream else None,
                       served_by=headers.get("x-served-by"),
                       expected_timeout_ms=int(timeout) if timeout else None, detail=detail)
    return Outcome("other", status, route=entry.get("route"), cluster=entry.get("cluster"), detail=detail)


def mesh_outcome(h: Harness, req: Req) -> Outcome:
    headers = _side(req, "meshcore")
    try:
        call = h.mesh.request(f"http://{req.host}{req.path}", req.method, headers, target=req.target)
    except meshcore.NoRoute as e:
        return Outcome("no_route", 404, detail=str(e))
    m = call.route
    if m.direct_response is not None:
        return Outcome("direct", m.direct_response[0], route=m.route_name, vhost=m.virtual_host)
    policy = m.retry_policy
    per_try = policy.per_try_timeout if policy is not None else None
    expected = per_try if per_try and (not m.timeout or per_try < m.timeout) else m.timeout
    base = dict(route=m.route_name, cluster=call.cluster, vhost=m.virtual_host, hashed=m.hash is not None)
    try:
        resp = call.run(mesh_sender(()))
    except meshcore.FaultAbort as e:
        return Outcome("fault", e.http_status or 0, **base)
    except meshcore.CircuitBreakerOpen as e:
        return Outcome("overflow", 503, detail=str(e), **base)
    except meshcore.Unavailable as e:
        return Outcome("no_healthy", 503, detail=str(e), **base)
    ep = call.attempts[-1].endpoint
    return Outcome("upstream", resp.status_code, endpoint_ip=ep.address, served_by=resp.headers.get("x-served-by"),
                   expected_timeout_ms=int(round(expected * 1000)) if expected else None, **base)


def pick_outcome(h: Harness, req: Req) -> Tuple[str, Optional[str], Optional[str]]:
    """``mesh.pick`` for the request: (kind, route name, cluster)."""
    headers = _side(req, "meshcore")
    try:
        p = h.mesh.pick(req.target, req.path, req.method, headers)
    except meshcore.NoRoute:
        return "no_route", None, None
    except meshcore.Unavailable:
        return "no_healthy", None, None
    with p:
        if p.endpoint is None:
            return "direct", p.route_name, None
        return "upstream", p.route_name, p.cluster


def compare_pick(h: Harness, req: Req, ours: Outcome) -> List[str]:
    """``mesh.pick`` agrees with ``mesh.request`` on the route (it runs no fault filter; a weighted
    route may pick another of its clusters, which may be the empty one or not)."""
    kind, route, cluster = pick_outcome(h, req)
    weighted = h.routes.get((str(req.port), ours.vhost or "", ours.route or ""), ((), False))[1]
    if ours.kind in ("no_route", "direct"):
        return [] if kind == ours.kind else [f"mesh.pick: {kind} but mesh.request: {ours.kind}"]
    if weighted:
        allowed = {"upstream", "no_healthy"}
    elif ours.kind == "fault":  # the abort comes first, whatever the cluster holds
        allowed = {"upstream" if h.members.get(ours.cluster or "") else "no_healthy"}
    else:
        allowed = {"no_healthy" if ours.kind == "no_healthy" else "upstream"}
    if kind not in allowed:
        return [f"mesh.pick: {kind} but mesh.request: {ours.kind}"]
    if kind == "upstream" and route != ours.route:
        return [f"mesh.pick: route {route!r} but mesh.request: {ours.route!r}"]
    if kind == "upstream" and not weighted and cluster != ours.cluster:
        return [f"mesh.pick: cluster {cluster!r} but mesh.request: {ours.cluster!r}"]
    return []


def compare(h: Harness, req: Req, envoy: Outcome, ours: Outcome) -> List[str]:
    """What differs between Envoy's and meshcore's handling of one request ([] if nothing)."""
    problems = []
    clusters, weighted = h.routes.get((str(req.port), ours.vhost or "", ours.route or ""), ((), False))
    if weighted and envoy.route == ours.route and envoy.kind != ours.kind and \
            {envoy.kind, ours.kind} <= {"upstream", "no_healthy"}:
        # a weighted route over an empty subset: each side picked its own cluster
        for who, o in (("envoy", envoy), ("meshcore", ours)):
            if o.cluster not in clusters:
                problems.append(f"{who}: cluster {o.cluster!r} is not one of the route's {clusters}")
            elif o.kind == "no_healthy" and h.members.get(o.cluster or ""):
                problems.append(f"{who}: no healthy upstream in {o.cluster!r}, which has endpoints")
        return problems
    if (envoy.kind, envoy.status) != (ours.kind, ours.status):
        return [f"outcome: envoy {envoy.kind} {envoy.status} ({envoy.detail}) meshcore {ours.kind} {ours.status} "
                f"({ours.detail})"]
    if envoy.kind in ("upstream", "fault", "no_healthy") and envoy.route != ours.route:
        problems.append(f"route: envoy {envoy.route!r} meshcore {ours.route!r}")
    if envoy.kind in ("upstream", "no_healthy"):
        if weighted:
            if envoy.cluster not in clusters or ours.cluster not in clusters:
                problems.append(f"weighted route {ours.route!r} of {ours.vhost!r} ({clusters}): envoy "
                                f"{envoy.cluster!r} meshcore {ours.cluster!r}")
        elif envoy.cluster != ours.cluster:
            problems.append(f"cluster: envoy {envoy.cluster!r} meshcore {ours.cluster!r}")
    if envoy.kind == "upstream":
        for who, o in (("envoy", envoy), ("meshcore", ours)):
            up = h.world.upstreams.get(o.endpoint_ip or "")
            if up is None or o.served_by != up.name:
                problems.append(f"{who}: endpoint {o.endpoint_ip} but served by {o.served_by!r}")
            elif o.endpoint_ip not in h.members.get(o.cluster or "", ()):
                problems.append(f"{who}: endpoint {o.served_by} is not in cluster {o.cluster!r}")
        if envoy.endpoint_ip and ours.endpoint_ip:
            se = h.world.endpoint_of_ip(envoy.endpoint_ip)[0]
            so = h.world.endpoint_of_ip(ours.endpoint_ip)[0]
            if (se.name, se.namespace) != (so.name, so.namespace):
                problems.append(f"service: envoy {se.fqdn} meshcore {so.fqdn}")
        deterministic = (ours.hashed and envoy.cluster == ours.cluster
                         and h.lb_policy.get(ours.cluster or "") in ("RING_HASH", "MAGLEV"))
        if deterministic and envoy.endpoint_ip != ours.endpoint_ip:
            problems.append(f"consistent hash ({h.lb_policy[ours.cluster or '']}) on {ours.cluster}: envoy "
                            f"{envoy.served_by} meshcore {ours.served_by}")
        if envoy.expected_timeout_ms != ours.expected_timeout_ms:
            problems.append(f"x-envoy-expected-rq-timeout-ms: envoy {envoy.expected_timeout_ms} meshcore "
                            f"{ours.expected_timeout_ms}")
    return problems


def run_and_compare(h: Harness, reqs: Sequence[Req]) -> collections.Counter:
    envoy = envoy_outcomes(h, reqs)
    failures = []
    kinds: collections.Counter = collections.Counter()
    for req, e in zip(reqs, envoy):
        ours = mesh_outcome(h, req)
        problems = compare(h, req, e, ours)
        problems += compare_pick(h, req, ours)
        kinds[e.kind] += 1
        if e.kind == "upstream" and ours.hashed and e.cluster == ours.cluster and \
                h.lb_policy.get(ours.cluster or "") in ("RING_HASH", "MAGLEV"):
            kinds["same endpoint (consistent hash)"] += 1
        if problems:
            failures.append(f"{req.describe()}\n    envoy: {e}\n    meshcore: {ours}\n    " + "\n    ".join(problems))
    if failures:
        pytest.fail(f"seed {h.seed}: {len(failures)} of {len(reqs)} requests differ ({dict(kinds)}):\n"
                    + "\n".join(failures[:15]), pytrace=False)
    return kinds


# -------------------------------------------------------------------------------------------------
# routing, request by request
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_routing_matches_envoy(harnesses: Dict[int, Harness], seed: int) -> None:
    h = harness_for(harnesses, seed)
    reqs = gen_requests(h.world, random.Random(seed * 7919), N_REQUESTS)
    kinds = run_and_compare(h, reqs)
    print(f"seed {seed}: {N_REQUESTS} requests, {dict(kinds)}")
    # the generator reaches the interesting outcomes
    assert kinds["upstream"] >= N_REQUESTS // 4, kinds
    assert kinds["direct"] + kinds["no_route"] > 0, kinds


def test_every_outcome_is_covered(harnesses: Dict[int, Harness]) -> None:
    """Across the seeds' worlds, hand-made requests reach every kind of outcome the routing
    comparison knows (so it never passes for want of them)."""
    seen: collections.Counter = collections.Counter()
    for seed in SEEDS:
        h = harness_for(harnesses, seed)
        reqs = []
        for s in h.world.services:
            if s.special:
                continue
            for p in s.ports:
                reqs.append(Req(p, f"{s.fqdn}:{p}", "/", headers=(("x-oracle-side", "X"), ("x-user", "u-1"))))
                for http in (s.vs or {}).get("http", []):  # one request per matched route: its first match
                    m = (http.get("match") or [{}])[0]
                    path = "/"
                    uri = m.get("uri") or {}
                    if "exact" in uri:
                        path = uri["exact"]
                    elif "prefix" in uri:
                        path = uri["prefix"].rstrip("/") + "/x"
                    elif "regex" in uri:
                        path = {"/api/v[0-9]+/.*": "/api/v3/y", "/users/[a-z]+": "/users/abc"}[uri["regex"]]
                    headers = [("x-oracle-side", "X"), ("x-user", "u-2")]
                    for name, sm in (m.get("headers") or {}).items():
                        value = sm.get("exact") or (sm.get("prefix", "") + "z" if "prefix" in sm else None)
                        if value is None:
                            value = {"^(a|b)+$": "abab", "v[0-9]+": "v7"}[sm["regex"]]
                        headers.append((name, value))
                    reqs.append(Req(p, s.name if s.namespace == "default" else f"{s.name}.{s.namespace}", path,
                                    headers=tuple(headers)))
        reqs.append(Req(h.world.http_ports[0], "nosuch.default.svc.cluster.local", "/"))
        seen.update(run_and_compare(h, reqs))
        seen["requests"] += len(reqs)
    print(f"hand-made requests: {dict(seen)}")
    assert seen["upstream"] and seen["direct"] and seen["no_route"] and seen["fault"] and seen["no_healthy"], seen
    assert seen["same endpoint (consistent hash)"], seen


# -------------------------------------------------------------------------------------------------
# distributions
# -------------------------------------------------------------------------------------------------


def _within(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(max(n * p * (1 - p), 1e-9)) + 1


def test_distributions_match_envoy(harnesses: Dict[int, Harness]) -> None:
    """Weighted splits, round robin, random and least request, 200 requests per request shape:
    both within the expected spread (round robin: exactly balanced), on the same clusters."""
    n = 200
    want = {"weighted": 3, "ROUND_ROBIN": 2, "RANDOM": 1, "LEAST_REQUEST": 1}
    checked: collections.Counter = collections.Counter()
    for seed in SEEDS:
        h = harness_for(harnesses, seed)
        shapes: Dict[Tuple[str, str], Tuple[str, Req]] = {}
        for req in gen_requests(h.world, random.Random(seed * 31), 300):
            req = Req(req.port, req.host, req.path, req.method, tuple(x for x in req.headers if x[0] != "x-user"))
            try:
                p = h.mesh.pick(req.target, req.path, req.method, list(req.headers))
            except (meshcore.NoRoute, meshcore.Unavailable):
                continue
            with p:
                if p.endpoint is None:
                    continue
                key = (p.route.virtual_host, p.route_name)
            if (str(req.port), *key) in h.faulted:
                continue
            clusters, weighted = h.routes[(str(req.port), *key)]
            category = "weighted" if weighted else h.lb_policy[clusters[0]]
            if not weighted and len(h.members[clusters[0]]) < 2:
                continue
            taken = collections.Counter(c for c, _ in shapes.values())
            if key not in shapes and checked[category] + taken[category] < want.get(category, 0):
                shapes[key] = (category, req)
        for (vhost, route), (category, req) in sorted(shapes.items()):
            checked[category] += 1
            clusters, weighted = h.routes[(str(req.port), vhost, route)]
            envoy = envoy_outcomes(h, [req] * n)
            ours = [mesh_outcome(h, req) for _ in range(n)]
            where = f"seed {seed} {req.describe()} -> {vhost} {route}"
            for o in envoy + ours:  # an empty subset's cluster answers 503 no healthy upstream
                assert o.kind == "upstream" or (o.kind == "no_healthy" and not h.members[o.cluster or ""]), (where, o)
            for side, outs in (("envoy", envoy), ("meshcore", ours)):
                by_cluster = collections.Counter(o.cluster for o in outs)
                assert set(by_cluster) <= set(clusters), (side, where, by_cluster)
                if weighted:
                    rc = next(r for r in h.resources["routes"] if r.name == str(req.port))
                    vh = next(v for v in rc.virtual_hosts if v.name == vhost)
                    r = next(x for x in vh.routes if x.name == route)
                    total = sum(c.weight.value for c in r.route.weighted_clusters.clusters)
                    for c in r.route.weighted_clusters.clusters:
                        assert _within(by_cluster[c.name], n, c.weight.value / total), (side, where, by_cluster)
                for cname, k in by_cluster.items():
                    if not h.members[cname]:
                        continue
                    eps = collections.Counter(o.endpoint_ip for o in outs if o.cluster == cname)
                    assert set(eps) <= h.members[cname], (side, where, eps)
                    policy = h.lb_policy[cname]
                    members = len(h.members[cname])
                    counts = [eps.get(ip, 0) for ip in h.members[cname]]
                    if policy == "ROUND_ROBIN":
                        assert max(counts) - min(counts) <= 1, (side, where, cname, eps)
                    elif policy in ("RANDOM", "LEAST_REQUEST"):
                        assert all(_within(c, k, 1 / members) for c in counts), (side, where, cname, eps)
    print(f"distributions, {n} requests per shape: {dict(checked)}")
    assert checked["weighted"] and checked["ROUND_ROBIN"] and checked["RANDOM"] + checked["LEAST_REQUEST"], checked


# -------------------------------------------------------------------------------------------------
# resilience
# -------------------------------------------------------------------------------------------------


def _httpx_client(mesh: meshcore.Mesh) -> Any:
    import httpx

    from meshcore.integrations.httpx import MeshTransport

    return httpx.Client(mounts={"all://*.svc.cluster.local": MeshTransport(mesh)}, timeout=15)


def _mesh_stat(mesh: meshcore.Mesh, cluster: str, name: str) -> int:
    return int(mesh.stats().get(cluster, {}).get(name, 0) or 0)


def _envoy_stat(h: Harness, cluster: str, name: str) -> int:
    stats = h.envoy.stats(name)
    for key, value in stats.items():  # the stat name is the cluster's alt_stat_name when it has one
        if key.endswith("." + name) and key.startswith((f"cluster.{cluster}.", f"cluster.{cluster};.")):
            return value
    return 0


@pytest.mark.parametrize("service", ["flaky", "resetter"])
def test_outlier_ejection_matches_envoy(h: Harness, service: str) -> None:
    """One of three endpoints always fails (503, or resets the connection); the route retries
    twice, the DestinationRule ejects after 2 consecutive errors: both clients see every request
    succeed, the bad endpoint gets exactly 2 requests (none after its ejection), one ejection."""
    svc = h.world.svc(service)
    port = svc.ports[0]
    bad = next(h.world.upstreams[e["ip"]] for e in svc.endpoints if e["mode"] != "ok")
    cluster = f"outbound|{port}||{svc.fqdn}"
    n = 24
    envoy_ok = 0
    for _ in range(n):
        status, _, _ = one_shot(port, "GET", "/work", [("Host", svc.fqdn), ("x-oracle-side", "envoy")])
        envoy_ok += status == 200
    with _httpx_client(h.mesh) as client:
        mesh_ok = 0
        for _ in range(n):
            r = client.get(f"http://{svc.fqdn}:{port}/work", headers={"x-oracle-side": "meshcore"})
            mesh_ok += r.status_code == 200
    ejections = "outlier_detection.ejections_enforced_total"
    result = {"envoy": (envoy_ok, bad.side_hits("envoy"), _envoy_stat(h, cluster, ejections)),
              "meshcore": (mesh_ok, bad.side_hits("meshcore"), _mesh_stat(h.mesh, cluster, ejections))}
    print(f"{service}: (successes of {n}, requests to the bad endpoint, ejections) {result}")
    assert result["envoy"] == result["meshcore"] == (n, 2, 1), result


_BREAKERS: Dict[Tuple[int, str], Dict[str, Any]] = {}


def breaker_run(h: Harness, service: str, k: int = 8) -> Dict[str, Any]:
    """``k`` concurrent requests to ``service`` (one slow endpoint), through Envoy, then through
    meshcore's httpx transport (once per harness and service): successes, overflows (Envoy: 503
    with flag UO; meshcore: ``CircuitBreakerOpen``, a ``ConnectError`` through httpx) and each
    side's ``upstream_rq_pending_overflow``."""
    key = (h.seed, service)
    if key in _BREAKERS:
        return _BREAKERS[key]
    import httpx

    svc = h.world.svc(service)
    port = svc.ports[0]
    cluster = f"outbound|{port}||{svc.fqdn}"

    def concurrently(fn: Any) -> List[Any]:
        barrier = threading.Barrier(k)

        def one(i: int) -> Any:
            barrier.wait()
            return fn(i)

        with futures.ThreadPoolExecutor(k) as pool:
            return list(pool.map(one, range(k)))

    ids = [h.next_id() for _ in range(k)]
    answers = concurrently(lambda i: one_shot(port, "GET", "/", [("Host", f"{service}:{port}"), ("x-oracle-id", ids[i]),
                                                                   ("x-oracle-side", "envoy")]))
    log = h.envoy.log_entries(ids)
    envoy = ["UO" if s == 503 and "UO" in (log.get(i, {}).get("flags") or "").split(",") else str(s)
             for (s, _, _), i in zip(answers, ids)]

    with _httpx_client(h.mesh) as client:
        def mesh_one(i: int) -> str:
            try:
                return str(client.get(f"http://{svc.fqdn}:{port}/", headers={"x-oracle-side": "meshcore"}).status_code)
            except httpx.ConnectError as e:
                return "UO" if isinstance(e.__cause__, meshcore.CircuitBreakerOpen) else repr(e)

        ours = concurrently(mesh_one)
    out = {"envoy": (envoy.count("200"), envoy.count("UO"),
                     _envoy_stat(h, cluster, "upstream_rq_pending_overflow")),
           "meshcore": (ours.count("200"), ours.count("UO"),
                        _mesh_stat(h.mesh, cluster, "upstream_rq_pending_overflow")),
           "answers": {"envoy": envoy, "meshcore": ours}}
    print(f"circuit breaking, {service}, {k} concurrent requests (ok, UO, pending_overflow stat): {out}")
    _BREAKERS[key] = out
    return out


@pytest.mark.parametrize("service", ["slow", "slowmr"])
def test_circuit_breaking_matches_envoy(h: Harness, service: str) -> None:
    """A slow endpoint (0.6 s) behind a connection pool of one connection (``maxConnections: 1``,
    ``http1MaxPendingRequests: 1``; ``slowmr`` also ``http2MaxRequests: 1``), 8 concurrent
    requests: both sides answer every request, overflow most with 503 UO, count each overflow
    in ``upstream_rq_pending_overflow``. ``slow``: exactly the same counts (Envoy: one request
    on the connection, one pending, six overflows). ``slowmr``: loosely the same, see
    :func:`test_max_requests_leaves_room_for_a_pending_request`."""
    out = breaker_run(h, service)
    (e_ok, e_uo, e_stat), (m_ok, m_uo, m_stat) = out["envoy"], out["meshcore"]
    k = len(out["answers"]["envoy"])
    assert e_ok + e_uo == k and m_ok + m_uo == k, out
    assert e_stat == e_uo and m_stat == m_uo, out
    assert e_ok >= 1 and m_ok >= 1 and e_uo >= k - 3 and m_uo >= k - 3 and abs(e_uo - m_uo) <= 1, out
    if service == "slow":
        assert out["envoy"] == out["meshcore"] == (2, k - 2, k - 2), out


# Envoy's HTTP/1.1 pool counts max_requests only against streams attached to a connection
# (ConnPoolImplBase::attachStreamToClient): a request queued as pending (http1MaxPendingRequests: 1)
# behind the one connection (maxConnections: 1) waits for it instead of overflowing, even with
# http2MaxRequests: 1: Envoy serves 2 of 8 concurrent requests, and so does meshcore.
def test_max_requests_leaves_room_for_a_pending_request(h: Harness) -> None:
    out = breaker_run(h, "slowmr")
    assert out["envoy"] == out["meshcore"], out


# -------------------------------------------------------------------------------------------------
# TCP
# -------------------------------------------------------------------------------------------------


def test_tcp_service_reaches_the_same_endpoints(h: Harness) -> None:
    """Envoy's ``<vip>_<port>`` listener (tcp_proxy, ROUND_ROBIN over three endpoints) and
    ``Mesh.tcp_connect`` by short name, FQDN and VIP: every endpoint, evenly, the same cluster."""
    svc = h.world.svc("tcpdb")
    port = h.world.tcp_port
    names = {h.world.upstreams[e["ip"]].name for e in svc.endpoints}
    n = 12
    cluster = f"outbound|{port}||{svc.fqdn}"
    before = _envoy_stat(h, cluster, "upstream_cx_total")  # the harness's readiness probe went through it
    envoy: collections.Counter = collections.Counter()
    for _ in range(n):
        with socket.create_connection((svc.vip, port), timeout=5) as s:
            envoy[read_tcp(s).decode()] += 1
    ours: collections.Counter = collections.Counter()
    clusters = set()
    for i in range(n):
        target = [f"tcpdb:{port}", f"{svc.fqdn}:{port}", f"{svc.vip}:{port}", f"tcpdb.default:{port}"][i % 4]
        sock, pick = h.mesh.tcp_connect(target)
        try:
            ours[read_tcp(sock).decode()] += 1
            clusters.add(pick.cluster)
        finally:
            sock.close()
            pick.done()
    print(f"tcp: envoy {dict(envoy)} meshcore {dict(ours)}")
    assert set(envoy) == set(ours) == names, (envoy, ours)
    assert envoy == ours == {name: n // 3 for name in names}, (envoy, ours)
    assert clusters == {cluster}
    assert _envoy_stat(h, cluster, "upstream_cx_total") - before == n
    assert _mesh_stat(h.mesh, cluster, "upstream_cx_total") == n


# -------------------------------------------------------------------------------------------------
# soak
# -------------------------------------------------------------------------------------------------


@pytest.mark.soak
def test_routing_matches_envoy_long() -> None:
    worlds = int(os.environ.get("MESHCORE_SOAK_EXAMPLES", "2"))
    n = int(os.environ.get("MESHCORE_SOAK_REQUESTS", "600"))
    for i in range(worlds):
        seed = 1000 + i
        h = Harness(seed)
        try:
            run_and_compare(h, gen_requests(h.world, random.Random(seed), n))
        finally:
            h.close()

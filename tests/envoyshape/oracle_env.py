"""The world of the Envoy-shape oracle (``test_envoy_shape_oracle.py``): real loopback upstreams,
a seeded Istio mesh description whose endpoints are those upstreams, istiod's sidecar resources
for it (:func:`meshcore.controlplane.istio_sidecar.build`) served over ADS to a real Envoy 1.40
with a sidecar bootstrap and to ``meshcore.Mesh(xds_shape="envoy")``, and the two clients.

* Upstreams: every endpoint is its own loopback address (``127.0.0.2``, ``127.0.0.3``, ...;
  Linux routes all of 127/8) on one shared target port; an HTTP endpoint answers with a JSON body
  and an ``x-served-by`` header naming itself (modes: ``ok``, ``fail`` = always 503, ``reset`` =
  RST without an answer, ``slow``), counting its hits per client (``x-oracle-side``); a TCP
  endpoint writes its name and closes.
* Envoy gets the resources with two decision-neutral changes: the outbound listeners bind their
  ports (istiod writes ``bind_to_port: false`` for them, traffic reaching them through iptables
  and ``virtualOutbound``; here the application connects to ``127.0.0.1:<service port>`` itself)
  and each HttpConnectionManager gets a file access log naming the route, cluster, upstream host
  and response flags of every request. meshcore gets exactly what ``build()`` returns.
* Outbound traffic policy REGISTRY_ONLY: an unknown host gets the ``block_all`` direct response
  (502) on both sides, instead of ``PassthroughCluster`` to the original destination, which here
  would be Envoy's own listener.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import random
import socket
import socketserver
import struct
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy_process import EnvoyProcess, find_envoy, free_port, http_get, socket_address
from google.protobuf import struct_pb2

NODE_ID = "sidecar~10.0.0.9~client.default~default.svc.cluster.local"
NAMESPACE = "default"
DOMAIN = "cluster.local"
HCM_NAME = "envoy.filters.network.http_connection_manager"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TYPE_URLS = (
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
)
ACCESS_LOG_FIELDS = {
    "id": "%REQ(X-ORACLE-ID)%", "code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%", "route": "%ROUTE_NAME%", "cluster": "%UPSTREAM_CLUSTER_RAW%",
    "upstream": "%UPSTREAM_HOST%", "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
}


# -------------------------------------------------------------------------------------------------
# upstreams
# -------------------------------------------------------------------------------------------------


class HttpUpstream:
    """One endpoint: a threaded HTTP/1.1 server on ``(ip, port)``."""

    def __init__(self, name: str, ip: str, port: int, mode: str = "ok", delay: float = 0.6) -> None:
        self.name, self.ip, self.port, self.mode, self.delay = name, ip, port, mode, delay
        self.hits: Dict[str, int] = {}
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                side = self.headers.get("x-oracle-side", "?")
                with upstream._lock:
                    upstream.hits[side] = upstream.hits.get(side, 0) + 1
                if upstream.mode == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if upstream.mode == "slow":
                    time.sleep(upstream.delay)
                data = json.dumps({
                    "name": upstream.name, "ip": upstream.ip, "port": upstream.port,
                    "host": self.headers.get("Host"), "path": self.path,
                    "expected_timeout_ms": self.headers.get("x-envoy-expected-rq-timeout-ms"),
                    "attempt_count": self.headers.get("x-envoy-attempt-count"),
                }).encode()
                self.send_response(503 if upstream.mode == "fail" else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("x-served-by", upstream.name)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def server_bind(self) -> None:  # HTTPServer's does a reverse DNS lookup (getfqdn)
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = self.server_address[:2]

        self.server = Server((ip, port), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def side_hits(self, side: str) -> int:
        with self._lock:
            return self.hits.get(side, 0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpUpstream:
    """A TCP endpoint: writes its name to every connection, then closes it."""

    def __init__(self, name: str, ip: str, port: int) -> None:
        self.name, self.ip, self.port = name, ip, port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((ip, port))
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.sendall(self.name.encode())
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(2)
                while conn.recv(1024):  # the peer's close: the name is not lost to an RST
                    pass
            except OSError:  # a probe that connected and left
                pass
            finally:
                conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def start_upstreams(specs: Sequence[Tuple[str, str, str, str]], avoid: Sequence[int] = (),
                    attempts: int = 20) -> Tuple[int, List[Any]]:
    """Bind every ``(kind, name, ip, mode)`` (kind ``http``/``tcp``) on one shared port: the port
    the first one gets from the kernel (not one of ``avoid``), retried when another address has it
    taken."""
    last: Optional[BaseException] = None
    for _ in range(attempts):
        made: List[Any] = []
        port = 0
        try:
            for kind, name, ip, mode in specs:
                up = HttpUpstream(name, ip, port, mode) if kind == "http" else TcpUpstream(name, ip, port)
                made.append(up)
                if port == 0:
                    port = up.server.server_address[1] if kind == "http" else up.sock.getsockname()[1]
                    if port in avoid:
                        raise OSError(f"port {port} is one of the listeners' ports")
            return port, made
        except OSError as e:
            last = e
            for up in made:
                up.close()
    raise RuntimeError(f"could not bind the loopback upstreams on one port: {last}")


# -------------------------------------------------------------------------------------------------
# the mesh description
# -------------------------------------------------------------------------------------------------


@dataclass
class Svc:
    name: str
    namespace: str
    vip: str
    ports: List[int]
    protocol: str  # http | tcp
    endpoints: List[Dict[str, Any]]  # {"name", "ip", "version", "mode"}
    dr: Optional[Dict[str, Any]] = None
    vs: Optional[Dict[str, Any]] = None
    special: str = ""  # "" (routing) | flaky | resetter | slow | tcp

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{DOMAIN}"

    def host_variants(self) -> List[str]:
        """The names an application may use for it (Istio's vhost domains), FQDN first."""
        out = [self.fqdn, self.fqdn + ".", f"{self.name}.{self.namespace}", f"{self.name}.{self.namespace}.svc",
               self.vip]
        if self.namespace == NAMESPACE:
            out.append(self.name)
        return out


@dataclass
class World:
    seed: int
    http_ports: List[int]
    tcp_port: int
    target_port: int
    services: List[Svc]
    desc: Dict[str, Any]
    upstreams: Dict[str, Any] = field(default_factory=dict)  # endpoint ip -> upstream

    def svc(self, name: str, namespace: str = NAMESPACE) -> Svc:
        return next(s for s in self.services if s.name == name and s.namespace == namespace)

    def endpoint_of_ip(self, ip: str) -> Tuple[Svc, Dict[str, Any]]:
        for s in self.services:
            for e in s.endpoints:
                if e["ip"] == ip:
                    return s, e
        raise KeyError(ip)


NAMES = ["reviews", "ratings", "details", "cart", "search", "orders"]
HEADER_MATCHES = [("end-user", {"exact": "jason"}), ("end-user", {"prefix": "test"}),
                  ("end-user", {"regex": "^(a|b)+$"}), ("x-canary", {"exact": "yes"}),
                  ("x-canary", {"prefix": "v"}), ("x-canary", {"regex": "v[0-9]+"})]
URI_MATCHES = [{"prefix": "/api"}, {"prefix": "/v1/"}, {"prefix": "/static"}, {"exact": "/login"},
               {"exact": "/health"}, {"regex": "/api/v[0-9]+/.*"}, {"regex": "/users/[a-z]+"}]


LB_KINDS = ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "ring", "maglev", "hash"]


def _lb(rng: random.Random, kind: Optional[str] = None) -> Dict[str, Any]:
    """A DestinationRule ``loadBalancer``: ``kind`` (one of :data:`LB_KINDS`) or a random one."""
    kind = kind or rng.choice(LB_KINDS)
    if kind in ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"):
        return {"simple": kind}
    ch: Dict[str, Any] = {"httpHeaderName": "x-user"}
    if kind == "ring":
        ch["ringHash"] = {"minimumRingSize": rng.choice([64, 512, 2048])}
    elif kind == "maglev":
        ch["maglev"] = {"tableSize": rng.choice([251, 65537])}
    return {"consistentHash": ch}


def _routing_dr(rng: random.Random, svc: Svc, lb_kind: str) -> Dict[str, Any]:
    versions = sorted({e["version"] for e in svc.endpoints})
    tp: Dict[str, Any] = {"loadBalancer": _lb(rng, lb_kind)}
    if rng.random() < 0.5:  # generous: never reached by the routing requests
        tp["connectionPool"] = {"tcp": {"maxConnections": 1000},
                                "http": {"http1MaxPendingRequests": 1000, "http2MaxRequests": 1000, "maxRetries": 10}}
    if rng.random() < 0.5:  # nothing fails in the routing test: never ejects
        tp["outlierDetection"] = {"consecutive5xxErrors": 50, "interval": "10s", "baseEjectionTime": "30s",
                                  "maxEjectionPercent": 50}
    subsets = []
    for v in versions:
        s: Dict[str, Any] = {"name": v, "labels": {"version": v}}
        if rng.random() < 0.25:
            s["trafficPolicy"] = {"loadBalancer": _lb(rng)}
        subsets.append(s)
    if rng.random() < 0.4:
        subsets.append({"name": "v9", "labels": {"version": "v9"}})  # no endpoint: 503 no healthy upstream
    return {"name": svc.name, "namespace": svc.namespace, "host": rng.choice([svc.name, svc.fqdn]),
            "trafficPolicy": tp, "subsets": subsets}


def _routing_vs(rng: random.Random, svc: Svc, subsets: List[str]) -> Dict[str, Any]:
    host = rng.choice([svc.name, svc.fqdn])
    port = {"number": svc.ports[0]} if len(svc.ports) > 1 and rng.random() < 0.5 else None

    def dest(subset: str) -> Dict[str, Any]:
        d: Dict[str, Any] = {"host": host}
        if subset:
            d["subset"] = subset
        if port:
            d["port"] = dict(port)
        return d

    routes = []
    n = rng.randint(1, 4)
    for j in range(n):
        route: Dict[str, Any] = {"name": f"r{j}"}
        last = j == n - 1
        if not last or rng.random() < 0.3:  # the last one: a catch-all 70 % of the time
            matches = []
            for k in range(rng.randint(1, 2)):
                m: Dict[str, Any] = {"name": f"m{k}"}
                kind = rng.random()
                if kind < 0.7:
                    m["uri"] = dict(rng.choice(URI_MATCHES))
                    if rng.random() < 0.2:
                        m["ignoreUriCase"] = True
                if kind >= 0.4 or rng.random() < 0.3:
                    m["headers"] = dict(rng.sample(HEADER_MATCHES, rng.randint(1, 2)))
                matches.append(m)
            route["match"] = matches
        choices = [""] + subsets
        r = rng.random()
        if r < 0.35 and len(choices) >= 2:
            a, b = rng.sample(choices, 2)
            w = rng.choice([50, 70, 80, 90])
            route["route"] = [{"destination": dest(a), "weight": w}, {"destination": dest(b), "weight": 100 - w}]
        else:
            route["route"] = [{"destination": dest(rng.choice(choices))}]
        if rng.random() < 0.4:
            route["retries"] = rng.choice([{"attempts": 0},
                                           {"attempts": rng.randint(1, 3), "perTryTimeout": rng.choice(["1s", "2s"]),
                                            "retryOn": "5xx,connect-failure"},
                                           {"attempts": 2, "retryOn": "gateway-error"}])
        if rng.random() < 0.4:
            route["timeout"] = rng.choice(["3s", "7s", "0s"])
        if rng.random() < 0.15:
            route["fault"] = {"abort": {"httpStatus": rng.choice([418, 429, 500, 503]),
                                        "percentage": {"value": 100}}}
        routes.append(route)
    return {"name": svc.name, "namespace": svc.namespace, "hosts": [host], "http": routes}


def _ephemeral_range() -> Tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


_PORT_RNG = random.SystemRandom()


def listener_port(taken: Sequence[int] = ()) -> int:
    """A port free on every address, outside the kernel's ephemeral range: the listeners bind it
    only once Envoy runs, and meanwhile no connection or port-0 bind of this process (control
    planes, Envoy's own upstream connections) can be given it."""
    lo, hi = _ephemeral_range()
    ranges = [(10000, lo - 1)] if lo > 11000 else [(hi + 1, 65535)]
    for _ in range(200):
        a, b = ranges[0]
        port = _PORT_RNG.randint(a, b)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    return free_port("0.0.0.0")


def make_world(seed: int, n_routing: int = 6) -> World:
    """A seeded mesh: ``n_routing`` HTTP services (two of them named ``reviews``, in ``default``
    and ``other``) on two shared HTTP ports, plus the resilience services ``flaky`` (one endpoint
    always 503), ``resetter`` (one endpoint resets), ``slow`` and ``slowmr`` (one slow endpoint, a connection
    pool of one) and the TCP service ``tcpdb``. Ports are free ports (:func:`listener_port`); the same
    seed gives the same mesh but for the port numbers."""
    rng = random.Random(seed)
    lports: List[int] = []
    for _ in range(5):
        lports.append(listener_port(lports))
    http_ports, tcp_port = sorted(lports[:2]), lports[2]
    services: List[Svc] = []
    ip_counter = [1]

    def next_ip() -> str:
        ip_counter[0] += 1
        n = ip_counter[0]
        return f"127.0.{n >> 8}.{n & 0xFF}"

    names = [("reviews", "other")] + [(n, NAMESPACE) for n in NAMES[:max(1, n_routing - 1)]]
    for i, (name, ns) in enumerate(names):
        # the first service has both ports, so that both listeners exist
        ports = [http_ports[0]] if i and rng.random() < 0.6 else list(http_ports)
        rng.shuffle(ports)
        eps = []
        versions = ["v1", "v2", "v3"][:rng.randint(1, 3)]
        for k in range(rng.randint(2, 4)):
            v = versions[k] if k < len(versions) else rng.choice(versions)
            eps.append({"name": f"{name}.{ns}-{k}-{v}", "ip": next_ip(), "version": v, "mode": "ok"})
        services.append(Svc(name, ns, f"10.96.{i}.{10 + i}", ports, "http", eps))
    lb_kinds = list(LB_KINDS)
    rng.shuffle(lb_kinds)  # every balancer in every world (when every service has a DR)
    for i, svc in enumerate(services):
        subsets: List[str] = []
        if rng.random() < 0.85:
            svc.dr = _routing_dr(rng, svc, lb_kinds[i % len(lb_kinds)])
            subsets = [s["name"] for s in svc.dr["subsets"]]
        if rng.random() < 0.85:
            svc.vs = _routing_vs(rng, svc, subsets)

    def special(name: str, modes: List[str], dr: Dict[str, Any], vs_route: Optional[Dict[str, Any]], vip: str,
                protocol: str = "http", port: int = http_ports[0]) -> None:
        eps = [{"name": f"{name}-{k}-{m}", "ip": next_ip(), "version": "v1", "mode": m} for k, m in enumerate(modes)]
        s = Svc(name, NAMESPACE, vip, [port], protocol, eps, special=name if protocol == "http" else "tcp")
        s.dr = {"name": name, "namespace": NAMESPACE, "host": name, **dr}
        if vs_route is not None:
            s.vs = {"name": name, "namespace": NAMESPACE, "hosts": [name], "http": [{"name": "all", **vs_route}]}
        services.append(s)

    eject = {"trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}, "outlierDetection": {
        "consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "120s", "maxEjectionPercent": 100}}}
    special("flaky", ["ok", "fail", "ok"], eject,
            {"route": [{"destination": {"host": "flaky"}}], "retries": {"attempts": 2, "retryOn": "5xx"}},
            "10.96.100.1")
    special("resetter", ["ok", "reset", "ok"], eject,
            {"route": [{"destination": {"host": "resetter"}}],
             "retries": {"attempts": 2, "retryOn": "5xx,reset,connect-failure"}}, "10.96.100.2")
    special("slow", ["slow"], {"trafficPolicy": {"connectionPool": {
        "tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1, "maxRetries": 1}}}},
            {"route": [{"destination": {"host": "slow"}}], "timeout": "10s"}, "10.96.100.3")
    special("slowmr", ["slow"], {"trafficPolicy": {"connectionPool": {
        "tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 1,
                                               "maxRetries": 1}}}},
            {"route": [{"destination": {"host": "slowmr"}}], "timeout": "10s"}, "10.96.100.4")
    tcp_vip = f"127.0.{rng.randint(200, 250)}.{rng.randint(2, 250)}"
    special("tcpdb", ["tcp", "tcp", "tcp"], {"trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}, None,
            tcp_vip, protocol="tcp", port=tcp_port)

    desc = {
        "services": [{
            "name": s.name, "namespace": s.namespace, "vip": s.vip,
            "ports": [{"port": p, "name": f"{s.protocol}-{p}", "protocol": s.protocol, "target_port": 0}
                      for p in s.ports],
            "endpoints": [{"ip": e["ip"], "labels": {"app": s.name, "version": e["version"]},
                           "service_account": s.name, "workload": f"{s.name}-{e['version']}"} for e in s.endpoints],
        } for s in services],
        "virtual_services": [s.vs for s in services if s.vs],
        "destination_rules": [s.dr for s in services if s.dr],
        "proxy": {"ip": "10.0.0.9", "labels": {"app": "client"}},
        "mesh": {"outbound_traffic_policy": "REGISTRY_ONLY", "proxy_listen_port": lports[3],
                 "proxy_inbound_listen_port": lports[4]},
    }
    return World(seed, http_ports, tcp_port, 0, services, desc)


def bind_world(world: World) -> List[Any]:
    """Start every endpoint's upstream on one shared target port and write that port into the
    description (``target_port`` of every service port)."""
    specs = [("tcp" if e["mode"] == "tcp" else "http", e["name"], e["ip"], e["mode"])
             for s in world.services for e in s.endpoints]
    mesh = world.desc["mesh"]
    avoid = [*world.http_ports, world.tcp_port, mesh["proxy_listen_port"], mesh["proxy_inbound_listen_port"]]
    port, ups = start_upstreams(specs, avoid)
    world.target_port = port
    for s in world.desc["services"]:
        for p in s["ports"]:
            p["target_port"] = port
    world.upstreams = {u.ip: u for u in ups}
    return ups


# -------------------------------------------------------------------------------------------------
# Envoy
# -------------------------------------------------------------------------------------------------


def envoy_resources(resources: Dict[str, List[Any]], access_log: str) -> Dict[str, List[Any]]:
    """A copy of ``resources`` for the real Envoy: outbound listeners bind their port; every
    HttpConnectionManager logs each request to ``access_log`` (JSON lines)."""
    out = {k: list(v) for k, v in resources.items()}
    fmt = struct_pb2.Struct()
    fmt.update(ACCESS_LOG_FIELDS)
    log_cfg = file_pb2.FileAccessLog(path=access_log)
    log_cfg.log_format.json_format.CopyFrom(fmt)
    listeners = []
    for lis in resources["listeners"]:
        lis = copy.deepcopy(lis)
        if lis.HasField("bind_to_port") and not lis.bind_to_port.value:
            lis.bind_to_port.value = True
        chains = list(lis.filter_chains) + ([lis.default_filter_chain] if lis.HasField("default_filter_chain") else [])
        for chain in chains:
            for f in chain.filters:
                if f.name == HCM_NAME:
                    h = hcm_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(h)
                    h.access_log.add(name="envoy.access_loggers.file").typed_config.Pack(log_cfg)
                    f.typed_config.Pack(h)
        listeners.append(lis)
    out["listeners"] = listeners
    return out


class OracleEnvoy(EnvoyProcess):
    """A real Envoy with Istio's bootstrap essentials (ADS for LDS/CDS, an ``sds-grpc`` cluster)
    and the oracle's sidecar node; access logs flushed every 20 ms."""

    def __init__(self, xds_port: int, sds_port: int, node_id: str = NODE_ID) -> None:
        def static(name: str, port: int) -> Dict[str, Any]:
            return {"name": name, "type": "STATIC", "connect_timeout": "1s",
                    "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}}},
                    "load_assignment": {"cluster_name": name, "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}]}}

        self.bootstrap = {
            "node": {"id": node_id, "cluster": "client.default",
                     "metadata": {"NAMESPACE": NAMESPACE, "CLUSTER_ID": "Kubernetes"}},
            "admin": {"address": socket_address(0)},
            "dynamic_resources": {
                "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                               "set_node_on_first_message_only": True,
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
        self.tmpdir: Optional[str] = tempfile.mkdtemp(prefix="meshcore-shape-oracle-")
        self.access_log = os.path.join(self.tmpdir, "access.log")
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""

    def _start(self) -> None:
        assert self.tmpdir is not None
        cfg = os.path.join(self.tmpdir, "envoy.json")
        with open(cfg, "w") as f:
            json.dump(self.bootstrap, f)
        # EnvoyProcess runs ``envoy_bin -c ...``: a wrapper adds the access-log flush interval
        # (default 10 s) so the log can be read right after the requests
        wrapper = os.path.join(self.tmpdir, "envoy.sh")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec "{self.envoy_bin}" --file-flush-interval-msec 20 "$@"\n')
        os.chmod(wrapper, 0o755)
        real, self.envoy_bin = self.envoy_bin, wrapper
        try:
            self._run_envoy(cfg)
        finally:
            self.envoy_bin = real

    def close(self) -> None:
        self._stop(None)

    def get_json(self, path: str) -> Any:
        status, body = http_get(self.admin_url + path, timeout=10)
        assert status == 200, body[:500]
        return json.loads(body)

    def stats(self, prefix: str = "") -> Dict[str, int]:
        with urllib.request.urlopen(self.admin_url + "/stats?filter=" + urllib.request.quote(prefix, safe=""),
                                    timeout=5) as r:
            out = {}
            for line in r.read().decode().splitlines():
                name, _, value = line.partition(": ")
                if value.strip().isdigit():
                    out[name] = int(value)
            return out

    def log_entries(self, ids: Sequence[str], timeout: float = 10.0) -> Dict[str, Dict[str, Any]]:
        """The access-log entries of the requests with these ``x-oracle-id`` values."""
        want = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            got: Dict[str, Dict[str, Any]] = {}
            try:
                with open(self.access_log) as f:
                    for line in f:
                        line = line.strip()
                        if line:
                            e = json.loads(line)
                            if e.get("id") in want:
                                got[e["id"]] = e
            except FileNotFoundError:
                pass
            if len(got) == len(want) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def envoy_acked_everything(cp: Any) -> bool:
    history = cp.history
    resp = {(e["type_url"], e["nonce"]) for e in history if e["dir"] == "resp"}
    reqs = [e for e in history if e["dir"] == "req" and (e["type_url"], e["nonce"]) in resp]
    nacks = [e["error_detail"] for e in reqs if e["error_detail"] is not None]
    assert not nacks, f"Envoy NACKed: {nacks}"
    return {e["type_url"] for e in reqs} >= set(TYPE_URLS)


def envoy_listening(envoy: OracleEnvoy, addresses: Sequence[Tuple[str, int]]) -> bool:
    """Every listener active and each ``(ip, port)`` accepting connections."""
    dump = envoy.get_json("/config_dump?resource=dynamic_listeners")
    for cfg in dump.get("configs", []):
        if "active_state" not in cfg:
            return False
    for ip, port in addresses:
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
        except OSError:
            return False
    return True


# -------------------------------------------------------------------------------------------------
# clients
# -------------------------------------------------------------------------------------------------


class EnvoyClient:
    """Keep-alive HTTP/1.1 connections to Envoy's outbound listeners on 127.0.0.1."""

    def __init__(self) -> None:
        self._conns: Dict[int, http.client.HTTPConnection] = {}

    def request(self, port: int, method: str, path: str, headers: Sequence[Tuple[str, str]],
                timeout: float = 10.0) -> Tuple[int, Dict[str, str], bytes]:
        for attempt in range(2):
            conn = self._conns.get(port)
            if conn is None:
                conn = self._conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                conn.endheaders()
                r = conn.getresponse()
                body = r.read()
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    self._conns.pop(port, None)
                return r.status, {k.lower(): v for k, v in r.getheaders()}, body
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest):
                conn.close()
                self._conns.pop(port, None)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for c in self._conns.values():
            c.close()
        self._conns.clear()


def one_shot(port: int, method: str, path: str, headers: Sequence[Tuple[str, str]], timeout: float = 10.0,
             host: str = "127.0.0.1") -> Tuple[int, Dict[str, str], bytes]:
    """One request on its own connection."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


class Resp:
    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.body = status, headers, body


def mesh_sender(extra_headers: Sequence[Tuple[str, str]]) -> Callable[[Any], Resp]:
    """``send(attempt)`` for ``Call.run``: the attempt to its endpoint over a new connection,
    with the request's headers, the attempt's Host and ``extra_headers``."""

    def send(a: Any) -> Resp:
        host, port = a.address.rsplit(":", 1)
        headers = [(k, v) for k, v in (a.headers or ()) if k.lower() != "host"]
        headers += [("Host", a.authority), *extra_headers]
        return Resp(*one_shot(int(port), a.method, a.path, headers, timeout=a.timeout or 10.0, host=host))

    return send


def read_tcp(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            b = sock.recv(1024)
        except socket.timeout:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


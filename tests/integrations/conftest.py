"""Real loopback upstreams and a file-fed mesh for the client-integration tests.

Every upstream is a ``ThreadingHTTPServer`` on 127.0.0.1 answering JSON with its own name and
port, the ``Host`` header and (TLS) the SNI it received; it can be told to answer a fixed status
or to answer late. The mesh is ``Mesh.from_file`` over resources in the shapes of
``tests/mesh/shapes.py`` (Istio naming: the listener is ``host:port``).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterable, List, Optional

import pytest

import meshcore

HOST = "echo.default.svc.cluster.local"
TARGET = f"{HOST}:8080"
TLS_TARGET = f"{HOST}:8443"
URL = f"http://{TARGET}"
TLS_URL = f"https://{TLS_TARGET}"

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


class Upstream:
    """One loopback HTTP(S) server; ``status``/``delay`` can be changed while it runs."""

    def __init__(self, name: str, status: int = 200, delay: float = 0.0,
                 tls: Optional[ssl.SSLContext] = None) -> None:
        self.name = name
        self.status = status
        self.delay = delay
        self.hits = 0
        self.sni: List[Optional[str]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms ACK waits

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.hits += 1
                if upstream.delay:
                    time.sleep(upstream.delay)
                sni = getattr(self.connection, "meshcore_sni", None)
                data = json.dumps({"name": upstream.name, "port": upstream.port, "host": self.headers.get("Host"),
                                   "path": self.path, "method": self.command, "sni": sni,
                                   "envoy_headers": sorted(k.lower() for k in self.headers
                                                           if k.lower().startswith("x-envoy-")),
                                   "body": body.decode("latin-1")}).encode()
                self.send_response(upstream.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _answer

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that gave up on a slow answer

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        if tls is not None:
            def remember_sni(sock: ssl.SSLSocket, name: Optional[str], ctx: ssl.SSLContext) -> None:
                sock.meshcore_sni = name  # type: ignore[attr-defined]

            tls.sni_callback = remember_sni
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstreams():
    """``start(name, status=200, delay=0.0, tls=None) -> Upstream``; all closed afterwards."""
    started: List[Upstream] = []

    def start(name: str, **kw: Any) -> Upstream:
        u = Upstream(name, **kw)
        started.append(u)
        return u

    yield start
    closers = [threading.Thread(target=u.close) for u in started]  # each shutdown waits for a poll
    for t in closers:
        t.start()
    for t in closers:
        t.join()


def dead_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- resources -------------------------------------------------------------------------------------


def listener(target: str, fault: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    filters: List[Dict[str, Any]] = []
    if fault is not None:
        filters.append({"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT, **fault}})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
    return {"name": target, "api_listener": {"api_listener": {
        "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
        "http_filters": filters}}}


def route(prefix: str, cluster: str, *, headers: Optional[Dict[str, str]] = None, timeout: Optional[str] = None,
          retry: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    match: Dict[str, Any] = {"prefix": prefix}
    if headers:
        match["headers"] = [{"name": k, "string_match": {"exact": v}} for k, v in headers.items()]
    action: Dict[str, Any] = {"cluster": cluster}
    if timeout is not None:
        action["timeout"] = timeout
    if retry is not None:
        action["retry_policy"] = retry
    return {"name": f"{prefix}->{cluster}", "match": match, "route": action}


def resources(clusters: Dict[str, Iterable[int]], routes: List[Dict[str, Any]], *,
              fault: Optional[Dict[str, Any]] = None, targets: Iterable[str] = (TARGET,)) -> Dict[str, Any]:
    targets = list(targets)
    domains = sorted({t.rsplit(":", 1)[0] for t in targets} | set(targets))
    return {
        "listeners": [listener(t, fault) for t in targets],
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "echo", "domains": domains, "routes": routes}]}],
        "clusters": [{"name": c, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                      "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s"} for c in clusters],
        "endpoints": [{"cluster_name": c, "endpoints": [{"locality": {"zone": "z1"}, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in ports]}]} for c, ports in clusters.items()],
    }


@pytest.fixture
def make_mesh(tmp_path):
    """``make(resources_dict, targets=(TARGET,)) -> Mesh`` (file-fed, started, ready)."""
    meshes: List[meshcore.Mesh] = []

    def make(res: Dict[str, Any], targets: Iterable[str] = (TARGET,)) -> meshcore.Mesh:
        path = tmp_path / f"mesh{len(meshes)}.json"
        path.write_text(json.dumps(res))
        mesh = meshcore.Mesh.from_file(path, watch=False, seed=1)
        meshes.append(mesh)
        mesh.start()
        for t in targets:
            mesh.wait_ready(t, timeout=5)
        return mesh

    yield make
    for m in meshes:
        m.close()


class Scenario:
    """The shared mesh: round robin over three upstreams, a header-routed canary, a cluster with
    a failing host (retried on 5xx), one with a dead endpoint (retried on connect-failure), a slow
    host under a per-try timeout, a route timeout, a fault-aborted cluster, a direct response and
    a redirect."""

    def __init__(self, start: Any, make_mesh: Any) -> None:
        self.main = [start(f"main{i}") for i in range(3)]
        self.canary = start("canary")
        self.failing = start("failing", status=503)
        self.healthy = start("healthy")
        self.slow = start("slow", delay=1.0)
        self.faulty = start("faulty")
        self.dead = dead_port()
        retry_5xx = {"retry_on": "5xx", "num_retries": 2}
        self.clusters = {
            "main": [u.port for u in self.main],
            "canary": [self.canary.port],
            "flaky": [self.failing.port, self.healthy.port],
            "deadish": [self.dead, self.healthy.port],
            "slowish": [self.slow.port, self.healthy.port],
            "slow": [self.slow.port],
            "faulty": [self.faulty.port],
        }
        routes = [
            route("/", "canary", headers={"x-canary": "1"}),
            route("/retry", "flaky", retry=retry_5xx),
            route("/connect", "deadish", retry={"retry_on": "connect-failure", "num_retries": 2}),
            route("/pertry", "slowish", timeout="3s", retry={**retry_5xx, "per_try_timeout": "0.2s"}),
            route("/slow", "slow", timeout="0.3s"),
            route("/fault", "faulty"),
            {"name": "direct", "match": {"prefix": "/direct"},
             "direct_response": {"status": 200, "body": {"inline_string": "from the mesh"}}},
            {"name": "redirect", "match": {"prefix": "/old"}, "redirect": {"path_redirect": "/moved"}},
            route("/", "main"),
        ]
        fault = {"abort": {"http_status": 418, "percentage": {"numerator": 100, "denominator": "HUNDRED"}},
                 "upstream_cluster": "faulty"}
        self.mesh = make_mesh(resources(self.clusters, routes, fault=fault))

    def ports(self, cluster: str) -> List[int]:
        return list(self.clusters[cluster])

    def stat(self, cluster: str, name: str) -> int:
        return int(self.mesh.stats().get(cluster, {}).get(name, 0))

    def assert_no_active_requests(self) -> None:
        """Least-request accounting: every pick was released."""
        cfg = self.mesh.config(TARGET)
        for name, rt in cfg.clusters.items():
            for ep in rt.lb.endpoints:
                assert rt.lb.active_requests(ep) == 0, (name, ep.key)


@pytest.fixture
def scenario(upstreams, make_mesh) -> Scenario:
    return Scenario(upstreams, make_mesh)


# -- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A CA and a server certificate for ``HOST`` only (not for 127.0.0.1), made with openssl."""
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    try:
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=meshcore test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", f"/CN={HOST}")
        (d / "ext.cnf").write_text(f"subjectAltName=DNS:{HOST}\nbasicConstraints=CA:FALSE\n"
                                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                                   "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
        run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    except (OSError, subprocess.SubprocessError) as e:  # pragma: no cover - no openssl
        pytest.skip(f"cannot make a test certificate with openssl: {e}")
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem"), "key": str(d / "server.key")}


@pytest.fixture
def tls_scenario(upstreams, make_mesh, tls_files):
    """Two HTTPS upstreams behind ``TLS_TARGET``; returns ``(mesh, upstreams)``."""
    ups = []
    for i in range(2):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_files["cert"], tls_files["key"])
        ups.append(upstreams(f"tls{i}", tls=ctx))
    mesh = make_mesh(resources({"secure": [u.port for u in ups]}, [route("/", "secure")], targets=[TLS_TARGET]),
                     targets=[TLS_TARGET])
    return mesh, ups

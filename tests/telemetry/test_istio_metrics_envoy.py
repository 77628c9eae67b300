"""Istio's standard metrics through every client integration, against a real Envoy 1.40 acting as
the inbound sidecar of a server workload.

The server side: an app (HTTP and gRPC) behind Envoy, whose routes add the ``x-envoy-peer-metadata``
/ ``-id`` response headers a sidecar'd ``reviews-v2`` pod would send (``response_headers_to_add``
with a value built from istio/proxy's field list). The client side: a mesh bootstrapped like a
proxyless pod (node ID and metadata as pilot-agent writes them), fed by meshcore's control plane,
with ``mesh.telemetry.enable_istio_metrics()``.

Checked: destination labels from the peer's header (it wins over EDS), else from the endpoint's EDS
``istio.workload``; source labels from the node; our exchange headers reach the server and the
peer's never reach the application; failure cases give Envoy's flags and codes; a PromQL-shaped
query over two scrapes of ``mesh.prometheus_collector()`` finds the graph edge Kiali draws.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import grpc
import httpx
import pytest
import requests
from google.protobuf import struct_pb2

import meshcore
from envoy_process import HCM_TYPE, ROUTER_TYPE, EnvoyProcess, find_envoy, socket_address
from meshcore.controlplane import ControlPlane
from meshcore.integrations.grpc import mesh_channel
from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport
from meshcore.integrations.requests import MeshAdapter
from meshcore.telemetry import peer_metadata as pm
from meshcore.xds.client import Backoff
from meshcore.xds.resource_file import parse_resources

pytestmark = pytest.mark.envoy

NODE_ID = "sidecar~10.1.0.7~productpage-v1-6b746f74dc-9stvs.bookinfo~bookinfo.svc.cluster.local"
NODE_METADATA = {
    "NAME": "productpage-v1-6b746f74dc-9stvs", "NAMESPACE": "bookinfo", "WORKLOAD_NAME": "productpage-v1",
    "CLUSTER_ID": "Kubernetes", "MESH_ID": "cluster.local", "SERVICE_ACCOUNT": "bookinfo-productpage",
    "OWNER": "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/productpage-v1",
    "LABELS": {"app": "productpage", "version": "v1", "service.istio.io/canonical-name": "productpage",
               "service.istio.io/canonical-revision": "v1"},
}
REVIEWS = "reviews.bookinfo.svc.cluster.local"
RATINGS = "ratings.bookinfo.svc.cluster.local"
GRPC_HOST = "echo.bookinfo.svc.cluster.local"
REVIEWS_CLUSTER = f"outbound|9080||{REVIEWS}"
RATINGS_CLUSTER = f"outbound|9080||{RATINGS}"
GRPC_CLUSTER = f"outbound|7070||{GRPC_HOST}"
REVIEWS_URL = f"http://{REVIEWS}:9080"
RATINGS_URL = f"http://{RATINGS}:9080"
SERVICE = "meshcore.test.Echo"


def server_peer_header() -> str:
    """What the inbound sidecar of pod reviews-v2-5b64f47978-xs9zw sends back (the Struct of
    metadata_object.cc convertWorkloadMetadataToStruct, deterministic, base64)."""
    st = struct_pb2.Struct()
    st.fields["NAME"].string_value = "reviews-v2-5b64f47978-xs9zw"
    st.fields["NAMESPACE"].string_value = "bookinfo"
    st.fields["WORKLOAD_NAME"].string_value = "reviews-v2"
    st.fields["CLUSTER_ID"].string_value = "Kubernetes"
    labels = st.fields["LABELS"].struct_value
    labels.fields["service.istio.io/canonical-name"].string_value = "reviews"
    labels.fields["service.istio.io/canonical-revision"].string_value = "v2"
    labels.fields["app"].string_value = "reviews"
    labels.fields["version"].string_value = "v2"
    st.fields["OWNER"].string_value = "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v2"
    return base64.b64encode(st.SerializeToString(deterministic=True)).decode()


PEER_VALUE = server_peer_header()
PEER_ID = "sidecar~10.1.0.12~reviews-v2-5b64f47978-xs9zw.bookinfo~bookinfo.svc.cluster.local"


# -- the server workload: an app behind Envoy ---------------------------------------------------------


class App:
    """HTTP app: answers JSON with the exchange headers it received; ``/status/<n>`` answers n,
    ``/slow`` answers after 0.5 s."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.startswith("/slow"):
                    time.sleep(0.5)
                status = int(self.path.split("/")[2]) if self.path.startswith("/status/") else 200
                body = json.dumps({"peer_id": self.headers.get("x-envoy-peer-metadata-id"),
                                   "peer": self.headers.get("x-envoy-peer-metadata")}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up on /slow

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def grpc_app() -> Tuple[grpc.Server, int, Dict[str, Any]]:
    seen: Dict[str, Any] = {}

    def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.update(dict(context.invocation_metadata()))
        return b"hi " + request

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(3):
            yield str(i).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Hello": grpc.unary_unary_rpc_method_handler(hello),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Count": grpc.unary_stream_rpc_method_handler(count)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, seen


def _peer_headers() -> List[Dict[str, Any]]:
    return [{"header": {"key": "x-envoy-peer-metadata", "value": PEER_VALUE}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            {"header": {"key": "x-envoy-peer-metadata-id", "value": PEER_ID},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]


def _inbound(name: str, cluster: str) -> Dict[str, Any]:
    hcm = {"@type": HCM_TYPE, "stat_prefix": name, "codec_type": "AUTO",
           "route_config": {"name": name, "virtual_hosts": [{
               "name": "inbound", "domains": ["*"], "response_headers_to_add": _peer_headers(),
               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "5s"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}]}
    return {"name": name, "address": socket_address(0), "filter_chains": [{"filters": [
        {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}


def _static_cluster(name: str, port: int, h2: bool = False) -> Dict[str, Any]:
    c: Dict[str, Any] = {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}]}}
    if h2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return c


class SidecarEnvoy(EnvoyProcess):
    """Envoy as the inbound sidecar of the server workload (static configuration)."""

    def __init__(self, http_port: int, grpc_port: int) -> None:
        self.bootstrap = {
            "node": {"id": PEER_ID, "cluster": "reviews"},
            "admin": {"address": socket_address(0)},
            "static_resources": {
                "listeners": [_inbound("http_in", "app_http"), _inbound("grpc_in", "app_grpc")],
                "clusters": [_static_cluster("app_http", http_port), _static_cluster("app_grpc", grpc_port, True)],
            },
        }
        self.envoy_bin = find_envoy()
        self.log_level = "warning"
        self.startup_timeout = 30.0
        self.keep_tmp = False
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path = ""

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-sidecar-envoy-")
        cfg = os.path.join(self.tmpdir, "envoy.json")
        with open(cfg, "w") as f:
            json.dump(self.bootstrap, f)
        self._run_envoy(cfg)

    def close(self) -> None:
        self._stop(None)

    def port(self, name: str) -> int:
        return self._listener_ports()[0][name]


# -- the client workload: a proxyless mesh ---------------------------------------------------------------


def _lbe(port: int, workload: Optional[str] = None) -> Dict[str, Any]:
    e: Dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    if workload is not None:
        e["metadata"] = {"filter_metadata": {"istio": {"workload": workload}}}
    return e


def _eds(cluster: str, *lbes: Dict[str, Any]) -> Dict[str, Any]:
    return {"cluster_name": cluster, "endpoints": [{"locality": {"zone": "z1"}, "lb_endpoints": list(lbes)}]}


def _cluster(name: str, **extra: Any) -> Dict[str, Any]:
    return {"name": name, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}, "connect_timeout": "1s",
            **extra}


def _listener(target: str, routes: str, fault: bool = False) -> Dict[str, Any]:
    filters = []
    if fault:
        filters.append({"name": "envoy.filters.http.fault", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}})
    return {"name": target, "api_listener": {"api_listener": {
        "@type": HCM_TYPE, "rds": {"config_source": {"ads": {}}, "route_config_name": routes},
        "http_filters": filters}}}


def mesh_resources(envoy_http: int, envoy_grpc: int, app_port: int, dead_port: int) -> List[Any]:
    backoff = {"base_interval": "0.001s", "max_interval": "0.002s"}
    abort = {"envoy.filters.http.fault": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                                          "abort": {"http_status": 503, "percentage": {"numerator": 100}}}}
    reviews_routes = [
        {"name": "uh", "match": {"prefix": "/uh"}, "route": {"cluster": "outbound|9080|empty|" + REVIEWS}},
        {"name": "uf", "match": {"prefix": "/uf"}, "route": {"cluster": "outbound|9080|dead|" + REVIEWS}},
        {"name": "uo", "match": {"prefix": "/uo"}, "route": {"cluster": "outbound|9080|full|" + REVIEWS}},
        {"name": "fi", "match": {"prefix": "/fi"}, "route": {"cluster": REVIEWS_CLUSTER},
         "typed_per_filter_config": abort},
        {"name": "ut", "match": {"prefix": "/slow"}, "route": {"cluster": REVIEWS_CLUSTER, "timeout": "0.2s"}},
        {"name": "urx", "match": {"prefix": "/status/503"}, "route": {"cluster": REVIEWS_CLUSTER, "retry_policy": {
            "retry_on": "5xx", "num_retries": 2, "retry_back_off": backoff}}},
        {"name": "default", "match": {"prefix": "/", "headers": [{"name": "x-nr", "present_match": True,
                                                                  "invert_match": True}]},
         "route": {"cluster": REVIEWS_CLUSTER}},
    ]
    doc = {
        "listeners": [_listener(f"{REVIEWS}:9080", "reviews", fault=True), _listener(f"{RATINGS}:9080", "ratings"),
                      _listener(f"{GRPC_HOST}:7070", "echo")],
        "routes": [
            {"name": "reviews", "virtual_hosts": [{"name": "reviews", "domains": [REVIEWS, f"{REVIEWS}:9080"],
                                                   "routes": reviews_routes}]},
            {"name": "ratings", "virtual_hosts": [{"name": "ratings", "domains": ["*"], "routes": [
                {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": RATINGS_CLUSTER}}]}]},
            {"name": "echo", "virtual_hosts": [{"name": "echo", "domains": ["*"], "routes": [
                {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": GRPC_CLUSTER}}]}]},
        ],
        "clusters": [_cluster(REVIEWS_CLUSTER), _cluster(RATINGS_CLUSTER), _cluster(GRPC_CLUSTER),
                     _cluster("outbound|9080|empty|" + REVIEWS), _cluster("outbound|9080|dead|" + REVIEWS),
                     _cluster("outbound|9080|full|" + REVIEWS,
                              circuit_breakers={"thresholds": [{"max_requests": 0}]})],
        "endpoints": [
            # the EDS says reviews-v2-eds: the peer's header (reviews-v2) must win over it
            _eds(REVIEWS_CLUSTER, _lbe(envoy_http, "reviews-v2-eds;bookinfo;reviews-eds;v9;Kubernetes")),
            _eds(RATINGS_CLUSTER, _lbe(app_port, "ratings-v1;bookinfo;ratings;v1;Kubernetes")),
            _eds(GRPC_CLUSTER, _lbe(envoy_grpc, "echo-v1-eds;bookinfo;echo;v1;Kubernetes")),
            _eds("outbound|9080|empty|" + REVIEWS),
            _eds("outbound|9080|dead|" + REVIEWS, _lbe(dead_port)),
            _eds("outbound|9080|full|" + REVIEWS, _lbe(envoy_http)),
        ],
    }
    return [m for t in parse_resources(doc).values() for m in t.values()]


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    def __init__(self) -> None:
        self.app = App()
        self.grpc_server, grpc_port, self.grpc_seen = grpc_app()
        self.envoy = SidecarEnvoy(self.app.port, grpc_port).start()
        self.cp = ControlPlane().start()
        self.cp.set_resources(mesh_resources(self.envoy.port("http_in"), self.envoy.port("grpc_in"), self.app.port,
                                             _dead_port()))
        boot = {"xds_servers": [{"server_uri": self.cp.address, "channel_creds": [{"type": "insecure"}],
                                 "server_features": ["xds_v3"]}],
                "node": {"id": NODE_ID, "cluster": "productpage.bookinfo", "metadata": NODE_METADATA,
                         "locality": {"region": "r1", "zone": "z1"}}}
        self.mesh = meshcore.Mesh(boot, backoff=Backoff(initial=0.05, multiplier=1.6, jitter=0.2, maximum=0.5),
                                  seed=5)
        self.mesh.start()
        for t in (f"{REVIEWS}:9080", f"{RATINGS}:9080", f"{GRPC_HOST}:7070"):
            self.mesh.wait_ready(t, timeout=10)
        self.metrics = self.mesh.telemetry.enable_istio_metrics()

    def close(self) -> None:
        self.mesh.close()
        self.cp.stop()
        self.envoy.close()
        self.grpc_server.stop(0)
        self.app.close()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def metrics(world: World):
    world.metrics.reset()
    return world.metrics


# -- the client integrations, one call shape --------------------------------------------------------------


class Answer:
    def __init__(self, status: Optional[int], headers: Dict[str, str], body: Any, error: Optional[BaseException]):
        self.status, self.headers, self.body, self.error = status, {k.lower(): v for k, v in headers.items()}, body, error


def _httpx_sync(mesh: Any, url: str, headers: Dict[str, str]) -> Answer:
    with httpx.Client(transport=MeshTransport(mesh)) as client:
        try:
            r = client.get(url, headers=headers)
        except httpx.HTTPError as e:
            return Answer(None, {}, None, e)
        return Answer(r.status_code, dict(r.headers), r.content, None)


def _httpx_async(mesh: Any, url: str, headers: Dict[str, str]) -> Answer:
    async def main() -> Answer:
        async with httpx.AsyncClient(transport=AsyncMeshTransport(mesh)) as client:
            try:
                r = await client.get(url, headers=headers)
            except httpx.HTTPError as e:
                return Answer(None, {}, None, e)
            return Answer(r.status_code, dict(r.headers), r.content, None)
    return asyncio.run(main())


def _requests(mesh: Any, url: str, headers: Dict[str, str]) -> Answer:
    with requests.Session() as s:
        s.mount("http://", MeshAdapter(mesh))
        try:
            r = s.get(url, headers=headers, timeout=5)
        except requests.RequestException as e:
            return Answer(None, {}, None, e)
        return Answer(r.status_code, dict(r.headers), r.content, None)


def _aiohttp(mesh: Any, url: str, headers: Dict[str, str]) -> Answer:
    import aiohttp

    from meshcore.integrations.aiohttp import MeshSession

    async def main() -> Answer:
        async with MeshSession(mesh) as http:
            try:
                r = await http.get(url, headers=headers)
                body = await r.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                return Answer(None, {}, None, e)
            return Answer(r.status, dict(r.headers), body, None)
    return asyncio.run(main())


CLIENTS: Dict[str, Callable[[Any, str, Dict[str, str]], Answer]] = {
    "httpx-sync": _httpx_sync, "httpx-async": _httpx_async, "requests": _requests, "aiohttp": _aiohttp}


def series(metrics: Any, **match: str) -> List[Dict[str, Any]]:
    return [s for s in metrics.snapshot() if all(s["labels"][k] == v for k, v in match.items())]


SOURCE = {"reporter": "source", "source_workload": "productpage-v1", "source_workload_namespace": "bookinfo",
          "source_principal": "unknown", "source_app": "productpage", "source_version": "v1",
          "source_canonical_service": "productpage", "source_canonical_revision": "v1",
          "source_cluster": "Kubernetes", "connection_security_policy": "unknown"}


# -- destination labels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_destination_from_the_peers_metadata_header(world, metrics, client):
    for _ in range(3):
        a = CLIENTS[client](world.mesh, f"{REVIEWS_URL}/reviews/1", {})
        assert a.status == 200, a.error
        # the peer's exchange headers never reach the application; ours reached the server
        assert "x-envoy-peer-metadata" not in a.headers and "x-envoy-peer-metadata-id" not in a.headers
        seen = json.loads(a.body)
        assert seen["peer_id"] == NODE_ID
        assert pm.workload_of(pm.decode(seen["peer"])).workload_name == "productpage-v1"
    [s] = metrics.snapshot()
    assert s["requests"] == 3 and s["duration_ms"]["count"] == 3
    assert s["labels"] == {
        **SOURCE,
        "destination_workload": "reviews-v2", "destination_workload_namespace": "bookinfo",
        "destination_principal": "unknown", "destination_app": "reviews", "destination_version": "v2",
        "destination_service": REVIEWS, "destination_service_name": "reviews",
        "destination_service_namespace": "bookinfo", "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2", "destination_cluster": "Kubernetes", "request_protocol": "http",
        "response_flags": "-", "response_code": "200", "grpc_response_status": ""}
    assert s["response_bytes"]["sum"] == 3 * len(a.body)


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_destination_from_eds_metadata_without_a_sidecar(world, metrics, client):
    a = CLIENTS[client](world.mesh, f"{RATINGS_URL}/ratings/1", {})
    assert a.status == 200
    [s] = metrics.snapshot()
    labels = s["labels"]
    # istio.workload has no app/version/identity: unknown; canonical names from it
    assert {k: labels[k] for k in ("destination_workload", "destination_workload_namespace", "destination_app",
                                   "destination_version", "destination_canonical_service",
                                   "destination_canonical_revision", "destination_cluster", "destination_service",
                                   "destination_service_name", "destination_service_namespace")} == {
        "destination_workload": "ratings-v1", "destination_workload_namespace": "bookinfo",
        "destination_app": "unknown", "destination_version": "unknown", "destination_canonical_service": "ratings",
        "destination_canonical_revision": "v1", "destination_cluster": "Kubernetes", "destination_service": RATINGS,
        "destination_service_name": "ratings", "destination_service_namespace": "bookinfo"}


# -- failure cases ---------------------------------------------------------------------------------------------


FAILURES = [  # (path, extra headers, response_code, response_flags)
    ("/uh", {}, "503", "UH"),
    ("/uf", {}, "503", "UF"),
    ("/uo", {}, "503", "UO"),
    ("/fi", {}, "503", "FI"),
    ("/slow", {}, "504", "UT"),
    ("/status/503", {}, "503", "URX"),
    ("/nr", {"x-nr": "1"}, "404", "NR"),
]


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_failures_carry_envoys_flags_and_codes(world, metrics, client):
    for path, headers, _, _ in FAILURES:
        a = CLIENTS[client](world.mesh, f"{REVIEWS_URL}{path}", headers)
        assert a.status in (None, 503, 504, 404), (path, a.status)
    got = {(s["labels"]["response_code"], s["labels"]["response_flags"]) for s in metrics.snapshot()}
    assert got == {(code, flags) for _, _, code, flags in FAILURES}
    for s in metrics.snapshot():
        # no route, no cluster: Istio's Host-header fallback (with its port)
        host = f"{REVIEWS}:9080" if s["labels"]["response_flags"] == "NR" else REVIEWS
        assert s["labels"]["destination_service"] == host and s["requests"] == 1
        if s["labels"]["response_flags"] == "URX":  # answered by the server (via Envoy): its peer is known
            assert s["labels"]["destination_workload"] == "reviews-v2"
        if s["labels"]["response_flags"] in ("UH", "NR", "FI", "UO"):  # no endpoint picked: no peer at all
            assert s["labels"]["destination_workload"] == "unknown"
            assert s["labels"]["destination_canonical_revision"] == "latest"


# -- gRPC ---------------------------------------------------------------------------------------------------------


def test_grpc_unary_stream_and_status(world, metrics):
    with mesh_channel(world.mesh, f"{GRPC_HOST}:7070") as ch:
        hello = ch.unary_unary(f"/{SERVICE}/Hello", _registered_method=True)
        assert hello(b"a", timeout=5) == b"hi a"
        response, call = hello.with_call(b"b", timeout=5)
        assert response == b"hi b"
        names = {k for k, _ in call.initial_metadata()}
        assert "x-envoy-peer-metadata" not in names and "x-envoy-peer-metadata-id" not in names
        assert "server" in names  # the rest of the metadata is the call's own
        # our pair reached the server side (grpc-core shows an application only the -id key)
        assert world.grpc_seen["x-envoy-peer-metadata-id"] == NODE_ID
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(f"/{SERVICE}/Fail", _registered_method=True)(b"", timeout=5)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert list(ch.unary_stream(f"/{SERVICE}/Count", _registered_method=True)(b"", timeout=5)) == [b"0", b"1", b"2"]
        time.sleep(0.2)  # the stream's record is made when grpcio reports it done
    by_status = {s["labels"]["grpc_response_status"]: s for s in metrics.snapshot()}
    assert set(by_status) == {"0", "5"}
    ok = by_status["0"]
    # unary: 1 message each way; the server stream: 1 request, 3 responses (counted since 086df0e)
    assert ok["requests"] == 3 and ok["request_messages"] == 3 and ok["response_messages"] == 5
    for s in by_status.values():
        labels = s["labels"]
        assert (labels["request_protocol"], labels["response_code"], labels["response_flags"]) == ("grpc", "200", "-")
        # grpcio never shows the application the peer's x-envoy-peer-metadata; the gRPC integration
        # reads it off the connection (its PeerTap, 086df0e): the destination is the peer's, as for HTTP
        assert (labels["destination_workload"], labels["destination_service"], labels["destination_app"]) == (
            "reviews-v2", GRPC_HOST, "reviews")


def test_grpc_refusal_is_a_grpc_answer(world, metrics):
    with mesh_channel(world.mesh, f"{REVIEWS}:9080") as ch:
        with pytest.raises(grpc.RpcError) as err:  # /uh... : no endpoint in the cluster
            ch.unary_unary("/uh.Service/Call", _registered_method=True)(b"", timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    [s] = metrics.snapshot()
    assert (s["labels"]["request_protocol"], s["labels"]["response_code"], s["labels"]["grpc_response_status"],
            s["labels"]["response_flags"]) == ("grpc", "200", "14", "UH")


# -- the Kiali graph edge, PromQL-shaped ----------------------------------------------------------------------


def _scrape(mesh: Any) -> Dict[Tuple[Tuple[str, str], ...], float]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    reg = CollectorRegistry()
    reg.register(mesh.prometheus_collector())
    text = generate_latest(reg).decode()
    out: Dict[Tuple[Tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "istio_requests_total":
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _sum_by(delta: Dict[Tuple[Tuple[str, str], ...], float], by: Tuple[str, ...],
            where: Dict[str, str]) -> Dict[Tuple[str, ...], float]:
    """``sum by (<by>) (increase(istio_requests_total{<where>}[...]))`` over the delta of two scrapes."""
    out: Dict[Tuple[str, ...], float] = {}
    for labels, v in delta.items():
        d = dict(labels)
        if all(d.get(k) == val for k, val in where.items()) and v > 0:
            key = tuple(d[k] for k in by)
            out[key] = out.get(key, 0.0) + v
    return out


def test_kiali_graph_edge_over_two_scrapes(world, metrics):
    for _ in range(2):
        assert _requests(world.mesh, f"{REVIEWS_URL}/r", {}).status == 200
    first = _scrape(world.mesh)
    for _ in range(5):
        assert _httpx_sync(world.mesh, f"{REVIEWS_URL}/r", {}).status == 200
    _requests(world.mesh, f"{REVIEWS_URL}/uh", {})
    second = _scrape(world.mesh)
    text_labels = set(dict(next(iter(second))))
    assert {"reporter", "source_workload", "destination_service", "response_code", "response_flags",
            "destination_workload", "destination_canonical_service", "grpc_response_status"} <= text_labels
    delta = {k: v - first.get(k, 0.0) for k, v in second.items()}
    edges = _sum_by(delta, ("source_workload", "destination_service", "response_code"), {"reporter": "source"})
    assert edges == {("productpage-v1", REVIEWS, "200"): 5.0, ("productpage-v1", REVIEWS, "503"): 1.0}
    # Kiali's workload graph groups by both ends' workloads and namespaces
    nodes = _sum_by(delta, ("source_workload_namespace", "source_workload", "destination_workload_namespace",
                            "destination_workload"), {"reporter": "source", "response_code": "200"})
    assert nodes == {("bookinfo", "productpage-v1", "bookinfo", "reviews-v2"): 5.0}

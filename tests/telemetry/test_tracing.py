"""Tracing (``meshcore.telemetry.tracing``): a CLIENT span per request made through meshcore (plain
API, httpx, requests, aiohttp), named and tagged as Envoy's egress span with OpenTelemetry's HTTP
client attributes, and the W3C/B3/x-request-id headers a sidecar injects, checked at a real
loopback upstream that echoes the headers it received. Spans go to the OpenTelemetry SDK's
InMemorySpanExporter through a provider given to ``tracing.configure`` (the process-wide provider
can be set only once: its detection is tested in a subprocess)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List

import pytest

import opentelemetry.sdk  # noqa: E402,F401  (a test dependency: the test extras install it)

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

import meshcore  # noqa: E402
from meshcore.telemetry import record as record_mod  # noqa: E402
from meshcore.telemetry import tracing  # noqa: E402

HOST = "echo.default.svc.cluster.local"
TARGET = f"{HOST}:8080"
URL = f"http://{TARGET}"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class Echo:
    """A loopback server answering its received headers as JSON; ``fail_first`` 503s first."""

    def __init__(self) -> None:
        self.fail_first = 0
        self.seen: List[Dict[str, str]] = []
        echo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                headers = {k.lower(): v for k, v in self.headers.items()}
                echo.seen.append(headers)
                status = 200
                if echo.fail_first > 0:
                    echo.fail_first -= 1
                    status = 503
                data = json.dumps(headers).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resources(echo_port: int, dead: int) -> Dict[str, Any]:
    def cluster(name: str, ports: List[int]) -> Dict[str, Any]:
        return {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in ports]}]}

    backoff = {"base_interval": "0.001s", "max_interval": "0.002s"}
    routes = [
        {"name": "retry", "match": {"prefix": "/retry"}, "route": {"cluster": "echo", "retry_policy": {
            "retry_on": "5xx", "num_retries": 2, "retry_back_off": backoff}}},
        {"name": "connect", "match": {"prefix": "/connect"}, "route": {"cluster": "deadish", "retry_policy": {
            "retry_on": "connect-failure", "num_retries": 2, "retry_back_off": backoff}}},
        {"name": "dead", "match": {"prefix": "/dead"}, "route": {"cluster": "dead"}},
        {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "echo"}},
    ]
    names = {"echo": [echo_port], "deadish": [dead, echo_port], "dead": [dead]}
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}],
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "echo", "domains": [HOST, TARGET],
                                                          "routes": routes}]}],
        "clusters": [{"name": n, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                      "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s"} for n in names],
        "endpoints": [cluster(n, p) for n, p in names.items()],
    }


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


@pytest.fixture
def mesh(echo, tmp_path, mesh_cls):
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(_resources(echo.port, _dead_port())))
    m = mesh_cls.from_file(path, watch=False, seed=1)
    m.start()
    m.wait_ready(TARGET, timeout=5)
    yield m
    m.close()


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    before = record_mod.ACTIVE[0]
    assert tracing.configure(provider) is not None
    assert record_mod.ACTIVE[0] == before + 1
    yield exporter
    tracing.configure(None, attempt_spans=False)  # back to the process's own provider (none set here)
    assert tracing.TRACER[0] is None and record_mod.ACTIVE[0] == before


def _get(mesh: Any, path: str, headers: Any = None) -> Any:
    import httpx

    from meshcore.integrations.httpx import MeshTransport

    with httpx.Client(mounts={"all://*.svc.cluster.local:8080": MeshTransport(mesh)}) as c:
        return c.get(f"{URL}{path}", headers=headers)


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def _check_propagated(headers: Dict[str, str], span: Any, parent: Any = None) -> None:
    ctx = span.get_span_context()
    trace_id, span_id = _hex(ctx.trace_id, 32), _hex(ctx.span_id, 16)
    assert headers["traceparent"] == f"00-{trace_id}-{span_id}-01"
    assert headers["x-b3-traceid"] == trace_id and headers["x-b3-spanid"] == span_id
    assert headers["x-b3-sampled"] == "1"
    if parent is None:
        assert "x-b3-parentspanid" not in headers
    else:
        assert headers["x-b3-parentspanid"] == _hex(parent.span_id, 16)
    # a UUID4 with Envoy's trace mark: '9' (sampled) where the version digit is (UUIDRequestIDExtension)
    rid = headers["x-request-id"]
    assert uuid.UUID(rid) and rid[14] == "9" and rid[19] in "89ab"


# -- off ------------------------------------------------------------------------------------------


def test_off_without_a_provider(mesh, echo):
    assert tracing.TRACER[0] is None
    assert _get(mesh, "/a").status_code == 200
    assert not any(k in echo.seen[-1] for k in tracing.TRACE_HEADERS | {"x-request-id"})


def test_api_default_provider_is_off():
    # the API's own default (a proxy to the no-op provider) is not a configured provider
    assert tracing.refresh() is None


def test_global_provider_is_detected_in_a_fresh_process():
    code = """
import sys, meshcore
from meshcore.telemetry import tracing, record
assert not any(m.startswith('opentelemetry') for m in sys.modules)
assert tracing.refresh() is None
from opentelemetry import trace
assert tracing.refresh() is None and record.ACTIVE[0] == 0  # the proxy provider
from opentelemetry.sdk.trace import TracerProvider
trace.set_tracer_provider(TracerProvider())
assert tracing.refresh() is not None and record.ACTIVE[0] == 1
import os
os.environ['MESHCORE_TRACING'] = '0'
assert tracing.refresh() is None and record.ACTIVE[0] == 0
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# -- spans and headers ------------------------------------------------------------------------------


def test_httpx_span_and_headers(mesh, echo, spans):
    r = _get(mesh, "/items?x=1")
    assert r.status_code == 200
    (span,) = spans.get_finished_spans()
    assert span.name == f"egress {TARGET}"  # Envoy's egress span without a route decorator
    assert span.kind is SpanKind.CLIENT
    a = span.attributes
    assert a["http.request.method"] == "GET"
    assert a["url.full"] == f"{URL}/items?x=1"
    assert a["server.address"] == HOST and a["server.port"] == 8080
    assert a["network.peer.address"] == "127.0.0.1" and a["network.peer.port"] == echo.port
    assert a["http.response.status_code"] == 200
    assert a["upstream_cluster"] == "echo" and a["component"] == "proxy" and a["response_flags"] == "-"
    assert "error.type" not in a and span.status.status_code is StatusCode.UNSET
    seen = r.json()
    _check_propagated(seen, span)
    assert a["guid:x-request-id"] == seen["x-request-id"]


def test_child_of_the_current_span_and_incoming_request_id_kept(mesh, echo, spans):
    provider_tracer = tracing.TRACER[0]
    with provider_tracer.start_as_current_span("app") as app:
        seen = _get(mesh, "/a", headers={"x-request-id": "my-id"}).json()
    mesh_span = [s for s in spans.get_finished_spans() if s.name != "app"][0]
    assert mesh_span.parent.span_id == app.get_span_context().span_id
    assert mesh_span.context.trace_id == app.get_span_context().trace_id
    assert seen["x-request-id"] == "my-id"  # Envoy keeps an incoming x-request-id
    assert seen["x-b3-parentspanid"] == _hex(app.get_span_context().span_id, 16)
    assert seen["traceparent"].split("-")[2] == _hex(mesh_span.context.span_id, 16)


def test_application_traceparent_is_the_parent_and_is_replaced(mesh, echo, spans):
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    seen = _get(mesh, "/a", headers={"traceparent": incoming, "tracestate": "k=v"}).json()
    (span,) = spans.get_finished_spans()
    assert _hex(span.context.trace_id, 32) == "0af7651916cd43dd8448eb211c80319c"
    assert _hex(span.parent.span_id, 16) == "b7ad6b7169203331"
    assert seen["traceparent"] == f"00-0af7651916cd43dd8448eb211c80319c-{_hex(span.context.span_id, 16)}-01"
    assert seen["tracestate"] == "k=v"
    assert [h for h in echo.seen[-1] if h == "traceparent"] == ["traceparent"]


def test_unsampled_parent_is_followed(mesh, echo, spans):
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    seen = _get(mesh, "/a", headers={"traceparent": incoming}).json()
    assert spans.get_finished_spans() == ()  # ParentBased: not sampled, not recorded
    tid, sid, flags = seen["traceparent"].split("-")[1:]
    assert tid == "0af7651916cd43dd8448eb211c80319c" and flags == "00" and sid != "b7ad6b7169203331"
    assert seen["x-b3-sampled"] == "0" and seen["x-b3-parentspanid"] == "b7ad6b7169203331"


def test_sampler_decides_roots(mesh, echo):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    try:
        seen = _get(mesh, "/a").json()
    finally:
        tracing.configure(None)
    assert exporter.get_finished_spans() == ()
    assert seen["traceparent"].endswith("-00") and seen["x-b3-sampled"] == "0"


def test_retry_5xx_events_and_error(mesh, echo, spans):
    echo.fail_first = 1
    assert _get(mesh, "/retry").status_code == 200
    (span,) = spans.get_finished_spans()
    assert span.attributes["http.request.resend_count"] == 1
    assert [e.name for e in span.events] == ["upstream_attempt"]
    assert span.events[0].attributes["http.response.status_code"] == 503
    assert span.status.status_code is StatusCode.UNSET
    # both attempts carried the request span's context (no spawn_upstream_span)
    assert echo.seen[-1]["traceparent"] == echo.seen[-2]["traceparent"]
    assert echo.seen[-1]["x-request-id"] == echo.seen[-2]["x-request-id"]

    spans.clear()
    echo.fail_first = 5
    assert _get(mesh, "/retry").status_code == 503
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "503" and span.attributes["response_flags"] == "URX"


def test_attempt_spans(mesh, echo, spans):
    tracing.configure(tracing.TRACER[0]._meshcore_provider, attempt_spans=True)
    echo.fail_first = 1
    assert _get(mesh, "/retry").status_code == 200
    finished = spans.get_finished_spans()
    parent = [s for s in finished if s.parent is None][0]
    children = sorted((s for s in finished if s.parent is not None), key=lambda s: s.start_time)
    assert len(children) == 2 and all(c.parent.span_id == parent.context.span_id for c in children)
    assert children[0].status.status_code is StatusCode.ERROR and children[0].attributes["error.type"] == "503"
    assert children[0].attributes["canceled"] == "true" and "retry.count" not in children[0].attributes
    assert children[1].attributes["retry.count"] == "1"  # Envoy's tag (a string)
    # Envoy's spawn_upstream_span shape: the downstream span SERVER, its upstream spans CLIENT,
    # named "router <cluster> egress"
    assert parent.kind is SpanKind.SERVER and all(c.kind is SpanKind.CLIENT for c in children)
    assert {c.name for c in children} == {"router echo egress"}
    assert children[1].attributes["upstream_address"] == f"127.0.0.1:{echo.port}"
    _check_propagated(echo.seen[-2], children[0], parent.context)
    _check_propagated(echo.seen[-1], children[1], parent.context)


def test_connect_failure_without_answer_is_an_error(mesh, echo, spans):
    import httpx

    with pytest.raises(httpx.ConnectError):
        _get(mesh, "/dead")
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "connect-failure"
    assert span.attributes["response_flags"] == "UF"
    assert "http.response.status_code" not in span.attributes


def test_requests_and_aiohttp_and_plain_api(mesh, echo, spans):
    import requests

    from meshcore.integrations.requests import MeshAdapter

    s = requests.Session()
    s.mount("http://", MeshAdapter(mesh))
    seen = s.get(f"{URL}/r", headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}).json()
    (span,) = spans.get_finished_spans()
    assert _hex(span.context.trace_id, 32) == "0af7651916cd43dd8448eb211c80319c"
    _check_propagated(seen, span, span.parent)

    spans.clear()
    from meshcore.integrations.aiohttp import MeshSession

    async def go() -> Dict[str, str]:
        async with MeshSession(mesh, hosts=["*.svc.cluster.local"]) as http:
            async with http.get(f"{URL}/aio") as resp:
                return await resp.json()

    seen = asyncio.run(go())
    (span,) = spans.get_finished_spans()
    _check_propagated(seen, span)

    spans.clear()
    got: List[Any] = []

    def send(attempt: Any) -> Any:
        got.append(dict(tracing.headers_of(attempt)))
        return type("R", (), {"status_code": 204})()

    mesh.request(f"{URL}/plain").run(send)
    (span,) = spans.get_finished_spans()
    _check_propagated(got[0], span)
    assert span.attributes["http.response.status_code"] == 204
    assert tracing.headers_of(object()) == ()


def test_import_meshcore_does_not_import_opentelemetry():
    code = "import sys, meshcore; m = meshcore.Mesh; assert not any(k.startswith('opentelemetry') for k in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    assert meshcore is not None


def test_grpc_unary(mesh_cls, tmp_path, spans):
    from concurrent import futures

    import grpc

    from meshcore.integrations.grpc import mesh_channel

    def echo_md(request: bytes, context: Any) -> bytes:
        return json.dumps(dict(context.invocation_metadata())).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.Echo", {"Md": grpc.unary_unary_rpc_method_handler(echo_md)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    path = tmp_path / "grpc.json"
    path.write_text(json.dumps(_resources(port, _dead_port())))
    m = mesh_cls.from_file(path, watch=False, seed=1)
    try:
        m.start()
        m.wait_ready(TARGET, timeout=5)
        with mesh_channel(m, TARGET) as ch:
            seen = json.loads(ch.unary_unary("/t.Echo/Md")(b"", metadata=(("traceparent", "00-bad-bad-01"),)))
        (span,) = spans.get_finished_spans()
        assert span.name == f"egress {TARGET}" and span.attributes["http.request.method"] == "POST"
        assert span.attributes["rpc.grpc.status_code"] == 0
        _check_propagated(seen, span)  # (an invalid incoming traceparent: replaced, not a parent)
    finally:
        m.close()
        server.stop(None)

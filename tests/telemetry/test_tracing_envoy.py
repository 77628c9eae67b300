"""Traces: meshcore against a real Envoy 1.40 with its OpenTelemetry tracer.

Envoy runs as an outbound sidecar (listeners with ``traffic_direction: OUTBOUND``, the HCM's
``tracing.provider`` ``envoy.tracers.opentelemetry`` exporting over OTLP/gRPC to a TraceService
receiver this module runs); one listener without and one with ``spawn_upstream_span``. meshcore
gets the same routes (a resource file: API listener, the same route configuration) and traces into
the OpenTelemetry SDK (in-memory exporter) with ``tracing.configure(b3=False)`` (Envoy's
OpenTelemetry tracer propagates W3C only) and ``attempt_spans`` matching the listener. The same
requests go through both (success, decorated routes, a 503 retried into a 200, a 503 with the
retries exhausted, no route, a route timeout, the single-attempt form), to the same loopback
upstream, which records the headers it received. Per case the span trees must correspond: names,
kinds, parent/child structure, status, Envoy's tags, and the trace headers the upstream saw.

gRPC: a listener taking HTTP/2 to a grpcio upstream; grpcio through Envoy and meshcore's
``mesh_channel``: an OK call, an UNAVAILABLE one, no route (Envoy's gRPC tags, status, metadata).

B3 when configured: a third Envoy listener uses the Zipkin tracer (``envoy.tracers.zipkin``,
128-bit trace ids, to a collector this module runs), meshcore ``b3=True``: the B3 headers the
upstream sees (names, trace id, parent span id, sampled; the application's B3 continued) must
correspond.

Where meshcore differs (said in the assertions): an attempt span that timed out is ERROR in
meshcore (Envoy leaves its status unset but tags it ``error=true``); Envoy sends an empty
``tracestate`` header when there is none, meshcore none. Not compared: a request whose
application parent is unsampled (``-00``): Envoy's x-request-id mark is its connection manager's
own random-sampling decision (``9`` at 100 %) while its span follows the parent (not sampled);
meshcore has no such decision and marks ``4``, as its span.
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

import opentelemetry.sdk  # noqa: E402,F401  (a test dependency: the test extras install it)
import opentelemetry.proto  # noqa: E402,F401  (a test dependency: the test extras install it)

import grpc  # noqa: E402
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

import envoy_process as ep  # noqa: E402
from meshcore.errors import NoRoute, Unavailable  # noqa: E402
from meshcore.telemetry import tracing  # noqa: E402

pytestmark = pytest.mark.envoy

HOST = "echo.default.svc.cluster.local"
TARGET = f"{HOST}:8080"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
BACKOFF = {"base_interval": "0.001s", "max_interval": "0.002s"}
RETRY_5XX = {"retry_on": "5xx", "num_retries": 1, "retry_back_off": BACKOFF}

#: the route configuration both sides get (first match wins; no catch-all, so /nowhere is NR)
ROUTES = [
    {"name": "decnp", "match": {"prefix": "/decnp"}, "route": {"cluster": "echo"},
     "decorator": {"operation": "echo-op-np", "propagate": False}},
    {"name": "dec", "match": {"prefix": "/dec"}, "route": {"cluster": "echo"}, "decorator": {"operation": "echo-op"}},
    {"name": "ok", "match": {"prefix": "/ok"}, "route": {"cluster": "echo"}},
    {"name": "notfound", "match": {"prefix": "/nf"}, "route": {"cluster": "echo"}},
    {"name": "retry", "match": {"prefix": "/retry"}, "route": {"cluster": "echo", "retry_policy": RETRY_5XX}},
    {"name": "urx", "match": {"prefix": "/urx"}, "route": {"cluster": "echo", "retry_policy": RETRY_5XX}},
    {"name": "slow", "match": {"prefix": "/slow"}, "route": {"cluster": "echo", "timeout": "0.2s"}},
    {"name": "nc", "match": {"prefix": "/nc"}, "route": {"cluster": "missing"}},
]
#: validate_clusters off: Envoy accepts the route to a cluster it does not have (and answers NC)
ROUTE_CONFIG = {"name": "routes", "validate_clusters": False,
                "virtual_hosts": [{"name": "echo", "domains": ["*"], "routes": ROUTES}]}

#: case -> (path, Envoy's response code); "single" goes through meshcore's single-attempt form
CASES: Dict[str, Tuple[str, int]] = {
    "ok": ("/ok", 200),
    "decorated": ("/dec", 200),
    "decorated_not_propagated": ("/decnp", 200),
    "upstream_404": ("/nf", 404),
    "retried_503_then_200": ("/retry", 200),
    "retries_exhausted": ("/urx", 503),
    "no_route": ("/nowhere", 404),
    "route_timeout": ("/slow", 504),
    "no_cluster": ("/nc", 503),
    "single": ("/ok/single", 200),
    "continued": ("/ok/continued", 200),
}
APP_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
APP_REQUEST_ID = "11111111-2222-4333-8444-555555555555"
#: case -> the application's own headers: a sampled W3C parent with tracestate, a UUID4 request id
APP_HEADERS: Dict[str, Dict[str, str]] = {
    "continued": {"traceparent": APP_TRACEPARENT, "tracestate": "vendor=opaque", "x-request-id": APP_REQUEST_ID},
}
#: Envoy's tags meshcore sets, compared value for value (absent on one side = absent on the other)
TAGS = ("component", "upstream_cluster", "upstream_cluster.name", "http.method", "http.url", "http.status_code",
        "response_flags", "error")
ATTEMPT_TAGS = ("upstream_cluster", "http.status_code", "error", "retry.count", "canceled")


class Upstream:
    """A loopback HTTP/1.1 server recording ``(path, headers)``: /retry answers 503 to the first
    attempt of each x-request-id, /urx always 503, /nf 404, /slow after 0.5 s, the rest 200."""

    def __init__(self) -> None:
        self.seen: List[Tuple[str, Dict[str, str]]] = []
        self._count: Dict[str, int] = {}
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                headers = {k.lower(): v for k, v in self.headers.items()}
                upstream.seen.append((self.path, headers))
                rid = headers.get("x-request-id", "")
                n = upstream._count[rid] = upstream._count.get(rid, 0) + 1
                status = 200
                if self.path.startswith("/retry") and n == 1 or self.path.startswith("/urx"):
                    status = 503
                elif self.path.startswith("/nf"):
                    status = 404
                elif self.path.startswith("/slow"):
                    time.sleep(0.5)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:  # the client gave up (the timeout case)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def headers_for(self, path: str) -> List[Dict[str, str]]:
        return [h for p, h in self.seen if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver (``TraceService/Export``) keeping every span Envoy exports."""

    def __init__(self) -> None:
        self.spans: List[Any] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802  (the gRPC method)
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def close(self) -> None:
        self.server.stop(0)


class Span:
    """One span of either side in one shape: ids as hex, kind/status as names, attributes as a
    dict (Envoy's tags are strings; meshcore's ints are compared as strings)."""

    def __init__(self, name: str, kind: str, trace_id: str, span_id: str, parent_id: str, status: str,
                 attrs: Dict[str, Any], start: int = 0) -> None:
        self.name, self.kind, self.status = name, kind, status
        self.trace_id, self.span_id, self.parent_id = trace_id, span_id, parent_id
        self.attrs = attrs
        self.start = start  # epoch ns

    @classmethod
    def from_otlp(cls, s: Any) -> "Span":
        attrs = {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in s.attributes}
        kind = {2: "SERVER", 3: "CLIENT"}.get(s.kind, str(s.kind))
        status = {0: "UNSET", 1: "OK", 2: "ERROR"}[s.status.code]
        return cls(s.name, kind, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), status, attrs,
                   s.start_time_unix_nano)

    @classmethod
    def from_sdk(cls, s: Any) -> "Span":
        return cls(s.name, s.kind.name, format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"),
                   format(s.parent.span_id, "016x") if s.parent is not None else "", s.status.status_code.name,
                   dict(s.attributes), s.start_time or 0)

    def tag(self, key: str) -> Optional[str]:
        v = self.attrs.get(key)
        return None if v is None else str(v)

    def __repr__(self) -> str:
        return f"Span({self.name!r} {self.kind} {self.status} {self.span_id}<-{self.parent_id or '-'} {self.attrs})"


def _trees(spans: List[Span]) -> Dict[str, Tuple[Span, List[Span]]]:
    """path -> (root span, its children in attempt order: by start time, then ``retry.count``
    (the order spans arrive in is not theirs: an exporter's batches)) for each root span."""
    ids = {s.span_id for s in spans}
    roots = {s.span_id: s for s in spans if s.parent_id not in ids}  # no parent, or the application's
    out: Dict[str, Tuple[Span, List[Span]]] = {}
    for root in roots.values():
        url = root.tag("http.url") or ""
        path = url.split(TARGET, 1)[1] if TARGET in url else url
        children = [s for s in spans if s.parent_id == root.span_id]
        children.sort(key=lambda c: (c.start, int(c.tag("retry.count") or 0)))
        out[path] = (root, children)
    return out


# -- the two sides --------------------------------------------------------------------------------


def _envoy_config(upstream_port: int, otlp_port: int) -> Dict[str, Any]:
    def listener(name: str, spawn: bool) -> Dict[str, Any]:
        hcm = {"@type": HCM, "stat_prefix": name, "codec_type": "HTTP1", "route_config": ROUTE_CONFIG,
               "tracing": {"spawn_upstream_span": spawn, "provider": {
                   "name": "envoy.tracers.opentelemetry", "typed_config": {
                       "@type": OTEL, "service_name": "sidecar",
                       "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}, "timeout": "1s"}}}},
               "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}
        return {"name": name, "traffic_direction": "OUTBOUND", "address": ep.socket_address(0),
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}

    def cluster(name: str, port: int, h2: bool = False) -> Dict[str, Any]:
        endpoint = {"endpoint": {"address": ep.socket_address(port)}}
        c: Dict[str, Any] = {"name": name, "type": "STATIC", "connect_timeout": "0.5s", "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]}}
        if h2:
            c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
        return c

    return {
        "node": {"id": "sidecar~127.0.0.1~client.default~default.svc.cluster.local", "cluster": "client"},
        "static_resources": {"listeners": [listener("plain", False), listener("spawn", True)],
                             "clusters": [cluster("echo", upstream_port), cluster("otlp", otlp_port, True)]},
        # export every span at once (the default batches 5 spans or 5 s)
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {
            "tracing.opentelemetry.min_flush_spans": 1}}]},
        "admin": {"address": ep.socket_address(0)},
    }


class StaticEnvoy(ep.EnvoyProcess):
    error = config_error = AssertionError

    def __init__(self, config: Dict[str, Any]) -> None:
        self.config = config
        self.envoy_bin = ep.find_envoy(AssertionError)
        self.log_level = "warning"
        self.startup_timeout = 30.0
        self.keep_tmp = False
        self.tmpdir: Optional[str] = None
        self.admin_url: Optional[str] = None
        self._envoy = None
        self._log_path: Optional[str] = None

    def _start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="meshcore-tracing-")
        path = os.path.join(self.tmpdir, "envoy.json")
        with open(path, "w") as f:
            json.dump(self.config, f)
        self._run_envoy(path)
        self.ports = self._listener_ports()[0]

    def close(self) -> None:
        self._stop(None)


def _envoy_get(port: int, path: str, headers: Optional[Dict[str, str]] = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": TARGET, **(headers or {})})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def _meshcore_resources(upstream_port: int) -> Dict[str, Any]:
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}],
        "routes": [ROUTE_CONFIG],
        "clusters": [{"name": "echo", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                      "lb_policy": "ROUND_ROBIN", "connect_timeout": "0.5s"}],
        "endpoints": [{"cluster_name": "echo", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}]}]}],
    }


def _meshcore_get(mesh: Any, path: str, client: Any, exporter: InMemorySpanExporter,
                  headers: Optional[Dict[str, str]] = None) -> Any:
    """One case through meshcore: httpx, or the single-attempt form for /ok/single. No route:
    ``Mesh.request`` refuses the request; when ``telemetry.outcome.report_refusal`` does not make
    its span yet, the test makes it with the call ``report_refusal`` is to make."""
    url = f"http://{TARGET}{path}"
    if path == "/ok/single":
        with mesh.request(url) as attempt:
            conn = http.client.HTTPConnection(*attempt.address.rsplit(":", 1), timeout=attempt.timeout)
            headers = {"Host": attempt.authority, **dict(tracing.headers_of(attempt))}
            conn.request("GET", attempt.path, headers=headers)
            attempt.status = conn.getresponse().status
            conn.close()
        return attempt.status
    before = len(exporter.get_finished_spans())
    try:
        result: Any = client.get(url, headers=headers).status_code
    except Exception as e:  # noqa: BLE001  (the timeout: the span is what counts)
        result = type(e).__name__
    if path in ("/nowhere", "/nc") and len(exporter.get_finished_spans()) == before:  # report_refusal: not wired yet
        exc = NoRoute(TARGET, path) if path == "/nowhere" else Unavailable("cluster 'missing' not found")
        tracing.trace_refusal(mesh, TARGET, TARGET, "GET", path, None, exc, None if path == "/nowhere" else "missing")
    return result


@pytest.fixture(scope="module")
def envoy_side() -> Iterator[Dict[str, Any]]:
    """``{"plain"|"spawn": {"trees": {path: (root, children)}, "seen": Upstream}}`` from Envoy."""
    receiver = Receiver()
    out: Dict[str, Any] = {}
    try:
        for mode in ("plain", "spawn"):
            upstream = Upstream()
            try:
                with StaticEnvoy(_envoy_config(upstream.port, receiver.port)) as envoy:
                    receiver.spans.clear()
                    for case, (path, code) in CASES.items():
                        assert _envoy_get(envoy.ports[mode], path, APP_HEADERS.get(case)) == code, case
                    deadline = time.monotonic() + 10
                    while len(_trees([Span.from_otlp(s) for s in receiver.spans])) < len(CASES):
                        assert time.monotonic() < deadline, (receiver.spans, envoy.envoy_log()[-3000:])
                        time.sleep(0.05)
                    time.sleep(0.1)  # the last attempt spans (exported before their root, but be sure)
                    out[mode] = {"trees": _trees([Span.from_otlp(s) for s in receiver.spans]), "seen": upstream}
            finally:
                upstream.close()
        yield out
    finally:
        receiver.close()


@pytest.fixture(scope="module")
def meshcore_side(mesh_cls: Any, tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    import httpx

    from meshcore.integrations.httpx import MeshTransport

    out: Dict[str, Any] = {}
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        for mode in ("plain", "spawn"):
            upstream = Upstream()
            path = tmp_path_factory.mktemp("mesh") / "mesh.json"
            path.write_text(json.dumps(_meshcore_resources(upstream.port)))
            mesh = mesh_cls.from_file(path, watch=False, seed=1)
            try:
                mesh.start()
                mesh.wait_ready(TARGET, timeout=5)
                assert tracing.configure(provider, attempt_spans=mode == "spawn", b3=False) is not None
                exporter.clear()
                with httpx.Client(mounts={f"all://{TARGET}": MeshTransport(mesh)}) as client:
                    for case, (p, code) in CASES.items():
                        _meshcore_get(mesh, p, client, exporter, APP_HEADERS.get(case))
                out[mode] = {"trees": _trees([Span.from_sdk(s) for s in exporter.get_finished_spans()]),
                             "seen": upstream}
            finally:
                tracing.configure(None, attempt_spans=False, b3=True)
                mesh.close()
                upstream.close()
        yield out
    finally:
        provider.shutdown()


@pytest.fixture(scope="module")
def sides(envoy_side: Dict[str, Any], meshcore_side: Dict[str, Any]) -> Dict[str, Any]:
    return {"envoy": envoy_side, "meshcore": meshcore_side}


# -- the comparisons ------------------------------------------------------------------------------


def _case(sides: Dict[str, Any], mode: str, case: str) -> Tuple[Tuple[Span, List[Span]], Tuple[Span, List[Span]]]:
    path = CASES[case][0]
    envoy, ours = sides["envoy"][mode]["trees"], sides["meshcore"][mode]["trees"]
    assert path in envoy, (case, sorted(envoy))
    assert path in ours, (case, sorted(ours))
    return envoy[path], ours[path]


def _check_headers(side: Dict[str, Any], path: str, root: Span, carriers: List[Span], where: str,
                   tracestate: str = "") -> None:
    """What the upstream saw per attempt: W3C context of ``carriers[i]`` (the span the attempt
    carries), the request id the root's ``guid:x-request-id`` names (Envoy's trace mark '9'), no B3."""
    seen = side["seen"].headers_for(path)
    assert len(seen) == len(carriers), (where, seen, carriers)
    for headers, span in zip(seen, carriers):
        assert headers["traceparent"] == f"00-{root.trace_id}-{span.span_id}-01", (where, headers, span)
        assert headers["x-request-id"] == root.tag("guid:x-request-id"), (where, headers, root)
        assert headers["x-request-id"][14] == "9", where  # Envoy's "sampled" mark in the UUID
        assert headers.get("tracestate", "") == tracestate, where  # none: Envoy an empty header, meshcore none
        assert not any(k.startswith("x-b3-") or k == "b3" for k in headers), where


@pytest.mark.parametrize("case", list(CASES))
def test_request_span_matches_envoy(sides: Dict[str, Any], case: str) -> None:
    (envoy, e_children), (ours, o_children) = _case(sides, "plain", case)
    where = f"{case}\nenvoy    {envoy}\nmeshcore {ours}"
    assert envoy.kind == "CLIENT" and not e_children, where  # the case is what it says
    assert ours.name == envoy.name, where
    assert ours.kind == envoy.kind and not o_children, where
    assert ours.status == envoy.status, where
    for key in TAGS:
        assert ours.tag(key) == envoy.tag(key), (key, where)
    assert envoy.tag("http.status_code") == str(CASES[case][1]), where
    if case in APP_HEADERS:  # the application's trace continued, its request id marked sampled
        _, trace_id, parent_id, _ = APP_TRACEPARENT.split("-")
        assert (envoy.trace_id, envoy.parent_id) == (ours.trace_id, ours.parent_id) == (trace_id, parent_id), where
        assert envoy.tag("guid:x-request-id") == ours.tag("guid:x-request-id") == APP_REQUEST_ID.replace("-4", "-9", 1)
    else:
        assert not envoy.parent_id and not ours.parent_id, where


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("no_route", "no_cluster")])
def test_upstream_sees_the_same_trace_headers(sides: Dict[str, Any], case: str) -> None:
    path = CASES[case][0]
    for side in ("envoy", "meshcore"):
        root, _ = sides[side]["plain"]["trees"][path]
        seen = sides[side]["plain"]["seen"].headers_for(path)
        if side == "meshcore" and case == "single" and "traceparent" not in seen[0]:
            # the single-attempt form's attempt has its headers during the block once
            # Call.__enter__ calls lifecycle.begin_single (not wired yet); until then its span is
            # made when the block ends, and the upstream saw no trace headers
            assert not any(k in seen[0] for k in tracing.TRACE_HEADERS), seen
            continue
        # no spawn_upstream_span: every attempt carries the request span's context
        _check_headers(sides[side]["plain"], path, root, [root] * len(seen), f"{side} {case}",
                       APP_HEADERS.get(case, {}).get("tracestate", ""))
    e_seen = sides["envoy"]["plain"]["seen"].headers_for(path)
    o_seen = sides["meshcore"]["plain"]["seen"].headers_for(path)
    assert len(o_seen) == len(e_seen), case  # the same number of attempts
    for e, o in zip(e_seen, o_seen):
        assert o.get("x-envoy-decorator-operation") == e.get("x-envoy-decorator-operation"), (case, e, o)


@pytest.mark.parametrize("case", list(CASES))
def test_attempt_spans_match_envoy_spawn_upstream_span(sides: Dict[str, Any], case: str) -> None:
    (envoy, e_children), (ours, o_children) = _case(sides, "spawn", case)
    where = f"{case}\nenvoy    {envoy} {e_children}\nmeshcore {ours} {o_children}"
    # Envoy: the downstream span is SERVER with spawn_upstream_span, one CLIENT child per attempt
    assert envoy.kind == "SERVER", where
    assert (ours.name, ours.kind, ours.status) == (envoy.name, envoy.kind, envoy.status), where
    for key in TAGS:
        assert ours.tag(key) == envoy.tag(key), (key, where)
    assert len(o_children) == len(e_children), where
    for i, (e, o) in enumerate(zip(e_children, o_children)):
        assert (o.name, o.kind) == (e.name, e.kind) == ("router echo egress", "CLIENT"), (i, where)
        assert o.trace_id == ours.trace_id and e.trace_id == envoy.trace_id, where
        for key in ATTEMPT_TAGS:
            assert o.tag(key) == e.tag(key), (key, i, where)
        # each side has its own upstream: the endpoint each side sent to
        assert e.tag("upstream_address") == f"127.0.0.1:{sides['envoy']['spawn']['seen'].port}", (i, where)
        assert o.tag("upstream_address") == f"127.0.0.1:{sides['meshcore']['spawn']['seen'].port}", (i, where)
        if e.tag("http.status_code") == "0":  # timed out: Envoy leaves the status unset, meshcore ERROR
            assert (e.status, o.status) == ("UNSET", "ERROR"), (i, where)
        else:
            assert o.status == e.status, (i, where)
    path = CASES[case][0]
    if e_children:
        tracestate = APP_HEADERS.get(case, {}).get("tracestate", "")
        _check_headers(sides["envoy"]["spawn"], path, envoy, e_children, f"envoy {case}", tracestate)
        o_seen = sides["meshcore"]["spawn"]["seen"].headers_for(path)
        if o_seen and "traceparent" in o_seen[0]:
            _check_headers(sides["meshcore"]["spawn"], path, ours, o_children, f"meshcore {case}", tracestate)


# -- B3 (Envoy's Zipkin tracer) -------------------------------------------------------------------

ZIPKIN = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
APP_B3 = {"x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124", "x-b3-spanid": "a2fb4a1d1a96d312", "x-b3-sampled": "1"}
#: case -> (path, the application's headers)
B3_CASES: Dict[str, Tuple[str, Dict[str, str]]] = {
    "root": ("/ok/b3-root", {}),
    "retried": ("/retry/b3", {}),
    "continued": ("/ok/b3-in", APP_B3),
}


class Collector:
    """A Zipkin HTTP collector that accepts (and drops) what Envoy posts."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

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


def _zipkin_config(upstream_port: int, collector_port: int) -> Dict[str, Any]:
    config = _envoy_config(upstream_port, collector_port)
    listener = config["static_resources"]["listeners"][0]
    listener["name"] = "zipkin"
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "zipkin"
    hcm["tracing"] = {"provider": {"name": "envoy.tracers.zipkin", "typed_config": {
        "@type": ZIPKIN, "collector_cluster": "otlp", "collector_endpoint": "/api/v2/spans",
        "collector_endpoint_version": "HTTP_JSON", "trace_id_128bit": True, "shared_span_context": False}}}
    config["static_resources"]["listeners"] = [listener]
    del config["static_resources"]["clusters"][1]["typed_extension_protocol_options"]  # HTTP/1.1 collector
    return config


@pytest.fixture(scope="module")
def b3_sides(mesh_cls: Any, tmp_path_factory: Any) -> Iterator[Dict[str, Upstream]]:
    """``{"envoy"|"meshcore": Upstream}`` once every B3 case went through that side."""
    import httpx

    from meshcore.integrations.httpx import MeshTransport

    out: Dict[str, Upstream] = {}
    collector = Collector()
    upstreams = {"envoy": Upstream(), "meshcore": Upstream()}
    try:
        with StaticEnvoy(_zipkin_config(upstreams["envoy"].port, collector.port)) as envoy:
            for path, headers in B3_CASES.values():
                conn = http.client.HTTPConnection("127.0.0.1", envoy.ports["zipkin"], timeout=5)
                conn.request("GET", path, headers={"Host": TARGET, **headers})
                assert conn.getresponse().status == 200
                conn.close()
        out["envoy"] = upstreams["envoy"]
        path = tmp_path_factory.mktemp("mesh") / "mesh.json"
        path.write_text(json.dumps(_meshcore_resources(upstreams["meshcore"].port)))
        provider = TracerProvider()
        mesh = mesh_cls.from_file(path, watch=False, seed=1)
        try:
            mesh.start()
            mesh.wait_ready(TARGET, timeout=5)
            tracing.configure(provider, attempt_spans=False, b3=True)
            with httpx.Client(mounts={f"all://{TARGET}": MeshTransport(mesh)}) as client:
                for path_, headers in B3_CASES.values():
                    assert client.get(f"http://{TARGET}{path_}", headers=headers).status_code == 200
        finally:
            tracing.configure(None, attempt_spans=False, b3=True)
            mesh.close()
            provider.shutdown()
        out["meshcore"] = upstreams["meshcore"]
        yield out
    finally:
        collector.close()
        for u in upstreams.values():
            u.close()


@pytest.mark.parametrize("case", list(B3_CASES))
def test_b3_headers_match_envoys_zipkin_tracer(b3_sides: Dict[str, Upstream], case: str) -> None:
    path, app = B3_CASES[case]
    sides = {side: [{k: v for k, v in h.items() if k.startswith("x-b3-")} for h in up.headers_for(path)]
             for side, up in b3_sides.items()}
    where = f"{case}: {sides}"
    envoy, ours = sides["envoy"], sides["meshcore"]
    assert len(envoy) == len(ours) == (2 if case == "retried" else 1), where
    for e, o in zip(envoy, ours):
        assert set(o) == set(e), where  # the same B3 headers
        assert len(o["x-b3-traceid"]) == len(e["x-b3-traceid"]) == 32 and len(o["x-b3-spanid"]) == 16, where
        assert o["x-b3-sampled"] == e["x-b3-sampled"] == "1", where
        if app:  # the application's trace continued: its trace id, its span the parent
            assert o["x-b3-traceid"] == e["x-b3-traceid"] == app["x-b3-traceid"], where
            assert o["x-b3-parentspanid"] == e["x-b3-parentspanid"] == app["x-b3-spanid"], where
            assert o["x-b3-spanid"] != app["x-b3-spanid"] and e["x-b3-spanid"] != app["x-b3-spanid"], where
        else:  # a new root: no parent
            assert "x-b3-parentspanid" not in o, where
    assert envoy[0] == envoy[-1] and ours[0] == ours[-1], where  # every attempt carries the request span's


# -- gRPC (Envoy's gRPC tags) ---------------------------------------------------------------------

#: case -> (method, the gRPC status the client gets)
GRPC_CASES: Dict[str, Tuple[str, int]] = {
    "ok": ("/x.Echo/Ok", 0),
    "unavailable": ("/x.Echo/Fail", 14),
    "no_route": ("/y.Other/M", 12),
}
GRPC_TAGS = TAGS + ("grpc.status_code", "grpc.path", "grpc.authority", "grpc.content_type")
H2_OPTIONS = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}
GRPC_ROUTES = {"name": "routes", "virtual_hosts": [{"name": "grpc", "domains": ["*"], "routes": [
    {"name": "echo", "match": {"prefix": "/x.Echo/"}, "route": {"cluster": "grpc"}}]}]}


class GrpcUpstream:
    """A grpcio server: ``/x.Echo/Ok`` answers, ``/x.Echo/Fail`` aborts UNAVAILABLE; the
    invocation metadata of each call is kept (``seen``: (method, {key: value}))."""

    def __init__(self) -> None:
        self.seen: List[Tuple[str, Dict[str, str]]] = []

        def ok(request: bytes, context: Any) -> bytes:
            self.seen.append(("/x.Echo/Ok", dict(context.invocation_metadata())))
            return b"ok"

        def fail(request: bytes, context: Any) -> bytes:
            self.seen.append(("/x.Echo/Fail", dict(context.invocation_metadata())))
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("x.Echo", {
            "Ok": grpc.unary_unary_rpc_method_handler(ok), "Fail": grpc.unary_unary_rpc_method_handler(fail)})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)


def _grpc_call(channel: Any, method: str) -> int:
    try:
        channel.unary_unary(method)(b"hi", timeout=3)
        return 0
    except grpc.RpcError as e:
        return e.code().value[0]


@pytest.fixture(scope="module")
def grpc_sides(mesh_cls: Any, tmp_path_factory: Any) -> Iterator[Dict[str, Any]]:
    """``{"envoy"|"meshcore": {"trees": ..., "seen": GrpcUpstream}}`` for the gRPC cases."""
    from meshcore.integrations.grpc import mesh_channel

    out: Dict[str, Any] = {}
    receiver = Receiver()
    upstreams = {"envoy": GrpcUpstream(), "meshcore": GrpcUpstream()}
    try:
        config = _envoy_config(upstreams["envoy"].port, receiver.port)
        listener = config["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm.update(codec_type="AUTO", route_config={**GRPC_ROUTES, "name": "grpc-routes"})
        config["static_resources"]["listeners"] = [listener]
        config["static_resources"]["clusters"][0].update(name="grpc", typed_extension_protocol_options=H2_OPTIONS)
        config["static_resources"]["clusters"][0]["load_assignment"]["cluster_name"] = "grpc"
        with StaticEnvoy(config) as envoy:
            channel = grpc.insecure_channel(f"127.0.0.1:{envoy.ports['plain']}",
                                            options=[("grpc.default_authority", TARGET)])
            try:
                for case, (method, code) in GRPC_CASES.items():
                    assert _grpc_call(channel, method) == code, case
            finally:
                channel.close()
            deadline = time.monotonic() + 10
            while len(receiver.spans) < len(GRPC_CASES):
                assert time.monotonic() < deadline, envoy.envoy_log()[-3000:]
                time.sleep(0.05)
        out["envoy"] = {"trees": _trees([Span.from_otlp(s) for s in receiver.spans]), "seen": upstreams["envoy"]}

        resources = _meshcore_resources(upstreams["meshcore"].port)
        resources["routes"] = [GRPC_ROUTES]
        resources["clusters"][0]["name"] = resources["endpoints"][0]["cluster_name"] = "grpc"
        path = tmp_path_factory.mktemp("mesh") / "mesh.json"
        path.write_text(json.dumps(resources))
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        mesh = mesh_cls.from_file(path, watch=False, seed=1)
        try:
            mesh.start()
            mesh.wait_ready(TARGET, timeout=5)
            tracing.configure(provider, attempt_spans=False, b3=False)
            channel = mesh_channel(mesh, TARGET)
            try:
                for case, (method, code) in GRPC_CASES.items():
                    before = len(exporter.get_finished_spans())
                    assert _grpc_call(channel, method) == code, case
                    if case == "no_route" and len(exporter.get_finished_spans()) == before:  # report_refusal
                        tracing.trace_refusal(mesh, TARGET, TARGET, "POST", method,
                                              [("content-type", "application/grpc")], NoRoute(TARGET, method))
            finally:
                channel.close()
        finally:
            tracing.configure(None, attempt_spans=False, b3=True)
            mesh.close()
            provider.shutdown()
        out["meshcore"] = {"trees": _trees([Span.from_sdk(s) for s in exporter.get_finished_spans()]),
                           "seen": upstreams["meshcore"]}
        yield out
    finally:
        receiver.close()
        for u in upstreams.values():
            u.close()


@pytest.mark.parametrize("case", list(GRPC_CASES))
def test_grpc_span_matches_envoy(grpc_sides: Dict[str, Any], case: str) -> None:
    method, code = GRPC_CASES[case]
    envoy, _ = grpc_sides["envoy"]["trees"][method]
    ours, children = grpc_sides["meshcore"]["trees"][method]
    where = f"{case}\nenvoy    {envoy}\nmeshcore {ours}"
    assert envoy.tag("grpc.status_code") == str(code), where  # the case is what it says
    assert (ours.name, ours.kind, ours.status) == (envoy.name, envoy.kind, envoy.status), where
    assert not children, where
    for key in GRPC_TAGS:
        assert ours.tag(key) == envoy.tag(key), (key, where)
    for side, root in (("envoy", envoy), ("meshcore", ours)):
        seen = [m for p, m in grpc_sides[side]["seen"].seen if p == method]
        assert len(seen) == (0 if case == "no_route" else 1), (side, where)
        for metadata in seen:
            assert metadata["traceparent"] == f"00-{root.trace_id}-{root.span_id}-01", (side, metadata)
            assert metadata["x-request-id"] == root.tag("guid:x-request-id"), (side, metadata)
            assert metadata["x-request-id"][14] == "9", (side, metadata)

"""Tracing of the forms without a router loop and of the route decorator, against a real loopback
upstream that echoes the headers it received (spans to the SDK's in-memory exporter):

* the single-attempt form (``with mesh.request(...) as attempt``): its span begun with the attempt
  (``lifecycle.begin_single``, the attempt then carries its headers) or made when the block ends;
  refused before its attempt (no healthy upstream);
* a request ``Mesh.request`` refuses (``tracing.trace_refusal``: no route, no cluster, gRPC);
* what a gRPC stream would drive (``tracing.begin`` / ``Trace.attempt`` / ``Trace.end``);
* the route decorator (span name, ``x-envoy-decorator-operation``), the application's own
  x-request-id (Envoy's trace mark), B3 on and off.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any, Dict, List

import pytest

import opentelemetry.sdk  # noqa: E402,F401  (a test dependency: the test extras install it)

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from meshcore.errors import MeshError, NoRoute, Unavailable  # noqa: E402
from meshcore.telemetry import record as record_mod  # noqa: E402
from meshcore.telemetry import tracing  # noqa: E402
from telemetry.test_tracing import HCM, HOST, ROUTER, TARGET, URL, _hex, echo  # noqa: E402,F401  (echo: the fixture)


def _resources(echo_port: int) -> Dict[str, Any]:
    routes = [
        {"name": "decnp", "match": {"prefix": "/decnp"}, "route": {"cluster": "echo"},
         "decorator": {"operation": "quiet-op", "propagate": False}},
        {"name": "dec", "match": {"prefix": "/dec"}, "route": {"cluster": "echo"},
         "decorator": {"operation": "reviews:9080/*"}},
        {"name": "empty", "match": {"prefix": "/empty"}, "route": {"cluster": "empty"}},
        {"name": "default", "match": {"prefix": "/ok"}, "route": {"cluster": "echo"}},
    ]
    eps = {"echo": [echo_port], "empty": []}
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}],
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "echo", "domains": [HOST, TARGET],
                                                          "routes": routes}]}],
        "clusters": [{"name": n, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                      "lb_policy": "ROUND_ROBIN", "connect_timeout": "1s"} for n in eps],
        "endpoints": [{"cluster_name": n, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in ports]}]} for n, ports in eps.items()],
    }


@pytest.fixture
def mesh(echo, tmp_path, mesh_cls):
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(_resources(echo.port)))
    m = mesh_cls.from_file(path, watch=False, seed=1)
    m.start()
    m.wait_ready(TARGET, timeout=5)
    yield m
    m.close()


def _provider(sampler: Any = None) -> Any:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def spans():
    provider, exporter = _provider()
    before = record_mod.ACTIVE[0]
    assert tracing.configure(provider) is not None
    yield exporter
    tracing.configure(None, attempt_spans=False, b3=True)
    assert tracing.TRACER[0] is None and record_mod.ACTIVE[0] == before
    assert not tracing._SINGLE and not tracing._PENDING


def _send(attempt: Any, headers: Any = ()) -> Dict[str, str]:
    host, port = attempt.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", attempt.path, headers={"Host": attempt.authority, **dict(headers)})
        r = conn.getresponse()
        attempt.status = r.status
        return json.loads(r.read())
    finally:
        conn.close()


def _plain(mesh: Any, path: str, headers: Any = None) -> Dict[str, str]:
    seen: List[Dict[str, str]] = []

    def send(a: Any) -> Any:
        seen.append(_send(a, tracing.headers_of(a)))
        return a

    mesh.request(f"{URL}{path}", headers=headers).run(send)
    return seen[-1]


# -- the single-attempt form ----------------------------------------------------------------------


def test_single_form_span_made_when_the_block_ends(mesh, echo, spans):
    # tracing turned on inside the block: the span is made when the block ends, from the call's start
    provider = tracing.TRACER[0]._meshcore_provider
    tracing.configure(None)
    call = mesh.request(f"{URL}/ok/1")
    before_ns = time.time_ns()
    with call as attempt:
        tracing.configure(provider)
        assert tracing.headers_of(attempt) == ()  # not begun: nothing to send
        time.sleep(0.02)
        _send(attempt)
    (span,) = spans.get_finished_spans()
    assert span.name == f"egress {TARGET}" and span.kind is SpanKind.CLIENT
    assert span.start_time <= before_ns and span.end_time - span.start_time >= 20_000_000  # from the call's start
    a = span.attributes
    assert a["http.status_code"] == "200" and a["response_flags"] == "-" and a["upstream_cluster"] == "echo"
    assert span.status.status_code is StatusCode.UNSET


def test_single_form_begun_with_its_attempt_carries_the_headers(mesh, echo, spans):
    call = mesh.request(f"{URL}/ok/2")
    with call as attempt:  # (Call.__enter__ begins the span: lifecycle.begin_single)
        assert spans.get_finished_spans() == ()
        seen = _send(attempt, tracing.headers_of(attempt))
        attempt.status = 503
    (span,) = spans.get_finished_spans()
    ctx = span.get_span_context()
    assert seen["traceparent"] == f"00-{_hex(ctx.trace_id, 32)}-{_hex(ctx.span_id, 16)}-01"
    assert seen["x-request-id"] == span.attributes["guid:x-request-id"]
    assert span.attributes["http.status_code"] == "503" and span.attributes["error"] == "true"
    assert span.status.status_code is StatusCode.ERROR


def test_single_form_refused_before_its_attempt(mesh, echo, spans):
    with pytest.raises(Unavailable):
        with mesh.request(f"{URL}/empty"):
            pass
    (span,) = spans.get_finished_spans()
    a = span.attributes
    assert a["http.status_code"] == "503" and a["response_flags"] == "UH" and a["error"] == "true"
    assert a["upstream_cluster"] == "empty"
    assert span.status.status_code is StatusCode.ERROR


def test_single_form_with_attempt_spans(mesh, echo, spans):
    tracing.configure(tracing.TRACER[0]._meshcore_provider, attempt_spans=True)
    with mesh.request(f"{URL}/ok/3") as attempt:
        _send(attempt)
    child, parent = spans.get_finished_spans()
    assert parent.kind is SpanKind.SERVER and child.kind is SpanKind.CLIENT
    assert child.parent.span_id == parent.context.span_id and child.name == "router echo egress"
    assert child.attributes["upstream_address"] == f"127.0.0.1:{echo.port}"


# -- requests refused by Mesh.request --------------------------------------------------------------


def test_trace_refusal_no_route_in_the_applications_trace(mesh, spans):
    tracer = tracing.TRACER[0]._meshcore_provider.get_tracer("app")
    with tracer.start_as_current_span("handler") as app:
        with pytest.raises(NoRoute):
            mesh.request(f"{URL}/nowhere")  # (Mesh.request's refusal calls trace_refusal)
    (span,) = [s for s in spans.get_finished_spans() if s.name != "handler"]
    assert span.name == f"egress {TARGET}" and span.kind is SpanKind.CLIENT
    assert span.parent.span_id == app.get_span_context().span_id
    a = span.attributes
    assert (a["http.status_code"], a["response_flags"]) == ("404", "NR")
    assert "error" not in a and "upstream_cluster" not in a  # Envoy: no error tag for a 404, no cluster
    assert a["http.url"] == f"{URL}/nowhere" and a["guid:x-request-id"][14] == "9"
    assert span.status.status_code is StatusCode.ERROR  # 4xx on a CLIENT span


def test_trace_refusal_no_cluster_and_grpc(mesh, spans):
    tracing.trace_refusal(mesh, TARGET, TARGET, "GET", "/x", [("x-request-id", "rid")],
                          MeshError("cluster 'gone' not found"), "gone", "r1")
    tracing.trace_refusal(mesh, TARGET, TARGET, "POST", "/pkg.Svc/M", {"content-type": "application/grpc"},
                          NoRoute(TARGET, "/pkg.Svc/M"))
    nc, grpc_nr = spans.get_finished_spans()
    assert (nc.attributes["http.status_code"], nc.attributes["response_flags"]) == ("503", "NC")
    assert nc.attributes["error"] == "true" and nc.attributes["route_name"] == "r1"
    assert "upstream_cluster" not in nc.attributes  # Envoy: no cluster found, no tag
    assert nc.attributes["guid:x-request-id"] == "rid"  # not a UUID: kept as it is
    assert nc.status.status_code is StatusCode.ERROR
    # a gRPC request: Envoy answers 200 with grpc-status UNIMPLEMENTED (12) for a 404
    a = grpc_nr.attributes
    assert (a["http.status_code"], a["grpc.status_code"], a["error"]) == ("200", "12", "true")
    assert grpc_nr.status.status_code is StatusCode.ERROR


def test_trace_refusal_off_without_tracing(mesh):
    assert tracing.TRACER[0] is None
    tracing.trace_refusal(mesh, TARGET, TARGET, "GET", "/x", None, NoRoute(TARGET, "/x"))  # nothing, no error


# -- what a gRPC stream drives ---------------------------------------------------------------------


def test_trace_api_for_streams(mesh, echo, spans):
    call = mesh.request(f"{URL}/ok/stream", "POST", {"content-type": "application/grpc"})
    tr = tracing.begin(call)
    a = call.start_attempt()
    tr.attempt(a)
    headers = dict(tracing.headers_of(a))
    assert headers["traceparent"].split("-")[2] == _hex(tr.span.get_span_context().span_id, 16)
    a.finish(200, 14)  # the stream ended with grpc-status UNAVAILABLE
    tr.end(None, None)
    (span,) = spans.get_finished_spans()
    assert tracing.headers_of(a) == ()
    a_ = span.attributes
    assert (a_["http.status_code"], a_["grpc.status_code"], a_["error"]) == ("200", "14", "true")
    assert (a_["grpc.path"], a_["grpc.content_type"]) == ("/ok/stream", "application/grpc")
    assert span.status.status_code is StatusCode.ERROR


# -- decorator, request id, B3 ---------------------------------------------------------------------


def test_decorator_names_the_span_and_is_propagated(mesh, echo, spans):
    seen = _plain(mesh, "/dec")
    quiet = _plain(mesh, "/decnp", {"x-envoy-decorator-operation": "app-op"})
    replaced = _plain(mesh, "/dec", {"x-envoy-decorator-operation": "app-op"})
    kept = _plain(mesh, "/ok", {"x-envoy-decorator-operation": "app-op"})
    names = [s.name for s in spans.get_finished_spans()]
    assert names == ["reviews:9080/*", "quiet-op", "reviews:9080/*", f"egress {TARGET}"]
    assert seen["x-envoy-decorator-operation"] == "reviews:9080/*"
    assert quiet["x-envoy-decorator-operation"] == "app-op"  # propagate=false: the application's stays
    assert replaced["x-envoy-decorator-operation"] == "reviews:9080/*"  # Envoy overwrites it
    assert kept["x-envoy-decorator-operation"] == "app-op"


def test_decorator_not_sent_without_tracing(mesh, echo):
    assert "x-envoy-decorator-operation" not in _plain(mesh, "/dec")


def test_applications_request_id_gets_envoys_trace_mark(mesh, echo, spans):
    rid = "11111111-2222-4333-8444-555555555555"
    seen = _plain(mesh, "/ok", {"x-request-id": rid})
    assert seen["x-request-id"] == "11111111-2222-9333-8444-555555555555"
    provider, exporter = _provider(ALWAYS_OFF)
    tracing.configure(provider)
    seen = _plain(mesh, "/ok", {"x-request-id": rid})
    assert seen["x-request-id"] == rid  # '4': not traced
    made = _plain(mesh, "/ok")
    assert made["x-request-id"][14] == "4" and made["traceparent"].endswith("-00")
    assert exporter.get_finished_spans() == ()


def test_b3_single_header_and_unsampled(mesh, echo, spans):
    seen = _plain(mesh, "/ok", {"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"})
    assert seen["x-b3-traceid"] == "80f198ee56343ba864fe8b2a57d3eff7" and seen["x-b3-sampled"] == "0"
    assert seen["x-b3-parentspanid"] == "e457b5a2e4d86bd1" and seen["traceparent"].endswith("-00")
    assert spans.get_finished_spans() == ()  # the parent's decision: not sampled
    seen = _plain(mesh, "/ok", {"x-b3-traceid": "zz", "x-b3-spanid": "e457b5a2e4d86bd1"})  # not a trace id
    assert "x-b3-parentspanid" not in seen and seen["x-b3-traceid"] != "zz"


def test_b3_off_leaves_the_applications_b3(mesh, echo, spans):
    app_b3 = {"x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124", "x-b3-spanid": "a2fb4a1d1a96d312",
              "x-b3-sampled": "1"}
    seen = _plain(mesh, "/ok", app_b3)
    # on (default): the application's B3 is the parent (Envoy's Zipkin tracer continues it)
    span = spans.get_finished_spans()[-1]
    assert seen["x-b3-traceid"] == app_b3["x-b3-traceid"] == _hex(span.context.trace_id, 32)
    assert seen["x-b3-parentspanid"] == app_b3["x-b3-spanid"] == _hex(span.parent.span_id, 16)
    assert seen["x-b3-spanid"] == _hex(span.context.span_id, 16) and seen["x-b3-sampled"] == "1"
    assert seen["traceparent"] == f"00-{app_b3['x-b3-traceid']}-{seen['x-b3-spanid']}-01"
    tracing.configure(tracing.TRACER[0]._meshcore_provider, b3=False)
    seen = _plain(mesh, "/ok", app_b3)
    assert {k: seen[k] for k in app_b3} == app_b3 and "x-b3-parentspanid" not in seen
    seen = _plain(mesh, "/ok")
    assert not any(k.startswith("x-b3-") for k in seen) and "traceparent" in seen
    ctx = trace.get_current_span().get_span_context()
    assert not ctx.is_valid  # nothing leaked into the test's context


def test_single_form_begun_then_tracing_turned_off(mesh, echo, spans):
    provider = tracing.TRACER[0]._meshcore_provider
    call = mesh.request(f"{URL}/ok/4")
    with call as attempt:  # (begun by Call.__enter__)
        assert tracing.headers_of(attempt)
        tracing.disable()  # Call.__exit__ may then not report at all: nothing is kept for it
        assert not tracing._SINGLE and tracing.headers_of(attempt) == ()
        _send(attempt)
    assert spans.get_finished_spans() == ()  # dropped, never ended
    tracing.configure(provider)


def test_single_form_calls_never_left_are_bounded(mesh, echo, spans, monkeypatch):
    monkeypatch.setattr(tracing, "MAX_OPEN_SINGLE", 3)
    calls = []
    for i in range(5):
        call = mesh.request(f"{URL}/ok/{i}")
        attempt = call.__enter__()  # (begins the span: lifecycle.begin_single)
        calls.append((call, attempt))
    assert list(tracing._SINGLE) == [c for c, _ in calls[2:]]
    assert tracing.headers_of(calls[0][1]) == () and tracing.headers_of(calls[4][1])
    for call, attempt in calls:
        attempt.status = 200
        call.__exit__(None, None, None)
    assert not tracing._SINGLE and len(spans.get_finished_spans()) == 5


def test_refused_requests_record_the_request_id_their_span_names(mesh, echo, spans):
    # the access log / record of a request refused before any call (NR) or before its attempt (a
    # fault abort has none either: UH here) names the x-request-id tracing gave it
    records: List[Any] = []
    mesh.telemetry.add_sink(records.append)
    try:
        with pytest.raises(NoRoute):
            mesh.request(f"{URL}/nowhere")
        with pytest.raises(Unavailable):
            mesh.request(f"{URL}/empty").run(lambda a: a)
    finally:
        mesh.telemetry.remove_sink(records.append)
    nr, uh = spans.get_finished_spans()
    assert [r.response_flags for r in records] == ["NR", "UH"]
    assert records[0].request_id == nr.attributes["guid:x-request-id"] and records[0].request_id[14] == "9"
    assert records[1].request_id == uh.attributes["guid:x-request-id"]

"""Access logs (``meshcore.telemetry.access_log``): the Envoy format parser and operators, the
Envoy/Istio/JSON formats on records, and the sink on a mesh (off by default, one ``INFO`` line per
request on ``meshcore.access``, removable). The lines Envoy 1.40 wrote for the same requests are
compared in ``test_response_flags_vs_envoy.py``; the expected strings below were checked against it
(``START_TIME`` spellings, ``%%``, ``:max_length``, JSON types and ``null``, refusals)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator, List

import pytest

import meshcore
from meshcore.telemetry.access_log import (ENVOY_FORMAT, ISTIO_FORMAT, ISTIO_JSON_FORMAT, AccessLog,
                                           compile_format)
from meshcore.telemetry.record import RequestRecord
from resilience.test_lifecycle import TARGET, URL, Upstream, closed_port, send, write_mesh

START = 1796588337.4506  # 2026-12-06T20:18:57.450Z


def record(**fields: Any) -> RequestRecord:
    base = dict(target="shop.local:80", authority="shop.local", method="GET", path="/ok?q=1", route_name="r1",
                cluster="outbound|80||shop.local", upstream_host="10.0.0.7:8080", response_code=200,
                response_flags="-", response_code_details="via_upstream", attempts=1, start_time=START,
                duration_ms=41.9, request_bytes=7, response_bytes=5, request_id="rid-1")
    base.update(fields)
    return RequestRecord(**base)


def render(fmt: Any, **fields: Any) -> str:
    return compile_format(fmt)(record(**fields))


# -- formats -------------------------------------------------------------------------------------


def test_envoy_default_format() -> None:
    assert render("envoy") == render(ENVOY_FORMAT) == (
        '[2026-12-06T20:18:57.450Z] "GET /ok?q=1 -" 200 - 7 5 41 - "-" "-" "rid-1" "shop.local" "10.0.0.7:8080"')
    # what Envoy logged for a request without a route (PROTOCOL: Envoy knows its downstream's)
    assert render("envoy", path="/zz", route_name=None, cluster=None, upstream_host=None, response_code=404,
                  response_flags="NR", request_bytes=0, response_bytes=0, duration_ms=0.2, request_id=None) == (
        '[2026-12-06T20:18:57.450Z] "GET /zz -" 404 NR 0 0 0 - "-" "-" "-" "shop.local" "-"')


def test_istio_text_format() -> None:
    uh = dict(response_code=503, response_flags="UH", response_code_details="no_healthy_upstream", upstream_host=None,
              attempts=0)
    line = render("istio", **uh)
    assert line == render(ISTIO_FORMAT, **uh)
    assert line == ('[2026-12-06T20:18:57.450Z] "GET /ok?q=1 -" 503 UH no_healthy_upstream - "-" 7 5 41 - "-" "-" '
                    '"rid-1" "shop.local" "-" outbound|80||shop.local - - - - r1')


def test_istio_json_format() -> None:
    dc = dict(response_code=0, response_flags="DC", response_code_details=None, route_name="")
    line = render("json", **dc)
    assert line == render(ISTIO_JSON_FORMAT, **dc)
    obj = json.loads(line)
    assert list(obj) == sorted(ISTIO_JSON_FORMAT)  # Envoy writes a Struct's keys sorted
    assert line.startswith('{"authority":"shop.local","bytes_received":7,"bytes_sent":5,')  # compact
    assert obj == {
        "authority": "shop.local", "bytes_received": 7, "bytes_sent": 5, "connection_termination_details": None,
        "downstream_local_address": None, "downstream_remote_address": None, "duration": 41, "method": "GET",
        "path": "/ok?q=1", "protocol": None, "request_id": "rid-1", "requested_server_name": None,
        "response_code": 0, "response_code_details": None, "response_flags": "DC", "route_name": None,
        "start_time": "2026-12-06T20:18:57.450Z", "upstream_cluster": "outbound|80||shop.local",
        "upstream_host": "10.0.0.7:8080", "upstream_local_address": None, "upstream_service_time": None,
        "upstream_transport_failure_reason": None, "user_agent": None, "x_forwarded_for": None}


def test_custom_json_format_nests_and_mixes_text() -> None:
    fmt = {"code": "%RESPONSE_CODE%", "a": {"flags": "%RESPONSE_FLAGS%", "ua": "%REQ(USER-AGENT)%"},
           "text": "code=%RESPONSE_CODE% ua=%REQ(USER-AGENT)%", "const": 3, "path": "%REQ(:PATH):3%"}
    assert json.loads(render(fmt)) == {"a": {"flags": "-", "ua": None}, "code": 200, "const": 3,
                                       "path": "/ok", "text": "code=200 ua=-"}


def test_grpc_fields() -> None:
    fmt = ("%PROTOCOL% %GRPC_STATUS% %GRPC_STATUS(SNAKE_STRING)% %GRPC_STATUS(NUMBER)% %GRPC_STATUS_NUMBER% "
           "%REQ(content-type)%")
    assert render(fmt, protocol="grpc", grpc_status=14) == "HTTP/2 Unavailable UNAVAILABLE 14 14 application/grpc"
    assert render(fmt, protocol="grpc", grpc_status=1) == "HTTP/2 Canceled CANCELLED 1 1 application/grpc"
    assert render(fmt, protocol="grpc", grpc_status=0) == "HTTP/2 OK OK 0 0 application/grpc"
    assert render(fmt, protocol="grpc", grpc_status=42) == "HTTP/2 42 42 42 42 application/grpc"
    assert render(fmt, grpc_status=14) == "- - - - - -"  # not a gRPC request
    assert json.loads(render({"s": "%GRPC_STATUS(NUMBER)%", "c": "%GRPC_STATUS%"}, protocol="grpc",
                             grpc_status=5)) == {"c": "NotFound", "s": 5}


# -- operators -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, expected", [
    ("%START_TIME(%s.%3f)%", "1796588337.450"),  # as Envoy printed it
    ("%START_TIME(%Y/%m/%d %H:%M:%E6S)%", "2026/12/06 20:18:57.450600"),
    ("%START_TIME(%E3f %6f %f %%)%", "450 450600 450600000 %"),
    ("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(:PATH):3% %REQ(HOST)% %REQ(:METHOD)%", "/ok?q=1 /ok shop.local GET"),
    ("%REQ(user-agent?x-request-id)% %REQ(x-request-id):2% %REQ(X-FORWARDED-FOR)%", "rid-1 ri -"),
    ("%REQ_WITHOUT_QUERY(:PATH)% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% %TRAILER(grpc-status)%", "/ok - -"),
    ("100%% %RESPONSE_CODE%%%", "100% 200%"),
    ("%UPSTREAM_HOST% %UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %UPSTREAM_REMOTE_PORT%", "10.0.0.7:8080 10.0.0.7 8080"),
    ("%UPSTREAM_CLUSTER% %UPSTREAM_CLUSTER_RAW% %ROUTE_NAME%", "outbound|80||shop.local outbound|80||shop.local r1"),
    ("%UPSTREAM_REQUEST_ATTEMPT_COUNT% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%", "1 7 5 41"),
    ("%DOWNSTREAM_REMOTE_ADDRESS% %UPSTREAM_TRANSPORT_FAILURE_REASON% %REQUESTED_SERVER_NAME%", "- - -"),
    ("%DYNAMIC_METADATA(istio:x)% %FILTER_STATE(a):5% %DOWNSTREAM_PEER_URI_SAN%", "- - -"),
    ("no operator", "no operator"),
])
def test_operators(fmt: str, expected: str) -> None:
    assert render(fmt) == expected


def test_response_flags_long_and_principal() -> None:
    assert render("%RESPONSE_FLAGS% %RESPONSE_FLAGS_LONG%", response_flags="URX,UF") == (
        "URX,UF UpstreamRetryLimitExceeded,UpstreamConnectionFailure")
    assert render("%RESPONSE_FLAGS_LONG%") == "-"
    assert render("%DOWNSTREAM_PEER_URI_SAN%", principal="spiffe://cluster.local/ns/a/sa/b") == (
        "spiffe://cluster.local/ns/a/sa/b")


def test_start_time_truncates_to_the_millisecond() -> None:
    assert render("%START_TIME%", start_time=1796588337.9999) == "2026-12-06T20:18:57.999Z"
    assert render("%START_TIME_LOCAL(%s)%") == "1796588337"
    assert render("%EMIT_TIME(%Y)%") >= "2026"


@pytest.mark.parametrize("fmt, message", [  # Envoy 1.40's refusals of the same strings
    ("%FOO%", "Not supported field in StreamInfo: FOO"),
    ("a % b", "Couldn't find valid command at position 2"),
    ("x%", "Couldn't find valid command at position 1"),
    ("%reQ(x)%", "Couldn't find valid command at position 0"),
    ("%REQ(x):a%", "Couldn't find valid command at position 0"),
    ("%REQ%", "REQ requires parameters"),
    ("%REQ()%", "REQ requires parameters"),
    ("%REQ(a?b?c)%", "More than 1 alternative header specified in token: a?b?c"),
    ("%RESPONSE_CODE(x)%", "RESPONSE_CODE does not take any parameters"),
    ("%DURATION:3%", "DURATION does not take any parameters or length"),
    ("%UPSTREAM_HOST:3%", "UPSTREAM_HOST does not take any parameters or length"),
    ("%GRPC_STATUS(BAD)%", "GrpcStatusFormatter only supports CAMEL_STRING, SNAKE_STRING or NUMBER. Got: BAD"),
])
def test_refused_like_envoy(fmt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        compile_format(fmt)


def test_other_refusals() -> None:
    with pytest.raises(ValueError):
        compile_format({})
    with pytest.raises(TypeError):
        compile_format(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AccessLog("%NOPE%")


# -- the sink ------------------------------------------------------------------------------------


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> List[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    h = Lines()
    logger = logging.getLogger("meshcore.access")
    level = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    yield h
    logger.removeHandler(h)
    logger.setLevel(level)


def test_sink_logs_info_on_meshcore_access(access_lines: Lines) -> None:
    sink = AccessLog("%RESPONSE_CODE% %RESPONSE_FLAGS%\n")
    r = record(response_code=503, response_flags="UF")
    sink(r)
    assert access_lines.lines == ["503 UF"]  # Envoy's trailing newline is logging's
    rec = access_lines.records[0]
    assert rec.name == "meshcore.access" and rec.levelno == logging.INFO and rec.request_record is r
    assert repr(sink) == "AccessLog(custom -> meshcore.access)"
    assert repr(AccessLog()) == "AccessLog(envoy -> meshcore.access)"


def test_sink_filter_and_disabled_logger(access_lines: Lines) -> None:
    errors = AccessLog("%RESPONSE_CODE%", filter=lambda r: r.response_code >= 400 or r.response_flags != "-")
    for code in (200, 404, 503):
        errors(record(response_code=code))
    assert access_lines.lines == ["404", "503"]

    calls = []
    quiet = AccessLog("%RESPONSE_CODE%", logger="meshcore.access.quiet.test")
    quiet.logger.setLevel(logging.WARNING)
    quiet.render = lambda r: calls.append(r) or "x"  # type: ignore[method-assign]
    quiet(record())
    assert calls == []  # nothing rendered while the logger drops INFO


def test_own_logger() -> None:
    h = Lines()
    logger = logging.getLogger("app.access.test")
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    try:
        AccessLog("json", logger=logger)(record())
        assert json.loads(h.lines[0])["route_name"] == "r1"
    finally:
        logger.removeHandler(h)


# -- on a mesh -----------------------------------------------------------------------------------


@pytest.fixture
def mesh(tmp_path: Any) -> Iterator[meshcore.Mesh]:
    up = Upstream("u0", "ok")
    path = os.path.join(str(tmp_path), "mesh.json")
    write_mesh(path, [up.port, closed_port()], retry={"retry_on": "connect-failure", "num_retries": 1})
    m = meshcore.Mesh.from_file(path, watch=False, seed=7).start()
    m.wait_ready(TARGET, timeout=5)
    yield m
    m.close()
    up.close()


def test_off_by_default_and_removable(mesh: meshcore.Mesh, access_lines: Lines) -> None:
    assert not mesh.telemetry.sinks
    mesh.request(URL + "/a").run(send)
    assert access_lines.lines == []

    sink = mesh.telemetry.enable_access_log("%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %ROUTE_NAME% "
                                            "%UPSTREAM_CLUSTER%")
    assert isinstance(sink, AccessLog) and sink in mesh.telemetry.sinks
    for i in range(4):  # round robin over a live and a refusing endpoint: the refusal is retried
        mesh.request(URL + f"/r{i}", headers={"x-request-id": f"id-{i}"}).run(send)
    assert access_lines.lines == [f"/r{i} 200 - all shop" for i in range(4)]

    mesh.telemetry.remove_sink(sink)
    mesh.request(URL + "/b").run(send)
    assert len(access_lines.lines) == 4


def test_failures_on_a_mesh(mesh: meshcore.Mesh, access_lines: Lines) -> None:
    sink = mesh.telemetry.enable_access_log("envoy")
    try:
        with pytest.raises(meshcore.NoRoute):
            mesh.request("http://other.local/x", target=TARGET, headers={"x-request-id": "nr"}).run(send)
    finally:
        mesh.telemetry.remove_sink(sink)
    (line,) = access_lines.lines
    assert line.endswith('"GET /x -" 404 NR 0 0 0 - "-" "-" "nr" "other.local" "-"'), line

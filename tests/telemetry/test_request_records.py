"""The request lifecycle's telemetry hook (``mesh.telemetry``), on both twins of the request path:
one RequestRecord per request made through the plain API (``call.run``, ``run_async``, the
single-attempt form, ``Mesh.request``'s own refusals), with Envoy's response code and flags
(router.cc: flags in the order set, URX before the failure's own flag)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Dict, List, Optional

import pytest

from meshcore.errors import FaultAbort, NoRoute, Unavailable, UpstreamError
from meshcore.telemetry import RequestRecord
from meshcore.telemetry import record as record_mod

TARGET = "shop.default.svc.cluster.local:80"
URL = "http://shop.default.svc.cluster.local"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
CLUSTER = "outbound|80||shop.default.svc.cluster.local"
BACKOFF = {"base_interval": "0.001s", "max_interval": "0.002s"}


def _route(prefix: str, cluster: str, **action: Any) -> Dict[str, Any]:
    return {"name": prefix, "match": {"prefix": prefix}, "route": {"cluster": cluster, **action}}


def _resources() -> Dict[str, Any]:
    routes = [
        _route("/ok", CLUSTER),
        _route("/retry5xx", CLUSTER, retry_policy={"retry_on": "5xx", "num_retries": 2, "retry_back_off": BACKOFF}),
        _route("/retrycf", CLUSTER, retry_policy={"retry_on": "connect-failure", "num_retries": 1,
                                                  "retry_back_off": BACKOFF}),
        _route("/pertry", CLUSTER, timeout="2s", retry_policy={"retry_on": "5xx", "num_retries": 1,
                                                               "per_try_timeout": "0.02s", "retry_back_off": BACKOFF}),
        _route("/timeout", CLUSTER, timeout="0.03s"),
        _route("/nohost", "empty"),
        _route("/tight", "tight", retry_policy={"retry_on": "5xx", "num_retries": 2, "retry_back_off": BACKOFF}),
        {"name": "fault", "match": {"prefix": "/fault"}, "route": {"cluster": CLUSTER},
         "typed_per_filter_config": {"envoy.filters.http.fault": {
             "@type": FAULT, "abort": {"http_status": 418, "percentage": {"numerator": 100}}}}},
        {"name": "delay", "match": {"prefix": "/delay"}, "route": {"cluster": CLUSTER},
         "typed_per_filter_config": {"envoy.filters.http.fault": {
             "@type": FAULT, "delay": {"fixed_delay": "0.01s", "percentage": {"numerator": 100}}}}},
        {"name": "both", "match": {"prefix": "/both"}, "route": {"cluster": CLUSTER},
         "typed_per_filter_config": {"envoy.filters.http.fault": {
             "@type": FAULT, "delay": {"fixed_delay": "0.01s", "percentage": {"numerator": 100}},
             "abort": {"http_status": 503, "percentage": {"numerator": 100}}}}},
    ]
    host = TARGET.rsplit(":", 1)[0]
    eds = {"cluster_name": CLUSTER, "endpoints": [{"locality": {"zone": "z"}, "lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 8080}}},
         "metadata": {"filter_metadata": {"istio": {"workload": "shop-v1;default;shop;v1;Kubernetes"}}}},
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.2", "port_value": 8080}}}}]}]}
    return {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "routes"},
            "http_filters": [{"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT}},
                             {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}}],
        "routes": [{"name": "routes", "virtual_hosts": [{"name": "shop", "domains": [host, TARGET],
                                                          "routes": routes}]}],
        "clusters": [
            {"name": CLUSTER, "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
             "circuit_breakers": {"thresholds": [{"max_requests": 2}]}},
            {"name": "empty", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}},
            {"name": "tight", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
             "circuit_breakers": {"thresholds": [{"max_retries": 0}]}},
        ],
        "endpoints": [eds, {"cluster_name": "empty", "endpoints": []},
                      {"cluster_name": "tight", "endpoints": [{"lb_endpoints": [
                          {"endpoint": {"address": {"socket_address": {"address": "10.0.1.1",
                                                                       "port_value": 80}}}}]}]}],
    }


@pytest.fixture
def mesh(mesh_cls, tmp_path):
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(_resources()))
    m = mesh_cls.from_file(path, watch=False, seed=3)
    m.start()
    m.wait_ready(TARGET, timeout=5)
    yield m
    m.close()


@pytest.fixture
def records(mesh) -> List[RequestRecord]:
    got: List[RequestRecord] = []
    mesh.telemetry.add_sink(got.append)
    yield got
    mesh.telemetry.remove_sink(got.append)


class Resp:
    def __init__(self, status: int, headers: Optional[Dict[str, str]] = None, body: bytes = b"") -> None:
        self.status_code = status
        self.headers = headers or {}
        self._content = body


def answer(status: int, **kw: Any):
    return lambda a: Resp(status, **kw)


def fail(kind: str):
    def send(a: Any) -> Any:
        raise UpstreamError(kind)
    return send


def one(records: List[RequestRecord]) -> RequestRecord:
    assert len(records) == 1, records
    return records.pop()


def code_flags(r: RequestRecord) -> str:
    return f"{r.response_code} {r.response_flags}"


# -- nothing without a sink -------------------------------------------------------------------------


def test_no_sink_no_record(mesh):
    assert mesh.telemetry.sinks == ()
    assert mesh.request(f"{URL}/ok").run(answer(200)).status_code == 200


def test_add_and_remove_sink_track_active(mesh):
    before = record_mod.ACTIVE[0]  # other meshes of the process may have sinks
    got: List[Any] = []
    assert mesh.telemetry.add_sink(got.append) is not None
    mesh.telemetry.add_sink(got.append)  # twice: once
    assert record_mod.ACTIVE[0] == before + 1 and len(mesh.telemetry.sinks) == 1
    mesh.request(f"{URL}/ok").run(answer(200))
    mesh.telemetry.remove_sink(got.append)
    assert record_mod.ACTIVE[0] == before
    mesh.request(f"{URL}/ok").run(answer(200))
    assert len(got) == 1
    mesh.telemetry.add_sink(got.append)
    mesh.close()  # a closed mesh's sinks get nothing more
    assert record_mod.ACTIVE[0] == before and mesh.telemetry.sinks == ()


def test_a_failing_sink_is_logged_once_and_never_reaches_the_caller(mesh, records, caplog):
    def broken(r: RequestRecord) -> None:
        raise RuntimeError("sink bug")

    mesh.telemetry.add_sink(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="meshcore.telemetry.record"):
            for _ in range(3):
                assert mesh.request(f"{URL}/ok").run(answer(200)).status_code == 200
        assert len(records) == 3  # the other sink still got every record
        assert sum("sink bug" in (r.exc_text or "") or "failed" in r.getMessage() for r in caplog.records) == 1
    finally:
        mesh.telemetry.remove_sink(broken)


# -- the record of an answered request --------------------------------------------------------------


def test_record_of_an_answer(mesh, records):
    t0 = time.time()
    headers = [("x-request-id", "rid-1"), ("content-length", "5")]
    mesh.request(f"{URL}/ok?q=1", "POST", headers).run(answer(201, headers={"content-length": "7"}, body=b"1234567"))
    r = one(records)
    assert (r.reporter, r.target, r.authority, r.method, r.path, r.protocol) == (
        "source", TARGET, "shop.default.svc.cluster.local", "POST", "/ok?q=1", "http")
    assert (r.route_name, r.cluster, r.attempts) == ("/ok", CLUSTER, 1)
    assert r.upstream_host in ("10.0.0.1:8080", "10.0.0.2:8080") and r.endpoint.key == r.upstream_host
    assert (r.response_code, r.grpc_status, r.response_flags) == (201, None, "-")
    assert (r.request_bytes, r.response_bytes, r.request_id) == (5, 7, "rid-1")
    assert r.connection_security_policy == "unknown" and r.peer_metadata is None
    assert t0 - 0.01 <= r.start_time <= time.time() and 0 <= r.duration_ms < 1000


def test_single_attempt_form(mesh, records):
    with mesh.request(f"{URL}/ok") as attempt:
        attempt.status = 204
    assert code_flags(one(records)) == "204 -"
    with pytest.raises(ConnectionResetError):
        with mesh.request(f"{URL}/ok"):
            raise ConnectionResetError()
    r = one(records)
    assert (code_flags(r), r.upstream_failure) == ("503 UC", "reset")


def test_grpc_request_by_content_type(mesh, records):
    headers = {"content-type": "application/grpc+proto", "te": "trailers"}
    with mesh.request(f"{URL}/ok", "POST", headers) as attempt:
        attempt.status, attempt.grpc_status = 200, 5
    r = one(records)
    assert (r.protocol, r.response_code, r.grpc_status) == ("grpc", 200, 5)
    with pytest.raises(Unavailable):
        mesh.request(f"{URL}/nohost", "POST", headers).run(answer(200))
    r = one(records)  # Envoy's local reply to a gRPC request: 200, grpc-status UNAVAILABLE
    assert (r.protocol, r.response_code, r.grpc_status, r.response_flags) == ("grpc", 200, 14, "UH")


# -- response flags as Envoy's router sets them --------------------------------------------------------


@pytest.mark.parametrize("path,send,expected,attempts", [
    ("/ok", answer(503), "503 -", 1),
    ("/retry5xx", answer(503), "503 URX", 3),
    ("/retrycf", fail("connect-failure"), "503 URX,UF", 2),
    ("/ok", fail("connect-failure"), "503 UF", 1),
    ("/ok", fail("reset"), "503 UC", 1),
    ("/retry5xx", fail("reset"), "503 URX,UC", 3),  # Envoy's 5xx covers resets too
    ("/retrycf", fail("reset"), "503 UC", 1),  # connect-failure does not retry a reset
])
def test_upstream_outcomes(mesh, records, path, send, expected, attempts):
    try:
        mesh.request(f"{URL}{path}").run(send)
    except UpstreamError:
        pass
    r = one(records)
    assert (code_flags(r), r.attempts) == (expected, attempts)


def test_no_healthy_upstream(mesh, records):
    with pytest.raises(Unavailable):
        mesh.request(f"{URL}/nohost").run(answer(200))
    r = one(records)
    assert (code_flags(r), r.attempts, r.upstream_host, r.cluster) == ("503 UH", 0, None, "empty")


def test_no_route(mesh, records):
    with pytest.raises(NoRoute):
        mesh.request(f"{URL}/nowhere")
    r = one(records)
    assert (code_flags(r), r.cluster, r.route_name, r.path) == ("404 NR", None, None, "/nowhere")


def test_route_timeout(mesh, records):
    def slow(a: Any) -> Any:
        time.sleep(a.timeout)
        raise TimeoutError("attempt timed out")

    with pytest.raises(Exception):
        mesh.request(f"{URL}/timeout").run(slow)
    assert code_flags(one(records)) == "504 UT"


def test_per_try_timeouts_exhaust_the_retries(mesh, records):
    def slow(a: Any) -> Any:
        time.sleep(a.timeout)
        raise TimeoutError("attempt timed out")

    with pytest.raises(TimeoutError):
        mesh.request(f"{URL}/pertry").run(slow)
    r = one(records)
    assert (code_flags(r), r.attempts) == ("504 URX,UT", 2)


def test_circuit_breaker_overflow(mesh, records):
    with mesh.request(f"{URL}/ok") as a1, mesh.request(f"{URL}/ok") as a2:  # max_requests 2 in flight
        a1.status = a2.status = 200
        with pytest.raises(Unavailable):
            mesh.request(f"{URL}/ok").run(answer(200))
    assert [code_flags(r) for r in records] == ["503 UO", "200 -", "200 -"]


def test_retry_refused_by_the_retry_breaker(mesh, records):
    mesh.request(f"{URL}/tight").run(answer(503))
    r = one(records)
    assert (code_flags(r), r.attempts) == ("503 UO", 1)


def test_fault_abort_delay_and_both(mesh, records):
    with pytest.raises(FaultAbort):
        mesh.request(f"{URL}/fault").run(answer(200))
    r = one(records)
    assert (code_flags(r), r.attempts, r.upstream_host) == ("418 FI", 0, None)
    mesh.request(f"{URL}/delay").run(answer(200))
    r = one(records)
    assert code_flags(r) == "200 DI" and r.duration_ms >= 9
    with pytest.raises(FaultAbort):
        mesh.request(f"{URL}/both").run(answer(200))
    assert code_flags(one(records)) == "503 DI,FI"
    with pytest.raises(FaultAbort):
        with mesh.request(f"{URL}/fault"):
            pass  # the single-attempt form: __enter__ answers the abort
    assert code_flags(one(records)) == "418 FI"


def test_async_run_and_cancellation(mesh, records):
    async def ok(a: Any) -> Any:
        return Resp(200)

    async def hang(a: Any) -> Any:
        await asyncio.sleep(10)

    async def main() -> None:
        await mesh.request(f"{URL}/ok").run_async(ok)
        task = asyncio.ensure_future(mesh.request(f"{URL}/ok").run_async(hang))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [code_flags(r) for r in records] == ["200 -", "0 DC"]


def test_eds_metadata_reaches_the_record(mesh, records):
    seen = set()
    for _ in range(4):
        mesh.request(f"{URL}/ok").run(answer(200))
    for r in records:
        seen.add((r.upstream_host, (r.endpoint.metadata or {}).get("istio", {}).get("workload")))
    assert ("10.0.0.1:8080", "shop-v1;default;shop;v1;Kubernetes") in seen

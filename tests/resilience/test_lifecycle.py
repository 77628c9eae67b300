"""The request lifecycle end to end with real loopback HTTP servers: retries, timeouts, circuit
breakers, outlier ejection, fault injection, stats, exact least-request accounting."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

import pytest

import meshcore
from meshcore import CircuitBreakerOpen, FaultAbort, UpstreamError, UpstreamTimeout

TARGET = "shop.local:80"
URL = "http://shop.local"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


class Upstream:
    """A loopback HTTP server: ``mode`` is ok / fail (503) / slow (sleeps ``delay``)."""

    def __init__(self, name: str, mode: str = "ok", delay: float = 0.5) -> None:
        self.name, self.mode, self.delay, self.hits = name, mode, delay, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.hits += 1
                if outer.mode == "slow":
                    time.sleep(outer.delay)
                status = 503 if outer.mode == "fail" else 200
                body = json.dumps({"name": outer.name, "host": self.headers.get("Host")}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Resp:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.body = status, body

    @property
    def json(self) -> Dict[str, Any]:
        return json.loads(self.body)


def send(a: meshcore.call.Attempt) -> Resp:
    host, port = a.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=a.timeout)
    try:
        conn.request("GET", a.path, headers={"Host": a.authority})
        r = conn.getresponse()
        return Resp(r.status, r.read())
    finally:
        conn.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_mesh(path: str, ports: List[int], *, retry: Optional[Dict[str, Any]] = None, timeout: str = "2s",
               cluster_extra: Optional[Dict[str, Any]] = None, fault: Optional[Dict[str, Any]] = None,
               policy: str = "ROUND_ROBIN") -> None:
    filters = []
    if fault is not None:
        filters.append({"name": "envoy.filters.http.fault", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault", **fault}})
    filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    action: Dict[str, Any] = {"cluster": "shop", "timeout": timeout}
    if retry is not None:
        action["retry_policy"] = retry
    data = {
        "listeners": [{"name": TARGET, "api_listener": {"api_listener": {
            "@type": HCM, "rds": {"config_source": {"ads": {}}, "route_config_name": "r"}, "http_filters": filters}}}],
        "routes": [{"name": "r", "virtual_hosts": [{"name": "shop", "domains": ["shop.local", TARGET],
                                                     "routes": [{"name": "all", "match": {"prefix": "/"},
                                                                 "route": action}]}]}],
        "clusters": [{"name": "shop", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}},
                      "lb_policy": policy, **(cluster_extra or {})}],
        "endpoints": [{"cluster_name": "shop", "endpoints": [{"locality": {"zone": "z"}, "load_balancing_weight": 1,
                       "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                           "address": "127.0.0.1", "port_value": p}}}} for p in ports]}]}],
    }
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture
def upstreams():
    made: List[Upstream] = []

    def make(*modes: str) -> List[Upstream]:
        ups = [Upstream(f"u{i}", m) for i, m in enumerate(modes)]
        made.extend(ups)
        return ups

    yield make
    for u in made:
        u.close()


@pytest.fixture
def mesh_with(tmp_path, mesh_cls):
    """Meshes on a resource file; the request path is each twin in turn (``impl``: c, py)."""
    meshes: List[meshcore.Mesh] = []

    def make(ports: List[int], **kw: Any) -> meshcore.Mesh:
        path = os.path.join(str(tmp_path), f"mesh{len(meshes)}.json")
        write_mesh(path, ports, **kw)
        m = mesh_cls.from_file(path, watch=False, seed=7).start()
        m.wait_ready(TARGET, timeout=5)
        meshes.append(m)
        return m

    yield make
    for m in meshes:
        m.close()


def lb_of(mesh: meshcore.Mesh) -> Any:
    return mesh.config(TARGET).clusters["shop"].lb


def assert_no_inflight(mesh: meshcore.Mesh) -> None:
    lb = lb_of(mesh)
    assert all(lb.active_requests(ep) == 0 for ep in lb.endpoints)
    assert mesh.stats()["shop"]["upstream_rq_active"] == 0


def test_single_attempt_api_feeds_back_status_and_latency(upstreams, mesh_with):
    ups = upstreams("ok", "ok")
    mesh = mesh_with([u.port for u in ups])
    names = set()
    for _ in range(4):
        with mesh.request(URL + "/x?q=1") as a:
            r = send(a)
            a.status = r.status_code
            names.add(r.json["name"])
            assert r.json["host"] == "shop.local"  # the logical Host, not the IP
            assert mesh.stats()["shop"]["upstream_rq_active"] == 1
    assert names == {"u0", "u1"}
    st = mesh.stats()["shop"]
    assert st["upstream_rq_total"] == 4 and st["upstream_rq_2xx"] == 4 and st["upstream_rq_time"]["count"] == 4
    with pytest.raises(RuntimeError):
        with mesh.request(URL + "/x"):
            raise RuntimeError("the app failed mid-request")
    assert mesh.stats()["shop"]["upstream_rq_rx_reset"] == 1
    assert_no_inflight(mesh)


def test_retry_on_5xx_goes_to_another_host(upstreams, mesh_with):
    ups = upstreams("fail", "ok", "ok")
    mesh = mesh_with([u.port for u in ups], retry={"retry_on": "5xx", "num_retries": 2})
    for _ in range(9):
        r = mesh.request(URL + "/").run(send)
        assert r.status_code == 200
    st = mesh.stats()["shop"]
    assert st["upstream_rq_retry"] == ups[0].hits >= 2
    assert st["upstream_rq_retry_success"] == st["upstream_rq_retry"]
    assert st["upstream_rq_503"] == ups[0].hits
    assert_no_inflight(mesh)


def test_exhausted_retries_return_the_last_response(upstreams, mesh_with):
    ups = upstreams("fail", "fail")
    mesh = mesh_with([u.port for u in ups], retry={"retry_on": "5xx", "num_retries": 3,
                                                   "retry_back_off": {"base_interval": "0.001s"}})
    call = mesh.request(URL + "/")
    assert call.run(send).status_code == 503
    assert len(call.attempts) == 4  # 1 + num_retries
    assert_no_inflight(mesh)


def test_connect_failure_retried(upstreams, mesh_with):
    ups = upstreams("ok")
    dead = closed_port()
    mesh = mesh_with([dead, ups[0].port], retry={"retry_on": "connect-failure", "num_retries": 1})
    first_dead = 0
    for _ in range(4):
        call = mesh.request(URL + "/")
        assert call.run(send).json["name"] == "u0"
        first_dead += call.attempts[0].endpoint.port == dead
        assert [a.endpoint.port for a in call.attempts][-1] == ups[0].port
    assert first_dead >= 2  # round robin: the dead endpoint comes first at least every other call
    assert mesh.stats()["shop"]["upstream_cx_connect_fail"] == first_dead
    without = mesh_with([closed_port()])
    with pytest.raises(ConnectionRefusedError):
        without.request(URL + "/").run(send)


def test_route_and_per_try_timeouts(upstreams, mesh_with):
    slow, fast = upstreams("slow", "ok")
    slow.delay = 1.5
    mesh = mesh_with([slow.port], timeout="0.2s")
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        mesh.request(URL + "/").run(send)
    assert time.monotonic() - t0 < 1.0  # cut at the route timeout, long before the upstream answers
    assert mesh.stats()["shop"]["upstream_rq_timeout"] == 1
    per_try = mesh_with([slow.port, fast.port], timeout="3s",
                        retry={"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.1s"})
    timed_out = 0
    for _ in range(4):
        call = per_try.request(URL + "/")
        assert call.run(send).json["name"] == "u1"
        timed_out += call.attempts[0].error == "timeout"
    assert timed_out >= 2
    assert per_try.stats()["shop"]["upstream_rq_per_try_timeout"] == timed_out
    assert_no_inflight(per_try)


def test_circuit_breaker_overflow_fails_fast(upstreams, mesh_with):
    ups = upstreams("ok", "ok")
    mesh = mesh_with([u.port for u in ups], cluster_extra={"circuit_breakers": {"thresholds": [{"max_requests": 1}]}})
    with mesh.request(URL + "/") as held:
        with pytest.raises(CircuitBreakerOpen, match="circuit breaker"):
            mesh.request(URL + "/").run(send)
        held.status = 200
    assert mesh.stats()["shop"]["upstream_rq_pending_overflow"] == 1
    assert mesh.request(URL + "/").run(send).status_code == 200
    assert_no_inflight(mesh)


def test_outlier_detection_ejects_failing_host(upstreams, mesh_with):
    bad, good1, good2 = upstreams("fail", "ok", "ok")
    mesh = mesh_with([bad.port, good1.port, good2.port], cluster_extra={"outlier_detection": {
        "consecutive_5xx": 2, "interval": "0.2s", "base_ejection_time": "0.5s", "max_ejection_percent": 50}})
    statuses = [mesh.request(URL + "/").run(send).status_code for _ in range(9)]
    assert statuses.count(503) == 2  # two consecutive failures eject it
    lb = lb_of(mesh)
    assert [lb.is_ejected(ep) for ep in lb.endpoints] == [True, False, False]
    hits = bad.hits
    for _ in range(10):
        assert mesh.request(URL + "/").run(send).status_code == 200
    assert bad.hits == hits  # no traffic while ejected
    st = mesh.stats()["shop"]
    assert st["outlier_detection.ejections_enforced_total"] == 1 and st["outlier_detection.ejections_active"] == 1
    bad.mode = "ok"
    time.sleep(0.75)  # base_ejection_time x 1, returned at the next interval tick
    for _ in range(6):
        mesh.request(URL + "/").run(send)
    assert not lb.is_ejected(lb.endpoints[0]) and bad.hits > hits


def test_fault_abort_and_delay(upstreams, mesh_with):
    ups = upstreams("ok")
    mesh = mesh_with([ups[0].port], fault={"abort": {"http_status": 418, "percentage": {"numerator": 100}}})
    with pytest.raises(FaultAbort) as e:
        mesh.request(URL + "/").run(send)
    assert e.value.http_status == 418 and ups[0].hits == 0
    delayed = mesh_with([ups[0].port], fault={"delay": {"fixed_delay": "0.15s", "percentage": {"numerator": 100}}})
    t0 = time.monotonic()
    assert delayed.request(URL + "/").run(send).status_code == 200
    assert time.monotonic() - t0 >= 0.15


def test_least_request_accounting_exact_across_retries_and_errors(upstreams, mesh_with):
    ups = upstreams("fail", "ok", "slow")
    ups[2].delay = 0.05
    mesh = mesh_with([u.port for u in ups] + [closed_port()], policy="LEAST_REQUEST",
                     retry={"retry_on": "5xx", "num_retries": 3, "retry_back_off": {"base_interval": "0.001s"}})
    errors: List[BaseException] = []

    def worker() -> None:
        for _ in range(15):
            try:
                mesh.request(URL + "/").run(send)
            except (UpstreamError, ConnectionRefusedError) as e:
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_no_inflight(mesh)
    st = mesh.stats()["shop"]
    assert st["upstream_rq_total"] == st["upstream_rq_completed"] + st["upstream_cx_connect_fail"]


def test_prometheus_export(upstreams, mesh_with):
    from prometheus_client import CollectorRegistry, generate_latest

    ups = upstreams("ok")
    mesh = mesh_with([ups[0].port])
    mesh.request(URL + "/").run(send)
    reg = CollectorRegistry()
    reg.register(mesh.prometheus_collector())
    text = generate_latest(reg).decode()
    assert 'meshcore_cluster_upstream_rq_total{cluster="shop"} 1.0' in text
    assert 'meshcore_cluster_upstream_rq_active{cluster="shop"} 0.0' in text
    assert 'meshcore_cluster_upstream_rq_time_seconds_count{cluster="shop"} 1.0' in text


def test_per_route_fault_override_as_istio_writes_it(upstreams, tmp_path, mesh_cls):
    """Istio's VirtualService fault: an empty fault filter in the listener, the HTTPFault in the
    route's typed_per_filter_config under the filter's name."""
    ups = upstreams("ok")
    path = os.path.join(str(tmp_path), "m.json")
    write_mesh(path, [ups[0].port], fault={})
    with open(path) as f:
        data = json.load(f)
    routes = data["routes"][0]["virtual_hosts"][0]["routes"]
    routes.insert(0, {"name": "faulty", "match": {"prefix": "/ratings"}, "route": {"cluster": "shop"},
                      "typed_per_filter_config": {"envoy.filters.http.fault": {
                          "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                          "abort": {"http_status": 555, "percentage": {"numerator": 100}}}}})
    with open(path, "w") as f:
        json.dump(data, f)
    with mesh_cls.from_file(path, watch=False) as mesh:
        mesh.wait_ready(TARGET)
        with pytest.raises(FaultAbort) as e:
            mesh.request(URL + "/ratings/1").run(send)
        assert e.value.http_status == 555
        assert mesh.request(URL + "/other").run(send).status_code == 200  # the filter itself does nothing


def test_route_timeout_starts_after_the_fault_delay(upstreams, mesh_with):
    # Envoy: the router (and its timeout) starts once the fault filter let the request through.
    ups = upstreams("ok")
    mesh = mesh_with([ups[0].port], timeout="0.25s",
                     fault={"delay": {"fixed_delay": "0.3s", "percentage": {"numerator": 100}}})
    assert mesh.request(URL + "/").run(send).status_code == 200


def test_max_active_faults_limits_concurrent_delays(upstreams, mesh_with):
    # Envoy fault_filter.cc: a fault counts in active_faults from its injection until its delay
    # ended (or its abort answered); at max_active_faults a request gets no fault at all and
    # faults_overflow counts it.
    ups = upstreams("ok")
    mesh = mesh_with([ups[0].port], fault={"max_active_faults": 1,
                                           "delay": {"fixed_delay": "0.4s", "percentage": {"numerator": 100}}})
    took: Dict[str, float] = {}

    def one(name: str) -> None:
        t0 = time.monotonic()
        assert mesh.request(URL + "/").run(send).status_code == 200
        took[name] = time.monotonic() - t0

    first = threading.Thread(target=one, args=("first",))
    first.start()
    time.sleep(0.1)  # the first request is inside its delay
    one("second")
    first.join()
    assert took["first"] >= 0.4 and took["second"] < 0.3
    (stats,) = mesh.fault_stats().values()
    assert stats == {"active_faults": 0, "faults_overflow": 1}
    one("third")  # the first fault ended: the next request is delayed again
    assert took["third"] >= 0.4


def test_fault_percentage_headers(upstreams, mesh_with):
    # Envoy fault_config.cc HeaderPercentageProvider: for header-controlled faults the request's
    # x-envoy-fault-*-percentage header, capped by the configured percentage, is the numerator.
    ups = upstreams("ok")
    mesh = mesh_with([ups[0].port], fault={"abort": {"header_abort": {}, "percentage": {"numerator": 100}}})
    abort = {"x-envoy-fault-abort-request": "503"}
    with pytest.raises(FaultAbort) as e:
        mesh.request(URL + "/", headers=abort).run(send)
    assert e.value.http_status == 503
    zero = {**abort, "x-envoy-fault-abort-request-percentage": "0"}
    assert all(mesh.request(URL + "/", headers=zero).run(send).status_code == 200 for _ in range(20))


def test_async_attempt_deadlines_leave_nothing_behind(mesh_with):
    """``run_async`` registers each attempt's deadline under the attempt in the loop's table:
    withdrawn when it ends; a fired deadline gives ``TimeoutError`` (an upstream timeout, retried
    under the policy) and is forgotten, even when ``send`` swallows the cancellation; an outside
    cancellation stays a CancelledError."""
    import asyncio

    from meshcore import lifecycle

    mesh = mesh_with([closed_port(), closed_port()], timeout="2s",
                     retry={"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.05s",
                            "retry_back_off": {"base_interval": "0.001s"}})

    class Ok:
        status_code = 200

    async def main() -> None:
        dl = lifecycle._deadlines()

        async def slow_first(a):
            if a.number == 1:
                await asyncio.sleep(1)
            return Ok()

        call = mesh.request(URL + "/")
        assert isinstance(await call.run_async(slow_first), Ok)
        assert [a.error for a in call.attempts] == ["timeout", None]
        assert mesh.stats()["shop"]["upstream_rq_per_try_timeout"] == 1
        assert not dl.pending and not dl.fired

        async def swallow(a):
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass
            return Ok()

        call = mesh.request(URL + "/")
        assert isinstance(await call.run_async(swallow), Ok)
        assert len(call.attempts) == 1 and not dl.pending and not dl.fired

        async def hang(a):
            await asyncio.sleep(5)

        task = asyncio.ensure_future(mesh.request(URL + "/").run_async(hang))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not dl.pending and not dl.fired

    asyncio.run(main())
    assert_no_inflight(mesh)


def test_deadline_tables_of_closed_event_loops_are_freed():
    """Each event loop's deadline table is kept weakly by its loop: once ``asyncio.run`` closed a
    loop and it is gone, loop and table are collected (at most the last loop used is held)."""
    import asyncio
    import gc
    import weakref

    from meshcore import lifecycle

    loops = []

    async def main() -> None:
        dl = lifecycle._deadlines()
        key = dl.add(0.001)
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            assert dl.timed_out(key)
        loops.append(weakref.ref(asyncio.get_running_loop()))

    for _ in range(4):
        asyncio.run(main())
    gc.collect()
    assert sum(ref() is not None for ref in loops) <= 1
    assert sum(ref() in lifecycle._deadlines_of for ref in loops if ref() is not None) <= 1

"""httpx and httpx2 transports (sync and async) against real loopback upstreams."""

from __future__ import annotations

import asyncio
import importlib
import ssl
import time
from typing import Any

import pytest

import meshcore
from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport

from .conftest import HOST, TARGET, TLS_TARGET, TLS_URL, URL, resources, route

MOUNT = "all://*.svc.cluster.local"


class Client:
    """One httpx/httpx2 client, sync or async, with the mesh mounted on ``*.svc.cluster.local``;
    async calls run on a private event loop so both modes are driven the same way."""

    def __init__(self, lib: str, mode: str, mesh: Any, **transport_kw: Any) -> None:
        self.mod = importlib.import_module(lib)
        self.mode = mode
        if mode == "sync":
            self.transport = MeshTransport(mesh, **transport_kw)
            self.client = self.mod.Client(mounts={MOUNT: self.transport})
        else:
            self.loop = asyncio.new_event_loop()
            self.transport = AsyncMeshTransport(mesh, **transport_kw)
            self.client = self.mod.AsyncClient(mounts={MOUNT: self.transport})

    def request(self, method: str, url: str, **kw: Any) -> Any:
        if self.mode == "sync":
            return self.client.request(method, url, **kw)
        return self.loop.run_until_complete(self.client.request(method, url, **kw))

    def get(self, url: str, **kw: Any) -> Any:
        return self.request("GET", url, **kw)

    def close(self) -> None:
        if self.mode == "sync":
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()


@pytest.fixture(params=["httpx", "httpx2"])
def lib(request):
    return request.param


@pytest.fixture(params=["sync", "async"])
def mode(request):
    return request.param


@pytest.fixture
def client_for(lib, mode):
    clients = []

    def make(mesh: Any, **kw: Any) -> Client:
        c = Client(lib, mode, mesh, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def test_round_robin_keeps_host_and_leaves_other_hosts_alone(scenario, client_for, upstreams):
    c = client_for(scenario.mesh)
    names = []
    for i in range(6):
        r = c.get(f"{URL}/items/{i}?q=1")
        assert r.status_code == 200
        body = r.json()
        names.append(body["name"])
        assert body["host"] == TARGET and body["path"] == f"/items/{i}?q=1"
        assert str(r.request.url) == f"{URL}/items/{i}?q=1"  # the original request, not the endpoint URL
        info = r.extensions["meshcore"]
        assert info["cluster"] == "main" and info["attempts"] == 1 and info["route"] == "/->main"
        assert info["endpoint"] == f"127.0.0.1:{body['port']}"
    assert sorted(set(names)) == ["main0", "main1", "main2"]
    assert names[:3] == names[3:]  # round robin, one request per pick
    # a host outside the mount goes through the client's default transport
    outside = upstreams("outside")
    r = c.get(f"http://127.0.0.1:{outside.port}/plain")
    assert r.json()["name"] == "outside" and "meshcore" not in r.extensions
    # a request body reaches the upstream
    r = c.request("POST", f"{URL}/post", content=b"payload")
    assert r.json()["body"] == "payload" and r.json()["method"] == "POST"
    scenario.assert_no_active_requests()


def test_header_routes_to_canary(scenario, client_for):
    c = client_for(scenario.mesh)
    assert {c.get(f"{URL}/x", headers={"x-canary": "1"}).json()["name"] for _ in range(3)} == {"canary"}
    assert c.get(f"{URL}/x").json()["name"].startswith("main")
    scenario.assert_no_active_requests()


def test_5xx_is_retried_on_another_host(scenario, client_for):
    c = client_for(scenario.mesh)
    attempts = []
    for _ in range(4):
        r = c.get(f"{URL}/retry")
        assert r.status_code == 200 and r.json()["name"] == "healthy"
        attempts.append(r.extensions["meshcore"]["attempts"])
    assert scenario.failing.hits >= 1 and 2 in attempts
    assert scenario.stat("flaky", "upstream_rq_retry") >= 1
    assert scenario.stat("flaky", "upstream_rq_503") >= 1
    scenario.assert_no_active_requests()


def test_connect_failure_is_retried(scenario, client_for):
    c = client_for(scenario.mesh)
    for _ in range(4):
        assert c.get(f"{URL}/connect/x").json()["name"] == "healthy"
    assert scenario.stat("deadish", "upstream_cx_connect_fail") >= 1
    assert scenario.stat("deadish", "upstream_rq_retry") >= 1
    scenario.assert_no_active_requests()


def test_per_try_timeout_then_retry(scenario, client_for):
    c = client_for(scenario.mesh)
    for _ in range(2):  # round robin: one of the two starts on the slow host
        t0 = time.monotonic()
        r = c.get(f"{URL}/pertry")
        assert r.json()["name"] == "healthy" and time.monotonic() - t0 < 0.9
    assert scenario.slow.hits == 1
    assert scenario.stat("slowish", "upstream_rq_per_try_timeout") == 1
    scenario.assert_no_active_requests()


def test_route_timeout(scenario, client_for, lib):
    c = client_for(scenario.mesh)
    t0 = time.monotonic()
    with pytest.raises(c.mod.TimeoutException) as info:
        c.get(f"{URL}/slow")
    assert time.monotonic() - t0 < 0.9
    assert isinstance(info.value.__cause__, meshcore.UpstreamTimeout)
    assert scenario.stat("slow", "upstream_rq_timeout") == 1
    scenario.assert_no_active_requests()


def test_fault_abort_direct_response_and_redirect_answered_locally(scenario, client_for):
    c = client_for(scenario.mesh)
    r = c.get(f"{URL}/fault")
    assert r.status_code == 418 and r.text == "fault filter abort" and scenario.faulty.hits == 0
    assert r.extensions["meshcore"]["attempts"] == 0
    r = c.get(f"{URL}/direct")
    assert r.status_code == 200 and r.text == "from the mesh"
    r = c.get(f"{URL}/old/path")
    assert r.status_code == 301 and r.headers["location"] == f"{URL}/moved"
    r = c.get(f"{URL}/old/path", follow_redirects=True)  # the hop is routed again
    assert r.status_code == 200 and r.json()["path"] == "/moved" and str(r.url) == f"{URL}/moved"
    assert r.history[0].status_code == 301
    scenario.assert_no_active_requests()


def test_mesh_errors_are_library_errors(scenario, client_for):
    c = client_for(scenario.mesh, ready_timeout=0.2)
    with pytest.raises(c.mod.ConnectError) as info:
        c.get("http://unknown.default.svc.cluster.local:8080/")
    assert isinstance(info.value.__cause__, meshcore.Unavailable)


def test_tls_verifies_and_sends_sni_of_the_logical_host(tls_scenario, tls_files, client_for):
    mesh, _ = tls_scenario
    ctx = ssl.create_default_context(cafile=tls_files["ca"])
    c = client_for(mesh, verify=ctx)
    seen = set()
    for _ in range(4):
        body = c.get(f"{TLS_URL}/secure").json()
        assert body["sni"] == HOST and body["host"] == TLS_TARGET
        seen.add(body["name"])
    assert seen == {"tls0", "tls1"}
    # without the CA the handshake fails (and, a connect failure, is retried then raised)
    bare = client_for(mesh, verify=ssl.create_default_context())
    with pytest.raises(bare.mod.ConnectError):
        bare.get(f"{TLS_URL}/secure")


def test_one_inner_transport_per_cluster_closed_with_the_transport(scenario, lib):
    mod = importlib.import_module(lib)
    made, closed = [], []

    class Inner(mod.HTTPTransport):
        def close(self) -> None:
            closed.append(self)
            super().close()

    def factory(cluster: str) -> Inner:
        made.append(cluster)
        return Inner()

    transport = MeshTransport(scenario.mesh, inner_factory=factory, module=lib)  # module named explicitly
    with mod.Client(transport=transport) as client:
        for _ in range(3):
            assert client.get(f"{URL}/x").status_code == 200
        assert client.get(f"{URL}/x", headers={"x-canary": "1"}).json()["name"] == "canary"
        assert client.get(f"{URL}/retry").status_code == 200
    assert made == ["main", "canary", "flaky"] and len(closed) == 3
    scenario.assert_no_active_requests()


def test_retry_overflow_returns_the_last_answer_readable(upstreams, make_mesh, client_for):
    # max_retries 0: the retry of a 503 overflows the breaker and the 503 itself is the answer
    failing = upstreams("failing", status=503)
    res = resources({"flaky": [failing.port]}, [route("/", "flaky", retry={"retry_on": "5xx", "num_retries": 2})])
    res["clusters"][0]["circuit_breakers"] = {"thresholds": [{"max_retries": 0}]}
    mesh = make_mesh(res)
    r = client_for(mesh).get(f"{URL}/x")
    assert r.status_code == 503 and r.json()["name"] == "failing"
    assert mesh.stats()["flaky"]["upstream_rq_retry_overflow"] == 1


ROUTER = {"X-Envoy-Retry-On": "5xx", "x-envoy-max-retries": "2", "x-envoy-upstream-rq-timeout-ms": "900",
          "x-envoy-custom": "kept"}


def test_router_headers_are_not_sent_upstream(scenario, client_for):
    # Envoy never forwards the router's x-envoy-* request headers (consumed or stripped);
    # other headers go through.
    c = client_for(scenario.mesh)
    assert c.get(f"{URL}/x", headers=ROUTER).json()["envoy_headers"] == ["x-envoy-custom"]
    scenario.assert_no_active_requests()

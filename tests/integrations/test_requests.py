"""requests ``MeshAdapter`` against real loopback upstreams."""

from __future__ import annotations

import time

import pytest
import requests

import meshcore
from meshcore.integrations.requests import MeshAdapter

from .conftest import HOST, TARGET, TLS_TARGET, TLS_URL, URL


@pytest.fixture
def session_for():
    sessions = []

    def make(mesh, prefix: str = URL, **kw) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # no proxies from the environment
        s.mount(prefix, MeshAdapter(mesh, **kw))
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        s.close()


def test_round_robin_keeps_host_and_leaves_other_hosts_alone(scenario, session_for, upstreams):
    s = session_for(scenario.mesh)
    names = []
    for i in range(6):
        r = s.get(f"{URL}/items/{i}", params={"q": "1"})
        body = r.json()
        names.append(body["name"])
        assert r.status_code == 200 and body["host"] == TARGET and body["path"] == f"/items/{i}?q=1"
        assert r.url == f"{URL}/items/{i}?q=1" and r.request.url == r.url
        assert r.meshcore["cluster"] == "main" and r.meshcore["endpoint"] == f"127.0.0.1:{body['port']}"
    assert sorted(set(names)) == ["main0", "main1", "main2"] and names[:3] == names[3:]
    outside = upstreams("outside")
    r = s.get(f"http://127.0.0.1:{outside.port}/plain")  # not under the mounted prefix
    assert r.json()["name"] == "outside" and not hasattr(r, "meshcore")
    r = s.post(f"{URL}/post", data=b"payload")
    assert r.json()["body"] == "payload"
    scenario.assert_no_active_requests()


def test_scheme_wide_mount_and_canary_header(scenario, session_for):
    s = session_for(scenario.mesh, prefix="http://")
    assert {s.get(f"{URL}/x", headers={"x-canary": "1"}).json()["name"] for _ in range(3)} == {"canary"}
    assert s.get(f"{URL}/x").json()["name"].startswith("main")
    scenario.assert_no_active_requests()


def test_5xx_and_connect_failure_are_retried(scenario, session_for):
    s = session_for(scenario.mesh)
    for _ in range(4):
        assert s.get(f"{URL}/retry").json()["name"] == "healthy"
        assert s.get(f"{URL}/connect").json()["name"] == "healthy"
    assert scenario.failing.hits >= 1
    assert scenario.stat("flaky", "upstream_rq_retry") >= 1
    assert scenario.stat("deadish", "upstream_cx_connect_fail") >= 1
    assert scenario.stat("deadish", "upstream_rq_retry") >= 1
    scenario.assert_no_active_requests()


def test_timeouts(scenario, session_for):
    s = session_for(scenario.mesh)
    for _ in range(2):
        t0 = time.monotonic()
        assert s.get(f"{URL}/pertry").json()["name"] == "healthy"
        assert time.monotonic() - t0 < 0.9
    assert scenario.stat("slowish", "upstream_rq_per_try_timeout") == 1
    t0 = time.monotonic()
    with pytest.raises(requests.exceptions.Timeout) as info:
        s.get(f"{URL}/slow", timeout=5)
    assert time.monotonic() - t0 < 0.9 and isinstance(info.value.__cause__, meshcore.UpstreamTimeout)
    scenario.assert_no_active_requests()


def test_fault_abort_direct_response_and_redirect(scenario, session_for):
    s = session_for(scenario.mesh)
    r = s.get(f"{URL}/fault")
    assert r.status_code == 418 and r.text == "fault filter abort" and scenario.faulty.hits == 0
    r = s.get(f"{URL}/direct")
    assert r.status_code == 200 and r.text == "from the mesh" and r.headers["content-type"] == "text/plain"
    r = s.get(f"{URL}/old/x")  # requests follows the redirect, routed again through the adapter
    assert r.status_code == 200 and r.json()["path"] == "/moved" and r.url == f"{URL}/moved"
    assert [h.status_code for h in r.history] == [301]
    scenario.assert_no_active_requests()


def test_mesh_errors_are_requests_errors(scenario, session_for):
    s = session_for(scenario.mesh, prefix="http://", ready_timeout=0.2)
    with pytest.raises(requests.exceptions.ConnectionError) as info:
        s.get("http://unknown.default.svc.cluster.local:8080/")
    assert isinstance(info.value.__cause__, meshcore.Unavailable)


def test_tls_verifies_the_logical_host(tls_scenario, tls_files, session_for):
    mesh, _ = tls_scenario
    s = session_for(mesh, prefix="https://")
    seen = set()
    for _ in range(4):
        body = s.get(f"{TLS_URL}/secure", verify=tls_files["ca"]).json()
        assert body["sni"] == HOST and body["host"] == TLS_TARGET
        seen.add(body["name"])
    assert seen == {"tls0", "tls1"}
    with pytest.raises(requests.exceptions.SSLError):  # the certificate is checked (unknown CA)
        s.get(f"{TLS_URL}/secure")


def test_router_headers_are_not_sent_upstream(scenario, session_for):
    # Envoy never forwards the router's x-envoy-* request headers (consumed or stripped).
    s = session_for(scenario.mesh)
    headers = {"X-Envoy-Retry-On": "5xx", "x-envoy-upstream-rq-per-try-timeout-ms": "500", "x-envoy-custom": "kept"}
    assert s.get(f"{URL}/x", headers=headers).json()["envoy_headers"] == ["x-envoy-custom"]


def test_proxied_requests_share_the_direct_paths_handling(scenario, session_for, upstreams):
    """A request through a proxy (here a loopback upstream standing in as the forward proxy) is
    sent per attempt by ``HTTPAdapter.send``; a fault abort is still answered locally and the
    logical url/request/meshcore info are those of the direct path."""
    s = session_for(scenario.mesh)
    proxy = upstreams("proxy")
    proxies = {"http": f"http://127.0.0.1:{proxy.port}"}
    r = s.get(f"{URL}/items/1", proxies=proxies)
    assert r.status_code == 200 and r.json()["name"] == "proxy"
    assert r.url == f"{URL}/items/1" and r.request.url == r.url
    assert r.meshcore["cluster"] == "main" and r.meshcore["attempts"] == 1
    r = s.get(f"{URL}/fault", proxies=proxies)
    assert r.status_code == 418 and r.text == "fault filter abort" and r.url == f"{URL}/fault"
    assert r.meshcore["attempts"] == 0 and scenario.faulty.hits == 0
    scenario.assert_no_active_requests()

"""aiohttp ``MeshSession`` against real loopback upstreams."""

from __future__ import annotations

import asyncio
import ssl
import time

import aiohttp
import pytest

import meshcore
from meshcore.integrations.aiohttp import LocalResponse, MeshSession

from .conftest import HOST, TARGET, TLS_TARGET, TLS_URL, URL


def run(coro):
    return asyncio.run(coro)


def test_round_robin_keeps_host_and_passes_other_hosts(scenario, upstreams):
    outside = upstreams("outside")

    async def main():
        async with MeshSession(scenario.mesh, hosts=["*.svc.cluster.local"]) as http:
            names = []
            for i in range(6):
                async with http.get(f"{URL}/items/{i}", params={"q": "1"}) as r:
                    body = await r.json()
                    assert r.status == 200 and body["host"] == TARGET and body["path"] == f"/items/{i}?q=1"
                    assert r.meshcore["cluster"] == "main" and r.meshcore["endpoint"] == f"127.0.0.1:{body['port']}"
                names.append(body["name"])
            r = await http.get(f"http://127.0.0.1:{outside.port}/plain")  # not a mesh host
            assert (await r.json())["name"] == "outside" and not hasattr(r, "meshcore")
            r = await http.post(f"{URL}/post", data=b"payload")
            assert (await r.json())["body"] == "payload"
            return names

    names = run(main())
    assert sorted(set(names)) == ["main0", "main1", "main2"] and names[:3] == names[3:]
    scenario.assert_no_active_requests()


def test_canary_header_and_session_default_headers(scenario):
    async def main():
        async with aiohttp.ClientSession(headers={"x-canary": "1"}) as s:
            http = MeshSession(scenario.mesh, s)
            assert (await (await http.get(f"{URL}/x")).json())["name"] == "canary"  # session default header
        async with MeshSession(scenario.mesh) as http:
            r = await http.get(f"{URL}/x", headers={"x-canary": "1"})
            assert (await r.json())["name"] == "canary"
            assert (await (await http.get(f"{URL}/x")).json())["name"].startswith("main")

    run(main())
    scenario.assert_no_active_requests()


def test_5xx_and_connect_failure_are_retried(scenario):
    async def main():
        async with MeshSession(scenario.mesh) as http:
            for _ in range(4):  # raise_for_status judges the answer after the retries
                assert (await (await http.get(f"{URL}/retry", raise_for_status=True)).json())["name"] == "healthy"
                assert (await (await http.get(f"{URL}/connect")).json())["name"] == "healthy"

    run(main())
    assert scenario.failing.hits >= 1
    assert scenario.stat("flaky", "upstream_rq_retry") >= 1
    assert scenario.stat("deadish", "upstream_cx_connect_fail") >= 1
    scenario.assert_no_active_requests()


def test_timeouts(scenario):
    async def main():
        async with MeshSession(scenario.mesh) as http:
            for _ in range(2):
                t0 = time.monotonic()
                assert (await (await http.get(f"{URL}/pertry")).json())["name"] == "healthy"
                assert time.monotonic() - t0 < 0.9
            t0 = time.monotonic()
            with pytest.raises(aiohttp.ServerTimeoutError) as info:
                await http.get(f"{URL}/slow")
            assert time.monotonic() - t0 < 0.9 and isinstance(info.value.__cause__, meshcore.UpstreamTimeout)

    run(main())
    assert scenario.stat("slowish", "upstream_rq_per_try_timeout") == 1
    assert scenario.stat("slow", "upstream_rq_timeout") == 1
    scenario.assert_no_active_requests()


def test_fault_abort_direct_response_and_redirect(scenario):
    async def main():
        async with MeshSession(scenario.mesh) as http:
            r = await http.get(f"{URL}/fault")
            assert isinstance(r, LocalResponse) and r.status == 418 and await r.text() == "fault filter abort"
            with pytest.raises(aiohttp.ClientResponseError):
                r.raise_for_status()
            r = await http.get(f"{URL}/direct")
            assert r.status == 200 and await r.text() == "from the mesh"
            r = await http.get(f"{URL}/old/x", allow_redirects=False)
            assert r.status == 301 and r.headers["Location"] == f"{URL}/moved"
            r = await http.get(f"{URL}/old/x")  # followed here, the hop routed again
            assert r.status == 200 and (await r.json())["path"] == "/moved"

    run(main())
    assert scenario.faulty.hits == 0
    scenario.assert_no_active_requests()


def test_mesh_errors_are_aiohttp_errors(scenario):
    async def main():
        async with MeshSession(scenario.mesh, ready_timeout=0.2) as http:
            with pytest.raises(aiohttp.ClientConnectionError) as info:
                await http.get("http://unknown.default.svc.cluster.local:8080/")
            assert isinstance(info.value.__cause__, meshcore.Unavailable)

    run(main())


def test_tls_verifies_and_sends_sni_of_the_logical_host(tls_scenario, tls_files):
    mesh, _ = tls_scenario
    ctx = ssl.create_default_context(cafile=tls_files["ca"])

    async def main():
        async with MeshSession(mesh) as http:
            seen = set()
            for _ in range(4):
                body = await (await http.get(f"{TLS_URL}/secure", ssl=ctx)).json()
                assert body["sni"] == HOST and body["host"] == TLS_TARGET
                seen.add(body["name"])
            assert seen == {"tls0", "tls1"}
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(f"{TLS_URL}/secure")  # default trust store: unknown CA

    run(main())


def test_router_headers_are_not_sent_upstream(scenario):
    # Envoy never forwards the router's x-envoy-* request headers (consumed or stripped).
    async def main():
        async with MeshSession(scenario.mesh) as http:
            r = await http.get(f"{URL}/x", headers={"X-Envoy-Max-Retries": "1", "x-envoy-retry-grpc-on": "internal",
                                                    "x-envoy-custom": "kept"})
            assert (await r.json())["envoy_headers"] == ["x-envoy-custom"]

    run(main())
    scenario.assert_no_active_requests()

"""aiohttp ``MeshSession``: cookies under the logical host, repeated headers, the logical Host (over
a user's Host header and a route's host rewrite), retried bodies, timeouts given per request, one
connection per endpoint, and the caller's total as the request's deadline."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

import meshcore
from meshcore.integrations.aiohttp import MeshSession

from .conftest import TARGET, URL, resources, route
from .echo_upstream import EchoUpstream, header_values


@pytest.fixture
def echo():
    ups = [EchoUpstream() for _ in range(2)]
    yield ups
    for u in ups:
        u.close()


@pytest.fixture
def mesh(echo, make_mesh):
    routes = [
        {"name": "rewrite", "match": {"prefix": "/rewrite"},
         "route": {"cluster": "echo", "host_rewrite_literal": "rewritten.internal"}},
        route("/fail-once", "echo", retry={"retry_on": "5xx", "num_retries": 2}),
        route("/", "echo", timeout="5s", retry={"retry_on": "connect-failure", "num_retries": 2}),
    ]
    return make_mesh(resources({"echo": [u.port for u in echo]}, routes))


def run(coro):
    return asyncio.run(coro)


def test_cookies_are_kept_under_the_logical_host_and_sent_back(mesh):
    async def main():
        async with MeshSession(mesh) as http:
            r = await http.get(f"{URL}/set-cookie/sid/abc")
            assert r.status == 200
            jar = http.session.cookie_jar
            assert [(c.key, c.value, c["domain"]) for c in jar] == [("sid", "abc", "echo.default.svc.cluster.local")]
            for _ in range(2):  # both endpoints get it
                body = await (await http.get(f"{URL}/echo")).json()
                assert header_values(body, "Cookie") == ["sid=abc"]
            body = await (await http.get(f"{URL}/echo", cookies={"extra": "1"})).json()
            assert sorted(header_values(body, "Cookie")[0].split("; ")) == ["extra=1", "sid=abc"]

    run(main())


def test_headers_host_and_host_rewrite(mesh):
    async def main():
        async with aiohttp.ClientSession(headers={"X-Default": "d"}) as s:
            http = MeshSession(mesh, s)
            body = await (await http.get(f"{URL}/x", headers=[("X-Multi", "1"), ("X-Multi", "2")])).json()
            assert header_values(body, "X-Multi") == ["1", "2"] and header_values(body, "X-Default") == ["d"]
            assert header_values(body, "Host") == [TARGET]
            body = await (await http.get(f"{URL}/x", headers={"HOST": "spoofed.example", "X-One": "1"})).json()
            assert header_values(body, "Host") == [TARGET] and header_values(body, "X-One") == ["1"]
            body = await (await http.get(f"{URL}/rewrite")).json()
            assert header_values(body, "Host") == ["rewritten.internal"]

    run(main())


def test_retried_post_resends_the_body(mesh, echo):
    async def main():
        async with MeshSession(mesh) as http:
            r = await http.post(f"{URL}/fail-once/a", data=b"payload")
            assert r.status == 200 and r.meshcore["attempts"] == 3  # each upstream fails its first one

    run(main())
    sent = [(m, p, b) for u in echo for (m, p, _, b) in u.requests if p == "/fail-once/a"]
    assert sent == [("POST", "/fail-once/a", b"payload")] * 3


def test_one_kept_alive_connection_per_endpoint_and_urls_made_once(mesh, echo):
    async def main():
        async with MeshSession(mesh) as http:
            for _ in range(10):
                assert (await http.get(f"{URL}/same")).status == 200
            assert len(http._endpoint_urls) == 2 and len(http._urls) == 1

    run(main())
    assert [u.connections for u in echo] == [1, 1]


def test_request_timeout_total_is_the_deadline_and_other_fields_stay(mesh):
    """A per-request ``ClientTimeout``: its total bounds the request (the mesh's deadline); aiohttp
    gets it without its total (the attempt runs under the router loop's timer only)."""
    seen = []
    orig = aiohttp.ClientSession._request

    async def spy(self, method, url, **kw):
        seen.append(kw.get("timeout"))
        return await orig(self, method, url, **kw)

    async def main():
        async with MeshSession(mesh) as http:
            timeout = aiohttp.ClientTimeout(total=7, sock_read=4, sock_connect=3)
            assert (await http.get(f"{URL}/t", timeout=timeout)).status == 200
            assert seen[-1] == aiohttp.ClientTimeout(total=None, sock_read=4, sock_connect=3)
            assert (await http.get(f"{URL}/t")).status == 200  # the session's default, without its total
            assert seen[-1].total is None and seen[-1].sock_connect == http.session.timeout.sock_connect
            t0 = time.monotonic()
            with pytest.raises(aiohttp.ServerTimeoutError) as info:
                # a deadline below the route's 5 s: the caller's total wins
                await http.get(f"{URL}/t", timeout=aiohttp.ClientTimeout(total=1e-4))
            assert time.monotonic() - t0 < 1.0
            assert isinstance(info.value.__cause__, meshcore.UpstreamTimeout)

    aiohttp.ClientSession._request = spy
    try:
        run(main())
    finally:
        aiohttp.ClientSession._request = orig

"""The httpx transports' straight path to the cluster's connection pool, and the async attempt
deadlines of ``meshcore.lifecycle`` (one timer per event loop instead of a task per attempt)."""

from __future__ import annotations

import asyncio
import importlib
import time

import pytest

from meshcore import lifecycle
from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport

from .conftest import TARGET, URL, resources, route

MOUNT = "all://*.svc.cluster.local"


@pytest.fixture(params=["httpx", "httpx2"])
def mod(request):
    try:
        return importlib.import_module(request.param)
    except ImportError:
        pytest.skip(f"{request.param} is not installed")


def _rewrites(upstreams, make_mesh):
    up = upstreams("main0")
    routes = [
        {"name": "rw", "match": {"prefix": "/rw/"},
         "route": {"cluster": "main", "prefix_rewrite": "/new/", "host_rewrite_literal": "other.example"}},
        route("/", "main", timeout="5s", retry={"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "2s"}),
    ]
    return up, make_mesh(resources({"main": [up.port]}, routes))


def test_sync_straight_to_pool_with_rewrites_and_headers(upstreams, make_mesh, mod):
    up, mesh = _rewrites(upstreams, make_mesh)
    transport = MeshTransport(mesh)
    with mod.Client(mounts={MOUNT: transport}, timeout=7.0) as client:
        r = client.get(f"{URL}/rw/x?q=1", headers={"x-envoy-max-retries": "1", "X-Other": "kept"})
        body = r.json()
        assert body["path"] == "/new/x?q=1" and body["host"] == "other.example"
        assert body["envoy_headers"] == []
        assert r.request.headers["x-other"] == "kept" and str(r.request.url) == f"{URL}/rw/x?q=1"
        assert r.extensions["meshcore"] == {"cluster": "main", "endpoint": f"127.0.0.1:{up.port}",
                                            "route": "rw", "attempts": 1}
        assert "network_stream" not in r.extensions and r.extensions["http_version"] == b"HTTP/1.1"
        r = client.get(f"{URL}/plain")
        assert r.json()["host"] == TARGET and r.json()["path"] == "/plain"
        # the cluster's pool got the request: attempts go straight to the library's pool
        (inner,) = transport._pools.pools().values()
        assert inner.pool is transport._inner[(mod.__name__, "main", None)]._pool
        assert r.read() == r.content  # readable again (a replayable stream)
        # the client's timeout extension is capped by the attempt's (per-try 2s), not mutated
        req = client.build_request("GET", f"{URL}/t")
        client.send(req)
        assert req.extensions["timeout"] == {"connect": 7.0, "read": 7.0, "write": 7.0, "pool": 7.0}


def test_async_straight_to_pool(upstreams, make_mesh, mod):
    up, mesh = _rewrites(upstreams, make_mesh)

    async def main() -> None:
        transport = AsyncMeshTransport(mesh)
        async with mod.AsyncClient(mounts={MOUNT: transport}) as client:
            r = await client.get(f"{URL}/rw/y")
            assert r.json()["path"] == "/new/y" and r.json()["host"] == "other.example"
            r = await client.get(f"{URL}/z", headers={"x-envoy-retry-on": "5xx"})
            assert r.json()["envoy_headers"] == [] and r.extensions["meshcore"]["attempts"] == 1
            (inner,) = transport._pools.pools().values()
            assert inner.pool is not None
        assert not lifecycle._deadlines().pending  # every attempt's deadline was withdrawn

    asyncio.run(main())


def test_async_deadline_cancels_attempt_and_retries(upstreams, make_mesh):
    up = upstreams("u")
    mesh = make_mesh(resources({"main": [up.port]}, [
        route("/", "main", timeout="3s", retry={"retry_on": "5xx,reset", "num_retries": 1,
                                               "per_try_timeout": "0.1s"})]))

    async def main() -> None:
        tries = []

        async def send(attempt):
            tries.append(attempt.timeout)
            if len(tries) == 1:
                await asyncio.sleep(5)  # cancelled at the per-try deadline
            return type("R", (), {"status_code": 200})()

        t0 = time.monotonic()
        call = mesh.request(URL + "/")
        result = await call.run_async(send)
        assert result.status_code == 200 and len(tries) == 2
        assert time.monotonic() - t0 < 1.5
        assert call.attempts[0].error == "timeout"
        assert not lifecycle._deadlines().pending

        # a cancellation from outside is not a timeout: it propagates as CancelledError
        async def hang(attempt):
            await asyncio.sleep(5)

        task = asyncio.ensure_future(mesh.request(URL + "/").run_async(hang))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not lifecycle._deadlines().pending

        # an earlier deadline re-arms the loop's timer; a later one does not
        dl = lifecycle._deadlines()
        far = dl.add(10.0)
        armed = dl.armed_at
        near = dl.add(0.05)
        assert dl.armed_at < armed
        dl.pending.pop(far)
        dl.pending.pop(near)

    asyncio.run(main())

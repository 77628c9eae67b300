"""The first request through every HTTP integration (and the plain API) on a freshly started
file-fed mesh succeeds, unknown targets fail at once with the nearest known ones, and a closed
mesh refuses everything with MeshClosed. (Each test starts from ``Mesh.from_file(...).start()``
with no ``wait_ready``: that is what a newcomer writes.)"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

import meshcore
from meshcore.errors import MeshClosed, Unavailable

from .conftest import TARGET, URL, resources, route


@pytest.fixture
def fresh(tmp_path, upstreams):
    """``make() -> (mesh, upstream)``: a started file-fed mesh nobody has asked anything yet."""
    made = []

    def make():
        up = upstreams("u1")
        path = tmp_path / f"mesh{len(made)}.json"
        path.write_text(json.dumps(resources({"c": [up.port]}, [route("/", "c", timeout="2s",
                                                                        retry={"retry_on": "5xx", "num_retries": 1})])))
        mesh = meshcore.Mesh.from_file(path, watch=False).start()
        made.append(mesh)
        return mesh, up

    yield make
    for m in made:
        m.close()


def test_first_pick_and_request(fresh):
    mesh, up = fresh()
    p = mesh.pick(TARGET, "/x")
    assert p.endpoint.port == up.port
    p.done()
    mesh2, up2 = fresh()
    call = mesh2.request(URL + "/x")
    assert call.cluster == "c"
    with call as attempt:
        assert attempt.address.endswith(f":{up2.port}")
        attempt.status = 200


def test_first_request_httpx_sync(fresh):
    import httpx
    from meshcore.integrations.httpx import MeshTransport

    mesh, up = fresh()
    with httpx.Client(transport=MeshTransport(mesh)) as client:
        r = client.get(URL + "/first")
    assert r.status_code == 200 and r.json()["port"] == up.port


def test_first_request_httpx_async(fresh):
    import httpx
    from meshcore.integrations.httpx import AsyncMeshTransport

    mesh, up = fresh()

    async def main():
        async with httpx.AsyncClient(transport=AsyncMeshTransport(mesh)) as client:
            return await client.get(URL + "/first")

    r = asyncio.run(main())
    assert r.status_code == 200 and r.json()["port"] == up.port


def test_first_request_requests(fresh):
    import requests
    from meshcore.integrations.requests import MeshAdapter

    mesh, up = fresh()
    s = requests.Session()
    s.mount(URL, MeshAdapter(mesh))
    r = s.get(URL + "/first")
    assert r.status_code == 200 and r.json()["port"] == up.port


def test_first_request_aiohttp(fresh):
    import aiohttp  # noqa: F401
    from meshcore.integrations.aiohttp import MeshSession

    mesh, up = fresh()

    async def main():
        async with MeshSession(mesh, hosts=[TARGET.rsplit(":", 1)[0]]) as http:
            async with http.get(URL + "/first") as resp:
                return resp.status, await resp.json()

    status, body = asyncio.run(main())
    assert status == 200 and body["port"] == up.port


def test_unknown_target_fails_at_once_with_nearest(fresh):
    mesh, _ = fresh()
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        mesh.pick("echo.default.svc.cluster.locl:8080", "/")
    assert time.monotonic() - started < 1.0
    text = str(info.value)
    assert "echo.default.svc.cluster.locl:8080" in text and "does not exist" in text
    assert f"nearest known targets: {TARGET}" in text
    # the plain request path too, and again (no wait the second time either)
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(Unavailable, match="does not exist"):
            mesh.request("http://echo.default.svc.cluster.locl:8080/")
        assert time.monotonic() - started < 1.0


def test_closed_mesh_refuses_everything(fresh):
    import httpx
    import requests
    from meshcore.integrations.aiohttp import MeshSession
    from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport
    from meshcore.integrations.requests import MeshAdapter

    mesh, _ = fresh()
    mesh.pick(TARGET, "/").done()  # routing worked before close
    mesh.close()
    assert mesh.closed
    with pytest.raises(MeshClosed, match="mesh is closed"):
        mesh.pick(TARGET, "/")
    with pytest.raises(MeshClosed):
        mesh.request(URL + "/")
    with pytest.raises(MeshClosed):
        mesh.wait_ready(TARGET)
    with pytest.raises(MeshClosed):
        mesh.start()
    with httpx.Client(transport=MeshTransport(mesh)) as client, pytest.raises(MeshClosed):
        client.get(URL + "/")
    s = requests.Session()
    s.mount(URL, MeshAdapter(mesh))
    with pytest.raises(MeshClosed):
        s.get(URL + "/")

    async def async_clients():
        async with httpx.AsyncClient(transport=AsyncMeshTransport(mesh)) as client:
            with pytest.raises(MeshClosed):
                await client.get(URL + "/")
        async with MeshSession(mesh, hosts=[TARGET.rsplit(":", 1)[0]]) as http:
            with pytest.raises(MeshClosed):
                await http.get(URL + "/")

    asyncio.run(async_clients())
    mesh.close()  # again: harmless

"""httpx / httpx2 transports with Istio's metadata exchange on: the request carries this workload's
``x-envoy-peer-metadata`` / ``-id`` exactly once -- an application's own (any case) is replaced, as
Istio's filter overwrites it -- on every path an attempt can take: the pool path (the library's own
inner transport; header lists kept per list, with credentials not kept, and not decodable as
UTF-8), the path through an inner transport of another kind (``inner_factory``), sync and async."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any, List

import pytest

from meshcore.integrations.httpx import AsyncMeshTransport, MeshTransport

from .conftest import URL
from .echo_upstream import header_values
from .exchange_support import echo, expected_pair, mesh  # noqa: F401  (fixtures)

LIBS = [name for name in ("httpx", "httpx2") if importlib.util.find_spec(name) is not None]

# the application's own exchange headers, in the forms an attempt's header list can come from
APP_HEADERS: List[Any] = [
    {"X-Envoy-Peer-Metadata": "app-value", "x-envoy-peer-metadata-id": "app-id", "X-Other": "1"},
    {"x-envoy-peer-metadata": "app-value", "X-Other": "1"},
    {"X-ENVOY-PEER-METADATA-ID": "app-id", "X-Other": "1", "Authorization": "Bearer t"},  # not kept per list
    [(b"x-envoy-peer-metadata", b"app-value"), (b"X-Other", b"1"), (b"x-latin", "caf\xe9".encode("latin-1"))],
]


def _check(mesh: Any, bodies: List[Any]) -> None:
    value, ids = expected_pair(mesh)
    assert len(bodies) == len(APP_HEADERS) + 1
    for body in bodies:
        assert header_values(body, "x-envoy-peer-metadata") == [value]
        assert header_values(body, "x-envoy-peer-metadata-id") == ids
    for body in bodies[:-1]:
        assert header_values(body, "X-Other") == ["1"]


def _inner(lib: Any, is_async: bool) -> Any:
    """An inner transport of another kind than the library's (attempts go through its
    ``handle_request`` as library requests)."""
    base = lib.AsyncBaseTransport if is_async else lib.BaseTransport
    real = lib.AsyncHTTPTransport() if is_async else lib.HTTPTransport()
    if is_async:
        class Other(base):  # type: ignore[misc, valid-type]
            async def handle_async_request(self, request: Any) -> Any:
                return await real.handle_async_request(request)

            async def aclose(self) -> None:
                await real.aclose()
    else:
        class Other(base):  # type: ignore[misc, no-redef, valid-type]
            def handle_request(self, request: Any) -> Any:
                return real.handle_request(request)

            def close(self) -> None:
                real.close()
    return Other()


@pytest.mark.parametrize("other_inner", [False, True], ids=["pool", "inner_factory"])
@pytest.mark.parametrize("name", LIBS)
def test_sync_the_apps_peer_metadata_headers_are_replaced(mesh, name, other_inner):
    lib = importlib.import_module(name)
    kw = {"inner_factory": lambda cluster: _inner(lib, False)} if other_inner else {}
    with lib.Client(transport=MeshTransport(mesh, **kw), trust_env=False) as client:
        bodies = [client.get(f"{URL}/x", headers=h).json() for h in APP_HEADERS]
        bodies.append(client.get(f"{URL}/x").json())  # none of the app's: ours, once
    _check(mesh, bodies)


@pytest.mark.parametrize("other_inner", [False, True], ids=["pool", "inner_factory"])
@pytest.mark.parametrize("name", LIBS)
def test_async_the_apps_peer_metadata_headers_are_replaced(mesh, name, other_inner):
    lib = importlib.import_module(name)
    kw = {"inner_factory": lambda cluster: _inner(lib, True)} if other_inner else {}

    async def main() -> List[Any]:
        async with lib.AsyncClient(transport=AsyncMeshTransport(mesh, **kw), trust_env=False) as client:
            out = [(await client.get(f"{URL}/x", headers=h)).json() for h in APP_HEADERS]
            out.append((await client.get(f"{URL}/x")).json())
            return out

    _check(mesh, asyncio.run(main()))


@pytest.mark.parametrize("name", LIBS)
def test_without_the_exchange_the_apps_headers_go_through(mesh, name):
    lib = importlib.import_module(name)
    mesh.telemetry.disable_istio_metrics()
    with lib.Client(transport=MeshTransport(mesh), trust_env=False) as client:
        body = client.get(f"{URL}/x", headers={"X-Envoy-Peer-Metadata": "app-value"}).json()
    assert header_values(body, "x-envoy-peer-metadata") == ["app-value"]
    assert header_values(body, "x-envoy-peer-metadata-id") == []

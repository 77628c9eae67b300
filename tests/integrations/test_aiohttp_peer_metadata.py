"""aiohttp ``MeshSession`` with Istio's metadata exchange on: the request carries this workload's
``x-envoy-peer-metadata`` / ``-id`` exactly once -- an application's own (any case, in its
request headers or the session's defaults) is replaced, as Istio's filter overwrites it."""

from __future__ import annotations

import asyncio

import aiohttp

from meshcore.integrations.aiohttp import MeshSession

from .conftest import URL
from .echo_upstream import header_values
from .exchange_support import echo, expected_pair, mesh  # noqa: F401  (fixtures)


def test_the_apps_peer_metadata_headers_are_replaced(mesh):
    value, ids = expected_pair(mesh)

    async def main():
        async with MeshSession(mesh) as http:
            for headers in ({"X-Envoy-Peer-Metadata": "app-value", "x-envoy-peer-metadata-id": "app-id", "X-Other": "1"},
                            [("x-envoy-peer-metadata", "a"), ("X-ENVOY-PEER-METADATA", "b"), ("X-Other", "1")]):
                body = await (await http.get(f"{URL}/x", headers=headers)).json()
                assert header_values(body, "x-envoy-peer-metadata") == [value]
                assert header_values(body, "x-envoy-peer-metadata-id") == ids
                assert header_values(body, "X-Other") == ["1"]
            body = await (await http.get(f"{URL}/x")).json()  # none of the app's: ours, once
            assert header_values(body, "x-envoy-peer-metadata") == [value]
            assert header_values(body, "x-envoy-peer-metadata-id") == ids

    asyncio.run(main())


def test_session_default_peer_metadata_is_replaced(mesh):
    value, ids = expected_pair(mesh)

    async def main():
        async with aiohttp.ClientSession(headers={"X-Envoy-Peer-Metadata": "default", "X-Default": "d"}) as s:
            http = MeshSession(mesh, s)
            for _ in range(2):  # the shared sender (made once) and its reuse
                body = await (await http.get(f"{URL}/x")).json()
                assert header_values(body, "x-envoy-peer-metadata") == [value]
                assert header_values(body, "x-envoy-peer-metadata-id") == ids
                assert header_values(body, "X-Default") == ["d"]

    asyncio.run(main())


def test_without_the_exchange_the_apps_headers_go_through(mesh):
    mesh.telemetry.disable_istio_metrics()

    async def main():
        async with MeshSession(mesh) as http:
            body = await (await http.get(f"{URL}/x", headers={"X-Envoy-Peer-Metadata": "app-value"})).json()
            assert header_values(body, "x-envoy-peer-metadata") == ["app-value"]

    asyncio.run(main())

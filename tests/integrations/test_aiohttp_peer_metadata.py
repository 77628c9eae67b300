"""aiohttp ``MeshSession`` with Istio's metadata exchange on: the request carries this workload's
``x-envoy-peer-metadata`` / ``-id`` exactly once -- an application's own (any case, in its
request headers or the session's defaults) is replaced, as Istio's filter overwrites it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from meshcore.integrations.aiohttp import MeshSession

from .conftest import URL, resources, route
from .echo_upstream import EchoUpstream, header_values

NODE = {"WORKLOAD_NAME": "client", "NAMESPACE": "shop", "CLUSTER_ID": "c1", "LABELS": {"app": "client-app"}}


@pytest.fixture
def echo():
    up = EchoUpstream()
    yield up
    up.close()


@pytest.fixture
def mesh(echo, make_mesh):
    m = make_mesh(resources({"echo": [echo.port]}, [route("/", "echo", timeout="5s",
                                                          retry={"retry_on": "5xx", "num_retries": 1})]))
    m.telemetry.enable_istio_metrics(node_metadata=NODE)
    yield m
    m.telemetry.disable_istio_metrics()


def _expected(mesh):
    ex = mesh.telemetry.exchange
    assert ex is not None and ex.value
    return ex.value, ([ex.node_id] if ex.node_id else [])


def test_the_apps_peer_metadata_headers_are_replaced(mesh):
    value, ids = _expected(mesh)

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
    value, ids = _expected(mesh)

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

"""requests ``MeshAdapter`` with Istio's metadata exchange on: the request carries this workload's
``x-envoy-peer-metadata`` / ``-id`` exactly once -- an application's own (any case, in its
request headers or the session's) is replaced, as Istio's filter overwrites it."""

from __future__ import annotations

import pytest
import requests

from meshcore.integrations.requests import MeshAdapter

from .conftest import URL
from .echo_upstream import header_values
from .exchange_support import echo, expected_pair, mesh  # noqa: F401  (fixtures)


@pytest.fixture
def session(mesh):
    s = requests.Session()
    s.trust_env = False
    s.mount(URL, MeshAdapter(mesh))
    yield s
    s.close()


def test_the_apps_peer_metadata_headers_are_replaced(mesh, session):
    value, ids = expected_pair(mesh)
    for headers in ({"X-Envoy-Peer-Metadata": "app-value", "x-envoy-peer-metadata-id": "app-id", "X-Other": "1"},
                    {"x-envoy-peer-metadata": "app-value", "X-Other": "1"}):
        body = session.get(f"{URL}/x", headers=headers).json()
        assert header_values(body, "x-envoy-peer-metadata") == [value]
        assert header_values(body, "x-envoy-peer-metadata-id") == ids
        assert header_values(body, "X-Other") == ["1"]
    body = session.get(f"{URL}/x").json()  # none of the app's: ours, once
    assert header_values(body, "x-envoy-peer-metadata") == [value]
    assert header_values(body, "x-envoy-peer-metadata-id") == ids


def test_session_header_and_a_host_header_take_the_other_path(mesh, session):
    # a Host header of the app's: the headers are copied case-insensitively (the other branch)
    value, ids = expected_pair(mesh)
    session.headers["X-ENVOY-PEER-METADATA-ID"] = "app-id"
    body = session.get(f"{URL}/x", headers={"Host": "spoofed.example", "X-Envoy-Peer-Metadata": "app"}).json()
    assert header_values(body, "x-envoy-peer-metadata") == [value]
    assert header_values(body, "x-envoy-peer-metadata-id") == ids


def test_without_the_exchange_the_apps_headers_go_through(mesh, session):
    mesh.telemetry.disable_istio_metrics()
    body = session.get(f"{URL}/x", headers={"X-Envoy-Peer-Metadata": "app-value"}).json()
    assert header_values(body, "x-envoy-peer-metadata") == ["app-value"]

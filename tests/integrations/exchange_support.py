"""What the three peer-metadata tests (httpx, requests, aiohttp) share: an echo upstream, a mesh
routing to it (timeout and a retry policy) with Istio's metadata exchange on, and the pair this
workload sends. Import the fixtures into a test module to use them."""

from __future__ import annotations

from typing import Any, Iterator, List, Tuple

import pytest

from .conftest import resources, route
from .echo_upstream import EchoUpstream

NODE = {"WORKLOAD_NAME": "client", "NAMESPACE": "shop", "CLUSTER_ID": "c1", "LABELS": {"app": "client-app"}}


@pytest.fixture
def echo() -> Iterator[EchoUpstream]:
    up = EchoUpstream()
    yield up
    up.close()


@pytest.fixture
def mesh(echo: EchoUpstream, make_mesh: Any) -> Iterator[Any]:
    m = make_mesh(resources({"echo": [echo.port]}, [route("/", "echo", timeout="5s",
                                                          retry={"retry_on": "5xx", "num_retries": 1})]))
    m.telemetry.enable_istio_metrics(node_metadata=NODE)
    yield m
    m.telemetry.disable_istio_metrics()


def expected_pair(mesh: Any) -> Tuple[str, List[str]]:
    """This workload's x-envoy-peer-metadata value and its -id values (none without a node id)."""
    ex = mesh.telemetry.exchange
    assert ex is not None and ex.value
    return ex.value, ([ex.node_id] if ex.node_id else [])

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


NODE_ID = "sidecar~10.0.0.1~client-v1-xyz.shop~shop.svc.cluster.local"


@pytest.fixture(params=["no-node-id", "node-id"])
def mesh(request: Any, echo: EchoUpstream, make_mesh: Any) -> Iterator[Any]:
    """With and without a node id (a resource file's mesh has none, so sends no -id; a bootstrapped
    one sends its node id as x-envoy-peer-metadata-id)."""
    from meshcore.telemetry import peer_metadata

    m = make_mesh(resources({"echo": [echo.port]}, [route("/", "echo", timeout="5s",
                                                          retry={"retry_on": "5xx", "num_retries": 1})]))
    m.telemetry.enable_istio_metrics(node_metadata=NODE)
    if request.param == "node-id":
        m.telemetry.exchange = peer_metadata.Exchange(NODE_ID, m.telemetry.exchange.workload)
    yield m
    m.telemetry.disable_istio_metrics()


def expected_pair(mesh: Any) -> Tuple[str, List[str]]:
    """This workload's x-envoy-peer-metadata value and its -id values (none without a node id)."""
    ex = mesh.telemetry.exchange
    assert ex is not None and ex.value
    return ex.value, ([ex.node_id] if ex.node_id else [])

"""Retry stats of gRPC calls as Envoy counts them: a retried call whose last answer the policy
would still retry (grpc-status UNAVAILABLE under ``retry_on: unavailable``) ran out of retries
(``upstream_rq_retry_limit_exceeded``), not a retry success, although its HTTP status is 200."""

from __future__ import annotations

import grpc
import pytest

from meshcore.controlplane import ControlPlane

from .conftest import SERVICE, TARGET, ready_mesh, resources


@pytest.fixture
def only_flaky_mesh(servers):
    """The ``main`` cluster holds only s1, whose ``Flaky`` always answers UNAVAILABLE."""
    with ControlPlane() as cp:
        cp.set_resources(resources(servers, main=("s1",)))
        m = ready_mesh(cp, "meshcore-grpc-retry-stats", 5)
        try:
            yield m
        finally:
            m.close()


def test_exhausted_grpc_retries_count_limit_exceeded(only_flaky_mesh):
    from meshcore.integrations.grpc import mesh_channel

    mesh = only_flaky_mesh
    with mesh_channel(mesh, TARGET) as ch:
        flaky = ch.unary_unary(f"/{SERVICE}/Flaky")
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                flaky(b"", timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert ch.unary_unary(f"/{SERVICE}/Hello")(b"", timeout=5) == b"s1"
    st = mesh.stats()["main"]
    assert st["upstream_rq_retry"] == 3 * 2  # num_retries 2 per call
    assert st["upstream_rq_retry_limit_exceeded"] == 3
    assert st.get("upstream_rq_retry_success", 0) == 0

"""grpcio through meshcore on a freshly started mesh: the first RPC succeeds (no wait_ready
before it), and a closed mesh refuses RPCs with MeshClosed."""

from __future__ import annotations

import pytest

import meshcore
from meshcore.errors import MeshClosed
from meshcore.integrations.grpc import mesh_channel

from .conftest import SERVICE, TARGET


@pytest.fixture
def fresh_mesh(cp):
    boot = {"xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": "meshcore-grpc-first", "cluster": "meshcore"}}
    m = meshcore.Mesh(boot, seed=3).start()
    yield m
    m.close()


def test_first_rpc_succeeds(fresh_mesh):
    with mesh_channel(fresh_mesh, TARGET) as ch:
        reply = ch.unary_unary(f"/{SERVICE}/Hello")(b"hi", timeout=10)
    assert reply.startswith(b"s")  # one of the main cluster's servers answered


def test_closed_mesh_refuses_rpcs(fresh_mesh):
    with mesh_channel(fresh_mesh, TARGET) as ch:
        hello = ch.unary_unary(f"/{SERVICE}/Hello")
        hello(b"hi", timeout=10)
        fresh_mesh.close()
        with pytest.raises(MeshClosed):
            hello(b"hi", timeout=10)
        with pytest.raises(MeshClosed):
            list(ch.unary_stream(f"/{SERVICE}/Count")(b"3", timeout=10))

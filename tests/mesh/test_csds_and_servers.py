"""CSDS over gRPC, config_dump's shape, and the bootstrap's server list (fallback, unix socket)."""

from __future__ import annotations

import os
import socket

import grpc
import pytest
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE

from .shapes import TARGET, bootstrap, fast_backoff, resources


def test_csds_service_reports_every_resource(cp, make_mesh):
    cp.set_resources(resources())
    mesh = make_mesh("sotw")
    mesh.wait_ready(TARGET)
    port = mesh.serve_csds("127.0.0.1:0")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(ch)
        resp = stub.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=5)
        assert len(resp.config) == 1
        cc = resp.config[0]
        assert cc.node.id == "meshcore-test" and cc.node.user_agent_name == "meshcore"
        got = {(g.type_url, g.name): g for g in cc.generic_xds_configs}
        assert set(got) == {(LISTENER, TARGET), (ROUTE, "routes"), (CLUSTER, "a"), (CLUSTER, "b"),
                            (ENDPOINT, "a"), (ENDPOINT, "b")}
        for g in got.values():
            assert g.client_status == config_dump_shared_pb2.ACKED
            assert g.xds_config.type_url == g.type_url and g.version_info
            assert g.last_updated.seconds > 0
        lean = stub.FetchClientStatus(csds_pb2.ClientStatusRequest(exclude_resource_contents=True), timeout=5)
        assert not any(g.HasField("xds_config") for g in lean.config[0].generic_xds_configs)
        with pytest.raises(grpc.RpcError) as e:
            stub.FetchClientStatus(csds_pb2.ClientStatusRequest(node_matchers=[{}]), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_config_dump_is_client_config_json(cp, make_mesh):
    cp.set_resources(resources())
    mesh = make_mesh("sotw")
    mesh.wait_ready(TARGET)
    dump = mesh.config_dump()
    assert dump["node"]["id"] == "meshcore-test"
    entry = next(g for g in dump["generic_xds_configs"] if g["type_url"] == CLUSTER and g["name"] == "a")
    assert entry["client_status"] == "ACKED"
    assert entry["xds_config"]["@type"] == CLUSTER and entry["xds_config"]["name"] == "a"
    assert set(entry) >= {"type_url", "name", "version_info", "last_updated", "client_status"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_falls_back_to_the_next_server(cp):
    cp.set_resources(resources())
    boot = bootstrap(cp)
    dead = {"server_uri": f"127.0.0.1:{_closed_port()}", "channel_creds": [{"type": "insecure"}]}
    boot["xds_servers"].insert(0, dead)
    with meshcore.Mesh(boot, backoff=fast_backoff()) as mesh:
        mesh.wait_ready(TARGET, timeout=5)
        assert mesh.pick(TARGET, "/x").cluster == "a"
        assert mesh._source.server_uri == cp.address


def test_unix_socket_server(tmp_path):
    path = os.path.join(str(tmp_path), "xds.sock")
    with ControlPlane(address=f"unix://{path}") as plane:
        plane.set_resources(resources())
        boot = {"xds_servers": [{"server_uri": f"unix://{path}", "channel_creds": [{"type": "insecure"}]}],
                "node": {"id": "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local", "metadata": {"GENERATOR": "grpc"}}}
        with meshcore.Mesh(boot, backoff=fast_backoff()) as mesh:
            mesh.wait_ready(TARGET, timeout=5)
            first = next(e for e in plane.history if e["dir"] == "req")
            assert first["node"]["metadata"]["GENERATOR"] == "grpc"


def test_broken_bootstrap_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP", raising=False)
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP_CONFIG", '{"xds_servers": [], "node": {"id": "x"}}')
    with pytest.raises(meshcore.ConfigError, match="xds_servers"):
        meshcore.Mesh()

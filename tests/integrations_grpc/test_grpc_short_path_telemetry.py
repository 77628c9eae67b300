"""The blocking unary short path with Istio's metrics alone (the sink's observer, no other sink):
what the caller sees and what is counted equal the general, reported path's."""

from __future__ import annotations

import os
from typing import Any, Iterator, List

import grpc
import pytest

import meshcore
from meshcore.integrations.grpc import mesh_channel

from .test_grpc_istio_telemetry import CLIENT_ID, SERVICE, TARGET, _no_exchange, mesh, mesh_file, pm, server  # noqa: F401,E501


def _istio_alone(m: Any) -> Any:
    tel = m.telemetry
    sink = tel.enable_istio_metrics(node_metadata={"WORKLOAD_NAME": "client-v1", "NAMESPACE": "shop"})
    tel.exchange = pm.Exchange(CLIENT_ID, tel.exchange.workload)  # (a file mesh has no node ID)
    assert tel.observe is not None  # the short path runs
    return sink


def test_short_path_errors_hide_the_exchange_pair(mesh):  # noqa: F811
    """A server's error answered through the short path (the endpoint learned by the first call)
    hides Istio's exchange pair from the caller, as the general path's errors do."""
    _istio_alone(mesh)
    with mesh_channel(mesh, TARGET) as ch:
        for method, code, app in (("Fail", grpc.StatusCode.NOT_FOUND, ("x-app", "1")),
                                  ("FailTrailersOnly", grpc.StatusCode.PERMISSION_DENIED, ("x-app", "2"))):
            rpc = ch.unary_unary(f"/{SERVICE}/{method}", _registered_method=True)
            for _ in range(3):  # the first learns the endpoint (tapped); the others: the short path
                with pytest.raises(grpc.RpcError) as err:
                    rpc(b"", timeout=5)
                e = err.value
                assert e.code() is code
                md = [*(e.initial_metadata() or ()), *(e.trailing_metadata() or ())]
                assert _no_exchange(md) and app in md, md
            assert rpc._eps_cfg is mesh.config(TARGET) and len(rpc._eps) == 1  # (the short path ran)
    counted = {s["labels"]["grpc_response_status"]: s["requests"] for s in mesh.telemetry.istio_metrics.snapshot()}
    assert counted == {"5": 3, "7": 3}


@pytest.fixture
def partial_mesh(server, tmp_path) -> Iterator[Any]:  # noqa: F811
    """Routes for SERVICE's methods only: any other method has no route (NR)."""
    route = {"name": "r", "match": {"prefix": f"/{SERVICE}/"}, "route": {"cluster": "peer"}}
    path = mesh_file(tmp_path, server["port"], route)
    with meshcore.Mesh.from_file(path, watch=False).start() as m:
        m.wait_ready(TARGET, timeout=10)
        yield m


def test_short_path_reports_a_route_refusal_once(partial_mesh):
    """No route for the method: each RPC is one NR request in Istio's metrics (Mesh.request
    reports its refusal; the short path must not route it a second time), and raises the general
    path's status."""
    sink = _istio_alone(partial_mesh)
    seen: List[Any] = []
    with mesh_channel(partial_mesh, TARGET) as ch:
        nope = ch.unary_unary("/other.Svc/X")
        for kw in ({}, {}, {"metadata": [("x-user", "u")]}):  # short path twice, the general path once
            with pytest.raises(grpc.RpcError) as err:
                nope(b"", timeout=5, **kw)
            seen.append((err.value.code(), err.value.details()))
    assert seen[0] == seen[1] == seen[2] and seen[0][0] is grpc.StatusCode.UNIMPLEMENTED
    assert [(s["labels"]["response_flags"], s["requests"]) for s in sink.snapshot()] == [("NR", 3)]


def test_another_meshs_sinks_leave_this_mesh_on_the_short_path(mesh, tmp_path):  # noqa: F811
    """Two meshes in one process, Istio's metrics on one: the other mesh's RPCs are not reported
    (nothing counted for them) and keep the unreported short path (not the reported general
    path they took while any mesh of the process had a sink)."""
    sink = _istio_alone(mesh)
    path = os.path.join(tmp_path, "mesh.json")
    with meshcore.Mesh.from_file(path, watch=False).start() as quiet:
        quiet.wait_ready(TARGET, timeout=10)
        assert not quiet.telemetry.sinks
        with mesh_channel(quiet, TARGET) as ch, mesh_channel(mesh, TARGET) as reported:
            rpc = ch.unary_unary(f"/{SERVICE}/Hello", _registered_method=True)
            invoked: List[Any] = []
            general = rpc._invoke
            rpc._invoke = lambda *a, **k: invoked.append(a) or general(*a, **k)
            for _ in range(5):
                assert rpc(b"q", timeout=5) == b"hi q"
            assert invoked == [] and len(rpc._eps) == 1  # (the first call learned the endpoint)
            hello = reported.unary_unary(f"/{SERVICE}/Hello", _registered_method=True)
            for _ in range(2):
                assert hello(b"r", timeout=5) == b"hi r"
    assert sum(s["requests"] for s in sink.snapshot()) == 2


def test_a_sink_added_during_a_short_path_rpc_gets_its_record(mesh):  # noqa: F811
    """Istio's metrics alone when the RPC starts, another sink added while it runs: the RPC's
    record reaches the new sink too (as report() and the general path read the sinks when the
    call ends), and Istio's series count it once."""
    sink = _istio_alone(mesh)
    records: List[Any] = []
    armed: List[int] = []

    def serialize(request: bytes) -> bytes:  # (runs inside the attempt, after the RPC started)
        if armed:
            armed.clear()
            mesh.telemetry.add_sink(records.append)
        return request

    with mesh_channel(mesh, TARGET) as ch:
        rpc = ch.unary_unary(f"/{SERVICE}/Hello", request_serializer=serialize, _registered_method=True)
        for _ in range(3):  # the first learns the endpoint (tapped); the others: the short path
            assert rpc(b"q", timeout=5) == b"hi q"
        assert len(rpc._eps) == 1 and mesh.telemetry.observer is not None
        armed.append(1)
        assert rpc(b"q", timeout=5) == b"hi q"
        assert not armed and mesh.telemetry.observer is None
    assert len(records) == 1 and records[0].response_code == 200 and records[0].attempts == 1
    assert records[0].peer_metadata is not None  # (the facts the tap learned)
    assert sum(s["requests"] for s in sink.snapshot()) == 4
    assert mesh.stats()["peer"]["upstream_rq_active"] == 0

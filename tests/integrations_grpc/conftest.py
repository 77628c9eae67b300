"""Fixtures for the gRPC channel tests: loopback gRPC servers, a control plane routing to them,
meshes bootstrapped to it, and the test proto compiled with grpc_tools.protoc."""

from __future__ import annotations

import importlib
import os
import sys
import time
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List

import grpc
import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.xds.client import Backoff

TARGET = "echo.test.svc:8080"
SERVICE = "meshcore.test.Echo"
PB_SERVICE = "meshcore.test.pb.Echo"
SLOW_SECONDS = 0.6
ROUTE_TIMEOUT = 0.3
HERE = os.path.dirname(__file__)


# -- servers ----------------------------------------------------------------------------------------


def _sleep_while_active(context: grpc.ServicerContext, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and context.is_active():
        time.sleep(0.01)


def _handlers(name: str) -> List[grpc.GenericRpcHandler]:
    me = name.encode()

    def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        return me

    def flaky(request: bytes, context: grpc.ServicerContext) -> bytes:
        if name == "s1":
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{name} is draining")
        return me

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        _sleep_while_active(context, SLOW_SECONDS)
        return me

    def wait(request: bytes, context: grpc.ServicerContext) -> bytes:
        _sleep_while_active(context, 3.0)
        return me

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request or b"3")):
            yield me + b":" + str(i).encode()

    def collect(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return me + b":" + b"+".join(requests)

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield me + b":" + r

    def pb_hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"\x0a" + bytes([len(me)]) + me  # HelloReply{server: name}, encoded by hand

    echo = grpc.method_handlers_generic_handler(SERVICE, {
        "Hello": grpc.unary_unary_rpc_method_handler(hello),
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Wait": grpc.unary_unary_rpc_method_handler(wait),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })
    pb = grpc.method_handlers_generic_handler(PB_SERVICE, {"Hello": grpc.unary_unary_rpc_method_handler(pb_hello)})
    return [echo, pb]


@pytest.fixture(scope="module")
def servers() -> Iterator[Dict[str, int]]:
    """``{name: port}``: s1, s2, s3 (cluster ``main``; s1 fails ``Flaky`` with UNAVAILABLE),
    c1 (cluster ``canary``)."""
    started: List[grpc.Server] = []
    ports: Dict[str, int] = {}
    for name in ("s1", "s2", "s3", "c1"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers(_handlers(name))
        ports[name] = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
    yield ports
    for server in started:
        server.stop(0)


def dead_port() -> int:
    """A loopback port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- configuration ----------------------------------------------------------------------------------


def _fault_filter() -> hcm_pb2.HttpFilter:
    """Envoy's fault filter, aborts driven by x-envoy-fault-abort-(grpc-)request headers."""
    abort = fault_pb2.FaultAbort(header_abort=fault_pb2.FaultAbort.HeaderAbort(),
                                 percentage=percent_pb2.FractionalPercent(numerator=100))
    return hcm_pb2.HttpFilter(name="envoy.filters.http.fault", typed_config=b.pack(fault_pb2.HTTPFault(abort=abort)))


def _retry(route: route_components_pb2.Route, retry_on: str, num_retries: int = 2) -> route_components_pb2.Route:
    """A retry policy that re-picks away from hosts already tried (Envoy's previous_hosts)."""
    predicate = route_components_pb2.RetryPolicy.RetryHostPredicate(
        name="envoy.retry_host_predicates.previous_hosts", typed_config=b.pack(previous_hosts_pb2.PreviousHostsPredicate()))
    route.route.retry_policy.CopyFrom(route_components_pb2.RetryPolicy(
        retry_on=retry_on, num_retries=wrappers_pb2.UInt32Value(value=num_retries), retry_host_predicate=[predicate],
        host_selection_retry_max_attempts=5))
    return route


def resources(ports: Dict[str, int], main: tuple = ("s1", "s2", "s3"), mixed: tuple = ("s3",)) -> List[Any]:
    """The target's listener, routes, clusters and endpoints.

    Routes, first match wins: metadata ``x-canary: 1`` on a gRPC request (``grpc: {}``) ->
    ``canary``; ``x-pool: mixed`` -> ``mixed`` (a dead port and ``mixed``, retried on
    connect-failure only); ``.../Slow`` -> ``main`` with a 0.3 s timeout; everything else -> ``main``
    (least-request, retried on ``unavailable``)."""
    host = TARGET.rsplit(":", 1)[0]
    canary = b.route(prefix="/", cluster="canary", headers={"x-canary": "1"}, name="canary")
    canary.match.grpc.SetInParent()
    to_mixed = _retry(b.route(prefix="/", cluster="mixed", headers={"x-pool": "mixed"}, name="mixed"),
                   "connect-failure", 3)
    slow = b.route(path=f"/{SERVICE}/Slow", cluster="main", name="slow", timeout=ROUTE_TIMEOUT)
    default = _retry(b.route(prefix="/", cluster="main", name="default"), "unavailable")
    vhost = b.virtual_host("echo", [host, TARGET], [canary, to_mixed, slow, default])
    return [
        b.api_listener(TARGET, route_config_name="echo-routes", filters=[_fault_filter()]),
        b.route_config("echo-routes", [vhost]),
        b.cluster("main", lb_policy="LEAST_REQUEST"),
        b.cluster("canary"),
        b.cluster("mixed"),
        b.assignment("main", [("127.0.0.1", ports[n]) for n in main]),
        b.assignment("canary", [("127.0.0.1", ports["c1"])]),
        b.assignment("mixed", [("127.0.0.1", dead_port())] + [("127.0.0.1", ports[n]) for n in mixed]),
    ]


@pytest.fixture
def cp(servers):
    with ControlPlane() as plane:
        plane.set_resources(resources(servers))
        yield plane


def ready_mesh(cp: ControlPlane, node_id: str, seed: int) -> meshcore.Mesh:
    """A started mesh on ``cp`` (fast reconnect backoff) with TARGET's configuration in."""
    boot = {"xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": node_id, "cluster": "meshcore", "locality": {"zone": "z1"}}}
    m = meshcore.Mesh(boot, backoff=Backoff(initial=0.05, multiplier=1.6, jitter=0.2, maximum=0.5), seed=seed)
    m.start()
    m.wait_ready(TARGET, timeout=10)
    return m


@pytest.fixture
def mesh(cp) -> Iterator[meshcore.Mesh]:
    m = ready_mesh(cp, "meshcore-grpc-test", 7)
    try:
        yield m
    finally:
        m.close()


# -- the generated stub -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_pb(tmp_path_factory) -> SimpleNamespace:
    """``echo.proto`` compiled with grpc_tools.protoc: ``.pb2`` and ``.pb2_grpc`` modules."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("protoc")
    (out / "meshcore_test_echo.proto").write_text((Path(HERE) / "echo.proto").read_text())
    rc = protoc.main(["grpc_tools.protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}",
                      str(out / "meshcore_test_echo.proto")])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("meshcore_test_echo_pb2")
        pb2_grpc = importlib.import_module("meshcore_test_echo_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    yield SimpleNamespace(pb2=pb2, pb2_grpc=pb2_grpc)
    sys.modules.pop("meshcore_test_echo_pb2", None)
    sys.modules.pop("meshcore_test_echo_pb2_grpc", None)

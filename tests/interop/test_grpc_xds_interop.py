"""grpcio's built-in xDS client (C-core) against meshcore's control plane.

The client runs in a subprocess (grpcio reads ``GRPC_XDS_BOOTSTRAP`` once per process) and calls
``xds:///greeter``; two gRPC upstreams in this process answer with their names. Checked: RPCs
reach the upstream named by EDS, the LDS -> RDS -> CDS -> EDS walk with an ACK of every response,
an EDS push moving traffic, a NACK (code 3) of a STATIC cluster while RPCs keep working, and the
client reconnecting to a control plane restarted on the same port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Dict, Iterator, List

import grpc
import pytest
from envoy_process import die_with_parent, kill

from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.xds.model import CLUSTER, ENDPOINT, LISTENER, ROUTE, SHORT_NAMES

CLIENT = Path(__file__).with_name("grpc_xds_client.py")
NODE_ID = "grpc-client-1"


def _upstream(name: str) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    reply = name.encode()
    handler = grpc.method_handlers_generic_handler(
        "meshcore.test.Echo", {"Hello": grpc.unary_unary_rpc_method_handler(lambda request, context: reply)})
    server.add_generic_rpc_handlers((handler,))
    server.port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    server.start()
    return server


@pytest.fixture
def upstreams() -> Iterator[Dict[str, Any]]:
    servers = {"A": _upstream("A"), "B": _upstream("B")}
    yield servers
    for s in servers.values():
        s.stop(0)


def _resources(port: int) -> List[Any]:
    return [
        b.api_listener("greeter", route_config_name="greeter-route"),
        b.route_config("greeter-route", [b.virtual_host("greeter-vh", ["greeter"], [
            b.route(prefix="", cluster="greeter-cluster", name="greeter-default")])]),
        b.cluster("greeter-cluster", eds_service_name="greeter-endpoints"),
        b.assignment("greeter-endpoints", localities=[{"zone": "z1", "weight": 3, "endpoints": [("127.0.0.1", port)]}]),
    ]


class XdsClient:
    """The client subprocess: :meth:`call` makes one RPC and returns its stdout line."""

    def __init__(self, tmp: Path, xds_port: int) -> None:
        bootstrap = tmp / "grpc-bootstrap.json"
        bootstrap.write_text(json.dumps({
            "xds_servers": [{"server_uri": f"127.0.0.1:{xds_port}", "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": NODE_ID, "cluster": "meshcore-test", "locality": {"zone": "z1"}},
        }))
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap), GRPC_VERBOSITY="ERROR")
        self.stderr_path = tmp / "client.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(die_with_parent([sys.executable, str(CLIENT), "xds:///greeter"]), env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         start_new_session=True)
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"client exited: {self.stderr_path.read_text()[-3000:]}")
        return line.strip()

    def call(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write("call\n")
        self.proc.stdin.flush()
        return self.readline()

    def until(self, expected: str, cp: ControlPlane, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            last = self.call()
            if last == expected:
                return
            time.sleep(0.02)
        raise AssertionError(f"never got {expected!r} (last {last!r}); history:\n" + _dump(cp))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill(self.proc)


def _dump(cp: ControlPlane) -> str:
    return "\n".join(f"{e['stream']} {e['dir']} {SHORT_NAMES.get(e['type_url'])} v={e['version_info']!r} "
                     f"nonce={e['nonce']!r} names={e['names']} err={e['error_detail']}" for e in cp.history[-40:])


def _index(events: List[Dict[str, Any]], pred) -> int:
    for i, e in enumerate(events):
        if pred(e):
            return i
    raise AssertionError("no such event:\n" + "\n".join(map(str, events)))


def test_grpc_xds_client(tmp_path: Path, upstreams: Dict[str, Any]) -> None:
    cp = ControlPlane().start()
    client = None
    try:
        cp.set_resources(_resources(upstreams["A"].port))
        client = XdsClient(tmp_path, cp.port)
        client.until("ok A", cp)

        # the proxyless walk: LDS -> RDS -> CDS -> EDS, by name, every response ACKed
        ack_eds = cp.wait_for(lambda e: e["dir"] == "req" and e["type_url"] == ENDPOINT and e["nonce"])
        events = [e for e in cp.history if e["stream"] == ack_eds["stream"]]
        assert events[0]["node"]["id"] == NODE_ID and "user_agent_name" in events[0]["node"]
        assert events[0]["type_url"] == LISTENER and events[0]["names"] == ["greeter"]
        order = []
        for type_url, names in ((LISTENER, ["greeter"]), (ROUTE, ["greeter-route"]),
                                (CLUSTER, ["greeter-cluster"]), (ENDPOINT, ["greeter-endpoints"])):
            i_req = _index(events, lambda e, t=type_url: e["dir"] == "req" and e["type_url"] == t)
            assert events[i_req]["names"] == names and events[i_req]["nonce"] == ""
            resp = events[_index(events, lambda e, t=type_url: e["dir"] == "resp" and e["type_url"] == t)]
            assert resp["names"] == names
            i_ack = _index(events, lambda e, n=resp["nonce"]: e["dir"] == "req" and e["nonce"] == n)
            ack = events[i_ack]
            assert ack["type_url"] == type_url and ack["error_detail"] is None
            assert ack["version_info"] == resp["version_info"] and ack["names"] == names
            order.append((i_req, i_ack))
        assert [r for r, _ in order] == sorted(r for r, _ in order)  # each type requested after the previous
        assert [a for _, a in order] == sorted(a for _, a in order)  # and ACKed in the same order

        # an EDS push moves traffic to B
        mark = len(cp.history)
        cp.update([b.assignment("greeter-endpoints", localities=[
            {"zone": "z1", "weight": 1, "endpoints": [("127.0.0.1", upstreams["B"].port)]}])])
        client.until("ok B", cp)
        assert [client.call() for _ in range(5)] == ["ok B"] * 5
        resp = cp.wait_for(lambda e: e["dir"] == "resp", start=mark)
        assert (resp["type_url"], resp["names"]) == (ENDPOINT, ["greeter-endpoints"])
        cp.wait_for(lambda e: e["dir"] == "req" and e["nonce"] == resp["nonce"] and e["error_detail"] is None
                    and e["version_info"] == resp["version_info"], start=mark)

        # a STATIC cluster is NACKed with INVALID_ARGUMENT; RPCs keep working on the last good config
        mark = len(cp.history)
        good_cds = [e for e in cp.history if e["dir"] == "resp" and e["type_url"] == CLUSTER][-1]
        cp.update([b.cluster("greeter-cluster", type="STATIC")])
        bad = cp.wait_for(lambda e: e["dir"] == "resp" and e["type_url"] == CLUSTER, start=mark)
        nack = cp.wait_for(lambda e: e["dir"] == "req" and e["nonce"] == bad["nonce"], timeout=10, start=mark)
        assert nack["type_url"] == CLUSTER and nack["error_detail"] is not None
        assert nack["error_detail"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert nack["version_info"] == good_cds["version_info"]
        assert [client.call() for _ in range(3)] == ["ok B"] * 3
        cp.update([b.cluster("greeter-cluster", eds_service_name="greeter-endpoints")])  # fix it

        # restart the control plane on the same port: the client re-requests all four types with
        # its last accepted versions and an empty nonce, and follows the new server's pushes
        port, resources = cp.port, {t: cp.resources(t) for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)}
        cp.stop()
        assert [client.call() for _ in range(2)] == ["ok B"] * 2  # cached config while disconnected
        cp = ControlPlane(address=f"127.0.0.1:{port}").start()
        cp.set_resources(resources)
        for type_url in (LISTENER, ROUTE, CLUSTER, ENDPOINT):
            req = cp.wait_for(lambda e, t=type_url: e["dir"] == "req" and e["type_url"] == t, timeout=20)
            assert req["nonce"] == "" and req["version_info"] != ""
        cp.update([b.assignment("greeter-endpoints", localities=[
            {"zone": "z1", "weight": 1, "endpoints": [("127.0.0.1", upstreams["A"].port)]}])])
        client.until("ok A", cp)
    finally:
        if client is not None:
            client.close()
        cp.stop()


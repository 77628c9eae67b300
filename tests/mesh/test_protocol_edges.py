"""Protocol corners, against a scripted ADS server that sends exactly what a test wants:
Resource wrappers in SotW, TTL heartbeats, unrequested types, duplicate names, stale versions,
ignore_resource_deletion."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from typing import Any, Callable, List

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

import meshcore
from meshcore.xds.model import CLUSTER, ENDPOINT

from .shapes import TARGET, bootstrap, fast_backoff, resources


class ScriptedAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """SotW server: ``respond(request) -> list of DiscoveryResponse``; logs every request."""

    def __init__(self, respond: Callable[[Any], List[Any]]) -> None:
        self.respond = respond
        self.requests: "queue.Queue[Any]" = queue.Queue()
        self.log: List[Any] = []
        self.outbox: "queue.Queue[Any]" = queue.Queue()

    def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802
        def reader() -> None:
            try:
                for req in request_iterator:
                    self.log.append(req)
                    for resp in self.respond(req):
                        self.outbox.put(resp)
            except grpc.RpcError:  # the client went away
                pass
            self.outbox.put(None)

        threading.Thread(target=reader, daemon=True).start()
        while context.is_active():  # ends when the server stops (its threads must not linger)
            try:
                item = self.outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            yield item

    def push(self, resp: Any) -> None:
        self.outbox.put(resp)

    def wait(self, pred: Callable[[Any], bool], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in list(self.log):
                if pred(r):
                    return r
            time.sleep(0.005)
        raise AssertionError("no such request: " + "; ".join(str(r).replace("\n", " ")[:160] for r in self.log))


def serve(servicer: ScriptedAds):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def packed(msg: Any) -> Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def wrapped(msg: Any, name: str) -> Any:
    return packed(discovery_pb2.Resource(name=name, resource=packed(msg), version="w1"))


class Responder:
    """Answers each type's first request with the resources of ``res`` (by requested name)."""

    def __init__(self, res: Any, wrap: bool = False) -> None:
        self.res = res
        self.wrap = wrap
        self.nonce = 0
        self.answered: set = set()

    def __call__(self, req: Any) -> List[Any]:
        if req.response_nonce or req.type_url in self.answered:
            return []
        self.answered.add(req.type_url)
        self.nonce += 1
        items = [self.res[req.type_url][n] for n in req.resource_names if n in self.res[req.type_url]]
        anys = [wrapped(m, n) if self.wrap else packed(m) for n, m in zip(req.resource_names, items)]
        return [discovery_pb2.DiscoveryResponse(version_info="1", type_url=req.type_url, nonce=str(self.nonce),
                                                resources=anys)]


@pytest.fixture
def scripted():
    made = []

    def make(respond):
        ads = ScriptedAds(respond)
        server, address = serve(ads)
        made.append(server)
        return ads, address

    yield make
    for s in made:
        s.stop(0)


def _mesh(address: str, **kw: Any) -> meshcore.Mesh:
    boot = bootstrap(None, uri=address)
    boot["xds_servers"][0]["server_features"] += kw.pop("features", [])
    return meshcore.Mesh(boot, backoff=fast_backoff(), **kw).start()


def test_resource_wrappers_in_sotw_are_unwrapped(scripted):
    ads, address = scripted(Responder(resources(), wrap=True))
    with _mesh(address) as mesh:
        mesh.wait_ready(TARGET, timeout=5)
        assert mesh.pick(TARGET, "/b").endpoint.port == 9003
    node = ads.log[0].node
    assert "xds.config.resource-in-sotw" in node.client_features


def test_heartbeat_unrequested_type_and_duplicates(scripted):
    res = resources()
    ads, address = scripted(Responder(res))
    with _mesh(address) as mesh:
        mesh.wait_ready(TARGET, timeout=5)
        n = len(ads.log)
        # a type we never asked for: dropped without ACK (gRPC C-core and Go do the same)
        ads.push(discovery_pb2.DiscoveryResponse(version_info="9", nonce="u1",
                                                 type_url="type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"))
        # a TTL heartbeat (Resource without a body): ACKed, nothing changes
        ads.push(discovery_pb2.DiscoveryResponse(version_info="2", type_url=CLUSTER, nonce="h1", resources=[
            packed(discovery_pb2.Resource(name="a", version="2"))]))
        ack = ads.wait(lambda r: r.response_nonce == "h1")
        assert not ack.HasField("error_detail") and ack.version_info == "2"
        assert not [r for r in ads.log[n:] if r.response_nonce == "u1"]
        assert mesh.pick(TARGET, "/x").cluster == "a"
        # the same name twice in one response: NACK naming it
        c = res[CLUSTER]["b"]
        ads.push(discovery_pb2.DiscoveryResponse(version_info="3", type_url=CLUSTER, nonce="d1",
                                                 resources=[packed(res[CLUSTER]["a"]), packed(c), packed(c)]))
        nack = ads.wait(lambda r: r.response_nonce == "d1")
        assert nack.error_detail.code == 3 and "duplicate" in nack.error_detail.message
        assert nack.version_info == "2"  # the last accepted version
        # a resource of the wrong type inside a response
        ads.push(discovery_pb2.DiscoveryResponse(version_info="4", type_url=CLUSTER, nonce="w1",
                                                 resources=[packed(res[ENDPOINT]["a"])]))
        nack = ads.wait(lambda r: r.response_nonce == "w1")
        assert "resource index 0" in nack.error_detail.message and "ClusterLoadAssignment" in nack.error_detail.message


def test_ignore_resource_deletion_keeps_clusters(scripted):
    res = resources()
    ads, address = scripted(Responder(res))
    with _mesh(address, features=["ignore_resource_deletion"]) as mesh:
        mesh.wait_ready(TARGET, timeout=5)
        ads.push(discovery_pb2.DiscoveryResponse(version_info="2", type_url=CLUSTER, nonce="x1",
                                                 resources=[packed(res[CLUSTER]["a"])]))  # b is gone
        ads.wait(lambda r: r.response_nonce == "x1")
        time.sleep(0.05)
        assert mesh.pick(TARGET, "/b").endpoint.port == 9003  # kept serving
        b = next(g for g in mesh.config_dump()["generic_xds_configs"] if g["type_url"] == CLUSTER and g["name"] == "b")
        assert b["client_status"] == "DOES_NOT_EXIST" and b["xds_config"]["name"] == "b"


def test_stream_failing_before_any_response_backs_off(scripted):
    calls: List[float] = []

    def refuse(req: Any) -> List[Any]:
        raise RuntimeError("no")  # the reader thread dies; the stream never answers

    class Failing(ScriptedAds):
        def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802
            calls.append(time.monotonic())
            context.abort(grpc.StatusCode.UNAVAILABLE, "go away")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Failing(refuse), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        boot = bootstrap(None, uri=f"127.0.0.1:{port}")
        from meshcore.xds.client import Backoff

        with meshcore.Mesh(boot, backoff=Backoff(0.1, 2.0, 0.0, 0.4)) as mesh:
            mesh.watch(TARGET)
            time.sleep(1.3)
            assert "go away" in (mesh._source.ambient_error or "")
    finally:
        server.stop(0)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(calls) >= 3
    # Backoff(0.1, x2, no jitter, cap 0.4): waits of 0.1, 0.2, 0.4, 0.4 ... plus the attempt itself
    assert 0.08 <= gaps[0] < 0.35 and 0.18 <= gaps[1] < 0.5 and gaps[1] > gaps[0]
    assert all(g <= 0.4 + 0.1 for g in gaps)  # capped

"""meshcore.integrations.grpc: a grpc.Channel look-alike routing real RPCs to loopback servers."""

from __future__ import annotations

import time
from collections import Counter

import grpc
import pytest

from meshcore.integrations.grpc import MeshChannel, MeshRpcError, grpc_status_for_http, mesh_channel

from .conftest import ROUTE_TIMEOUT, SERVICE, SLOW_SECONDS, TARGET, resources


def unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/{SERVICE}/{method}")


def assert_all_released(mesh) -> None:
    """Least-request accounting: every pick was released."""
    cfg = mesh.config(TARGET)
    for name, rt in cfg.clusters.items():
        for ep in rt.lb.endpoints:
            assert rt.lb.active_requests(ep) == 0, (name, ep.key)


@pytest.fixture
def channel(mesh):
    with mesh_channel(mesh, TARGET) as ch:
        yield ch


def test_is_a_grpc_channel(channel):
    assert isinstance(channel, grpc.Channel) and isinstance(channel, MeshChannel)
    assert isinstance(unary(channel, "Hello"), grpc.UnaryUnaryMultiCallable)
    assert isinstance(channel.unary_stream("/x/y", _registered_method=True), grpc.UnaryStreamMultiCallable)
    grpc.channel_ready_future(channel).result(timeout=5)  # subscribe(): READY once routable


def test_balances_per_call_across_servers(mesh, channel):
    hello = unary(channel, "Hello")
    seen = Counter(hello(b"hi", timeout=5).decode() for _ in range(45))
    assert set(seen) == {"s1", "s2", "s3"}
    response, call = hello.with_call(b"hi", metadata=[("x-user", "u1")])
    assert response in (b"s1", b"s2", b"s3") and call.code() is grpc.StatusCode.OK
    stats = mesh.stats()["main"]
    assert stats["upstream_rq_total"] == 46 and stats["upstream_rq_200"] == 46
    assert sorted(channel.endpoint_addresses()) == sorted(ep.key for ep in mesh.config(TARGET).clusters["main"].lb.endpoints)
    assert_all_released(mesh)


def test_grpc_header_route_to_canary(mesh, channel):
    hello = unary(channel, "Hello")
    assert {hello(b"", metadata=[("x-canary", "1")]) for _ in range(5)} == {b"c1"}
    assert hello(b"", metadata=[("x-canary", "0")]) != b"c1"
    assert mesh.stats()["canary"]["upstream_rq_total"] == 5


def test_retry_on_unavailable_goes_to_another_server(mesh, channel):
    flaky = unary(channel, "Flaky")
    answers = [flaky(b"", timeout=5) for _ in range(12)]
    assert b"s1" not in answers and set(answers) <= {b"s2", b"s3"}
    stats = mesh.stats()["main"]
    assert stats["upstream_rq_retry"] >= 1 and stats["upstream_rq_retry_success"] >= 1
    assert_all_released(mesh)


def test_connect_failure_is_classified_and_retried(mesh, channel):
    # the "mixed" route retries on connect-failure only: a refused connection must be recognised
    hello = unary(channel, "Hello")
    answers = {hello(b"", timeout=5, metadata=[("x-pool", "mixed")]) for _ in range(6)}
    assert answers == {b"s3"}
    stats = mesh.stats()["mixed"]
    assert stats["upstream_cx_connect_fail"] >= 1 and stats["upstream_rq_retry"] >= 1
    assert_all_released(mesh)


def test_route_timeout_is_deadline_exceeded(mesh, channel):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "Slow")(b"", timeout=5)
    elapsed = time.monotonic() - start
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert ROUTE_TIMEOUT <= elapsed < SLOW_SECONDS
    assert mesh.stats()["main"]["upstream_rq_timeout"] == 1
    assert_all_released(mesh)


def test_caller_timeout_below_route_timeout(mesh, channel):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "Slow")(b"", timeout=0.1)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < ROUTE_TIMEOUT
    assert_all_released(mesh)


@pytest.mark.parametrize("metadata,code", [
    ([("x-envoy-fault-abort-grpc-request", "8")], grpc.StatusCode.RESOURCE_EXHAUSTED),
    ([("x-envoy-fault-abort-request", "503")], grpc.StatusCode.UNAVAILABLE),
    ([("x-envoy-fault-abort-request", "404")], grpc.StatusCode.UNIMPLEMENTED),
])
def test_fault_abort(mesh, channel, metadata, code):
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "Hello")(b"", metadata=metadata)
    assert info.value.code() is code and info.value.details() == "fault filter abort"
    assert isinstance(info.value, MeshRpcError) and isinstance(info.value, grpc.Call)
    assert mesh.stats().get("main", {}).get("upstream_rq_total", 0) == 0  # never sent
    # streams get the same answer, as a failed call
    stream = channel.unary_stream(f"/{SERVICE}/Count")(b"2", metadata=metadata)
    assert stream.code() is code
    with pytest.raises(grpc.RpcError):
        next(iter(stream))


def test_http_to_grpc_status_mapping():
    assert [grpc_status_for_http(s).name for s in (400, 401, 403, 404, 429, 502, 503, 504, 500)] == [
        "INTERNAL", "UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED", "UNAVAILABLE", "UNAVAILABLE",
        "UNAVAILABLE", "UNAVAILABLE", "UNKNOWN"]


def test_unknown_target_is_unavailable(mesh):
    # an RPC waits (resolve_timeout) for a target's first configuration, then fails like gRPC
    with mesh_channel(mesh, "nowhere.test.svc:9090", resolve_timeout=0.3) as ch:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            unary(ch, "Hello")(b"")
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE and "nowhere.test.svc:9090" in info.value.details()
        assert 0.3 <= time.monotonic() - start < 2
        stream = ch.stream_stream(f"/{SERVICE}/Chat")(iter([b"x"]), timeout=0.2)
        assert stream.code() is grpc.StatusCode.UNAVAILABLE


def test_unary_future(mesh, channel):
    fut = unary(channel, "Hello").future(b"", timeout=5)
    assert fut.result(timeout=5) in (b"s1", b"s2", b"s3")
    assert fut.done() and fut.code() is grpc.StatusCode.OK and fut.exception() is None
    failing = unary(channel, "Slow").future(b"", timeout=5)
    assert failing.exception(timeout=5).code() is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError):
        failing.result()
    waiting = unary(channel, "Wait").future(b"", timeout=5)
    time.sleep(0.2)
    assert waiting.cancel() and waiting.cancelled()
    with pytest.raises(grpc.FutureCancelledError):
        waiting.result(timeout=5)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            assert_all_released(mesh)
            break
        except AssertionError:
            time.sleep(0.02)
    assert_all_released(mesh)


def test_streaming_calls(mesh, channel):
    count = channel.unary_stream(f"/{SERVICE}/Count")
    servers = set()
    for _ in range(9):
        replies = list(count(b"3", timeout=5))
        assert len(replies) == 3 and len({r.split(b":")[0] for r in replies}) == 1  # one pick per call
        servers.add(replies[0].split(b":")[0])
    assert servers == {b"s1", b"s2", b"s3"}

    collect = channel.stream_unary(f"/{SERVICE}/Collect")
    assert collect(iter([b"a", b"b"]), timeout=5).endswith(b":a+b")
    response, call = collect.with_call(iter([b"c"]), metadata=[("x-canary", "1")])
    assert response == b"c1:c" and call.code() is grpc.StatusCode.OK
    assert collect.future(iter([b"d"])).result(timeout=5).endswith(b":d")

    chat = channel.stream_stream(f"/{SERVICE}/Chat")
    replies = list(chat(iter([b"x", b"y"]), metadata=[("x-canary", "1")]))
    assert replies == [b"c1:x", b"c1:y"]
    time.sleep(0.05)  # done callbacks run on grpcio's threads
    assert_all_released(mesh)
    assert mesh.stats()["main"]["upstream_rq_total"] >= 11


def test_generated_stub(mesh, channel, echo_pb):
    stub = echo_pb.pb2_grpc.EchoStub(channel)  # passes _registered_method=True
    reply = stub.Hello(echo_pb.pb2.HelloRequest(name="meshcore"), timeout=5)
    assert reply.server in ("s1", "s2", "s3")
    reply, call = stub.Hello.with_call(echo_pb.pb2.HelloRequest(), metadata=[("x-canary", "1")])
    assert reply.server == "c1" and call.code() is grpc.StatusCode.OK


def test_channel_to_departed_endpoint_is_closed(cp, mesh, servers):
    with mesh_channel(mesh, TARGET, sweep_interval=3600) as ch:
        hello = unary(ch, "Hello")
        s3 = f"127.0.0.1:{servers['s3']}"
        for _ in range(60):
            hello(b"", timeout=5)
            if s3 in ch.endpoint_addresses():
                break
        assert s3 in ch.endpoint_addresses()
        cp.set_resources(resources(servers, main=("s1", "s2")))
        deadline = time.monotonic() + 5
        while s3 in {ep.key for ep in mesh.config(TARGET).clusters["main"].lb.endpoints}:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # s3 is still an endpoint of the "mixed" cluster of this target: kept
        ch.sweep()
        assert s3 in ch.endpoint_addresses()
        cp.set_resources(resources(servers, main=("s1", "s2"), mixed=("s2",)))
        deadline = time.monotonic() + 5
        while any(s3 in {ep.key for ep in rt.lb.endpoints} for rt in mesh.config(TARGET).clusters.values()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ch.sweep()
        assert s3 not in ch.endpoint_addresses()
        assert {hello(b"", timeout=5) for _ in range(6)} == {b"s1", b"s2"}
    assert ch.endpoint_addresses() == []
    with pytest.raises(grpc.RpcError) as info:
        hello(b"")
    assert info.value.code() is grpc.StatusCode.CANCELLED

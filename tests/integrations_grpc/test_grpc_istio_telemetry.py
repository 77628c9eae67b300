"""Istio telemetry of gRPC calls through a MeshChannel, against real grpcio servers on loopback that
answer Istio's metadata exchange as a sidecar would (``x-envoy-peer-metadata`` and ``-id`` in the
response headers, or in the trailers of a trailers-only error):

* the peer's metadata reaches the attempt's telemetry (grpc-core hides it from grpcio's caller:
  the endpoint channel's tap reads it) and the Istio metrics' ``destination_*`` labels;
* message counts of unary and streaming calls (``request_messages`` / ``response_messages``);
* the application never sees the exchange pair: unary results, ``with_call``, ``future``,
  streams, errors (headers and trailers-only);
* an application's own exchange metadata is replaced by the mesh's (no duplicate key).
"""

from __future__ import annotations

import json
import os
import time
from concurrent import futures
from typing import Any, Dict, Iterator, List

import grpc
import pytest

import meshcore
from meshcore.integrations.grpc import mesh_channel
from meshcore.integrations.grpc._metadata import _with_exchange
from meshcore.integrations.grpc._peer import H2HeaderSniffer
from meshcore.telemetry import peer_metadata as pm
from tls.conftest import pki  # noqa: F401  (the fixture: the identities of the mesh-TLS test)

TARGET = "peer.test.svc:8080"
SERVICE = "meshcore.test.Peer"
PEER_FIELDS = {"NAME": "peer-v1-abc", "NAMESPACE": "shop", "WORKLOAD_NAME": "peer-v1", "CLUSTER_ID": "Kubernetes",
               "LABELS": {"app": "peer", "version": "v1", "service.istio.io/canonical-name": "peer",
                          "service.istio.io/canonical-revision": "v1"}}
PEER_VALUE = pm.encode(PEER_FIELDS)
PEER_ID = "sidecar~10.0.0.9~peer-v1-abc.shop~shop.svc.cluster.local"
EXCHANGE = [("x-envoy-peer-metadata", PEER_VALUE), ("x-envoy-peer-metadata-id", PEER_ID)]
CLIENT_ID = "sidecar~10.0.0.1~client-v1-xyz.shop~shop.svc.cluster.local"
PEER_KEYS = {"x-envoy-peer-metadata", "x-envoy-peer-metadata-id"}


@pytest.fixture(scope="module")
def server() -> Iterator[Dict[str, Any]]:
    """A grpcio server answering like a sidecar'd workload; ``seen`` keeps each call's metadata."""
    seen: List[List[Any]] = []

    def answer(context: grpc.ServicerContext) -> None:
        seen.append(list(context.invocation_metadata()))
        context.send_initial_metadata([*EXCHANGE, ("x-app", "1")])

    def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        answer(context)
        return b"hi " + request

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        answer(context)
        context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")

    def fail_trailers_only(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(list(context.invocation_metadata()))
        context.set_trailing_metadata([*EXCHANGE, ("x-app", "2")])
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        answer(context)
        for i in range(int(request or b"3")):
            yield b"%d" % i

    def collect(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        answer(context)
        return b"+".join(requests)

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        answer(context)
        for r in requests:
            yield b"re " + r

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Hello": grpc.unary_unary_rpc_method_handler(hello),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "FailTrailersOnly": grpc.unary_unary_rpc_method_handler(fail_trailers_only),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })])
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield {"port": port, "seen": seen}
    srv.stop(0)


def mesh_file(tmp_path: Any, port: int, route: Dict[str, Any], lb_metadata: Any = None) -> str:
    """A resources file for ``meshcore.Mesh.from_file``: an API listener TARGET with one route
    (``route``) to the EDS cluster ``peer``, whose one endpoint is 127.0.0.1:``port`` (with
    ``lb_metadata``, e.g. Istio's ``istio.workload``)."""
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "route_config": {"name": "rc", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    lb: Dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    if lb_metadata is not None:
        lb["metadata"] = lb_metadata
    res = {"listeners": [{"name": TARGET, "api_listener": {"api_listener": hcm}}],
           "clusters": [{"name": "peer", "type": "EDS", "connect_timeout": "1s",
                         "eds_cluster_config": {"eds_config": {"ads": {}}}}],
           "endpoints": [{"cluster_name": "peer", "endpoints": [{"lb_endpoints": [lb]}]}]}
    path = os.path.join(tmp_path, "mesh.json")
    with open(path, "w") as f:
        json.dump(res, f)
    return path


@pytest.fixture
def mesh(server, tmp_path) -> Iterator[Any]:
    route = {"name": "r", "match": {"prefix": "/"},
             "route": {"cluster": "peer", "timeout": "5s", "retry_policy": {"retry_on": "unavailable", "num_retries": 1}}}
    m = meshcore.Mesh.from_file(mesh_file(tmp_path, server["port"], route), watch=False).start()
    m.wait_ready(TARGET, timeout=10)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def records(mesh) -> List[Any]:
    out: List[Any] = []
    mesh.telemetry.enable_istio_metrics(node_metadata={"WORKLOAD_NAME": "client-v1", "NAMESPACE": "shop"})
    # a file-backed mesh has no bootstrap node, so no node ID to send as x-envoy-peer-metadata-id:
    # the exchange of a node named CLIENT_ID (what a bootstrapped mesh makes)
    mesh.telemetry.exchange = pm.Exchange(CLIENT_ID, mesh.telemetry.exchange.workload)
    mesh.telemetry.add_sink(out.append)
    return out


def _wait(records: List[Any], n: int) -> None:
    end = time.monotonic() + 5
    while len(records) < n and time.monotonic() < end:
        time.sleep(0.01)
    assert len(records) >= n, records


def _no_exchange(md: Any) -> bool:
    return not PEER_KEYS & {k for k, _ in md or ()}


def _peer(record: Any) -> str:
    """The peer workload a record names (records keep the decoded peer metadata)."""
    return record.peer_metadata["WORKLOAD_NAME"]


def test_unary_peer_metadata_counts_and_stripping(mesh, records, server):
    with mesh_channel(mesh, TARGET) as ch:
        hello = ch.unary_unary(f"/{SERVICE}/Hello", _registered_method=True)
        assert hello(b"a", timeout=5) == b"hi a"
        response, call = hello.with_call(b"b", timeout=5)
        assert response == b"hi b"
        assert _no_exchange(call.initial_metadata()) and ("x-app", "1") in call.initial_metadata()
        fut = hello.future(b"c", timeout=5)
        assert fut.result() == b"hi c" and _no_exchange(fut.initial_metadata())
        # the app's own exchange pair is replaced by the mesh's: one -id, ours
        assert hello(b"d", timeout=5, metadata=[("x-envoy-peer-metadata-id", "app"),
                                                ("x-envoy-peer-metadata", "app")]) == b"hi d"
    _wait(records, 4)
    assert [_peer(r) for r in records] == ["peer-v1"] * 4
    assert {(r.request_messages, r.response_messages) for r in records} == {(1, 1)}
    ids = [[v for k, v in md if k == "x-envoy-peer-metadata-id"] for md in server["seen"][-4:]]
    assert ids == [[CLIENT_ID]] * 4
    # Istio's metrics: destination labels from the peer's metadata
    [series] = [s for s in mesh.telemetry.istio_metrics.snapshot() if s["labels"]["grpc_response_status"] == "0"]
    labels = series["labels"]
    assert (labels["destination_workload"], labels["destination_workload_namespace"], labels["destination_app"],
            labels["destination_version"], labels["destination_canonical_service"]) == (
        "peer-v1", "shop", "peer", "v1", "peer")
    assert series["requests"] == 4 and series["request_messages"] == 4 and series["response_messages"] == 4


def test_unary_errors_are_stripped(mesh, records):
    with mesh_channel(mesh, TARGET) as ch:
        for method, code, app in (("Fail", grpc.StatusCode.NOT_FOUND, ("x-app", "1")),
                                  ("FailTrailersOnly", grpc.StatusCode.PERMISSION_DENIED, ("x-app", "2"))):
            rpc = ch.unary_unary(f"/{SERVICE}/{method}", _registered_method=True)
            with pytest.raises(grpc.RpcError) as err:
                rpc(b"", timeout=5)
            e = err.value
            assert isinstance(e, grpc.Call) and e.code() is code
            md = [*(e.initial_metadata() or ()), *(e.trailing_metadata() or ())]
            assert _no_exchange(md) and app in md
    _wait(records, 2)
    # the peer's pair in the response headers or in a trailers-only answer: read by the tap from
    # either header block (grpcio hides x-envoy-peer-metadata in both)
    assert [_peer(r) for r in records] == ["peer-v1"] * 2
    assert [(r.grpc_status, r.response_messages) for r in records] == [(5, 0), (7, 0)]


def test_streams_peer_metadata_counts_and_stripping(mesh, records):
    with mesh_channel(mesh, TARGET) as ch:
        stream = ch.unary_stream(f"/{SERVICE}/Count", _registered_method=True)(b"4", timeout=5)
        assert list(stream) == [b"0", b"1", b"2", b"3"]
        assert _no_exchange(stream.initial_metadata()) and _no_exchange(stream.trailing_metadata())
        collect = ch.stream_unary(f"/{SERVICE}/Collect", _registered_method=True)
        assert collect(iter([b"x", b"y", b"z"]), timeout=5) == b"x+y+z"
        response, call = collect.with_call(iter([b"p", b"q"]), timeout=5)
        assert response == b"p+q" and _no_exchange(call.initial_metadata())
        chat = ch.stream_stream(f"/{SERVICE}/Chat", _registered_method=True)(iter([b"1", b"2"]), timeout=5)
        got = [m for m in chat]
        assert got == [b"re 1", b"re 2"] and _no_exchange(chat.initial_metadata())
        assert chat.code() is grpc.StatusCode.OK
    _wait(records, 4)
    by_path = {r.path.rsplit("/", 1)[-1] + str(i): r for i, r in enumerate(records)}
    counts = sorted((k[:-1], r.request_messages, r.response_messages) for k, r in by_path.items())
    assert counts == [("Chat", 2, 2), ("Collect", 2, 1), ("Collect", 3, 1), ("Count", 1, 4)]
    assert [_peer(r) for r in records] == ["peer-v1"] * 4


def test_stream_error_is_stripped_and_raised_as_the_call(mesh, records):
    with mesh_channel(mesh, TARGET) as ch:
        stream = ch.unary_stream(f"/{SERVICE}/Count", _registered_method=True)(b"not a number", timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value is stream and stream.code() is grpc.StatusCode.UNKNOWN
        md = [*(stream.initial_metadata() or ()), *(stream.trailing_metadata() or ())]
        assert _no_exchange(md)
    _wait(records, 1)
    assert (records[0].grpc_status, records[0].request_messages, records[0].response_messages) == (2, 1, 0)


def test_without_istio_metrics_nothing_is_tapped_or_hidden(mesh, server):
    with mesh_channel(mesh, TARGET) as ch:
        response, call = ch.unary_unary(f"/{SERVICE}/Hello", _registered_method=True).with_call(b"a", timeout=5)
        assert response == b"hi a" and ("x-envoy-peer-metadata-id", PEER_ID) in call.initial_metadata()
        assert all(ep.tap is None for ep in ch._pool._channels.values())
        stream = ch.unary_stream(f"/{SERVICE}/Count", _registered_method=True)(b"2", timeout=5)
        assert list(stream) == [b"0", b"1"] and type(stream).__module__.startswith("grpc")


def test_with_exchange_replaces_the_applications_pair():
    ours = (("x-envoy-peer-metadata-id", "me"), ("x-envoy-peer-metadata", "ME"))
    assert _with_exchange(None, ours) == ours
    md = [("X-Envoy-Peer-Metadata", "app"), ("x-user", "7"), ("x-envoy-peer-metadata-id", "app")]
    assert _with_exchange(md, ours) == (("x-user", "7"), *ours)


def test_sniffer_reads_header_blocks_split_across_frames_and_reads():
    import hpack

    enc = hpack.Encoder()
    seen: List[Any] = []
    sniffer = H2HeaderSniffer(lambda k, v: seen.append((k, v)))
    block = enc.encode([(":status", "200"), ("x-envoy-peer-metadata", PEER_VALUE), ("x-app", "1")])
    half = len(block) // 2

    def frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload

    wire = (frame(4, 0, 0, b"") + frame(1, 0x8, 1, bytes([2]) + block[:half] + b"\0\0")  # padded, no END_HEADERS
            + frame(9, 0x4, 1, block[half:]) + frame(0, 1, 1, b"\0\0\0\0\0"))
    for i in range(0, len(wire), 7):  # arbitrary read boundaries
        sniffer.feed(wire[i:i + 7])
    assert (b"x-envoy-peer-metadata", PEER_VALUE.encode()) in seen and not sniffer.broken
    # the dynamic table carries over: the same header again, now indexed
    sniffer.feed(frame(1, 0x4, 3, enc.encode([(":status", "200"), ("x-envoy-peer-metadata", PEER_VALUE)])))
    assert seen.count((b"x-envoy-peer-metadata", PEER_VALUE.encode())) == 2
    sniffer.feed(frame(1, 0x4, 5, b"\xff\xff\xff\xff\xff\xff"))  # garbage: sniffing stops, nothing raised
    assert sniffer.broken


def test_tap_reads_the_peer_through_mesh_tls_to_a_real_sidecar(pki, server, tmp_path, monkeypatch):
    """The production shape: mesh mTLS (the TLS forwarder) to a real Envoy as an Istio STRICT
    sidecar in front of the server; the tap sits between grpcio and the forward."""
    from tls.grpc_mtls_env import CLUSTER, TARGET as TLS_TARGET, GrpcSidecar, assignment, resources, route, \
        tls_cluster, write_json
    from tls.pki import spiffe_id

    from meshcore.integrations.grpc import _peer as peer_tap

    monkeypatch.setattr(peer_tap, "_LEARNED", {})  # (nothing learned of this sidecar yet)
    sidecar = GrpcSidecar(pki.paths("sidecar"), app_port=server["port"])
    sidecar.start()
    try:
        doc = resources({TLS_TARGET: [route(CLUSTER)]}, [tls_cluster(CLUSTER, [spiffe_id("sidecar")])],
                        [assignment(CLUSTER, [(sidecar.port, True)])])
        m = meshcore.Mesh.from_file(write_json(tmp_path / "tls.json", doc), watch=False,
                                    certificates=pki.paths("client").dir).start()
        try:
            m.wait_ready(TLS_TARGET, timeout=5)
            out: List[Any] = []
            m.telemetry.enable_istio_metrics()
            m.telemetry.add_sink(out.append)
            with mesh_channel(m, TLS_TARGET) as ch:
                response, call = ch.unary_unary(f"/{SERVICE}/Hello").with_call(b"tls", timeout=5)
                assert response == b"hi tls" and _no_exchange(call.initial_metadata())
                assert list(ch.unary_stream(f"/{SERVICE}/Count")(b"2", timeout=5)) == [b"0", b"1"]
                # the first call went through a tap (then the stream took the direct channel)
                [ep] = [e for e in ch._pool._channels.values() if e.tap is not None]
                assert ep.forward is not None and ep.tap.upstream == ep.forward.target
            _wait(out, 2)
            assert [_peer(r) for r in out] == ["peer-v1"] * 2
            assert sorted((r.request_messages, r.response_messages) for r in out) == [(1, 1), (1, 2)]
        finally:
            m.close()
    finally:
        sidecar.stop()


def test_one_tapped_call_per_endpoint_teaches_the_rest(server, tmp_path, monkeypatch):
    # the tap's local hop costs ~90 µs a call: the first call to an endpoint goes through a tap,
    # the calls after it take the direct channel and reuse what it learned (the peer's labels,
    # not EDS's) until RELEARN_S passed; a server that sends no exchange is learned too
    from meshcore.integrations.grpc import _peer

    monkeypatch.setattr(_peer, "_LEARNED", {})
    route = {"name": "r", "match": {"prefix": "/"}, "route": {"cluster": "peer"}}
    path = mesh_file(tmp_path, server["port"], route, {"filter_metadata": {"istio": {
        "workload": "eds-peer;peer-ns;eds-canonical;v7;Kubernetes"}}})
    address = f"127.0.0.1:{server['port']}"
    with meshcore.Mesh.from_file(path, watch=False).start() as m:
        m.wait_ready(TARGET, timeout=10)
        out: List[Any] = []
        m.telemetry.enable_istio_metrics(node_metadata={"WORKLOAD_NAME": "client-v1", "NAMESPACE": "shop"})
        m.telemetry.add_sink(out.append)
        with mesh_channel(m, TARGET) as ch:
            hello = ch.unary_unary(f"/{SERVICE}/Hello", _registered_method=True)
            for _ in range(4):
                assert hello(b"a", timeout=5) == b"hi a"
            tapped = [ep for ep in ch._pool._channels.values() if ep.tap is not None]
            direct = [ep for ep in ch._pool._channels.values() if ep.tap is None]
            assert len(tapped) == 1 and len(direct) == 1  # one tapped call, three direct
            assert _peer._LEARNED[(address, TARGET)][0] == PEER_VALUE
            monkeypatch.setattr(_peer, "RELEARN_S", 0.0)  # stale: the next call is tapped again
            assert _peer.needs_tap(address, TARGET)
            assert hello(b"b", timeout=5) == b"hi b"
        _wait(out, 5)
        assert [r.peer_metadata is not None for r in out] == [True] * 5
        [series] = m.telemetry.istio_metrics.snapshot()
        labels = series["labels"]
        assert series["requests"] == 5  # all five with the peer's labels (not the EDS workload's)
        assert (labels["destination_workload"], labels["destination_app"]) == ("peer-v1", "peer")


def test_streams_are_traced_as_envoy_traces_them(mesh, server):
    # a streaming RPC gets its CLIENT span (tracing.begin / Trace.attempt / Trace.end): the server
    # sees the span's traceparent and x-request-id, the span ends with the stream's gRPC status
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from meshcore.telemetry import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    try:
        del server["seen"][:]
        with mesh_channel(mesh, TARGET) as ch:
            stream = ch.unary_stream(f"/{SERVICE}/Count", _registered_method=True)(
                b"2", timeout=5, metadata=[("traceparent", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")])
            assert list(stream) == [b"0", b"1"]
            chat = ch.stream_stream(f"/{SERVICE}/Chat", _registered_method=True)(iter([b"x"]), timeout=5)
            assert list(chat) == [b"re x"]
        end = time.monotonic() + 5
        while len(exporter.get_finished_spans()) < 2 and time.monotonic() < end:
            time.sleep(0.01)
        count, chat_span = sorted(exporter.get_finished_spans(), key=lambda s: s.attributes["grpc.path"])[::-1]
    finally:
        tracing.configure(None)
    assert count.attributes["grpc.path"] == f"/{SERVICE}/Count" and count.attributes["grpc.status_code"] == "0"
    assert count.context.trace_id == int("ab" * 16, 16) and count.parent.span_id == int("cd" * 8, 16)
    sent = dict(server["seen"][0])
    ctx = count.get_span_context()
    assert sent["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"  # ours, not the app's
    assert sent["x-request-id"] == count.attributes["guid:x-request-id"]
    assert chat_span.attributes["grpc.path"] == f"/{SERVICE}/Chat" and "error" not in chat_span.attributes
    assert not tracing._PENDING

"""The Istio sink's fast path (``IstioObserver``: the usual answer counted without a record while
the sink is its mesh's only sink) gives exactly the series the record path gives, on both twins:
the same requests (httpx and the plain API to a real loopback upstream; bodies, retries run out,
gRPC content-type, the single-attempt form) counted once with the sink alone and once with a
second sink (every request through a record), compared label by label and bucket by bucket."""

from __future__ import annotations

import json
from importlib import import_module
from typing import Any, Dict, List

import httpx
import pytest

from meshcore.integrations.httpx import MeshTransport
from meshcore.telemetry.outcome import report

from .test_tracing import URL, echo, mesh  # noqa: F401  (fixtures)

NODE = {"WORKLOAD_NAME": "client", "NAMESPACE": "default", "CLUSTER_ID": "Kubernetes",
        "LABELS": {"app": "client", "version": "v1"}}


class _Resp:
    status_code = 200

    def __init__(self, body: bytes) -> None:
        self._content = body
        self.headers = {"content-length": str(len(body))}


def _traffic(mesh: Any, echo: Any) -> None:
    with httpx.Client(mounts={"all://*.svc.cluster.local:8080": MeshTransport(mesh)}) as c:
        for _ in range(3):
            assert c.get(f"{URL}/a").status_code == 200
        for _ in range(2):
            assert c.get(f"{URL}/a", headers={"x-user": "7", "content-type": "text/plain"}).status_code == 200
        echo.fail_first = 3  # 503 three times: the retries run out (URX)
        assert c.get(f"{URL}/retry/x").status_code == 503
    for body in (b"x" * 7, b"y" * 700):
        mesh.request(f"{URL}/plain", "POST", {"content-length": "5"}).run(lambda a, b=body: _Resp(b))
    mesh.request(f"{URL}/grpc", "POST", [("content-type", "application/grpc")]).run(lambda a: _Resp(b""))
    for messages in (1, 1, 3):  # an OK gRPC answer (grpc-status 0): unary, then a stream's counts
        def rpc(a: Any, m: int = messages) -> Any:
            a.telemetry = {"peer_metadata": None, "request_messages": 1, "response_messages": m}
            return _Resp(b"")

        mesh.request(f"{URL}/grpc", "POST", {"content-type": "application/grpc"}).run(
            rpc, grpc_status_of=lambda r: 0)
    with mesh.request(f"{URL}/with") as attempt:
        attempt.status = 204
    # an integration's own first attempt (grpcio's short path): finished and counted with its
    # facts by the observer's answered(), or, with another sink, recorded from the same facts
    for peer in (None, "peer-x", "peer-x", None):
        call = mesh.request(f"{URL}/grpc", "POST", {"content-type": "application/grpc"})
        a = call.first_attempt()
        observer = mesh.telemetry.observer
        if observer is not None:
            assert observer.answered(call, a, 200, 0, b"ok", peer, 1) == 1
        else:
            a.telemetry = {"peer_metadata": peer, "request_messages": 1, "response_messages": 1}
            assert a.finish_final(200, 0)
            report(call, b"ok", None)


def _series(sink: Any) -> Dict[str, Any]:
    out = {}
    for s in sink.snapshot():
        key = json.dumps(s["labels"], sort_keys=True)
        out[key] = {"requests": s["requests"], "duration_count": s["duration_ms"]["count"],
                    "request_bytes": s["request_bytes"], "response_bytes": s["response_bytes"],
                    "messages": (s["request_messages"], s["response_messages"])}
    return out


def test_fast_path_equals_record_path(mesh, echo, impl):
    tel = mesh.telemetry
    sink = tel.enable_istio_metrics(node_metadata=NODE)
    assert tel.observe.__self__ is sink.observer and type(sink.observer).__module__.endswith(f"call_{impl}")
    _traffic(mesh, echo)
    fast = _series(sink)
    # the usual answers went through the observer: 200, 204, gRPC without and with grpc-status 0
    # (and answered()'s with a peer's metadata)
    assert len(sink.observer.keys) == 5
    sink.reset()
    records: List[Any] = []
    tel.add_sink(records.append)
    assert tel.observe is None
    _traffic(mesh, echo)
    assert len(sink.observer.keys) == 0
    slow = _series(sink)
    tel.remove_sink(records.append)
    assert tel.observe.__self__ is sink.observer
    assert fast == slow
    def count(code: str, flags: str, protocol: str = "http") -> int:
        return sum(v["requests"] for k, v in fast.items() if (json.loads(k)["response_code"], json.loads(k)[
            "response_flags"], json.loads(k)["request_protocol"]) == (code, flags, protocol))

    assert count("200", "-") == 3 + 2 + 2  # httpx GETs, plain API
    assert count("200", "-", "grpc") == 8 and count("503", "URX") == 1 and count("204", "-") == 1
    grpc_ok = [v for k, v in fast.items() if json.loads(k)["grpc_response_status"] == "0"]
    assert sum(v["requests"] for v in grpc_ok) == 7 and sum(v["messages"][1] for v in grpc_ok) == 9
    tel.disable_istio_metrics()


@pytest.mark.parametrize("twin", ["c", "py"])
def test_series_counts_and_buckets(twin):
    mod = import_module(f"meshcore._fast.call_{twin}")
    s = mod.IstioSeries(("a", "b"), (0.5, 1, 5, 10), False)
    for d, q, r in ((0.2, 0, 0), (1.0, 3, 12), (7.5, 10, 0.5), (99.0, 11, 10), (float("nan"), 0, 1)):
        s.add(d, q, r, 5, 5)
    v = s.values()
    assert v[0] == 5
    assert v[1] == [2, 1, 0, 1, 1]  # 0.2 and NaN, 1.0 (le 1), 7.5 (le 10), 99 (+Inf)
    assert v[3] == [2, 0, 1, 1, 1]  # 0 -> the first bucket; 3 (le 5), 10 (le 10), 11 (+Inf)
    assert v[5] == [2, 1, 0, 1, 1]
    assert (v[4], v[6]) == (24.0, 23.5) and (v[7], v[8]) == (0, 0)
    g = mod.IstioSeries(("g",), (1,), True)
    g.add(0.1, 1, 1, 2, 3)
    assert g.values()[7:] == (2, 3) and g.labels == ("g",) and g.grpc


def test_fast_path_keys_expire(mesh, echo, impl):
    """After ``label_ttl`` the observer forgets its keys (labels are made again: TLS, identity and
    endpoint metadata changes are seen), and keeps counting into the same series."""
    tel = mesh.telemetry
    sink = tel.enable_istio_metrics(node_metadata=NODE)
    try:
        for _ in range(3):
            mesh.request(f"{URL}/plain").run(lambda a: _Resp(b"abc"))
        assert len(sink.observer.keys) == 1
        sink.label_ttl = 0.0  # every request now finds the keys expired
        sink.observer.until = 0.0
        seen = []
        miss = sink._miss
        sink.observer.miss = lambda *args: (seen.append(1), miss(*args))
        for _ in range(2):
            mesh.request(f"{URL}/plain").run(lambda a: _Resp(b"abc"))
        assert len(seen) == 2
        (s,) = sink.snapshot()
        assert s["requests"] == 5 and s["response_bytes"]["sum"] == 15
    finally:
        tel.disable_istio_metrics()


def _peer_value(name: str) -> str:
    from meshcore.telemetry.peer_metadata import local_exchange

    return local_exchange(None, {"WORKLOAD_NAME": name, "NAMESPACE": "prod", "LABELS": {"app": name}}).value


def _mixed(mesh: Any, rng: Any, n: int) -> None:
    """``n`` plain-API requests whose answers vary in what the observer keys by: status, peer
    metadata (none, empty, two workloads, the same value as a fresh string), body size."""
    peers = [None, "", _peer_value("a"), _peer_value("b")]
    for _ in range(n):
        status = rng.choice((200, 200, 201, 404))
        peer = rng.choice(peers)
        if peer and rng.random() < 0.5:
            peer = "".join(list(peer))  # an equal value, another object (as each response decodes anew)
        size = rng.randrange(0, 50)

        def send(a: Any, status: int = status, peer: Any = peer, size: int = size) -> Any:
            a.telemetry = {"peer_metadata": peer, "request_bytes": None, "response_bytes": size}
            r = _Resp(b"x" * size)
            r.status_code = status
            return r

        mesh.request(f"{URL}/plain").run(send)


def test_observer_slots_equal_record_path(mesh, echo, impl):
    """The compiled observer's identity slots (the series it last found per endpoint and status)
    count exactly what the record path counts, also across ``reset()`` (no slot outlives the
    series it points at) and ``clear()``."""
    import random

    tel = mesh.telemetry
    sink = tel.enable_istio_metrics(node_metadata=NODE)
    try:
        _mixed(mesh, random.Random(3), 300)
        sink.reset()  # what was counted is gone; the slots must not count into the dropped series
        _mixed(mesh, random.Random(4), 300)
        sink.observer.clear()
        _mixed(mesh, random.Random(5), 100)
        fast = _series(sink)
        assert sum(v["requests"] for v in fast.values()) == 400
        sink.reset()
        records: List[Any] = []
        tel.add_sink(records.append)
        _mixed(mesh, random.Random(4), 300)
        _mixed(mesh, random.Random(5), 100)
        tel.remove_sink(records.append)
        assert len(records) == 400
        assert _series(sink) == fast
        peers = {json.loads(k)["destination_workload"] for k in fast}
        assert {"a", "b", "unknown"} <= peers
    finally:
        tel.disable_istio_metrics()


def test_enable_again_sets_the_exchange(mesh):
    """``enable_istio_metrics`` called again keeps its sink (and series) and turns the metadata
    exchange on or off as asked; the observer knows whether to read the peer's header."""
    tel = mesh.telemetry
    sink = tel.enable_istio_metrics(node_metadata=NODE)
    try:
        assert tel.exchange is not None and sink.observer.peers
        assert tel.enable_istio_metrics(exchange=False) is sink
        assert tel.exchange is None and not sink.observer.peers
        assert tel.enable_istio_metrics(node_metadata=NODE) is sink
        assert tel.exchange is not None and sink.observer.peers
    finally:
        tel.disable_istio_metrics()


def _fast_and_slow(mesh: Any, traffic: Any) -> Any:
    """The series of ``traffic(mesh)`` counted by the sink alone (the observer) and then through
    records (a second sink)."""
    tel = mesh.telemetry
    sink = tel.enable_istio_metrics(node_metadata=NODE)
    try:
        traffic(mesh)
        fast = _series(sink)
        sink.reset()
        records: List[Any] = []
        tel.add_sink(records.append)
        traffic(mesh)
        tel.remove_sink(records.append)
        return fast, _series(sink)
    finally:
        tel.disable_istio_metrics()


def test_slots_tell_grpc_requests_from_http(mesh, echo, impl):
    """An HTTP request and a gRPC one (content-type) with no grpc-status, same route, endpoint and
    status: two series (request_protocol http and grpc). The compiled observer's slot once took
    them for the same (its gRPC mark only looked at the grpc-status) and counted one in the
    other's series."""
    def traffic(m: Any) -> None:
        for i in range(6):
            headers = [("content-type", "application/grpc")] if i % 2 else None
            m.request(f"{URL}/plain", "POST", headers).run(lambda a: _Resp(b"abc"))

    fast, slow = _fast_and_slow(mesh, traffic)
    assert fast == slow
    assert sorted((json.loads(k)["request_protocol"], v["requests"]) for k, v in fast.items()) == [
        ("grpc", 3), ("http", 3)]


def test_int_subclass_status_labelled_by_value(mesh, echo, impl):
    """A status that is an int subclass (``HTTPStatus.OK``) keys the observer as the int it equals:
    the record path labels it by that value too (it said response_code 0, and the observer then
    counted plain 200s under 0, or HTTPStatus answers under 200, by whichever came first)."""
    from http import HTTPStatus

    def traffic(m: Any) -> None:
        for status in (HTTPStatus.OK, 200, HTTPStatus.OK, 200):
            def send(a: Any, status: Any = status) -> Any:
                r = _Resp(b"")
                r.status_code = status
                return r

            m.request(f"{URL}/plain").run(send)

    fast, slow = _fast_and_slow(mesh, traffic)
    assert fast == slow
    assert [(json.loads(k)["response_code"], v["requests"]) for k, v in slow.items()] == [("200", 4)]


@pytest.mark.parametrize("count", [10 ** 30, -3, None, 2.5])
def test_odd_message_counts(mesh, echo, impl, count):
    """A message count the integration told that is not a sane int (huge, negative, None, a float)
    counts 0 messages through the record as through the observer, and raises nothing (a huge one
    raised OverflowError in the compiled series: the request was not counted)."""
    def traffic(m: Any) -> None:
        for messages in (count, 1):
            def rpc(a: Any, messages: Any = messages) -> Any:
                a.telemetry = {"peer_metadata": None, "request_messages": messages, "response_messages": messages}
                return _Resp(b"")

            m.request(f"{URL}/grpc", "POST", {"content-type": "application/grpc"}).run(
                rpc, grpc_status_of=lambda r: 0)

    fast, slow = _fast_and_slow(mesh, traffic)
    assert fast == slow
    assert [(v["requests"], v["messages"]) for v in slow.values()] == [(2, (1, 1))]


def test_reset_during_a_miss_leaves_no_key_to_the_dropped_series(mesh, echo, impl):
    """``reset()`` between the miss finding its series and the observer remembering it (another
    thread): the observer keeps no key to the dropped series (it counted the next requests there,
    unseen, until the keys expired)."""
    tel = mesh.telemetry
    sink = tel.enable_istio_metrics(node_metadata=NODE)
    try:
        series_for = sink._series_for

        def racing(*args: Any) -> Any:
            found = series_for(*args)
            sink._series_for = series_for
            sink.reset()  # (as another thread could, right after _series_for released the lock)
            return found

        sink._series_for = racing
        mesh.request(f"{URL}/plain").run(lambda a: _Resp(b"abc"))
        assert sink.snapshot() == [] and len(sink.observer.keys) == 0
        for _ in range(3):
            mesh.request(f"{URL}/plain").run(lambda a: _Resp(b"abc"))
        (s,) = sink.snapshot()
        assert s["requests"] == 3
    finally:
        tel.disable_istio_metrics()


@pytest.mark.parametrize("args", [(1.0, 0, 0, 10**30, 0), (1.0, 0, 0, 2.5, 0), (1.0, "3", 0, 0, 0),
                                  (1.0, 0, 0, float("nan"), 0), (1.0, 0, 0, float("inf"), 0), (1.0, 0, 0, "3", 0),
                                  (10**400, 0, 0, 0, 0), (1.0, 0, 0, 1 << 63, 0), (1.0, 0, 0, -(1 << 63), 1)])
def test_series_add_converts_as_the_compiled_twin(args):
    """``IstioSeries.add`` called directly: both twins accept or refuse the same arguments with the
    same exception type (the compiled twin's C double / long long parameters)."""
    outcomes = []
    for twin in ("c", "py"):
        s = import_module(f"meshcore._fast.call_{twin}").IstioSeries(("a",), (1, 10), True)
        try:
            s.add(*args)
            outcomes.append(("ok", s.values()[0], s.values()[7:]))
        except (TypeError, ValueError, OverflowError) as e:
            outcomes.append((type(e).__name__,))
    assert outcomes[0] == outcomes[1]


def test_answered_outcomes(mesh, echo, impl):
    """``IstioObserver.answered`` (an integration's first attempt finished and counted with its
    facts): 1 counted (the facts put on the attempt only when a new key went through the
    record), 0 when the route's policy retries the answer, 2 when the observer does not count it
    (a stream's message counts), 3 when the observer raised; every time the facts are on the
    attempt when the call was not counted here; wrong types are a TypeError in both twins."""
    tel = mesh.telemetry
    sink = tel.enable_istio_metrics(node_metadata=NODE)
    observer = tel.observer
    assert type(observer).__module__.endswith(f"call_{impl}")
    facts = {"peer_metadata": "p", "request_messages": 1, "response_messages": 1}
    try:
        for expect_facts in (True, False):  # a new key (through the record), then the known one
            call = mesh.request(f"{URL}/grpc", "POST", {"content-type": "application/grpc"})
            a = call.first_attempt()
            assert observer.answered(call, a, 200, 0, b"ok", "p", 1) == 1
            assert a.telemetry == (facts if expect_facts else None)
            assert (a.status, a.grpc_status) == (200, 0)
        call = mesh.request(f"{URL}/retry/x")  # 5xx retried: not final
        a = call.first_attempt()
        assert observer.answered(call, a, 503, None, None, None, 0) == 0
        assert a.telemetry == {"peer_metadata": None, "request_messages": 0, "response_messages": 0}
        call = mesh.request(f"{URL}/grpc", "POST", {"content-type": "application/grpc"})
        a = call.first_attempt()
        assert observer.answered(call, a, 200, 0, b"ok", None, 3) == 2
        assert a.telemetry["response_messages"] == 3

        def broken(*args: Any) -> None:
            raise RuntimeError("a sink bug")

        miss, observer.miss = observer.miss, broken
        try:
            call = mesh.request(f"{URL}/grpc", "POST", {"content-type": "application/grpc"})
            a = call.first_attempt()
            assert observer.answered(call, a, 200, 0, b"ok", "new-peer", 1) == 3
            assert a.telemetry["peer_metadata"] == "new-peer"
        finally:
            observer.miss = miss
        counted = sum(s["requests"] for s in sink.snapshot())
        assert counted == 2  # the two answered 1 (the others are the caller's to report)
        for bad in ((None, a), (call, None), (a, call)):
            with pytest.raises(TypeError):
                observer.answered(bad[0], bad[1], 200, 0, None, None, 1)
    finally:
        tel.disable_istio_metrics()

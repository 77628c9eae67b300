"""The blocking unary path (``__call__`` / ``with_call``): the router loop run inline, the first
attempt straight to the endpoint's grpcio multicallable, and the state made once per channel
(URLs, multicallable slots, the header dict of RPCs without metadata)."""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator, List

import grpc
import pytest
from envoy.config.route.v3 import route_components_pb2
from google.protobuf import wrappers_pb2

import meshcore
from meshcore.controlplane import ControlPlane
from meshcore.controlplane import builders as b
from meshcore.integrations.grpc import mesh_channel
from meshcore.integrations.grpc import _metadata as channel_mod
from meshcore.xds.client import Backoff

from .conftest import SERVICE, TARGET, ready_mesh


def _resources(ports: dict) -> List[Any]:
    host = TARGET.rsplit(":", 1)[0]
    # /Alias is Hello on the wire (a path rewrite); /Again retries OK answers (200 retriable)
    alias = b.route(path=f"/{SERVICE}/Alias", cluster="main", name="alias")
    alias.route.prefix_rewrite = f"/{SERVICE}/Hello"
    again = b.route(path=f"/{SERVICE}/Again", cluster="main", name="again")
    again.route.prefix_rewrite = f"/{SERVICE}/Hello"
    again.route.retry_policy.CopyFrom(route_components_pb2.RetryPolicy(
        retry_on="retriable-status-codes", retriable_status_codes=[200],
        num_retries=wrappers_pb2.UInt32Value(value=1)))
    default = b.route(prefix="/", cluster="main", name="default", timeout=5.0)
    default.route.retry_policy.CopyFrom(route_components_pb2.RetryPolicy(
        retry_on="unavailable", num_retries=wrappers_pb2.UInt32Value(value=2)))
    return [
        b.api_listener(TARGET, route_config_name="fast-routes"),
        b.route_config("fast-routes", [b.virtual_host("echo", [host, TARGET], [alias, again, default])]),
        b.cluster("main"),
        b.assignment("main", [("127.0.0.1", ports[n]) for n in ("s2", "s3")]),
    ]


@pytest.fixture
def fast_mesh(servers) -> Iterator[meshcore.Mesh]:
    with ControlPlane() as cp:
        cp.set_resources(_resources(servers))
        m = ready_mesh(cp, "meshcore-grpc-fast", 3)
        try:
            yield m
        finally:
            m.close()


def test_call_and_with_call(fast_mesh):
    with mesh_channel(fast_mesh, TARGET) as ch:
        hello = ch.unary_unary(f"/{SERVICE}/Hello")
        assert hello(b"", timeout=5) in (b"s2", b"s3")
        reply, call = hello.with_call(b"", timeout=5, metadata=[("x-user", "u1"), ("trace-bin", b"\x00\xff")])
        assert reply in (b"s2", b"s3")
        assert call.code() is grpc.StatusCode.OK
    st = fast_mesh.stats()["main"]
    assert st["upstream_rq_total"] == 2 and st["upstream_rq_active"] == 0
    assert channel_mod._GRPC_HEADER_DICT == {"content-type": "application/grpc", "te": "trailers"}


def test_path_rewrite_sends_the_rewritten_method(fast_mesh):
    with mesh_channel(fast_mesh, TARGET) as ch:
        alias = ch.unary_unary(f"/{SERVICE}/Alias")
        assert {alias(b"", timeout=5) for _ in range(4)} == {b"s2", b"s3"}
        hello = ch.unary_unary(f"/{SERVICE}/Hello")
        hello(b"", timeout=5)
        # Alias on the wire is Hello: one grpcio multicallable per endpoint serves both
        for ep in ch._pool._channels.values():
            assert len(ep.callables) == 1


def test_ok_answer_retried_when_the_policy_names_200(fast_mesh):
    with mesh_channel(fast_mesh, TARGET) as ch:
        again = ch.unary_unary(f"/{SERVICE}/Again")
        for _ in range(3):
            reply, call = again.with_call(b"", timeout=5)
            assert reply in (b"s2", b"s3") and call.code() is grpc.StatusCode.OK
            assert again(b"", timeout=5) in (b"s2", b"s3")
        assert ch.unary_unary(f"/{SERVICE}/Hello")(b"", timeout=5) in (b"s2", b"s3")
    st = fast_mesh.stats()["main"]
    assert st["upstream_rq_total"] == 6 * 2 + 1  # every Again call retried its OK answer once
    assert st["upstream_rq_retry"] == 6
    assert st["upstream_rq_retry_limit_exceeded"] == 6  # still retriable, no retry left (Envoy)


def test_multicallables_share_their_slot(fast_mesh):
    with mesh_channel(fast_mesh, TARGET) as ch:
        for _ in range(50):  # stubs made per request: no growth per multicallable
            assert ch.unary_unary(f"/{SERVICE}/Hello")(b"", timeout=5) in (b"s2", b"s3")
        assert len(ch._slots) == 1
        for ep in ch._pool._channels.values():
            assert len(ep.callables) == 1
        ch.unary_unary(f"/{SERVICE}/Hello", request_serializer=bytes)(b"", timeout=5)
        assert len(ch._slots) == 2  # another signature, another slot


def test_serializer_failure_releases_the_attempt(fast_mesh):
    def bad(request: Any) -> bytes:
        raise ValueError("cannot serialize")

    with mesh_channel(fast_mesh, TARGET) as ch:
        hello = ch.unary_unary(f"/{SERVICE}/Hello", request_serializer=bad)
        with pytest.raises(grpc.RpcError) as info:
            hello(b"", timeout=5)
        assert info.value.code() is grpc.StatusCode.INTERNAL
        assert all(ep.inflight == 0 for ep in ch._pool._channels.values())
    assert fast_mesh.stats()["main"]["upstream_rq_active"] == 0


def test_deadline_spent_before_the_attempt(fast_mesh):
    with mesh_channel(fast_mesh, TARGET) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(f"/{SERVICE}/Hello")(b"", timeout=0)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert fast_mesh.stats()["main"]["upstream_rq_active"] == 0


def _by_own_headers(ports: dict, grpc_matcher: bool) -> List[Any]:
    """Calls carrying content-type application/grpc (or any gRPC request: the grpc matcher) go to
    ``main``; anything else to ``canary``."""
    host = TARGET.rsplit(":", 1)[0]
    first = b.route(prefix="/", cluster="main", name="grpc-only",
                    headers=None if grpc_matcher else {"content-type": "application/grpc"})
    if grpc_matcher:
        first.match.grpc.SetInParent()
    rest = b.route(prefix="/", cluster="canary", name="others")
    return [
        b.api_listener(TARGET, route_config_name="fast-routes"),
        b.route_config("fast-routes", [b.virtual_host("echo", [host, TARGET], [first, rest])]),
        b.cluster("main"),
        b.cluster("canary"),
        b.assignment("main", [("127.0.0.1", ports[n]) for n in ("s2", "s3")]),
        b.assignment("canary", [("127.0.0.1", ports["c1"])]),
    ]


def _wait_for_route(mesh: meshcore.Mesh, name: str) -> None:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cfg = mesh.config(TARGET)
        if cfg is not None and name in repr(cfg.route_table.spec):
            return
        time.sleep(0.02)
    raise AssertionError(f"route {name!r} never published")


def test_calls_without_metadata_routed_by_grpc_headers_where_the_config_reads_them(servers):
    with ControlPlane() as cp:
        cp.set_resources(_resources(servers))
        mesh = ready_mesh(cp, "meshcore-grpc-own-headers", 3)
        try:
            with mesh_channel(mesh, TARGET) as ch:
                hello = ch.unary_unary(f"/{SERVICE}/Hello")
                assert hello(b"", timeout=5) in (b"s2", b"s3")
                plain = mesh.config(TARGET)
                assert ch._plain_cfg is plain  # nothing reads content-type/te: routed without them
                for grpc_matcher in (False, True):
                    cp.set_resources(_by_own_headers(servers, grpc_matcher))
                    _wait_for_route(mesh, "others")
                    headed = mesh.config(TARGET)
                    for _ in range(6):  # the gRPC headers reach the route table: never canary
                        assert hello(b"", timeout=5) in (b"s2", b"s3")
                        assert hello(b"", timeout=5, metadata=[("x-user", "u")]) in (b"s2", b"s3")
                    assert ch._headed_cfg is headed
                    cp.set_resources(_resources(servers))
                    _wait_for_route(mesh, "alias")
                    assert hello(b"", timeout=5) in (b"s2", b"s3")
                    assert ch._plain_cfg is mesh.config(TARGET)
        finally:
            mesh.close()


def test_closed_channel_ends_the_attempt(fast_mesh):
    ch = mesh_channel(fast_mesh, TARGET)
    hello = ch.unary_unary(f"/{SERVICE}/Hello")
    assert hello(b"", timeout=5) in (b"s2", b"s3")
    ch._pool.close()  # the endpoint pool closes under a routed call
    with pytest.raises(grpc.RpcError) as info:
        hello(b"", timeout=5)
    assert info.value.code() is grpc.StatusCode.CANCELLED
    st = fast_mesh.stats()["main"]
    assert st["upstream_rq_active"] == 0 and st["upstream_rq_rx_reset"] == 1  # finished as a reset
    ch.close()


def test_short_path_reuses_the_endpoint_entry_of_its_configuration(fast_mesh, servers):
    with mesh_channel(fast_mesh, TARGET) as ch:
        hello = ch.unary_unary(f"/{SERVICE}/Hello")
        seen = {hello(b"", timeout=5) for _ in range(6)} | {hello(b"") for _ in range(4)}  # with and without a deadline
        assert seen == {b"s2", b"s3"}
        cfg = fast_mesh.config(TARGET)
        assert hello._eps_cfg is cfg and len(hello._eps) == 2  # one entry per endpoint, this configuration's
        for endpoint, ep, send, route, active, learned_at in hello._eps.values():
            assert ep.inflight == 0 and active is ep.active and learned_at == (ep.address, ep.authority)
            # grpcio's multicallable, its __call__ bound (called without the type's call slot)
            mc = ep.callables.get(hello._slot)
            assert send.__self__ is mc and send.__func__ is type(mc).__call__
        # a path rewrite (another route) never takes an entry made for the method's own path
        alias = ch.unary_unary(f"/{SERVICE}/Alias")
        assert alias(b"", timeout=5) in (b"s2", b"s3") and alias(b"", timeout=5) in (b"s2", b"s3")
        assert alias._eps_cfg is None and not alias._eps  # rewritten: always the general path
        st = fast_mesh.stats()["main"]
        assert st["upstream_rq_total"] == 12 and st["upstream_rq_active"] == 0


def test_short_path_follows_a_new_configuration_and_departed_channels(servers):
    with ControlPlane() as cp:
        cp.set_resources(_resources(servers))
        m = ready_mesh(cp, "meshcore-grpc-short", 5)
        try:
            with mesh_channel(m, TARGET, sweep_interval=None) as ch:
                hello = ch.unary_unary(f"/{SERVICE}/Hello")
                assert {hello(b"", timeout=5) for _ in range(4)} == {b"s2", b"s3"}
                old_cfg = hello._eps_cfg
                res = _resources(servers)
                res[-1] = b.assignment("main", [("127.0.0.1", servers["s1"])])  # s2, s3 leave; s1 (Flaky fails) comes
                cp.set_resources(res)
                s1 = f"127.0.0.1:{servers['s1']}"

                def endpoints() -> set:
                    return {e.key for e in m.config(TARGET).clusters["main"].lb.endpoints}

                deadline = time.monotonic() + 5
                while endpoints() != {s1} and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert endpoints() == {s1}
                ch.sweep()  # the channels to s2 and s3 leave (departed, closed: idle)
                assert {hello(b"", timeout=5) for _ in range(3)} == {b"s1"}
                # (an EDS update keeps the configuration object, with new endpoint objects: the
                # entries of s2 and s3 are never taken again)
                assert hello._eps_cfg is m.config(TARGET) is old_cfg
                assert hello._eps[s1][0] in m.config(TARGET).clusters["main"].lb.endpoints
                assert all(v[1].departed for k, v in hello._eps.items() if k != s1)
                # a server's error through the short path: recorded, retried, raised with its status
                flaky = ch.unary_unary(f"/{SERVICE}/Flaky")
                for _ in range(2):  # the second call takes the short path (the entry the first made)
                    with pytest.raises(grpc.RpcError) as info:
                        flaky(b"", timeout=5)
                    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                    assert "draining" in info.value.details()
                assert flaky._eps_cfg is m.config(TARGET)
            st = m.stats()["main"]
            assert st["upstream_rq_active"] == 0 and st["upstream_rq_retry"] >= 2
        finally:
            m.close()


def _stat_delta(after: dict, before: dict) -> dict:
    keys = ("upstream_rq_total", "upstream_rq_200", "upstream_rq_retry", "upstream_rq_retry_limit_exceeded",
            "upstream_rq_active", "upstream_rq_rx_reset", "upstream_rq_timeout")
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def _ok_retried(ports: dict) -> List[Any]:
    """One route, no rewrite: every method's OK answer is retried once (200 retriable)."""
    host = TARGET.rsplit(":", 1)[0]
    again = b.route(prefix="/", cluster="main", name="again-all", timeout=5.0)
    again.route.retry_policy.CopyFrom(route_components_pb2.RetryPolicy(
        retry_on="retriable-status-codes", retriable_status_codes=[200],
        num_retries=wrappers_pb2.UInt32Value(value=1)))
    return [
        b.api_listener(TARGET, route_config_name="fast-routes"),
        b.route_config("fast-routes", [b.virtual_host("echo", [host, TARGET], [again])]),
        b.cluster("main"),
        b.assignment("main", [("127.0.0.1", ports[n]) for n in ("s2", "s3")]),
    ]


@pytest.mark.parametrize("resources", [_resources, _ok_retried], ids=["ok-final", "ok-retried"])
def test_short_path_matches_the_general_path(servers, resources, mesh_cls):
    """The same RPCs through the short path (no metadata) and the general one (metadata): the same
    answers, attempts, retries and stats per RPC, on either request-path twin; the short path's
    entries hold each endpoint's grpcio multicallable with its ``__call__`` bound (no type call
    slot)."""
    with ControlPlane() as cp:
        cp.set_resources(resources(servers))
        boot = {"xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}],
                                 "server_features": ["xds_v3"]}],
                "node": {"id": "meshcore-grpc-equiv", "cluster": "meshcore", "locality": {"zone": "z1"}}}
        m = mesh_cls(boot, backoff=Backoff(initial=0.05, multiplier=1.6, jitter=0.2, maximum=0.5), seed=11)
        m.start()
        try:
            m.wait_ready(TARGET, timeout=10)
            with mesh_channel(m, TARGET) as ch:
                hello = ch.unary_unary(f"/{SERVICE}/Hello")
                for _ in range(4):  # the first attempts' entries made (general path, then short)
                    assert hello(b"", timeout=5) in (b"s2", b"s3")
                # (round robin: with a retry per call, every first attempt goes to one endpoint)
                assert hello._eps_cfg is m.config(TARGET) and len(hello._eps) >= 1
                deltas, answers = {}, {}
                for path, kw in (("short", {}), ("general", {"metadata": [("x-user", "u")]}),
                                 ("short-no-deadline", {"timeout": None})):
                    before = dict(m.stats()["main"])
                    kw = {"timeout": 5, **kw}
                    answers[path] = [hello(b"", **kw) for _ in range(6)]
                    deltas[path] = _stat_delta(m.stats()["main"], before)
                # (round robin, an even number of picks per batch: the same endpoints answer)
                assert answers["short"] == answers["general"] == answers["short-no-deadline"], answers
                assert deltas["short"] == deltas["general"] == deltas["short-no-deadline"], deltas
                retried = resources is _ok_retried
                assert deltas["short"]["upstream_rq_total"] == (12 if retried else 6)
                assert deltas["short"]["upstream_rq_retry"] == (6 if retried else 0)
                assert deltas["short"]["upstream_rq_retry_limit_exceeded"] == (6 if retried else 0)
                assert deltas["short"]["upstream_rq_active"] == 0
                # with_call (the general path) and the short path agree on the answer's status
                reply, call = hello.with_call(b"", timeout=5)
                assert reply in (b"s2", b"s3") and call.code() is grpc.StatusCode.OK
                for endpoint, ep, send, route, active, learned_at in hello._eps.values():
                    assert send.__self__ is ep.callables[hello._slot] and not active and ep.inflight == 0
        finally:
            m.close()


def test_short_path_maps_a_failure_as_the_general_path(fast_mesh):
    """An attempt's failure through the short path (the caller's deadline, reached at the server):
    the same status, details and stats as through the general path, nothing left in flight."""
    with mesh_channel(fast_mesh, TARGET) as ch:
        wait = ch.unary_unary(f"/{SERVICE}/Wait")  # 3 s at the server: the caller's deadline ends it
        seen, deltas = {}, {}
        for path, kw in (("first", {}), ("short", {}), ("general", {"metadata": [("x-user", "u")]})):
            before = dict(fast_mesh.stats().get("main", {}))  # (none before the cluster's first request)
            with pytest.raises(grpc.RpcError) as info:
                wait(b"", timeout=0.2, **kw)
            seen[path] = (info.value.code(), info.value.details())
            deltas[path] = _stat_delta(fast_mesh.stats()["main"], before)
            if path == "first":  # its first attempt's entry made: the next call takes the short path
                assert wait._eps_cfg is fast_mesh.config(TARGET) and len(wait._eps) == 1
        assert seen["short"] == seen["general"] and seen["short"][0] is grpc.StatusCode.DEADLINE_EXCEEDED
        assert deltas["short"] == deltas["general"], deltas
        assert deltas["short"]["upstream_rq_total"] == 1 and deltas["short"]["upstream_rq_active"] == 0
        assert all(ep.inflight == 0 for ep in ch._pool._channels.values())


def test_unslotted_binds_python_calls_only():
    import functools

    from meshcore.integrations.grpc.unary import _unslotted

    class Callable_:
        def __call__(self, request: Any, timeout: Any = None) -> Any:
            return (self, request, timeout)

    c = Callable_()
    bound = _unslotted(c)
    assert bound.__self__ is c and bound(1, timeout=2) == c(1, timeout=2) == (c, 1, 2)
    p = functools.partial(max, 0)  # a C type's call: kept as it is
    assert _unslotted(p) is p
    assert _unslotted(len) is len


def test_an_rpc_raising_key_error_under_a_new_configuration_runs_once(servers):
    """The short path's look-ups catch KeyError; an RPC sent from there (a configuration
    published since its entries were made: the general path) is not under those handlers, so an
    endpoint multicallable's KeyError (a bug, not an RPC status) ends one attempt, as a reset,
    and is raised; the RPC is not sent again."""

    def broken(request: Any, timeout: Any = None, **kw: Any) -> Any:
        raise KeyError("a bug")

    with ControlPlane() as cp:
        cp.set_resources(_resources(servers))
        m = ready_mesh(cp, "meshcore-grpc-keyerror", 5)
        try:
            with mesh_channel(m, TARGET) as ch:
                hello = ch.unary_unary(f"/{SERVICE}/Hello")
                assert {hello(b"", timeout=5) for _ in range(4)} == {b"s2", b"s3"}
                old_cfg = hello._eps_cfg
                assert old_cfg is m.config(TARGET)
                res = _resources(servers)
                res[1].virtual_hosts[0].routes[-1].route.timeout.FromSeconds(6)  # another route table
                cp.set_resources(res)
                deadline = time.monotonic() + 5
                while m.config(TARGET) is old_cfg and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert m.config(TARGET) is not old_cfg
                for ep in ch._pool._channels.values():
                    ep.callables[hello._slot] = broken
                before = dict(m.stats()["main"])
                with pytest.raises(KeyError):
                    hello(b"", timeout=5)
                delta = _stat_delta(m.stats()["main"], before)
                assert delta["upstream_rq_total"] == 1 and delta["upstream_rq_rx_reset"] == 1, delta
                assert delta["upstream_rq_active"] == 0
        finally:
            m.close()


def _istio_series(sink: Any) -> dict:
    import json

    return {json.dumps(s["labels"], sort_keys=True): (s["requests"], s["request_messages"], s["response_messages"])
            for s in sink.snapshot()}


def _istio_traffic(ch: Any) -> None:
    calls = getattr(ch, "_test_calls", None)
    if calls is None:  # (made once: each multicallable keeps its own endpoint entries)
        calls = ch._test_calls = [ch.unary_unary(f"/{SERVICE}/{m}") for m in ("Hello", "Again", "Missing")]
    hello, again, missing = calls
    for _ in range(6):
        assert hello(b"", timeout=5) in (b"s2", b"s3")
    assert again(b"", timeout=5) in (b"s2", b"s3")  # OK retried: a second attempt
    with pytest.raises(grpc.RpcError) as err:
        missing(b"", timeout=5)  # the server's answer: a grpc-status
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_istio_metrics_short_path_equals_the_record_path(fast_mesh):
    """With Istio's metrics alone the blocking unary call keeps its short path (the exchange's
    metadata sent, the call observed, no record); its series are exactly those of the general,
    reported path (a second sink: every RPC through ``Call.run`` and a record), label by label."""
    tel = fast_mesh.telemetry
    sink = tel.enable_istio_metrics()
    try:
        with mesh_channel(fast_mesh, TARGET) as ch:
            _istio_traffic(ch)  # (the first RPCs learn the endpoints: the reported general path)
            sink.reset()
            from meshcore.integrations.grpc import unary

            general = []  # RPCs that took a reported general path
            saved = {n: getattr(unary._UnaryUnary, n) for n in ("_invoke", "_reported_after")}

            def counted(name: str) -> Any:
                def f(self: Any, *args: Any, **kw: Any) -> Any:
                    general.append(name)
                    return saved[name](self, *args, **kw)
                return f

            for name in saved:
                setattr(unary._UnaryUnary, name, counted(name))
            try:
                _istio_traffic(ch)
            finally:
                for name, f in saved.items():
                    setattr(unary._UnaryUnary, name, f)
            fast = _istio_series(sink)
            # the Hello RPCs took the short path to their end; Again (a path rewrite: never kept for
            # the short path, as without telemetry) and Missing's status went on in _reported_after
            assert general == ["_reported_after", "_reported_after"], general
            sink.reset()
            records: List[Any] = []
            tel.add_sink(records.append)
            assert tel.observe is None
            _istio_traffic(ch)
            tel.remove_sink(records.append)
            assert len(records) == 8
            assert _istio_series(sink) == fast
        statuses = {k: v for k, v in fast.items()}
        assert sum(v[0] for v in statuses.values()) == 8
        import json
        ok = [v for k, v in fast.items() if json.loads(k)["grpc_response_status"] == "0"]
        assert sum(v[0] for v in ok) == 7 and all(json.loads(k)["request_protocol"] == "grpc" for k in fast)
    finally:
        tel.disable_istio_metrics()


class _MeshLike:
    """A mesh-like object without ``_request_first``: every other attribute is the mesh's."""

    def __init__(self, mesh: Any) -> None:
        self._mesh = mesh

    def __getattr__(self, name: str) -> Any:
        if name == "_request_first":
            raise AttributeError(name)
        return getattr(self._mesh, name)


def test_short_path_without_request_first(fast_mesh):
    """A channel over a mesh-like object without ``MeshCore._request_first`` takes the same
    steps (routed under the expected configuration, the first attempt started): the same
    answers, the short path's entries, the counts."""
    like = _MeshLike(fast_mesh)
    with mesh_channel(like, TARGET) as ch:
        assert ch._request_first == ch._routed_first
        hello = ch.unary_unary(f"/{SERVICE}/Hello", _registered_method=True)
        for _ in range(6):
            assert hello(b"", timeout=5) in (b"s2", b"s3")
        assert hello._eps_cfg is fast_mesh.config(TARGET) and len(hello._eps) == 2
    stats = fast_mesh.stats()["main"]
    assert stats["upstream_rq_total"] == 6 and stats["upstream_rq_active"] == 0


def test_short_path_fallback_routes_under_the_expected_configuration_only(servers):
    """A mesh-like object without ``_request_first``: a configuration published between the check
    and ``request()`` (here: one that routes calls without gRPC's content-type to ``canary``) is
    not taken for the short path's: the RPC is decided again with gRPC's own headers."""
    with ControlPlane() as cp:
        cp.set_resources(_resources(servers))
        m = ready_mesh(cp, "meshcore-grpc-fallback-race", 3)
        armed: List[int] = []

        class Racing(_MeshLike):
            def request(self, *args: Any, **kw: Any) -> Any:
                if armed:  # a new configuration arrives while this RPC is being routed
                    armed.clear()
                    cp.set_resources(_by_own_headers(servers, False))
                    _wait_for_route(m, "others")
                return m.request(*args, **kw)

        try:
            with mesh_channel(Racing(m), TARGET) as ch:
                assert ch._request_first == ch._routed_first
                hello = ch.unary_unary(f"/{SERVICE}/Hello")
                for _ in range(4):
                    assert hello(b"", timeout=5) in (b"s2", b"s3")
                assert hello._eps_cfg is m.config(TARGET) and hello._eps
                armed.append(1)
                assert hello(b"", timeout=5) in (b"s2", b"s3")  # (routed without the headers: c1)
                assert not armed
            assert m.stats()["main"]["upstream_rq_active"] == 0
            assert m.stats().get("canary", {}).get("upstream_rq_total", 0) == 0
        finally:
            m.close()


def _late_mesh(cp: ControlPlane, node_id: str, **kw: Any) -> meshcore.Mesh:
    """A started mesh on ``cp`` whose target may not be published yet (no wait_ready)."""
    boot = {"xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": node_id, "cluster": "meshcore"}}
    return meshcore.Mesh(boot, backoff=Backoff(initial=0.05, multiplier=1.6, jitter=0.2, maximum=0.5), seed=1,
                         **kw).start()


@pytest.fixture
def other_mesh_sink() -> Iterator[None]:
    """Another mesh of the process with a sink (``telemetry.record.ACTIVE[0]`` on); none in the
    mesh under test."""
    other = meshcore.Mesh({"xds_servers": [{"server_uri": "127.0.0.1:1", "channel_creds": [{"type": "insecure"}]}],
                           "node": {"id": "other-mesh", "cluster": "meshcore"}})  # (never started)
    other.telemetry.add_sink(lambda record: None)
    try:
        yield
    finally:
        other.close()


def test_first_rpc_before_the_configuration_while_another_mesh_has_sinks(servers, other_mesh_sink):
    """The first RPC of a multicallable, issued before the target's configuration arrives, on a
    mesh without sinks while another mesh has one: routed (once the configuration arrives) with
    gRPC's own headers, as without the other mesh's sink (not as if its configuration were the
    short path's, which it was never found to be)."""
    with ControlPlane() as cp:
        m = _late_mesh(cp, "meshcore-grpc-late-config")
        try:
            assert not m.telemetry.sinks and m.config(TARGET) is None
            publish = threading.Timer(0.3, lambda: cp.set_resources(_by_own_headers(servers, False)))
            publish.start()
            try:
                with mesh_channel(m, TARGET) as ch:
                    hello = ch.unary_unary(f"/{SERVICE}/Hello")
                    assert hello(b"", timeout=5) in (b"s2", b"s3")  # (was c1: routed without content-type)
                    for _ in range(3):
                        assert hello(b"", timeout=5) in (b"s2", b"s3")
            finally:
                publish.join()
            assert m.stats().get("canary", {}).get("upstream_rq_total", 0) == 0
        finally:
            m.close()


def test_rpc_without_a_configuration_keeps_the_callers_deadline_while_another_mesh_has_sinks(servers,
                                                                                             other_mesh_sink):
    """No configuration ever arrives: the RPC waits for it until its own deadline (as a gRPC
    channel resolving), not the mesh's longer ready_timeout."""
    with ControlPlane() as cp:
        m = _late_mesh(cp, "meshcore-grpc-no-config", ready_timeout=4)
        try:
            with mesh_channel(m, TARGET) as ch:
                hello = ch.unary_unary(f"/{SERVICE}/Hello")
                began = time.monotonic()
                with pytest.raises(grpc.RpcError):
                    hello(b"", timeout=0.3)
                assert time.monotonic() - began < 2.0  # (was the ready_timeout: 4 s)
        finally:
            m.close()
